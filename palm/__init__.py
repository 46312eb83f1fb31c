"""palm: load, run, train and fine-tune PaLM-architecture language models."""

import importlib

__version__ = "0.1.0"

# The public API. Names are imported on first use, so that commands which need no torch
# (build-dataset) start fast and small. No submodule of palm shares a name with these (a test
# checks): importing a submodule sets the package attribute of its name, which would hide the
# function of that name.
_EXPORTS = {
    "load": "palm.checkpoint", "save_pretrained": "palm.checkpoint",
    "PaLMConfig": "palm.config", "get_config": "palm.config",
    "PalmError": "palm.errors",
    "generate": "palm.inference.decoding", "stream": "palm.inference.decoding",
    "PaLM": "palm.model",
    "quantize": "palm.inference.quantization",
    "load_tokenizer": "palm.tokenizer", "TextStreamer": "palm.tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'palm' has no attribute {name!r}")


def __dir__():
    return [*globals(), *__all__]
