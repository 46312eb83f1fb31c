"""The packed-blocks format that `palm build-dataset` writes and the training loader reads: rows
of exactly `seq_len` token ids in the smallest integer type that holds the vocabulary, described by
`palm_dataset.json`."""

from __future__ import annotations

import numpy as np

METADATA_NAME = "palm_dataset.json"


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
