"""`palm build-dataset` against the seed's approach: tokens/s and peak memory, two corpus sizes.

    .venv/bin/pip install transformers          # the seed approach tokenizes through it
    .venv/bin/python benchmarks/build_dataset.py [--sizes 1 10] [--seq_len 2048]

Corpus: JSON lines, one document per Python standard-library source file (the corpus of
`palm train`'s default run, 12 MB), repeated to make the larger size. Tokenizer: a byte-level BPE
with 8,192 tokens trained here on the same files (no Hub access needed). palm encodes it with its
native encoder (palm/kernels/bpe.py, same ids as `tokenizers`); the last row per size uses `tokenizers`. Every row runs in a fresh process with an empty datasets cache; peak memory is
that process's peak resident set (VmHWM).

The seed approach, as its build_dataset.py does it: `datasets.load_dataset`, then `Dataset.map`
with the (fast) tokenizer over batches of 1,000 documents with EOS appended, then a second
`map` that concatenates each batch with `sum(lists, [])` and cuts blocks (`group_texts`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SEED_APPROACH = r"""
import json, sys, time
import datasets
from transformers import PreTrainedTokenizerFast

corpus, tokenizer_file, seq_len, num_proc = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
start = time.perf_counter()
tokenizer = PreTrainedTokenizerFast(tokenizer_file=tokenizer_file, eos_token="<|endoftext|>")
ds = datasets.load_dataset("json", data_files=corpus, split="train")

def tokenize(examples):
    return tokenizer([t + tokenizer.eos_token for t in examples["text"]])

def group_texts(examples):
    concatenated = {k: sum(examples[k], []) for k in examples.keys()}
    total = (len(concatenated["input_ids"]) // seq_len) * seq_len
    return {k: [t[i : i + seq_len] for i in range(0, total, seq_len)] for k, t in concatenated.items()}

ds = ds.map(tokenize, batched=True, num_proc=num_proc, remove_columns=ds.column_names)
ds = ds.map(group_texts, batched=True, num_proc=num_proc)
tokens = len(ds) * seq_len
print(json.dumps({"tokens": tokens, "seconds": time.perf_counter() - start,
                  "peak_rss": peak_rss()}))
"""

OURS = r"""
import json, sys, time
from palm.data.build import build_dataset
from palm.tokenizer import load_tokenizer

corpus, tokenizer_file, seq_len, out, streaming = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
start = time.perf_counter()
metadata = build_dataset(corpus, load_tokenizer(tokenizer_file), output=out, seq_len=seq_len, streaming=streaming, progress=False)
print(json.dumps({"tokens": metadata["splits"]["train"]["tokens"], "seconds": time.perf_counter() - start,
                  "peak_rss": peak_rss()}))
"""

# VmHWM, the peak resident set of this process image (ru_maxrss would carry over the parent's
# peak across fork + exec on Linux).
PEAK_RSS = r"""
def peak_rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
"""


def make_corpus(directory: Path, copies: int) -> Path:
    from palm.data.documents import stdlib_files

    files = stdlib_files()
    path = directory / f"corpus-x{copies}.jsonl"
    with open(path, "w") as f:
        for _ in range(copies):
            for p in files:
                f.write(json.dumps({"text": p.read_text(errors="replace")}) + "\n")
    return path


def train_tokenizer(corpus: Path, directory: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8192, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator((json.loads(line)["text"] for line in open(corpus)), trainer=trainer)
    path = directory / "tokenizer.json"
    tokenizer.save(str(path))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return path


def run(script: str, args: list[str], cache: Path, extra_env: dict | None = None) -> dict:
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1", **(extra_env or {})}
    result = subprocess.run([sys.executable, "-c", PEAK_RSS + script, *args], capture_output=True, text=True, env=env)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def shards(directory: Path) -> list:
    import pyarrow.parquet as pq

    return [pq.read_table(path).column("input_ids").to_pylist() for path in sorted(directory.rglob("*.parquet"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10], help="corpus copies")
    parser.add_argument("--seq_len", type=int, default=2048)
    args = parser.parse_args()
    cores = os.cpu_count()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer = train_tokenizer(make_corpus(tmp, 1), tmp)
        # palm's native BPE encoder compiles on first use (about a second, once per machine): not timed
        from palm.kernels.bpe import FastBPE
        from tokenizers import Tokenizer

        assert FastBPE.from_tokenizer(Tokenizer.from_file(str(tokenizer))) is not None
        print(f"{cores} cores, seq_len {args.seq_len}, BPE vocab 8192\n")
        print("| corpus | MB | approach | tokens | s | tokens/s | peak RSS MiB |")
        print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
        for copies in args.sizes:
            corpus = make_corpus(tmp, copies)
            mb = corpus.stat().st_size / 1e6
            ours = [str(corpus), str(tokenizer.parent), str(args.seq_len)]
            rows = [
                ("seed: datasets.map + group_texts", SEED_APPROACH, [str(corpus), str(tokenizer), str(args.seq_len), str(cores)], None),
                ("palm build-dataset", OURS, [*ours, str(tmp / "out-a"), "0"], None),
                ("palm build-dataset --streaming", OURS, [*ours, str(tmp / "out-b"), "1"], None),
                ("palm build-dataset, tokenizers' own encoder", OURS, [*ours, str(tmp / "out-c"), "0"], {"PALM_NO_KERNELS": "1"}),
            ]
            for name, script, script_args, extra_env in rows:
                cache = Path(tempfile.mkdtemp(dir=tmp))
                r = run(script, script_args, cache, extra_env)
                print(f"| x{copies} | {mb:.0f} | {name} | {r['tokens']:,} | {r['seconds']:.1f} | "
                      f"{r['tokens'] / r['seconds']:,.0f} | {r['peak_rss'] / 2**20:,.0f} |", flush=True)
            same = all(shards(tmp / out) == shards(tmp / "out-c") for out in ("out-a", "out-b"))
            print(f"| x{copies} | | palm's native encoder and tokenizers' wrote {'identical' if same else 'DIFFERENT'} blocks | | | | |")
            for out in ("out-a", "out-b", "out-c"):
                shutil.rmtree(tmp / out, ignore_errors=True)


if __name__ == "__main__":
    main()
