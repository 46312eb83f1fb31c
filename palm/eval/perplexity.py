"""Perplexity and bits per byte of a model on documents, each scored with a sliding window.

A document of n tokens is read as [EOS] + tokens (the model saw every document follow an
end-of-text token in training), so all n of its tokens are predicted, the first from EOS alone.
The model reads windows of `seq_len` tokens (its context) that advance by `stride`; each
scores only the targets that no earlier window scored, so every token is scored exactly once,
with at least `seq_len - stride` tokens of context once the first window is behind. The last window is moved back to end at the document's
end, so it is full length whenever the document is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from palm.errors import PalmError


@dataclass(frozen=True)
class Document:
    """Token ids of one text (no EOS added) and the number of UTF-8 bytes they stand for."""

    ids: list[int]
    num_bytes: int


@dataclass
class PerplexityResult:
    loss: float  # mean negative log-likelihood per token, in nats
    perplexity: float
    bits_per_byte: float  # total nats / (bytes * ln 2): comparable across tokenizers
    tokens: int
    bytes: int
    documents: int
    seq_len: int
    stride: int

    def to_dict(self) -> dict:
        return asdict(self)


def check_window(seq_len: int, stride: int) -> None:
    """One-line errors for a window that cannot score every token."""
    if seq_len < 2:
        raise PalmError(f"--seq_len must be at least 2, got {seq_len}")
    if not 1 <= stride <= seq_len:
        raise PalmError(f"--stride must be between 1 and --seq_len ({seq_len}), got {stride}")


def sliding_windows(n: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a sequence of n tokens (EOS prefix included) as (begin, end, first): the model
    reads the (at most `seq_len`) tokens [begin, end - 1) and the targets [first, end) are scored
    (begin < first, so every scored target is predicted within the window)."""
    check_window(seq_len, stride)
    windows = []
    first = 1  # the prefix token is never a target
    end = min(seq_len + 1, n)
    while True:
        windows.append((max(0, end - seq_len - 1), end, first))
        if end >= n:
            return windows
        first = end
        end = min(end + stride, n)


def target_logprobs(model: nn.Module, sequences: list[Tensor]) -> list[Tensor]:
    """Log-probability of each token after the first, (len - 1,) float32 per sequence, from one
    forward pass over the right-padded batch (causal attention: padding never reaches real tokens)."""
    width = max(len(s) for s in sequences)
    device = model.token_emb.weight.device
    batch = torch.zeros(len(sequences), width, dtype=torch.long)
    for i, s in enumerate(sequences):
        batch[i, : len(s)] = s
    batch = batch.to(device)
    logits = model(batch[:, :-1])
    out = []
    for i, s in enumerate(sequences):
        n = len(s) - 1
        logprobs = F.log_softmax(logits[i, :n].float(), dim=-1)
        out.append(logprobs.gather(-1, batch[i, 1 : n + 1, None]).squeeze(-1).cpu())
    return out


@torch.inference_mode()
def evaluate_perplexity(
    model: nn.Module,
    documents: Iterable[Document],
    *,
    eos_id: int,
    seq_len: int,
    stride: int,
    batch_size: int = 8,
    on_tokens: Callable[[int], None] | None = None,
) -> PerplexityResult:
    """Loss, perplexity and bits per byte over `documents`, windows batched `batch_size` at a time.

    `on_tokens(n)` is called as n more tokens are scored (for a progress bar)."""
    check_window(seq_len, stride)
    if batch_size < 1:
        raise PalmError(f"--batch_size must be at least 1, got {batch_size}")
    nats = 0.0
    tokens = num_bytes = count = 0
    pending: list[tuple[Tensor, int]] = []  # (window tokens, how many of its last targets are scored)

    def run(windows: list[tuple[Tensor, int]]) -> None:
        nonlocal nats
        windows.sort(key=lambda w: -len(w[0]))  # similar lengths share a batch: less padding
        for start in range(0, len(windows), batch_size):
            chunk = windows[start : start + batch_size]
            for logprobs, (_, scored) in zip(target_logprobs(model, [w for w, _ in chunk]), chunk):
                nats -= float(logprobs[-scored:].double().sum())
                if on_tokens:
                    on_tokens(scored)

    for document in documents:
        if not document.ids:
            continue
        sequence = torch.tensor([eos_id, *document.ids])
        for begin, end, first in sliding_windows(len(sequence), seq_len, stride):
            pending.append((sequence[begin:end], end - first))
        tokens += len(document.ids)
        num_bytes += document.num_bytes
        count += 1
        if len(pending) >= 16 * batch_size:
            run(pending)
            pending = []
    run(pending)
    if tokens == 0:
        raise PalmError("no tokens to evaluate: the data holds no non-empty documents")
    loss = nats / tokens
    return PerplexityResult(
        loss=loss, perplexity=math.exp(loss), bits_per_byte=nats / (num_bytes * math.log(2)) if num_bytes else math.nan,
        tokens=tokens, bytes=num_bytes, documents=count, seq_len=seq_len, stride=stride,
    )
