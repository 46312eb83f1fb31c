"""`build_dataset`: pack a text corpus into token blocks for training (`palm build-dataset`).

A built dataset is a directory of parquet shards with one `input_ids` column, each row exactly
`seq_len` tokens, made by tokenizing every document, appending the tokenizer's end-of-text id,
concatenating and cutting; `palm_dataset.json` describes it and is written last.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from palm.checks import check_at_least, check_seq_len, require_eos
from palm.data.documents import hub_documents, local_files, read_documents, shuffle_documents
from palm.data.packed import METADATA_NAME, Packer, token_dtype
from palm.errors import PalmError
from palm.files import check_output_directory

SPLITS = ("train", "validation")
SHARD_TOKENS = 1 << 27  # about 256 MB of uint16 per parquet shard
ROW_GROUP_TOKENS = 1 << 20


class ShardWriter:
    """Writes rows of one split to parquet shards `data/{split}-00000-of-0000N.parquet`."""

    def __init__(self, directory: Path, split: str, seq_len: int, dtype: np.dtype):
        import pyarrow as pa

        self.directory, self.split, self.seq_len = directory / "data", split, seq_len
        self.directory.mkdir(parents=True, exist_ok=True)
        self.schema = pa.schema([("input_ids", pa.list_(pa.from_numpy_dtype(dtype)))])
        self.rows_per_shard = max(1, SHARD_TOKENS // seq_len)
        self.rows_per_group = max(1, ROW_GROUP_TOKENS // seq_len)
        self.paths: list[Path] = []
        self.pending: list[np.ndarray] = []
        self.writer = None
        self.rows_in_shard = 0
        self.rows = 0

    def write(self, rows: np.ndarray) -> None:
        if len(rows):
            self.pending.append(rows)
            if sum(len(r) for r in self.pending) >= self.rows_per_group:
                self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = np.concatenate(self.pending) if self.pending else np.empty((0, self.seq_len))
        self.pending = []
        while len(rows):
            if self.writer is None:
                self.paths.append(self.directory / f"{self.split}-{len(self.paths):05d}.parquet")
                self.writer = pq.ParquetWriter(self.paths[-1], self.schema, compression="zstd")
            take = min(len(rows), self.rows_per_shard - self.rows_in_shard)
            chunk, rows = rows[:take], rows[take:]
            # from_buffers rather than pa.array(ndarray): the latter imports pandas (~0.4 s) to rule it out
            offsets = np.arange(0, (take + 1) * self.seq_len, self.seq_len, dtype=np.int32)
            values = np.ascontiguousarray(chunk).reshape(-1)
            list_type = self.schema.field(0).type
            ids = pa.Array.from_buffers(list_type.value_type, len(values), [None, pa.py_buffer(values)])
            column = pa.ListArray.from_buffers(list_type, take, [None, pa.py_buffer(offsets)], children=[ids])
            self.writer.write_table(pa.Table.from_arrays([column], schema=self.schema))
            self.rows_in_shard += take
            self.rows += take
            if self.rows_in_shard == self.rows_per_shard:
                self.writer.close()
                self.writer, self.rows_in_shard = None, 0

    def close(self) -> list[str]:
        """Finish the last shard and give shards their final `-of-N` names; returns relative paths."""
        self._flush()
        if self.writer is not None:
            self.writer.close()
        names = []
        for i, path in enumerate(self.paths):
            final = path.with_name(f"{self.split}-{i:05d}-of-{len(self.paths):05d}.parquet")
            path.rename(final)
            names.append(f"data/{final.name}")
        return names


@dataclass
class SplitStats:
    documents: int = 0
    tokens: int = 0  # tokens written (blocks x seq_len)
    blocks: int = 0
    dropped_tail_tokens: int = 0
    files: list[str] = field(default_factory=list)


def build_dataset(
    dataset_name: str,
    tokenizer,
    *,
    output: str | os.PathLike | None = None,
    push_to: str | None = None,
    seq_len: int = 8192,
    seed: int | None = None,
    text_column: str = "text",
    split: str = "train",
    val_docs: int = 0,
    val_fraction: float = 0.0,
    streaming: bool = False,
    num_proc: int | None = None,
    encoding_errors: str = "strict",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenize a corpus, append EOS to each document, pack into `seq_len` blocks and write parquet.

    Returns the metadata written to `palm_dataset.json`. The build happens in a temporary
    directory beside `output` that replaces it only once complete, so an interrupted or failed
    build leaves what was there before untouched.
    """
    check_seq_len(seq_len)
    if val_docs and val_fraction:
        raise PalmError("give --val_docs or --val_fraction, not both")
    if not 0 <= val_fraction < 1:
        raise PalmError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    if output is None and push_to is None:
        raise PalmError("give --output DIR and/or --push_to REPO")
    require_eos(tokenizer)
    output = Path(output) if output is not None else None
    if output is not None:
        check_output_directory(output, flag="--output", marker=METADATA_NAME, what="a dataset", overwrite=overwrite,
                               inputs=[dataset_name])
        _check_writable(output)
    check_at_least("--val_docs", val_docs, 0)

    files = local_files(dataset_name)
    if files is not None:
        documents = read_documents(files, text_column, encoding_errors)
        if seed is not None:
            documents = shuffle_documents(documents, seed, 10_000 if streaming else None)
    else:
        documents = hub_documents(dataset_name, split, text_column, streaming, seed)

    dtype = token_dtype(tokenizer.vocab_size)
    parent = output.parent if output is not None else Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name if output else 'dataset'}.partial-", dir=parent))
    try:
        stats = _pack_splits(documents, tokenizer, work, seq_len, dtype, seed, val_docs, val_fraction, num_proc, progress)
        metadata = {
            "format": "palm-packed-v1",
            "tool": f"palm {_version()}",
            "source": dataset_name,
            "text_column": text_column,
            "source_split": split if files is None else None,
            "seed": seed,
            "streaming": streaming,
            "tokenizer": tokenizer.name,
            "vocab_size": tokenizer.vocab_size,
            "eos_token_id": tokenizer.eos_id,
            "seq_len": seq_len,
            "dtype": dtype.name,
            "splits": {name: vars(s) for name, s in stats.items() if s.blocks},
        }
        (work / "README.md").write_text(_dataset_card(metadata))
        (work / METADATA_NAME).write_text(json.dumps(metadata, indent=2) + "\n")  # last: marks it complete
        if output is not None:
            _replace_directory(work, output)
        if push_to is not None:
            from palm.hub import upload_folder

            try:
                upload_folder(output or work, push_to, repo_type="dataset")
            except PalmError as e:
                raise PalmError(f"{e}; the dataset is saved in {output}" if output else str(e)) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return metadata


