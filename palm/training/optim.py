"""Optimizers and learning-rate schedules for training: parameter groups, AdamW/StableAdamW/Lion."""

from __future__ import annotations

import math

import torch
from torch import nn

from palm.training.config import OPTIMIZERS, SCHEDULES
from palm.errors import PalmError


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups covering every trainable parameter exactly once: weight matrices of linear
    layers decay; norms, gains, biases and embeddings (the tied output projection included) do not."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))  # a tied parameter belongs to the module that owns it first
            matrix = param.ndim >= 2 and not isinstance(module, nn.Embedding)
            (decay if matrix else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class StableAdamW(torch.optim.Optimizer):
    """AdamW with per-tensor update clipping (Wortsman et al. 2023, "Stable and low-precision
    training for large-scale vision-language models"): a tensor's learning rate is divided by
    max(1, RMS(g^2 / v_hat)), which damps the updates that follow a sudden gradient spike."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad.float()
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                v_hat = exp_avg_sq / (1 - beta2 ** state["step"])
                rms = (grad.square() / v_hat.clamp_min(group["eps"] ** 2)).mean().sqrt().item()
                lr = group["lr"] / max(1.0, rms)
                update = (exp_avg / (1 - beta1 ** state["step"])) / (v_hat.sqrt() + group["eps"])
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update.to(param.dtype), alpha=-lr)
        return loss


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW (fused kernels where the device has them), StableAdamW or Lion, betas 0.9/0.95."""
    groups = parameter_groups(model, weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=fused or None)
    if name == "stable_adamw":
        return StableAdamW(groups, lr=lr, betas=(0.9, 0.95))
    if name == "lion":
        from lion_pytorch import Lion

        return Lion(groups, lr=lr, betas=(0.9, 0.95))
    raise PalmError(f"unknown optimizer {name!r} (choose from {', '.join(OPTIMIZERS)})")


def learning_rate(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int, schedule: str) -> float:
    """The learning rate for optimizer step `step` (0-based): linear warmup over `warmup_steps`,
    then constant, or a cosine or linear decay that reaches `min_lr` at `max_steps`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    if schedule == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return lr - (lr - min_lr) * progress
    raise PalmError(f"unknown schedule {schedule!r} (choose from {', '.join(SCHEDULES)})")
