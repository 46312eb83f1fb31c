"""palm's native byte-level BPE encoder against Hugging Face tokenizers, which it must match id for id."""

import json
import random
import warnings

import numpy as np
import pytest

import palm.kernels.bpe as bpe
from conftest import CORPUS, train_bpe
from palm.kernels.bpe import FastBPE, unicode_classes

# Pieces that exercise the GPT-2 split pattern: contractions (the pattern's are lower case only),
# every kind of whitespace run, letters and numbers of many scripts, symbols, and the added tokens
# of the GPT-NeoX-like tokenizer below (runs of spaces, <|endoftext|>).
ATOMS = [
    "'s", "'S", "'ll", "'re", "'ve", "'m", "'d", "'t", "'x", "'", "''", " '", "don't", "I'm", " ", "  ", "   ",
    " " * 5, " " * 9, " " * 30, "\t", "\n", "\n\n", "\r\n", "\x0b", "\x0c", "\x85", "\xa0", "\u2003", "\u3000",
    "\u2028", "\u2029", "\u1680", "\x1c", "\x1f", "\u200b", "\ufeff", "hello", "World", "é", "ñ", "Å", "가", "日本語",
    "😀", "👍🏽", "1", "42", "3.14", "٣", "Ⅻ", "½", "x²", "$", "!!", "...", "—", "“quoted”", "<|endoftext|>",
    "<|endoftext", "<pad>", "हिन्दी", "Ελληνικά", "Русский", "عربى", "\ue000", "def f(x):\n    return x", "ﬁ", "Ａ",
    "\u00ad", "\x00", "\x7f",
]
# Characters the encoder leaves to the tokenizer: unassigned in Python's Unicode tables, and (for
# a tokenizer that normalizes to NFC) ones NFC could change: combining marks, jamo, singletons.
HANDED_BACK = ["\u0378", "\U000e0080", "e\u0301", "\u0301", "\u212b", "\u1100\u1161", "क़", "a\u0300\u0316"]


def documents(seed: int, atoms: list[str], count: int = 400) -> list[str]:
    rng = random.Random(seed)
    classes = unicode_classes()
    certain = [c for c in range(0x3000) if classes[c] < bpe.UNSURE] + [c for c in range(0x3000, 0x110000, 37) if classes[c] < bpe.UNSURE]
    docs = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(1, 50)):
            r = rng.random()
            if r < 0.8:
                parts.append(rng.choice(atoms))
            elif r < 0.9:
                parts.append(chr(rng.choice(certain)))
            else:
                parts.append(rng.choice(" \t\n") * rng.randint(1, 40))
        docs.append("".join(parts))
    return docs


