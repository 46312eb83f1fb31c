"""Fine-tuning cost: LoRA against full fine-tuning, in tokens/s and peak resident memory.

    .venv/bin/python benchmarks/finetune.py [--preset 410m] [--seq_len 256] [--batch_size 2] [--steps 4] \
        [--workdir /tmp/palm-finetune-bench]

A random checkpoint of the preset's shape is written once to --workdir, with synthetic
instruction records long enough that every example fills --seq_len. Each variant then runs
`palm finetune` (its Python entry point, the whole loop: accelerate, AdamW, clipping,
checkpoints off) in a fresh process, fp32 on the CPU: full fine-tuning, LoRA on the default
targets (q,v), LoRA on every target, and LoRA over int8 base weights. tokens/s is the median of
the steps after the first (a warm-up); peak RSS is the process's high-water mark (Linux
`VmHWM`, or `ru_maxrss` where it cannot be reset), Python, torch and the imports included; the
last column splits it by phase (`VmHWM` reset between phases): loading the model (and
quantizing it), training, and the end of the run (saving: for LoRA the adapter and the merged
model).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {
    "full": dict(method="full"),
    "lora q,v": dict(method="lora", lora_targets="q,v"),
    "lora all": dict(method="lora", lora_targets="all"),
    "lora q,v int8": dict(method="lora", lora_targets="q,v", quantize="int8"),
}

CHILD = """
import json, resource, sys
from palm.training.config import FinetuneConfig
from palm.training.finetune import Finetuning
from palm.training.loop import run

def phase_peak():
    # this phase's high-water mark (Linux VmHWM, GiB), then reset it for the next phase
    try:
        with open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2**20
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return peak
    except (OSError, StopIteration):
        return None

class Phased(Finetuning):
    def build_model(self):
        model = super().build_model()
        phases["load"] = phase_peak()
        return model

    def save_final(self, state_dict, out_dir):
        phases["train"] = phase_peak()
        return super().save_final(state_dict, out_dir)

phases = {}
options = json.loads(sys.argv[1])
run(FinetuneConfig(**options), Phased(FinetuneConfig(**options)), progress=False)
phases["save"] = phase_peak()
records = [json.loads(line) for line in open(options["out_dir"] + "/metrics.jsonl")]
# resetting VmHWM resets the kernel's ru_maxrss too: the run's peak is then its phases' highest
peak = max(phases.values()) if None not in phases.values() else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({"tokens_per_sec": [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r],
                  "peak_rss_gib": peak, "phases": phases}))
"""


def prepare(workdir: Path, preset: str, seq_len: int) -> tuple[Path, Path]:
    import torch

    import palm

    checkpoint, data = workdir / f"{preset}-random", workdir / "records.jsonl"
    if not (checkpoint / "model.safetensors").exists():
        torch.manual_seed(0)
        palm.save_pretrained(palm.PaLM(palm.get_config(preset)), checkpoint)
    rows = [{"instruction": f"Repeat the letter {c}.", "output": c * 4 * seq_len} for c in "abcdefghijklmnop"]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return checkpoint, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="410m")
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="timed steps, after one warm-up step")
    parser.add_argument("--workdir", default="/tmp/palm-finetune-bench")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint, data = prepare(workdir, args.preset, args.seq_len)

    import torch

    print(f"# {args.preset} preset shape, random weights, fp32, batch {args.batch_size} x seq_len {args.seq_len}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| variant | tokens/s | vs full | peak RSS GiB | vs full | peak GiB loading / training / saving |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    results = {}
    for name in args.variants:
        with tempfile.TemporaryDirectory(dir=workdir) as out:
            options = dict(checkpoint=str(checkpoint), data=str(data), tokenizer="bytes", out_dir=out,
                           max_steps=args.steps + 1, batch_size=args.batch_size, seq_len=args.seq_len, warmup_steps=1,
                           log_every=1, eval_every=10**9, save_every=10**9, samples=0, peak_tflops=1.0,
                           lora_dropout=0.0, **VARIANTS[name])
            done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(options)], capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{name}: {done.stderr[-2000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
        rate = statistics.median(result["tokens_per_sec"][1:])
        rss = result["peak_rss_gib"]
        results[name] = (rate, rss)
        full = results.get("full")
        ratio = (lambda a, b: f"{a / b:.2f}x") if full else (lambda a, b: "")
        phases = result["phases"]
        where = " / ".join(f"{phases[p]:.2f}" if phases.get(p) is not None else "?" for p in ("load", "train", "save"))
        print(f"| {name} | {rate:,.0f} | {ratio(rate, full[0]) if full else ''} | {rss:.2f} | "
              f"{ratio(rss, full[1]) if full else ''} | {where} |", flush=True)


if __name__ == "__main__":
    main()
