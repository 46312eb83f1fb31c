"""The model's configuration: `PaLMConfig` (JSON round trip) and the registry of named presets.
Imports no torch, so the CLI starts fast."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from palm.errors import PalmError


@dataclass(frozen=True)
class PaLMConfig:
    """Hyper-parameters of a PaLM model. The defaults are those of the published 8k models."""

    num_tokens: int = 50304
    dim: int = 768
    depth: int = 12
    heads: int = 8
    dim_head: int = 128
    ff_mult: int = 4
    max_seq_len: int = 8192
    qk_rmsnorm: bool = False
    # palm-rlhf-pytorch 0.2.1-0.2.3 defines a qk-norm scale of 8 but never applies it: attention is
    # always scaled by dim_head ** -0.5. None reproduces that; set 8.0 to get the intended scale.
    attn_scale: float | None = None
    xpos_scale_base: int = 512
    attn_dropout: float = 0.0
    ff_dropout: float = 0.0
    # The reference ignores id 0 in the loss, which is GPT-NeoX's end-of-text, so its models never
    # learned to stop. -100 (nothing ignored) trains on EOS; 0 reproduces the reference's loss.
    loss_ignore_index: int = -100

    def __post_init__(self) -> None:
        for name in ("num_tokens", "dim", "depth", "heads", "dim_head", "ff_mult", "max_seq_len"):
            if getattr(self, name) < 1:
                raise PalmError(f"config: {name} must be a positive integer, got {getattr(self, name)}")
        if self.dim_head % 2:
            raise PalmError(f"config: dim_head must be even for rotary embeddings, got {self.dim_head}")
        for name in ("attn_dropout", "ff_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise PalmError(f"config: {name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def attn_inner_dim(self) -> int:
        return self.heads * self.dim_head

    @property
    def ff_inner_dim(self) -> int:
        return self.dim * self.ff_mult

    def replace(self, **changes: Any) -> PaLMConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PaLMConfig:
        if data.get("model_type") == "palm":  # a transformers config.json, written by `palm export hf`
            data = from_transformers_names(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PalmError(f"config: unknown field(s) {', '.join(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, path: str | Path) -> PaLMConfig:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PalmError(f"cannot read config {path}: {e}") from None
        if not isinstance(data, dict):
            raise PalmError(f"config {path}: expected a JSON object")
        return cls.from_dict(data)


# transformers' config names (`palm export hf`) for ours; ff_mult is intermediate_size / hidden_size
TRANSFORMERS_NAMES = {
    "num_tokens": "vocab_size", "dim": "hidden_size", "depth": "num_hidden_layers", "heads": "num_attention_heads",
    "dim_head": "head_dim", "max_seq_len": "max_position_embeddings", "qk_rmsnorm": "qk_rmsnorm",
    "attn_scale": "attn_scale", "xpos_scale_base": "xpos_scale_base", "attn_dropout": "attention_dropout",
    "ff_dropout": "ff_dropout", "loss_ignore_index": "loss_ignore_index",
}


def from_transformers_names(data: dict[str, Any]) -> dict[str, Any]:
    """Our fields from a transformers config of model_type "palm" (the other keys are dropped)."""
    fields = {ours: data[theirs] for ours, theirs in TRANSFORMERS_NAMES.items() if theirs in data}
    hidden, inner = data.get("hidden_size"), data.get("intermediate_size")
    if hidden and inner:
        if inner % hidden:
            raise PalmError(f"config: intermediate_size {inner} is not a multiple of hidden_size {hidden}")
        fields["ff_mult"] = inner // hidden
    return fields


# The published checkpoints (seed README; Hub repos conceptofmind/palm-150m, -410m, -1b, -2b).
PRESETS: dict[str, PaLMConfig] = {
    "palm_150m_8k_v0": PaLMConfig(dim=768, depth=12),
    "palm_410m_8k_v0": PaLMConfig(dim=1024, depth=24),
    "palm_1b_8k_v0": PaLMConfig(dim=2048, depth=16),
    "palm_2b_8k_v0": PaLMConfig(dim=2560, depth=24),
    # A few million parameters: CPU demos and tests. Its vocabulary fits the byte tokenizer
    # (257 ids) and small BPE tokenizers.
    "tiny": PaLMConfig(num_tokens=512, dim=256, depth=4, heads=4, dim_head=64, max_seq_len=1024),
}

ALIASES: dict[str, str] = {
    "150m": "palm_150m_8k_v0",
    "410m": "palm_410m_8k_v0",
    "1b": "palm_1b_8k_v0",
    "2b": "palm_2b_8k_v0",
}


def canonical_name(name: str) -> str | None:
    """The registry name for a preset name or alias, or None when it is not one."""
    name = ALIASES.get(name, name)
    return name if name in PRESETS else None


def get_config(name: str) -> PaLMConfig:
    """The config of a preset, by name or alias (`palm_410m_8k_v0`, `410m`, `tiny`)."""
    canonical = canonical_name(name)
    if canonical is None:
        choices = ", ".join([*PRESETS, *ALIASES])
        raise PalmError(f"unknown preset {name!r}; choose one of: {choices}")
    return PRESETS[canonical]


def preset_matching(config: PaLMConfig) -> str | None:
    """The name of the preset whose architecture equals `config` (ignoring training-only fields)."""
    training_only = dict(attn_dropout=0.0, ff_dropout=0.0, loss_ignore_index=-100)
    for name, preset in PRESETS.items():
        if preset.replace(**training_only) == config.replace(**training_only):
            return name
    return None
