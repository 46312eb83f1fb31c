"""The `palm` command. Each subcommand is a plain function taking the parsed arguments."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from palm.errors import PalmError


def config_from_arg(value: str | None):
    """`--config`: a preset name or a JSON file written by `PaLMConfig.to_json`."""
    from palm.config import PaLMConfig, canonical_name, get_config

    if value is None:
        return None
    return get_config(value) if canonical_name(value) else PaLMConfig.from_json(value)


def cmd_info(args: argparse.Namespace) -> None:
    """Print a model's config, parameter count and dtype (a preset's without downloading it)."""
    import torch

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="palm", description="Load, run, train and fine-tune PaLM models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    source_help = "a preset name, a .pt or .safetensors file, a model directory, or a Hub repo id"
    config_help = "preset name or config.json to use instead of the inferred config"

    info = commands.add_parser("info", help=cmd_info.__doc__, description=cmd_info.__doc__)
    info.add_argument("source", help=source_help)
    info.add_argument("--config", help=config_help)
    info.set_defaults(func=cmd_info)

    convert = commands.add_parser("convert", help=cmd_convert.__doc__, description=cmd_convert.__doc__)
    convert.add_argument("src", help=source_help)
    convert.add_argument("dst", help="a .pt path (reference format) or a directory (palm format)")
    convert.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="cast the weights (default: keep)")
    convert.add_argument("--config", help=config_help)
    convert.add_argument("--overwrite", action="store_true", help="replace a model already at DST")
    convert.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except PalmError as e:
        print(f"palm {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
