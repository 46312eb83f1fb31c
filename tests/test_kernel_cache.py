"""Native code is cached per content and toolchain: two installs of palm with the same sources
share one build (and never rebuild each other's), a changed source builds anew, and a build
says so in one line."""

import shutil
import subprocess
import sys
from pathlib import Path

import palm

LOAD_ENCODER = "from palm.kernels.bpe import _load_library; assert _load_library() is not None"


def install_copy(root: Path, name: str) -> Path:
    """A second install of palm: the package copied elsewhere, imported from there."""
    target = root / name
    shutil.copytree(Path(palm.__file__).parent, target / "palm", ignore=shutil.ignore_patterns("__pycache__"))
    return target


def load_from(install: Path, cache: Path) -> str:
    env = {"PATH": "/usr/bin:/bin", "PALM_CACHE": str(cache), "HOME": str(cache.parent)}
    done = subprocess.run([sys.executable, "-c", f"import palm; assert palm.__file__.startswith({str(install)!r}); {LOAD_ENCODER}"],
                          cwd=install, env={**env, "PYTHONPATH": str(install)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_two_installs_share_one_build_and_an_edit_builds_anew(tmp_path):
    cache = tmp_path / "cache"
    first, second = install_copy(tmp_path, "site-a"), install_copy(tmp_path, "site-b")
    assert load_from(first, cache).splitlines() == ["palm: building the native BPE encoder (first use only)..."]
    assert load_from(second, cache) == ""  # the other install's build is used as it is
    assert load_from(first, cache) == ""
    assert len(list(cache.glob("bpe-*.so"))) == 1

    edited = second / "palm" / "kernels" / "bpe.cpp"
    edited.write_text(edited.read_text() + "\n// a local change\n")
    assert "building" in load_from(second, cache)
    assert len(list(cache.glob("bpe-*.so"))) == 2
    assert load_from(first, cache) == ""  # and the first install still has its own
