"""palm eval: sliding-window perplexity against a hand-written loop, bits per byte by hand,
per-position losses against full forwards, and the lm-evaluation-harness backend against the
harness's own `hf` backend on palm's transformers export of the same weights and against direct
forward passes."""

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import CORPUS, train_bpe
from palm import PaLM, PaLMConfig, load_tokenizer, save_pretrained
from palm.errors import PalmError
from palm.eval.cli import add_commands
from palm.eval.extrapolation import bucket_means, extrapolation
from palm.eval.perplexity import Document, evaluate_perplexity, sliding_windows

EOS = 256  # the byte tokenizer's


def palm_eval(*argv: str) -> None:
    """`palm eval ...` through its own parser (what palm.cli's hook adds)."""
    parser = argparse.ArgumentParser(prog="palm")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *argv])
    args.func(args)


def hand_loss(model, documents, seq_len, stride):
    """Total nats and token count: windows [max(0, e - seq_len - 1), e) (the model reads all but
    the last) for e = seq_len + 1, seq_len + 1 + stride, ... up to the sequence's end, each target
    scored by the first window predicting it, one full forward pass per window."""
    nats, count = 0.0, 0
    for ids in documents:
        seq = torch.tensor([EOS, *ids])
        n = len(seq)
        ends = list(range(seq_len + 1, n, stride)) + [n] if n > seq_len + 1 else [n]
        scored = {0}
        for end in ends:
            begin = max(0, end - seq_len - 1)
            window = seq[begin:end]
            logprobs = F.log_softmax(model(window[None, :-1])[0].double(), dim=-1)
            for t in range(begin + 1, end):
                if t not in scored:
                    scored.add(t)
                    nats -= float(logprobs[t - begin - 1, seq[t]])
        assert scored == set(range(n))
        count += len(ids)
    return nats, count


def test_sliding_windows_cover_every_target_once():
    # (begin, end, first): the model reads [begin, end - 1) and scores targets [first, end)
    assert sliding_windows(20, 8, 4) == [(0, 9, 1), (4, 13, 9), (8, 17, 13), (11, 20, 17)]
    assert sliding_windows(11, 8, 4) == [(0, 9, 1), (2, 11, 9)]  # the last window full length
    assert sliding_windows(5, 8, 4) == [(0, 5, 1)]
    assert sliding_windows(20, 8, 8) == [(0, 9, 1), (8, 17, 9), (11, 20, 17)]


@pytest.mark.parametrize("seq_len,stride", [(48, 16), (64, 64)])
def test_perplexity_equals_a_hand_written_loop(trained_tiny, seq_len, stride):
    texts = [CORPUS[:300], CORPUS[500:530], CORPUS[1000:1160]]  # longer and shorter than the window
    documents = [Document(list(t.encode()), len(t.encode())) for t in texts]
    with torch.inference_mode():
        result = evaluate_perplexity(trained_tiny, documents, eos_id=EOS, seq_len=seq_len, stride=stride, batch_size=3)
        nats, count = hand_loss(trained_tiny, [d.ids for d in documents], seq_len, stride)
    assert result.tokens == count == sum(len(t) for t in texts)
    assert result.loss == pytest.approx(nats / count, abs=1e-6)
    assert result.perplexity == pytest.approx(math.exp(nats / count), rel=1e-6)


def test_bits_per_byte_with_a_subword_tokenizer(tmp_path):
    path = train_bpe([CORPUS], tmp_path, vocab_size=300)
    tokenizer = load_tokenizer(str(path))
    torch.manual_seed(0)
    model = PaLM(PaLMConfig(num_tokens=300, dim=32, depth=1, heads=2, dim_head=16, max_seq_len=64)).eval()
    texts = [CORPUS[:400], "Bob gives 7 to the fox. é ü"]
    documents = [Document(tokenizer.encode(t), len(t.encode("utf-8"))) for t in texts]
    result = evaluate_perplexity(model, documents, eos_id=tokenizer.eos_id, seq_len=32, stride=16)
    tokens = sum(len(tokenizer.encode(t)) for t in texts)
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert tokens < num_bytes  # a subword tokenizer: bits per byte is not loss / ln 2
    assert (result.tokens, result.bytes) == (tokens, num_bytes)
    assert result.bits_per_byte == pytest.approx(result.loss * tokens / (num_bytes * math.log(2)), rel=1e-12)


