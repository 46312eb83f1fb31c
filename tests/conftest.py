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
