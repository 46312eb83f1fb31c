"""`build_dataset`: pack a text corpus into token blocks for training (`palm build-dataset`).

A built dataset is a directory of parquet shards with one `input_ids` column, each row exactly
`seq_len` tokens, made by tokenizing every document, appending the tokenizer's end-of-text id,
concatenating and cutting; `palm_dataset.json` describes it and is written last.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from palm.errors import PalmError

METADATA_NAME = "palm_dataset.json"
TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".csv")
SPLITS = ("train", "validation")
DOCS_PER_BATCH = 1000
BATCH_CHARS = 1 << 20
SHARD_TOKENS = 1 << 27  # about 256 MB of uint16 per parquet shard
ROW_GROUP_TOKENS = 1 << 20


# ---------------------------------------------------------------------------------------------
# Reading documents


def local_files(spec: str) -> list[Path] | None:
    """The text files `spec` names (a file, a directory, or a glob), or None if it names nothing local."""
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise PalmError(f"{spec} holds no {'/'.join(TEXT_SUFFIXES)} files")
        return files
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not files:
            raise PalmError(f"no files match {spec}")
        return files
    if spec.startswith((".", "/", "~")) or Path(spec).suffix in TEXT_SUFFIXES:
        raise PalmError(f"{spec}: no such file or directory")
    return None


def read_documents(
    files: list[Path], text_column: str = "text", encoding_errors: str = "strict"
) -> Iterator[list[str]]:
    """Documents from local files in order, in batches (see `batched`).

    A `.txt` file (or any file of another type) is one document; `.jsonl`/`.json`/`.csv`/`.parquet`
    rows are documents, read from `text_column`. Files are streamed, so memory does not grow with
    the corpus.
    """
    documents = (text for path in files for text in _documents_in(path, text_column, encoding_errors))
    return batched(text for text in documents if text)


def batched(documents: Iterable[str]) -> Iterator[list[str]]:
    """Lists of up to DOCS_PER_BATCH documents and about BATCH_CHARS characters: large enough for
    the tokenizer's threads, small enough that memory stays flat whatever the document sizes."""
    batch: list[str] = []
    chars = 0
    for document in documents:
        batch.append(document)
        chars += len(document)
        if len(batch) == DOCS_PER_BATCH or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _documents_in(path: Path, text_column: str, errors: str) -> Iterator[str]:
    suffix = path.suffix
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            parquet = pq.ParquetFile(path)
            _check_column(path, text_column, parquet.schema_arrow.names)
            for batch in parquet.iter_batches(columns=[text_column], batch_size=DOCS_PER_BATCH):
                yield from (t for t in batch.column(0).to_pylist() if t is not None)
        elif suffix in (".jsonl", ".json"):
            yield from _json_documents(path, text_column, errors)
        elif suffix == ".csv":
            with open(path, encoding="utf-8", errors=errors, newline="") as f:
                reader = csv.DictReader(f)
                _check_column(path, text_column, reader.fieldnames or [])
                yield from (row[text_column] for row in reader if row[text_column])
        else:  # .txt, or any other file named explicitly (source code, ...): one document
            yield path.read_bytes().decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise PalmError(
            f"{path}: not valid UTF-8 at byte {e.start}; pass --encoding_errors replace to substitute U+FFFD"
        ) from None


def _json_documents(path: Path, text_column: str, errors: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors=errors) as f:
        first = f.read(1)
        while first.isspace():
            first = f.read(1)
        f.seek(0)
        if first == "[":  # one JSON array of records
            rows = json.load(f)
        else:  # JSON lines
            rows = (json.loads(line) for line in f if line.strip())
        for number, row in enumerate(rows, 1):
            if not isinstance(row, dict):
                raise PalmError(f"{path}: record {number} is a {type(row).__name__}, not an object with a {text_column!r} field")
            _check_column(f"{path} record {number}", text_column, list(row))
            if row[text_column]:
                yield row[text_column]


