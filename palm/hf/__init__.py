"""palm models in the Hugging Face stack: transformers classes (`register()` adds them to the
Auto classes), `palm export hf`, `palm push`. Importing this package loads nothing heavy, so the
`palm` command stays fast; transformers is imported on first use."""


def register() -> None:
    """Register the PaLM classes with `AutoConfig` and `AutoModelForCausalLM` in this process, so
    that exported directories load without remote code (`palm.hf.export` does this on import)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from palm.hf.configuration_palm import PaLMConfig
    from palm.hf.modeling_palm import PaLMForCausalLM

    AutoConfig.register("palm", PaLMConfig, exist_ok=True)
    AutoModelForCausalLM.register(PaLMConfig, PaLMForCausalLM, exist_ok=True)
