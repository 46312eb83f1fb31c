"""`palm serve`: a real uvicorn server on 127.0.0.1, driven by the official `openai` client (and raw
httpx where a client would hide the response), checked against `palm.generate`."""

import gc
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

import palm
from palm.prompts import get_prompt_style
from palm.serve.app import ServeSettings, create_app
from palm.serve.cli import base_model_stops, main
from palm.serve.engine import Engine, Failed, Job
from palm.tokenizer import ByteTokenizer

PLAIN = get_prompt_style("plain")
MODEL = "tiny-test"
MAX_SEQ_LEN = 128
SLOTS = 4


class FlakyBytes(ByteTokenizer):
    """The byte tokenizer, except that decoding fails once `poison` is among the ids (to fail one
    request inside the engine), and that with `spell` set, the tokens from the 4th on decode to its
    UTF-8 bytes, one byte each (a character split across tokens)."""

    poison: int | None = None
    spell: str | None = None

    def decode(self, ids):
        if self.poison is not None and self.poison in ids:
            raise RuntimeError("poisoned token")
        if self.spell is not None:
            spelled = list(self.spell.encode())
            ids = [*ids[:3], *spelled[: max(0, len(ids) - 3)], *ids[3 + len(spelled):]]
        return super().decode(ids)


BYTES = ByteTokenizer()


class Server:
    def __init__(self, model, tokenizer, api_key=None, model_name=MODEL):
        self.engine = Engine(model, tokenizer, max_batch_size=SLOTS, max_seq_len=MAX_SEQ_LEN)
        app = create_app(self.engine, ServeSettings(model_name, PLAIN, base_model_stops(PLAIN), api_key=api_key))
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.01)

    def client(self, api_key="unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/health").json()

    def idle(self) -> bool:
        stats = self.stats()
        return stats["active_sequences"] == stats["prefilling_sequences"] == stats["waiting_requests"] == 0

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(trained_tiny):
    running = Server(trained_tiny, FlakyBytes())
    yield running
    running.close()


def greedy(model, prompt_ids, max_new_tokens):
    ids = palm.generate(model, torch.tensor(prompt_ids), max_new_tokens, temperature=0)[len(prompt_ids):]
    return ids.tolist()


def text_of(ids):
    return BYTES.decode(ids)


def test_completion_is_palm_generate_greedy_with_exact_usage(server, trained_tiny):
    client = server.client()
    prompts = ["Alice has 5", "Bob gives"]
    result = client.completions.create(model=MODEL, prompt=prompts, max_tokens=24, temperature=0)
    assert result.object == "text_completion" and result.model == MODEL and result.id.startswith("cmpl-")
    assert [c.index for c in result.choices] == [0, 1]
    for choice, prompt in zip(result.choices, prompts):
        assert choice.text == text_of(greedy(trained_tiny, BYTES.encode(prompt), 24))
        assert choice.finish_reason == "length"
    prompt_tokens = sum(len(p.encode()) for p in prompts)
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == (
        prompt_tokens, 48, prompt_tokens + 48)
    # token ids as the prompt, and the default max_tokens (16, as OpenAI's)
    ids = BYTES.encode("Carol has")
    by_ids = client.completions.create(model=MODEL, prompt=ids, temperature=0)
    assert by_ids.choices[0].text == text_of(greedy(trained_tiny, ids, 16))


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl on this machine")
def test_the_readmes_curl_command_streams_the_greedy_text(server, trained_tiny):
    command = ["curl", "-sS", "-N", f"{server.url}/v1/completions", "-H", "Content-Type: application/json",
               "-d", json.dumps({"model": MODEL, "prompt": "Alice has 5", "max_tokens": 20, "stream": True, "temperature": 0})]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    events = [line.removeprefix("data: ") for line in done.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(choice["text"] for event in events[:-1] for choice in json.loads(event)["choices"])
    assert text == text_of(greedy(trained_tiny, BYTES.encode("Alice has 5"), 20))


def test_chat_completion_formats_the_conversation_in_the_prompt_style(server, trained_tiny):
    messages = [{"role": "system", "content": "Count apples."}, {"role": "user", "content": "Alice has 5 apples"}]
    result = server.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0)
    prompt = BYTES.encode(PLAIN.render(messages, generation=True))
    expected = text_of(greedy(trained_tiny, prompt, 30))
    stop = "\nUser: "  # a base model's reply ends where the next user turn would begin
    finish = "stop" if stop in expected else "length"
    choice = result.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.split(stop)[0]
    assert choice.finish_reason == finish and result.object == "chat.completion"
    assert result.usage.prompt_tokens == len(prompt)