def test_position_losses_equal_full_forward_losses(trained_tiny):
    stream = torch.tensor(list(CORPUS.encode()))[: 3 * 96]
    with torch.inference_mode():
        curves = extrapolation(trained_tiny, stream, [32, 96], windows=3, batch_size=2)
        for curve in curves:
            windows = stream.view(-1, curve.length)
            assert curve.windows == len(windows)
            expected = torch.stack([
                F.cross_entropy(trained_tiny(w[None, :-1])[0].double(), w[1:], reduction="none") for w in windows
            ]).mean(0)
            torch.testing.assert_close(curve.position_loss, expected, atol=1e-6, rtol=0)
            assert curve.loss == pytest.approx(float(expected.mean()), abs=1e-6)
    # positions 1..9 in buckets of 4: [1, 2, 3], [4..7], [8, 9]
    assert bucket_means(torch.arange(1.0, 10.0), 4) == [2.0, 5.5, 8.5]


@pytest.fixture
def tiny_run(tmp_path, trained_tiny):
    """The trained byte model saved as a run would save it, with the run's config.yaml beside it."""
    save_pretrained(trained_tiny, tmp_path / "run" / "model")
    (tmp_path / "run" / "config.yaml").write_text("seq_len: 64\ntokenizer: bytes\n")
    return tmp_path / "run" / "model"


def test_palm_eval_on_local_files_writes_what_the_loop_gives(tiny_run, tmp_path, trained_tiny, capsys):
    texts = [CORPUS[:200], CORPUS[300:420]]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    palm_eval("--checkpoint", str(tiny_run), "--data", str(data), "--stride", "16", "--batch_size", "2",
              "--output", str(tmp_path / "ppl.json"), "--quiet")
    out = json.loads((tmp_path / "ppl.json").read_text())
    with torch.inference_mode():
        nats, count = hand_loss(trained_tiny, [list(t.encode()) for t in texts], 64, 16)  # seq_len from config.yaml
    assert (out["seq_len"], out["stride"], out["tokens"], out["bytes"]) == (64, 16, count, count)
    assert out["loss"] == pytest.approx(nats / count, abs=1e-6)
    assert out["bits_per_byte"] == pytest.approx(nats / (count * math.log(2)), abs=1e-6)
    printed = capsys.readouterr().out
    assert "bits per byte" in printed and f"{out['perplexity']:.3f}" in printed


def test_palm_eval_lengths_writes_a_table_and_a_plot(tiny_run, tmp_path, capsys):
    data = tmp_path / "corpus.txt"
    data.write_text(CORPUS)
    plot = tmp_path / "x.png"
    palm_eval("--checkpoint", str(tiny_run), "--data", str(data), "--lengths", "32,64,128", "--windows", "2",
              "--plot", str(plot), "--output", str(tmp_path / "x.json"), "--quiet")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = json.loads((tmp_path / "x.json").read_text())
    assert out["tokens_per_length"] == 256 and out["bucket"] == 16  # training length 64 / 4
    assert {k: v["windows"] for k, v in out["lengths"].items()} == {"32": 8, "64": 4, "128": 2}
    assert len(out["lengths"]["128"]["bucket_losses"]) == 8
    assert "len 128" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--data", "missing/docs.jsonl"], "no such file"),
    (["--seq_len", "32", "--stride", "64"], "--stride must be between 1 and --seq_len"),
    (["--tasks", "no_such_task_anywhere"], "unknown task no_such_task_anywhere"),
    (["--lengths", "64,x"], "--lengths takes comma-separated integers"),
])
def test_bad_input_is_one_line(tiny_run, tmp_path, argv, message):
    data = tmp_path / "a.txt"
    data.write_text(CORPUS[:500])
    argv = argv if "--data" in argv else ["--data", str(data), *argv]
    with pytest.raises(PalmError, match=message) as error:
        palm_eval("--checkpoint", str(tiny_run), "--quiet", *argv)
    assert "\n" not in str(error.value)


