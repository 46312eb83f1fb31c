"""A run's checkpoints: written whole or not at all, found again for `--resume`.

    out_dir/checkpoints/step-N/    accelerate state (model, optimizer, grad scaler, RNG per rank),
                                   trainer_state.json, data_rank{r}.json, model/ (what the task saves)
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from palm.errors import PalmError

CHECKPOINT_PATTERN = re.compile(r"step-(\d+)")


def complete_checkpoints(out_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (a save interrupted midway is a `.tmp` directory)."""
    directory = out_dir / "checkpoints"
    found = [p for p in directory.iterdir() if CHECKPOINT_PATTERN.fullmatch(p.name)] if directory.is_dir() else []
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.fullmatch(p.name).group(1)))


def save_checkpoint(accelerator, model, save_model: Callable[[dict, Path], None], out_dir: Path, step: int,
                    trainer_state: dict, loader, keep_last: int) -> Path:
    """Write a checkpoint into a temporary directory and rename it into place once every process
    has written its part, so that a crash at any moment leaves the previous checkpoints intact.
    `save_model(full_state_dict, directory)` writes the loadable model inside it."""
    final = out_dir / "checkpoints" / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        full_state = accelerator.get_state_dict(model)  # gathered on the main process under FSDP
        (tmp / f"data_rank{accelerator.process_index}.json").write_text(json.dumps(loader.state_dict()))
        if accelerator.is_main_process:
            save_model(full_state, tmp / "model")
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    except OSError as e:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = complete_checkpoints(out_dir)
        kept = f"; {previous[-1]} is intact" if previous else ""
        raise PalmError(f"could not write checkpoint {final} ({e.strerror or e}){kept}") from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fsync_tree(tmp)
        if final.exists():  # resumed from an earlier checkpoint: this step's old one is superseded
            superseded = final.with_name(final.name + ".old")
            shutil.rmtree(superseded, ignore_errors=True)
            final.rename(superseded)
            tmp.rename(final)
            shutil.rmtree(superseded)
        else:
            tmp.rename(final)
        for old in complete_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def resolve_resume(resume: str | None, out_dir: Path) -> Path | None:
    """The checkpoint to continue from: None for a fresh run, the newest for `auto`, or a path."""
    if resume is None:
        if complete_checkpoints(out_dir):
            raise PalmError(f"{out_dir} already holds checkpoints; pass --resume auto to continue that run, or another --out_dir")
        return None
    if resume == "auto":
        found = complete_checkpoints(out_dir)
        return found[-1] if found else None  # nothing yet: start from scratch
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise PalmError(f"--resume {path}: not a complete palm training checkpoint")
    return path
