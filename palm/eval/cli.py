"""`palm eval`: perplexity and bits per byte, length extrapolation, or lm-evaluation-harness tasks."""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path

from palm.dtypes import DTYPES
from palm.errors import PalmError

DESCRIPTION = """Evaluate a model. By default: loss, perplexity and bits per byte on documents, each
scored with a sliding window (without --data, the standard library files that `palm train` held
out). --lengths: loss by position at several window lengths, as a table and a PNG. --tasks:
lm-evaluation-harness tasks."""


def add_commands(subparsers) -> None:
    """Add `palm eval` to the `palm` command's subparsers."""
    p = subparsers.add_parser("eval", help="perplexity, length extrapolation, or lm-evaluation-harness tasks",
                              description=DESCRIPTION)
    p.add_argument("--checkpoint", required=True, help="the model: anything palm.load takes (a run's model/ directory, a preset, a .pt file, a Hub repo)")
    p.add_argument("--tokenizer", help="Hub name, tokenizer.json, or 'bytes' (default: the built dataset's, else the training run's, else bytes)")
    p.add_argument("--data", help="a build-dataset directory, local .txt/.jsonl/.json/.parquet/.csv files (a file, directory or glob), or a Hub dataset (default: the standard library files the main job held out)")
    p.add_argument("--split", default="validation", help="split of a built or Hub dataset (default: %(default)s)")
    p.add_argument("--text_column", default="text", help="(default: %(default)s)")
    p.add_argument("--max_documents", type=int, help="evaluate only the first N documents")
    p.add_argument("--seq_len", type=int, help="window length (default: the training run's seq_len, else the model's context)")
    p.add_argument("--stride", type=int, help="tokens a window advances; each window scores only its new tokens (default: seq_len / 2)")
    p.add_argument("--batch_size", type=int, default=8, help="windows or requests per forward pass (default: %(default)s)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="(default: %(default)s)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--output", help="write the results here: a .json file (perplexity, --lengths) or a directory (--tasks, the harness's format)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    extra = p.add_argument_group("length extrapolation")
    extra.add_argument("--lengths", help="comma-separated window lengths, e.g. 256,512,1024,2048: loss by position for each")
    extra.add_argument("--windows", type=int, default=32, help="windows of the longest length to read; every length reads the same tokens (default: %(default)s)")
    extra.add_argument("--bucket", type=int, help="positions per bucket (default: the training length / 4)")
    extra.add_argument("--plot", default="extrapolation.png", help="PNG to write (default: %(default)s)")
    harness = p.add_argument_group("lm-evaluation-harness")
    harness.add_argument("--tasks", help="comma-separated harness task names (e.g. hellaswag,arc_easy)")
    harness.add_argument("--num_fewshot", type=int, help="examples in each prompt (default: the task's)")
    harness.add_argument("--limit", type=float, help="examples per task (a fraction if below 1)")
    harness.add_argument("--include_path", help="a directory of extra task YAML files")
    harness.add_argument("--max_gen_toks", type=int, default=256, help="longest generation of generate_until tasks (default: %(default)s)")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> None:
    """Run the evaluation that the arguments ask for."""
    from palm.checkpoint import load
    from palm.checks import check_device, check_vocabulary
    from palm.eval.perplexity import check_window
    from palm.eval.sources import default_tokenizer, run_settings
    from palm.tokenizer import load_tokenizer

    if args.lengths and args.tasks:
        raise PalmError("--lengths and --tasks are separate evaluations; run one at a time")
    if args.batch_size < 1:
        raise PalmError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.seq_len is not None and args.stride is not None:
        check_window(args.seq_len, args.stride)
    if args.data is not None:
        _check_data_exists(args.data)
    lengths = _parse_lengths(args.lengths) if args.lengths else None
    task_manager = _task_manager(args) if args.tasks else None  # unknown task names fail before loading the model

    settings = run_settings(args.checkpoint)
    tokenizer_name = args.tokenizer or default_tokenizer(args.checkpoint, args.data, settings)
    tokenizer = load_tokenizer(tokenizer_name)
    device = check_device(args.device)
    model = load(args.checkpoint, device=device, dtype=args.dtype)
    check_vocabulary(tokenizer, model.config.num_tokens)
    if tokenizer.eos_id is None:
        raise PalmError(f"tokenizer {tokenizer.name} has no end-of-text token, which starts every document")
    train_len = settings.seq_len
    where = f" (training length {train_len} from {settings.source})" if train_len else ""
    print(f"model: {args.checkpoint}{where}; tokenizer: {tokenizer.name}; dtype: {args.dtype}; device: {device}", file=sys.stderr)

    if args.tasks:
        _run_tasks(args, model, tokenizer, task_manager)
    elif lengths:
        _run_extrapolation(args, model, tokenizer, lengths, train_len)
    else:
        _run_perplexity(args, model, tokenizer, train_len)


def _check_data_exists(data: str) -> None:
    from palm.data.documents import local_files

    local_files(data)  # a path that names nothing local fails here, in one line


def _parse_lengths(text: str) -> list[int]:
    try:
        lengths = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise PalmError(f"--lengths takes comma-separated integers, got {text!r}") from None
    if not lengths or lengths[0] < 2:
        raise PalmError(f"--lengths must be integers of at least 2, got {text!r}")
    return lengths


def _progress(total: int | None, unit: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, unit_scale=True, disable=quiet, file=sys.stderr, dynamic_ncols=True)


def _run_perplexity(args, model, tokenizer, train_len: int | None) -> None:
    from palm.eval.perplexity import check_window, evaluate_perplexity
    from palm.eval.sources import open_documents

    seq_len = args.seq_len or train_len or model.config.max_seq_len
    stride = args.stride or max(1, seq_len // 2)
    check_window(seq_len, stride)
    if seq_len > model.config.max_seq_len:
        raise PalmError(f"--seq_len {seq_len} exceeds the model's context of {model.config.max_seq_len} "
                        "(use --lengths to measure past it)")
    documents, where = open_documents(args.data, tokenizer, split=args.split, text_column=args.text_column,
                                      max_documents=args.max_documents)
    with _progress(None, "tok", args.quiet) as bar:
        result = evaluate_perplexity(model, documents, eos_id=tokenizer.eos_id, seq_len=seq_len, stride=stride,
                                     batch_size=args.batch_size, on_tokens=bar.update)
    rows = [
        ("data", where), ("documents", f"{result.documents:,}"), ("tokens", f"{result.tokens:,}"),
        ("bytes", f"{result.bytes:,}"), ("window", f"{seq_len} tokens, stride {stride}"),
        ("loss", f"{result.loss:.4f} nats/token"), ("perplexity", f"{result.perplexity:.3f}"),
        ("bits per byte", f"{result.bits_per_byte:.4f}"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if args.output:
        record = {"checkpoint": args.checkpoint, "tokenizer": tokenizer.name, "data": where, "dtype": args.dtype,
                  **result.to_dict()}
        _write_json(args.output, record)


def _run_extrapolation(args, model, tokenizer, lengths: list[int], train_len: int | None) -> None:
    from palm.eval.extrapolation import extrapolation, format_table, plot
    from palm.eval.sources import open_documents, token_stream

    if args.windows < 1:
        raise PalmError(f"--windows must be at least 1, got {args.windows}")
    reference = train_len or model.config.max_seq_len
    bucket = args.bucket or max(1, reference // 4)
    if bucket < 1:
        raise PalmError(f"--bucket must be at least 1, got {bucket}")
    documents, where = open_documents(args.data, tokenizer, split=args.split, text_column=args.text_column,
                                      max_documents=args.max_documents)
    stream = token_stream(documents, tokenizer.eos_id, args.windows * max(lengths))
    total = sum(len(stream) // max(lengths) * max(lengths) // length for length in lengths)
    with _progress(total, "window", args.quiet) as bar:
        curves = extrapolation(model, stream, lengths, windows=args.windows, batch_size=args.batch_size,
                               on_windows=bar.update)
    tokens = curves[0].windows * curves[0].length
    print(f"data: {where}; {tokens:,} tokens at every length; loss (nats/token) by position")
    print(format_table(curves, bucket, train_len))
    name = Path(args.checkpoint)
    name = f"{name.parent.name}/{name.name}" if name.name == "model" else str(args.checkpoint)
    title = f"{name}: loss by position ({tokens:,} tokens per length)"
    plot(curves, bucket, train_len, args.plot, title=title)
    print(f"wrote {args.plot}")
    if args.output:
        record = {
            "checkpoint": args.checkpoint, "tokenizer": tokenizer.name, "data": where, "dtype": args.dtype,
            "training_length": train_len, "tokens_per_length": tokens, "bucket": bucket,
            "lengths": {c.length: {"windows": c.windows, "loss": c.loss, "bucket_losses": c.bucket_losses(bucket)}
                        for c in curves},
        }
        _write_json(args.output, record)


def _write_json(path: str, record: dict) -> None:
    def clean(value):
        return None if isinstance(value, float) and not math.isfinite(value) else value

    record = {k: clean(v) for k, v in record.items()}
    try:
        Path(path).write_text(json.dumps(record, indent=2) + "\n")
    except OSError as e:
        raise PalmError(f"cannot write {path}: {e.strerror}") from None
    print(f"wrote {path}")


def _task_manager(args):
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise PalmError("--tasks needs lm-evaluation-harness: pip install 'palm[eval]' (or lm-eval)") from None

    if args.include_path and not Path(args.include_path).is_dir():
        raise PalmError(f"--include_path {args.include_path}: no such directory")
    manager = _indexed_tasks(args.include_path)
    names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown or not names:
        raise PalmError(f"unknown task {', '.join(unknown) or repr(args.tasks)}; `lm_eval ls tasks` lists them "
                        "(tasks of your own: --include_path)")
    args.task_names = names
    return manager


@functools.cache
def _indexed_tasks(include_path: str | None):
    """The harness's task index (built-in tasks and `include_path`'s): seconds to build, so built once."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def _run_tasks(args, model, tokenizer, task_manager) -> None:
    import lm_eval
    from lm_eval.utils import make_table

    from palm.eval.harness import PalmLM

    lm = PalmLM(model=model, tokenizer=tokenizer, batch_size=args.batch_size, max_gen_toks=args.max_gen_toks)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    tracker = None
    if args.output:
        from lm_eval.loggers import EvaluationTracker

        tracker = EvaluationTracker(output_path=args.output)
    results = lm_eval.simple_evaluate(
        model=lm, model_args=f"pretrained={args.checkpoint},tokenizer={tokenizer.name}", tasks=args.task_names,
        num_fewshot=args.num_fewshot, limit=limit, task_manager=task_manager, log_samples=tracker is not None,
        batch_size=args.batch_size, evaluation_tracker=tracker,
    )
    if results is None:
        return
    samples = results.pop("samples", None)
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    if tracker is not None:
        tracker.save_results_aggregated(results=results, samples=samples)
        for task_name in results["configs"]:
            tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
        print(f"wrote results under {args.output}")
