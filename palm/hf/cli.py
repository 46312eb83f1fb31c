"""`palm export hf` and `palm push`, added to the `palm` command by `add_commands`."""

from __future__ import annotations

import argparse

from palm.dtypes import DTYPES


def cmd_export(args: argparse.Namespace) -> None:
    """Write a model as a directory that transformers and palm both load (or a palm LoRA adapter as a peft adapter)."""
    from palm.hf.export import export_hf

    out = export_hf(args.src, args.out, tokenizer=args.tokenizer, dtype=args.dtype,
                    max_shard_size=args.max_shard_size, overwrite=args.overwrite, base_model=args.base_model)
    print(f"wrote {out} (transformers: AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True))")
    if args.push_to:
        _push(out, args.push_to, args)


def cmd_push(args: argparse.Namespace) -> None:
    """Upload a model or adapter directory to the Hugging Face Hub with a model card (exported first if needed)."""
    _push(args.dir, args.repo, args)


def _push(directory, repo: str, args: argparse.Namespace) -> None:
    from palm.hf.push import push

    url = push(directory, repo, private=args.private, revision=args.revision, license=args.license,
               tokenizer=getattr(args, "tokenizer", "auto"))
    print(f"pushed {directory} to https://huggingface.co/{repo} ({url})")


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of every command that uploads to the Hub."""
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", help="branch to commit to (created from main if needed; default: main)")
    parser.add_argument("--license", help="license for the model card's metadata (default: other)")


def add_commands(subparsers) -> None:
    """Add `export` and `push` to the `palm` command's subparsers."""
    tokenizer_help = ("'bytes', a tokenizer.json, a directory or a Hub repo; 'auto' (default): the one beside the model "
                      "or named by its run's config.yaml, else GPT-NeoX's for the published checkpoints; 'none': no tokenizer files")
    export = subparsers.add_parser("export", help=cmd_export.__doc__, description=cmd_export.__doc__)
    export.add_argument("format", choices=["hf"], help="hf: Hugging Face transformers (AutoModelForCausalLM) and peft")
    export.add_argument("src", help="a preset name, a .pt or .safetensors file, a model or adapter directory, or a Hub repo id")
    export.add_argument("out", help="directory to write")
    export.add_argument("--tokenizer", default="auto", help=tokenizer_help)
    export.add_argument("--dtype", choices=DTYPES, help="cast the weights (default: keep)")
    export.add_argument("--max_shard_size", default="5GB", help="split model.safetensors above this size (default: %(default)s)")
    export.add_argument("--base_model", help="for an adapter: the exported base model (directory or Hub repo) to name in adapter_config.json")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    export.add_argument("--push_to", help="then upload OUT to this Hub model repo, e.g. you/palm-410m")
    add_push_arguments(export)
    export.set_defaults(func=cmd_export)

    push = subparsers.add_parser("push", help=cmd_push.__doc__, description=cmd_push.__doc__)
    push.add_argument("dir", help="a directory from palm export hf, palm.save_pretrained, a run's model/ or adapter/")
    push.add_argument("repo", help="Hub model repo id, e.g. you/palm-tiny")
    push.add_argument("--tokenizer", default="auto", help="when DIR needs exporting first: " + tokenizer_help)
    add_push_arguments(push)
    push.set_defaults(func=cmd_push)
