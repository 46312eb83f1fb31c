"""The PaLM model, written to load the published checkpoints (palm-rlhf-pytorch 0.2.1-0.2.3) unchanged.

Architecture (Chowdhery et al. 2022, https://arxiv.org/abs/2204.02311): a stack of parallel blocks,
each computing attention and a SwiGLU feedforward from the same pre-LayerNorm input, both added to
the residual stream; multi-query attention (one key/value head shared by all query heads,
https://arxiv.org/abs/1911.02150); rotary position embeddings with xPos scaling
(https://arxiv.org/abs/2212.10554); LayerNorm without bias; no biases anywhere; input embedding tied
to the output projection. Module names mirror the reference so that state dicts round-trip.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from palm.config import PaLMConfig


class LayerNorm(nn.Module):
    """LayerNorm without bias; the zero `beta` buffer is kept because the checkpoints store it."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))
        self.register_buffer("beta", torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], self.gamma, self.beta)


class RotaryEmbedding(nn.Module):
    """Rotary angles and xPos scales, always in float32 whatever dtype the model is cast to.

    In bf16 the angle of position 300 is already off by more than a radian, so the tables and
    the rotation itself stay in float32.
    """

    def __init__(self, dim_head: int, scale_base: int):
        super().__init__()
        self.scale_base = scale_base
        half = torch.arange(0, dim_head, 2, dtype=torch.float32)
        self.register_buffer("inv_freq", 1.0 / (10000 ** (half / dim_head)))
        self.register_buffer("scale", (half + 0.4 * dim_head) / (1.4 * dim_head))

    def _apply(self, fn, recurse=True):
        # Follow device moves (.to(device), .cuda()) but not dtype casts (.half(), .to(bf16)).
        for name, buf in self._buffers.items():
            if buf is not None:
                moved = fn(buf)
                self._buffers[name] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        return self

    def forward(self, positions: Tensor, xpos_offset: int) -> tuple[Tensor, Tensor, Tensor]:
        """cos, sin and xPos scale for `positions`, each (len(positions), dim_head) in float32.

        The xPos exponent is (position - xpos_offset) / scale_base; queries take scale**power and
        keys scale**-power, so attention scores depend only on the distance between positions.
        """
        positions = positions.to(self.inv_freq)
        angles = torch.outer(positions, self.inv_freq)
        power = (positions - xpos_offset) / self.scale_base
        xpos = self.scale ** power[:, None]
        cos, sin, xpos = (torch.cat((t, t), dim=-1) for t in (angles.cos(), angles.sin(), xpos))
        return cos, sin, xpos


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate `x` by the given angles (which already carry the xPos scale), computing in float32."""
    x32 = x.float()
    return (x32 * cos + rotate_half(x32) * sin).type_as(x)


class SwiGLU(nn.Module):
    """SwiGLU (https://arxiv.org/abs/2002.05202): value half first, gate half second."""

    def forward(self, x: Tensor) -> Tensor:
        x, gate = x.chunk(2, dim=-1)
        return F.silu(gate) * x


class FusedProjection(nn.Linear):
    """One bias-free projection computing several named outputs side by side (`parts`: name ->
    width, in order), so that a single matmul serves them all."""

    def __init__(self, in_features: int, parts: dict[str, int]):
        super().__init__(in_features, sum(parts.values()), bias=False)
        self.parts = dict(parts)


class KVCache:
    """Keys and values of every block for `batch_size` sequences of up to `max_len` positions.

    Multi-query attention stores one key head and one value head per block, (batch, 1, max_len,
    dim_head) each. The cache lives outside the model (`PaLM.make_cache`, then `forward(...,
    cache=cache)` fills it), so a model carries no decoding state between callers.
    """

    def __init__(self, depth: int, batch_size: int, max_len: int, dim_head: int, dtype: torch.dtype, device=None):
        shape = (batch_size, 1, max_len, dim_head)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(depth)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(depth)]