def test_streams_end_with_done_and_carry_usage_when_asked(server, trained_tiny):
    client = server.client()
    whole = client.completions.create(model=MODEL, prompt="Carol has 7", max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt="Carol has 7", max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert len([c for c in chunks if c.choices]) > 2  # token by token, not all at once
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == len("Carol has 7")

    messages = [{"role": "user", "content": "Bob has 3 apples"}]
    chat = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True))
    assert chat[0].choices[0].delta.role == "assistant" and chat[0].object == "chat.completion.chunk"
    text = "".join(c.choices[0].delta.content or "" for c in chat)
    prompt = BYTES.encode(PLAIN.render(messages, generation=True))
    assert text == text_of(greedy(trained_tiny, prompt, 12)).split("\nUser: ")[0]
    assert chat[-1].choices[0].finish_reason in ("stop", "length") and all(c.usage is None for c in chat)

    body = {"model": MODEL, "prompt": "Alice", "max_tokens": 5, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = [line for line in raw.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])


def test_streamed_text_never_splits_a_utf8_character(server, trained_tiny):
    prompt = BYTES.encode("Alice has 5")
    server.engine.tokenizer.spell = "\u20ac"  # three bytes, so three tokens
    try:
        chunks = [c.choices[0].text for c in server.client().completions.create(
            model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True)]
    finally:
        server.engine.tokenizer.spell = None
    ids = greedy(trained_tiny, prompt, 12)
    expected = BYTES.decode(ids[:3]) + "\u20ac" + BYTES.decode(ids[6:])
    assert "".join(chunks) == expected
    assert "\ufffd" not in "".join(chunks) and any(c.endswith("\u20ac") for c in chunks)


def test_stop_strings_end_the_text_and_never_leak_even_in_part(server, trained_tiny):
    client = server.client()
    prompt = "Alice has 5"
    full = text_of(greedy(trained_tiny, BYTES.encode(prompt), 60))
    stop = full[20:26]
    expected = full[: full.find(stop)]
    # one stop that occurs, one whose beginning occurs ("held back" while it might still match)
    stops = [stop, full[5:9] + "#"]
    result = client.completions.create(model=MODEL, prompt=prompt, max_tokens=60, temperature=0, stop=stops)
    assert result.choices[0].text == expected and result.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=60, temperature=0, stop=stops, stream=True)]
    assert "".join(pieces) == expected
    assert not any(stop[: k] in piece for piece in pieces for k in range(2, len(stop) + 1) if stop[:k] not in expected)
    # usage counts the tokens decoded up to the one that completed the stop string
    assert result.usage.completion_tokens == len((expected + stop).encode())
    # a stop that never occurs: the held-back text comes out at the end
    never = client.completions.create(model=MODEL, prompt=prompt, max_tokens=60, temperature=0, stop=full[5:9] + "#")
    assert never.choices[0].text == full and never.choices[0].finish_reason == "length"


def test_n_choices_with_a_seed_are_reproducible_and_equal_palm_generate(server, trained_tiny):
    client = server.client()
    args = {"model": MODEL, "prompt": "Bob has 4", "max_tokens": 24, "temperature": 1.0, "n": 3, "seed": 1234}
    first, second = client.completions.create(**args), client.completions.create(**args)
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in second.choices] and len(set(texts)) > 1
    generator = torch.Generator().manual_seed(1234)
    prompt = torch.tensor(BYTES.encode("Bob has 4")).expand(3, -1)
    batch = palm.generate(trained_tiny, prompt, 24, temperature=1.0, filter_thres=None, generator=generator)
    assert texts == [text_of(row[prompt.shape[1]:].tolist()) for row in batch]
    other = client.completions.create(**{**args, "seed": 99})
    assert [c.text for c in other.choices] != texts


