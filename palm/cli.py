"""The `palm` command. Each subcommand is a plain function taking the parsed arguments."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from palm.dtypes import DTYPES
from palm.errors import PalmError, Stopped


def config_from_arg(value: str | None):
    """`--config`: a preset name or a JSON file written by `PaLMConfig.to_json`."""
    from palm.config import PaLMConfig, canonical_name, get_config

    if value is None:
        return None
    return get_config(value) if canonical_name(value) else PaLMConfig.from_json(value)


def cmd_info(args: argparse.Namespace) -> None:
    """Print a model's config, parameter count and dtype (a preset's without downloading it), or
    with --system what this machine runs on and which code path it takes for each kind of work."""
    import torch

    if args.system:
        print_system()
        return
    if args.source is None:
        raise PalmError("give a model (a preset, a .pt file, a directory or a Hub name), or --system")
    from palm.checkpoint import HUB_CHECKPOINTS, load
    from palm.config import canonical_name, get_config, preset_matching
    from palm.model import PaLM

    preset = None if Path(args.source).exists() else canonical_name(args.source)
    if preset:
        with torch.device("meta"):
            model = PaLM(config_from_arg(args.config) or get_config(preset))
        repo, filename = HUB_CHECKPOINTS.get(preset, (None, None))
        weights = f"published as {repo}/{filename}" if repo else "none published (random init)"
    else:
        model = load(args.source, config=config_from_arg(args.config))
        weights = "loaded"
    config = model.config
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    n = model.num_parameters()
    print(f"source: {args.source}")
    print(f"preset: {preset_matching(config) or '(none)'}")
    print(f"weights: {weights}")
    print(f"parameters: {n:,} ({n / 1e6:.1f}M)")
    print(f"dtype: {', '.join(dtypes)}")
    print("config:")
    for key, value in config.to_dict().items():
        print(f"  {key}: {value}")


def print_system() -> None:
    import platform

    import torch

    from palm.dtypes import cpu_has_native_bf16
    from palm.inference.cpu import cpu_paths

    model = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"torch: {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"cpu: {model}, {os.cpu_count()} cores, vector unit {torch.backends.cpu.get_cpu_capability()}, "
          f"native bf16 {'yes' if cpu_has_native_bf16() else 'no'}")
    print(f"cuda: {cuda}")
    print("cpu code paths:")
    for work, path in cpu_paths().items():
        print(f"  {work}: {path}")


def cmd_convert(args: argparse.Namespace) -> None:
    """Convert between a reference `.pt` state dict and palm's directory format, either way."""
    from palm.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load, save_pretrained, save_reference_checkpoint

    dst = Path(args.dst)
    as_reference = dst.suffix in (".pt", ".pth", ".bin")
    existing = [dst] if as_reference else [dst / CONFIG_NAME, dst / WEIGHTS_NAME]
    if not args.overwrite and any(p.exists() for p in existing):
        raise PalmError(f"{dst} already holds a model; pass --overwrite to replace it")
    if not as_reference and dst.exists() and not dst.is_dir():
        raise PalmError(f"{dst} is a file; give a directory, or a .pt path for the reference format")

    model = load(args.src, config=config_from_arg(args.config), dtype=args.dtype)
    if as_reference:
        save_reference_checkpoint(model, dst)
    else:
        save_pretrained(model, dst)
    print(f"wrote {dst} ({'palm-rlhf-pytorch .pt state dict' if as_reference else 'config.json + model.safetensors'})")


