"""Configuration: the model (`PaLMConfig`, JSON round trip, named presets) and a training run
(`TrainConfig`, from YAML and flags). Imports no torch, so the CLI starts fast."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
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


OPTIMIZERS = ("adamw", "stable_adamw", "lion")
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Everything a run needs; defaults are the README's main job (the `tiny` preset learning the
    Python standard library's source, byte-level, in about ten minutes on two CPU cores)."""

    preset: str = "tiny"
    init_from: str | None = None  # anything palm.load takes; overrides preset
    data: str | None = None  # None: the Python standard library's source (.py files)
    val_data: str | None = None  # None: the data's validation split, or held-out stdlib files
    streaming: bool = False  # stream a Hub dataset instead of downloading it
    tokenizer: str = "bytes"
    out_dir: str | None = None  # None: runs/<preset>-<date>-<time>
    max_steps: int | None = 480
    max_tokens: int | None = None  # instead of max_steps
    batch_size: int = 8  # per process and micro-batch
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 40
    weight_decay: float = 0.1
    schedule: str = "cosine"
    optimizer: str = "adamw"
    precision: str = "fp32"
    grad_clip: float = 1.0  # 0: no clipping
    activation_checkpointing: bool = False
    compile: bool = False
    seed: int = 0
    save_every: int = 120
    keep_last: int = 2
    eval_every: int = 120
    eval_windows: int = 128  # validation windows per evaluation
    log_every: int = 40
    resume: str | None = None  # a checkpoint directory, or "auto" for the newest in out_dir
    trackers: list[str] = field(default_factory=list)  # tensorboard, wandb
    peak_tflops: float | None = None  # for MFU; None: known GPU peak, or measured on CPU
    samples: int = 3  # samples printed at the end

    @classmethod
    def from_sources(cls, yaml_path: str | None, overrides: dict) -> TrainConfig:
        """Defaults, then a YAML file, then command-line overrides."""
        values: dict = {}
        if yaml_path is not None:
            import yaml

            try:
                values = yaml.safe_load(Path(yaml_path).read_text()) or {}
            except (OSError, yaml.YAMLError) as e:
                raise PalmError(f"--config {yaml_path}: {str(e).splitlines()[0]}") from None
            if not isinstance(values, dict):
                raise PalmError(f"--config {yaml_path}: expected a mapping of option: value")
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise PalmError(f"unknown training option(s): {', '.join(unknown)}")
        if isinstance(values.get("trackers"), str):
            values["trackers"] = [t for t in values["trackers"].split(",") if t]
        if values.get("max_tokens") is not None and overrides.get("max_steps") is None:
            values["max_steps"] = None
        config = cls(**values)
        config.check()
        return config

    def check(self) -> None:
        choices = {"schedule": SCHEDULES, "optimizer": OPTIMIZERS, "precision": PRECISIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise PalmError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        positive = ("batch_size", "grad_accum", "seq_len", "save_every", "eval_every", "log_every", "keep_last")
        for name in positive:
            if getattr(self, name) < 1:
                raise PalmError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if (self.max_steps is None) == (self.max_tokens is None):
            raise PalmError("give exactly one of --max_steps and --max_tokens")
        if self.seq_len < 2:
            raise PalmError(f"--seq_len must be at least 2, got {self.seq_len}")
        if not 0 <= self.min_lr <= self.lr:
            raise PalmError(f"need 0 <= --min_lr <= --lr, got {self.min_lr} and {self.lr}")
        for tracker in self.trackers:
            if tracker not in ("tensorboard", "wandb"):
                raise PalmError(f"unknown tracker {tracker!r} (tensorboard, wandb)")