def test_concurrent_requests_share_the_batch_and_match_sequential_greedy(server, trained_tiny):
    client = server.client()
    prompts = ["Alice has 2", "Bob has 13", "Carol gives", "The quick"]
    before = server.stats()["decode_steps_by_batch_size"].get(str(len(prompts)), 0)
    results, barrier = {}, threading.Barrier(len(prompts))

    def ask(prompt):
        barrier.wait()
        results[prompt] = client.completions.create(model=MODEL, prompt=prompt, max_tokens=100, temperature=0)

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for prompt in prompts:
        assert results[prompt].choices[0].text == text_of(greedy(trained_tiny, BYTES.encode(prompt), 100))
    after = server.stats()["decode_steps_by_batch_size"].get(str(len(prompts)), 0)
    assert after > before  # all four decoded in the same steps


class Finished:
    """Engine jobs of one token each, and a count of those that have ended."""

    def __init__(self):
        self.ended = threading.Semaphore(0)

    def job(self) -> Job:
        def on_event(event):
            if isinstance(event, Failed) or any(piece.finish_reason for piece in event):
                self.ended.release()

        return Job([BYTES.encode("Alice has")], max_tokens=1, on_event=on_event)

    def wait(self, count: int, timeout: float = 30.0) -> None:
        for _ in range(count):
            assert self.ended.acquire(timeout=timeout), "a job did not end"


def test_requests_arriving_apart_share_one_prefill_and_a_full_batch_starts_at_once(trained_tiny):
    # three requests 150 ms apart: more than gather_s from the first to the last, less between two
    engine = Engine(trained_tiny, BYTES, max_batch_size=SLOTS, max_seq_len=MAX_SEQ_LEN, gather_s=0.25, max_gather_s=5.0)
    engine.start()
    try:
        finished = Finished()
        for _ in range(3):
            engine.submit(finished.job())
            time.sleep(0.15)
        finished.wait(3)
        assert engine.prefills == 1
    finally:
        engine.stop()
    # requests that fill every row need not wait for more
    engine = Engine(trained_tiny, BYTES, max_batch_size=SLOTS, max_seq_len=MAX_SEQ_LEN, gather_s=60.0, max_gather_s=60.0)
    engine.start()
    try:
        finished, start = Finished(), time.monotonic()
        for _ in range(SLOTS):
            engine.submit(finished.job())
        finished.wait(SLOTS)
        assert time.monotonic() - start < 10 and engine.prefills == 1
    finally:
        engine.stop()


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_client_that_disconnects_frees_its_slot(server):
    wait_for(server.idle)
    generated = server.stats()["generated_tokens"]
    # greedy: a sampled row could reach end-of-text early and free its slot on its own
    body = {"model": MODEL, "prompt": "Alice has 5", "max_tokens": 110, "stream": True, "n": SLOTS, "temperature": 0}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as response:
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        assert server.stats()["active_sequences"] == SLOTS  # every slot taken
    # closing the connection cancels the request: its slots come back well before 110 tokens
    wait_for(server.idle)
    spent = server.stats()["generated_tokens"] - generated
    assert spent < SLOTS * 110 / 2
    time.sleep(0.2)
    assert server.stats()["generated_tokens"] - generated == spent  # no decoding continues for it
    result = server.client().completions.create(model=MODEL, prompt="Bob", max_tokens=3, temperature=0, n=SLOTS)
    assert len(result.choices) == SLOTS  # the freed slots serve the next request


