"""palm's native BPE encoder against Hugging Face tokenizers' `encode_batch_fast`, same ids.

    .venv/bin/python benchmarks/bpe.py [--tokenizer path/to/tokenizer.json]

Two corpora: the Python standard library's source files (natural repetition: most words were
seen before, so word caches hit) and documents of random lower-case words (nearly every word new:
the worst case for a word cache). Without --tokenizer, a byte-level BPE of 8,192 tokens is trained
on the standard library first. Best of 3 passes each, every pass starting with empty word caches
(palm's and tokenizers' own), both engines on all cores, in one process.
"""

from __future__ import annotations

import argparse
import random
import string
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from build_dataset import make_corpus, train_tokenizer  # noqa: E402

from palm.data.documents import stdlib_files  # noqa: E402
from palm.kernels.bpe import FastBPE  # noqa: E402


def best_rate(encode, batches: list[list[str]], reset) -> tuple[float, int]:
    """Tokens per second of the best of 3 passes, each starting with empty word caches (`reset`)."""
    best, count = float("inf"), 0
    for _ in range(3):
        reset()
        start = time.perf_counter()
        count = sum(encode(batch) for batch in batches)
        best = min(best, time.perf_counter() - start)
    return count / best, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", help="a tokenizer.json (default: train a BPE of 8,192 tokens here)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.tokenizer) if args.tokenizer else train_tokenizer(make_corpus(Path(tmp), 1), Path(tmp))
        tokenizer = Tokenizer.from_file(str(path))
    engine = {"fast": FastBPE.from_tokenizer(tokenizer)}
    if engine["fast"] is None:
        raise SystemExit(f"{path}: not a tokenizer palm's native encoder reproduces")

    stdlib = [p.read_text(errors="replace") for p in stdlib_files()]
    rng = random.Random(0)
    words = [" ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 12))) for _ in range(2000))
             for _ in range(600)]
    corpora = {"standard library": [stdlib[i:i + 100] for i in range(0, len(stdlib), 100)],
               "random words": [words[i:i + 100] for i in range(0, len(words), 100)]}
    print(f"tokenizer {path.name}, {tokenizer.get_vocab_size()} tokens\n")
    print("| corpus | tokens | tokenizers tokens/s | palm tokens/s | palm / tokenizers | same ids |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for name, batches in corpora.items():
        same = all(
            engine["fast"].encode_documents(b, 0)[0].tolist()
            == [i for e in tokenizer.encode_batch_fast(b, add_special_tokens=False) for i in [*e.ids, 0]]
            for b in batches[:2])
        theirs, count = best_rate(lambda b: sum(len(e.ids) for e in tokenizer.encode_batch_fast(b, add_special_tokens=False)),
                                  batches, tokenizer.model._clear_cache)
        ours, _ = best_rate(lambda b: int(np.sum(engine["fast"].encode_documents(b, 0)[1] - 1)), batches,
                            lambda: engine.update(fast=FastBPE.from_tokenizer(tokenizer)))
        print(f"| {name} | {count:,} | {theirs:,.0f} | {ours:,.0f} | {ours / theirs:.1f}x | {'yes' if same else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
