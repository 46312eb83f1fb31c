"""Fast decoding on x86 CPUs: palm's GEMV and attention kernels behind a model's usual modules.

Decoding one token reads every weight once, so on a CPU its speed is set by memory bandwidth.
`swap_in_kernels` routes a model's small-batch CPU matmuls to palm's GEMV kernel (fp32, bf16 and
int8 weights) and its single-query attention to palm's attention kernel. fp32 products of up to
TILED_MAX_ROWS rows (short prefills, serving batches) go to the same kernel's tiled path where a
one-off timing finds it faster (`tiled_kernel_faster`). Larger products (long prefills) go to
oneDNN's matmul where it beats PyTorch's default one on this CPU, as measured once per process
(`onednn_matmul_faster`): on AVX2 CPUs that are not Intel's, MKL's
small-batch products run at about half of oneDNN's speed; on CPUs with native bf16 (AVX512-BF16,
AMX) oneDNN is the path to those units, and bf16 decoding products go there too where a one-off
timing says they beat the kernel (`gemv_kernel_faster`). Generation applies this to a view of the
caller's model (`palm.inference.decoding.decoding_view`), never to the model itself.
"""

from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from palm.dtypes import cpu_has_native_bf16
from palm.inference.quantization import Int8Linear, int8_linear
from palm.kernels.decode import decode_attention, gemv, load_cpu_kernels

# More rows than this and a real matrix multiply (prefill) beats streaming the weights per row.
KERNEL_MAX_ROWS = 8
# fp32 products of up to this many rows can take the kernel's tiled path instead (`tiled_kernel_faster`,
# timed at this size); its lead over oneDNN shrinks beyond it (1.03x at 128 rows on Zen 3), as x
# outgrows the caches the tiling relies on.
TILED_MAX_ROWS = 64


class KernelLinear(nn.Module):
    """A bias-free linear layer over a shared weight (and, for int8, its per-row scale) that sends
    inference calls of up to KERNEL_MAX_ROWS rows on the CPU to the GEMV kernel if `gemv` (see
    `gemv_kernel_faster`), fp32 ones of up to TILED_MAX_ROWS rows to it too if `tiled` (see
    `tiled_kernel_faster`), and larger ones to oneDNN's matmul if `onednn` (see `onednn_matmul_faster`)."""

    def __init__(self, weight: Tensor, scale: Tensor | None = None, onednn: bool = False, gemv: bool = True,
                 tiled: bool = False):
        super().__init__()
        if isinstance(weight, nn.Parameter):
            self.weight = weight
        else:
            self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.onednn = onednn
        self.gemv = gemv
        self.kernel_max_rows = TILED_MAX_ROWS if tiled and gemv and weight.dtype == torch.float32 else KERNEL_MAX_ROWS

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // x.shape[-1]
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if x.device.type == "cpu" and not needs_grad:
            if rows <= self.kernel_max_rows:
                if self.gemv and kernel_available():  # else PyTorch's matmul, the path `gemv_kernel_faster` timed
                    y = gemv(x.reshape(rows, -1).float().contiguous(), self.weight, self.scale)
                    return y.to(x.dtype).view(*x.shape[:-1], -1)
            # Inductor cannot lower the op over a weight it has not packed itself: compiled code keeps F.linear.
            elif self.onednn and x.dtype == self.weight.dtype and not torch.compiler.is_compiling():
                return onednn_linear(x.reshape(rows, -1), self.weight).view(*x.shape[:-1], -1)
        if self.scale is not None:
            return int8_linear(x, self.weight, self.scale)
        return F.linear(x, self.weight)


