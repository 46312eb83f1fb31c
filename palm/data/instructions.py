"""Instruction and chat data for fine-tuning: records from local files or the Hub, turned into
conversations, rendered by a prompt style and tokenized with a mask of the tokens to learn.

Record formats (the first record decides; `columns` maps other field names onto these):
- Alpaca: `instruction`, optional `input`, `output`;
- chat: `messages`, a list of `{role, content}` (system, user, assistant; several turns);
- prompt/completion: `prompt`, `completion`.

The default data set needs no download: instructions made from the Python standard library's own
functions (the first paragraph of a function's docstring, then "Write this as the Python function
`def name(signature)`."), the function's source as the response, every 20th file held out as in
`palm train`'s default run.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from palm.checks import require_eos
from palm.data.documents import held_out, local_files, stdlib_files
from palm.errors import PalmError
from palm.prompts import PromptStyle, check_messages

FORMATS = {
    "alpaca": ("instruction", "output"),
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
}
IGNORE = -100  # label of a token the loss skips


@dataclass
class Record:
    """One example as a conversation, and where it came from (for error messages)."""

    messages: list[dict]
    where: str


def read_records(source: str, *, split: str = "train", columns: dict[str, str] | None = None,
                 style: PromptStyle) -> list[Record]:
    """The records of local .json/.jsonl/.parquet files (a file, directory or glob) or of a Hub
    dataset's `split`, as conversations."""
    rows = _local_rows(source) if local_files(source) is not None else _hub_rows(source, split)
    records = []
    layout = None
    for where, row in rows:
        if columns:
            row = {ours: row.get(theirs) for ours, theirs in columns.items()} | {
                k: v for k, v in row.items() if k not in columns.values()}
        layout = layout or _record_format(row, where)
        records.append(Record(_to_messages(row, layout, where, style), where))
    if not records:
        raise PalmError(f"{source}: no records")
    return records


def _local_rows(source: str) -> Iterator[tuple[str, dict]]:
    for path in local_files(source):
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            for number, row in enumerate(pq.read_table(path).to_pylist(), 1):
                yield f"{path} row {number}", row
        elif path.suffix in (".json", ".jsonl"):
            yield from _json_rows(path)
        else:
            raise PalmError(f"{path}: instruction data must be .json, .jsonl or .parquet")


def _json_rows(path: Path) -> Iterator[tuple[str, dict]]:
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):  # one JSON array of records
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise PalmError(f"{path}: not valid JSON ({e})") from None
        for number, row in enumerate(rows, 1):
            yield f"{path} record {number}", _object(row, f"{path} record {number}")
        return
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PalmError(f"{path} line {number}: not valid JSON ({e.msg})") from None
            yield f"{path} line {number}", _object(row, f"{path} line {number}")


def _object(row, where: str) -> dict:
    if not isinstance(row, dict):
        raise PalmError(f"{where}: a record must be a JSON object, not {type(row).__name__}")
    return row


def _hub_rows(name: str, split: str) -> Iterator[tuple[str, dict]]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets raises many types for missing/unreachable repos
        raise PalmError(f"dataset {name!r} (split {split!r}): {str(e).splitlines()[0]}") from None
    for number, row in enumerate(dataset, 1):
        yield f"{name} ({split}) row {number}", row


def _record_format(row: dict, where: str) -> str:
    for name, required in FORMATS.items():
        if all(key in row for key in required):
            return name
    expected = "; ".join(f"{name}: {', '.join(fields)}" for name, fields in FORMATS.items())
    raise PalmError(f"{where}: fields {', '.join(sorted(row)) or '(none)'} match no format ({expected}); "
                    "map other names with --columns ours=theirs")


def _to_messages(row: dict, layout: str, where: str, style: PromptStyle) -> list[dict]:
    missing = [key for key in FORMATS[layout] if row.get(key) is None]
    if missing:
        raise PalmError(f"{where}: missing the field {missing[0]!r}")
    if layout == "chat":
        messages = row["messages"]
        check_messages(messages, where=where)
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if layout == "alpaca":
        instruction, extra = _text(row, "instruction", where), row.get("input")
        prompt = style.input_format.format(instruction=instruction, input=extra) if extra else instruction
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(row, "output", where)}]
    return [{"role": "user", "content": _text(row, "prompt", where)},
            {"role": "assistant", "content": _text(row, "completion", where)}]


