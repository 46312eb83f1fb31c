"""Choosing the next token from logits: greedy, temperature, top-k / filter_thres, top-p."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from palm.errors import PalmError


def sample(
    logits: Tensor,
    *,
    temperature: float = 0.8,
    filter_thres: float | None = 0.9,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw one token id per row of `logits` (b, vocab).

    `temperature` 0 is greedy. `filter_thres` keeps the top ceil((1 - filter_thres) * vocab) logits
    (the seed's meaning); `top_k`, when given, sets that count instead. `top_p` then keeps the
    smallest set of tokens whose probability reaches p (nucleus sampling).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, temperature=temperature, filter_thres=filter_thres, top_k=top_k, top_p=top_p)
    return draw(probs, greedy=False, generator=generator)


def sampling_probs(
    logits: Tensor, *, temperature: float = 0.8, filter_thres: float | None = 0.9, top_k: int | None = None,
    top_p: float | None = None,
) -> Tensor:
    """The float32 distribution (..., vocab) that `sample` draws from (temperature, then top_k /
    filter_thres, then top_p); temperature 0 gives the one-hot argmax."""
    if temperature == 0:
        return torch.zeros_like(logits, dtype=torch.float32).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits.float() / temperature
    k = top_k if top_k is not None else (kept_by_filter_thres(filter_thres, logits.shape[-1]) if filter_thres else None)
    if k is not None and k < logits.shape[-1]:
        kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits.softmax(dim=-1)


def draw(probs: Tensor, greedy: bool, generator: torch.Generator | None) -> Tensor:
    """One token per row of `probs` (..., vocab): its argmax when greedy, else a draw from it."""
    if greedy:
        return probs.argmax(dim=-1)
    # argmax(p / E) with E ~ Exponential(1) draws from p (a Gumbel-max trick) without a host sync.
    return (probs / torch.empty_like(probs).exponential_(1.0, generator=generator)).argmax(dim=-1)


def kept_by_filter_thres(filter_thres: float, vocab: int) -> int:
    """ceil((1 - filter_thres) * vocab), at least 1, without float noise: 1 - 0.95 is 0.05000000000000004,
    which would keep 6 of 100 tokens instead of 5."""
    return max(1, math.ceil(round((1 - filter_thres) * vocab, 9)))


def check_sampling_options(temperature: float, filter_thres: float | None, top_k: int | None, top_p: float | None) -> None:
    """One PalmError naming the first sampling option out of range (NaN included)."""
    if not 0 <= temperature < math.inf:
        raise PalmError(f"temperature must be >= 0 and finite, got {temperature}")
    if filter_thres is not None and not 0 <= filter_thres < 1:
        raise PalmError(f"filter_thres must be in [0, 1), got {filter_thres}")
    if top_k is not None and top_k < 1:
        raise PalmError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise PalmError(f"top_p must be in (0, 1], got {top_p}")