BAD_REQUESTS = [
    # (what, endpoint, body, status, param, code)
    ("malformed JSON", "completions", b'{"model": "tiny-test", "prompt": ', 400, None, None),
    ("not an object", "completions", [1, 2], 400, None, None),
    ("missing prompt", "completions", {"model": MODEL}, 400, "prompt", None),
    ("max_tokens of the wrong type", "completions", {"model": MODEL, "prompt": "a", "max_tokens": "ten"}, 400, "max_tokens", None),
    ("temperature of the wrong type", "completions", {"model": MODEL, "prompt": "a", "temperature": "hot"}, 400, "temperature", None),
    ("stream of the wrong type", "completions", {"model": MODEL, "prompt": "a", "stream": "yes"}, 400, "stream", None),
    ("unknown model", "completions", {"model": "gpt-9", "prompt": "a"}, 404, "model", "model_not_found"),
    ("prompt longer than the context", "completions", {"model": MODEL, "prompt": "a" * (MAX_SEQ_LEN + 1)}, 400, "prompt", "context_length_exceeded"),
    ("max_tokens beyond the context", "completions", {"model": MODEL, "prompt": "abc", "max_tokens": MAX_SEQ_LEN}, 400, "max_tokens", "context_length_exceeded"),
    ("max_tokens zero", "completions", {"model": MODEL, "prompt": "abc", "max_tokens": 0}, 400, "max_tokens", None),
    ("negative temperature", "completions", {"model": MODEL, "prompt": "a", "temperature": -0.5}, 400, "temperature", None),
    ("top_p out of range", "completions", {"model": MODEL, "prompt": "a", "top_p": 1.5}, 400, "top_p", None),
    ("n too large", "completions", {"model": MODEL, "prompt": "a", "n": SLOTS + 1}, 400, "n", None),
    ("n zero", "completions", {"model": MODEL, "prompt": "a", "n": 0}, 400, "n", None),
    ("empty prompt", "completions", {"model": MODEL, "prompt": ""}, 400, "prompt", None),
    ("token id outside the vocabulary", "completions", {"model": MODEL, "prompt": [1, 999]}, 400, "prompt", None),
    ("too many stop strings", "completions", {"model": MODEL, "prompt": "a", "stop": ["1", "2", "3", "4", "5"]}, 400, "stop", None),
    ("unsupported option", "completions", {"model": MODEL, "prompt": "a", "logprobs": 3}, 400, "logprobs", "unsupported_parameter"),
    ("no messages", "chat/completions", {"model": MODEL, "messages": []}, 400, "messages", None),
    ("unknown role", "chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages", None),
    ("message content of the wrong type", "chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content", None),
    ("conversation longer than the context", "chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "a" * MAX_SEQ_LEN}]}, 400, "messages", "context_length_exceeded"),
]


@pytest.mark.parametrize("what,endpoint,body,status,param,code", BAD_REQUESTS, ids=[r[0] for r in BAD_REQUESTS])
def test_bad_input_is_a_4xx_with_an_openai_error_body(server, what, endpoint, body, status, param, code):
    url = f"{server.url}/v1/{endpoint}"
    response = httpx.post(url, content=body) if isinstance(body, bytes) else httpx.post(url, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error" and "Traceback" not in error["message"]
    assert (error["param"], error["code"]) == (param, code)


def test_the_openai_client_raises_its_own_errors(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt="a", temperature=-1)
    with pytest.raises(openai.NotFoundError, match="gpt-9"):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert [m.id for m in client.models.list()] == [MODEL]
    assert server.stats()["status"] == "ok"


@pytest.fixture(scope="module")
def keyed(trained_tiny):
    """A server with an API key, under the model name the README's example uses."""
    running = Server(trained_tiny, BYTES, api_key="sekret", model_name="runs/my-model")
    yield running
    running.close()


def test_an_api_key_is_required_when_set(keyed):
    body = {"model": "runs/my-model", "prompt": "a", "max_tokens": 2}
    missing = httpx.post(f"{keyed.url}/v1/completions", json=body)
    wrong = httpx.post(f"{keyed.url}/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
    for response in (missing, wrong):
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        keyed.client("nope").models.list()
    assert keyed.client("sekret").completions.create(**body).choices[0].finish_reason == "length"
    assert httpx.get(f"{keyed.url}/health").status_code == 200  # for load balancers, no key


def test_the_readme_client_example_runs_against_the_server(keyed, capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    serving = readme[readme.index("## Serving"):]
    example = re.search(r"```py\n(.*?)```", serving, flags=re.DOTALL).group(1)
    exec(compile(example.replace("http://127.0.0.1:8000", keyed.url), "README.md", "exec"), {})  # noqa: S102 - the example as written
    assert len(capsys.readouterr().out) > 64


def test_an_exception_in_one_request_fails_that_request_only(server, trained_tiny):
    client = server.client()
    bad, good = "Alice has 5", "Bob has 3"
    good_ids = greedy(trained_tiny, BYTES.encode(good), 40)
    poison = next(t for t in greedy(trained_tiny, BYTES.encode(bad), 40) if t not in good_ids)
    results = {}

    def ask(prompt):
        try:
            results[prompt] = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0)
        except openai.APIError as e:
            results[prompt] = e

    server.engine.tokenizer.poison = poison
    try:
        threads = [threading.Thread(target=ask, args=(p,)) for p in (bad, good)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.engine.tokenizer.poison = None
    assert isinstance(results[bad], openai.InternalServerError) and "poisoned token" in str(results[bad])
    assert results[good].choices[0].text == text_of(good_ids)
    wait_for(server.idle)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_palm_serve_drains_open_streams_on_sigterm_and_exits_cleanly(tmp_path):
    torch.manual_seed(0)
    palm.save_pretrained(palm.PaLM(palm.PaLMConfig(num_tokens=257, dim=128, depth=4, heads=4, dim_head=32,
                                                   max_seq_len=256)), tmp_path / "model")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "palm.serve", "--checkpoint", str(tmp_path / "model"), "--tokenizer", "bytes",
         "--port", str(port), "--model_name", MODEL], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read() if process.poll() else "no start"
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        body = {"model": MODEL, "prompt": "Once", "max_tokens": 200, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert process.wait(timeout=60) == 0
        assert "Waiting for connections to close" in process.stdout.read()  # the signal came mid-stream
    finally:
        if process.poll() is None:
            process.kill()
        process.stdout.close()


def test_palm_serve_freezes_what_it_loaded_before_serving(tmp_path, monkeypatch):
    """The model, the app and the libraries' objects are out of the collector's sight while the
    server runs: a full collection no longer walks them (a ~150 ms pause in the 150m server)."""
    palm.save_pretrained(palm.PaLM(palm.PaLMConfig(num_tokens=257, dim=32, depth=1, heads=2, dim_head=16,
                                                   max_seq_len=64)), tmp_path / "model")
    seen = {}

    def run(app, **options):
        seen["frozen"] = gc.get_freeze_count()
        seen["walked"] = gc.get_objects()  # what a full collection would walk now
        seen["app collectable"] = any(o is app for o in seen["walked"])

    monkeypatch.setattr(uvicorn, "run", run)
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # keep this process's own handlers
    assert gc.get_freeze_count() == 0
    try:
        assert main(["--checkpoint", str(tmp_path / "model"), "--tokenizer", "bytes"]) == 0
    finally:
        gc.unfreeze()
    assert seen["frozen"] > 50_000 and not seen["app collectable"]
    assert len(seen["walked"]) < seen["frozen"] / 10


def test_palm_serve_refuses_bad_options(tmp_path, capsys):
    palm.save_pretrained(palm.PaLM(palm.PaLMConfig(num_tokens=257, dim=32, depth=1, heads=2, dim_head=16,
                                                   max_seq_len=64)), tmp_path / "model")
    common = ["--checkpoint", str(tmp_path / "model"), "--tokenizer", "bytes"]
    assert main([*common, "--max_batch_size", "0"]) == 1
    assert "--max_batch_size must be at least 1" in capsys.readouterr().err
    assert main([*common, "--max_seq_len", "65"]) == 1
    assert "--max_seq_len must be in [2, 64]" in capsys.readouterr().err
    assert main([*common, "--prompt_style", "nope"]) == 1
    assert "unknown prompt style" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["model"]
