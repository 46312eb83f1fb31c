"""Training on Hugging Face accelerate: one CPU to many GPUs (DDP, FSDP, DeepSpeed), exact resume.

The model knows nothing of this module: parallelism, precision, activation checkpointing and
compilation are applied from outside, and checkpoints are accelerate's state plus our own files:

    out_dir/config.yaml            resolved configuration
    out_dir/metrics.jsonl          one JSON object per optimizer step and per evaluation
    out_dir/checkpoints/step-N/    accelerate state (model, optimizer, grad scaler, RNG per rank),
                                   trainer_state.json, data_rank{r}.json, model/ (palm format)
    out_dir/model/                 the final model, for `palm generate --checkpoint`
    out_dir/loss.png               the loss curve
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch

from palm.config import TrainConfig
from palm.errors import PalmError
from palm.optim import learning_rate, make_optimizer

CHECKPOINT_PATTERN = re.compile(r"step-(\d+)")
MAX_NONFINITE_IN_A_ROW = 5
SAMPLE_PROMPTS = ("def ", "class ", "import ")


def stdlib_files() -> list[Path]:
    """The Python standard library's own .py source (tests and site-packages left out): a corpus
    that exists offline on every machine that runs palm."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
    if not files:
        raise PalmError(f"found no Python sources under {root}; pass --data")
    return files


def open_training_data(config: TrainConfig, tokenizer):
    """(train data, validation data or None) for the config."""
    from palm.data import open_data

    if config.data is None:
        files = stdlib_files()
        val_files, train_files = files[::20], [f for i, f in enumerate(files) if i % 20]
        train = open_data(train_files, tokenizer=tokenizer, seq_len=config.seq_len)
        val = open_data(val_files, tokenizer=tokenizer, seq_len=config.seq_len)
        return train, val
    train = open_data(config.data, "train", tokenizer=tokenizer, seq_len=config.seq_len, streaming=config.streaming)
    if config.val_data is not None:
        return train, _open_validation(config.val_data, config, tokenizer, required=True)
    if train.in_memory:
        return train, None  # raw text files have no validation split: pass --val_data for evaluation
    return train, _open_validation(config.data, config, tokenizer, required=False)


def _open_validation(source: str, config: TrainConfig, tokenizer, required: bool):
    """The validation split of a built or Hub dataset (else, for --val_data, its train split or
    raw text); None when the data has no validation split and none was asked for."""
    from palm.data import open_data

    try:
        return open_data(source, "validation", tokenizer=tokenizer, seq_len=config.seq_len, streaming=config.streaming)
    except PalmError:
        if not required:
            return None
    return open_data(source, "train", tokenizer=tokenizer, seq_len=config.seq_len, streaming=config.streaming)


def build_model(config: TrainConfig):
    from palm.checkpoint import load
    from palm.config import get_config
    from palm.model import PaLM

    if config.init_from is not None:
        return load(config.init_from, dtype=torch.float32)
    return PaLM(get_config(config.preset))


def flops_per_token(model_config, num_parameters: int, seq_len: int) -> float:
    """Training FLOPs per token, 6N + 12LHQT (PaLM paper, appendix B), N counting every parameter."""
    c = model_config
    return 6 * num_parameters + 12 * c.depth * c.heads * c.dim_head * seq_len


GPU_PEAK_TFLOPS = {  # dense bf16/fp16 tensor-core peaks from the vendors' data sheets
    "H200": 989.5, "H100": 989.5, "A100": 312.0, "L40S": 362.1, "A10": 125.0, "L4": 121.0, "4090": 165.2,
}


def peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    """The device's peak FLOP/s and where that figure comes from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"{name} data-sheet dense bf16 peak"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.bfloat16
    n = 1536
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(4):  # the best of a few: a busy machine only ever makes a matmul slower
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best, f"measured {n}x{n} {str(dtype)[6:]} matmul"


def _check_trackers_installed(trackers: list[str]) -> None:
    # accelerate silently drops a tracker whose package is missing; say so instead.
    import accelerate.utils

    installed = {"tensorboard": accelerate.utils.is_tensorboard_available, "wandb": accelerate.utils.is_wandb_available}
    for name in trackers:
        if not installed[name]():
            raise PalmError(f"--trackers {name} needs the {name} package: pip install {name}")


def memory_in_use(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    import psutil

    return f"{psutil.Process().memory_info().rss / 2**30:.1f} GiB RSS"


# -------------------------------------------------------------------------------------------------
# Checkpoints


def complete_checkpoints(out_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (a save interrupted midway is a `.tmp` directory)."""
    directory = out_dir / "checkpoints"
    found = [p for p in directory.iterdir() if CHECKPOINT_PATTERN.fullmatch(p.name)] if directory.is_dir() else []
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.fullmatch(p.name).group(1)))


def save_checkpoint(accelerator, model, model_config, out_dir: Path, step: int, trainer_state: dict, loader, keep_last: int) -> Path:
    """Write a checkpoint into a temporary directory and rename it into place once every process
    has written its part, so that a crash at any moment leaves the previous checkpoints intact."""
    from palm.checkpoint import save_state_dict

    final = out_dir / "checkpoints" / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        full_state = accelerator.get_state_dict(model)  # gathered on the main process under FSDP
        (tmp / f"data_rank{accelerator.process_index}.json").write_text(json.dumps(loader.state_dict()))
        if accelerator.is_main_process:
            save_state_dict(full_state, model_config, tmp / "model")
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    except OSError as e:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = complete_checkpoints(out_dir)
        kept = f"; {previous[-1]} is intact" if previous else ""
        raise PalmError(f"could not write checkpoint {final} ({e.strerror or e}){kept}") from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fsync_tree(tmp)
        if final.exists():  # resumed from an earlier checkpoint: this step's old one is superseded
            superseded = final.with_name(final.name + ".old")
            shutil.rmtree(superseded, ignore_errors=True)
            final.rename(superseded)
            tmp.rename(final)
            shutil.rmtree(superseded)
        else:
            tmp.rename(final)
        for old in complete_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def resolve_resume(config: TrainConfig, out_dir: Path) -> Path | None:
    if config.resume is None:
        if complete_checkpoints(out_dir):
            raise PalmError(f"{out_dir} already holds checkpoints; pass --resume auto to continue that run, or another --out_dir")
        return None
    if config.resume == "auto":
        found = complete_checkpoints(out_dir)
        return found[-1] if found else None  # nothing yet: start from scratch
    path = Path(config.resume)
    if not (path / "trainer_state.json").is_file():
        raise PalmError(f"--resume {path}: not a complete palm training checkpoint")
    return path


# -------------------------------------------------------------------------------------------------
# The run


