"""PaLM as a transformers causal language model (`AutoModelForCausalLM`, `generate`, pipelines, peft).

Self-contained (imports torch and transformers only): `palm export hf` copies this file and
configuration_palm.py beside the weights, so that a model loads with `trust_remote_code=True`
where palm is not installed. Module names are palm's own (`token_emb`, `layers.N.fn.*`, `norm`,
`to_logits`), so the weights file is the one palm reads and palm's LoRA adapters name the same
modules. Works with transformers 4.5x (`past_key_values=`) and 5.x (`cache=`).

The architecture (PaLM, Chowdhery et al. 2022): parallel attention and SwiGLU feedforward blocks
from one bias-free LayerNorm, multi-query attention (one key/value head), rotary embeddings with
xPos scaling computed in float32, the output projection tied to the input embedding.
"""

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_palm import PaLMConfig

try:  # transformers 5: initializers that leave weights loaded from a checkpoint alone
    from transformers import initialization as init
except ImportError:  # transformers 4 skips loaded weights itself
    from torch.nn import init

_TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
# The output field holding the key/value cache: `cache` in transformers 5, `past_key_values` before.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
_SDPA_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


class LayerNorm(nn.Module):
    """LayerNorm with a gain and no bias."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], self.gamma)


class SwiGLU(nn.Module):
    """SwiGLU: value half first, gate half second."""

    def forward(self, x: Tensor) -> Tensor:
        x, gate = x.chunk(2, dim=-1)
        return F.silu(gate) * x


def rotary_tables(positions: Tensor, dim_head: int, scale_base: int, xpos_offset: int) -> tuple[Tensor, ...]:
    """cos and sin for queries and keys at `positions` (b, n), xPos scale folded in (queries
    scale**power, keys scale**-power), each (b, 1, n, dim_head) in float32.

    Scores depend only on the distance between positions: any `xpos_offset` gives the same
    attention in exact arithmetic; 0 means absolute positions."""
    half = torch.arange(0, dim_head, 2, dtype=torch.float32, device=positions.device)
    inv_freq = 1.0 / (10000 ** (half / dim_head))
    scale = (half + 0.4 * dim_head) / (1.4 * dim_head)
    positions = positions.to(torch.float32)
    angles = positions[..., None] * inv_freq
    power = (positions - xpos_offset) / scale_base
    xpos = scale ** power[..., None]
    cos, sin, xpos = (torch.cat((t, t), dim=-1)[:, None] for t in (angles.cos(), angles.sin(), xpos))
    return cos * xpos, sin * xpos, cos / xpos, sin / xpos


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x32 = x.float()
    return (x32 * cos + rotate_half(x32) * sin).type_as(x)


class ParallelBlock(nn.Module):
    """Attention and SwiGLU feedforward from one normed input; one fused input projection yields
    the queries of all heads, the key head, the value head and the feedforward input."""

    def __init__(self, config: PaLMConfig, layer_idx: int):
        super().__init__()
        dim, dim_head, heads = config.hidden_size, config.head_dim, config.num_attention_heads
        self.layer_idx = layer_idx
        self.heads, self.dim_head = heads, dim_head
        self.attn_scale = config.attn_scale
        self.attn_dropout = config.attention_dropout
        self.qk_rmsnorm = config.qk_rmsnorm
        self.norm = LayerNorm(dim)
        if config.qk_rmsnorm:
            self.q_scale = nn.Parameter(torch.ones(dim_head))
            self.k_scale = nn.Parameter(torch.ones(dim_head))
        self.fused_dims = (heads * dim_head, dim_head, dim_head, 2 * config.intermediate_size)
        self.fused_attn_ff_proj = nn.Linear(dim, sum(self.fused_dims), bias=False)
        self.attn_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.ff_out = nn.Sequential(SwiGLU(), nn.Dropout(config.ff_dropout), nn.Linear(config.intermediate_size, dim, bias=False))

    def forward(self, x: Tensor, rotary: tuple[Tensor, ...], mask: Tensor | None, cache) -> Tensor:
        batch, n, _ = x.shape
        x = self.norm(x)
        q, k, v, ff = self.fused_attn_ff_proj(x).split(self.fused_dims, dim=-1)
        q = q.view(batch, n, self.heads, self.dim_head).transpose(1, 2)  # (b, heads, n, d)
        k, v = k.unsqueeze(1), v.unsqueeze(1)  # (b, 1, n, d): one head shared by all queries
        if self.qk_rmsnorm:
            q = F.normalize(q, dim=-1) * self.q_scale
            k = F.normalize(k, dim=-1) * self.k_scale
        cos_q, sin_q, cos_k, sin_k = rotary
        q, k = apply_rotary(q, cos_q, sin_q), apply_rotary(k, cos_k, sin_k)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        dropout = self.attn_dropout if self.training else 0.0
        if n == 1 and dropout == 0.0:
            # one query per head against one key/value head: fold the heads into the query axis
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, scale=self.attn_scale)
        else:
            if not _SDPA_GQA:
                k, v = k.expand(-1, self.heads, -1, -1), v.expand(-1, self.heads, -1, -1)
            extra = {"enable_gqa": True} if _SDPA_GQA else {}
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None, scale=self.attn_scale, **extra
            ).transpose(1, 2)
        return self.attn_out(out.reshape(batch, n, -1)) + self.ff_out(ff)


class Residual(nn.Module):
    """x + fn(x) (the wrapper keeps palm's parameter names, `layers.N.fn.*`)."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor, *args) -> Tensor:
        return x + self.fn(x, *args)


class PaLMPreTrainedModel(PreTrainedModel):
    config_class = PaLMConfig
    base_model_prefix = "model"
    _no_split_modules = ["ParallelBlock"]
    # palm's own save_pretrained also stores the zero LayerNorm biases and the rotary tables
    _keys_to_ignore_on_load_unexpected = [r"\.beta$", r"rotary_emb\.(inv_freq|scale)$"]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, LayerNorm):
            init.ones_(module.gamma)
        elif isinstance(module, ParallelBlock) and module.qk_rmsnorm:
            init.ones_(module.q_scale)
            init.ones_(module.k_scale)


