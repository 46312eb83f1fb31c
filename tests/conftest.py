import os

# Tests never talk to the Hugging Face Hub: set before huggingface_hub is imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

SMALL = dict(num_tokens=97, dim=64, depth=2, heads=4, dim_head=16)


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


CORPUS = "".join(
    f"{name} has {n} apples and gives {n // 2} to the fox. The quick brown fox jumps over the lazy dog.\n"
    for n in range(2, 60)
    for name in ("Alice", "Bob", "Carol")
)


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