class MetricsLog:
    """`metrics.jsonl`, written by the main process; on resume, entries after the resumed step go."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            keep = []
            if resume_step is not None:
                keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in keep))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def train(config: TrainConfig, *, progress: bool = True) -> Path:
    """Run training; returns the directory of the final model."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from palm.checkpoint import save_state_dict
    from palm.data import make_loader
    from palm.model import next_token_loss
    from palm.tokenizer import load_tokenizer

    _check_trackers_installed(config.trackers)
    if config.out_dir is not None:
        out_dir = Path(config.out_dir)
    elif config.resume == "auto":
        raise PalmError("--resume auto needs the --out_dir of the run to continue")
    elif config.resume is not None:
        out_dir = Path(config.resume).resolve().parent.parent  # <run>/checkpoints/step-N
    else:
        out_dir = Path(f"runs/{config.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    _check_writable(out_dir)
    resume_from = resolve_resume(config, out_dir)

    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[config.precision]
    if mixed == "fp16" and not torch.cuda.is_available():
        raise PalmError("--precision fp16 needs a GPU; use bf16 on CPU")
    # accelerate warns on every save that it stored the tied output projection once; palm re-ties it.
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    _forget_previous_run()
    # cpu=True where there is no accelerator, so that torchrun's processes join one gloo group
    cpu = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed, log_with=config.trackers or None, project_dir=str(out_dir))
    say = accelerator.print
    set_seed(config.seed)
    if config.precision == "bf16" and accelerator.device.type == "cpu" and not _cpu_has_bf16():
        say("warning: this CPU has no native bf16 (AVX512-BF16 or AMX); bf16 autocast will be slower than fp32")

    tokenizer = load_tokenizer(config.tokenizer)
    model = build_model(config)
    model_config = model.config
    if tokenizer.vocab_size > model_config.num_tokens:
        raise PalmError(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size:,} tokens but the model only "
                        f"{model_config.num_tokens:,}; use a model with a larger vocabulary")
    if config.seq_len > model_config.max_seq_len:
        raise PalmError(f"--seq_len {config.seq_len} exceeds the model's max_seq_len {model_config.max_seq_len}")

    train_data, val_data = open_training_data(config, tokenizer)
    if train_data.vocab_size is not None and train_data.vocab_size > model_config.num_tokens:
        raise PalmError(f"{train_data.source} was tokenized with a vocabulary of {train_data.vocab_size:,}, "
                        f"larger than the model's {model_config.num_tokens:,}")
    rank, world = accelerator.process_index, accelerator.num_processes
    loader = make_loader(train_data, config.seq_len, config.batch_size, seed=config.seed, rank=rank, world_size=world)

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
        accelerator.load_state(str(resume_from))
        state = json.loads((resume_from / "trainer_state.json").read_text())
        step, tokens_seen = state["step"], state["tokens"]
        loader.load_state_dict(json.loads((resume_from / f"data_rank{rank}.json").read_text()))
        say(f"resumed from {resume_from} at step {step}")

    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(_to_yaml({**dataclasses.asdict(config), "out_dir": str(out_dir), "max_steps": max_steps}))
    metrics = MetricsLog(out_dir / "metrics.jsonl", accelerator.is_main_process, step if resume_from else None)
    if config.trackers:
        # One wandb project ("palm") with a run per run directory; tensorboard writes to <out_dir>/palm.
        accelerator.init_trackers("palm", config={k: str(v) for k, v in dataclasses.asdict(config).items()},
                                  init_kwargs={"wandb": {"name": out_dir.name}})

    n_params = accelerator.unwrap_model(model).num_parameters()
    flops = flops_per_token(model_config, n_params, config.seq_len)
    peak, peak_source = (config.peak_tflops * 1e12, "--peak_tflops") if config.peak_tflops else peak_flops(accelerator.device, config.precision)
    say(_describe_run(config, out_dir, model_config, n_params, train_data, val_data, world, tokens_per_step, max_steps, peak, peak_source))

    bar = _progress(progress and accelerator.is_main_process, step, max_steps)
    ignore_index = model_config.loss_ignore_index
    last_saved = resume_from
    window_start, window_tokens = time.perf_counter(), 0
    while step < max_steps:
        model.train()
        lr = learning_rate(step, lr=config.lr, min_lr=config.min_lr, warmup_steps=config.warmup_steps,
                           max_steps=max_steps, schedule=config.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = torch.zeros((), device=accelerator.device)
        for micro in range(config.grad_accum):
            batch = next(loader).to(accelerator.device, non_blocking=True)
            sync = micro == config.grad_accum - 1
            with _maybe_no_sync(accelerator, model, sync), accelerator.autocast():
                loss = next_token_loss(model, batch, ignore_index) / config.grad_accum
                accelerator.backward(loss)
            step_loss += loss.detach()
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf"))
        step_loss = accelerator.reduce(step_loss, "mean")
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
        tokens_seen += tokens_per_step
        window_tokens += tokens_per_step

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
        if val_data is not None and (step % config.eval_every == 0 or step == max_steps):
            val_loss = evaluate(model, val_data, config, accelerator, ignore_index)
            metrics.write({"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))})
            if config.trackers:
                accelerator.log({"val_loss": val_loss}, step=step)
            _write(bar, say, f"step {step}: validation loss {val_loss:.4f}, perplexity {math.exp(min(val_loss, 50)):.2f}")
            window_start, window_tokens = time.perf_counter(), 0
        if step % config.save_every == 0 and step < max_steps:
            state = {"step": step, "tokens": tokens_seen, "max_steps": max_steps}
            last_saved = save_checkpoint(accelerator, model, model_config, out_dir, step, state, loader, config.keep_last)
            window_start, window_tokens = time.perf_counter(), 0
    if bar is not None:
        bar.close()

    final_dir = out_dir / "model"
    full_state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        save_state_dict(full_state, model_config, final_dir)
        plot_losses(out_dir / "metrics.jsonl", out_dir / "loss.png")
        say(f"saved the model to {final_dir} (palm generate --checkpoint {final_dir} --tokenizer {config.tokenizer})")
        if config.samples:
            print_samples(accelerator.unwrap_model(model), tokenizer, config.samples, accelerator.device)
    if config.trackers:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return final_dir


@torch.no_grad()
def evaluate(model, data, config: TrainConfig, accelerator, ignore_index: int = -100) -> float:
    """Mean next-token loss over the first `eval_windows` validation windows, across all processes."""
    from palm.data import eval_batches
    from palm.model import next_token_loss

    model.eval()
    world = accelerator.num_processes
    limit = max(world, config.eval_windows // world * world)  # every process runs the same number of batches
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    for batch in eval_batches(data, config.seq_len, config.batch_size, limit, rank=accelerator.process_index, world_size=world):
        batch = batch.to(accelerator.device)
        with accelerator.autocast():
            loss = next_token_loss(model, batch, ignore_index)
        total += torch.stack([loss.double() * len(batch), torch.tensor(len(batch), dtype=torch.float64, device=total.device)])
    total = accelerator.reduce(total, "sum")
    model.train()
    return (total[0] / total[1]).item() if total[1] > 0 else float("nan")


def print_samples(model, tokenizer, count: int, device: torch.device, max_new_tokens: int = 200) -> None:
    from palm.generate import generate

    model.eval()
    generator = torch.Generator(device=device).manual_seed(0)
    print("\nsamples:")
    for prompt in SAMPLE_PROMPTS[:count]:
        ids = torch.tensor([tokenizer.encode(prompt)], device=device)
        out = generate(model, ids, max_new_tokens, temperature=0.8, filter_thres=0.9,
                       eos_token_id=tokenizer.eos_id, generator=generator)
        print("-" * 60)
        print(tokenizer.decode(out[0].tolist()))
    print("-" * 60)


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """Training loss (and validation loss where measured) against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=png_path.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def _checkpoint_blocks(model) -> None:
    """Recompute each block's activations in the backward pass instead of storing them."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    from palm.model import Residual

    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Residual))


def _cpu_has_bf16() -> bool:
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def _forget_previous_run() -> None:
    """accelerate keeps its settings process-wide; a second `train()` in one (non-distributed)
    process, say fp32 then bf16, must not inherit the first one's."""
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and not torch.distributed.is_initialized():
        AcceleratorState._reset_state(reset_partial_state=True)


def _maybe_no_sync(accelerator, model, sync: bool):
    import contextlib

    return contextlib.nullcontext() if sync else accelerator.no_sync(model)


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


def _describe_run(config, out_dir, model_config, n_params, train_data, val_data, world, tokens_per_step, max_steps, peak, peak_source) -> str:
    from palm.config import preset_matching

    name = config.init_from or preset_matching(model_config) or config.preset
    data = train_data.source if config.data else "the Python standard library's source"
    return "\n".join([
        _to_yaml({**dataclasses.asdict(config), "out_dir": str(out_dir), "max_steps": max_steps}).rstrip(),
        f"model: {name}, {n_params / 1e6:.1f}M parameters",
        f"data: {data}" + (f"; validation: {val_data.source}" if val_data else "; no validation data"),
        f"{world} process(es) x {config.batch_size} x {config.grad_accum} windows of {config.seq_len} tokens = "
        f"{tokens_per_step:,} tokens per step, {max_steps:,} steps",
        f"MFU against {peak / 1e12:.2f} TFLOP/s per device ({peak_source})",
    ])
