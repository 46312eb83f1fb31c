"""palm models in the Hugging Face stack: transformers classes (registered with the Auto classes
on import), `palm export hf`, `palm push`."""

from transformers import AutoConfig, AutoModelForCausalLM

from palm.hf.configuration_palm import PaLMConfig as PaLMHFConfig
from palm.hf.modeling_palm import PaLMForCausalLM

AutoConfig.register("palm", PaLMHFConfig, exist_ok=True)
AutoModelForCausalLM.register(PaLMHFConfig, PaLMForCausalLM, exist_ok=True)

__all__ = ["PaLMHFConfig", "PaLMForCausalLM"]
