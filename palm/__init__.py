"""palm: load, run, train and fine-tune PaLM-architecture language models."""

import importlib

__version__ = "0.1.0"

# Names are imported on first use, so that commands which need no torch (build-dataset) start
# fast and small.
_EXPORTS = {
    "load": "palm.checkpoint", "save_pretrained": "palm.checkpoint",
    "PaLMConfig": "palm.config", "get_config": "palm.config",
    "PalmError": "palm.errors",
    "generate": "palm.generate", "stream": "palm.generate",
    "PaLM": "palm.model",
    "quantize": "palm.quantize",
    "load_tokenizer": "palm.tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'palm' has no attribute {name!r}")


def __dir__():
    return [*globals(), *__all__]
