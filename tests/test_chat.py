import os
import pty
import select
import subprocess
import sys
import time

import pytest
import torch

import palm
from palm import PalmError
from palm.inference.chat import StopAtText, prompt_ids, reply
from palm.prompts import get_prompt_style

BYTES = palm.load_tokenizer("bytes")
PLAIN = get_prompt_style("plain")


def test_stop_text_never_leaks_even_in_part():
    stop = StopAtText(["<|im_end|>", "\n\n"])
    pieces = [stop.push(p) for p in ["Hello <", "|im", " not it", " <|im_e", "nd|> tail"]]
    assert "".join(pieces) == "Hello <|im not it " and stop.stopped
    assert pieces[0] == "Hello " and pieces[1] == ""  # "<" and "<|im" might begin the stop text
    other = StopAtText(["END"])
    assert other.push("the E") == "the " and other.push("ND") == "" and other.stopped
    rest = StopAtText(["END"])
    assert rest.push("an E") == "an " and rest.flush() == "E"


def test_old_turns_make_way_for_the_new_message():
    system = {"role": "system", "content": "S"}
    turns = [{"role": r, "content": c * 30} for r, c in [("user", "a"), ("assistant", "b"), ("user", "c"),
                                                         ("assistant", "d"), ("user", "e")]]
    everything = prompt_ids(BYTES, PLAIN, [system, *turns], 10_000)
    assert BYTES.decode(everything) == PLAIN.render([system, *turns], generation=True)
    assert everything.count(BYTES.eos_id) == 2  # after each earlier reply, as in training
    fitted = prompt_ids(BYTES, PLAIN, [system, *turns], len(everything) - 1)
    assert BYTES.decode(fitted) == PLAIN.render([system, *turns[2:]], generation=True)
    with pytest.raises(PalmError, match="last message takes"):
        prompt_ids(BYTES, PLAIN, [system, *turns], 20)


def test_a_reply_is_the_greedy_continuation_up_to_the_end_of_text(trained_tiny):
    messages = [{"role": "user", "content": "Alice has 5 apples"}]
    text = "".join(reply(trained_tiny, BYTES, PLAIN, messages, 40, temperature=0))
    prompt = torch.tensor(prompt_ids(BYTES, PLAIN, messages, 10_000))
    greedy = palm.generate(trained_tiny, prompt, 40, temperature=0, eos_token_id=BYTES.eos_id)[len(prompt):].tolist()
    expected = bytes(t for t in greedy if t != BYTES.eos_id).decode("utf-8", errors="ignore")
    assert text and text == expected


def read_until(fd: int, marker: str, timeout: float = 120) -> str:
    out, deadline = b"", time.monotonic() + timeout
    while marker.encode() not in out:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"no {marker!r} within {timeout}s; got {out.decode(errors='replace')!r}")
        out += os.read(fd, 4096)
    return out.decode()


def test_palm_chat_in_a_terminal_holds_a_conversation(trained_tiny, tmp_path):
    palm.save_pretrained(trained_tiny, tmp_path / "model")
    args = [sys.executable, "-m", "palm", "chat", "--checkpoint", str(tmp_path / "model"), "--tokenizer", "bytes",
            "--prompt_style", "plain", "--temperature", "0", "--max_new_tokens", "24"]
    main, child = pty.openpty()
    process = subprocess.Popen(args, stdin=child, stdout=child, stderr=child, close_fds=True)
    os.close(child)
    try:
        banner = read_until(main, "> ")
        assert "chatting with" in banner
        os.write(main, b"Alice has 5 apples\n")
        first = read_until(main, "\n> ")
        os.write(main, b"Bob has\n")
        second = read_until(main, "\n> ")
        os.write(main, b"/exit\n")
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
        os.close(main)
    history = [{"role": "user", "content": "Alice has 5 apples"}]
    answer_1 = "".join(reply(trained_tiny, BYTES, PLAIN, history, 24, temperature=0))
    history += [{"role": "assistant", "content": answer_1}, {"role": "user", "content": "Bob has"}]
    answer_2 = "".join(reply(trained_tiny, BYTES, PLAIN, history, 24, temperature=0))
    # the terminal shows the typed line, then the reply (with \r\n line ends)
    assert first.replace("\r\n", "\n").split("Alice has 5 apples\n", 1)[1].rstrip("> ").rstrip("\n") == answer_1.rstrip("\n")
    assert second.replace("\r\n", "\n").split("Bob has\n", 1)[1].rstrip("> ").rstrip("\n") == answer_2.rstrip("\n")
    assert answer_1 != answer_2  # the second turn saw the first


def test_palm_chat_answers_one_message_from_stdin(trained_tiny, tmp_path):
    palm.save_pretrained(trained_tiny, tmp_path / "model")
    done = subprocess.run([sys.executable, "-m", "palm", "chat", "--checkpoint", str(tmp_path / "model"),
                           "--tokenizer", "bytes", "--temperature", "0", "--max_new_tokens", "24"],
                          input="Carol has", capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    expected = "".join(reply(trained_tiny, BYTES, PLAIN, [{"role": "user", "content": "Carol has"}], 24, temperature=0))
    assert done.stdout == expected + "\n"
    assert "no saved prompt style; using 'plain'" in done.stderr  # a base model: the documented fallback
