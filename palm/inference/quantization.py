"""Weight-only int8 quantization: one int8 weight per entry and one fp32 scale per output channel,
a quarter of the fp32 bytes that decoding reads per token."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from palm.errors import PalmError


class Int8Linear(nn.Module):
    """A bias-free linear layer whose `weight` holds int8 values, output row i scaled by `scale[i]`.
    `parts` (name -> width) carries over the named output parts of a `FusedProjection`."""

    def __init__(self, weight: Tensor, scale: Tensor, parts: dict[str, int] | None = None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.parts = parts

    @classmethod
    def from_float(cls, layer: nn.Linear) -> Int8Linear:
        return cls(*quantize_int8(layer.weight), parts=getattr(layer, "parts", None))

    def forward(self, x: Tensor) -> Tensor:
        return _Int8Matmul.apply(x, self.weight, self.scale)


def int8_linear(x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
    """x @ (weight * scale[:, None]).T for int8 `weight`, computed in float32 (inductor rejects the
    bf16 form when it compiles the decode step) and returned in x's dtype."""
    return (F.linear(x.float(), weight.float()) * scale).to(x.dtype)


class _Int8Matmul(torch.autograd.Function):
    """x @ (weight * scale).T that keeps only the int8 weight for the backward pass: autograd
    would otherwise hold every layer's widened copy of its weight until then, which is the whole
    model in full precision during a training step (LoRA over an int8 base)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(weight, scale)
        return int8_linear(x, weight, scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, scale = ctx.saved_tensors
        return (grad * scale.to(grad.dtype)) @ weight.to(grad.dtype), None, None


@torch.no_grad()
def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: weight ~= q * scale[:, None], |q| <= 127."""
    weight = weight.float()
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


@torch.no_grad()
def quantize(model: nn.Module, mode: str = "int8") -> nn.Module:
    """Replace every bias-free linear layer of `model`, in place, by an `Int8Linear` (embeddings and
    norms stay as they are); returns `model`."""
    if mode != "int8":
        raise PalmError(f"unknown quantization {mode!r}; supported: int8")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None:
                setattr(parent, name, Int8Linear.from_float(child))
    return model
