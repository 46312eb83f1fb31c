"""Training data: windows of packed token blocks, shuffled per epoch, split across ranks, resumable.

Sources: a `palm build-dataset` directory, a Hub dataset of packed blocks (column `input_ids`,
like the seed's `conceptofmind/c4_0-to-20_neox_with_eos_8k`; streamed with `streaming=True`), or
raw text files tokenized and packed in memory for small experiments.

A training sample is a *window*: each stored block is cut into `len(block) // seq_len`
consecutive, non-overlapping windows of `seq_len` tokens. The model reads the window and is scored
on its `seq_len - 1` next-token predictions, as in the seed's training on 8192-token blocks.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from palm.data.documents import local_files, read_documents
from palm.data.packed import METADATA_NAME, Packer, token_dtype
from palm.errors import PalmError


@dataclass
class TokenData:
    """Packed blocks of one split, and what is known of their tokenizer."""

    blocks: object  # np.ndarray (n, block_len), a numpy-formatted datasets.Dataset, or a datasets.IterableDataset
    block_len: int
    vocab_size: int | None
    source: str

    @property
    def streaming(self) -> bool:
        return not hasattr(self.blocks, "__len__")

    @property
    def in_memory(self) -> bool:
        """Raw text packed here (as opposed to a stored dataset, which may have other splits)."""
        return isinstance(self.blocks, np.ndarray)


def open_data(
    source: str | list[Path], split: str = "train", *, tokenizer=None, seq_len: int | None = None,
    streaming: bool = False, encoding_errors: str = "strict",
) -> TokenData:
    """Open training data: a build-dataset directory, raw text files (a path, glob or list of
    paths, tokenized with `tokenizer` into blocks of `seq_len`), or a Hub dataset name."""
    if isinstance(source, str) and (Path(source) / METADATA_NAME).is_file():
        return _open_built(Path(source), split, streaming)
    files = source if isinstance(source, list) else local_files(source)
    if files is not None:
        if tokenizer is None or seq_len is None:
            raise PalmError(f"{source}: raw text needs a tokenizer and a seq_len")
        return _pack_in_memory(files, tokenizer, seq_len, encoding_errors)
    return _open_hub(source, split, streaming, tokenizer)


def _open_built(directory: Path, split: str, streaming: bool = False) -> TokenData:
    """A `palm build-dataset` split: memory-mapped (through datasets' Arrow cache), or read from
    its parquet shards as a stream with `streaming` (no copy in the cache)."""
    metadata = json.loads((directory / METADATA_NAME).read_text())
    if split not in metadata["splits"]:
        raise PalmError(f"{directory} has no {split!r} split (it has {', '.join(metadata['splits'])})")
    import datasets

    files = [str(directory / f) for f in metadata["splits"][split]["files"]]
    blocks = datasets.load_dataset("parquet", data_files=files, split="train", streaming=streaming)
    if not streaming:
        blocks = blocks.with_format("numpy")
    return TokenData(blocks, metadata["seq_len"], metadata["vocab_size"], str(directory))


def _pack_in_memory(files: list[Path], tokenizer, seq_len: int, encoding_errors: str) -> TokenData:
    packer = Packer(seq_len, token_dtype(tokenizer.vocab_size))
    rows = [packer.add(tokenizer.encode_documents(texts)[0]) for texts in read_documents(files, "text", encoding_errors)]
    blocks = np.concatenate(rows) if rows else np.empty((0, seq_len), dtype=packer.carry.dtype)
    if len(blocks) == 0:
        raise PalmError(f"{files[0] if len(files) == 1 else f'{len(files)} files'}: fewer tokens than one window of {seq_len}")
    return TokenData(blocks, seq_len, tokenizer.vocab_size, f"{len(files)} text files")


def _open_hub(name: str, split: str, streaming: bool, tokenizer) -> TokenData:
    import datasets

    try:
        blocks = datasets.load_dataset(name, split=split, streaming=streaming)
    except Exception as e:  # datasets raises many types for missing/unreachable repos
        raise PalmError(f"dataset {name!r} (split {split!r}): {str(e).splitlines()[0]}") from None
    columns = list(blocks.features or {})
    if "input_ids" not in columns:
        raise PalmError(f"dataset {name!r} has no input_ids column (it has {', '.join(columns)}); "
                        f"pack raw text with `palm build-dataset` first")
    blocks = blocks.select_columns(["input_ids"])
    first = next(iter(blocks))["input_ids"]
    if not streaming:
        blocks = blocks.with_format("numpy")
    return TokenData(blocks, len(first), tokenizer.vocab_size if tokenizer else None, name)


class Windows:
    """Random access to the `seq_len` windows of in-memory or memory-mapped blocks."""

    def __init__(self, data: TokenData, seq_len: int):
        if data.block_len < seq_len:
            raise PalmError(f"{data.source}: blocks of {data.block_len} tokens are shorter than --seq_len {seq_len}")
        self.blocks, self.seq_len = data.blocks, seq_len
        self.per_block = data.block_len // seq_len
        self.num_blocks = len(data.blocks)

    def __len__(self) -> int:
        return self.num_blocks * self.per_block

    def __getitem__(self, indices: np.ndarray) -> torch.Tensor:
        block_ids, window_ids = np.divmod(np.asarray(indices), self.per_block)
        unique, inverse = np.unique(block_ids, return_inverse=True)
        rows = self.blocks[unique]
        rows = rows["input_ids"] if isinstance(rows, dict) else rows
        rows = np.asarray(rows)[inverse]
        starts = window_ids * self.seq_len
        windows = rows[np.arange(len(rows))[:, None], starts[:, None] + np.arange(self.seq_len)]
        return torch.from_numpy(windows.astype(np.int64))


class BatchLoader:
    """Endless batches of samples (windows, or fine-tuning examples): anything with `len()` that
    gives a batch for an array of indices. Each epoch visits the samples in an order drawn from
    (seed, epoch); global batch t is positions [t*B*W, (t+1)*B*W) of that order (B = batch_size,
    W = world_size) and rank r takes every W-th of them from r, so ranks are disjoint and together
    see exactly what one process with batch B*W sees. The samples left over at the end of an
    epoch (fewer than B*W) are skipped that epoch. With `lengths`, each global batch holds samples
    of similar length (sorted within runs of BUCKET_BATCHES global batches, then the batches
    shuffled), so padding stays small. `state_dict()` is the exact position."""

    BUCKET_BATCHES = 64

    def __init__(self, samples, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, lengths: np.ndarray | None = None):
        self.samples, self.batch_size, self.seed, self.shuffle = samples, batch_size, seed, shuffle
        self.rank, self.world_size, self.lengths = rank, world_size, lengths
        self.batches_per_epoch = len(samples) // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            what = f"windows of {samples.seq_len} tokens" if isinstance(samples, Windows) else "examples"
            raise PalmError(
                f"the data has {len(samples)} {what}, fewer than one global batch "
                f"of {batch_size * world_size} (batch_size x processes); use more data or a smaller batch"
            )
        self.epoch, self.batch = 0, 0
        self._order_epoch, self._order = None, None

    def order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            n = len(self.samples)
            if not self.shuffle:
                order = np.arange(n)
            else:
                rng = np.random.default_rng([self.seed, epoch])
                order = rng.permutation(n)
                if self.lengths is not None:
                    order = self._bucketed(order, rng)
            self._order, self._order_epoch = order, epoch
        return self._order

    def _bucketed(self, order: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        global_batch = self.batch_size * self.world_size
        used = self.batches_per_epoch * global_batch
        run = global_batch * self.BUCKET_BATCHES
        head = order[:used]
        chunks = [head[i : i + run] for i in range(0, used, run)]
        batches = np.concatenate([c[np.argsort(self.lengths[c], kind="stable")] for c in chunks]).reshape(-1, global_batch)
        return np.concatenate([batches[rng.permutation(len(batches))].reshape(-1), order[used:]])

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        global_batch = self.batch_size * self.world_size
        start = self.batch * global_batch
        indices = self.order(self.epoch)[start : start + global_batch][self.rank :: self.world_size]
        self.batch += 1
        return self.samples[indices]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "world_size": self.world_size,
                "batch_size": self.batch_size, "num_windows": len(self.samples)}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "world_size", "batch_size", "num_windows"):
            if state[key] != self.state_dict()[key]:
                raise PalmError(f"cannot resume the data position: {key} was {state[key]}, now {self.state_dict()[key]}")
        self.epoch, self.batch = state["epoch"], state["batch"]


class StreamingLoader:
    """Batches of windows from a streamed dataset, read in stored order (the build shuffles
    documents); rank r of W reads its own part through `datasets.distributed.split_dataset_by_node`.
    Resumes exactly from `state_dict()` (the stream's own position plus the windows in hand)."""

    def __init__(self, data: TokenData, seq_len: int, batch_size: int, *, rank: int = 0, world_size: int = 1):
        from datasets.distributed import split_dataset_by_node

        if data.block_len < seq_len:
            raise PalmError(f"{data.source}: blocks of {data.block_len} tokens are shorter than --seq_len {seq_len}")
        self.stream = split_dataset_by_node(data.blocks, rank=rank, world_size=world_size)
        self.seq_len, self.batch_size, self.world_size = seq_len, batch_size, world_size
        self.epoch = 0
        self.pending: list[np.ndarray] = []
        self._iterator = None

    def _next_block(self) -> np.ndarray:
        for attempt in range(2):
            if self._iterator is None:
                self.stream.set_epoch(self.epoch)
                self._iterator = iter(self.stream)
            try:
                return np.asarray(next(self._iterator)["input_ids"])
            except StopIteration:
                self._iterator = None
                self.epoch += 1
        raise PalmError("the streamed dataset has no blocks for this process")

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        while len(self.pending) < self.batch_size:
            self.pending.extend(_cut_windows(self._next_block(), self.seq_len))
        batch, self.pending = self.pending[: self.batch_size], self.pending[self.batch_size :]
        return _stack(batch)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "stream": self.stream.state_dict(), "world_size": self.world_size,
                "pending": [w.tolist() for w in self.pending]}

    def load_state_dict(self, state: dict) -> None:
        if state["world_size"] != self.world_size:
            raise PalmError(f"cannot resume the data position: world_size was {state['world_size']}, now {self.world_size}")
        self.epoch = state["epoch"]
        self.stream.set_epoch(self.epoch)
        self.stream.load_state_dict(state["stream"])
        self._iterator = None
        self.pending = [np.asarray(w) for w in state["pending"]]


def make_loader(data: TokenData, seq_len: int, batch_size: int, *, seed: int = 0, rank: int = 0,
                world_size: int = 1) -> BatchLoader | StreamingLoader:
    """The training loader for `data`: shuffled per epoch when it allows random access, else streamed."""
    if data.streaming:
        return StreamingLoader(data, seq_len, batch_size, rank=rank, world_size=world_size)
    return BatchLoader(Windows(data, seq_len), batch_size, seed=seed, rank=rank, world_size=world_size)


def eval_batches(data: TokenData, seq_len: int, batch_size: int, max_windows: int | None = None, *,
                 rank: int = 0, world_size: int = 1) -> Iterator[torch.Tensor]:
    """The first `max_windows` windows (all if None) in order, rank r taking every W-th from r."""
    if data.streaming:
        from datasets.distributed import split_dataset_by_node

        stream = split_dataset_by_node(data.blocks, rank=rank, world_size=world_size)
        limit = None if max_windows is None else -(-max_windows // world_size)
        windows = (w for row in stream for w in _cut_windows(np.asarray(row["input_ids"]), seq_len))
        windows = itertools.islice(windows, limit)
        while batch := list(itertools.islice(windows, batch_size)):
            yield _stack(batch)
        return
    windows = Windows(data, seq_len)
    indices = np.arange(len(windows) if max_windows is None else min(max_windows, len(windows)))[rank::world_size]
    for start in range(0, len(indices), batch_size):
        yield windows[indices[start : start + batch_size]]


def _cut_windows(block: np.ndarray, seq_len: int) -> np.ndarray:
    """The consecutive `seq_len` windows of one block, (len(block) // seq_len, seq_len)."""
    return block[: len(block) // seq_len * seq_len].reshape(-1, seq_len)


def _stack(windows: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(windows).astype(np.int64))