def test_a_model_smaller_than_the_tokenizer_is_one_line(tmp_path):
    save_pretrained(PaLM(PaLMConfig(num_tokens=97, dim=32, depth=1, heads=2, dim_head=16)), tmp_path / "small")
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(PalmError, match="has 257 tokens but the model only 97") as error:
        palm_eval("--checkpoint", str(tmp_path / "small"), "--data", str(tmp_path / "a.txt"), "--tokenizer", "bytes")
    assert "\n" not in str(error.value)


# ---- lm-evaluation-harness -------------------------------------------------------------------

QUESTIONS = [
    {"question": f"{name} has {n} apples and gives", "choices": [f" {n // 2} to the fox.", f" {n} to the dog.", " none."],
     "answer": i % 3, "text": f"{name} has {n} apples and gives {n // 2} to the fox.", "prompt": f"{name} has {n} apples and"}
    for i, (name, n) in enumerate([("Alice", 8), ("Bob", 13), ("Carol", 40), ("Alice", 21), ("Bob", 5), ("Carol", 34)])
]


@pytest.fixture
def local_tasks(tmp_path):
    """Three offline tasks over one local JSONL file: multiple choice, rolling loglikelihood and
    generate-until, in the harness's YAML format."""
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mc.yaml").write_text(
        "task: palm_test_mc\n" + common + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (tasks / "rolling.yaml").write_text(
        "task: palm_test_rolling\n" + common + "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    (tasks / "gen.yaml").write_text(
        "task: palm_test_gen\n" + common + "output_type: generate_until\ndoc_to_text: '{{prompt}}'\n"
        "doc_to_target: '{{text}}'\ngeneration_kwargs:\n  until: ['.']\n  max_gen_toks: 24\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return tasks


def hf_backend(model, tokenizer, directory, max_length):
    """The harness's `hf` backend on palm's transformers export of `model`'s weights (palm's
    `export_hf` into `directory`, `tokenizer` exported beside them), loaded by transformers'
    Auto classes the way `lm_eval --model hf --model_args pretrained=DIR` loads it."""
    from lm_eval.models.huggingface import HFLM

    # importing the export registers palm's classes with transformers' Auto classes
    from palm.hf.export import export_hf

    save_pretrained(model, directory / "palm")
    exported = export_hf(str(directory / "palm"), directory / "hf", tokenizer=tokenizer)
    return HFLM(pretrained=str(exported), batch_size=3, max_length=max_length, device="cpu", dtype="float32")


@pytest.fixture(params=["bytes", "bpe"])
def model_and_tokenizer(request):
    """(model, tokenizer name): the trained byte model with the `bytes` tokenizer, and a random
    model over a byte-level BPE vocabulary (subword boundaries between context and continuation)."""
    if request.param == "bytes":
        return request.getfixturevalue("trained_tiny"), "bytes"
    model, path = request.getfixturevalue("bpe_model")
    return model, str(path)


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory):
    """A byte-level BPE tokenizer and a model with random weights over its vocabulary."""
    path = train_bpe([CORPUS], tmp_path_factory.mktemp("bpe"), vocab_size=300)
    torch.manual_seed(1)
    model = PaLM(PaLMConfig(num_tokens=300, dim=64, depth=2, heads=4, dim_head=16, max_seq_len=128)).eval()
    return model, path