def _text(row: dict, key: str, where: str) -> str:
    if not isinstance(row[key], str):
        raise PalmError(f"{where}: the field {key!r} must be a string, not {type(row[key]).__name__}")
    return row[key]


# -------------------------------------------------------------------------------------------------
# Tokenizing


@dataclass
class Examples:
    """Tokenized examples: token ids and, per token, whether the loss learns it."""

    ids: list[np.ndarray] = field(default_factory=list)
    learn: list[np.ndarray] = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(i) for i in self.ids), dtype=np.int64, count=len(self.ids))

    def __getitem__(self, indices: np.ndarray) -> dict:
        """A batch: inputs and next-token labels padded on the right to the longest example
        (labels IGNORE where nothing is learned, and on padding)."""
        rows = [self.ids[i] for i in indices]
        width = max(len(r) for r in rows) - 1
        input_ids = np.zeros((len(rows), width), dtype=np.int64)
        labels = np.full((len(rows), width), IGNORE, dtype=np.int64)
        for row, i in enumerate(indices):
            ids, learn = self.ids[i], self.learn[i]
            input_ids[row, : len(ids) - 1] = ids[:-1]
            labels[row, : len(ids) - 1] = np.where(learn[1:], ids[1:], IGNORE)
        import torch

        return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}


def tokenize(records: list[Record], tokenizer, style: PromptStyle, seq_len: int, *, learn_prompts: bool = False) -> Examples:
    """Render and tokenize each record: replies (and each reply's end-of-text token) learned,
    the rest too with `learn_prompts`. An example longer than `seq_len` tokens is cut to fit; one
    with no reply token left within it is dropped. Segments are tokenized one by one, so that the
    tokens of a prompt are those the model sees when it is asked to continue that prompt."""
    eos = require_eos(tokenizer)
    examples = Examples()
    for record in records:
        ids, learn = [], []
        for text, is_reply in style.segments(record.messages):
            piece = [eos] if text is None else tokenizer.encode(text)
            ids += piece
            learn += [is_reply or learn_prompts] * len(piece)
        cut = len(ids) > seq_len
        ids, learn = ids[:seq_len], learn[:seq_len]
        if not any(learn[1:]):  # the first token is never predicted
            examples.dropped += 1
            continue
        examples.truncated += cut
        examples.ids.append(np.asarray(ids, dtype=np.int64))
        examples.learn.append(np.asarray(learn, dtype=bool))
    if not examples.ids:
        raise PalmError(f"no example fits --seq_len {seq_len} with a reply token in it ({examples.dropped} dropped)")
    return examples


def split_records(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(train, validation): `fraction` of the records, drawn with `seed`, held out."""
    order = np.random.default_rng(seed).permutation(len(records))
    count = int(round(fraction * len(records)))
    if count == 0 or count == len(records):
        raise PalmError(f"--val_fraction {fraction} of {len(records)} records leaves an empty split")
    held = set(order[:count].tolist())
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


# -------------------------------------------------------------------------------------------------
# The offline default: the standard library's functions


def stdlib_instructions() -> tuple[list[Record], list[Record]]:
    """(train, held-out) instruction records from the standard library's documented module-level
    functions, split by file as `palm train`'s default run splits them."""
    train_files, val_files = held_out(stdlib_files())
    return _function_records(train_files), _function_records(val_files)


def function_instruction(name: str, signature: str, summary: str) -> str:
    return f"{summary}\n\nWrite this as the Python function `def {name}({signature})`."


def _function_records(files: list[Path]) -> list[Record]:
    records = []
    for path in files:
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = source.splitlines(keepends=True)
        for node in tree.body:  # module level: the source starts at column 0
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_") or node.decorator_list:
                continue
            docstring = ast.get_docstring(node)
            summary = " ".join(docstring.split("\n\n")[0].split()) if docstring else ""
            if not summary:
                continue
            code = "".join(lines[node.lineno - 1 : node.end_lineno]).rstrip()
            if not code.startswith(f"def {node.name}("):  # a few are written `def name (`
                continue
            instruction = function_instruction(node.name, ast.unparse(node.args), summary)
            records.append(Record([{"role": "user", "content": instruction}, {"role": "assistant", "content": code}],
                                  f"{path}:{node.lineno}"))
    return records
