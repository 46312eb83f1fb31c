"""Decode speed of palm against the seed's generate, Hugging Face transformers, and the memory bound.

    .venv/bin/pip install transformers   # for the transformers row
    .venv/bin/python benchmarks/generate.py [--preset 150m] [--lengths 256 1024] [--device cpu]

All models have random weights (speed does not depend on them). Prompt: 16 tokens; each run
decodes greedily to the given total length. "decode tok/s" excludes the prompt's prefill; palm's
rows take the best of `--repeats` runs (a shared machine's slow spells otherwise decide them).
The bound is the bytes of weights one decode step reads, divided by a memory read bandwidth
measured here (the best of streaming a 1 GiB tensor through `torch.sum` and through palm's GEMV).
"""

from __future__ import annotations

import argparse
import copy
import gc
import time

import torch

import palm
from palm.dtypes import resolve_dtype
from palm.inference.decoding import stream
from palm.inference.quantization import quantize
from palm.kernels.decode import gemv, load_cpu_kernels

PROMPT_LEN = 16


def measure_bandwidth(device: str) -> float:
    """Bytes per second that one pass over a 1 GiB fp32 tensor achieves (best of two ways, 3 runs)."""
    big = torch.randn(2**14, 2**14, device=device)  # 1 GiB
    readers = [lambda: big.sum()]
    if device == "cpu" and load_cpu_kernels():
        x = torch.randn(1, big.shape[1])
        readers.append(lambda: gemv(x, big, None))
    best = float("inf")
    for read in readers:
        read()
        for _ in range(3):
            sync(device)
            start = time.perf_counter()
            read()
            sync(device)
            best = min(best, time.perf_counter() - start)
    return big.numel() * 4 / best


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes read per decode step: every parameter and buffer except the embedding table (one row is read)."""
    seen, total = set(), 0
    embedding = model.token_emb.weight
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    tied = model.to_logits.weight is embedding
    return total if tied else total - embedding.numel() * embedding.element_size()


def palm_rate(model, total: int, batch: int, device: str, compile: bool = False, repeats: int = 1) -> tuple[float, float]:
    """(decode tokens/s per sequence, prefill seconds) for greedy decoding to `total` tokens, from
    the run of `repeats` that decoded fastest."""
    prompt = torch.randint(0, model.config.num_tokens, (batch, PROMPT_LEN), device=device)
    # warm-up (kernels, caches, allocator; compilation, for these shapes)
    for _, _ in zip(range(8), stream(model, prompt, total - PROMPT_LEN, temperature=0, compile=compile)):
        pass
    runs = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        first = None
        count = 0
        for _ in stream(model, prompt, total - PROMPT_LEN, temperature=0, compile=compile):
            sync(device)
            first = first or time.perf_counter()
            count += 1
        end = time.perf_counter()
        runs.append(((count - 1) / (end - first), first - start))
    return max(runs)


def seed_rate(state_dict, config, total: int) -> float:
    """The seed's path: palm-rlhf-pytorch 0.2.1 `generate`, a full forward pass per new token."""
    from palm_rlhf_pytorch import PaLM as ReferencePaLM

    ref = ReferencePaLM(num_tokens=config.num_tokens, dim=config.dim, depth=config.depth,
                        dim_head=config.dim_head, heads=config.heads).eval()
    ref.load_state_dict(state_dict)
    prompt = torch.randint(0, config.num_tokens, (1, PROMPT_LEN))
    ref.generate(PROMPT_LEN + 4, prompt, temperature=0.0)
    start = time.perf_counter()
    ref.generate(total, prompt, temperature=0.0)
    return (total - PROMPT_LEN) / (time.perf_counter() - start)


def transformers_rate(total: int, dtype: torch.dtype, device: str) -> tuple[float, int]:
    """Hugging Face transformers' `generate` (KV cache, greedy) on a GPT-NeoX model of GPT-2-small size."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                           intermediate_size=3072, max_position_embeddings=2048, tie_word_embeddings=True)
    model = GPTNeoXForCausalLM(config).to(device=device, dtype=dtype).eval()
    n_params = sum(p.numel() for p in model.parameters())
    prompt = torch.randint(0, 50304, (1, PROMPT_LEN), device=device)
    new = total - PROMPT_LEN
    kwargs = dict(do_sample=False, pad_token_id=0, min_new_tokens=new, max_new_tokens=new)
    model.generate(prompt, **{**kwargs, "min_new_tokens": 8, "max_new_tokens": 8})
    sync(device)
    start = time.perf_counter()
    model.generate(prompt, **kwargs)
    sync(device)
    return new / (time.perf_counter() - start), n_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="150m")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--seed_lengths", type=int, nargs="*", default=[256], help="lengths to run the seed's path at")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "int8"])
    parser.add_argument("--batch", type=int, default=8, help="batch size for the batched rows")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="decode through torch.compile (palm.generate's compile=True)")
    parser.add_argument("--repeats", type=int, default=3, help="palm rows: the best of this many runs")
    args = parser.parse_args()
    device = args.device

    torch.manual_seed(0)
    base = palm.PaLM(palm.get_config(args.preset)).eval()
    bandwidth = measure_bandwidth(device)
    print(f"# {args.preset}, device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"measured read bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"{'engine':<34} {'dtype':<5} {'batch':>5} {'length':>6} {'decode tok/s':>12} {'bound tok/s':>11} {'% bound':>7}")

    def row(engine, dtype, batch, length, rate, bound=None):
        bound_text = f"{bound:11.1f} {100 * rate / bound:6.0f}%" if bound else f"{'':>11} {'':>7}"
        print(f"{engine:<34} {dtype:<5} {batch:>5} {length:>6} {rate:12.1f} {bound_text}", flush=True)

    engine = "palm, compiled decode" if args.compile else "palm"
    for dtype in args.dtypes:
        torch._dynamo.reset()  # each dtype compiles afresh: 3 dtypes x 3 shapes exceed dynamo's default limit of 8
        model = copy.deepcopy(base)
        if dtype == "int8":
            quantize(model)
        elif dtype == "bf16":
            model.to(torch.bfloat16)
        model.to(device)
        bound = bandwidth / weight_bytes(model)
        for length in args.lengths:
            rate, _ = palm_rate(model, length, 1, device, args.compile, args.repeats)
            row(engine, dtype, 1, length, rate, bound)
        rate, _ = palm_rate(model, args.lengths[0], args.batch, device, args.compile, args.repeats)
        row(engine, dtype, args.batch, args.lengths[0], rate)
        del model
        gc.collect()

    if device == "cpu":
        for length in args.seed_lengths:
            row("seed (palm-rlhf-pytorch generate)", "fp32", 1, length, seed_rate(base.state_dict(), base.config, length))
    try:
        for dtype in [d for d in args.dtypes if d in ("fp32", "bf16")]:
            for length in args.lengths:
                rate, n_params = transformers_rate(length, resolve_dtype(dtype), device)
                row(f"transformers GPT-NeoX {n_params / 1e6:.0f}M", dtype, 1, length, rate)
    except ImportError:
        print("(transformers not installed: `pip install transformers` for its rows)")


if __name__ == "__main__":
    main()
