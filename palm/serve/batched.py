"""The model steps of a running batch whose sequences are at different positions.

`PaLM.forward` takes one set of positions for the whole batch. A serving batch mixes sequences that
joined at different times, so each row decodes at its own position: `decode_rows` runs the
model's own blocks (their norms, projections, rotary tables and attention, palm's kernels
included) with per-row rotary angles and per-row cache writes. Prefill goes through the blocks'
own forward, several prompts at once, right-padded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from palm.model import KVCache, ParallelBlock, apply_rotary


@dataclass
class CacheRows:
    """Rows [start, stop) of a `KVCache`, as views: what the model writes into them lands in the cache."""

    keys: list[Tensor]
    values: list[Tensor]

    @classmethod
    def of(cls, cache: KVCache, start: int, stop: int) -> CacheRows:
        return cls([k[start:stop] for k in cache.keys], [v[start:stop] for v in cache.values])


def copy_row(cache: KVCache, src: int, dst: int, length: int) -> None:
    """Move the first `length` cached positions of row `src` to row `dst` (compacting the batch)."""
    for tensor in (*cache.keys, *cache.values):
        tensor[dst, :, :length] = tensor[src, :, :length]


def prefill_rows(model: nn.Module, cache: CacheRows, prompts: list[list[int]]) -> Tensor:
    """Logits (len(prompts), vocab) of the token after each prompt, its keys and values written to
    `cache` rows (one per prompt, from position 0).

    The prompts are right-padded to the longest: a real token only sees earlier real tokens, and
    the padding's cache entries lie past each prompt's end, where decoding overwrites them before
    anything reads them. Only the last real position of each prompt is projected to logits.
    """
    device = model.token_emb.weight.device
    width = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        tokens[i, : len(prompt)] = torch.as_tensor(prompt)
    tokens = tokens.to(device)
    positions = torch.arange(width, device=device)
    rotary = model.rotary_tables(positions, xpos_offset=0)
    x = model.token_emb(tokens)
    for i, layer in enumerate(model.layers):
        x = layer(x, rotary, positions, None, (cache.keys[i], cache.values[i]))
    last = torch.tensor([len(p) - 1 for p in prompts], device=device)
    x = x[torch.arange(len(prompts), device=device), last]
    return model.to_logits(model.norm(x))


def decode_rows(model: nn.Module, cache: CacheRows, tokens: Tensor, positions: Tensor, keys: int) -> Tensor:
    """Logits (b, vocab) for one new token per row, `tokens` (b,) at `positions` (b,), each
    attending to its own row's cached positions [0, position]; `keys` is max(positions) + 1 (given,
    so that a compiled step needs no device-to-host read)."""
    mask = (torch.arange(keys, device=positions.device) <= positions[:, None])[:, None, None]  # (b, 1, 1, keys)
    rotary = tuple(t[:, None, None] for t in model.rotary_tables(positions, xpos_offset=0))  # (b, 1, 1, d) each
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    x = model.token_emb(tokens[:, None])
    for i, layer in enumerate(model.layers):
        x = x + block_decode(layer.fn, x, rotary, rows, positions, mask, cache.keys[i], cache.values[i])
    return model.to_logits(model.norm(x))[:, -1]


def block_decode(block: ParallelBlock, x: Tensor, rotary: tuple[Tensor, ...], rows: Tensor, positions: Tensor,
                 mask: Tensor, cached_k: Tensor, cached_v: Tensor) -> Tensor:
    """`ParallelBlock.forward` for one token per row, row r at `positions[r]` (its decode path,
    with the cache written per row instead of at one shared position)."""
    batch = x.shape[0]
    h = block.norm(x)
    q, k, v, ff = block.fused_attn_ff_proj(h).split(block.fused_dims, dim=-1)
    q = q.view(batch, 1, block.heads, block.dim_head).transpose(1, 2)  # (b, heads, 1, d)
    k, v = k.unsqueeze(1), v.unsqueeze(1)  # (b, 1, 1, d)
    if block.qk_rmsnorm:
        q = F.normalize(q, dim=-1) * block.q_scale
        k = F.normalize(k, dim=-1) * block.k_scale
    cos_q, sin_q, cos_k, sin_k = rotary
    q, k = apply_rotary(q, cos_q, sin_q), apply_rotary(k, cos_k, sin_k)
    cached_k[rows, 0, positions] = k[:, 0, 0]
    cached_v[rows, 0, positions] = v[:, 0, 0]
    keys = mask.shape[-1]
    out = block.single_query_attention(
        q.transpose(1, 2), cached_k[:, :, :keys], cached_v[:, :, :keys], attn_mask=mask, scale=block.attn_scale
    )  # (b, 1, heads, d)
    return block.attn_out(out.reshape(batch, 1, -1)) + block.ff_out(ff)
