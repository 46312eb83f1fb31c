"""A native encoder for byte-level BPE tokenizers (GPT-2, GPT-NeoX and their kind) that gives
exactly the ids of Hugging Face `tokenizers`, several times faster, for building datasets.

`FastBPE.from_tokenizer` returns None for a tokenizer it cannot reproduce (another pre-tokenizer
or normalizer, BPE dropout, strip options on added tokens, ...), or where bpe.cpp cannot be built
(no C++ compiler, PALM_NO_KERNELS=1; see `palm.kernels`); callers then use the tokenizer
itself. Documents holding a character the encoder cannot classify exactly (see bpe.cpp) are
encoded by the tokenizer too.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import inspect
import json
import os
import unicodedata
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from palm.files import write_atomically
from palm.kernels import cache_dir, load_library

OTHER, LETTER, NUMBER, SPACE, UNSURE = range(5)
NFC_SENSITIVE = 0x80
MIN_BYTES_PER_THREAD = 1 << 16
NEVER_IN_UTF8 = {0xC0, 0xC1, *range(0xF5, 0x100)}


class FastBPE:
    """Encodes documents as `tokenizers.Tokenizer.encode_batch_fast(texts, add_special_tokens=False)` does."""

    def __init__(self, tokenizer, library: ctypes.CDLL, spec: dict):
        self._tokenizer = tokenizer
        self._library = library
        self._classes = unicode_classes()  # the encoders keep a pointer to it
        self._spec = spec
        self._threads = max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
        self._encoders = [self._new_encoder() for _ in range(self._threads)]
        self._pool = ThreadPoolExecutor(self._threads) if self._threads > 1 else None

    @classmethod
    def from_tokenizer(cls, tokenizer) -> FastBPE | None:
        """A fast encoder equivalent to `tokenizer` (a `tokenizers.Tokenizer`), or None."""
        if getattr(tokenizer, "encode_special_tokens", False):  # special tokens in text left as text
            return None
        spec = _spec(json.loads(tokenizer.to_str()))
        if spec is None:
            return None
        library = _load_library()
        return None if library is None else cls(tokenizer, library, spec)

    def encode_documents(self, texts: list[str], eos_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Ids of each text followed by `eos_id`, concatenated (int32), and each document's length."""
        encoded = [t.encode("utf-8", "surrogatepass") for t in texts]
        sizes = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        chunks = self._chunks(sizes)
        if self._pool is None or len(chunks) == 1:
            results = [self._encode(self._encoders[0], encoded, sizes, *chunks[0], eos_id)]
        else:
            results = list(self._pool.map(lambda c: self._encode(self._encoders[c[0]], encoded, sizes, *c[1], eos_id),
                                          enumerate(chunks)))
        tokens = np.concatenate([r[0] for r in results])
        lengths = np.concatenate([r[1] for r in results])
        left_over = np.flatnonzero(lengths < 0)
        if len(left_over):
            tokens, lengths = self._splice(texts, tokens, lengths, left_over, eos_id)
        return tokens, lengths

    def _chunks(self, sizes: np.ndarray) -> list[tuple[int, int]]:
        """Contiguous document ranges of about equal bytes, one per thread."""
        parts = int(min(self._threads, max(1, sizes.sum() // MIN_BYTES_PER_THREAD), len(sizes)))
        if parts <= 1:
            return [(0, len(sizes))]
        cuts = np.searchsorted(np.cumsum(sizes), sizes.sum() * np.arange(1, parts) / parts)
        bounds = [0, *sorted(set(int(c) for c in cuts if 0 < c < len(sizes))), len(sizes)]
        return list(zip(bounds[:-1], bounds[1:]))

    def _encode(self, encoder, encoded: list[bytes], sizes: np.ndarray, begin: int, end: int, eos_id: int):
        data = b"".join(encoded[begin:end])
        offsets = np.zeros(end - begin + 1, dtype=np.int64)
        np.cumsum(sizes[begin:end], out=offsets[1:])
        out = np.empty(len(data) + (end - begin), dtype=np.int32)
        lengths = np.empty(end - begin, dtype=np.int64)
        total = self._library.palm_bpe_encode_batch(encoder, data, _ptr(offsets), end - begin, eos_id, _ptr(out), _ptr(lengths))
        return out[:total], lengths

    def _splice(self, texts, tokens, lengths, left_over, eos_id):
        """Fill in the documents the native encoder left to the tokenizer."""
        fallback = self._tokenizer.encode_batch_fast([texts[i] for i in left_over], add_special_tokens=False)
        pieces, start = [], 0
        replacement = dict(zip(left_over.tolist(), (e.ids for e in fallback)))
        eos = np.array([eos_id], dtype=np.int32)
        for d, length in enumerate(lengths.tolist()):
            if length >= 0:
                pieces.append(tokens[start:start + length])
                start += length
            else:
                pieces += [np.asarray(replacement[d], dtype=np.int32), eos]
                lengths[d] = len(replacement[d]) + 1
        return np.concatenate(pieces), lengths

    def _new_encoder(self) -> ctypes.c_void_p:
        s = self._spec
        (raw_texts, raw_ends, raw_ids), (norm_texts, norm_ends, norm_ids) = map(_added_arrays, (s["raw_added"], s["normalized_added"]))
        handle = self._library.palm_bpe_new(  # copies everything but the class table
            _ptr(self._classes), int(s["nfc"]), _ptr(s["byte_ids"]), _ptr(s["merges"]), len(s["merges"]),
            raw_texts, _ptr(raw_ends), _ptr(raw_ids), len(raw_ids), norm_texts, _ptr(norm_ends), _ptr(norm_ids), len(norm_ids))
        return ctypes.c_void_p(handle)

    def __del__(self):
        for encoder in getattr(self, "_encoders", []):
            self._library.palm_bpe_free(encoder)
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=False)


def _ptr(array: np.ndarray) -> ctypes.c_void_p:
    return array.ctypes.data_as(ctypes.c_void_p)


def _added_arrays(tokens: list[tuple[str, int]]) -> tuple[bytes, np.ndarray, np.ndarray]:
    """Added tokens' contents concatenated as UTF-8, each one's end offset, and their ids."""
    texts = [t.encode("utf-8") for t, _ in tokens]
    ends = np.cumsum([len(t) for t in texts], dtype=np.int64)
    return b"".join(texts), ends, np.array([i for _, i in tokens], dtype=np.int32)


def _spec(config: dict) -> dict | None:
    """What the native encoder needs from a tokenizer.json, or None if it cannot reproduce it."""
    model, pre, normalizer = config.get("model") or {}, config.get("pre_tokenizer") or {}, config.get("normalizer")
    if config.get("truncation") or config.get("padding"):
        return None
    if model.get("type") != "BPE" or model.get("dropout") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix") or model.get("byte_fallback") or model.get("ignore_merges"):
        return None
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        return None
    if normalizer is not None and normalizer.get("type") != "NFC":
        return None
    vocab = model["vocab"]
    # every byte that UTF-8 text can hold needs a symbol (GPT-NeoX's vocabulary lacks 0xC0, 0xC1, 0xF5-0xFF)
    byte_ids = [vocab.get(symbol, -1) for symbol in byte_symbols()]
    if any(i < 0 for b, i in enumerate(byte_ids) if b not in NEVER_IN_UTF8):
        return None
    merges = []
    for merge in model["merges"]:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        ids = (vocab.get(left), vocab.get(right), vocab.get(left + right))
        if None in ids:
            return None  # tokenizers refuses such a file anyway
        merges.append(ids)
    raw_added, normalized_added = [], []
    for token in config.get("added_tokens", []):
        if token.get("single_word") or token.get("lstrip") or token.get("rstrip"):
            return None
        (normalized_added if token.get("normalized") else raw_added).append((token["content"], token["id"]))
    return {
        "nfc": normalizer is not None,
        "byte_ids": np.array(byte_ids, dtype=np.int32),
        "merges": np.array(merges, dtype=np.int32).reshape(-1, 3),
        "raw_added": raw_added,
        "normalized_added": normalized_added,
    }


@functools.cache
def byte_symbols() -> list[str]:
    """The byte-level alphabet: the character that stands for each byte (GPT-2's mapping)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


@functools.cache
def unicode_classes() -> np.ndarray:
    """Per code point: its class in the GPT-2 split pattern (letter, number, whitespace as the regex
    engine of `tokenizers` defines \\s, other; UNSURE where Python's Unicode tables leave it unassigned)
    plus NFC_SENSITIVE where NFC could change text holding it. Cached on disk (a second to build)."""
    # keyed by the Unicode version and this function's own code, so an edit to it is never masked
    code = inspect.getsource(unicode_classes) + repr((OTHER, LETTER, NUMBER, SPACE, UNSURE, NFC_SENSITIVE))
    path = cache_dir() / f"unicode-classes-{unicodedata.unidata_version}-{hashlib.sha256(code.encode()).hexdigest()[:12]}.npy"
    try:
        return np.load(path)
    except (OSError, ValueError):
        pass
    classes = np.zeros(0x110000, dtype=np.uint8)
    second_elements = set(range(0x1161, 0x1176)) | set(range(0x11A8, 0x11C3))  # Hangul V and T jamo
    kind = {"L": LETTER, "N": NUMBER}
    for cp in range(0x110000):
        ch = chr(cp)
        category = unicodedata.category(ch)
        if category in ("Cn", "Cs"):
            classes[cp] = UNSURE
        elif category in ("Zs", "Zl", "Zp") or 0x09 <= cp <= 0x0D or cp == 0x85:
            classes[cp] = SPACE
        else:
            classes[cp] = kind.get(category[0], OTHER)
        decomposition = unicodedata.decomposition(ch)
        if decomposition and not decomposition.startswith("<"):
            parts = decomposition.split()
            if len(parts) == 2:
                second_elements.add(int(parts[1], 16))
        if unicodedata.combining(ch) or (category != "Cs" and unicodedata.normalize("NFC", ch) != ch):
            classes[cp] |= NFC_SENSITIVE
    classes[sorted(second_elements)] |= NFC_SENSITIVE
    try:
        write_atomically(path, lambda tmp: _save_array(tmp, classes))
    except OSError:
        pass  # a cache that cannot be written costs a second next time, nothing more
    return classes


def _save_array(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # through a file object: np.save would append ".npy" to the name
        np.save(f, array)


@functools.cache
def _load_library() -> ctypes.CDLL | None:
    """The compiled encoder (about a second to build), or None: the tokenizer's own is used then."""
    library = load_library("bpe.cpp", ["-O2", "-std=c++17"], "native BPE encoder", "using the tokenizer's own")
    if library is None:
        return None
    library.palm_bpe_new.restype = ctypes.c_void_p
    library.palm_bpe_new.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                     ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                     ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    library.palm_bpe_free.argtypes = [ctypes.c_void_p]
    library.palm_bpe_encode_batch.restype = ctypes.c_int64
    library.palm_bpe_encode_batch.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int64,
                                              ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p]
    return library
