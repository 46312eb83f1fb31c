"""Where decoding's matrix-vector products stand against this machine's limits.

    .venv/bin/python benchmarks/gemv.py [--preset 150m]

For each weight type, the 37 matrix-vector products of one 150m decode step (random weights, in
the model's order, so each matrix comes from memory as in decoding) through palm's GEMV kernel
and through PyTorch (`F.linear`; int8 weights dequantized on the fly are not a fair comparison and
are skipped), against the read bandwidth of streaming one 1 GiB fp32 matrix. The last columns
repeat one ~3 MB matrix (rows of 768) that stays in the caches: the kernel's arithmetic ceiling
for that weight type with memory out of the way, in bytes and in weights per second.

    .venv/bin/python benchmarks/gemv.py --rows 1 2 4 8 16 32 64 128 256

fp32 products of several rows instead (a serving batch, a prefill): the model's products but the
output layer, each matrix from memory, through palm's kernel (tiled from 2 rows on), oneDNN's
matmul and PyTorch's `F.linear`, in GFLOP/s, interleaved and median of 7.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import palm
from palm.inference.cpu import KernelLinear, onednn_linear, swap_in_kernels
from palm.inference.quantization import quantize
from palm.kernels.decode import gemv, load_cpu_kernels


def best_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="150m")
    parser.add_argument("--rows", type=int, nargs="+", help="time fp32 products of these many rows instead")
    args = parser.parse_args()
    if not load_cpu_kernels():
        raise SystemExit("palm's CPU kernels are unavailable here")
    if args.rows:
        return rows_table(args.preset, args.rows)
    torch.manual_seed(0)
    big = torch.randn(2**14, 2**14)
    x_big = torch.randn(1, 2**14)
    stream = max(2**30 / best_seconds(lambda: gemv(x_big, big, None), 3), 2**30 / best_seconds(big.sum, 3))
    del big
    print(f"# {args.preset}, {torch.get_num_threads()} threads; streaming 1 GiB: {stream / 1e9:.1f} GB/s\n")
    print("| weights | palm GEMV GB/s | % of streaming | PyTorch F.linear GB/s | palm / PyTorch | in-cache ceiling GB/s | ceiling G weights/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = palm.PaLM(palm.get_config(args.preset)).eval()
    for dtype in ("fp32", "bf16", "int8"):
        model = palm.PaLM(base.config).eval()
        model.load_state_dict(base.state_dict())
        if dtype == "bf16":
            model.to(torch.bfloat16)
        elif dtype == "int8":
            quantize(model)
        layers = [m for m in swap_in_kernels(model).modules() if isinstance(m, KernelLinear)]
        inputs = [torch.randn(1, m.weight.shape[1]) for m in layers]
        nbytes = sum(m.weight.numel() * m.weight.element_size() for m in layers)
        ours = nbytes / best_seconds(lambda: [gemv(x, m.weight, m.scale) for m, x in zip(layers, inputs)], 8)
        if dtype == "int8":
            theirs_text, ratio_text = "", ""
        else:
            dt = torch.float32 if dtype == "fp32" else torch.bfloat16
            typed = [x.to(dt) for x in inputs]
            theirs = nbytes / best_seconds(lambda: [F.linear(x, m.weight) for m, x in zip(layers, typed)], 8)
            theirs_text, ratio_text = f"{theirs / 1e9:.1f}", f"{ours / theirs:.2f}x"
        # ~3 MB of weights: in the 8 MB L3, and large enough that the per-call cost does not count
        small = layers[0].weight[: 3 * 2**20 // (768 * layers[0].weight.element_size()), :768].contiguous()
        scale = torch.ones(small.shape[0]) if dtype == "int8" else None
        x_small = torch.randn(1, small.shape[1])
        ceiling = small.numel() * small.element_size() * 200 / best_seconds(
            lambda: [gemv(x_small, small, scale) for _ in range(200)], 5)
        print(f"| {dtype} | {ours / 1e9:.1f} | {100 * ours / stream:.0f}% | {theirs_text} | {ratio_text} | {ceiling / 1e9:.1f} | {ceiling / small.element_size() / 1e9:.1f} |", flush=True)


def rows_table(preset: str, row_counts: list[int]) -> None:
    """GFLOP/s of the model's fp32 products (all but the output layer) at each row count, per path."""
    torch.manual_seed(0)
    model = palm.PaLM(palm.get_config(preset)).eval()
    weights = [m.weight.detach() for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not name.startswith("to_logits")]
    paths = {"palm kernel": lambda x, w: gemv(x, w, None), "oneDNN": onednn_linear, "F.linear": F.linear}
    print(f"# {preset}, {len(weights)} fp32 products ({sum(w.numel() for w in weights) / 1e6:.0f}M weights), "
          f"{torch.get_num_threads()} threads; GFLOP/s, median of 7 interleaved passes\n")
    print("| rows | " + " | ".join(paths) + " | palm / best other |")
    print("| ---: | " + " | ".join("---:" for _ in paths) + " | ---: |")
    with torch.no_grad():
        for rows in row_counts:
            inputs = {k: torch.randn(rows, k) for k in {w.shape[1] for w in weights}}
            times = {name: [] for name in paths}
            for repeat in range(8):
                for name, product in paths.items():
                    start = time.perf_counter()
                    for w in weights:
                        product(inputs[w.shape[1]], w)
                    if repeat:  # the first pass warms up
                        times[name].append(time.perf_counter() - start)
            flop = 2 * rows * sum(w.numel() for w in weights)
            rate = {name: flop / statistics.median(t) / 1e9 for name, t in times.items()}
            best_other = max(v for name, v in rate.items() if name != "palm kernel")
            print(f"| {rows} | " + " | ".join(f"{v:.0f}" for v in rate.values())
                  + f" | {rate['palm kernel'] / best_other:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
