"""Training throughput and MFU: `palm train` against the seed's model code in a plain AdamW loop.

    .venv/bin/python benchmarks/train.py [--preset 150m] [--batch_size 4] [--seq_len 512] \
        [--steps 4] [--rounds 3] [--precisions fp32 bf16] [--device cpu]

All rows train the same architecture from random weights on the same batch shape (batch x
seq_len tokens per optimizer step): palm through its full `palm train` loop (accelerate,
weight-decay groups, clipping, warmup/cosine schedule, metrics), palm's model in the same bare
loop as the seed's (so that these two rows show what `palm train` costs on top of its model), the seed through
palm-rlhf-pytorch 0.2.1's `PaLM(..., return_loss=True)` and `torch.optim.AdamW` with bf16 via
`torch.autocast`. The first step of each is a warm-up and is not timed; tokens/s is the median
over the timed steps. MFU uses the PaLM paper's 6N + 12LHQT FLOPs per token against a peak: the
GPU's data-sheet dense bf16 figure, or on CPU a 1024x1024 matmul measured here in each precision.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from palm.config import get_config
from palm.training.config import TrainConfig
from palm.training.metrics import flops_per_token, peak_flops
from palm.training.pretrain import train


def seed_tokens_per_sec(config, batch_size: int, seq_len: int, steps: int, precision: str, device: str) -> float:
    from palm_rlhf_pytorch import PaLM as SeedPaLM

    torch.manual_seed(0)
    model = SeedPaLM(num_tokens=config.num_tokens, dim=config.dim, depth=config.depth, heads=config.heads,
                     dim_head=config.dim_head, ff_mult=config.ff_mult, qk_rmsnorm=config.qk_rmsnorm).to(device)
    return bare_loop_tokens_per_sec(model, lambda batch: model(batch, return_loss=True), config, batch_size, seq_len,
                                    steps, precision, device)


def palm_model_tokens_per_sec(config, batch_size: int, seq_len: int, steps: int, precision: str, device: str) -> float:
    """palm's own model in the same bare loop: what `palm train` costs on top of its model."""
    from palm.model import PaLM

    torch.manual_seed(0)
    model = PaLM(config).to(device)
    return bare_loop_tokens_per_sec(model, model.loss, config, batch_size, seq_len, steps, precision, device)


def bare_loop_tokens_per_sec(model, loss_of, config, batch_size: int, seq_len: int, steps: int, precision: str,
                             device: str) -> float:
    """Median tokens/s of a plain AdamW loop (autocast for bf16, clipping at 1.0), the first step untimed."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    data = torch.randint(0, config.num_tokens, (steps + 1, batch_size, seq_len), device=device)
    times = []
    for batch in data:
        start = time.perf_counter()
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_of(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return batch_size * seq_len / statistics.median(times[1:])


def palm_tokens_per_sec(preset: str, batch_size: int, seq_len: int, steps: int, precision: str, peak: float) -> float:
    with tempfile.TemporaryDirectory() as out_dir:
        config = TrainConfig(preset=preset, out_dir=out_dir, max_steps=steps + 1, batch_size=batch_size, seq_len=seq_len,
                             precision=precision, log_every=1, eval_every=10**9, eval_windows=1, save_every=10**9, samples=0,
                             warmup_steps=1, peak_tflops=peak / 1e12)
        train(config, progress=False)
        records = [json.loads(line) for line in open(f"{out_dir}/metrics.jsonl")]
    steps = [r for r in records if "tokens_per_sec" in r]  # log_every=1: one step per figure
    return statistics.median(r["tokens_per_sec"] for r in steps[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="150m")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up step)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of `palm train` against the bare loop")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    config = get_config(args.preset)
    with torch.device("meta"):
        from palm.model import PaLM

        n_params = PaLM(config).num_parameters()
    flops = flops_per_token(config, n_params, args.seq_len)
    print(f"{args.preset}: {n_params / 1e6:.1f}M parameters, batch {args.batch_size} x {args.seq_len}, "
          f"{flops / 1e9:.2f} GFLOP per token, device {args.device}, {torch.get_num_threads()} threads\n")
    print("| code | precision | tokens/s | x seed | x palm's model, bare loop | MFU | peak TFLOP/s (source) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for precision in args.precisions:
        peak, source = peak_flops(torch.device(args.device), precision)
        shape = (config, args.batch_size, args.seq_len, args.steps, precision, args.device)
        seed = seed_tokens_per_sec(*shape)
        # `palm train` and the bare loop in turn, `--rounds` times, the order swapped each round: on a
        # shared machine the load moves within minutes, so their ratio is taken round by round.
        bare, full, ratios = [], [], []
        for r in range(args.rounds):
            measure = [lambda: palm_model_tokens_per_sec(*shape),
                       lambda: palm_tokens_per_sec(args.preset, args.batch_size, args.seq_len, args.steps, precision, peak)]
            if r % 2:
                full.append(measure[1]())
                bare.append(measure[0]())
            else:
                bare.append(measure[0]())
                full.append(measure[1]())
            ratios.append(full[-1] / bare[-1])
        bare_rate, full_rate = statistics.median(bare), statistics.median(full)
        rows = (("seed: palm-rlhf-pytorch 0.2.1 + AdamW", seed, ""),
                ("palm's model + AdamW (bare loop)", bare_rate, "1.00"),
                ("palm train", full_rate, f"{statistics.median(ratios):.2f} (rounds: {', '.join(f'{x:.2f}' for x in ratios)})"))
        for name, rate, versus_bare in rows:
            print(f"| {name} | {precision} | {rate:,.0f} | {rate / seed:.2f} | {versus_bare} | "
                  f"{100 * rate * flops / peak:.1f}% | {peak / 1e12:.3f} ({source}) |", flush=True)


if __name__ == "__main__":
    main()
