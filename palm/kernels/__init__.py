"""Optional native kernels, compiled on first use with the local C++ compiler.

`load_cpu_kernels()` loads the AVX2 kernels for decoding behind two ops, `palm::gemv` (matrix-vector
products, gemv.cpp) and `palm::decode_attention` (one query per head over a multi-query cache,
attention.cpp), and says whether they can run: False where not x86, no AVX2, no compiler, or
PALM_NO_KERNELS=1. Callers then fall back to PyTorch's matmul and attention.
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


torch.library.define("palm::decode_attention", "(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor")


@torch.library.register_fake("palm::decode_attention")
def _(q, k, v, mask, scale):
    return q.new_empty(q.shape)


def gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """(x @ weight.T) * scale for a few fp32 rows `x`; weight fp32, bf16 or int8. Needs `load_cpu_kernels()`."""
    return torch.ops.palm.gemv(x, weight, scale)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Softmax attention of q (B, 1, H, D) over k, v (B, 1, N, D) where `mask` (B, 1, 1, N) is True,
    fp32 or bf16; `F.scaled_dot_product_attention`'s result for these shapes. Needs `load_cpu_kernels()`."""
    return torch.ops.palm.decode_attention(q, k, v, mask, scale)


@functools.cache
def load_cpu_kernels() -> bool:
    if os.environ.get("PALM_NO_KERNELS") == "1":
        return False
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return False
    from torch.utils.cpp_extension import load

    try:
        if not _is_built():
            print("palm: building the CPU decode kernels (first use only)...", file=sys.stderr, flush=True)
        load(
            name="palm_kernels",
            sources=[str(Path(__file__).with_name(source)) for source in ("gemv.cpp", "attention.cpp")],
            extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, headers missing: decoding still works, slower
        warnings.warn(f"palm: CPU decode kernels unavailable, using PyTorch matmul and attention ({str(e).splitlines()[0]})")
        return False
    return True


def _is_built() -> bool:
    from torch.utils.cpp_extension import _get_build_directory

    return any(Path(_get_build_directory("palm_kernels", verbose=False)).glob("*.so"))
