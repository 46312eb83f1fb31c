"""Decode rate of whichever palm is importable, for A/B runs of two checkouts on one machine.

    PYTHONPATH=/path/to/other/checkout .venv/bin/python benchmarks/decode_ab.py fp32,bf16,int8 [--compile] [--batches 1 8]

150m preset shape, random weights, a 16-token prompt, greedy; the decode rate (prefill excluded)
of `stream` per dtype and batch size. The dtypes take turns, one run each per round (`--rounds`),
so that a slow spell of a shared machine falls on all of them; printed: the best run of each, and
each dtype's rate relative to the first one's per round (median, min - max). Alternate the two
checkouts several times: on a shared machine the best of each is the fair comparison.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import palm

try:  # the layout before and after the structure change (issue 12)
    from palm.inference.decoding import stream
    from palm.inference.quantization import quantize
except ImportError:
    from palm.generate import stream
    from palm.quantize import quantize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dtypes", help="comma-separated: fp32, bf16, int8")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = palm.PaLM(palm.get_config("150m")).eval()
    models = {}
    for dtype in args.dtypes.split(","):
        models[dtype] = model = copy.deepcopy(base)
        if dtype == "int8":
            quantize(model)
        elif dtype == "bf16":
            model.to(torch.bfloat16)
    rows = []
    for batch in args.batches:
        prompt = torch.randint(0, base.config.num_tokens, (batch, 16))
        rates = {dtype: [] for dtype in models}
        for _ in range(args.rounds + 1):  # the first round warms up (and compiles), untimed
            for dtype, model in models.items():
                count, first = 0, None
                for _ in stream(model, prompt, args.new_tokens, temperature=0, compile=args.compile):
                    first = first or time.perf_counter()
                    count += 1
                rates[dtype].append((count - 1) / (time.perf_counter() - first))
        rates = {dtype: runs[1:] for dtype, runs in rates.items()}
        reference = rates[next(iter(models))]
        for dtype, runs in rates.items():
            ratios = sorted(r / ref for r, ref in zip(runs, reference))
            relative = f" ({statistics.median(ratios):.2f}x, {ratios[0]:.2f}-{ratios[-1]:.2f})" if runs is not reference else ""
            rows.append(f"{dtype} b{batch} {max(runs):.1f}{relative}")
    print(f"{palm.__file__}: " + " | ".join(rows))


if __name__ == "__main__":
    main()
