"""`palm serve` under concurrent clients: aggregate and per-client decode rate, time to first token.

    .venv/bin/python benchmarks/serve.py [--preset 150m] [--concurrency 1 2 4 8 16] [--max_tokens 64]

A model of the preset's shape with random weights (saved to a temporary directory) is served by
`python -m palm.serve` in a process of its own on 127.0.0.1; N clients (asyncio + httpx, in this
process) each stream one greedy completion of `--max_tokens` tokens from a prompt of
`--prompt_tokens` tokens, all starting together; `--rounds` rounds per N, taken round-robin over the Ns. The tokenizer is a
word-level one made on the spot with one token per model id, so that every id decodes to text
and every token is a chunk. Reported per N: aggregate tokens/s (all completion tokens over the
wall time of the round), per-client tokens/s (each client's tokens over its own time, mean),
time to first token p50/p95 (over every client of every round), and the ratios to N = 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

import palm


def word_tokenizer(vocab_size: int, directory: Path) -> Path:
    """A tokenizer.json with one whitespace-separated word per id ("w0".."wN"), <|endoftext|> last."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size - 1)} | {"<|endoftext|>": vocab_size - 1}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = directory / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_client(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"] and first is None:
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"start": start, "first": first, "end": end, "tokens": tokens}


async def round_of(url: str, clients: int, max_tokens: int, prompt_tokens: int, round_index: int) -> list[dict]:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as client:
        prompts = [" ".join(f"w{(round_index * 1000 + c * prompt_tokens + i) % 50000 + 1}" for i in range(prompt_tokens))
                   for c in range(clients)]
        return await asyncio.gather(*(one_client(client, url, p, max_tokens) for p in prompts))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="150m")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--prompt_tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `palm serve` flags (e.g. --compile)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="palm-serve-bench-") as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        config = palm.get_config(args.preset)
        palm.save_pretrained(palm.PaLM(config), tmp / "model")
        word_tokenizer(config.num_tokens, tmp)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "palm.serve", "--checkpoint", str(tmp / "model"), "--tokenizer",
                   str(tmp / "tokenizer.json"), "--port", str(port), "--model_name", "bench", "--dtype", args.dtype,
                   "--max_batch_size", str(max(args.concurrency)),
                   "--max_seq_len", str(args.prompt_tokens + args.max_tokens + 8), *args.extra]
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 300
            while True:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server did not start: {' '.join(command)}")
                try:
                    if httpx.get(f"{url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            for clients in args.concurrency:  # warm-up: kernels, allocator, oneDNN's primitives for each batch shape
                asyncio.run(round_of(url, clients, 8, args.prompt_tokens, 99))

            print(f"# palm serve, {args.preset} preset shape ({config.num_tokens} ids), random weights, {args.dtype}, "
                  f"{args.prompt_tokens}-token prompts, {args.max_tokens} tokens each, greedy, {args.rounds} rounds; "
                  f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
            # Rounds go round-robin over the concurrency levels, so that a slow spell of a shared
            # machine falls on all of them rather than on one row.
            rates, per_client, ttfts = ({clients: [] for clients in args.concurrency} for _ in range(3))
            for r in range(args.rounds):
                for clients in args.concurrency:
                    results = asyncio.run(round_of(url, clients, args.max_tokens, args.prompt_tokens, r))
                    wall = max(x["end"] for x in results) - min(x["start"] for x in results)
                    rates[clients].append(sum(x["tokens"] for x in results) / wall)
                    per_client[clients] += [x["tokens"] / (x["end"] - x["start"]) for x in results]
                    ttfts[clients] += [x["first"] - x["start"] for x in results]
            print("| clients | aggregate tok/s | per-client tok/s | TTFT p50 s | TTFT p95 s | aggregate / 1 client | TTFT p95 / 1 client |")
            print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
            base = None
            for clients in args.concurrency:
                aggregate, p95 = statistics.mean(rates[clients]), percentile(ttfts[clients], 0.95)
                base = base or (aggregate, p95)
                print(f"| {clients} | {aggregate:.1f} | {statistics.mean(per_client[clients]):.1f} "
                      f"| {percentile(ttfts[clients], 0.5):.3f} | {p95:.3f} | {aggregate / base[0]:.2f}x | {p95 / base[1]:.2f}x |")
            print(f"# server stats: {httpx.get(f'{url}/health').json()}")
        finally:
            server.terminate()
            server.wait(timeout=120)


if __name__ == "__main__":
    main()
