"""PyTorch ops for decoding on x86 CPUs with AVX2, built by palm's loader (see `palm.kernels`).

`load_cpu_kernels()` loads them behind two ops, `palm::gemv` (matrix-vector products, gemv.cpp)
and `palm::decode_attention` (one query per head over a multi-query cache, attention.cpp), and
says whether they can run: False where not x86, no AVX2, no compiler, or PALM_NO_KERNELS=1.
Callers then fall back to PyTorch's matmul and attention.
"""

from __future__ import annotations

import functools
import platform
import sys
import warnings

import torch

from palm.kernels import SOURCE_DIR, announce_build, build_key, cache_dir, kernels_disabled

SOURCES = ("gemv.cpp", "attention.cpp")
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]

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
    if kernels_disabled():
        return False
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return False
    from torch.utils.cpp_extension import load

    sources = [SOURCE_DIR / name for name in SOURCES]
    try:
        name = f"palm_decode_{build_key(sources, FLAGS, torch.__version__, sys.version)}"
        directory = cache_dir() / name
        if not any(directory.glob("*.so")):
            announce_build("the CPU decode kernels")
        directory.mkdir(exist_ok=True)
        load(name=name, sources=[str(s) for s in sources], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
             build_directory=str(directory), is_python_module=False, verbose=False)
    except Exception as e:  # no compiler, no ninja, headers missing: decoding still works, slower
        warnings.warn(f"palm: CPU decode kernels unavailable, using PyTorch matmul and attention ({str(e).splitlines()[0]})")
        return False
    return True
