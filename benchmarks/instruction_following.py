"""How well a model follows the offline instruction set's held-out instructions, against its base.

    .venv/bin/python benchmarks/instruction_following.py --base runs/tiny-.../model --tuned runs/ft/model \
        [--tokenizer bytes] [--seq_len 512] [--max_new_tokens 40]

For each model: the reply loss on the held-out instructions (the standard library's every-20th
file, as `palm finetune` holds them out; mean over reply tokens, the prompt style the tuned model
saved), and the fraction of greedy answers that start with `def <the asked name>(`.
"""

from __future__ import annotations

import argparse
import re

import torch

import palm
from palm.data.instructions import stdlib_instructions, tokenize
from palm.inference.chat import reply
from palm.prompts import get_prompt_style, saved_prompt_style
from palm.training.finetune import reply_loss

NAME = re.compile(r"`def (\w+)\(")


@torch.no_grad()
def held_out_loss(model, examples, batch_size: int = 8) -> float:
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = examples[range(start, min(start + batch_size, len(examples)))]
        learned = int((batch["labels"] != -100).sum())
        total += reply_loss(model, batch["input_ids"], batch["labels"]).item() * learned
        count += learned
    return total / count


def follows(model, tokenizer, style, records, max_new_tokens: int) -> tuple[int, list[str]]:
    hits, answers = 0, []
    for record in records:
        asked = NAME.search(record.messages[0]["content"]).group(1)
        answer = "".join(reply(model, tokenizer, style, record.messages[:1], max_new_tokens, temperature=0))
        hits += answer.startswith(f"def {asked}(")
        answers.append(answer)
    return hits, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True)
    parser.add_argument("--tuned", required=True)
    parser.add_argument("--tokenizer", default="bytes")
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--max_new_tokens", type=int, default=40)
    args = parser.parse_args()
    tokenizer = palm.load_tokenizer(args.tokenizer)
    style = saved_prompt_style(args.tuned) or get_prompt_style("alpaca")
    _, held = stdlib_instructions()
    examples = tokenize(held, tokenizer, style, args.seq_len)
    print(f"{len(held)} held-out instructions ({len(examples)} within --seq_len {args.seq_len} for the loss), "
          f"prompt style {style.name}")
    for name, source in (("base", args.base), ("tuned", args.tuned)):
        model = palm.load(source)
        hits, answers = follows(model, tokenizer, style, held, args.max_new_tokens)
        print(f"{name:<6} held-out reply loss {held_out_loss(model, examples):.4f}  "
              f"answers starting with `def <name>(`: {hits}/{len(held)} ({100 * hits / len(held):.0f}%)  "
              f"first answer: {answers[0][:60]!r}")


if __name__ == "__main__":
    main()
