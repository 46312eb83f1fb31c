"""The one table of floating-point types palm accepts by name (`--dtype`, `--precision`, `dtype=`).

Imports torch only when a name is turned into a torch dtype, so the CLI can list the choices
without loading it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from palm.errors import PalmError

if TYPE_CHECKING:
    import torch

# short name -> the torch attribute; the short names are the CLI's choices
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# torch's own names are accepted too
_ALIASES = {torch_name: short for short, torch_name in DTYPES.items()}


def dtype_name(dtype: str) -> str:
    """The short name (`fp32`, `bf16`, `fp16`) for a short or torch-style name."""
    name = _ALIASES.get(dtype, dtype)
    if name not in DTYPES:
        raise PalmError(f"unknown dtype {dtype!r}; choose one of: {', '.join([*DTYPES, *_ALIASES])}")
    return name


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from a name such as `bf16`, `fp16`, `fp32`, `float32` (None stays None)."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    return getattr(torch, DTYPES[dtype_name(dtype)])


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), as PyTorch detects it."""
    import torch

    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)
