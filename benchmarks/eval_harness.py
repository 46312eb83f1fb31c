"""palm's lm-evaluation-harness backend against the harness's own `hf` backend, on the same requests.

    .venv/bin/python benchmarks/eval_harness.py --checkpoint runs/main/model [--questions 100] [--batch_size 16]

A multiple-choice task is made on the spot from the standard library files that the main job held
out (offline): each question is a few lines of Python as context, and the choices are the line
that follows and three lines drawn from elsewhere (4 loglikelihood requests per question). The
model is exported for transformers with palm's `export_hf` (its tokenizer beside it) into a
temporary directory; lm-eval's `HFLM` loads that directory, `PalmLM` loads the palm checkpoint.
Both backends answer the same `Instance` list (built once by the harness's task machinery) with
`loglikelihood`, each timed once after an untimed batch, on the CPU in fp32 with the same batch size. Printed: requests/s
side by side and their ratio, the largest loglikelihood difference, and each backend's accuracy.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import time
from pathlib import Path

import torch


def make_questions(count: int, seed: int, max_context: int) -> list[dict]:
    """Questions from the held-out standard library files: context, 4 choices, the answer's index."""
    from palm.data.documents import held_out, read_documents, stdlib_files

    rng = random.Random(seed)
    candidates, pool = [], []
    for text in (text for batch in read_documents(held_out(stdlib_files())[1]) for text in batch):
        lines = text.split("\n")
        for i in range(4, len(lines)):
            line = lines[i]
            if 12 <= len(line.strip()) <= 60:
                pool.append(line)
                context = "\n".join(lines[i - 4 : i]) + "\n"
                if len(context.strip()) >= 40:
                    candidates.append((context[-max_context:], line))
    questions = []
    for context, answer in rng.sample(candidates, count):
        distractors = rng.sample([line for line in rng.sample(pool, 20) if line != answer], 3)
        choices = [answer, *distractors]
        rng.shuffle(choices)
        questions.append({"context": context, "choices": choices, "answer": choices.index(answer)})
    return questions


def write_task(questions: list[dict], directory: Path) -> None:
    """The questions as a JSONL file and an offline harness task `palm_bench_mc` over it."""
    data = directory / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in questions))
    (directory / "mc.yaml").write_text(
        f"task: palm_bench_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\ntarget_delimiter: ''\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")


def accuracy(requests, results) -> float:
    """Share of questions whose right choice has the highest loglikelihood."""
    by_doc: dict[int, list] = {}
    for request, (logprob, _) in zip(requests, results):
        by_doc.setdefault(request.doc_id, []).append((request.idx, logprob, request.doc["answer"]))
    right = 0
    for choices in by_doc.values():
        choices.sort()
        best = max(range(len(choices)), key=lambda i: choices[i][1])
        right += best == choices[0][2]
    return right / len(by_doc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a palm model directory (byte-level: the main job's)")
    parser.add_argument("--tokenizer", default="bytes")
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_context", type=int, default=160, help="longest context in characters")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict

    from palm.eval.harness import PalmLM
    from palm.hf.export import export_hf

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_task(make_questions(args.questions, args.seed, args.max_context), tmp)
        task = get_task_dict(["palm_bench_mc"], TaskManager(include_path=str(tmp), include_defaults=False))["palm_bench_mc"]
        task.build_all_requests(rank=0, world_size=1)
        requests = task.instances

        exported = export_hf(args.checkpoint, tmp / "hf", tokenizer=args.tokenizer)
        backends = {
            "palm": PalmLM(pretrained=args.checkpoint, tokenizer=args.tokenizer, batch_size=args.batch_size,
                           device="cpu", dtype="fp32"),
            "hf": HFLM(pretrained=str(exported), batch_size=args.batch_size, device="cpu", dtype="float32"),
        }
        results, seconds = {}, {}
        for name, lm in backends.items():
            lm.loglikelihood(requests[: args.batch_size], disable_tqdm=True)  # warm-up, untimed
            start = time.perf_counter()
            results[name] = lm.loglikelihood(requests, disable_tqdm=True)
            seconds[name] = time.perf_counter() - start

    n = len(requests)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; checkpoint {args.checkpoint}; {args.questions} questions, "
          f"{n} loglikelihood requests, batch size {args.batch_size}, fp32, cpu")
    print(f"{'backend':<8} {'seconds':>8} {'requests/s':>11} {'accuracy':>9}")
    for name in backends:
        print(f"{name:<8} {seconds[name]:>8.2f} {n / seconds[name]:>11.1f} {accuracy(requests, results[name]):>9.3f}")
    print(f"palm / hf requests/s: {seconds['hf'] / seconds['palm']:.2f}x")
    diff = max(abs(a[0] - b[0]) for a, b in zip(results["palm"], results["hf"]))
    greedy = sum(a[1] != b[1] for a, b in zip(results["palm"], results["hf"]))
    print(f"max |loglikelihood difference|: {diff:.2e}; is_greedy disagreements: {greedy}")


if __name__ == "__main__":
    main()