def cmd_generate(args: argparse.Namespace) -> None:
    """Generate text from a prompt, streaming it to stdout."""
    import time

    import torch

    from palm.checkpoint import load
    from palm.checks import check_at_least, check_device, check_vocabulary
    from palm.inference.decoding import check_context, stream
    from palm.inference.quantization import quantize
    from palm.inference.sampling import check_sampling_options
    from palm.tokenizer import TextStreamer, load_tokenizer

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt:
        raise PalmError("empty prompt")
    check_sampling_options(args.temperature, args.filter_thres, args.top_k, args.top_p)
    check_at_least("--num_samples", args.num_samples, 1)
    check_at_least("--seq_len", args.seq_len, 2)
    if args.max_new_tokens is not None:
        check_at_least("--max_new_tokens", args.max_new_tokens, 1)
    if args.seed is not None:
        check_at_least("--seed", args.seed, 0)
    tokenizer = load_tokenizer(args.tokenizer)
    device = check_device(args.device)
    # unmapped when it is about to be quantized, so that quantizing frees its full-precision weights
    model = load(args.checkpoint or args.model, device=device, dtype=args.dtype, mmap=not args.quantize)
    check_vocabulary(tokenizer, model.config.num_tokens)
    prompt_ids = torch.tensor(tokenizer.encode(prompt))
    if len(prompt_ids) == 0:
        raise PalmError("the prompt encodes to no tokens")
    check_context(len(prompt_ids), 1, model.config.max_seq_len)
    if args.max_new_tokens is not None:
        max_new = args.max_new_tokens
    else:
        max_new = args.seq_len - len(prompt_ids)
        if max_new <= 0:
            raise PalmError(f"--seq_len {args.seq_len} leaves no room after the {len(prompt_ids)}-token prompt")
    max_new = min(max_new, model.config.max_seq_len - len(prompt_ids))
    draft = None
    if args.draft:
        from palm.inference.speculative import check_draft

        if args.num_samples != 1:
            raise PalmError("--draft decodes one sample at a time; use --num_samples 1")
        check_at_least("--draft_k", args.draft_k, 1)
        draft = load(args.draft, device=device, dtype=args.dtype, mmap=not args.quantize)
        check_draft(model, draft)
        check_context(len(prompt_ids), max_new, draft.config.max_seq_len)
    if args.quantize:
        quantize(model, args.quantize)
        if draft is not None:
            quantize(draft, args.quantize)
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)

    batch = prompt_ids.expand(args.num_samples, -1)
    streamers = [TextStreamer(tokenizer) for _ in range(args.num_samples)]
    start = time.perf_counter()
    first_token_at = second_token_at = None
    count = 0
    if args.num_samples == 1:
        sys.stdout.write(prompt)
    options = dict(temperature=args.temperature, filter_thres=args.filter_thres, top_k=args.top_k, top_p=args.top_p,
                   eos_token_id=tokenizer.eos_id, generator=generator)
    if draft is not None:
        from palm.inference.speculative import speculative_stream

        tokens_out = speculative_stream(model, draft, prompt_ids, max_new, draft_k=args.draft_k, compile=args.compile,
                                        **options)
    else:
        tokens_out = stream(model, batch, max_new, compile=args.compile, **options)
    for tokens in tokens_out:
        count += 1
        if count == 1:
            first_token_at = time.perf_counter()
        elif count == 2:
            second_token_at = time.perf_counter()
        for streamer, token in zip(streamers, tokens.tolist()):
            if token == tokenizer.eos_id:
                continue
            text = streamer.push(token)
            if args.num_samples == 1:
                sys.stdout.write(text)
                sys.stdout.flush()
    end = time.perf_counter()
    if args.num_samples == 1:
        sys.stdout.write("\n")
    else:
        for i, streamer in enumerate(streamers):
            sys.stdout.write(f"--- sample {i + 1} ---\n{prompt}{tokenizer.decode(streamer.ids)}\n")
    first_s = first_token_at - start if first_token_at else 0
    drafted = ""
    if draft is not None:  # tokens come a round at a time, the first after the prefill and one round
        acceptance = tokens_out.acceptance
        drafted = (f"; draft acceptance {acceptance.rate:.0%} ({acceptance.accepted}/{acceptance.proposed} "
                   f"proposals, k={args.draft_k}, {acceptance.rounds} target forwards)")
        rate_from, rate_steps = first_token_at, count - 1
        timing = (f"prompt {len(prompt_ids)} tokens and the first round in {first_s:.2f}s"
                  f"{' (compiling included)' if args.compile else ''}")
    elif args.compile:  # the first decode step compiles; the rate counts the steps after it
        rate_from, rate_steps = second_token_at, count - 2
        compiling = f", compiling {second_token_at - first_token_at:.1f}s" if count > 1 else ""
        timing = f"prompt {len(prompt_ids)} tokens in {first_s:.2f}s{compiling}"
    else:
        rate_from, rate_steps = first_token_at, count - 1
        timing = f"prompt {len(prompt_ids)} tokens in {first_s:.2f}s"
    decode_rate = rate_steps / (end - rate_from) if rate_steps > 0 else float("nan")
    print(
        f"[{count} tokens x {args.num_samples} in {end - start:.2f}s: {timing}, "
        f"decode {decode_rate:.1f} tokens/s per sequence{drafted}]",
        file=sys.stderr,
    )