@pytest.fixture(scope="module")
def plain_bpe(tmp_path_factory):
    """A byte-level BPE like GPT-2's: no normalizer, <|endoftext|> and <pad> special."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(train_bpe([CORPUS, *documents(0, ATOMS)], tmp_path_factory.mktemp("plain"), vocab_size=600)))


@pytest.fixture(scope="module")
def neox_like_bpe(plain_bpe):
    """GPT-NeoX's structure: NFC normalizer, and runs of 2-24 spaces as added tokens matched after
    normalization, besides the special tokens matched before it."""
    from tokenizers import AddedToken, Tokenizer, normalizers

    tokenizer = Tokenizer.from_str(plain_bpe.to_str())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.add_tokens([AddedToken(" " * n, normalized=True) for n in range(24, 1, -1)])
    return tokenizer


def reference(tokenizer, docs: list[str], eos: int) -> list[int]:
    return [i for e in tokenizer.encode_batch_fast(docs, add_special_tokens=False) for i in [*e.ids, eos]]


@pytest.mark.parametrize("name", ["plain_bpe", "neox_like_bpe"])
def test_same_ids_as_tokenizers(name, request):
    tokenizer = request.getfixturevalue(name)
    fast = FastBPE.from_tokenizer(tokenizer)
    assert fast is not None
    for seed in (1, 2):
        docs = documents(seed, ATOMS) + [CORPUS]
        tokens, lengths = fast.encode_documents(docs, eos_id=0)
        assert tokens.tolist() == reference(tokenizer, docs, 0)
        expected_lengths = [len(e.ids) + 1 for e in tokenizer.encode_batch_fast(docs, add_special_tokens=False)]
        assert lengths.tolist() == expected_lengths
    # the added tokens were really in play
    assert tokenizer.token_to_id("<|endoftext|>") in tokens
    if name == "neox_like_bpe":
        assert tokenizer.token_to_id(" " * 9) in tokens


@pytest.mark.parametrize("name", ["plain_bpe", "neox_like_bpe"])
def test_characters_it_cannot_classify_go_to_the_tokenizer_in_place(name, request):
    tokenizer = request.getfixturevalue(name)
    fast = FastBPE.from_tokenizer(tokenizer)
    docs = documents(3, ATOMS + HANDED_BACK)
    tokens, lengths = fast.encode_documents(docs, eos_id=1)
    assert tokens.tolist() == reference(tokenizer, docs, 1)
    assert lengths.sum() == len(tokens)
    # and some documents did take that path
    single = [fast._encode(fast._encoders[0], [d.encode()], np.array([len(d.encode())]), 0, 1, 1)[1][0] for d in docs]
    assert sum(n < 0 for n in single) > 10


def test_letter_number_and_space_classes_match_the_regex_engine(neox_like_bpe):
    """Each assigned code point below U+3000 and every 37th above, in contexts where its class decides the split."""
    fast = FastBPE.from_tokenizer(neox_like_bpe)
    classes = unicode_classes()
    points = [c for c in [*range(0x3000), *range(0x3000, 0x110000, 37)] if classes[c] < bpe.UNSURE and not classes[c] & bpe.NFC_SENSITIVE]
    docs = ["".join(f"a{c}a 1{c}1 !{c}! {c}{c}x  {c} {c}\n" for c in map(chr, points[i:i + 100])) for i in range(0, len(points), 100)]
    tokens, lengths = fast.encode_documents(docs, eos_id=0)
    assert (lengths > 0).all()
    assert tokens.tolist() == reference(neox_like_bpe, docs, 0)


def test_threads_split_a_large_batch_without_changing_it(plain_bpe, monkeypatch):
    docs = documents(4, ATOMS, count=2000) + [CORPUS] * 20
    assert sum(len(d.encode()) for d in docs) > 2 * bpe.MIN_BYTES_PER_THREAD
    fast = FastBPE.from_tokenizer(plain_bpe)
    monkeypatch.setattr(fast, "_threads", 3)
    fast._encoders += [fast._new_encoder() for _ in range(2)]
    assert len(fast._chunks(np.array([len(d.encode()) for d in docs]))) == 3
    tokens, _ = fast.encode_documents(docs, eos_id=0)
    assert tokens.tolist() == reference(plain_bpe, docs, 0)


def test_tokenizers_it_cannot_reproduce_are_declined(plain_bpe):
    from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers

    def variant(change):
        config = json.loads(plain_bpe.to_str())
        change(config)
        return Tokenizer.from_str(json.dumps(config))

    declined = [
        variant(lambda c: c["model"].update(dropout=0.1)),
        variant(lambda c: c.update(pre_tokenizer=json.loads(pre_tokenizers.Whitespace().__getstate__()))),
        variant(lambda c: c.update(pre_tokenizer={"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True})),
        variant(lambda c: c.update(normalizer=json.loads(normalizers.Lowercase().__getstate__()))),
    ]
    stripped = Tokenizer.from_str(plain_bpe.to_str())
    stripped.add_tokens([AddedToken("<x>", lstrip=True)])
    literal_specials = Tokenizer.from_str(plain_bpe.to_str())
    literal_specials.encode_special_tokens = True
    for tokenizer in [*declined, stripped, literal_specials]:
        assert FastBPE.from_tokenizer(tokenizer) is None


def test_no_compiler_falls_back_to_tokenizers(plain_bpe, tmp_path, monkeypatch):
    from palm.tokenizer import HFTokenizer

    monkeypatch.setenv("PALM_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    bpe._load_library.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tokenizer = HFTokenizer(plain_bpe, "plain", eos_id=0)
            tokens, _ = tokenizer.encode_documents([CORPUS, "hello world"])
        assert tokenizer._fast is None
        assert any("native BPE encoder unavailable" in str(w.message) for w in caught)
        assert tokens.tolist() == reference(plain_bpe, [CORPUS, "hello world"], 0)
    finally:
        bpe._load_library.cache_clear()
