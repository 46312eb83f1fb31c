"""Speculative decoding: acceptance and speed-up of a trained draft/target pair, and the cost side on preset shapes.

    .venv/bin/python benchmarks/speculative.py pair --target runs/tiny/model --draft runs/draft/model
    .venv/bin/python benchmarks/speculative.py cost --presets 150m 1b

`pair`: greedy decoding of prompts cut from the Python standard library's source (byte-level, as
`palm train` trains by default), plain (`palm.generate`) and speculative with each k, both eager
or both compiled (`--compile`), timed in turn in one process (the median over prompts of each ratio is quoted, so that a noisy machine
slows both sides alike). It checks that the speculative tokens equal the plain greedy ones.

`cost`: random weights on a preset's shape. The time of one target forward verifying k + 1
tokens against a cache of `--context` positions, relative to one decode step of one token at the
same position (both through `decoding_view`, i.e. palm's CPU kernels where they run). With a
draft step costing c target steps and acceptance rate a per token, a round of k proposals emits
(1 - a^(k+1)) / (1 - a) tokens for k c + verify(k) step-times.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch

import palm
from palm.inference.decoding import attention_mask, decoding_view
from palm.inference.speculative import speculative_stream


def stdlib_prompts(count: int, length: int, seed: int) -> list[torch.Tensor]:
    """`count` byte prompts of `length` bytes, each from a random line start of a random stdlib module."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    rng = random.Random(seed)
    prompts = []
    while len(prompts) < count:
        text = rng.choice(files).read_bytes()
        starts = [i + 1 for i, b in enumerate(text[: -length - 1]) if b == ord("\n")]
        if not starts:
            continue
        start = rng.choice(starts)
        prompts.append(torch.tensor(list(text[start : start + length])))
    return prompts


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run_pair(args: argparse.Namespace) -> None:
    target, draft = palm.load(args.target).eval(), palm.load(args.draft).eval()
    print(f"target {args.target}: {target.num_parameters() / 1e6:.2f}M parameters; "
          f"draft {args.draft}: {draft.num_parameters() / 1e6:.2f}M ({target.num_parameters() / draft.num_parameters():.1f}x smaller)")
    prompts = stdlib_prompts(args.prompts, args.prompt_len, args.seed)
    n = args.new_tokens
    compile = args.compile
    # warm up every path (kernel load, allocator; with --compile, the graphs at these lengths)
    for model in (target, draft):
        palm.generate(model, prompts[0], n, temperature=0, compile=compile)
    for k in args.k:
        list(speculative_stream(target, draft, prompts[0], n, draft_k=k, temperature=0, compile=compile))
    ratios = {k: [] for k in args.k}
    rates = {k: [0, 0, 0] for k in args.k}
    draft_ratio = []
    identical = 0
    plain_tps = []
    for prompt in prompts:
        plain_s, plain = timed(lambda: palm.generate(target, prompt, n, temperature=0, compile=compile))
        draft_s, _ = timed(lambda: palm.generate(draft, prompt, n, temperature=0, compile=compile))
        plain_tps.append(n / plain_s)
        draft_ratio.append(plain_s / draft_s)
        same = True
        for k in args.k:
            spec = speculative_stream(target, draft, prompt, n, draft_k=k, temperature=0, compile=compile)
            spec_s, tokens = timed(lambda: torch.cat(list(spec)))
            same &= torch.equal(torch.cat([prompt, tokens]), plain)
            ratios[k].append(plain_s / spec_s)
            counts = rates[k]
            counts[0] += spec.acceptance.accepted
            counts[1] += spec.acceptance.proposed
            counts[2] += spec.acceptance.rounds
        identical += same
    print(f"{len(prompts)} prompts of {args.prompt_len} bytes, {n} new tokens each, greedy, "
          f"{'compiled' if compile else 'eager'} (plain and speculative alike); "
          f"speculative == plain greedy for {identical}/{len(prompts)} prompts (all k)")
    print(f"plain target: median {statistics.median(plain_tps):.0f} tokens/s; "
          f"draft alone {statistics.median(draft_ratio):.1f}x the target's speed")
    print("| k | acceptance | tokens per target forward | speed-up (median over prompts) | min - max |")
    print("|---:|---:|---:|---:|---:|")
    for k in args.k:
        accepted, proposed, rounds = rates[k]
        r = ratios[k]
        print(f"| {k} | {accepted / proposed:.1%} | {len(prompts) * n / rounds:.2f} | "
              f"{statistics.median(r):.2f}x | {min(r):.2f}-{max(r):.2f} |")


@torch.inference_mode()
def run_cost(args: argparse.Namespace) -> None:
    ks = args.k
    print("| preset | context | decode step (ms) | " + " | ".join(f"verify k={k}" for k in ks) + " |")
    print("|---|---:|---:|" + "---:|" * len(ks))
    for preset in args.presets:
        torch.manual_seed(0)
        config = palm.get_config(preset)
        model = decoding_view(palm.PaLM(config).eval())
        context = args.context
        cache = model.make_cache(1, context + max(ks) + 1)
        model(torch.randint(0, config.num_tokens, (1, context)), torch.arange(context), None, cache)
        starts = torch.zeros(1, dtype=torch.long)

        def forward(width: int):
            positions = torch.arange(context, context + width)
            tokens = torch.randint(0, config.num_tokens, (1, width))
            return lambda: model(tokens, positions, attention_mask(positions, context + width, starts), cache)

        runs = {w: forward(w) for w in (1, *(k + 1 for k in ks))}
        for run in runs.values():
            run()
        times = {w: [] for w in runs}
        for _ in range(args.repeats):  # interleaved, so that load changes hit every width alike
            for w, run in runs.items():
                times[w].append(timed(run)[0])
        step = statistics.median(times[1])
        cells = " | ".join(f"{statistics.median(times[k + 1]) / step:.2f}x" for k in ks)
        print(f"| {preset} ({model.num_parameters() / 1e6:.0f}M) | {context} | {step * 1e3:.1f} | {cells} |")
        sys.stdout.flush()
        del model, cache, runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(required=True)
    pair = commands.add_parser("pair")
    pair.add_argument("--target", required=True)
    pair.add_argument("--draft", required=True)
    pair.add_argument("--prompts", type=int, default=8)
    pair.add_argument("--prompt_len", type=int, default=64)
    pair.add_argument("--new_tokens", type=int, default=128)
    pair.add_argument("--k", type=int, nargs="+", default=[2, 4, 6])
    pair.add_argument("--seed", type=int, default=0)
    pair.add_argument("--compile", action="store_true", help="plain and speculative decoding both through torch.compile")
    pair.set_defaults(func=run_pair)
    cost = commands.add_parser("cost")
    cost.add_argument("--presets", nargs="+", default=["150m", "1b"])
    cost.add_argument("--context", type=int, default=256)
    cost.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 7])
    cost.add_argument("--repeats", type=int, default=15)
    cost.set_defaults(func=run_cost)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    args.func(args)


if __name__ == "__main__":
    main()