def cmd_build_dataset(args: argparse.Namespace) -> None:
    """Tokenize a corpus, add EOS to every document and pack it into fixed-length parquet blocks."""
    from palm.data.build import build_dataset
    from palm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer, eos_token=args.eos_token)
    metadata = build_dataset(
        args.dataset_name, tokenizer, output=args.output, push_to=args.push_to, seq_len=args.seq_len,
        seed=args.seed, text_column=args.text_column, split=args.split, val_docs=args.val_docs,
        val_fraction=args.val_fraction, streaming=args.streaming, num_proc=args.num_proc,
        encoding_errors=args.encoding_errors, overwrite=args.overwrite, progress=not args.quiet,
    )
    for name, split in metadata["splits"].items():
        print(f"{name}: {split['documents']:,} documents -> {split['blocks']:,} blocks of {args.seq_len} "
              f"({split['tokens']:,} tokens); final partial block of {split['dropped_tail_tokens']:,} tokens dropped")
    where = [str(args.output)] if args.output else []
    where += [f"https://huggingface.co/datasets/{args.push_to}"] if args.push_to else []
    print(f"wrote {' and '.join(where)}")


def cmd_train(args: argparse.Namespace) -> None:
    """Train (or fine-tune) a PaLM model; with no options, the tiny preset on Python's own source."""
    from palm.training.config import TrainConfig
    from palm.training.pretrain import train

    config = TrainConfig.from_sources(args.config, _run_options(args))
    _push_result(train(config, progress=not args.quiet), config)


def cmd_finetune(args: argparse.Namespace) -> None:
    """Fine-tune a model on instruction or chat data: LoRA adapters (default) or all weights."""
    from palm.training.config import FinetuneConfig
    from palm.training.finetune import finetune

    config = FinetuneConfig.from_sources(args.config, _run_options(args))
    _push_result(finetune(config, progress=not args.quiet), config)


def _push_result(model_dir: Path, config) -> None:
    """--push_to: the run's final model (for LoRA, the merged one) to the Hub, with a model card."""
    if config.push_to:
        from palm.hf.push import push

        print(f"pushed {model_dir} to {push(model_dir, config.push_to, private=config.private)}")


def _run_options(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("command", "func", "config", "quiet")}


