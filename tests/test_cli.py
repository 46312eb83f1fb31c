import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import palm
from palm.cli import main

from conftest import SMALL


def run(*args, env=None):
    """Run `python -m palm ...` as a user would; returns the completed process."""
    return subprocess.run(
        [sys.executable, "-m", "palm", *args], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )


def test_info_of_a_checkpoint(reference_checkpoint, capsys):
    path, ref = reference_checkpoint
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    n = sum(p.numel() for p in ref.parameters())
    assert f"parameters: {n:,}" in out
    assert "dtype: float32" in out and "dim: 64" in out and "preset: (none)" in out


def test_info_system_names_this_machines_paths(capsys):
    import torch

    from palm.inference.cpu import gemv_kernel_faster, kernel_available, onednn_matmul_faster, tiled_kernel_faster

    assert main(["info", "--system"]) == 0
    out = capsys.readouterr().out
    native = any(getattr(torch.cpu, check, lambda: False)() for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    assert f"vector unit {torch.backends.cpu.get_cpu_capability()}, native bf16 {'yes' if native else 'no'}" in out
    lines = dict(line.strip().split(": ", 1) for line in out.splitlines() if line.startswith("  "))
    assert lines["decoding products, up to 8 rows (fp32, int8)"] == ("palm's GEMV kernel" if kernel_available() else "PyTorch's matmul")
    assert (lines["decoding products, up to 8 rows (bf16)"] == "palm's GEMV kernel") == gemv_kernel_faster(torch.bfloat16)
    assert lines["inference products of 9-64 rows, fp32"].startswith("palm's") == tiled_kernel_faster()
    assert lines["larger inference products, fp32"].startswith("oneDNN") == onednn_matmul_faster(torch.float32)
    assert ("native bf16 units" in lines["bf16 training (autocast)"]) == native


def test_info_of_a_preset_needs_no_download(capsys):
    assert main(["info", "410m"]) == 0
    out = capsys.readouterr().out
    assert "preset: palm_410m_8k_v0" in out and "parameters: 410,149,888" in out
    assert "conceptofmind/palm-410m/palm_410m_8k_v0.pt" in out


def test_convert_both_ways(tmp_path, reference_checkpoint, capsys):
    path, ref = reference_checkpoint
    assert main(["convert", str(path), str(tmp_path / "ours"), "--dtype", "bf16"]) == 0
    assert palm.load(tmp_path / "ours").token_emb.weight.dtype == torch.bfloat16
    assert main(["convert", str(path), str(tmp_path / "ours32")]) == 0
    assert main(["convert", str(tmp_path / "ours32"), str(tmp_path / "back.pt")]) == 0
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert list(back) == list(ref.state_dict())
    for name, tensor in ref.state_dict().items():
        torch.testing.assert_close(back[name], tensor, atol=0, rtol=0)


def test_convert_refuses_to_overwrite(tmp_path, reference_checkpoint, capsys):
    path, _ = reference_checkpoint
    target = tmp_path / "existing.pt"
    target.write_bytes(b"precious")
    assert main(["convert", str(path), str(target)]) == 1
    assert "already holds a model; pass --overwrite" in capsys.readouterr().err
    assert target.read_bytes() == b"precious"
    assert main(["convert", str(path), str(target), "--overwrite"]) == 0
    assert palm.load(target).config.dim == SMALL["dim"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_bad_inputs_give_one_line_and_nonzero_exit(tmp_path, reference_checkpoint):
    path, _ = reference_checkpoint
    torch.save({"x": print}, tmp_path / "code.pt")
    cases = {
        "wrong size": (["info", str(path), "--config", "tiny"], "does not fit preset tiny"),
        "pickled code": (["info", str(tmp_path / "code.pt")], "refusing to load"),
        "missing file": (["info", str(tmp_path / "nope.pt")], "no such file or directory"),
        "offline preset": (["convert", "1b", str(tmp_path / "out")], "pass its local path"),
    }
    for name, (args, expected) in cases.items():
        result = run(*args)
        assert result.returncode == 1, name
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (name, result.stderr)
    assert not (tmp_path / "out").exists()


def test_hubconf_entry_points():
    repo = Path(__file__).resolve().parents[1]
    model = torch.hub.load(str(repo), "palm_150m_8k_v0", source="local", pretrained=False, map_location="meta")
    assert model.config == palm.get_config("150m") and model.token_emb.weight.is_meta
    result = subprocess.run(
        [sys.executable, "-c", f"import torch; torch.hub.load({str(repo)!r}, 'palm_410m_8k_v0', source='local')"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode != 0 and "conceptofmind/palm-410m" in result.stderr


@pytest.fixture
def tiny_bytes_model(tmp_path, trained_tiny):
    palm.save_pretrained(trained_tiny, tmp_path / "tiny")
    return str(tmp_path / "tiny")


PROMPT = "Bob has 1"
GREEDY = ["generate", PROMPT, "--tokenizer", "bytes", "--temperature", "0", "--seq_len", "60"]  # 51 new tokens


def continuation(model, prompt: str, max_new_tokens: int, **options) -> list[str]:
    """The text palm.generate continues `prompt` with (one row per sample), through the Python API."""
    from palm.inference.decoding import generate

    ids = torch.tensor(list(prompt.encode()))
    rows = generate(model, ids.expand(options.pop("num_samples", 1), -1), max_new_tokens, eos_token_id=256, **options)
    return [bytes(t for t in row[len(ids):].tolist() if t < 256).decode("utf-8", errors="replace") for row in rows]


def test_generate_streams_the_greedy_continuation(tiny_bytes_model, trained_tiny, capsys):
    import copy

    from palm.inference.quantization import quantize

    assert main([*GREEDY, "--checkpoint", tiny_bytes_model]) == 0
    captured = capsys.readouterr()
    expected = continuation(trained_tiny, PROMPT, 51, temperature=0)[0]
    assert captured.out == PROMPT + expected + "\n" and " apples" in expected
    assert "decode" in captured.err and "tokens/s" in captured.err
    # int8 weights: the greedy continuation of the int8 model, and close to fp32's
    assert main([*GREEDY, "--checkpoint", tiny_bytes_model, "--quantize", "int8"]) == 0
    int8 = continuation(quantize(copy.deepcopy(trained_tiny)), PROMPT, 51, temperature=0)[0]
    assert capsys.readouterr().out == PROMPT + int8 + "\n" and int8[:10] == expected[:10]
    # --dtype bf16: the bf16 model's own continuation (which differs from fp32's here)
    assert main([*GREEDY, "--checkpoint", tiny_bytes_model, "--dtype", "bf16"]) == 0
    bf16 = continuation(copy.deepcopy(trained_tiny).to(torch.bfloat16), PROMPT, 51, temperature=0)[0]
    assert bf16 != expected and capsys.readouterr().out == PROMPT + bf16 + "\n"
    assert main([*GREEDY, "--checkpoint", tiny_bytes_model, "--compile"]) == 0
    compiled = capsys.readouterr()
    assert compiled.out == captured.out and "compiling" in compiled.err


def test_generate_sampling_flags(tiny_bytes_model, trained_tiny, capsys):
    sampled = ["generate", PROMPT, "--checkpoint", tiny_bytes_model, "--tokenizer", "bytes", "--max_new_tokens", "40",
               "--temperature", "1.5", "--seed", "1", "--device", "cpu"]
    greedy = PROMPT + continuation(trained_tiny, PROMPT, 40, temperature=0)[0] + "\n"
    assert main(sampled) == 0
    assert capsys.readouterr().out != greedy  # at temperature 1.5 the draws leave the greedy path
    for flags in (["--top_k", "1"], ["--top_p", "1e-6"]):  # one token kept: greedy whatever the temperature
        assert main([*sampled, *flags]) == 0
        assert capsys.readouterr().out == greedy, flags
    assert main([*sampled, "--top_k", "3", "--top_p", "0.9"]) == 0
    g = torch.Generator().manual_seed(1)
    expected = continuation(trained_tiny, PROMPT, 40, temperature=1.5, top_k=3, top_p=0.9, generator=g)[0]
    assert capsys.readouterr().out == PROMPT + expected + "\n"
    assert main([*sampled[:-2], "--device", "nonsense"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device nonsense" in err[0]


def test_generate_from_stdin_and_samples(tiny_bytes_model, trained_tiny, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("Carol has"))
    args = ["generate", "-", "--checkpoint", tiny_bytes_model, "--tokenizer", "bytes", "--max_new_tokens", "20", "--seed", "3", "--num_samples", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    # the defaults (temperature 0.8, filter_thres 0.9), both samples drawn as one batch from one generator
    first, second = continuation(trained_tiny, "Carol has", 20, num_samples=2, generator=torch.Generator().manual_seed(3))
    assert first != second
    assert out == f"--- sample 1 ---\nCarol has{first}\n--- sample 2 ---\nCarol has{second}\n"


TEXT_WITH_SPLIT_CHARACTERS = "caf\u00e9 \u20ac5 \U0001f600 \u65e5\u672c ok"


def test_streamed_text_holds_back_a_character_split_across_tokens(tmp_path):
    from conftest import train_bpe
    from palm.tokenizer import TextStreamer, load_tokenizer

    bpe = load_tokenizer(str(train_bpe(["hello world, cafe " * 30], tmp_path, vocab_size=280)))
    for tokenizer in (load_tokenizer("bytes"), bpe):
        ids = tokenizer.encode(TEXT_WITH_SPLIT_CHARACTERS)
        streamer = TextStreamer(tokenizer)
        pieces = [streamer.push(i) for i in ids]
        assert "".join(pieces) == TEXT_WITH_SPLIT_CHARACTERS, tokenizer.name
        assert not any("\ufffd" in piece for piece in pieces)
        assert pieces.count("") >= 3  # characters were split across tokens: each waited for its end
    # bytes that are not UTF-8 still come out, as U+FFFD, once text follows them
    streamer = TextStreamer(load_tokenizer("bytes"))
    assert [streamer.push(i) for i in [0xFF, ord("a")]] == ["", "\ufffda"]


def test_generate_prints_split_characters_whole(tiny_bytes_model, capsys, monkeypatch):
    """The CLI's stream of tokens, one byte at a time: stdout gets each character once it is complete."""
    import palm.inference.decoding

    def fake_stream(model, prompts, max_new_tokens, **options):
        for byte in TEXT_WITH_SPLIT_CHARACTERS.encode():
            yield torch.tensor([byte])

    writes = []
    monkeypatch.setattr(palm.inference.decoding, "stream", fake_stream)
    monkeypatch.setattr(sys.stdout, "write", lambda text, real=sys.stdout.write: writes.append(text) or real(text))
    assert main(["generate", "Bob", "--checkpoint", tiny_bytes_model, "--tokenizer", "bytes", "--max_new_tokens", "40"]) == 0
    assert capsys.readouterr().out == "Bob" + TEXT_WITH_SPLIT_CHARACTERS + "\n"
    assert not any("\ufffd" in w for w in writes) and "\U0001f600" in writes


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--temperature", "-0.5"], "temperature must be >= 0"),
        (["--filter_thres", "1"], "filter_thres must be in [0, 1)"),
        (["--seq_len", "3"], "--seq_len 3 leaves no room"),
    ],
)
def test_generate_bad_options(tiny_bytes_model, capsys, extra, message):
    assert main(["generate", "Bob has", "--checkpoint", tiny_bytes_model, "--tokenizer", "bytes", *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_generate_bad_inputs(tiny_bytes_model, reference_checkpoint, capsys):
    path, _ = reference_checkpoint
    assert main(["generate", "", "--checkpoint", tiny_bytes_model, "--tokenizer", "bytes"]) == 1
    assert "empty prompt" in capsys.readouterr().err
    assert main(["generate", "x" * 600, "--checkpoint", tiny_bytes_model, "--tokenizer", "bytes"]) == 1
    assert "the prompt is 600 tokens; the model's context is 512" in capsys.readouterr().err
    # the reference test model has 97 tokens, the byte tokenizer 257
    assert main(["generate", "hi", "--checkpoint", str(path), "--tokenizer", "bytes"]) == 1
    assert "has 257 tokens but the model only 97" in capsys.readouterr().err
