"""torch.hub entry points, so `torch.hub.load("<this repo>", "palm_410m_8k_v0")` keeps working.

Unlike the seed's, these load on CPU-only machines, never unpickle code, and take their sizes from
palm's preset registry. `map_location` is where the model goes (default: CPU).
"""

dependencies = ["torch", "safetensors", "huggingface_hub"]

import torch  # noqa: E402

from palm.checkpoint import load  # noqa: E402
from palm.config import get_config  # noqa: E402
from palm.dtypes import resolve_dtype  # noqa: E402
from palm.model import PaLM  # noqa: E402


def _entry_point(name: str):
    def entry(pretrained: bool = True, map_location=None, dtype=None) -> PaLM:
        if pretrained:
            return load(name, device=map_location, dtype=dtype)
        with torch.device(map_location or "cpu"):
            model = PaLM(get_config(name))
        return model.to(dtype=resolve_dtype(dtype)).eval()

    entry.__name__ = name
    entry.__doc__ = f"PaLM {name}: the published checkpoint (pretrained=True) or random weights."
    return entry


palm_150m_8k_v0 = _entry_point("palm_150m_8k_v0")
palm_410m_8k_v0 = _entry_point("palm_410m_8k_v0")
palm_1b_8k_v0 = _entry_point("palm_1b_8k_v0")
palm_2b_8k_v0 = _entry_point("palm_2b_8k_v0")