RUN_HELPS = {
    "tokenizer": "Hub name, tokenizer.json, or 'bytes' (default: bytes)",
    "out_dir": "run directory (default: runs/<name>-<date>-<time>)",
    "resume": "a checkpoint directory, or 'auto' for the newest in --out_dir",
    "trackers": "comma-separated: tensorboard, wandb",
    "precision": "fp32, bf16 (autocast) or fp16 (with a grad scaler; GPU only)",
    "schedule": "cosine, linear or constant after warmup",
    "optimizer": "adamw, stable_adamw or lion",
    "grad_clip": "clip the gradient norm to this (0: no clipping)",
    "max_tokens": "train for this many tokens instead of --max_steps",
    "peak_tflops": "device peak for MFU (default: data sheet for known GPUs, measured on CPU)",
    "push_to": "then upload the final model to this Hugging Face Hub model repo (as palm push does)",
    "private": "with --push_to: create the repo private",
}
TRAIN_HELPS = {
    "preset": "model preset to train from scratch (default: tiny)",
    "init_from": "start from these weights (anything palm.load takes) for continued pretraining",
    "data": "build-dataset directory, Hub dataset of packed input_ids, or raw text files (default: Python's stdlib source)",
    "val_data": "validation data (default: the data's validation split, if any)",
    "tokenizer": "Hub name, tokenizer.json, or 'bytes' (default: the one --data was built with, else bytes)",
}
FINETUNE_HELPS = {
    "checkpoint": "the model to fine-tune: " + "a preset name, a .pt or .safetensors file, a model directory, or a Hub repo id",
    "data": "local .json/.jsonl/.parquet records or a Hub dataset: Alpaca (instruction, input, output), chat "
            "(messages) or prompt/completion (default: instructions made from Python's stdlib)",
    "val_data": "validation records (default: --val_fraction of --data, or none)",
    "val_fraction": "hold out this fraction of --data for validation",
    "split": "split of a Hub dataset (default: train)",
    "columns": "field names of the data for palm's, as ours=theirs,... (e.g. instruction=inputs,output=targets)",
    "prompt_style": "alpaca, flan, chatml or plain (default: alpaca); saved with the model",
    "eos_token": "end-of-text token, which ends every reply (default: from the tokenizer's config)",
    "train_on_prompt": "learn the prompt tokens too (default: the replies only)",
    "method": "lora (adapters through peft) or full (all weights) (default: lora)",
    "lora_targets": "comma-separated: q, k, v, ff_in (parts of the fused projection), fused, attn_out, ff_out, all (default: q,v)",
    "quantize": "int8: keep the frozen base weights in int8 (LoRA only)",
    "samples": "answers to this many held-out instructions printed at the end (default: 3)",
}


def add_run_arguments(parser: argparse.ArgumentParser, config_class, helps: dict[str, str]) -> None:
    """One flag per field of `config_class`; unset flags stay None so the YAML file's values win."""
    import dataclasses

    parser.add_argument("--config", help="YAML file of options; command-line flags override it")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    defaults = config_class()
    for f in dataclasses.fields(config_class):
        default = getattr(defaults, f.name)
        help_text = {**RUN_HELPS, **helps}.get(f.name, f"(default: {default})")
        if isinstance(default, bool):
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, help=help_text)
        else:  # field types are strings such as "int | None" (postponed annotations)
            kind = {"int": int, "float": float}.get(f.type.split(" ")[0], str)
            parser.add_argument(f"--{f.name}", type=kind, help=help_text)


