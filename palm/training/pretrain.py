"""`palm train`: next-token prediction on packed token windows, from a preset's random weights or
from any model `palm.load` takes (continued pretraining). With no data given, the Python standard
library's source, byte by byte: the main job of the README."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from palm.checkpoint import load, save_state_dict
from palm.checks import check_vocabulary
from palm.config import PaLMConfig, get_config, preset_matching
from palm.data.documents import held_out, stdlib_files
from palm.data.loader import TokenData, eval_batches, make_loader, open_data
from palm.data.packed import METADATA_NAME
from palm.errors import PalmError
from palm.model import PaLM, next_token_loss
from palm.tokenizer import Tokenizer, load_tokenizer
from palm.training.config import TrainConfig
from palm.training.loop import Task, run

SAMPLE_PROMPTS = ("def ", "class ", "import ")


def train(config: TrainConfig, *, progress: bool = True) -> Path:
    """Run `palm train`; returns the directory of the final model."""
    return run(config, Pretraining(config), progress=progress)


class Pretraining(Task):
    """Next-token prediction on `config.data` (or the standard library) with `config.tokenizer`."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.name = config.preset
        self.tokenizer: Tokenizer | None = None  # loaded with the model, after the run's cheap checks
        self.model_config: PaLMConfig | None = None
        self.train_data: TokenData | None = None
        self.val_data: TokenData | None = None

    def build_model(self) -> nn.Module:
        c = self.config
        self.tokenizer = load_tokenizer(tokenizer_for(c))
        model = load(c.init_from, dtype=torch.float32) if c.init_from is not None else PaLM(get_config(c.preset))
        self.model_config = model.config
        check_vocabulary(self.tokenizer, model.config.num_tokens)
        if c.seq_len > model.config.max_seq_len:
            raise PalmError(f"--seq_len {c.seq_len} exceeds the model's max_seq_len {model.config.max_seq_len}")
        return model

    def training_batches(self, model: nn.Module, rank: int, world_size: int):
        c = self.config
        self.train_data, self.val_data = open_training_data(c, self.tokenizer)
        vocab = self.train_data.vocab_size
        if vocab is not None and vocab > model.config.num_tokens:
            raise PalmError(f"{self.train_data.source} was tokenized with a vocabulary of {vocab:,}, "
                            f"larger than the model's {model.config.num_tokens:,}")
        return make_loader(self.train_data, c.seq_len, c.batch_size, seed=c.seed, rank=rank, world_size=world_size)

    def validation_batches(self, rank: int, world_size: int, max_samples: int):
        if self.val_data is None:
            return None
        return eval_batches(self.val_data, self.config.seq_len, self.config.batch_size, max_samples,
                            rank=rank, world_size=world_size)

    def loss(self, model: nn.Module, batch: Tensor) -> Tensor:
        return next_token_loss(model, batch, self.model_config.loss_ignore_index)

    def save_model(self, state_dict: dict[str, Tensor], directory: Path) -> None:
        save_state_dict(state_dict, self.model_config, directory)

    def inputs(self) -> list[str]:
        return [s for s in (self.config.data, self.config.val_data, self.config.init_from) if s is not None]

    def describe(self) -> list[str]:
        c = self.config
        name = c.init_from or preset_matching(self.model_config) or c.preset
        data = self.train_data.source if c.data else "the Python standard library's source"
        validation = f"; validation: {self.val_data.source}" if self.val_data else "; no validation data"
        return [f"model: {name}", f"data: {data}{validation}"]

    def finish(self, model: nn.Module, directory: Path, device: torch.device) -> None:
        print(f"saved the model to {directory} (palm generate --checkpoint {directory} --tokenizer {self.tokenizer.name})")
        if self.config.samples:
            print_samples(model, self.tokenizer, self.config.samples, device)


def tokenizer_for(config: TrainConfig) -> str:
    """--tokenizer, else the one a built dataset records (palm_dataset.json), else bytes; a
    --tokenizer other than the recorded one is refused (the ids would mean other text)."""
    recorded = None
    if config.data is not None and (Path(config.data) / METADATA_NAME).is_file():
        recorded = json.loads((Path(config.data) / METADATA_NAME).read_text()).get("tokenizer")
    if config.tokenizer is None:
        return recorded or "bytes"
    if recorded is not None and not _same_tokenizer(recorded, config.tokenizer):
        raise PalmError(f"{config.data} was tokenized with {recorded}, not --tokenizer {config.tokenizer}; "
                        "leave --tokenizer out to use the dataset's")
    return config.tokenizer


def _same_tokenizer(a: str, b: str) -> bool:
    return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())


def open_training_data(config: TrainConfig, tokenizer: Tokenizer) -> tuple[TokenData, TokenData | None]:
    """(train data, validation data or None) for the config."""
    if config.data is None:
        train_files, val_files = held_out(stdlib_files())
        train = open_data(train_files, tokenizer=tokenizer, seq_len=config.seq_len)
        val = open_data(val_files, tokenizer=tokenizer, seq_len=config.seq_len)
        return train, val
    train = open_data(config.data, "train", tokenizer=tokenizer, seq_len=config.seq_len, streaming=config.streaming)
    if config.val_data is not None:
        return train, _open_validation(config.val_data, config, tokenizer, required=True)
    if train.in_memory:
        return train, None  # raw text files have no validation split: pass --val_data for evaluation
    return train, _open_validation(config.data, config, tokenizer, required=False)


def _open_validation(source: str, config: TrainConfig, tokenizer: Tokenizer, required: bool) -> TokenData | None:
    """The validation split of a built or Hub dataset (else, for --val_data, its train split or
    raw text); None when the data has no validation split and none was asked for."""
    try:
        return open_data(source, "validation", tokenizer=tokenizer, seq_len=config.seq_len, streaming=config.streaming)
    except PalmError:
        if not required:
            return None
    return open_data(source, "train", tokenizer=tokenizer, seq_len=config.seq_len, streaming=config.streaming)


def print_samples(model: nn.Module, tokenizer: Tokenizer, count: int, device: torch.device, max_new_tokens: int = 200) -> None:
    from palm.inference.decoding import generate

    generator = torch.Generator(device=device).manual_seed(0)
    print("\nsamples:")
    for prompt in SAMPLE_PROMPTS[:count]:
        ids = torch.tensor([tokenizer.encode(prompt)], device=device)
        room = min(max_new_tokens, model.config.max_seq_len - ids.shape[1])  # a short context samples less
        if room < 1:
            continue
        out = generate(model, ids, room, temperature=0.8, filter_thres=0.9,
                       eos_token_id=tokenizer.eos_id, generator=generator)
        print("-" * 60)
        print(tokenizer.decode(out[0].tolist()))
    print("-" * 60)
