import json

import pytest

from conftest import train_bpe
from palm import PalmError, load_tokenizer

TEXT = "The quick brown fox jumps over the lazy dog. Ünïcödé ✓ 日本語\n"


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory):
    return train_bpe([TEXT * 20, "hello world " * 50], tmp_path_factory.mktemp("tok"))


def test_bytes_round_trip():
    tokenizer = load_tokenizer("bytes")
    ids = tokenizer.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8"))
    assert tokenizer.decode(ids + [tokenizer.eos_id]) == TEXT
    assert (tokenizer.vocab_size, tokenizer.eos_id) == (257, 256)


def test_local_tokenizer_json(bpe_file):
    tokenizer = load_tokenizer(str(bpe_file))
    ids = tokenizer.encode(TEXT)
    assert tokenizer.decode(ids) == TEXT
    assert len(ids) < len(TEXT.encode("utf-8"))  # it merged something
    assert tokenizer.eos_id == 0  # <|endoftext|> is the first special token
    assert tokenizer.vocab_size == 300
    assert tokenizer.encode_batch([TEXT, "hello"]) == [ids, tokenizer.encode("hello")]
    assert load_tokenizer(str(bpe_file.parent)).eos_id == 0  # a directory holding tokenizer.json


def test_eos_from_tokenizer_config_or_argument(bpe_file, tmp_path):
    (tmp_path / "tokenizer.json").write_text(bpe_file.read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<pad>"}}))
    assert load_tokenizer(str(tmp_path)).eos_id == 1
    assert load_tokenizer(str(bpe_file), eos_token="<pad>").eos_id == 1
    with pytest.raises(PalmError, match="'<eos>' is not in its vocabulary"):
        load_tokenizer(str(bpe_file), eos_token="<eos>")


def test_bad_tokenizers(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(PalmError, match="is not a tokenizer.json file"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))
    with pytest.raises(PalmError, match="no such file"):
        load_tokenizer("./missing-tokenizer.json")
    with pytest.raises(PalmError, match="could not get tokenizer.json from the Hugging Face Hub repo EleutherAI/gpt-neox-20b"):
        load_tokenizer()  # the default, offline in tests
