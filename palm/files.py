"""Writing files so that a crash or a full disk never leaves a half-written one behind."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from palm.errors import PalmError


def write_atomically(path: Path, write: Callable[[str], object]) -> None:
    """Call `write(tmp)` on a temporary path beside `path`, then rename it into place, with the
    permissions a newly created file gets (a temporary file starts private)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        make_shareable(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_shareable(path: Path) -> None:
    """Give `path` the permissions the umask gives new files (some writers create them 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def inside(path: str | os.PathLike, directory: str | os.PathLike) -> bool:
    """Whether `path` is `directory` or lies within it (symlinks resolved)."""
    path, directory = Path(path).resolve(), Path(directory).resolve()
    return path == directory or directory in path.parents


def check_output_directory(output: Path, *, flag: str, marker: str | tuple[str, ...], what: str, overwrite: bool,
                           inputs=(), scaffolding: tuple[str, ...] = ()) -> bool:
    """Make sure writing `output` loses nothing of the user's; returns whether it holds something
    of palm's to replace. It must not hold one of the command's `inputs`; when it already holds
    files, `overwrite` is needed, and it replaces only a directory that palm wrote itself (it holds
    a `marker`). Entries named in `scaffolding` (left by a start that failed) need no --overwrite.
    Raises PalmError otherwise."""
    for source in inputs:
        if source is not None and Path(source).exists() and inside(source, output):
            raise PalmError(f"{flag} {output} holds the input {source}; write somewhere else")
    if output.exists() and not output.is_dir():
        raise PalmError(f"{flag} {output} is a file; give a directory")
    if not output.is_dir() or not any(output.iterdir()):
        return False
    markers = (marker,) if isinstance(marker, str) else marker
    if not any((output / name).exists() for name in markers):
        raise PalmError(f"{flag} {output} already holds files that palm did not write; choose an empty or new directory")
    if not overwrite and not all(entry.name in scaffolding for entry in output.iterdir()):
        raise PalmError(f"{output} already holds {what}; pass --overwrite to replace it")
    return True
