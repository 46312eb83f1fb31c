import collections
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import train_bpe
from palm import PalmError, load_tokenizer
from palm.cli import main
from palm.data.build import build_dataset
from palm.data.loader import BatchLoader, StreamingLoader, TokenData, Windows, eval_batches, make_loader, open_data
from palm.data.packed import METADATA_NAME, token_dtype

WORDS = "the of and to in a is that for it as was with be by on not he I this are or his from at which".split()


def make_documents(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        words = rng.choice(WORDS + ["Ünïcödé", "日本語", "fox"], size=int(rng.integers(1, 120)))
        docs.append(f"Doc {i}: " + " ".join(words) + ("\n" if i % 3 else ""))
    return docs


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    path = train_bpe(make_documents(300, seed=1), tmp_path_factory.mktemp("tok"))
    return load_tokenizer(str(path))


@pytest.fixture
def corpus(tmp_path):
    """Documents spread over a .jsonl, a .csv, a .parquet and .txt files, in the order a directory read gives."""
    import pandas as pd

    docs = make_documents(700)
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "a.jsonl", "w") as f:
        for d in docs[:300]:
            f.write(json.dumps({"text": d, "meta": 1}) + "\n")
    pd.DataFrame({"text": docs[300:450]}).to_csv(src / "b.csv", index=False)
    pd.DataFrame({"text": docs[450:690], "other": 0}).to_parquet(src / "c.parquet")
    for i, d in enumerate(docs[690:]):
        (src / f"d{i}.txt").write_text(d)
    return src, docs


def read_split(directory, split="train") -> np.ndarray:
    metadata = json.loads((directory / METADATA_NAME).read_text())
    return np.concatenate([pq.read_table(directory / f)["input_ids"].to_numpy(zero_copy_only=False).tolist()
                           for f in metadata["splits"][split]["files"]]).astype(np.int64)


def expected_stream(tokenizer, docs) -> list[int]:
    return [t for d in docs for t in tokenizer.encode(d) + [tokenizer.eos_id]]


def test_packed_stream_is_the_documents_in_order_minus_the_tail(bpe, corpus, tmp_path):
    src, docs = corpus
    out = tmp_path / "out"
    metadata = build_dataset(str(src), bpe, output=out, seq_len=64, progress=False)
    rows = read_split(out)
    expected = expected_stream(bpe, docs)
    split = metadata["splits"]["train"]
    assert rows.shape == (len(expected) // 64, 64)
    assert rows.reshape(-1).tolist() == expected[: rows.size]
    assert split["dropped_tail_tokens"] == len(expected) - rows.size < 64
    assert (split["blocks"], split["tokens"], split["documents"]) == (len(rows), rows.size, len(docs))
    assert metadata["vocab_size"] == bpe.vocab_size == 300 and metadata["eos_token_id"] == 0
    assert metadata["dtype"] == "uint16" and metadata["seq_len"] == 64 and metadata["seed"] is None
    assert pq.read_schema(out / split["files"][0]).field("input_ids").type.value_type == "uint16"


def test_hugging_face_datasets_reads_the_shards(bpe, corpus, tmp_path):
    import datasets

    build_dataset(str(corpus[0]), bpe, output=tmp_path / "out", seq_len=64, val_docs=50, progress=False)
    loaded = datasets.load_dataset(str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))
    assert set(loaded) == {"train", "validation"}
    assert np.array_equal(np.array(loaded["train"]["input_ids"]), read_split(tmp_path / "out"))


def split_documents(stream: list[int], eos: int):
    """Complete documents in a packed stream (each ending in EOS) and the unfinished rest."""
    docs, current = [], []
    for t in stream:
        current.append(t)
        if t == eos:
            docs.append(tuple(current))
            current = []
    return docs, current


def test_seeded_build_shuffles_whole_documents(bpe, corpus, tmp_path):
    src, docs = corpus
    outputs = {}
    for name, seed, streaming in (("a", 3, False), ("b", 3, False), ("c", 4, False), ("s", 3, True)):
        build_dataset(str(src), bpe, output=tmp_path / name, seq_len=64, seed=seed, streaming=streaming, progress=False)
        outputs[name] = read_split(tmp_path / name).reshape(-1).tolist()
    assert outputs["a"] == outputs["b"] != outputs["c"]  # reproducible, and the seed matters
    expected = collections.Counter(tuple(bpe.encode(d) + [0]) for d in docs)
    for name in "acs":
        found, rest = split_documents(outputs[name], eos=0)
        missing = expected - collections.Counter(found)
        assert collections.Counter(found) + missing == expected  # nothing invented
        assert len(missing) <= 2 and sum(map(len, missing)) < 64 + len(rest) + max(map(len, expected))
        assert any(doc[: len(rest)] == tuple(rest) for doc in missing)
        assert [d for d in found[:5]] != [tuple(bpe.encode(d) + [0]) for d in docs[:5]]


