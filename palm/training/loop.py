"""The training loop on Hugging Face accelerate: one CPU to many GPUs (DDP, FSDP, DeepSpeed), exact resume.

What is trained, on what data, with which loss, and how the result is saved comes from a `Task`
(`palm train`'s is `palm.training.pretrain.Pretraining`, `palm finetune`'s
`palm.training.finetune.Finetuning`); the loop owns the rest: the run directory, accelerate,
optimizer and schedule, accumulation and clipping, checkpoints and exact resume, evaluation,
metrics and progress. It trains palm's PaLM models (plain or with adapters): FLOPs per token come
from the model's config and activation checkpointing wraps its blocks. The model knows nothing of
this module: parallelism, precision, activation checkpointing and compilation are applied from
outside.

    out_dir/palm_run.json          marks the directory as a palm run (--overwrite replaces no other)
    out_dir/.lock                  held by the process writing the run
    out_dir/config.yaml            resolved configuration
    out_dir/metrics.jsonl          one JSON object per optimizer step and per evaluation
    out_dir/checkpoints/step-N/    see palm.training.checkpoints
    out_dir/model/                 the final model, as the task saves it
    out_dir/loss.png               the loss curve
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import fcntl
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from palm.dtypes import cpu_has_native_bf16
from palm.errors import PalmError, Stopped
from palm.files import check_output_directory
from palm.training.checkpoints import resolve_resume, save_checkpoint
from palm.training.config import RunConfig
from palm.training.metrics import MetricsLog, flops_per_token, memory_in_use, peak_flops, plot_losses
from palm.training.optim import learning_rate, make_optimizer

MAX_NONFINITE_IN_A_ROW = 5


class Task(abc.ABC):
    """What a run trains, on what, and how the result is saved."""

    #: names the default run directory, runs/<name>-<date>-<time>
    name: str

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """The model to train, fp32 on the CPU; called once per process, after seeding."""

    @abc.abstractmethod
    def training_batches(self, model: nn.Module, rank: int, world_size: int) -> Iterator:
        """Endless batches for process `rank` of `world_size`, resumable: `state_dict()` and
        `load_state_dict()` give and restore the exact position."""

    @abc.abstractmethod
    def validation_batches(self, rank: int, world_size: int, max_samples: int) -> Iterable | None:
        """This process's share of the first `max_samples` validation samples, in batches; None
        when there is no validation data."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch) -> Tensor:
        """The mean loss of one batch (already on the model's device)."""

    @abc.abstractmethod
    def save_model(self, state_dict: dict[str, Tensor], directory: Path) -> None:
        """Write a loadable model into `directory` from the full (gathered) state dict; used for
        the `model/` of each checkpoint."""

    def save_final(self, state_dict: dict[str, Tensor], out_dir: Path) -> Path:
        """Write the trained model into the run directory; returns the directory to load it from."""
        self.save_model(state_dict, out_dir / "model")
        return out_dir / "model"

    def count_tokens(self, batch) -> int:
        """The tokens a batch holds, for tokens/s and MFU (padding excluded)."""
        return batch.numel()

    def describe(self) -> list[str]:
        """Lines on the model and data for the run's header (called after `training_batches`)."""
        return []

    def inputs(self) -> list[str]:
        """The local paths the run reads (data, starting weights): the run directory must not hold them."""
        return []

    def finish(self, model: nn.Module, directory: Path, device: torch.device) -> None:
        """Called on the main process once the final model is saved in `directory` (e.g. to say
        how to use it, and print samples)."""


