"""A training run's configuration (`TrainConfig`): defaults, then a YAML file, then flags.
Imports no torch, so the CLI starts fast."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from palm.checks import check_at_least, check_seq_len
from palm.dtypes import DTYPES
from palm.errors import PalmError

OPTIMIZERS = ("adamw", "stable_adamw", "lion")
SCHEDULES = ("cosine", "linear", "constant")


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
        choices = {"schedule": SCHEDULES, "optimizer": OPTIMIZERS, "precision": tuple(DTYPES)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise PalmError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("batch_size", "grad_accum", "save_every", "eval_every", "log_every", "keep_last"):
            check_at_least(f"--{name}", getattr(self, name), 1)
        if (self.max_steps is None) == (self.max_tokens is None):
            raise PalmError("give exactly one of --max_steps and --max_tokens")
        check_seq_len(self.seq_len)
        if not 0 <= self.min_lr <= self.lr:
            raise PalmError(f"need 0 <= --min_lr <= --lr, got {self.min_lr} and {self.lr}")
        for tracker in self.trackers:
            if tracker not in ("tensorboard", "wandb"):
                raise PalmError(f"unknown tracker {tracker!r} (tensorboard, wandb)")
