"""Training runs' configurations, each from defaults, then a YAML file, then flags: the loop's
options (`RunConfig`), `palm train`'s (`TrainConfig`) and `palm finetune`'s (`FinetuneConfig`).
Imports no torch, so the CLI starts fast."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from palm.checks import check_at_least, check_seq_len
from palm.dtypes import DTYPES
from palm.errors import PalmError
from palm.hub import REPO_ID

OPTIMIZERS = ("adamw", "stable_adamw", "lion")
# The smallest value of each numeric option (of every run config; None means unset).
MINIMUMS = {"max_steps": 1, "max_tokens": 1, "batch_size": 1, "grad_accum": 1, "warmup_steps": 0, "weight_decay": 0,
            "grad_clip": 0, "seed": 0, "save_every": 1, "keep_last": 1, "eval_every": 1, "eval_windows": 1,
            "log_every": 1, "samples": 0, "lora_r": 1}
POSITIVE = ("lr", "peak_tflops", "lora_alpha")
SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class RunConfig:
    """What every training run has: the loop's options (see `palm.training.loop.run`)."""

    out_dir: str | None = None  # None: runs/<name>-<date>-<time>
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
    eval_windows: int = 128  # validation samples per evaluation
    log_every: int = 40
    resume: str | None = None  # a checkpoint directory, or "auto" for the newest in out_dir
    overwrite: bool = False  # replace the run already in out_dir
    push_to: str | None = None  # then upload the final model to this Hub model repo (palm push)
    private: bool = False  # with push_to: create the repo private
    trackers: list[str] = field(default_factory=list)  # tensorboard, wandb
    peak_tflops: float | None = None  # for MFU; None: known GPU peak, or measured on CPU
    samples: int = 3  # samples printed at the end

    @classmethod
    def from_sources(cls, yaml_path: str | None, overrides: dict) -> RunConfig:
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
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise PalmError(f"unknown training option(s): {', '.join(unknown)}")
        values = {name: _as_declared(name, value, fields[name].type) for name, value in values.items()}
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
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise PalmError(f"--{f.name} must be a finite number, got {value}")
            if f.name in MINIMUMS and value is not None:
                check_at_least(f"--{f.name}", value, MINIMUMS[f.name])
            if f.name in POSITIVE and value is not None and not value > 0:
                raise PalmError(f"--{f.name} must be positive, got {value}")
        if (self.max_steps is None) == (self.max_tokens is None):
            raise PalmError("give exactly one of --max_steps and --max_tokens")
        check_seq_len(self.seq_len)
        if not 0 <= self.min_lr <= self.lr:
            raise PalmError(f"need 0 <= --min_lr <= --lr, got {self.min_lr} and {self.lr}")
        if self.push_to is not None and not REPO_ID.match(self.push_to):
            raise PalmError(f"--push_to must be a Hub repo id (owner/name), got {self.push_to!r}")
        if self.resume is not None and self.overwrite:
            raise PalmError("--resume continues the run in --out_dir and --overwrite replaces it: give one of them")
        for tracker in self.trackers:
            if tracker not in ("tensorboard", "wandb"):
                raise PalmError(f"unknown tracker {tracker!r} (tensorboard, wandb)")


@dataclass
class TrainConfig(RunConfig):
    """`palm train`; defaults are the README's main job (the `tiny` preset learning the Python
    standard library's source, byte-level, in about ten minutes on two CPU cores)."""

    preset: str = "tiny"
    init_from: str | None = None  # anything palm.load takes; overrides preset
    data: str | None = None  # None: the Python standard library's source (.py files)
    val_data: str | None = None  # None: the data's validation split, or held-out stdlib files
    streaming: bool = False  # stream the data (a Hub dataset, or a built dataset's shards) instead of loading it whole
    tokenizer: str | None = None  # None: the one a built dataset records, else bytes


FINETUNE_METHODS = ("lora", "full")


@dataclass
class FinetuneConfig(RunConfig):
    """`palm finetune`; defaults fit the README's flow: LoRA on the main job's model, taught to
    answer the standard library's instruction set (a few minutes on two CPU cores)."""

    checkpoint: str | None = None  # anything palm.load takes (required)
    data: str | None = None  # None: instructions made from the Python standard library
    val_data: str | None = None
    val_fraction: float | None = None  # hold out this fraction of --data instead of --val_data
    split: str = "train"  # of a Hub dataset
    columns: str | None = None  # ours=theirs,... e.g. instruction=inputs,output=targets
    tokenizer: str = "bytes"
    eos_token: str | None = None  # default: from the tokenizer's config
    prompt_style: str = "alpaca"
    train_on_prompt: bool = False  # learn the prompts too, not only the replies
    method: str = "lora"
    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    lora_targets: str = "q,v"
    quantize: str | None = None  # int8: the frozen base weights stored as int8 (LoRA only)
    max_steps: int | None = 300
    seq_len: int = 512
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    weight_decay: float = 0.0
    save_every: int = 100
    eval_every: int = 100
    eval_windows: int = 64
    log_every: int = 20

    def check(self) -> None:
        super().check()
        if self.checkpoint is None:
            raise PalmError("--checkpoint is required: the model to fine-tune (anything palm.load takes)")
        if self.method not in FINETUNE_METHODS:
            raise PalmError(f"--method must be one of {', '.join(FINETUNE_METHODS)}, got {self.method!r}")
        if self.quantize not in (None, "int8"):
            raise PalmError(f"--quantize must be int8, got {self.quantize!r}")
        if self.quantize and self.method == "full":
            raise PalmError("--quantize int8 keeps the base weights frozen: it goes with --method lora, not full")
        if not 0 <= self.lora_dropout < 1:
            raise PalmError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.val_fraction is not None and not 0 < self.val_fraction < 1:
            raise PalmError(f"--val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.val_fraction is not None and self.val_data is not None:
            raise PalmError("give --val_data or --val_fraction, not both")

    def column_mapping(self) -> dict[str, str]:
        """--columns as {our field: the data's field}."""
        mapping = {}
        for item in filter(None, (self.columns or "").split(",")):
            ours, sep, theirs = item.partition("=")
            if not sep or not ours.strip() or not theirs.strip():
                raise PalmError(f"--columns: {item!r} is not ours=theirs (e.g. instruction=inputs,output=targets)")
            mapping[ours.strip()] = theirs.strip()
        return mapping


def _as_declared(name: str, value, declared: str):
    """`value` as the field's declared type (YAML 1.1 reads `1e-3` as a string, say), or one
    PalmError naming the option. Annotations are strings such as "int | None" here."""
    kind = declared.split(" ")[0]
    if value is None or kind not in ("int", "float", "bool"):
        return value
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            raise ValueError
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
        if kind == "int":
            if number != int(number):
                raise ValueError
            return int(number)
        return number
    except (TypeError, ValueError, OverflowError):
        raise PalmError(f"option {name}: expected {'true or false' if kind == 'bool' else f'a number ({kind})'}, "
                        f"got {value!r}") from None
