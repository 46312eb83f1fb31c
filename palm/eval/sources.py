"""What `palm eval` reads: documents (built datasets, local files, Hub datasets, or the standard
library files the main job held out) and the settings of the run that wrote a model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from palm.data.documents import held_out, hub_documents, local_files, read_documents, stdlib_files
from palm.data.packed import METADATA_NAME
from palm.errors import PalmError
from palm.eval.perplexity import Document

DEFAULT_TOKENIZER = "bytes"  # `palm train`'s default


@dataclass
class RunSettings:
    """What the run that wrote a model says about it (its `config.yaml`), where it can be found."""

    tokenizer: str | None = None
    seq_len: int | None = None
    source: Path | None = None


def run_settings(checkpoint: str) -> RunSettings:
    """The tokenizer and training length in the `config.yaml` of the run whose model `checkpoint`
    is (`runs/x/model` or `runs/x/checkpoints/step-N/model`); empty for anything else."""
    path = Path(checkpoint)
    if not path.is_dir():
        return RunSettings()
    for run_dir in (path.parent, path.parent.parent.parent):
        config = run_dir / "config.yaml"
        if config.is_file():
            import yaml

            try:
                values = yaml.safe_load(config.read_text()) or {}
            except yaml.YAMLError:
                continue
            if isinstance(values, dict) and "seq_len" in values:
                seq_len = values.get("seq_len")
                return RunSettings(values.get("tokenizer"), int(seq_len) if seq_len else None, config)
    return RunSettings()


def default_tokenizer(checkpoint: str, data: str | None, settings: RunSettings) -> str:
    """The tokenizer to use when none is named: the built dataset's, the run's, a tokenizer.json
    beside the weights, else `palm train`'s default."""
    if data is not None and (Path(data) / METADATA_NAME).is_file():
        return json.loads((Path(data) / METADATA_NAME).read_text())["tokenizer"]
    if settings.tokenizer:
        return settings.tokenizer
    if (Path(checkpoint) / "tokenizer.json").is_file():
        return str(Path(checkpoint) / "tokenizer.json")
    return DEFAULT_TOKENIZER


def open_documents(
    data: str | None, tokenizer, *, split: str = "validation", text_column: str = "text",
    max_documents: int | None = None,
) -> tuple[Iterator[Document], str]:
    """(documents, a description of them). `data` None: the standard library files that the main
    job held out. A build-dataset directory: its `split`, cut back into documents at EOS. Local
    files: each .txt (or other) file one document, rows of .jsonl/.json/.csv/.parquet one each.
    Anything else: a Hub dataset's `split`."""
    if data is None:
        files = held_out(stdlib_files())[1]
        texts, where = _texts(read_documents(files)), f"{len(files)} held-out standard library files"
    elif (Path(data) / METADATA_NAME).is_file():
        return _limit(_built_documents(Path(data), split, tokenizer), max_documents), f"{data} ({split} split)"
    elif (files := local_files(data)) is not None:
        texts, where = _texts(read_documents(files, text_column)), f"{data} ({len(files)} files)"
    else:
        texts, where = _texts(hub_documents(data, split, text_column, streaming=False, seed=None)), f"{data} ({split} split)"
    documents = (Document(tokenizer.encode(text), len(text.encode("utf-8"))) for text in texts)
    return _limit(documents, max_documents), where


def _texts(batches) -> Iterator[str]:
    for batch in batches:
        yield from batch


def _limit(documents: Iterator[Document], count: int | None) -> Iterator[Document]:
    for i, document in enumerate(documents):
        if count is not None and i >= count:
            return
        yield document


def _built_documents(directory: Path, split: str, tokenizer) -> Iterator[Document]:
    """The documents of a built split: its blocks joined back into one stream and cut at EOS (the
    first document whole, the last as far as the dropped tail left it)."""
    metadata = json.loads((directory / METADATA_NAME).read_text())
    if split not in metadata["splits"]:
        raise PalmError(f"{directory} has no {split!r} split (it has {', '.join(metadata['splits'])})")
    if metadata.get("vocab_size") and metadata["vocab_size"] != tokenizer.vocab_size:
        raise PalmError(f"{directory} was tokenized with {metadata['tokenizer']} ({metadata['vocab_size']:,} tokens), "
                        f"not {tokenizer.name} ({tokenizer.vocab_size:,})")
    import pyarrow.parquet as pq

    eos = metadata["eos_token_id"]
    carry = np.empty(0, dtype=np.int64)
    for name in metadata["splits"][split]["files"]:
        for batch in pq.ParquetFile(directory / name).iter_batches(columns=["input_ids"]):
            stream = np.concatenate([carry, np.concatenate(batch.column(0).to_numpy(zero_copy_only=False))])
            ends = np.flatnonzero(stream == eos)
            start = 0
            for end in ends:
                yield _document(stream[start:end].tolist(), tokenizer)
                start = end + 1
            carry = stream[start:]
    if len(carry):
        yield _document(carry.tolist(), tokenizer)


def _document(ids: list[int], tokenizer) -> Document:
    return Document(ids, len(tokenizer.decode(ids).encode("utf-8")))


def token_stream(documents: Iterator[Document], eos_id: int, max_tokens: int) -> torch.Tensor:
    """The first `max_tokens` tokens of the documents laid end to end, each followed by EOS, as
    the training data was packed."""
    pieces, total = [], 0
    for document in documents:
        pieces.append(torch.tensor([*document.ids, eos_id], dtype=torch.long))
        total += len(pieces[-1])
        if total >= max_tokens:
            break
    if not pieces:
        raise PalmError("no tokens to evaluate: the data holds no non-empty documents")
    return torch.cat(pieces)[:max_tokens]