class ParallelBlock(nn.Module):
    """Attention and feedforward computed in parallel from one normed input (GPT-J style)."""

    def __init__(self, config: PaLMConfig):
        super().__init__()
        dim, dim_head = config.dim, config.dim_head
        self.heads = config.heads
        self.dim_head = dim_head
        self.attn_scale = config.attn_scale
        self.attn_dropout = config.attn_dropout
        self.qk_rmsnorm = config.qk_rmsnorm

        # Registration order follows the reference, so state dicts list keys in the same order.
        self.norm = LayerNorm(dim)
        if config.qk_rmsnorm:
            self.q_scale = nn.Parameter(torch.ones(dim_head))
            self.k_scale = nn.Parameter(torch.ones(dim_head))
        self.rotary_emb = RotaryEmbedding(dim_head, config.xpos_scale_base)
        # One projection yields, in this order: queries of all heads, the single key head, the
        # single value head, and the SwiGLU input.
        parts = {"q": config.attn_inner_dim, "k": dim_head, "v": dim_head, "ff_in": 2 * config.ff_inner_dim}
        self.fused_dims = tuple(parts.values())
        self.fused_attn_ff_proj = FusedProjection(dim, parts)
        self.attn_out = nn.Linear(config.attn_inner_dim, dim, bias=False)
        self.ff_out = nn.Sequential(
            SwiGLU(), nn.Dropout(config.ff_dropout), nn.Linear(config.ff_inner_dim, dim, bias=False)
        )
        # Attention of a single query position over the cache (decoding), in SDPA's signature;
        # `palm.inference.cpu.swap_in_kernels` swaps in a CPU kernel that skips the empty cache slots.
        self.single_query_attention = F.scaled_dot_product_attention

    def forward(
        self, x: Tensor, rotary: tuple[Tensor, ...], positions: Tensor, attn_mask: Tensor | None,
        kv_cache: tuple[Tensor, Tensor] | None,
    ) -> Tensor:
        batch, n, _ = x.shape
        x = self.norm(x)
        q, k, v, ff = self.fused_attn_ff_proj(x).split(self.fused_dims, dim=-1)

        q = q.view(batch, n, self.heads, self.dim_head).transpose(1, 2)  # (b, heads, n, d)
        k, v = k.unsqueeze(1), v.unsqueeze(1)  # (b, 1, n, d), shared by every query head

        if self.qk_rmsnorm:
            q = F.normalize(q, dim=-1) * self.q_scale
            k = F.normalize(k, dim=-1) * self.k_scale

        cos_q, sin_q, cos_k, sin_k = rotary
        q, k = apply_rotary(q, cos_q, sin_q), apply_rotary(k, cos_k, sin_k)

        is_causal = attn_mask is None
        if kv_cache is not None:  # decoding: store this step's keys/values, attend over the cache
            cached_k, cached_v = kv_cache
            cached_k.index_copy_(2, positions, k)
            cached_v.index_copy_(2, positions, v)
            keys = attn_mask.shape[-1] if attn_mask is not None else n
            k, v = cached_k[:, :, :keys], cached_v[:, :, :keys]
        if n == 1:
            # One query per head against one shared key/value head: fold the heads into the query
            # axis, so attention reads the cached keys once instead of once per head.
            out = self.single_query_attention(
                q.transpose(1, 2), k, v, attn_mask=attn_mask, scale=self.attn_scale
            )  # (b, 1, heads, d)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=attn_mask,
                dropout_p=self.attn_dropout if self.training else 0.0,
                is_causal=is_causal,
                scale=self.attn_scale,
                enable_gqa=True,
            ).transpose(1, 2)  # (b, n, heads, d)
        return self.attn_out(out.reshape(batch, n, -1)) + self.ff_out(ff)


class Residual(nn.Module):
    """x + fn(x); the wrapper exists so state-dict keys read `layers.N.fn.*` like the reference's."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor, *args) -> Tensor:
        return x + self.fn(x, *args)


class PaLM(nn.Module):
    """A decoder-only PaLM language model; `forward` maps token ids (b, n) to logits (b, n, vocab)."""

    def __init__(self, config: PaLMConfig):
        super().__init__()
        self.config = config
        self.token_emb = nn.Embedding(config.num_tokens, config.dim)
        self.layers = nn.ModuleList(Residual(ParallelBlock(config)) for _ in range(config.depth))
        self.norm = LayerNorm(config.dim)
        self.to_logits = nn.Linear(config.dim, config.num_tokens, bias=False)
        self.tie_weights()
        nn.init.normal_(self.token_emb.weight, std=0.02)

    def tie_weights(self) -> None:
        """Share the input embedding with the output projection (call again after assigning weights)."""
        self.to_logits.weight = self.token_emb.weight

    def forward(
        self, tokens: Tensor, positions: Tensor | None = None, attn_mask: Tensor | None = None,
        cache: KVCache | None = None, logits_to_keep: int = 0,
    ) -> Tensor:
        """Logits (b, n, vocab) for `tokens` (b, n).

        Without `positions`, the tokens are one causal sequence from position 0. With `positions`
        (n,), the absolute positions of `tokens`. With a `cache` (see `make_cache`), their keys and
        values are stored in it at those positions (default: from 0) and they attend to cached
        positions [0, attn_mask.shape[-1]) as the boolean `attn_mask` (b, 1, n, keys) allows; a None
        mask means a causal prefill from 0. `logits_to_keep` > 0 returns the logits of the last that
        many positions only (as transformers' models take it): a prefill needs just the last one, and
        the output projection is a third of a 150m model's work per position.
        """
        n = tokens.shape[1]
        # The reference centres the xPos exponent on the middle of a sequence; scores depend only
        # on position differences, so positions given or cached are taken as absolute instead.
        absolute = positions is not None or cache is not None
        if positions is None:
            positions = torch.arange(n, device=tokens.device)
        rotary = self.rotary_tables(positions, xpos_offset=0 if absolute else n // 2)
        x = self.token_emb(tokens)
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            x = layer(x, rotary, positions, attn_mask, kv)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.to_logits(self.norm(x))

    def rotary_tables(self, positions: Tensor, xpos_offset: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """cos and sin for queries and keys, the xPos scale folded in (queries scale, keys 1/scale)."""
        # Every block holds the same tables (kept per block for the checkpoints' keys): compute once.
        cos, sin, xpos = self.layers[0].fn.rotary_emb(positions, xpos_offset)
        return cos * xpos, sin * xpos, cos / xpos, sin / xpos

    def make_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty key/value cache for `batch_size` sequences of up to `max_len` tokens, in the
        dtype and on the device of the model's weights."""
        weight = self.token_emb.weight
        return KVCache(self.config.depth, batch_size, max_len, self.config.dim_head, weight.dtype, weight.device)

    def loss(self, tokens: Tensor) -> Tensor:
        """Mean next-token cross entropy of `tokens` (b, n): predicts tokens[:, 1:] from tokens[:, :-1]."""
        return next_token_loss(self, tokens, self.config.loss_ignore_index)

    def num_parameters(self) -> int:
        """Number of distinct parameters (the tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())


def next_token_loss(model: nn.Module, tokens: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean cross entropy of `model` (PaLM, or a wrapper around one such as DDP) predicting
    tokens[:, 1:] from tokens[:, :-1]."""
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), ignore_index=ignore_index)
