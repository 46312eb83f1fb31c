"""Tokenizers: any Hugging Face `tokenizer.json` (local or on the Hub) and a built-in byte tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from palm.checks import require_eos
from palm.errors import PalmError
from palm.hub import check_exists_or_remote, hub_download

DEFAULT_TOKENIZER = "EleutherAI/gpt-neox-20b"
# Special tokens taken as end-of-text when no tokenizer_config.json names one.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "[EOS]", "<|end_of_text|>")


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, and 256 as end-of-text. Needs no file and no download."""

    name = "bytes"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def encode_documents(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Ids of each text followed by EOS, concatenated, and each document's length (EOS included)."""
        encoded = [t.encode("utf-8") for t in texts]
        tokens = np.frombuffer(b"\0".join(encoded) + b"\0", dtype=np.uint8).astype(np.int32)
        lengths = np.fromiter((len(e) + 1 for e in encoded), dtype=np.int64, count=len(encoded))
        tokens[np.cumsum(lengths) - 1] = self.eos_id
        return tokens, lengths

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


_UNSET = object()


class HFTokenizer:
    """A `tokenizers.Tokenizer` (the format of `tokenizer.json`) with its end-of-text id."""

    def __init__(self, tokenizer, name: str, eos_id: int | None):
        self._tokenizer = tokenizer
        self.name = name
        self.eos_id = eos_id
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self._fast = _UNSET  # palm.kernels.bpe.FastBPE or None, made on first use

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def encode_documents(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Ids of each text followed by EOS, concatenated, and each document's length (EOS included).

        Byte-level BPE tokenizers (GPT-2, GPT-NeoX, ...) go through palm's native encoder, which
        gives the same ids several times faster (palm/kernels/bpe.py); others through `tokenizers`."""
        require_eos(self)
        if self._fast is _UNSET:
            from palm.kernels.bpe import FastBPE

            self._fast = FastBPE.from_tokenizer(self._tokenizer)
        if self._fast is not None:
            return self._fast.encode_documents(texts, self.eos_id)
        ids = [e.ids for e in self._tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
        lengths = np.fromiter((len(i) + 1 for i in ids), dtype=np.int64, count=len(ids))
        tokens = np.empty(int(lengths.sum()), dtype=np.int32)
        ends = np.cumsum(lengths)
        for document, end in zip(ids, ends):
            tokens[end - len(document) - 1 : end - 1] = document
        tokens[ends - 1] = self.eos_id
        return tokens, lengths

    def __getstate__(self):  # picklable, for worker processes
        return {"json": self._tokenizer.to_str(), "name": self.name, "eos_id": self.eos_id}

    def __setstate__(self, state):
        from tokenizers import Tokenizer as RustTokenizer

        self.__init__(RustTokenizer.from_str(state["json"]), state["name"], state["eos_id"])

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)


Tokenizer = ByteTokenizer | HFTokenizer


class TextStreamer:
    """Turns token ids into text as they arrive, holding back an incomplete UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.printed = 0

    def push(self, token: int) -> str:
        """The text that `token` completes (empty while a multi-byte character is cut in half)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character cut in half; wait for the rest
            return ""
        new, self.printed = text[self.printed:], len(text)
        return new


def load_tokenizer(name_or_path: str = DEFAULT_TOKENIZER, *, eos_token: str | None = None) -> Tokenizer:
    """`"bytes"`, a local `tokenizer.json` (or a directory holding one), or a Hub repo that has one.

    The end-of-text token is `eos_token` when given, else the one `tokenizer_config.json` beside
    the file names, else the first of the usual special tokens (`<|endoftext|>`, `</s>`, ...).
    """
    if name_or_path == "bytes":
        return ByteTokenizer()
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "tokenizer.json"
        if not path.is_file():
            raise PalmError(f"{name_or_path} has no tokenizer.json")
    if path.is_file():
        config_path = path.with_name("tokenizer_config.json")
        return _from_file(path, str(name_or_path), config_path if config_path.is_file() else None, eos_token)
    check_exists_or_remote(str(name_or_path))
    if "/" not in str(name_or_path):
        raise PalmError(f"tokenizer {name_or_path!r}: no such file, and not a Hub repo id or 'bytes'")
    tokenizer_path = hub_download(str(name_or_path), "tokenizer.json")
    try:
        config_path = hub_download(str(name_or_path), "tokenizer_config.json")
    except PalmError:
        config_path = None  # optional: many repos have none
    return _from_file(tokenizer_path, str(name_or_path), config_path, eos_token)


def _from_file(path: Path, name: str, config_path: Path | None, eos_token: str | None) -> HFTokenizer:
    from tokenizers import Tokenizer as RustTokenizer

    try:
        tokenizer = RustTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise PalmError(f"{path} is not a tokenizer.json file ({str(e).splitlines()[0]})") from None

    if eos_token is None and config_path is not None:
        try:
            configured = json.loads(config_path.read_text()).get("eos_token")
        except (OSError, json.JSONDecodeError, AttributeError):
            configured = None
        eos_token = configured.get("content") if isinstance(configured, dict) else configured
    if eos_token is not None:
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise PalmError(f"tokenizer {name}: end-of-text token {eos_token!r} is not in its vocabulary")
    else:
        eos_id = next((i for t in EOS_CANDIDATES if (i := tokenizer.token_to_id(t)) is not None), None)
    return HFTokenizer(tokenizer, name, eos_id)
