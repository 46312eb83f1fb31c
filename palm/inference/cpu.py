"""Fast decoding on x86 CPUs: palm's GEMV and attention kernels behind a model's usual modules.

Decoding one token reads every weight once, so on a CPU its speed is set by memory bandwidth.
`swap_in_kernels` routes a model's small-batch CPU matmuls to palm's GEMV kernel (fp32, bf16 and
int8 weights) and its single-query attention to palm's attention kernel. Generation applies it to
a view of the caller's model (`palm.inference.decoding.decoding_view`), never to the model itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from palm.inference.quantization import Int8Linear, int8_linear
from palm.kernels.decode import decode_attention, gemv, load_cpu_kernels

# More rows than this and a real matrix multiply (prefill) beats streaming the weights per row.
KERNEL_MAX_ROWS = 8


class KernelLinear(nn.Module):
    """A bias-free linear layer over a shared weight (and, for int8, its per-row scale) that sends
    inference calls of up to KERNEL_MAX_ROWS rows on the CPU to the GEMV kernel."""

    def __init__(self, weight: Tensor, scale: Tensor | None = None):
        super().__init__()
        if isinstance(weight, nn.Parameter):
            self.weight = weight
        else:
            self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // x.shape[-1]
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if x.device.type == "cpu" and rows <= KERNEL_MAX_ROWS and not needs_grad and kernel_available():
            y = gemv(x.reshape(rows, -1).float().contiguous(), self.weight, self.scale)
            return y.to(x.dtype).view(*x.shape[:-1], -1)
        if self.scale is not None:
            return int8_linear(x, self.weight, self.scale)
        return F.linear(x, self.weight)


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
    weights and its single-query attention by the kernel's, in place; returns `model`. A no-op where
    the kernels cannot run (not on the CPU, not x86 with AVX2, no compiler, PALM_NO_KERNELS=1)."""
    if next(model.parameters()).device.type != "cpu" or not kernel_available():
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None:
                setattr(parent, name, KernelLinear(child.weight))
            elif isinstance(child, Int8Linear):
                setattr(parent, name, KernelLinear(child.weight, child.scale))
    for module in model.modules():
        if hasattr(module, "single_query_attention"):
            module.single_query_attention = single_query_attention
    return model
