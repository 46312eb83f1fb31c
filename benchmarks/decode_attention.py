"""Attention of one new token over the KV cache: PyTorch's SDPA against palm's CPU kernel.

    .venv/bin/python benchmarks/decode_attention.py [--heads 12] [--dim_head 64]

Shapes as in decoding with multi-query attention: the query heads folded into one (b, 1, heads, d)
query, one key/value head, a preallocated cache of `slots` positions of which `filled` are visible
(the rest masked, as `palm.generate` masks the slots it has not written yet). Microseconds per call,
the best of several repeats, both in the same process.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from palm.kernels.decode import decode_attention, load_cpu_kernels


def best_time(fn, repeats: int = 5, calls: int = 200) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--dim_head", type=int, default=64)
    parser.add_argument("--slots", type=int, nargs="+", default=[256, 1024, 4096, 8192])
    args = parser.parse_args()
    if not load_cpu_kernels():
        raise SystemExit("palm's CPU kernels are not available on this machine")
    print(f"# {args.heads} query heads, dim_head {args.dim_head}, batch 1, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'dtype':<5} {'slots':>6} {'filled':>6} {'SDPA us':>8} {'palm us':>8} {'speed-up':>8}")
    scale = args.dim_head**-0.5
    for dtype in (torch.float32, torch.bfloat16):
        for slots in args.slots:
            q = torch.randn(1, 1, args.heads, args.dim_head, dtype=dtype)
            k = torch.randn(1, 1, slots, args.dim_head, dtype=dtype)
            v = torch.randn(1, 1, slots, args.dim_head, dtype=dtype)
            for filled in (slots // 2, slots):
                mask = torch.zeros(1, 1, 1, slots, dtype=torch.bool)
                mask[..., :filled] = True
                sdpa = best_time(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale))
                palm = best_time(lambda: decode_attention(q, k, v, mask, scale))
                name = str(dtype).removeprefix("torch.").replace("float32", "fp32").replace("bfloat16", "bf16")
                print(f"{name:<5} {slots:>6} {filled:>6} {sdpa * 1e6:8.1f} {palm * 1e6:8.1f} {sdpa / palm:7.2f}x", flush=True)


if __name__ == "__main__":
    main()
