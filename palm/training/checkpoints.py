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


def resolve_resume(resume: str | None, out_dir: Path, warn: Callable[[str], None] = print) -> Path | None:
    """The checkpoint to continue from: None for a fresh run, the newest intact one for `auto`
    (a damaged one is skipped with a warning), or a path."""
    if resume is None:
        return None
    if resume == "auto":
        for checkpoint in reversed(complete_checkpoints(out_dir)):
            damage = find_damage(checkpoint)
            if damage is None:
                return checkpoint
            warn(f"warning: skipping the damaged checkpoint {checkpoint} ({damage})")
        return None  # nothing (intact) yet: start from scratch
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise PalmError(f"--resume {path}: not a complete palm training checkpoint")
    damage = find_damage(path)
    if damage is not None:
        raise PalmError(f"--resume {path}: the checkpoint is damaged ({damage})")
    return path


def find_damage(checkpoint: Path) -> str | None:
    """What makes `checkpoint` unreadable (a truncated or garbled file), or None if it reads whole."""
    import zipfile

    from safetensors import safe_open

    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        try:
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        f.get_slice(key)
            elif path.suffix in (".bin", ".pt") and zipfile.is_zipfile(path):
                with zipfile.ZipFile(path) as archive:
                    if archive.testzip() is not None:
                        raise ValueError("a member fails its checksum")
            elif path.suffix in (".bin", ".pt"):
                raise ValueError("not a complete torch.save archive")
        except Exception as e:  # every reader has its own error types; any of them means damage
            return f"{path.relative_to(checkpoint)}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return None
