"""Peak resident memory and time of loading a preset-shaped checkpoint, palm against the seed's way.

    python benchmarks/load_memory.py --preset 1b [--workdir /tmp/palm-bench]

Writes a random checkpoint of the preset's shape in the reference `.pt` format (and, converted,
in palm's safetensors directory format), then loads it in fresh processes:
- seed: build palm-rlhf-pytorch's PaLM, `torch.load` the file, `load_state_dict` (the seed README's CPU recipe);
- palm .pt: `palm.load(file)`;
- palm dir: `palm.load(directory)`.
Each process then reads every weight once (a sum), so memory-mapped pages are counted as resident.
Peak RSS is reported as a multiple of the checkpoint's file size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

LOADERS = {
    "seed": """
from palm_rlhf_pytorch import PaLM as Ref
c = get_config(PRESET)
model = Ref(num_tokens=c.num_tokens, dim=c.dim, depth=c.depth, dim_head=c.dim_head, heads=c.heads).eval()
model.load_state_dict(torch.load(PT, map_location="cpu"))
""",
    "palm .pt": "model = palm.load(PT)",
    "palm dir": "model = palm.load(DIR)",
}

CHILD = """
import resource, time, json, torch, palm
from palm.config import get_config
PRESET, PT, DIR = {preset!r}, {pt!r}, {dir!r}
start = time.perf_counter()
{loader}
loaded = time.perf_counter() - start
with torch.no_grad():
    total = sum(float(p.float().sum()) for p in model.parameters())
print(json.dumps(dict(seconds=loaded, peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="1b")
    parser.add_argument("--workdir", default="/tmp/palm-load-bench")
    args = parser.parse_args()

    import palm
    from palm.checkpoint import save_reference_checkpoint

    workdir = Path(args.workdir)
    pt, directory = workdir / f"{args.preset}.pt", workdir / f"{args.preset}-palm"
    if not pt.exists():
        model = palm.PaLM(palm.get_config(args.preset))
        save_reference_checkpoint(model, pt)
        palm.save_pretrained(model, directory)
        del model
    size = pt.stat().st_size
    print(f"checkpoint: {pt} ({size / 2**30:.2f} GiB), torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'loader':<10} {'load s':>7} {'peak RSS GiB':>13} {'x file size':>12}")
    for name, loader in LOADERS.items():
        code = CHILD.format(preset=args.preset, pt=str(pt), dir=str(directory), loader=loader)
        result = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
        print(f"{name:<10} {result['seconds']:>7.2f} {result['peak_rss'] / 2**30:>13.2f} {result['peak_rss'] / size:>12.2f}")


if __name__ == "__main__":
    main()