def run(config: RunConfig, task: Task, *, progress: bool = True) -> Path:
    """Train `task` as `config` says; returns the directory of the final model."""
    from accelerate.utils import set_seed

    _check_trackers_installed(config.trackers)
    out_dir = run_directory(config, task.name)
    _check_writable(out_dir)
    replace = False
    if config.resume is None:
        replace = check_output_directory(out_dir, flag="--out_dir", marker=RUN_MARKERS, overwrite=config.overwrite,
                                         what="a run (--resume auto continues it)", inputs=task.inputs(),
                                         scaffolding=(".lock", RUN_MARKERS[0], "config.yaml"))

    created = not out_dir.exists()
    accelerator = _accelerator(config, out_dir)
    say = accelerator.print
    lock = _claim(out_dir, replace) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    try:  # a start that fails leaves no run directory behind it
        resume_from = resolve_resume(config.resume, out_dir, warn=say)
        set_seed(config.seed)
        if config.precision == "bf16" and accelerator.device.type == "cpu" and not cpu_has_native_bf16():
            say("warning: this CPU has no native bf16 (AVX512-BF16 or AMX); bf16 autocast will be slower than fp32")

        model = task.build_model()
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        partial = len(trainable) < len(list(model.parameters()))
        if partial:
            _checkpoint_trainable_only(accelerator, trainable)
        rank, world = accelerator.process_index, accelerator.num_processes
        loader = task.training_batches(model, rank, world)

        tokens_per_step = config.batch_size * config.seq_len * config.grad_accum * world
        max_steps = config.max_steps or math.ceil(config.max_tokens / tokens_per_step)

        if config.activation_checkpointing:
            _checkpoint_blocks(model)
        optimizer = make_optimizer(model, config.optimizer, config.lr, config.weight_decay,
                                   fused=accelerator.device.type == "cuda")
        model, optimizer = accelerator.prepare(model, optimizer)
        if config.compile:
            model = torch.compile(model)

        step, tokens_seen, nonfinite_in_a_row = 0, 0, 0
        if resume_from is not None:
            accelerator.load_state(str(resume_from), strict=not partial)
            if partial:
                _check_holds(resume_from, trainable)
            state = json.loads((resume_from / "trainer_state.json").read_text())
            step, tokens_seen = state["step"], state["tokens"]
            loader.load_state_dict(json.loads((resume_from / f"data_rank{rank}.json").read_text()))
            say(f"resumed from {resume_from} at step {step}")

        resolved = _to_yaml({**dataclasses.asdict(config), "out_dir": str(out_dir), "max_steps": max_steps})
        if accelerator.is_main_process:
            (out_dir / "config.yaml").write_text(resolved)
        metrics = MetricsLog(out_dir / "metrics.jsonl", accelerator.is_main_process, step if resume_from else None)
        if config.trackers:
            # One wandb project ("palm") with a run per run directory; tensorboard writes to <out_dir>/palm.
            accelerator.init_trackers("palm", config={k: str(v) for k, v in dataclasses.asdict(config).items()},
                                      init_kwargs={"wandb": {"name": out_dir.name}})

        unwrapped = accelerator.unwrap_model(model)
        n_params = sum(p.numel() for p in unwrapped.parameters())
        n_trainable = sum(p.numel() for p in unwrapped.parameters() if p.requires_grad)
        flops = flops_per_token(unwrapped.config, n_params, config.seq_len)
        peak, peak_source = (config.peak_tflops * 1e12, "--peak_tflops") if config.peak_tflops else peak_flops(accelerator.device, config.precision)
        say("\n".join([
            resolved.rstrip(),
            *task.describe(),
            f"parameters: {n_params / 1e6:.1f}M, {n_trainable:,} trained ({100 * n_trainable / n_params:.2f}%)",
            f"{world} process(es) x {config.batch_size} x {config.grad_accum} windows of {config.seq_len} tokens = "
            f"{tokens_per_step:,} tokens per step, {max_steps:,} steps",
            f"MFU against {peak / 1e12:.2f} TFLOP/s per device ({peak_source})",
        ]))
    except BaseException:
        if created and lock is not None:
            lock.close()
            shutil.rmtree(out_dir, ignore_errors=True)
        raise

    bar = _progress(progress and accelerator.is_main_process, step, max_steps)
    last_saved = resume_from
    window_start, window_tokens = time.perf_counter(), 0
    stop = _StopRequests()
    while step < max_steps:
        model.train()
        lr = learning_rate(step, lr=config.lr, min_lr=config.min_lr, warmup_steps=config.warmup_steps,
                           max_steps=max_steps, schedule=config.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        totals = torch.zeros(3, device=accelerator.device)  # loss, tokens, stop requests
        for micro in range(config.grad_accum):
            batch = _to_device(next(loader), accelerator.device)
            sync = micro == config.grad_accum - 1
            with _maybe_no_sync(accelerator, model, sync), accelerator.autocast():
                loss = task.loss(model, batch) / config.grad_accum
                accelerator.backward(loss)
            totals[:2] += torch.stack([loss.detach().float(), torch.tensor(float(task.count_tokens(batch)), device=totals.device)])
            # Drop the spent graph before the next forward: alive, it keeps the CPU allocator from
            # reusing the activations' memory (measured: peak RSS +0.3-0.6 GiB a step, 410m LoRA).
            del loss, batch
        totals[2] = float(stop.signal is not None)  # reduced with the rest, so every process stops at the same step
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf"))
        totals = accelerator.reduce(totals, "sum")
        step_loss, step_tokens = totals[0] / world, int(totals[1].item())
        if not torch.isfinite(step_loss):
            optimizer.zero_grad(set_to_none=True)
            nonfinite_in_a_row += 1
            say(f"warning: step {step + 1}: loss is {step_loss.item()}; skipped this step")
            if nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                kept = f"; last good checkpoint: {last_saved}" if last_saved else ""
                raise PalmError(f"stopping: the loss was not finite {nonfinite_in_a_row} steps in a row{kept}")
            continue
        nonfinite_in_a_row = 0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += step_tokens
        window_tokens += step_tokens

        elapsed = time.perf_counter() - window_start
        tokens_per_sec = window_tokens / elapsed
        record = {"step": step, "loss": step_loss.item(), "lr": lr, "grad_norm": float(grad_norm),
                  "tokens": tokens_seen, "tokens_per_sec": tokens_per_sec}
        metrics.write(record)
        if config.trackers:
            accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"loss {record['loss']:.3f}, {tokens_per_sec:,.0f} tok/s")
        if step % config.log_every == 0 or step == max_steps:
            achieved = tokens_per_sec * flops / world  # FLOP/s per device, from the tokens of all processes
            if achieved > peak and peak_source.startswith("measured"):
                # A measured peak is only a lower bound: the start-up matmul may have shared the cores.
                peak = max(peak, peak_flops(accelerator.device, config.precision)[0])
            mfu = f"MFU {100 * achieved / peak:.1f}%" if achieved <= peak else "MFU n/a (achieved FLOP/s above the peak; set --peak_tflops)"
            _write(bar, say, f"step {step}/{max_steps} | loss {record['loss']:.4f} | lr {lr:.2e} | grad norm "
                             f"{record['grad_norm']:.3f} | {tokens_per_sec:,.0f} tok/s | {mfu} | "
                             f"mem {memory_in_use(accelerator.device)}")
            window_start, window_tokens = time.perf_counter(), 0
        if step % config.eval_every == 0 or step == max_steps:
            val_loss = evaluate(model, task, config.eval_windows, accelerator)
            if val_loss is not None:
                metrics.write({"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))})
                if config.trackers:
                    accelerator.log({"val_loss": val_loss}, step=step)
                _write(bar, say, f"step {step}: validation loss {val_loss:.4f}, perplexity {math.exp(min(val_loss, 50)):.2f}")
                window_start, window_tokens = time.perf_counter(), 0
        stopping = totals[2].item() > 0
        if (step % config.save_every == 0 and step < max_steps) or stopping:
            state = {"step": step, "tokens": tokens_seen, "max_steps": max_steps}
            last_saved = save_checkpoint(accelerator, model, task.save_model, out_dir, step, state, loader, config.keep_last)
            window_start, window_tokens = time.perf_counter(), 0
        if stopping:
            if bar is not None:
                bar.close()
            stop.restore()
            name, code = stop.describe()
            raise Stopped(f"stopped by {name} at step {step}/{max_steps}; saved {last_saved}. To continue, run the "
                          f"same command with --out_dir {out_dir} --resume auto", code)
    stop.restore()
    if bar is not None:
        bar.close()

    full_state = accelerator.get_state_dict(model)
    final_dir = out_dir / "model"
    if accelerator.is_main_process:
        final_dir = task.save_final(full_state, out_dir)
        plot_losses(out_dir / "metrics.jsonl", out_dir / "loss.png")
        task.finish(accelerator.unwrap_model(model), final_dir, accelerator.device)
    if config.trackers:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    if lock is not None:
        lock.close()
    return final_dir


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, max_samples: int, accelerator) -> float | None:
    """Mean validation loss over the first `max_samples` samples, across all processes (weighted
    by batch size); None when the task has no validation data."""
    from accelerate.utils import find_batch_size

    world = accelerator.num_processes
    limit = max(world, max_samples // world * world)  # every process runs the same number of batches
    batches = task.validation_batches(accelerator.process_index, world, limit)
    if batches is None:
        return None
    model.eval()
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    for batch in batches:
        batch = _to_device(batch, accelerator.device)
        with accelerator.autocast():
            loss = task.loss(model, batch)
        size = find_batch_size(batch)
        total += torch.stack([loss.double() * size, torch.tensor(size, dtype=torch.float64, device=total.device)])
    total = accelerator.reduce(total, "sum")
    model.train()
    return (total[0] / total[1]).item() if total[1] > 0 else float("nan")


def run_directory(config: RunConfig, name: str) -> Path:
    if config.out_dir is not None:
        return Path(config.out_dir)
    if config.resume == "auto":
        raise PalmError("--resume auto needs the --out_dir of the run to continue")
    if config.resume is not None:
        return Path(config.resume).resolve().parent.parent  # <run>/checkpoints/step-N
    return Path(f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def _accelerator(config: RunConfig, out_dir: Path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if config.precision == "fp16" and not torch.cuda.is_available():
        raise PalmError("--precision fp16 needs a GPU; use bf16 on CPU")
    # accelerate warns on every save that it stored the tied output projection once; palm re-ties it.
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    # accelerate keeps its settings process-wide; a second run in one (non-distributed) process,
    # say fp32 then bf16, must not inherit the first one's.
    if AcceleratorState._shared_state and not torch.distributed.is_initialized():
        AcceleratorState._reset_state(reset_partial_state=True)
    # cpu=True where there is no accelerator, so that torchrun's processes join one gloo group
    cpu = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    mixed = "no" if config.precision == "fp32" else config.precision
    return Accelerator(cpu=cpu, mixed_precision=mixed, log_with=config.trackers or None, project_dir=str(out_dir))


def _checkpoint_trainable_only(accelerator, trainable: set[str]) -> None:
    """Checkpoints of a model with frozen parameters (LoRA) hold only what trains; the task
    rebuilds the rest. Sharded engines save on their own terms, so they are not offered here."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise PalmError("a model with frozen parameters (LoRA) trains on one process or with DDP, not FSDP/DeepSpeed; "
                        "use --method full for those")

    def keep_trainable(models, weights, output_dir):
        for state in weights:
            for key in [k for k in state if k.removeprefix("module.") not in trainable]:
                del state[key]

    accelerator.register_save_state_pre_hook(keep_trainable)


def _check_holds(checkpoint: Path, trainable: set[str]) -> None:
    from safetensors import safe_open

    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        saved = {key.removeprefix("module.") for key in f.keys()}
    missing = sorted(trainable - saved)
    if missing:
        raise PalmError(f"{checkpoint} does not hold {missing[0]}: it was written for another model or adapter setup")


def _to_device(batch, device: torch.device):
    from accelerate.utils import send_to_device

    return send_to_device(batch, device, non_blocking=True)


def _check_trackers_installed(trackers: list[str]) -> None:
    # accelerate silently drops a tracker whose package is missing; say so instead.
    import accelerate.utils

    installed = {"tensorboard": accelerate.utils.is_tensorboard_available, "wandb": accelerate.utils.is_wandb_available}
    for name in trackers:
        if not installed[name]():
            raise PalmError(f"--trackers {name} needs the {name} package: pip install {name}")


def _checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of storing them."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    from palm.model import Residual

    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Residual))


def _maybe_no_sync(accelerator, model, sync: bool):
    return contextlib.nullcontext() if sync else accelerator.no_sync(model)


RUN_MARKERS = ("palm_run.json", "metrics.jsonl")  # a directory holding either is a run of palm's


def _claim(out_dir: Path, replace: bool):
    """Create the run directory, hold its lock for this process's lifetime (so that two runs
    cannot write one directory), empty it when replacing an earlier run, and mark it as palm's."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = open(out_dir / ".lock", "a+")
    except OSError as e:
        raise PalmError(f"--out_dir {out_dir}: cannot create it ({e.strerror or e})") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise PalmError(f"--out_dir {out_dir} is in use by {holder}; wait for it to finish or use another --out_dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"palm process {os.getpid()}")
    lock.flush()
    if replace:
        for entry in out_dir.iterdir():
            if entry.name != ".lock":
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    marker = out_dir / RUN_MARKERS[0]
    if not marker.exists():
        marker.write_text(json.dumps({"tool": "palm", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
    return lock


class _StopRequests:
    """Catches SIGINT and SIGTERM during training so the loop can finish its step, save and stop;
    a second signal acts at once, as if none were caught."""

    def __init__(self):
        self.signal = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self.previous[number] = signal.signal(number, self._requested)

    def _requested(self, number, frame) -> None:
        self.signal = number
        self.restore()

    def restore(self) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}

    def describe(self) -> tuple[str, int]:
        """(signal name, the exit code a shell gives a process it ends)."""
        number = self.signal or signal.SIGTERM
        return signal.Signals(number).name, 128 + number


def _check_writable(out_dir: Path) -> None:
    probe = out_dir
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise PalmError(f"--out_dir {out_dir}: {probe} is not a writable directory")


def _progress(enabled: bool, step: int, total: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=step, unit="step", file=sys.stderr, dynamic_ncols=True, desc="train")


def _write(bar, say, line: str) -> None:
    if bar is not None:
        bar.write(line, file=sys.stdout)
    else:
        say(line)


def _to_yaml(values: dict) -> str:
    import yaml

    return yaml.safe_dump(values, sort_keys=False)
