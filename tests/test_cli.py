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


def test_generate_streams_text(tiny_bytes_model, capsys):
    args = ["generate", "Bob has 1", "--checkpoint", tiny_bytes_model, "--tokenizer", "bytes", "--temperature", "0", "--seq_len", "60"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("Bob has 1") and " apples" in captured.out
    assert "decode" in captured.err and "tokens/s" in captured.err
    assert main([*args, "--quantize", "int8"]) == 0
    assert capsys.readouterr().out.startswith("Bob has 1")
    assert main([*args, "--compile"]) == 0
    compiled = capsys.readouterr()
    assert compiled.out == captured.out and "compiling" in compiled.err


def test_generate_from_stdin_and_samples(tiny_bytes_model, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("Carol has"))
    args = ["generate", "-", "--checkpoint", tiny_bytes_model, "--tokenizer", "bytes", "--max_new_tokens", "20", "--seed", "3", "--num_samples", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2 and out.count("Carol has") == 2
    monkeypatch.setattr("sys.stdin", io.StringIO("Carol has"))
    assert main(args) == 0
    assert capsys.readouterr().out == out  # same seed, same samples


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
