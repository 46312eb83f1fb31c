"""What a run reports: `metrics.jsonl`, FLOPs and MFU, memory in use, and the loss plot."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from palm.config import PaLMConfig
from palm.dtypes import resolve_dtype


class MetricsLog:
    """`metrics.jsonl`, written by the main process; on resume, entries after the resumed step go."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            keep = []
            if resume_step is not None:
                keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in keep))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def flops_per_token(model_config: PaLMConfig, num_parameters: int, seq_len: int) -> float:
    """Training FLOPs per token, 6N + 12LHQT (PaLM paper, appendix B), N counting every parameter."""
    c = model_config
    return 6 * num_parameters + 12 * c.depth * c.heads * c.dim_head * seq_len


GPU_PEAK_TFLOPS = {  # dense bf16/fp16 tensor-core peaks from the vendors' data sheets
    "H200": 989.5, "H100": 989.5, "H100 PCIe": 756.5, "A100": 312.0, "L40S": 362.1, "L40": 181.0, "A10": 125.0,
    "L4": 121.0, "4090": 165.2,
}


def peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    """The device's peak FLOP/s and where that figure comes from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        known = [key for key in GPU_PEAK_TFLOPS if key in name]
        if known:  # the longest name that fits: "NVIDIA L40" holds "L4" too
            return GPU_PEAK_TFLOPS[max(known, key=len)] * 1e12, f"{name} data-sheet dense bf16 peak"
    dtype = resolve_dtype(precision)
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.bfloat16
    n = 1536
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(4):  # the best of a few: a busy machine only ever makes a matmul slower
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best, f"measured {n}x{n} {str(dtype)[6:]} matmul"


def memory_in_use(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    import psutil

    return f"{psutil.Process().memory_info().rss / 2**30:.1f} GiB RSS"


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """Training loss (and validation loss where measured) against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=png_path.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
