"""Optional native kernels, compiled on first use with the local C++ compiler.

`load_cpu_gemv()` loads the AVX2 matrix-vector kernel (see gemv.cpp) behind the `palm::gemv` op
and says whether it can run: False where not x86, no AVX2, no compiler, or PALM_NO_KERNELS=1.
Callers then fall back to PyTorch's matmul.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
import warnings
from pathlib import Path

import torch

torch.library.define("palm::gemv", "(Tensor x, Tensor weight, Tensor? scale) -> Tensor")


@torch.library.register_fake("palm::gemv")
def _(x, weight, scale):
    return x.new_empty(x.shape[0], weight.shape[0])


def gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """(x @ weight.T) * scale for a few fp32 rows `x`; weight fp32, bf16 or int8. Needs `load_cpu_gemv()`."""
    return torch.ops.palm.gemv(x, weight, scale)


@functools.cache
def load_cpu_gemv() -> bool:
    if os.environ.get("PALM_NO_KERNELS") == "1":
        return False
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return False
    from torch.utils.cpp_extension import load

    try:
        if not _is_built():
            print("palm: building the CPU decode kernel (first use only)...", file=sys.stderr, flush=True)
        load(
            name="palm_gemv",
            sources=[str(Path(__file__).with_name("gemv.cpp"))],
            extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, headers missing: decoding still works, slower
        warnings.warn(f"palm: CPU decode kernel unavailable, using PyTorch matmul ({str(e).splitlines()[0]})")
        return False
    return True


def _is_built() -> bool:
    from torch.utils.cpp_extension import _get_build_directory

    return any(Path(_get_build_directory("palm_gemv", verbose=False)).glob("*.so"))
