"""Layers for decoding: weight-only int8 quantization, and CPU kernels.

Decoding one token reads every weight once, so on a CPU its speed is set by memory bandwidth.
`use_cpu_kernels` routes small-batch CPU matmuls to palm's GEMV kernel (fp32, bf16 and int8
weights) and single-query attention to palm's attention kernel, and `quantize(model, "int8")`
stores weights as int8 with one fp32 scale per output channel: a quarter of the fp32 bytes per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from palm.errors import PalmError
from palm.kernels import decode_attention, gemv, load_cpu_kernels

# More rows than this and a real matrix multiply (prefill) beats streaming the weights per row.
KERNEL_MAX_ROWS = 8


class DecodeLinear(nn.Module):
    """A bias-free linear layer; with `scale`, `weight` holds int8 values and each output row is scaled."""

    def __init__(self, weight: Tensor, scale: Tensor | None = None):
        super().__init__()
        if scale is None:
            self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
            self.scale = None
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
            return F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return F.linear(x, self.weight)


def single_query_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    """`F.scaled_dot_product_attention` for one query position per head over a shared key/value head,
    through palm's CPU kernel where it applies (it skips the masked, still empty cache slots)."""
    applies = (q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16) and k.dtype == v.dtype == q.dtype
               and q.shape[-1] % 8 == 0
               and (attn_mask is None or attn_mask.dtype == torch.bool) and kernel_available()
               and not (torch.is_grad_enabled() and q.requires_grad))
    if not applies:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    return decode_attention(q, k, v, attn_mask, q.shape[-1] ** -0.5 if scale is None else scale)


@torch.compiler.assume_constant_result
def kernel_available() -> bool:
    return load_cpu_kernels()


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: weight ~= q * scale[:, None], |q| <= 127."""
    weight = weight.float()
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def _replace_linears(model: nn.Module, make) -> None:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (nn.Linear, DecodeLinear)):
                replacement = make(child)
                if replacement is not child:
                    setattr(parent, name, replacement)


@torch.no_grad()
def quantize(model: nn.Module, mode: str = "int8") -> nn.Module:
    """Quantize every linear layer's weights in place (embeddings and norms stay as they are)."""
    if mode != "int8":
        raise PalmError(f"unknown quantization {mode!r}; supported: int8")

    def to_int8(layer):
        if isinstance(layer, DecodeLinear) and layer.scale is not None:
            return layer
        return DecodeLinear(*quantize_int8(layer.weight))

    _replace_linears(model, to_int8)
    return model


def use_cpu_kernels(model: nn.Module) -> nn.Module:
    """Route the model's small-batch CPU matmuls to the GEMV kernel, sharing the same weights, and
    its single-query attention to the attention kernel.

    A no-op where the kernel is unavailable or the model is not on the CPU. Gradients and
    state-dict keys are unaffected: calls that need gradients still use `F.linear`.
    """
    first = next(model.parameters())
    if first.device.type != "cpu" or not kernel_available():
        return model
    _replace_linears(model, lambda layer: layer if isinstance(layer, DecodeLinear) else DecodeLinear(layer.weight))
    for module in model.modules():
        if hasattr(module, "single_query_attention"):
            module.single_query_attention = single_query_attention
    return model
