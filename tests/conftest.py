import atexit
import os
import shutil
import tempfile

# Tests never talk to the Hugging Face Hub: set before huggingface_hub is imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
# datasets' Arrow cache of local parquet files goes to a scratch directory, not ~/.cache.
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="palm-tests-datasets-")
atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

SMALL = dict(num_tokens=97, dim=64, depth=2, heads=4, dim_head=16)


@pytest.fixture(autouse=True)
def run_in_a_scratch_directory(tmp_path_factory, monkeypatch):
    """Every test runs in an empty working directory of its own, so nothing it writes by a
    relative path (a default `runs/...`, say) lands in the checkout; subprocesses inherit it."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


def reference_palm(seed: int = 0, **kwargs):
    """palm-rlhf-pytorch 0.2.1's PaLM with random weights, norm gains and qk scales perturbed away from 1."""
    from palm_rlhf_pytorch import PaLM as ReferencePaLM

    torch.manual_seed(seed)
    model = ReferencePaLM(**{**SMALL, **kwargs}).eval()
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.endswith(("gamma", "q_scale", "k_scale")):
                tensor.add_(0.3 * torch.randn_like(tensor))
    return model


@pytest.fixture
def reference_checkpoint(tmp_path):
    """Path of a .pt state dict written the way the published checkpoints were, and its model."""
    model = reference_palm()
    path = tmp_path / "reference.pt"
    torch.save(model.state_dict(), path)
    return path, model


def train_bpe(texts, directory, vocab_size: int = 300):
    """Train a small byte-level BPE with <|endoftext|> (id 0) like GPT-NeoX's; returns its tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    path = directory / "tokenizer.json"
    tokenizer.save(str(path))
    return path


CORPUS = "".join(
    f"{name} has {n} apples and gives {n // 2} to the fox. The quick brown fox jumps over the lazy dog.\n"
    for n in range(2, 60)
    for name in ("Alice", "Bob", "Carol")
)



def write_corpus(directory, parts: int) -> None:
    """CORPUS as `parts` text files in `directory` (created), line i in file i % parts."""
    lines = CORPUS.splitlines(keepends=True)
    directory.mkdir()
    for i in range(parts):
        (directory / f"part{i:02d}.txt").write_text("".join(lines[i::parts]))

@pytest.fixture(scope="session")
def trained_tiny():
    return train_tiny()


def train_tiny():
    """A small byte-level model trained for a few seconds on a repetitive corpus: its logits are
    peaked like a real model's, unlike a random model's."""
    from palm import PaLM, PaLMConfig

    torch.manual_seed(0)
    data = torch.tensor(list(CORPUS.encode()))
    model = PaLM(PaLMConfig(num_tokens=257, dim=64, depth=2, heads=4, dim_head=16, max_seq_len=512))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        starts = torch.randint(0, len(data) - 65, (16,))
        batch = torch.stack([data[s : s + 65] for s in starts])
        loss = model.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()