def cmd_chat(args: argparse.Namespace) -> None:
    """Chat with a model in the terminal (or answer one message read from stdin)."""
    import torch

    from palm.checkpoint import load
    from palm.checks import check_at_least, check_device, check_vocabulary
    from palm.inference.chat import reply
    from palm.inference.quantization import quantize
    from palm.inference.sampling import check_sampling_options
    from palm.prompts import BASE_MODEL_STYLE, get_prompt_style, saved_prompt_style
    from palm.tokenizer import load_tokenizer

    check_sampling_options(args.temperature, args.filter_thres, args.top_k, args.top_p)
    check_at_least("--max_new_tokens", args.max_new_tokens, 1)
    if args.seed is not None:
        check_at_least("--seed", args.seed, 0)
    style = get_prompt_style(args.prompt_style) if args.prompt_style else None
    device = check_device(args.device)
    model = load(args.checkpoint, device=device, dtype=args.dtype, mmap=not args.quantize)  # see cmd_generate
    tokenizer = load_tokenizer(args.tokenizer)
    style = style or saved_prompt_style(args.checkpoint)
    if style is None:
        style = get_prompt_style(BASE_MODEL_STYLE)
        print(f"palm chat: {args.checkpoint} has no saved prompt style; using '{style.name}' "
              "(--prompt_style to choose)", file=sys.stderr)
    check_vocabulary(tokenizer, model.config.num_tokens)
    if args.quantize:
        quantize(model, args.quantize)
    generator = torch.Generator(device=device).manual_seed(args.seed) if args.seed is not None else None
    sampling = dict(temperature=args.temperature, filter_thres=args.filter_thres, top_k=args.top_k, top_p=args.top_p,
                    generator=generator, compile=args.compile)
    system = [{"role": "system", "content": args.system}] if args.system else []

    def answer(messages: list[dict]) -> str:
        text = ""
        for piece in reply(model, tokenizer, style, messages, args.max_new_tokens, **sampling):
            text += piece
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return text

    if not sys.stdin.isatty():  # scripts: one message in, one reply out
        message = sys.stdin.read().strip()
        if not message:
            raise PalmError("no message on stdin")
        answer([*system, {"role": "user", "content": message}])
        return
    print(f"chatting with {args.checkpoint} ({style.name} prompt style). /reset starts over, /exit quits.", file=sys.stderr)
    history = list(system)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = list(system)
            print("(conversation reset)", file=sys.stderr)
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        try:
            history.append({"role": "assistant", "content": answer(history)})
        except PalmError as e:  # a message too long for the context: say so and carry on
            history.pop()
            print(f"palm chat: {e}", file=sys.stderr)


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of every command that generates text: sampling, and how the model runs."""
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default: %(default)s)")
    parser.add_argument("--filter_thres", type=float, default=0.9, help="keep the top (1 - filter_thres) of the vocabulary (default: %(default)s)")
    parser.add_argument("--top_k", type=int, help="keep the k most likely tokens (instead of --filter_thres)")
    parser.add_argument("--top_p", type=float, help="nucleus sampling: keep the most likely tokens up to probability p")
    parser.add_argument("--seed", type=int, help="random seed for reproducible samples")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="(default: %(default)s)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--quantize", choices=["int8"], help="weight-only int8 quantization")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow to start, faster per token)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="palm", description="Load, run, train and fine-tune PaLM models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    source_help = "a preset name, a .pt or .safetensors file, a model directory, or a Hub repo id"
    config_help = "preset name or config.json to use instead of the inferred config"

    info = commands.add_parser("info", help=cmd_info.__doc__, description=cmd_info.__doc__)
    info.add_argument("source", nargs="?", help=source_help)
    info.add_argument("--config", help=config_help)
    info.add_argument("--system", action="store_true", help="instead: this machine's CPU/GPU and the code path each kind of work takes")
    info.set_defaults(func=cmd_info)

    convert = commands.add_parser("convert", help=cmd_convert.__doc__, description=cmd_convert.__doc__)
    convert.add_argument("src", help=source_help)
    convert.add_argument("dst", help="a .pt path (reference format) or a directory (palm format)")
    convert.add_argument("--dtype", choices=DTYPES, help="cast the weights (default: keep)")
    convert.add_argument("--config", help=config_help)
    convert.add_argument("--overwrite", action="store_true", help="replace a model already at DST")
    convert.set_defaults(func=cmd_convert)

    from palm.tokenizer import DEFAULT_TOKENIZER

    gen = commands.add_parser("generate", help=cmd_generate.__doc__, description=cmd_generate.__doc__)
    gen.add_argument("prompt", help="the prompt text, or - to read it from stdin")
    gen.add_argument("--model", default="palm_410m_8k_v0", help="preset whose published weights to use (default: %(default)s)")
    gen.add_argument("--checkpoint", help="instead of --model: " + source_help)
    gen.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="Hub name, tokenizer.json, or 'bytes' (default: %(default)s)")
    gen.add_argument("--seq_len", type=int, default=256, help="total length, prompt included (default: %(default)s)")
    gen.add_argument("--max_new_tokens", type=int, help="tokens to generate (overrides --seq_len)")
    gen.add_argument("--num_samples", type=int, default=1, help="samples to draw, as one batch (default: %(default)s)")
    gen.add_argument("--draft", help="speculative decoding: a small model with the same vocabulary (" + source_help + ") proposes tokens that the model checks")
    gen.add_argument("--draft_k", type=int, default=4, help="tokens the --draft model proposes per round (default: %(default)s)")
    add_sampling_arguments(gen)
    gen.set_defaults(func=cmd_generate)

    build = commands.add_parser("build-dataset", help=cmd_build_dataset.__doc__, description=cmd_build_dataset.__doc__)
    build.add_argument("--dataset_name", required=True, help="Hub dataset name, or local .txt/.jsonl/.json/.parquet/.csv files (a file, directory or glob); a .txt file is one document")
    build.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="Hub name, tokenizer.json, or 'bytes' (default: %(default)s)")
    build.add_argument("--eos_token", help="end-of-text token (default: from the tokenizer's config)")
    build.add_argument("--seq_len", type=int, default=8192, help="tokens per block (default: %(default)s)")
    build.add_argument("--seed", type=int, help="shuffle documents before packing (default: source order)")
    build.add_argument("--output", help="local directory to write")
    build.add_argument("--push_to", help="Hub dataset repo to upload to, e.g. you/c4-neox-8k")
    build.add_argument("--text_column", default="text", help="(default: %(default)s)")
    build.add_argument("--split", default="train", help="split of a Hub dataset (default: %(default)s)")
    build.add_argument("--val_docs", type=int, default=0, help="hold out the first N documents (after shuffling) as a validation split")
    build.add_argument("--val_fraction", type=float, default=0.0, help="hold out this fraction of documents, drawn at random, as validation")
    build.add_argument("--streaming", action="store_true", help="constant memory for corpora larger than RAM (--seed then shuffles through a 10k-document buffer)")
    build.add_argument("--num_proc", type=int, help="tokenize in this many worker processes (default: in-process, multithreaded)")
    build.add_argument("--encoding_errors", choices=["strict", "replace"], default="strict", help="undecodable bytes: fail naming the file, or replace with U+FFFD (default: %(default)s)")
    build.add_argument("--overwrite", action="store_true", help="replace a dataset already at --output (only once the new one is complete)")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(func=cmd_build_dataset)

    from palm.training.config import FinetuneConfig, TrainConfig

    train = commands.add_parser("train", help=cmd_train.__doc__, description=cmd_train.__doc__)
    add_run_arguments(train, TrainConfig, TRAIN_HELPS)
    train.set_defaults(func=cmd_train)

    finetune = commands.add_parser("finetune", help=cmd_finetune.__doc__, description=cmd_finetune.__doc__)
    add_run_arguments(finetune, FinetuneConfig, FINETUNE_HELPS)
    finetune.set_defaults(func=cmd_finetune)

    chat = commands.add_parser("chat", help=cmd_chat.__doc__, description=cmd_chat.__doc__)
    chat.add_argument("--checkpoint", required=True, help="the model: " + source_help)
    chat.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="Hub name, tokenizer.json, or 'bytes' (default: %(default)s)")
    chat.add_argument("--prompt_style", help="alpaca, flan, chatml or plain (default: the model's saved style, else plain)")
    chat.add_argument("--system", help="a system message to start the conversation with")
    chat.add_argument("--max_new_tokens", type=int, default=256, help="longest reply, in tokens (default: %(default)s)")
    add_sampling_arguments(chat)
    chat.set_defaults(func=cmd_chat)

    from palm.eval.cli import add_commands as add_eval_commands
    from palm.hf.cli import add_commands as add_hf_commands
    from palm.serve.cli import add_commands as add_serve_commands

    add_eval_commands(commands)
    add_hf_commands(commands)
    add_serve_commands(commands)
    return parser


class OneLineErrors(argparse.ArgumentParser):
    """argparse, with a usage mistake reported as one line (the usage is one --help away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = f"palm {args.command}"
    try:
        args.func(args)
    except Stopped as e:  # a run stopped by a signal, its state saved
        print(f"{command}: {e}", file=sys.stderr)
        return e.exit_code
    except PalmError as e:
        print(f"{command}: error: {_one_line(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except Exception as e:  # a failure palm did not foresee: one line unless asked for the traceback
        if os.environ.get("PALM_DEBUG"):
            raise
        if isinstance(e, OSError) and e.strerror:
            what = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
        else:
            what = f"{type(e).__name__}: {_one_line(str(e))}" if str(e) else type(e).__name__
        print(f"{command}: error: {what} (PALM_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    return 0


def _one_line(message: str) -> str:
    return " ".join(message.split())


if __name__ == "__main__":
    sys.exit(main())