def _check_column(where: Path | str, column: str, columns: list[str]) -> None:
    if column not in columns:
        raise PalmError(f"{where} has no column {column!r}; its columns are {', '.join(columns)} (use --text_column)")


def hub_documents(name: str, split: str, text_column: str, streaming: bool, seed: int | None) -> Iterator[list[str]]:
    """Documents of a Hugging Face dataset; shuffled with `seed` (a buffer of 10k when streaming)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split, streaming=streaming)
    except Exception as e:  # datasets raises many types for missing/unreachable repos
        raise PalmError(f"dataset {name!r} (split {split!r}): {str(e).splitlines()[0]}") from None
    columns = list(ds.features) if ds.features else []
    if columns and text_column not in columns:
        raise PalmError(f"dataset {name!r} has no column {text_column!r}; its columns are {', '.join(columns)}")
    if seed is not None:
        ds = ds.shuffle(seed=seed, buffer_size=10_000) if streaming else ds.shuffle(seed=seed)
    batches = ds.select_columns([text_column]).iter(batch_size=DOCS_PER_BATCH)
    yield from batched(t for batch in batches for t in batch[text_column] if t)


def shuffle_documents(batches: Iterable[list[str]], seed: int, buffer_size: int | None) -> Iterator[list[str]]:
    """Shuffle documents: all of them (buffer_size None, holds the corpus in memory) or through a
    buffer of `buffer_size` documents (streaming: constant memory, approximate shuffle)."""
    rng = np.random.default_rng(seed)
    if buffer_size is None:
        documents = [d for batch in batches for d in batch]
        yield from batched(documents[i] for i in rng.permutation(len(documents)))
        return
    yield from batched(_buffer_shuffle((d for batch in batches for d in batch), rng, buffer_size))


def _buffer_shuffle(documents: Iterable[str], rng: np.random.Generator, buffer_size: int) -> Iterator[str]:
    buffer: list[str] = []
    for document in documents:
        if len(buffer) < buffer_size:
            buffer.append(document)
            continue
        i = int(rng.integers(buffer_size))
        yield buffer[i]
        buffer[i] = document
    rng.shuffle(buffer)
    yield from buffer


# ---------------------------------------------------------------------------------------------
# Packing and writing


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every id below `vocab_size`."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


class Packer:
    """Concatenates token arrays and cuts them into rows of exactly `seq_len`; the remainder
    carries over to the next call, so only the final partial row (`tail`) is ever dropped."""

    def __init__(self, seq_len: int, dtype: np.dtype):
        self.seq_len = seq_len
        self.carry = np.empty(0, dtype=dtype)

    def add(self, tokens: np.ndarray) -> np.ndarray:
        stream = np.concatenate([self.carry, tokens.astype(self.carry.dtype, copy=False)])
        n_rows = len(stream) // self.seq_len
        self.carry = stream[n_rows * self.seq_len :].copy()
        return stream[: n_rows * self.seq_len].reshape(n_rows, self.seq_len)

    @property
    def tail(self) -> int:
        return len(self.carry)


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
    if seq_len < 2:
        raise PalmError(f"--seq_len must be at least 2, got {seq_len}")
    if val_docs and val_fraction:
        raise PalmError("give --val_docs or --val_fraction, not both")
    if not 0 <= val_fraction < 1:
        raise PalmError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    if output is None and push_to is None:
        raise PalmError("give --output DIR and/or --push_to REPO")
    if tokenizer.eos_id is None:
        raise PalmError(f"tokenizer {tokenizer.name} has no end-of-text token; name one with --eos_token")
    output = Path(output) if output is not None else None
    if output is not None:
        _check_output(output, overwrite)

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


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise PalmError(f"{output} is a file; --output must be a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        what = "a dataset" if (output / METADATA_NAME).exists() else "files"
        raise PalmError(f"{output} already holds {what}; pass --overwrite to replace it")
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
