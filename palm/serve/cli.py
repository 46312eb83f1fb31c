"""The `palm serve` command: load a model and serve it over HTTP until interrupted."""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys

from palm.dtypes import DTYPES
from palm.errors import PalmError

SOURCE_HELP = "a preset name, a .pt or .safetensors file, a model directory, or a Hub repo id"


def add_commands(subparsers) -> None:
    """Add `serve` to the `palm` command's subparsers."""
    from palm.tokenizer import DEFAULT_TOKENIZER

    serve = subparsers.add_parser("serve", help=cmd_serve.__doc__, description=cmd_serve.__doc__)
    serve.add_argument("--checkpoint", required=True, help="the model: " + SOURCE_HELP)
    serve.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="Hub name, tokenizer.json, or 'bytes' (default: %(default)s)")
    serve.add_argument("--dtype", choices=DTYPES, default="fp32", help="(default: %(default)s)")
    serve.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    serve.add_argument("--quantize", choices=["int8"], help="weight-only int8 quantization")
    serve.add_argument("--compile", action="store_true", help="torch.compile the decode step (the first requests wait for it)")
    serve.add_argument("--host", default="127.0.0.1", help="(default: %(default)s; 0.0.0.0 to serve other machines)")
    serve.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    serve.add_argument("--max_batch_size", type=int, default=8, help="sequences decoded at once (default: %(default)s)")
    serve.add_argument("--max_seq_len", type=int, help="prompt + reply tokens per sequence (default: the model's context)")
    serve.add_argument("--api_key", help="require 'Authorization: Bearer KEY' (default: $PALM_API_KEY if set, else no key)")
    serve.add_argument("--model_name", help="the model's name in the API (default: --checkpoint)")
    serve.add_argument("--prompt_style", help="chat format: alpaca, flan, chatml or plain (default: the model's saved style, else plain)")
    serve.set_defaults(func=cmd_serve)


def build(args: argparse.Namespace):
    """The engine and the app for `args`, the model loaded (everything but the server)."""
    from palm.checkpoint import load
    from palm.checks import check_at_least, check_device, check_vocabulary
    from palm.inference.quantization import quantize
    from palm.prompts import BASE_MODEL_STYLE, get_prompt_style, saved_prompt_style
    from palm.serve.app import ServeSettings, create_app
    from palm.serve.engine import Engine
    from palm.tokenizer import load_tokenizer

    check_at_least("--max_batch_size", args.max_batch_size, 1)
    if not 0 <= args.port < 65536:
        raise PalmError(f"--port must be in [0, 65535], got {args.port}")
    device = check_device(args.device)
    # unmapped when it is about to be quantized, so that quantizing frees its full-precision weights
    model = load(args.checkpoint, device=device, dtype=args.dtype, mmap=not args.quantize)
    tokenizer = load_tokenizer(args.tokenizer)
    style = get_prompt_style(args.prompt_style) if args.prompt_style else saved_prompt_style(args.checkpoint)
    chat_stops = []
    if style is None:
        style = get_prompt_style(BASE_MODEL_STYLE)
        chat_stops = base_model_stops(style)
        print(f"palm serve: {args.checkpoint} has no saved prompt style; chat uses '{style.name}' "
              "(--prompt_style to choose)", file=sys.stderr)
    if style.stop_text:
        chat_stops.append(style.stop_text)
    check_vocabulary(tokenizer, model.config.num_tokens)
    max_seq_len = args.max_seq_len or model.config.max_seq_len
    if not 2 <= max_seq_len <= model.config.max_seq_len:
        raise PalmError(f"--max_seq_len must be in [2, {model.config.max_seq_len}] (the model's context), got {max_seq_len}")
    if args.quantize:
        quantize(model, args.quantize)
    engine = Engine(model, tokenizer, max_batch_size=args.max_batch_size, max_seq_len=max_seq_len, compile=args.compile)
    api_key = args.api_key if args.api_key is not None else os.environ.get("PALM_API_KEY")
    settings = ServeSettings(model_name=args.model_name or args.checkpoint, style=style, chat_stops=chat_stops,
                             api_key=api_key or None)
    return create_app(engine, settings), engine


def base_model_stops(style) -> list[str]:
    """Where a base model's reply ends in a transcript style: where the next user turn would begin."""
    next_turn = style.separator + style.user.split("{content}")[0]
    return [next_turn] if next_turn.strip() else []


def cmd_serve(args: argparse.Namespace) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (completions, chat, streaming), decoding
    concurrent requests as one batch."""
    import uvicorn

    app, engine = build(args)
    # What is loaded by now (PyTorch's and the libraries' objects, the model, the app: ~330k objects)
    # lives as long as the server. Frozen out of the collector's sight, it no longer makes a full
    # collection a ~150 ms pause for every stream (BENCHMARKS.md, serving); the rest is collected as usual.
    gc.collect()
    gc.freeze()
    print(f"palm serve: {app.title} serving {args.model_name or args.checkpoint} on http://{args.host}:{args.port}/v1 "
          f"({engine.max_batch_size} sequences at once, {engine.max_seq_len} tokens each)", file=sys.stderr)
    # On SIGINT/SIGTERM uvicorn stops accepting connections, lets the open ones finish (a second
    # SIGINT cuts them off), then raises the signal again under the handlers it found: these
    # no-ops make that a normal exit (status 0) instead of death by signal.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


def main(argv: list[str] | None = None) -> int:
    """`python -m palm.serve`: `palm serve` on its own."""
    parser = argparse.ArgumentParser(prog="palm")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    try:
        args.func(args)
    except PalmError as e:
        print(f"palm serve: error: {e}", file=sys.stderr)
        return 1
    return 0
