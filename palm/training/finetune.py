"""`palm finetune`: supervised fine-tuning on instruction and chat data, with LoRA adapters
(through peft; optionally over an int8 base) or all weights, on the same loop as `palm train`.

The loss covers reply tokens only (unless `train_on_prompt`): cross entropy averaged over the
learned tokens of a batch. A LoRA run ends with the adapter (`out_dir/adapter/`, peft's format)
and the merged model (`out_dir/model/`, merged in float32 and cast once to the base's dtype); a
full run with the model. Both carry the prompt style, so generation, chat and serving format
prompts the way the model learned them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from palm.checkpoint import LazyStateDict, load, read_lazily, save_state_dict, strip_wrapper_prefixes
from palm.checks import check_vocabulary, require_eos
from palm.config import PaLMConfig
from palm.data.instructions import IGNORE, Examples, read_records, split_records, stdlib_instructions, tokenize
from palm.data.loader import BatchLoader
from palm.errors import PalmError
from palm.files import make_shareable
from palm.prompts import get_prompt_style, save_prompt_style
from palm.tokenizer import load_tokenizer
from palm.training.config import FinetuneConfig
from palm.training.loop import Task, run


def finetune(config: FinetuneConfig, *, progress: bool = True) -> Path:
    """Run `palm finetune`; returns the directory of the fine-tuned (for LoRA: merged) model."""
    return run(config, Finetuning(config), progress=progress)


class Finetuning(Task):
    """Learning the replies of `config.data` (or the standard library's instruction set), in
    `config.prompt_style`, from `config.checkpoint`."""

    def __init__(self, config: FinetuneConfig):
        self.config = config
        source = Path(str(config.checkpoint))  # a run's model/ is named after its run
        self.name = f"{source.parent.name if source.name == 'model' else source.name}-{config.method}"
        self.tokenizer = None  # loaded with the model, after the run's cheap checks
        self.style = get_prompt_style(config.prompt_style)
        self.columns = config.column_mapping()
        self.model_config: PaLMConfig | None = None
        self.base_dtype = torch.float32
        self.peft_model = None
        self.train_examples: Examples | None = None
        self.val_examples: Examples | None = None
        self.val_records: list = []

    # -- the model --------------------------------------------------------------------------------

    def build_model(self) -> nn.Module:
        c = self.config
        self.tokenizer = load_tokenizer(c.tokenizer, eos_token=c.eos_token)
        require_eos(self.tokenizer)
        # an int8 base reads each weight into memory of its own, freed as it is quantized: a mapped
        # file would stay resident for the whole run, kept by the weights that stay full precision
        model = load(c.checkpoint, mmap=not c.quantize)
        if any("lora_" in name for name, _ in model.named_parameters()):
            raise PalmError(f"{c.checkpoint} is a model with an adapter: fine-tune its merged model (model/) instead")
        self.base_dtype = model.token_emb.weight.dtype
        model = model.float()
        self.model_config = model.config
        check_vocabulary(self.tokenizer, model.config.num_tokens)
        if c.seq_len > model.config.max_seq_len:
            raise PalmError(f"--seq_len {c.seq_len} exceeds the model's max_seq_len {model.config.max_seq_len}")
        if c.method == "full":
            return model
        from palm.adapters import add_lora, lora_config
        from palm.inference.quantization import quantize

        if c.quantize:
            quantize(model, c.quantize)
        targets = [t.strip() for t in c.lora_targets.split(",") if t.strip()]
        lora = lora_config(targets, r=c.lora_r, alpha=c.lora_alpha, dropout=c.lora_dropout, base=_base_name(c.checkpoint))
        self.peft_model = add_lora(model.requires_grad_(False), lora)
        return self.peft_model

    # -- data -------------------------------------------------------------------------------------

    def training_batches(self, model: nn.Module, rank: int, world_size: int):
        c = self.config
        if c.data is None:
            train, val = stdlib_instructions()
        else:
            train = read_records(c.data, split=c.split, columns=self.columns, style=self.style)
            val = read_records(c.val_data, split=c.split, columns=self.columns, style=self.style) if c.val_data else None
            if c.val_fraction:
                train, val = split_records(train, c.val_fraction, c.seed)
        self.val_records = val or []
        options = dict(learn_prompts=c.train_on_prompt)
        self.train_examples = tokenize(train, self.tokenizer, self.style, c.seq_len, **options)
        self.val_examples = tokenize(val, self.tokenizer, self.style, c.seq_len, **options) if val else None
        return BatchLoader(self.train_examples, c.batch_size, seed=c.seed, rank=rank, world_size=world_size,
                           lengths=self.train_examples.lengths)

    def validation_batches(self, rank: int, world_size: int, max_samples: int):
        if self.val_examples is None:
            return None
        indices = np.arange(min(max_samples, len(self.val_examples)))[rank::world_size]
        size = self.config.batch_size
        return (self.val_examples[indices[i : i + size]] for i in range(0, len(indices), size))

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return reply_loss(model, batch["input_ids"], batch["labels"])

    def count_tokens(self, batch: dict[str, Tensor]) -> int:
        # inputs up to each example's last label: the rest of a row is padding
        last = torch.where(batch["labels"] != IGNORE, torch.arange(batch["labels"].shape[1], device=batch["labels"].device), -1)
        return int((last.amax(dim=1) + 1).sum())

    def inputs(self) -> list[str]:
        return [s for s in (self.config.checkpoint, self.config.data, self.config.val_data) if s is not None]

    def describe(self) -> list[str]:
        c, t = self.config, self.train_examples
        method = (f"LoRA r={c.lora_r} alpha={c.lora_alpha} on {c.lora_targets}" + (" over int8 weights" if c.quantize else "")
                  if c.method == "lora" else "all weights")
        data = c.data or "the Python standard library's functions (offline instruction set)"
        lines = [f"model: {c.checkpoint}, fine-tuning {method}",
                 f"data: {data}, prompt style {self.style.name}: {len(t):,} examples "
                 f"({t.truncated:,} cut to --seq_len {c.seq_len}, {t.dropped:,} dropped: no reply token within it)"]
        if self.val_examples is not None:
            v = self.val_examples
            lines.append(f"validation: {len(v):,} examples ({v.truncated:,} cut, {v.dropped:,} dropped)")
        return lines

    # -- saving -----------------------------------------------------------------------------------

    def save_model(self, state_dict: dict[str, Tensor], directory: Path) -> None:
        """A LoRA run's checkpoints hold the adapter; a full run's the whole model."""
        if self.peft_model is not None:
            self._save_adapter(state_dict, directory)
        else:
            self._save_full(strip_wrapper_prefixes(state_dict), directory)

    def save_final(self, state_dict: dict[str, Tensor], out_dir: Path) -> Path:
        if self.peft_model is None:
            return super().save_final(state_dict, out_dir)
        self._save_adapter(state_dict, out_dir / "adapter")
        from palm.adapters import base_weights, merger

        # merged one matrix at a time as it is written; an int8 run merges onto the original
        # weights (not their int8 rounding), read one at a time
        base = read_lazily(self.config.checkpoint) if self.config.quantize else base_weights(self.peft_model)
        self._save_full(LazyStateDict.of(base).mapped(merger(self.peft_model), dtype=torch.float32), out_dir / "model")
        return out_dir / "model"

    def _save_adapter(self, state_dict: dict[str, Tensor], directory: Path) -> None:
        self.peft_model.save_pretrained(str(directory), state_dict=strip_wrapper_prefixes(state_dict))
        make_shareable(directory / "adapter_model.safetensors")  # safetensors writes it 0600
        save_prompt_style(self.style, directory)

    def _save_full(self, state_dict: Mapping[str, Tensor], directory: Path) -> None:
        """Cast once to the base checkpoint's dtype and save as palm.save_pretrained does, one
        tensor at a time."""
        state = LazyStateDict.of(state_dict).mapped(lambda name, tensor: tensor, dtype=self.base_dtype)
        save_state_dict(state, self.model_config, directory)
        save_prompt_style(self.style, directory)

    def finish(self, model: nn.Module, directory: Path, device: torch.device) -> None:
        adapter = f" and the adapter to {directory.parent / 'adapter'}" if self.peft_model is not None else ""
        print(f"saved the model to {directory}{adapter}\n"
              f"chat with it: palm chat --checkpoint {directory} --tokenizer {self.config.tokenizer}")
        if self.config.samples and self.val_records:
            asked = [_up_to_last_reply(r.messages) for r in self.val_records[: self.config.samples]]
            print_answers(model, self.tokenizer, self.style, asked, device)


def reply_loss(model: nn.Module, input_ids: Tensor, labels: Tensor) -> Tensor:
    """Mean cross entropy over the tokens whose label is not IGNORE (the replies)."""
    logits = model(input_ids)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)


def print_answers(model: nn.Module, tokenizer, style, conversations: list[list[dict]], device: torch.device,
                  max_new_tokens: int = 200) -> None:
    """Greedy replies to `conversations`, printed."""
    from palm.inference.chat import reply

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    print("\nanswers to held-out instructions:")
    for messages in conversations:
        print("-" * 60)
        print(messages[-1]["content"])
        print(">>> " + "".join(reply(base, tokenizer, style, messages, max_new_tokens, temperature=0)))
    print("-" * 60)


def _up_to_last_reply(messages: list[dict]) -> list[dict]:
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]


def _base_name(checkpoint: str) -> str:
    """How the adapter config names its base: a local path made absolute, else as given."""
    path = Path(checkpoint)
    return str(path.resolve()) if path.exists() else checkpoint
