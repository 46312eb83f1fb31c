"""palm's native code and its one loader.

Everything here is compiled on first use with the local C++ compiler and cached under
`$PALM_CACHE` (default `~/.cache/palm`), keyed by the sources' content, the compiler flags, the
compiler's version and, for PyTorch ops, the torch and Python versions: several installs or
versions of palm share a build when they agree and never rebuild each other's when they do not.
A build prints one line. `PALM_NO_KERNELS=1` turns every kernel off; callers then use their
pure-Python or PyTorch path.

- `palm.kernels.decode`: PyTorch ops for decoding on x86 CPUs (gemv.cpp, attention.cpp).
- `palm.kernels.bpe`: the byte-level BPE encoder for datasets (bpe.cpp, plain C ABI, no torch).

This module imports no torch, so the dataset builder can use the encoder without it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path

from palm.files import write_atomically

SOURCE_DIR = Path(__file__).parent


def kernels_disabled() -> bool:
    return os.environ.get("PALM_NO_KERNELS") == "1"


def cache_dir() -> Path:
    """palm's cache directory (`$PALM_CACHE`, else `$XDG_CACHE_HOME/palm` or `~/.cache/palm`), created."""
    root = os.environ.get("PALM_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "palm")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def compiler() -> str:
    """The C++ compiler, as PyTorch's extension builder picks it."""
    return os.environ.get("CXX", "c++")


@functools.cache
def _compiler_version(command: str) -> str:
    try:
        done = subprocess.run([command, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    return done.stdout.splitlines()[0] if done.stdout else "unknown"


def build_key(sources: list[Path], flags: list[str], *extra: str) -> str:
    """A short hash of everything a build depends on: sources (and the headers beside them), flags,
    the compiler's version, and `extra` (e.g. the torch version)."""
    digest = hashlib.sha256()
    for path in [*sources, *sorted(SOURCE_DIR.glob("*.h"))]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for part in [*flags, compiler(), _compiler_version(compiler()), platform.machine(), *extra]:
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


def announce_build(what: str) -> None:
    print(f"palm: building {what} (first use only)...", file=sys.stderr, flush=True)


def load_library(source_name: str, flags: list[str], what: str, fallback: str) -> ctypes.CDLL | None:
    """A plain-C-ABI library built from `source_name` (in this directory), or None when kernels are
    turned off or it cannot be built or loaded (no compiler, say): then one warning says `what` is
    unavailable and the `fallback` taken instead."""
    if kernels_disabled():
        return None
    source = SOURCE_DIR / source_name
    try:
        path = cache_dir() / f"{source.stem}-{build_key([source], flags)}.so"
        if not path.exists():
            announce_build(f"the {what}")
            write_atomically(path, lambda tmp: subprocess.run(
                [compiler(), *flags, "-shared", "-fPIC", str(source), "-o", tmp],
                check=True, capture_output=True, text=True))
        return ctypes.CDLL(str(path))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = e.stderr.strip().splitlines()[0] if isinstance(e, subprocess.CalledProcessError) and e.stderr else str(e)
        warnings.warn(f"palm: {what} unavailable, {fallback} ({detail})")
        return None
