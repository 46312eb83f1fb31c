import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from palm import PalmError, load_tokenizer
from palm.data.instructions import IGNORE, Record, read_records, split_records, stdlib_instructions, tokenize
from palm.data.loader import BatchLoader
from palm.prompts import get_prompt_style

ALPACA = get_prompt_style("alpaca")
BYTES = load_tokenizer("bytes")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_the_three_record_formats_become_conversations(tmp_path):
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add.", "input": "2 3", "output": "5"},
                                                {"instruction": "Greet.", "output": "Hi"}])
    chat = tmp_path / "c.json"
    chat.write_text(json.dumps([{"messages": [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
                                              {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}]}]))
    pq.write_table(pa.table({"prompt": ["p"], "completion": ["c"]}), tmp_path / "p.parquet")

    first, second = read_records(alpaca, style=ALPACA)
    assert first.messages == [{"role": "user", "content": "Add.\n\n### Input:\n2 3"}, {"role": "assistant", "content": "5"}]
    assert second.messages[0]["content"] == "Greet." and first.where.endswith("a.jsonl line 1")
    assert [m["content"] for m in read_records(str(chat), style=ALPACA)[0].messages] == ["u1", "a1", "u2", "a2"]
    assert read_records(str(tmp_path / "p.parquet"), style=ALPACA)[0].messages[1] == {"role": "assistant", "content": "c"}


def test_columns_map_other_field_names(tmp_path):
    flan = write_jsonl(tmp_path / "flan.jsonl", [{"inputs": "Is 7 prime?", "targets": "yes", "task": "math"}])
    record, = read_records(flan, columns={"instruction": "inputs", "output": "targets"}, style=get_prompt_style("flan"))
    assert record.messages == [{"role": "user", "content": "Is 7 prime?"}, {"role": "assistant", "content": "yes"}]


@pytest.mark.parametrize("rows, message", [
    ([{"instruction": "a", "output": "b"}, {"instruction": "c"}], r"bad.jsonl line 2: missing the field .output."),
    ([{"instruction": "a", "output": None}], r"bad.jsonl line 1: missing the field 'output'"),
    ([{"messages": [{"role": "bot", "content": "x"}]}], r"bad.jsonl line 1: message 1 has the unknown role 'bot'"),
    ([{"text": "plain"}], r"line 1: fields text match no format .*--columns"),
    ([{"prompt": "p", "completion": 5}], r"line 1: the field 'completion' must be a string"),
])
def test_bad_records_name_the_file_and_line(tmp_path, rows, message):
    with pytest.raises(PalmError, match=message):
        read_records(write_jsonl(tmp_path / "bad.jsonl", rows), style=ALPACA)


def test_broken_json_and_empty_files(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"prompt": "p", "completion": "c"}\n{"prompt": \n')
    with pytest.raises(PalmError, match=r"broken.jsonl line 2: not valid JSON"):
        read_records(str(tmp_path / "broken.jsonl"), style=ALPACA)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(PalmError, match="no records"):
        read_records(str(tmp_path / "empty.jsonl"), style=ALPACA)


def test_tokens_learned_are_the_reply_and_its_end_of_text():
    record = Record([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], "here")
    examples = tokenize([record], BYTES, ALPACA, seq_len=1000)
    prompt = ALPACA.render(record.messages[:1], generation=True)
    ids = examples.ids[0]
    assert ids.tolist() == list(prompt.encode()) + list(b"Yo") + [BYTES.eos_id]
    assert examples.learn[0].tolist() == [False] * len(prompt.encode()) + [True] * 3
    batch = examples[np.array([0])]
    # the labels are the next tokens, kept only where they are learned
    labels = batch["labels"][0].tolist()
    assert batch["input_ids"][0].tolist() == ids[:-1].tolist()
    assert labels == [IGNORE] * (len(prompt.encode()) - 1) + list(b"Yo") + [BYTES.eos_id]
    learn_all = tokenize([record], BYTES, ALPACA, seq_len=1000, learn_prompts=True)
    assert learn_all.learn[0].all()


def test_long_examples_are_cut_and_hopeless_ones_dropped():
    prompt_len = len(ALPACA.render([{"role": "user", "content": "x"}], generation=True).encode())
    fits = Record([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y" * 50}], "a")
    long_prompt = Record([{"role": "user", "content": "x" * 500}, {"role": "assistant", "content": "y"}], "b")
    examples = tokenize([fits, long_prompt], BYTES, ALPACA, seq_len=prompt_len + 10)
    assert (len(examples), examples.truncated, examples.dropped) == (1, 1, 1)  # a dropped example is not also counted as cut
    assert len(examples.ids[0]) == prompt_len + 10 and examples.learn[0][-10:].all()
    with pytest.raises(PalmError, match="no example fits --seq_len 8"):
        tokenize([long_prompt], BYTES, ALPACA, seq_len=8)


def test_padded_batches_keep_every_example_whole():
    records = [Record([{"role": "user", "content": "q" * n}, {"role": "assistant", "content": "a" * n}], str(n))
               for n in (1, 5, 9)]
    examples = tokenize(records, BYTES, ALPACA, seq_len=1000)
    batch = examples[np.array([2, 0])]
    assert batch["input_ids"].shape == (2, len(examples.ids[2]) - 1)
    short = len(examples.ids[0]) - 1
    assert (batch["input_ids"][1, short:] == 0).all() and (batch["labels"][1, short:] == IGNORE).all()


def test_length_buckets_cover_every_example_once_per_epoch_and_resume():
    lengths = np.random.default_rng(0).integers(10, 500, size=203)
    samples = type("Samples", (), {"__len__": lambda self: 203, "__getitem__": lambda self, i: np.asarray(i)})()
    loader = BatchLoader(samples, 4, seed=1, lengths=lengths, world_size=2, rank=0)
    other = BatchLoader(samples, 4, seed=1, lengths=lengths, world_size=2, rank=1)
    batches = [np.concatenate([next(loader), next(other)]) for _ in range(loader.batches_per_epoch)]
    seen = np.concatenate(batches)
    assert len(set(seen.tolist())) == len(seen) == 200  # 3 left over this epoch
    # within a global batch, lengths are close: far closer than random batches of the same data
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    assert spread < 0.2 * np.ptp(lengths)
    state = loader.state_dict()
    resumed = BatchLoader(samples, 4, seed=1, lengths=lengths, world_size=2, rank=0)
    resumed.load_state_dict(state)
    assert np.array_equal(next(resumed), next(loader))


def test_split_records_holds_out_a_fraction():
    records = [Record([], str(i)) for i in range(10)]
    train, val = split_records(records, 0.3, seed=0)
    assert len(val) == 3 and len(train) == 7 and not {r.where for r in train} & {r.where for r in val}
    with pytest.raises(PalmError, match="leaves an empty split"):
        split_records(records[:1], 0.3, seed=0)


def test_the_offline_instruction_set_asks_for_functions_it_answers():
    train, held = stdlib_instructions()
    assert len(train) > 500 and len(held) > 20
    for record in held[:20]:
        asked, answer = record.messages[0]["content"], record.messages[1]["content"]
        name = asked.split("`def ")[1].split("(")[0]
        assert "\n\nWrite this as the Python function `def " in asked and answer.startswith(f"def {name}(")
    assert not {r.where.split(":")[0] for r in train} & {r.where.split(":")[0] for r in held}