class PaLMForCausalLM(PaLMPreTrainedModel, GenerationMixin):
    """A PaLM decoder with its tied language-model head."""

    _tied_weights_keys = {"to_logits.weight": "token_emb.weight"} if _TRANSFORMERS_5 else ["to_logits.weight"]

    def __init__(self, config: PaLMConfig):
        super().__init__(config)
        self.token_emb = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Residual(ParallelBlock(config, i)) for i in range(config.num_hidden_layers))
        self.norm = LayerNorm(config.hidden_size)
        self.to_logits = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.token_emb

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.token_emb = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.to_logits

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.to_logits = value

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values=None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache=None,
        logits_to_keep: int = 0,
        **kwargs,
    ):
        """Logits (b, n, vocab) of `input_ids` (b, n), and the loss when `labels` are given.

        `attention_mask` (b, past + n) marks real tokens with 1 (left padding with 0);
        `position_ids` (b, n) give the tokens' positions (generate derives them from the mask).
        Without either, and without a cache, this computes exactly what palm's `model(tokens)` does.
        """
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        x = self.token_emb(input_ids) if inputs_embeds is None else inputs_embeds
        batch, n = x.shape[:2]
        if cache is None and use_cache:
            cache = DynamicCache(config=self.config) if _TRANSFORMERS_5 else DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0

        if position_ids is None and cache is None:
            # palm's plain forward: centre the xPos exponent on the sequence (as the reference does)
            positions, xpos_offset = torch.arange(n, device=x.device)[None], n // 2
        else:
            positions = position_ids if position_ids is not None else torch.arange(past, past + n, device=x.device)[None]
            xpos_offset = 0
        rotary = rotary_tables(positions, self.config.head_dim, self.config.xpos_scale_base, xpos_offset)
        mask = _attention_mask(attention_mask, batch, n, past, x.device)

        hidden_states = [x] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, rotary, mask, cache)
            if output_hidden_states:
                hidden_states.append(x)
        x = self.norm(x)
        if output_hidden_states:
            hidden_states[-1] = x  # the last entry is the normed output, as in transformers' models
        if logits_to_keep and labels is None:
            x = x[:, -logits_to_keep:]
        logits = self.to_logits(x)

        loss = None
        if labels is not None:
            loss = _next_token_loss(logits, labels, kwargs.get("num_items_in_batch"))
        output = CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=tuple(hidden_states) if hidden_states else None,
            **{_CACHE_FIELD: cache},
        )
        if return_dict is False:
            return output.to_tuple()
        return output


def _attention_mask(padding: Tensor | None, batch: int, n: int, past: int, device) -> Tensor | None:
    """The boolean mask (b, 1, n, past + n) of which keys each query sees, or None for plain causal
    attention over the whole sequence. Padding keys are hidden; a padding query sees only itself
    (a row with nothing to attend to would give NaNs)."""
    keys = past + n
    if padding is not None and padding.dim() == 4:  # already expanded: boolean, or additive 0 / -inf
        return padding if padding.dtype == torch.bool else padding == 0
    padded = padding is not None and not bool(padding[:, :keys].all())
    if not padded and past == 0:
        return None
    if not padded and n == 1:
        return None  # one new token sees the whole cache
    query = torch.arange(past, keys, device=device)[:, None]
    key = torch.arange(keys, device=device)
    allowed = key <= query  # (n, keys)
    if padded:
        real_key = padding[:, None, None, :keys].to(device=device, dtype=torch.bool)
        allowed = allowed & (real_key | (key == query))
    return allowed.expand(batch, 1, n, keys) if allowed.dim() == 2 else allowed


def _next_token_loss(logits: Tensor, labels: Tensor, num_items_in_batch: int | None = None) -> Tensor:
    """Cross entropy of logits[:, :-1] predicting labels[:, 1:], ignoring labels of -100; the mean
    over counted tokens, or the sum over `num_items_in_batch` (transformers' Trainer with
    gradient accumulation)."""
    logits = logits[:, :-1].flatten(0, 1).float()
    labels = labels[:, 1:].flatten().to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, labels, ignore_index=-100)
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / num_items_in_batch