def test_harness_loglikelihoods_equal_the_hf_backend_and_a_direct_forward(model_and_tokenizer, tmp_path):
    from lm_eval.api.instance import Instance

    from palm.eval.harness import PalmLM

    model, tokenizer_name = model_and_tokenizer
    tokenizer = load_tokenizer(tokenizer_name)
    ours = PalmLM(model=model, tokenizer=tokenizer, batch_size=3, max_length=48)
    theirs = hf_backend(model, tokenizer_name, tmp_path, max_length=48)
    pairs = [("Alice has 3", " apples"), ("Bob gives", " 2 to the fox"), ("Bob gives", " 3"), ("Bob gives", " 4"),
             ("", "The quick brown fox"), ("Carol has 5 apples. " * 8, " The quick")]  # the last is truncated
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got, expected = ours.loglikelihood(requests), theirs.loglikelihood(requests)
    for (a, greedy_a), (b, greedy_b) in zip(got, expected):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b

    # direct: log p(continuation | context) from one forward pass over context + continuation
    for (context, continuation), (logprob, _) in zip(pairs[:4], got):
        ids = tokenizer.encode(context + continuation)
        n_context = len(tokenizer.encode(context))
        with torch.inference_mode():
            logprobs = F.log_softmax(model(torch.tensor([ids[:-1]]))[0].double(), dim=-1)
        direct = sum(float(logprobs[t - 1, ids[t]]) for t in range(n_context, len(ids)))
        assert logprob == pytest.approx(direct, abs=1e-4)

    rolling = [Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate([CORPUS[:600], "Alice"])]
    assert ours.loglikelihood_rolling(rolling) == pytest.approx(theirs.loglikelihood_rolling(rolling), abs=1e-4)


def test_generate_until_stops_at_the_stop_sequence_like_greedy_generate(trained_tiny):
    from lm_eval.api.instance import Instance

    from palm.eval.harness import PalmLM
    from palm.inference.decoding import generate

    tokenizer = load_tokenizer("bytes")
    lm = PalmLM(model=trained_tiny, tokenizer=tokenizer, batch_size=2)
    prompts = ["Alice has 8 apples and", "Bob has 13 apples and gives", "Carol"]
    requests = [Instance("generate_until", {}, (p, {"until": ["."], "max_gen_toks": 24, "do_sample": False}), i)
                for i, p in enumerate(prompts)]
    texts = lm.generate_until(requests)
    for prompt, text in zip(prompts, texts):
        full = generate(trained_tiny, torch.tensor(tokenizer.encode(prompt)), 24, temperature=0, eos_token_id=EOS)
        expected = tokenizer.decode(full[len(tokenizer.encode(prompt)):].tolist()).split(".")[0]
        assert text == expected
    assert texts[0].endswith(" to the fox") and not any("." in text for text in texts)


def test_local_tasks_through_both_backends_and_palm_eval(trained_tiny, local_tasks, tmp_path, capsys):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from palm.eval.harness import PalmLM

    model, tokenizer_name = trained_tiny, "bytes"
    manager = TaskManager(include_path=str(local_tasks), include_defaults=False)
    tasks = ["palm_test_mc", "palm_test_rolling"]
    ours = lm_eval.simple_evaluate(model=PalmLM(model=model, tokenizer=load_tokenizer(tokenizer_name), batch_size=3),
                                   tasks=tasks, task_manager=manager)["results"]
    theirs = lm_eval.simple_evaluate(model=hf_backend(model, tokenizer_name, tmp_path / "export", 128), tasks=tasks,
                                     task_manager=manager)["results"]
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["palm_test_mc"][metric] == theirs["palm_test_mc"][metric]
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        assert ours["palm_test_rolling"][metric] == pytest.approx(theirs["palm_test_rolling"][metric], rel=1e-5)

    save_pretrained(model, tmp_path / "model")
    palm_eval("--checkpoint", str(tmp_path / "model"), "--tokenizer", tokenizer_name, "--tasks",
              "palm_test_mc,palm_test_gen", "--include_path", str(local_tasks), "--output", str(tmp_path / "results"))
    printed = capsys.readouterr().out
    assert "palm_test_mc" in printed and "palm_test_gen" in printed
    [results_file] = (tmp_path / "results").rglob("results_*.json")
    saved = json.loads(results_file.read_text())["results"]
    assert saved["palm_test_mc"]["acc,none"] == ours["palm_test_mc"]["acc,none"]
    assert "exact_match,none" in saved["palm_test_gen"]
