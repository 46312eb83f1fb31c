"""What a run reports, against hand-computed figures: FLOPs per token, device peaks, the loss plot."""

import json

import pytest
import torch

from palm import PaLMConfig
from palm.training import metrics
from palm.training.metrics import flops_per_token, peak_flops, plot_losses


def test_flops_per_token_is_6n_plus_12lhqt():
    config = PaLMConfig(num_tokens=257, dim=64, depth=3, heads=4, dim_head=16)
    # 6 x 1000 parameters + 12 x 3 layers x 4 heads x 16 dims x 128 positions
    assert flops_per_token(config, 1000, 128) == 6_000 + 294_912
    # the 1B preset at 2048 tokens: 6 x 1.0e9 + 12 x 16 x 8 x 128 x 2048
    one_b = PaLMConfig(dim=2048, depth=16, heads=8, dim_head=128)
    assert flops_per_token(one_b, 10**9, 2048) == 6 * 10**9 + 402_653_184


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.5),
    ("NVIDIA H100 PCIe", 756.5),  # the PCIe card's own sheet, not the SXM one's
    ("NVIDIA H200", 989.5),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A10", 125.0),
    ("NVIDIA L4", 121.0),
    ("NVIDIA L40", 181.0),  # not the L4's figure, which its name contains
    ("NVIDIA L40S", 362.1),
    ("NVIDIA GeForce RTX 4090", 165.2),
])
def test_gpu_peaks_come_from_the_data_sheets(monkeypatch, name, tflops):
    # dense bf16 tensor-core peaks (half the "with sparsity" figures of NVIDIA's data sheets)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    peak, source = peak_flops(torch.device("cuda"), "bf16")
    assert peak == pytest.approx(tflops * 1e12) and name in source


def test_cpu_peak_is_measured_as_2n_cubed_over_the_best_time(monkeypatch):
    ticks = iter([0.0, 0.5, 1.0, 1.25, 2.0, 3.0, 4.0, 4.4])  # four matmuls: 0.5, 0.25, 1.0 and 0.4 s

    class Clock:
        @staticmethod
        def perf_counter():
            return next(ticks)

    made = []

    def randn(*shape, dtype=None, device=None):  # what is multiplied is asked for, a small stand-in made
        made.append((shape, dtype))
        return torch.zeros(2, 2, dtype=dtype)

    monkeypatch.setattr(metrics, "time", Clock)
    monkeypatch.setattr(torch, "randn", randn)
    peak, source = peak_flops(torch.device("cpu"), "fp16")
    assert made == [((1536, 1536), torch.bfloat16)] * 2
    assert peak == 2 * 1536**3 / 0.25
    assert source == "measured 1536x1536 bfloat16 matmul"  # fp16 is measured as bf16 on the CPU


def test_the_loss_plot_draws_the_logged_losses(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    lines = [{"step": s, "loss": 5.0 / s, "lr": 0.1} for s in range(1, 7)] + [{"step": 3, "val_loss": 2.5, "val_ppl": 12.2}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    drawn = []
    real_savefig = Figure.savefig

    def savefig(figure, path, **kwargs):
        drawn.extend((line.get_label(), list(line.get_xdata()), list(line.get_ydata())) for line in figure.axes[0].lines)
        return real_savefig(figure, path, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    plot_losses(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert drawn == [("train", list(range(1, 7)), [5.0 / s for s in range(1, 7)]), ("validation", [3], [2.5])]
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