def onednn_linear(x: Tensor, weight: Tensor) -> Tensor:
    """x @ weight.T through oneDNN's inner product (PyTorch's CPU op for it; no autograd)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


@functools.cache
def onednn_matmul_faster(dtype: torch.dtype) -> bool:
    """Whether oneDNN's matmul beats `F.linear` by 10% or more on this CPU for prefill-sized
    products in `dtype` (32 rows through a 1024 x 4096 weight), timed once per process; False
    where oneDNN cannot run them (no oneDNN in this build, bf16 without native support)."""
    if dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return False
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1024, generator=generator).to(dtype)
    weight = torch.randn(4096, 1024, generator=generator).to(dtype)
    with torch.no_grad():
        try:
            torch.testing.assert_close(onednn_linear(x, weight).float(), F.linear(x, weight).float(),
                                       rtol=0.02 if dtype == torch.bfloat16 else 1e-4, atol=0.5)
        except Exception:  # op missing from this build, or no oneDNN kernel for dtype on this CPU
            return False
        return _best_time(lambda: onednn_linear(x, weight)) < 0.9 * _best_time(lambda: F.linear(x, weight))


@functools.cache
def gemv_kernel_faster(dtype: torch.dtype) -> bool:
    """Whether palm's GEMV kernel takes the decoding products (up to KERNEL_MAX_ROWS rows) of
    weights in `dtype`: always for fp32 and int8, and for bf16 on CPUs without native bf16 units;
    on a CPU with them (AVX512-BF16, AMX), only if a one-off timing of one row through 192 MB of
    bf16 weights (read from memory, as decoding reads them) finds it no slower than PyTorch's
    matmul, which runs on those units."""
    if not kernel_available():
        return False
    if dtype != torch.bfloat16 or not cpu_has_native_bf16():
        return True
    x = torch.randn(1, 4096, generator=torch.Generator().manual_seed(0)).bfloat16()
    weights = [torch.full((8192, 4096), 0.01, dtype=torch.bfloat16) for _ in range(3)]  # 64 MB each
    with torch.no_grad():
        kernel = _best_time(lambda: [gemv(x.float(), w, None) for w in weights], repeats=3)
        pytorch = _best_time(lambda: [F.linear(x, w) for w in weights], repeats=3)
    return kernel <= pytorch


@functools.cache
def tiled_kernel_faster() -> bool:
    """Whether fp32 products of KERNEL_MAX_ROWS + 1 to TILED_MAX_ROWS rows take the kernel's tiled
    path: where a one-off timing of TILED_MAX_ROWS rows through a 1024 x 4096 weight finds it at
    least 5% faster than the path larger products take (oneDNN's matmul or PyTorch's). On Zen 3 it
    ran the 150m model's products of 16-64 rows 1.12-1.33x as fast as oneDNN (BENCHMARKS.md);
    oneDNN's wider vectors may win on AVX-512 CPUs. (fp32 products of 2 to KERNEL_MAX_ROWS rows take
    the tiled path whenever the kernel runs them: there it streams the weights as the row kernel did.)"""
    if not kernel_available():
        return False
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(TILED_MAX_ROWS, 1024, generator=generator)
    weight = torch.randn(4096, 1024, generator=generator)
    larger = onednn_linear if onednn_matmul_faster(torch.float32) else F.linear
    with torch.no_grad():
        return _best_time(lambda: gemv(x, weight, None)) < 0.95 * _best_time(lambda: larger(x, weight))


def cpu_paths() -> dict[str, str]:
    """The code path this machine takes for each kind of CPU work (`palm info --system` prints it)."""
    kernels = kernel_available()
    native = cpu_has_native_bf16()

    def larger(dtype: torch.dtype) -> str:
        return ("oneDNN (measured faster than PyTorch's default)" if onednn_matmul_faster(dtype)
                else "PyTorch's default matmul (oneDNN not faster here, or cannot run it)")

    if not kernels:
        bf16_decoding = "PyTorch's matmul"
    elif gemv_kernel_faster(torch.bfloat16):
        bf16_decoding = "palm's GEMV kernel"
    else:
        bf16_decoding = "PyTorch's matmul on the native bf16 units (measured faster than palm's GEMV kernel)"
    return {
        "decoding products, up to 8 rows (fp32, int8)": "palm's GEMV kernel" if kernels else "PyTorch's matmul",
        "decoding products, up to 8 rows (bf16)": bf16_decoding,
        "single-query attention": "palm's attention kernel" if kernels else "PyTorch's SDPA",
        f"inference products of {KERNEL_MAX_ROWS + 1}-{TILED_MAX_ROWS} rows, fp32": (
            "palm's GEMV kernel, tiled (measured faster than the larger products' path)" if tiled_kernel_faster()
            else larger(torch.float32)),
        "larger inference products, fp32": larger(torch.float32),
        "larger inference products, bf16": larger(torch.bfloat16),
        "bf16 training (autocast)": "PyTorch's oneDNN on native bf16 units" if native
        else "PyTorch's bf16 ops without native units (slow: palm train warns; prefer fp32)",
    }


def _best_time(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def single_query_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    """`F.scaled_dot_product_attention` for one query position per head over a shared key/value head,
    through palm's CPU kernel where it applies (it skips the masked, still empty cache slots)."""
    if not attention_kernel_applies(q, k, v, attn_mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    return decode_attention(q, k, v, attn_mask, q.shape[-1] ** -0.5 if scale is None else scale)


def attention_kernel_applies(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None) -> bool:
    """Whether `single_query_attention` runs these tensors through the kernel (else PyTorch's SDPA)."""
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16) and k.dtype == v.dtype == q.dtype
            and q.shape[-1] % 8 == 0
            and (attn_mask is None or attn_mask.dtype == torch.bool) and kernel_available()
            and not (torch.is_grad_enabled() and q.requires_grad))


@torch.compiler.assume_constant_result
def kernel_available() -> bool:
    return load_cpu_kernels()


def swap_in_kernels(model: nn.Module) -> nn.Module:
    """Replace `model`'s bias-free linear layers (fp32, bf16, int8) by `KernelLinear`s over the same
    weights and its single-query attention by the kernel's, in place; returns `model`. A no-op off
    the CPU, and where neither the kernels (x86 with AVX2, a compiler, no PALM_NO_KERNELS=1) nor
    oneDNN's matmul would be used."""
    if next(model.parameters()).device.type != "cpu":
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None:
                onednn, use_gemv = onednn_matmul_faster(child.weight.dtype), gemv_kernel_faster(child.weight.dtype)
                tiled = child.weight.dtype == torch.float32 and tiled_kernel_faster()
                if onednn or use_gemv:
                    setattr(parent, name, KernelLinear(child.weight, onednn=onednn, gemv=use_gemv, tiled=tiled))
            elif isinstance(child, Int8Linear) and kernel_available():
                setattr(parent, name, KernelLinear(child.weight, child.scale))
    if not kernel_available():
        return model
    for module in model.modules():
        if hasattr(module, "single_query_attention"):
            module.single_query_attention = single_query_attention
    return model