def _pack_splits(documents, tokenizer, work, seq_len, dtype, seed, val_docs, val_fraction, num_proc, progress):
    stats = {name: SplitStats() for name in SPLITS}
    packers = {name: Packer(seq_len, dtype) for name in SPLITS}
    writers = {name: ShardWriter(work, name, seq_len, dtype) for name in SPLITS}
    choose = np.random.default_rng(0 if seed is None else seed)
    bar = _progress_bar(progress)
    start = time.perf_counter()
    for tokens, lengths in _tokenized(documents, tokenizer, num_proc):
        # Split documents between train and validation, keeping their order within each split.
        if val_fraction:
            is_val = choose.random(len(lengths)) < val_fraction
        else:
            seen = stats["train"].documents + stats["validation"].documents
            is_val = np.arange(seen, seen + len(lengths)) < val_docs
        ends = np.cumsum(lengths)
        starts = ends - lengths
        for name, mask in (("validation", is_val), ("train", ~is_val)):
            if mask.any():
                pieces = tokens if mask.all() else np.concatenate([tokens[s:e] for s, e in zip(starts[mask], ends[mask])])
                rows = packers[name].add(pieces)
                writers[name].write(rows)
                stats[name].documents += int(mask.sum())
                stats[name].blocks += len(rows)
        if bar is not None:
            bar.update(len(lengths))
            total_tokens = sum(s.blocks for s in stats.values()) * seq_len
            bar.set_postfix_str(f"{total_tokens / (time.perf_counter() - start):,.0f} tok/s")
    if bar is not None:
        bar.close()

    if stats["train"].documents + stats["validation"].documents == 0:
        raise PalmError("the corpus is empty: no non-empty documents")
    if not stats["train"].documents:
        held = f"--val_docs {val_docs}" if val_docs else f"--val_fraction {val_fraction}"
        raise PalmError(f"{held} holds out all {stats['validation'].documents:,} documents: none are left to train on")
    for name in SPLITS:
        s = stats[name]
        s.files = writers[name].close()
        s.tokens = s.blocks * seq_len
        s.dropped_tail_tokens = packers[name].tail
        if s.documents and not s.blocks:
            have = packers[name].tail
            raise PalmError(
                f"the {name} split has {have:,} tokens, fewer than one block of --seq_len {seq_len}; "
                + ("use more data or a smaller --seq_len" if name == "train" else "hold out more documents")
            )
    return stats


def _tokenized(documents: Iterable[list[str]], tokenizer, num_proc: int | None):
    """(flat tokens with EOS after each document, per-document lengths) per batch, in order.

    With `num_proc` > 1 batches are tokenized in that many worker processes; otherwise in this
    process (Hugging Face tokenizers already spread a batch over all cores)."""
    if not num_proc or num_proc <= 1:
        yield from map(tokenizer.encode_documents, documents)
        return
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with context.Pool(num_proc, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        yield from pool.imap(_encode_in_worker, documents)


_worker_tokenizer = None


def _init_worker(tokenizer) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = tokenizer


def _encode_in_worker(texts: list[str]):
    return _worker_tokenizer.encode_documents(texts)


def _progress_bar(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(unit=" docs", desc="build-dataset", file=sys.stderr, dynamic_ncols=True)


def _check_writable(output: Path) -> None:
    probe = output if output.exists() else output.parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise PalmError(f"{output}: permission denied")


def _replace_directory(new: Path, target: Path) -> None:
    """Move `new` to `target`; an existing `target` is removed only after the move succeeded."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old)


def _dataset_card(metadata: dict) -> str:
    configs = "\n".join(
        f"  - split: {name}\n    path: data/{name}-*.parquet" for name in metadata["splits"]
    )
    lines = [f"{k}: {v}" for k, v in metadata.items() if k != "splits"]
    counts = [f"{name}: {s['blocks']:,} blocks, {s['tokens']:,} tokens, {s['documents']:,} documents"
              for name, s in metadata["splits"].items()]
    return (
        f"---\nconfigs:\n- config_name: default\n  data_files:\n{configs}\n---\n\n"
        f"# Packed token blocks\n\nBuilt by `palm build-dataset`. Each row of `input_ids` holds exactly "
        f"{metadata['seq_len']} tokens: documents tokenized, each followed by the end-of-text id "
        f"{metadata['eos_token_id']}, concatenated and cut.\n\n"
        + "\n".join(f"- {line}" for line in lines + counts) + "\n"
    )


def _version() -> str:
    from palm import __version__

    return __version__
