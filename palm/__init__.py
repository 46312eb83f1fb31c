"""palm: load, run, train and fine-tune PaLM-architecture language models."""

from palm.checkpoint import load, save_pretrained
from palm.config import PaLMConfig, get_config
from palm.errors import PalmError
from palm.generate import generate, stream
from palm.model import PaLM
from palm.quantize import quantize
from palm.tokenizer import load_tokenizer

__version__ = "0.1.0"
__all__ = [
    "PaLM", "PaLMConfig", "PalmError", "generate", "get_config", "load", "load_tokenizer", "quantize",
    "save_pretrained", "stream",
]
