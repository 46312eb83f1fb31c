"""Length extrapolation: the loss at each position of windows longer than the training length.

Every length reads the same tokens (the first `windows * max(lengths)` of a token stream), cut
into consecutive windows of that length, so lines differ only in how much context a position has.
Position q in a window is the q-th predicted token (q = 1 .. length - 1), seen with q tokens of
context; losses are averaged over all windows and over buckets of positions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from palm.errors import PalmError


@dataclass
class LengthCurve:
    length: int
    windows: int
    position_loss: Tensor  # (length - 1,) mean loss of predicted position q = 1 .. length - 1, float64

    def bucket_losses(self, width: int) -> list[float]:
        """Mean loss of positions [k * width, (k + 1) * width) for each bucket k (bucket 0 starts
        at position 1, which has no position 0 to predict)."""
        return bucket_means(self.position_loss, width)

    @property
    def loss(self) -> float:
        return float(self.position_loss.mean())


def bucket_means(position_loss: Tensor, width: int) -> list[float]:
    """Means of the per-position losses (index i is position i + 1) over buckets of `width` positions."""
    positions = torch.arange(1, len(position_loss) + 1)
    buckets = positions // width
    return [float(position_loss[buckets == b].mean()) for b in range(int(buckets.max()) + 1)]


def check_lengths(lengths: list[int], stream_len: int, windows: int) -> None:
    if not lengths or any(length < 2 for length in lengths):
        raise PalmError(f"--lengths must be integers of at least 2, got {','.join(map(str, lengths)) or 'none'}")
    if windows < 1:
        raise PalmError(f"--windows must be at least 1, got {windows}")
    if stream_len < max(lengths):
        raise PalmError(f"the data holds {stream_len:,} tokens, fewer than one window of {max(lengths):,}")


@torch.inference_mode()
def position_losses(
    model: nn.Module, stream: Tensor, length: int, *, batch_size: int = 8,
    on_windows: Callable[[int], None] | None = None,
) -> LengthCurve:
    """Mean next-token loss per position over consecutive windows of `length` tokens of `stream`
    (1-D; its length a multiple of `length`), each window one forward pass as training runs it."""
    device = model.token_emb.weight.device
    rows = stream.view(-1, length)
    total = torch.zeros(length - 1, dtype=torch.float64)
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size].to(device)
        logits = model(batch[:, :-1]).float()
        loss = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")  # (b, length - 1)
        total += loss.double().sum(0).cpu()
        if on_windows:
            on_windows(len(batch))
    return LengthCurve(length, len(rows), total / len(rows))


def extrapolation(
    model: nn.Module, stream: Tensor, lengths: list[int], *, windows: int, batch_size: int = 8,
    on_windows: Callable[[int], None] | None = None,
) -> list[LengthCurve]:
    """One curve per length over the same `windows * max(lengths)` tokens of `stream` (fewer when
    the stream is shorter: as many whole windows of the longest length as it holds)."""
    check_lengths(lengths, len(stream), windows)
    longest = max(lengths)
    used = min(windows, len(stream) // longest) * longest
    tokens = stream[:used]
    return [position_losses(model, tokens, length, batch_size=batch_size, on_windows=on_windows)
            for length in sorted(lengths)]


def format_table(curves: list[LengthCurve], width: int, train_len: int | None) -> str:
    """Rows of position buckets, a column of mean loss per length; '*' marks buckets past `train_len`."""
    header = f"{'positions':>13} " + "".join(f"{'len ' + str(c.length):>11}" for c in curves)
    lines = [header]
    rows = max(len(c.bucket_losses(width)) for c in curves)
    per_curve = [c.bucket_losses(width) for c in curves]
    for b in range(rows):
        lo, hi = max(b * width, 1), (b + 1) * width - 1
        mark = "*" if train_len is not None and hi >= train_len else " "
        cells = "".join(f"{values[b]:>11.4f}" if b < len(values) else f"{'':>11}" for values in per_curve)
        lines.append(f"{lo:>6}-{hi:<6}{mark}" + cells)
    lines.append(f"{'all':>13} " + "".join(f"{c.loss:>11.4f}" for c in curves))
    if train_len is not None:
        lines.append(f"* positions at or past the training length ({train_len})")
    return "\n".join(lines)


def plot(curves: list[LengthCurve], width: int, train_len: int | None, path: str | Path, title: str = "") -> None:
    """Loss against position (bucket means), one line per length, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for curve in curves:
        values = curve.bucket_losses(width)
        centres = [min((b + 0.5) * width, curve.length - 1) for b in range(len(values))]
        ax.plot(centres, values, marker=".", label=f"window {curve.length}")
    if train_len is not None:
        ax.axvline(train_len, color="grey", linestyle="--", linewidth=1, label=f"training length {train_len}")
    ax.set_xlabel(f"position in window (bucket means, {width} positions per bucket)")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_title(title or "loss by position")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
