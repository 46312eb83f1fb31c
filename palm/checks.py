"""Checks that several commands share, one helper each, so every command words a problem the same way."""

from __future__ import annotations

from palm.errors import PalmError


def check_at_least(flag: str, value: int | float, minimum: int | float) -> None:
    if not value >= minimum:  # written so that NaN fails too
        raise PalmError(f"{flag} must be at least {minimum}, got {value}")


def check_seq_len(seq_len: int) -> None:
    """A window needs an input token and a token to predict."""
    check_at_least("--seq_len", seq_len, 2)


def check_vocabulary(tokenizer, num_tokens: int) -> None:
    """The tokenizer's ids must all be rows of the model's embedding."""
    if tokenizer.vocab_size > num_tokens:
        raise PalmError(
            f"tokenizer {tokenizer.name} has {tokenizer.vocab_size:,} tokens but the model only {num_tokens:,}; "
            "use the tokenizer the model was trained with (or a model with a larger vocabulary)"
        )


def require_eos(tokenizer) -> int:
    """The tokenizer's end-of-text id; documents and responses end with it."""
    if tokenizer.eos_id is None:
        raise PalmError(f"tokenizer {tokenizer.name} has no end-of-text token; name one with --eos_token")
    return tokenizer.eos_id


def check_device(name: str | None) -> str:
    """`name` as a device this machine has (default: cuda where there is one, else cpu)."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PalmError(f"--device {name}: not a device (cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise PalmError(f"--device {name}: {why}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise PalmError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise PalmError(f"--device {name}: MPS is not available here")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise PalmError(f"--device {name}: palm runs on cpu, cuda or mps")
    return str(device)
