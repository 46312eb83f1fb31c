"""Faults a cluster delivers during training (signals, a failed write, a damaged checkpoint, a
second process), an unforeseen exception, and the outputs palm must never lose."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import CORPUS, train_bpe
from palm import PaLM, PaLMConfig, PalmError, save_pretrained
from palm.cli import main
from palm.training.checkpoints import complete_checkpoints, find_damage
from palm.training.config import TrainConfig
from palm.training.pretrain import tokenizer_for, train

SMALL_BYTES = PaLMConfig(num_tokens=257, dim=64, depth=2, heads=4, dim_head=16, max_seq_len=128)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    torch.manual_seed(0)
    save_pretrained(PaLM(SMALL_BYTES), root / "init")
    (root / "corpus.txt").write_text(CORPUS * 4)
    return root


def options(setup, out_dir, **overrides) -> dict:
    values = dict(init_from=str(setup / "init"), data=str(setup / "corpus.txt"), tokenizer="bytes", out_dir=str(out_dir),
                  max_steps=6, batch_size=2, seq_len=32, lr=3e-3, min_lr=3e-4, warmup_steps=1, save_every=2,
                  keep_last=5, eval_every=100, log_every=100, samples=0, peak_tflops=1.0)
    return values | overrides


def losses(out_dir: Path) -> dict[int, float]:
    rows = map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def uninterrupted(setup):
    out = setup / "uninterrupted"
    train(TrainConfig(**options(setup, out)), progress=False)
    return losses(out)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_the_step_saves_and_says_how_to_continue(setup, sig, tmp_path):
    out = tmp_path / "run"
    flags = [f"--{k}={v}" for k, v in options(setup, out, max_steps=100_000, save_every=100_000).items()]
    process = subprocess.Popen([sys.executable, "-m", "palm", "train", *flags, "--quiet"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not ((out / "metrics.jsonl").exists() and len(losses(out)) >= 2):
        time.sleep(0.05)
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + sig, err
    stopped = max(losses(out))
    assert err.strip().splitlines()[-1] == (
        f"palm train: stopped by {signal.Signals(sig).name} at step {stopped}/100000; saved "
        f"{out / 'checkpoints' / f'step-{stopped:06d}'}. To continue, run the same command with --out_dir {out} --resume auto")
    assert "Traceback" not in err
    assert [p.name for p in complete_checkpoints(out)] == [f"step-{stopped:06d}"]
    assert json.loads((complete_checkpoints(out)[-1] / "trainer_state.json").read_text())["step"] == stopped


def test_stop_then_resume_equals_the_uninterrupted_run(setup, uninterrupted, tmp_path, monkeypatch):
    """SIGTERM arriving as step 3 of 6 is logged: the loop finishes the step under way (4),
    checkpoints it, stops; --resume auto continues to the same losses as a run never stopped."""
    from palm.training import loop

    out = tmp_path / "run"
    original = loop.MetricsLog.write

    def write_then_signal(self, record):
        original(self, record)
        if record.get("step") == 3 and "loss" in record:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(loop.MetricsLog, "write", write_then_signal)
    flags = [f"--{k}={v}" for k, v in options(setup, out, save_every=5).items()]
    assert main(["train", *flags, "--quiet"]) == 128 + signal.SIGTERM
    monkeypatch.setattr(loop.MetricsLog, "write", original)
    assert [p.name for p in complete_checkpoints(out)] == ["step-000004"] and max(losses(out)) == 4
    train(TrainConfig(**options(setup, out, save_every=5, resume="auto")), progress=False)
    resumed = losses(out)
    for step in (5, 6):
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-5)


def test_a_failed_write_keeps_the_earlier_checkpoints(setup, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_save = torch.save
    calls = []

    def full_disk_on_the_second_checkpoint(obj, f, *args, **kwargs):
        calls.append(f)
        if any("step-000004" in str(c) for c in calls):
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_on_the_second_checkpoint)
    assert main(["train", *[f"--{k}={v}" for k, v in options(setup, out).items()], "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "step-000002 is intact" in err[0]
    assert [p.name for p in complete_checkpoints(out)] == ["step-000002"]
    assert find_damage(out / "checkpoints" / "step-000002") is None
    assert not list((out / "checkpoints").glob("*.tmp"))


def test_resume_skips_a_damaged_newest_checkpoint(setup, uninterrupted, tmp_path, capsys):
    out = tmp_path / "run"
    train(TrainConfig(**options(setup, out, max_steps=6, save_every=2)), progress=False)
    newest = complete_checkpoints(out)[-1]
    assert newest.name == "step-000004"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a save cut short by a crash
    (out / "model").rename(tmp_path / "first-model")
    capsys.readouterr()
    train(TrainConfig(**options(setup, out, resume="auto")), progress=False)
    printed = capsys.readouterr().out
    assert f"warning: skipping the damaged checkpoint {newest}" in printed
    assert "resumed from" in printed and "step-000002 at step 2" in printed
    resumed = losses(out)
    for step in (3, 4, 5, 6):
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-5)


def test_two_processes_cannot_write_one_run(setup, tmp_path):
    from palm.training.loop import _claim

    out = tmp_path / "run"
    held = _claim(out, replace=False)  # what the first process holds while it trains
    with pytest.raises(PalmError, match=f"is in use by palm process {os.getpid()}"):
        train(TrainConfig(**options(setup, out)), progress=False)
    assert not (out / "metrics.jsonl").exists()
    held.close()  # the first process ends: the directory is free
    train(TrainConfig(**options(setup, out, max_steps=1)), progress=False)


def test_overwrite_replaces_a_finished_run(setup, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(**options(setup, out, max_steps=4)), progress=False)
    with pytest.raises(PalmError, match="already holds a run"):
        train(TrainConfig(**options(setup, out, max_steps=2)), progress=False)
    assert max(losses(out)) == 4
    train(TrainConfig(**options(setup, out, max_steps=2, overwrite=True)), progress=False)
    assert max(losses(out)) == 2 and [p.name for p in complete_checkpoints(out)] == []


def test_an_unforeseen_failure_is_one_line_unless_debugging(setup, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise ValueError("something palm did not expect\nsecond line")

    monkeypatch.setattr("palm.checkpoint.load", broken)
    assert main(["info", str(setup / "init")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["palm info: error: ValueError: something palm did not expect second line (PALM_DEBUG=1 shows the traceback)"]
    monkeypatch.setenv("PALM_DEBUG", "1")
    with pytest.raises(ValueError):
        main(["info", str(setup / "init")])


def test_a_reference_checkpoint_round_trip_keeps_the_config(tmp_path, capsys):
    config = PaLMConfig(num_tokens=512, dim=256, depth=4, heads=4, dim_head=64, max_seq_len=1024)  # the tiny preset
    save_pretrained(PaLM(config), tmp_path / "model")
    assert main(["convert", str(tmp_path / "model"), str(tmp_path / "x.pt")]) == 0
    assert main(["convert", str(tmp_path / "x.pt"), str(tmp_path / "back")]) == 0
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == config.to_dict()
    capsys.readouterr()
    assert main(["info", str(tmp_path / "x.pt")]) == 0
    assert "preset: tiny" in capsys.readouterr().out


def test_the_tokenizer_defaults_to_the_datasets(setup, tmp_path):
    (tmp_path / "bpe").mkdir()
    tokenizer = train_bpe([CORPUS], tmp_path / "bpe")
    assert main(["build-dataset", "--dataset_name", str(setup / "corpus.txt"), "--output", str(tmp_path / "ds"),
                 "--tokenizer", str(tokenizer), "--seq_len", "32", "--quiet"]) == 0
    assert tokenizer_for(TrainConfig(data=str(tmp_path / "ds"))) == str(tokenizer)
    assert tokenizer_for(TrainConfig(data=str(tmp_path / "ds"), tokenizer=str(tokenizer))) == str(tokenizer)
    assert tokenizer_for(TrainConfig()) == "bytes"
    with pytest.raises(PalmError, match="was tokenized with"):
        tokenizer_for(TrainConfig(data=str(tmp_path / "ds"), tokenizer="bytes"))