def test_validation_split(bpe, corpus, tmp_path):
    src, docs = corpus
    metadata = build_dataset(str(src), bpe, output=tmp_path / "v", seq_len=32, val_docs=100, progress=False)
    assert metadata["splits"]["validation"]["documents"] == 100
    assert metadata["splits"]["train"]["documents"] == len(docs) - 100
    val = read_split(tmp_path / "v", "validation").reshape(-1).tolist()
    assert val == expected_stream(bpe, docs[:100])[: len(val)]
    train = read_split(tmp_path / "v").reshape(-1).tolist()
    assert train == expected_stream(bpe, docs[100:])[: len(train)]

    metadata = build_dataset(str(src), bpe, output=tmp_path / "f", seq_len=32, val_fraction=0.2, seed=0, progress=False)
    counts = {k: s["documents"] for k, s in metadata["splits"].items()}
    assert counts["train"] + counts["validation"] == len(docs) and 90 < counts["validation"] < 190


def test_worker_processes_give_the_same_output(bpe, corpus, tmp_path):
    build_dataset(str(corpus[0]), bpe, output=tmp_path / "one", seq_len=64, progress=False)
    build_dataset(str(corpus[0]), bpe, output=tmp_path / "two", seq_len=64, num_proc=2, progress=False)
    assert np.array_equal(read_split(tmp_path / "one"), read_split(tmp_path / "two"))


def test_byte_tokenizer_and_dtypes(tmp_path):
    (tmp_path / "a.txt").write_text("héllo wörld\n" * 40)
    bytes_tok = load_tokenizer("bytes")
    build_dataset(str(tmp_path / "a.txt"), bytes_tok, output=tmp_path / "o", seq_len=16, progress=False)
    rows = read_split(tmp_path / "o")
    assert rows.reshape(-1).tolist() == (list(("héllo wörld\n" * 40).encode()) + [256])[: rows.size]
    assert [token_dtype(v) for v in (256, 257, 50304, 65536, 65537)] == [np.uint8, np.uint16, np.uint16, np.uint16, np.uint32]


