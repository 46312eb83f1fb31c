import os
import subprocess
import sys
from pathlib import Path

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
