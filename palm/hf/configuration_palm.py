"""transformers configuration of a PaLM model (model_type "palm").

Self-contained (imports transformers only): `palm export hf` copies this file beside the weights,
so that `AutoConfig.from_pretrained(dir, trust_remote_code=True)` works without palm installed.
"""

from transformers import PretrainedConfig


class PaLMConfig(PretrainedConfig):
    """The architecture of a PaLM model under the names tools read (`hidden_size`, ...).

    PaLM's attention is multi-query (`num_key_value_heads` is always 1) and its output projection
    is tied to the input embedding (`tie_word_embeddings` is always true). `intermediate_size` is
    the SwiGLU width (the feedforward input projection is twice as wide). `qk_rmsnorm`,
    `attn_scale` (None: head_dim ** -0.5), `xpos_scale_base` and `loss_ignore_index` carry palm's
    settings of the same names (the loss here ignores labels of -100, transformers' convention).
    """

    model_type = "palm"

    def __init__(
        self,
        vocab_size: int = 50304,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 8,
        head_dim: int = 128,
        intermediate_size: int = 3072,
        max_position_embeddings: int = 8192,
        qk_rmsnorm: bool = False,
        attn_scale: float | None = None,
        xpos_scale_base: int = 512,
        attention_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        loss_ignore_index: int = -100,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = 1
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.qk_rmsnorm = qk_rmsnorm
        self.attn_scale = attn_scale
        self.xpos_scale_base = xpos_scale_base
        self.attention_dropout = attention_dropout
        self.ff_dropout = ff_dropout
        self.loss_ignore_index = loss_ignore_index
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        kwargs.pop("num_key_value_heads", None)
        kwargs["tie_word_embeddings"] = True
        super().__init__(**kwargs)
