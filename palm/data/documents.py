"""Where documents come from: local text/JSON/CSV/parquet files, Hugging Face datasets, and the
Python standard library's own source (the offline default corpus), read in batches with flat memory."""

from __future__ import annotations

import csv
import glob
import json
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from palm.errors import PalmError
from palm.hub import check_exists_or_remote

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".csv")
DOCS_PER_BATCH = 1000
BATCH_CHARS = 1 << 20


def stdlib_files() -> list[Path]:
    """The Python standard library's own .py source (tests and site-packages left out): a corpus
    that exists offline on every machine that runs palm."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
    if not files:
        raise PalmError(f"found no Python sources under {root}; pass --data")
    return files


def held_out(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(training files, validation files): every 20th file is held out, the same split everywhere."""
    return [f for i, f in enumerate(files) if i % 20], files[::20]


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
    check_exists_or_remote(spec)
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
