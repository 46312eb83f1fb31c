"""Optional native kernels, compiled on first use with the local C++ compiler.

`cpu_gemv()` returns the AVX2 matrix-vector kernel (see gemv.cpp), or None where it cannot run:
not x86, no AVX2, no compiler, or PALM_NO_KERNELS=1. Callers fall back to PyTorch's matmul.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch


@functools.cache
def cpu_gemv() -> Callable | None:
    if os.environ.get("PALM_NO_KERNELS") == "1":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    from torch.utils.cpp_extension import load

    try:
        if not _is_built():
            print("palm: building the CPU decode kernel (first use only)...", file=sys.stderr, flush=True)
        module = load(
            name="palm_gemv",
            sources=[str(Path(__file__).with_name("gemv.cpp"))],
            extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, headers missing: decoding still works, slower
        warnings.warn(f"palm: CPU decode kernel unavailable, using PyTorch matmul ({str(e).splitlines()[0]})")
        return None
    return module.gemv


@torch.library.custom_op("palm::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """(x @ weight.T) * scale for a few fp32 rows `x`; weight fp32, bf16 or int8. Needs `cpu_gemv()`."""
    return cpu_gemv()(x, weight, scale)


@gemv.register_fake
def _(x, weight, scale):
    return x.new_empty(x.shape[0], weight.shape[0])


def _is_built() -> bool:
    from torch.utils.cpp_extension import _get_build_directory

    return any(Path(_get_build_directory("palm_gemv", verbose=False)).glob("*.so"))