def test_bad_input_is_one_clear_error(bpe, corpus, tmp_path, capsys):
    src, _ = corpus
    with pytest.raises(PalmError, match=r"no column 'body'.*text, meta"):
        build_dataset(str(src / "a.jsonl"), bpe, output=tmp_path / "x", text_column="body", progress=False)
    with pytest.raises(PalmError, match=r"no column 'body'; its columns are text, other"):
        build_dataset(str(src / "c.parquet"), bpe, output=tmp_path / "x", text_column="body", progress=False)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(PalmError, match="empty"):
        build_dataset(str(tmp_path / "empty.jsonl"), bpe, output=tmp_path / "x", progress=False)
    with pytest.raises(PalmError, match="fewer than one block of --seq_len 100000"):
        build_dataset(str(src / "b.csv"), bpe, output=tmp_path / "x", seq_len=100_000, progress=False)
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait")
    with pytest.raises(PalmError, match=r"bad.txt: not valid UTF-8 at byte 3; pass --encoding_errors replace"):
        build_dataset(str(tmp_path / "bad.txt"), bpe, output=tmp_path / "x", seq_len=4, progress=False)
    build_dataset(str(tmp_path / "bad.txt"), load_tokenizer("bytes"), output=tmp_path / "x", seq_len=4,
                  encoding_errors="replace", progress=False)
    assert read_split(tmp_path / "x").reshape(-1).tolist()[:6] == list("caf\ufffd".encode())[:6]
    assert not list(tmp_path.glob(".*partial*"))  # failed builds cleaned up after themselves

    # CLI: one line on stderr, exit 1
    for argv in (["--dataset_name", str(src), "--tokenizer", str(tmp_path / "nope.json"), "--output", str(tmp_path / "y")],
                 ["--dataset_name", str(tmp_path / "missing.jsonl"), "--tokenizer", "bytes", "--output", str(tmp_path / "y")]):
        assert main(["build-dataset", *argv]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("palm build-dataset: error:")


def test_existing_output_is_kept_until_a_new_build_completes(bpe, corpus, tmp_path, monkeypatch):
    src, _ = corpus
    out = tmp_path / "out"
    build_dataset(str(src), bpe, output=out, seq_len=64, progress=False)
    before = read_split(out)
    with pytest.raises(PalmError, match="already holds a dataset; pass --overwrite"):
        build_dataset(str(src), bpe, output=out, seq_len=32, progress=False)

    calls = 0
    encode = bpe.encode_documents

    def failing(texts):  # the build dies midway
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt
        return encode(texts)

    monkeypatch.setattr(bpe, "encode_documents", failing)
    monkeypatch.setattr("palm.data.documents.DOCS_PER_BATCH", 100)
    with pytest.raises(KeyboardInterrupt):
        build_dataset(str(src), bpe, output=out, seq_len=32, overwrite=True, progress=False)
    monkeypatch.undo()
    assert np.array_equal(read_split(out), before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]

    build_dataset(str(src), bpe, output=out, seq_len=32, overwrite=True, progress=False)
    assert read_split(out).shape[1] == 32


# --- the training loader ------------------------------------------------------------------------


def blocks(n: int, block_len: int) -> TokenData:
    return TokenData(np.arange(n * block_len, dtype=np.uint16).reshape(n, block_len), block_len, 65536, "test")


def test_windows_cut_blocks():
    windows = Windows(blocks(3, 10), seq_len=4)  # 2 windows per block, 2 tokens of each block unused
    assert len(windows) == 6
    assert windows[np.array([3, 0])].tolist() == [[14, 15, 16, 17], [0, 1, 2, 3]]


def test_loader_resumes_exactly_across_epochs():
    data = blocks(10, 8)
    run = BatchLoader(Windows(data, 4), batch_size=3, seed=7)  # 20 windows -> 6 batches per epoch
    straight = [next(run) for _ in range(15)]
    first = BatchLoader(Windows(data, 4), batch_size=3, seed=7)
    for _ in range(8):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # survives serialization
    resumed = BatchLoader(Windows(data, 4), batch_size=3, seed=7)
    resumed.load_state_dict(state)
    assert all(a.equal(b) for a, b in zip(straight[8:], [next(resumed) for _ in range(7)]))
    epoch0 = {tuple(w) for b in straight[:6] for w in b.tolist()}
    assert len(epoch0) == 18  # no window twice within an epoch
    assert not all(a.equal(b) for a, b in zip(straight[:6], straight[6:12]))  # reshuffled each epoch
    with pytest.raises(PalmError, match="world_size was 1, now 2"):
        BatchLoader(Windows(data, 4), batch_size=3, seed=7, world_size=2).load_state_dict(state)


def test_ranks_are_disjoint_and_match_one_process():
    data = blocks(13, 8)  # 26 windows of 4
    world, batch = 3, 2
    ranks = [BatchLoader(Windows(data, 4), batch, seed=1, rank=r, world_size=world) for r in range(world)]
    single = BatchLoader(Windows(data, 4), batch * world, seed=1)
    assert single.batches_per_epoch == ranks[0].batches_per_epoch == 4
    seen = []
    for _ in range(4):
        per_rank = [set(map(tuple, next(r).tolist())) for r in ranks]
        assert set.union(*per_rank) == set(map(tuple, next(single).tolist()))
        assert sum(map(len, per_rank)) == world * batch
        seen += [w for s in per_rank for w in s]
    assert len(set(seen)) == 24  # disjoint, and cover all but the 26 % 6 = 2 left over this epoch


def test_too_little_data_for_a_batch():
    with pytest.raises(PalmError, match="fewer than one global batch of 8"):
        BatchLoader(Windows(blocks(1, 16), 4), batch_size=4, world_size=2)


def write_blocks(path, array):
    import pyarrow as pa

    column = pa.ListArray.from_arrays(pa.array(np.arange(0, array.size + 1, array.shape[1], dtype=np.int32)),
                                      pa.array(array.reshape(-1)))
    pq.write_table(pa.table({"input_ids": column}), path, row_group_size=3)


def test_streaming_loader_resumes_exactly(tmp_path):
    import datasets

    array = np.arange(20 * 8, dtype=np.uint16).reshape(20, 8)
    write_blocks(tmp_path / "blocks.parquet", array)

    def loader(rank=0, world=1):
        stream = datasets.load_dataset("parquet", data_files=str(tmp_path / "blocks.parquet"), split="train", streaming=True)
        data = TokenData(stream, 8, None, "stream")
        return make_loader(data, seq_len=3, batch_size=4, rank=rank, world_size=world)

    straight = loader()
    assert isinstance(straight, StreamingLoader)
    batches = [next(straight) for _ in range(14)]  # 2 windows per block: 40 per epoch, 10 batches
    assert batches[0].tolist()[:2] == [[0, 1, 2], [3, 4, 5]]
    assert batches[10].equal(batches[0])  # next epoch starts over
    first = loader()
    for _ in range(5):
        next(first)
    resumed = loader()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert all(a.equal(b) for a, b in zip(batches[5:], [next(resumed) for _ in range(9)]))

    stream = datasets.load_dataset("parquet", data_files=str(tmp_path / "blocks.parquet"), split="train", streaming=True)
    evaluated = list(eval_batches(TokenData(stream, 8, None, "stream"), seq_len=3, batch_size=3, max_windows=7))
    assert [len(b) for b in evaluated] == [3, 3, 1]
    assert torch.cat(evaluated).tolist() == [[0, 1, 2], [3, 4, 5], [8, 9, 10], [11, 12, 13], [16, 17, 18],
                                             [19, 20, 21], [24, 25, 26]]  # 2 windows per 8-token block

    parts = [loader(r, 2) for r in range(2)]
    rows = [set(map(tuple, np.concatenate([next(p).numpy() for _ in range(5)]).tolist())) for p in parts]
    assert not rows[0] & rows[1] and len(rows[0] | rows[1]) == 40


def test_open_data_sources(bpe, corpus, tmp_path):
    src, docs = corpus
    build_dataset(str(src), bpe, output=tmp_path / "built", seq_len=64, val_docs=100, progress=False)
    data = open_data(str(tmp_path / "built"))
    assert data.vocab_size == 300 and data.block_len == 64
    val = open_data(str(tmp_path / "built"), "validation")
    stream = read_split(tmp_path / "built", "validation")
    got = np.concatenate([b.numpy() for b in eval_batches(val, 32, batch_size=5)])
    assert np.array_equal(got, stream.reshape(-1, 32))  # two windows of 32 per block, in order
    with pytest.raises(PalmError, match="no 'test' split"):
        open_data(str(tmp_path / "built"), "test")

    raw = open_data(str(src / "a.jsonl"), tokenizer=bpe, seq_len=50)
    expected = expected_stream(bpe, docs[:300])
    assert raw.blocks.reshape(-1).tolist() == expected[: raw.blocks.size] and raw.blocks.shape[1] == 50


def test_push_to_the_hub_uploads_the_finished_dataset(bpe, corpus, tmp_path, monkeypatch):
    """The Hub is not reachable in tests: HfApi is replaced by a recorder of what would be sent."""
    import huggingface_hub

    sent = {}

    def create_repo(self, repo_id, repo_type=None, exist_ok=False, **kwargs):
        sent["repo"] = (repo_id, repo_type, exist_ok)

    def upload_folder(self, folder_path, repo_id, repo_type=None, **kwargs):
        folder = Path(folder_path)
        sent["files"] = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        sent["metadata"] = json.loads((folder / METADATA_NAME).read_text())

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    build_dataset(str(corpus[0]), bpe, push_to="me/packed", seq_len=64, val_docs=10, progress=False)
    assert sent["repo"] == ("me/packed", "dataset", True)
    assert sent["files"] == ["README.md", "data/train-00000-of-00001.parquet",
                             "data/validation-00000-of-00001.parquet", METADATA_NAME]
    assert sent["metadata"]["splits"]["validation"]["documents"] == 10

    def refuse(self, *args, **kwargs):
        raise PermissionError("401 Unauthorized")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refuse)
    with pytest.raises(PalmError, match=r"could not upload to the Hugging Face Hub repo me/packed \(401 Unauthorized\).*saved in"):
        build_dataset(str(corpus[0]), bpe, push_to="me/packed", output=tmp_path / "kept", seq_len=64, progress=False)
    assert (tmp_path / "kept" / METADATA_NAME).is_file()  # built locally, only the upload failed
