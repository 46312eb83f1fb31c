"""Text generation: prefill the prompt once, then decode one token at a time against a KV cache."""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from palm.errors import PalmError
from palm.inference.cpu import swap_in_kernels
from palm.inference.sampling import check_sampling_options, sample
from palm.model import KVCache, PaLM

Prompts = Tensor | Sequence[Sequence[int]] | Sequence[Tensor]


def prompt_rows(prompts: Prompts) -> list[Tensor]:
    """One 1-D LongTensor per prompt."""
    if isinstance(prompts, Tensor):
        rows = list(prompts[None] if prompts.dim() == 1 else prompts)
    else:
        rows = [torch.as_tensor(p, dtype=torch.long) for p in prompts]
    if not rows or any(row.numel() == 0 for row in rows):
        raise PalmError("empty prompt: give at least one token")
    return rows


def left_pad(prompts: Prompts, device: torch.device) -> tuple[Tensor, Tensor]:
    """Prompts as one left-padded (b, n) tensor, and where each real prompt starts (b,)."""
    rows = prompt_rows(prompts)
    width = max(row.numel() for row in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, width - row.numel():] = row
    starts = torch.tensor([width - row.numel() for row in rows])
    return tokens.to(device), starts.to(device)


def attention_mask(query_positions: Tensor, keys: int, starts: Tensor) -> Tensor:
    """(b, 1, n, keys) booleans: each query sees earlier keys of its own sequence.

    Padding queries see only themselves, so no row is empty (an empty row would give NaNs that
    spread through the cached values).
    """
    key_positions = torch.arange(keys, device=starts.device)
    causal = key_positions <= query_positions[:, None]  # (n, keys)
    real_key = key_positions >= starts[:, None, None]  # (b, 1, keys)
    itself = key_positions == query_positions[:, None]
    return (causal & (real_key | itself))[:, None]


def check_context(prompt_len: int, max_new_tokens: int, max_seq_len: int) -> None:
    """One PalmError when a prompt, or the prompt and the tokens to add, exceed the model's context."""
    if prompt_len > max_seq_len or (prompt_len == max_seq_len and max_new_tokens > 0):
        raise PalmError(f"the prompt is {prompt_len} tokens; the model's context is {max_seq_len}")
    if prompt_len + max_new_tokens > max_seq_len:
        raise PalmError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"context of {max_seq_len} tokens"
        )


def decoding_view(model: nn.Module) -> nn.Module:
    """An eval-mode view of `model` for decoding: it shares every parameter and buffer with `model`
    (a change to the weights of either shows in both) but has module objects of its own, so that
    `model` stays exactly as it was. On the CPU the view runs on palm's kernels where they can
    (`palm.inference.cpu.swap_in_kernels`)."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return swap_in_kernels(copy.deepcopy(model, memo=shared).eval())


def forward_step(model: PaLM, cache: KVCache, tokens: Tensor, positions: Tensor, starts: Tensor, keys: int) -> Tensor:
    """Logits (b, n, vocab) for new tokens (b, n) at `positions` (n,), each attending to the cached
    keys [0, keys) at or before its own position (and after its sequence's start in `starts`)."""
    return model(tokens, positions, attention_mask(positions, keys, starts), cache)


def decode_step(model: PaLM, cache: KVCache, tokens: Tensor, position: Tensor, starts: Tensor, keys: int) -> Tensor:
    """Logits (b, vocab) for one new token per sequence at `position` (1,), attending to cached keys [0, keys)."""
    return forward_step(model, cache, tokens, position, starts, keys)[:, -1]


@functools.cache
def compiled(step, device_type: str):
    """`step` (`decode_step` or `forward_step`) through torch.compile. The first call compiles for
    the shapes at hand; a later call with other sizes recompiles once with those sizes symbolic.

    On the CPU the compiled graph runs from a C++ wrapper: eager PyTorch spends ~10-20 us of
    Python per op, a few hundred ops per token, as much as the matmuls of a small model.
    On CUDA, CUDA graphs remove the kernel-launch overhead instead.
    """
    options = {"triton.cudagraphs": True} if device_type == "cuda" else {"cpp_wrapper": True}
    return torch.compile(step, options=options)


def mark_static(cache: KVCache) -> None:
    """Tell torch.compile that `cache`'s tensors are written in place every step and never
    reallocated (static inputs, so that CUDA graphs can capture them)."""
    for tensor in (*cache.keys, *cache.values):
        torch._dynamo.mark_static_address(tensor, guard=False)


@torch.inference_mode()
def stream(
    model: PaLM,
    prompt_ids: Prompts,
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    filter_thres: float | None = 0.9,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    compile: bool = False,
) -> Iterator[Tensor]:
    """Yield the next token of every sequence, (b,), as each is decoded.

    `prompt_ids` is one prompt (1-D), a batch of equal-length prompts (2-D), or a list of prompts
    of different lengths (left-padded internally). A sequence that has produced `eos_token_id`
    yields `eos_token_id` from then on; the stream ends when all have, or after `max_new_tokens`.
    `compile=True` decodes through `compiled(decode_step)` (worth it for long generations: the
    first call compiles for tens of seconds). The model runs through a view of it (see
    `decoding_view`), on palm's kernels on x86 CPUs; `model` itself is never changed.
    """
    check_sampling_options(temperature, filter_thres, top_k, top_p)
    device = model.token_emb.weight.device
    tokens, starts = left_pad(prompt_ids, device)
    batch, prompt_len = tokens.shape
    check_context(prompt_len, max_new_tokens, model.config.max_seq_len)
    if max_new_tokens <= 0:
        return
    if (tokens >= model.config.num_tokens).any() or (tokens < 0).any():
        raise PalmError(f"prompt has token ids outside the model's vocabulary [0, {model.config.num_tokens})")

    total = prompt_len + max_new_tokens
    decoder = decoding_view(model)
    cache = decoder.make_cache(batch, total)
    if compile:
        mark_static(cache)
    options = dict(temperature=temperature, filter_thres=filter_thres, top_k=top_k, top_p=top_p, generator=generator)

    positions = torch.arange(prompt_len, device=device)
    padded = bool(starts.any())
    mask = attention_mask(positions, prompt_len, starts) if padded else None
    logits = decoder(tokens, positions, mask, cache, logits_to_keep=1)[:, -1]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        next_token = sample(logits, **options)
        if eos_token_id is not None:
            next_token = next_token.masked_fill(finished, eos_token_id)
            finished |= next_token == eos_token_id
        yield next_token
        if step == max_new_tokens - 1 or (eos_token_id is not None and bool(finished.all())):
            return
        step_fn = compiled(decode_step, device.type) if compile else decode_step  # set up after the first token
        logits = step_fn(decoder, cache, next_token[:, None], positions.new_tensor([prompt_len + step]), starts, total)


def generate(
    model: PaLM,
    prompt_ids: Prompts,
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    filter_thres: float | None = 0.9,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    pad_token_id: int | None = None,
    compile: bool = False,
    draft_model: PaLM | None = None,
    draft_k: int = 4,
) -> Tensor:
    """Prompt + continuation as a LongTensor; see `stream` for the arguments.

    One 1-D prompt gives a 1-D result ending at its EOS (inclusive) if one was produced. A batch
    gives (b, longest) rows that each start with their prompt, padded on the right after their
    EOS with `pad_token_id` (default: `eos_token_id`, else 0).

    With a `draft_model` (same vocabulary), decoding is speculative: the draft proposes `draft_k`
    tokens a round and `model` verifies them in one forward (`palm.inference.speculative`); the
    tokens follow `model`'s distribution, and at temperature 0 equal its greedy decoding. The
    prompts of a batch are then decoded one after another.
    """
    options = dict(temperature=temperature, filter_thres=filter_thres, top_k=top_k, top_p=top_p,
                   eos_token_id=eos_token_id, generator=generator)
    prompts = prompt_rows(prompt_ids)
    if draft_model is not None:
        from palm.inference.speculative import speculative_stream

        check_context(max(len(p) for p in prompts), max_new_tokens, model.config.max_seq_len)
        per_prompt = [list(speculative_stream(model, draft_model, p, max_new_tokens, draft_k=draft_k, compile=compile,
                                              **options))
                      for p in prompts]
        longest = max(len(s) for s in per_prompt)
        fill = torch.tensor([eos_token_id if eos_token_id is not None else 0])
        steps = [torch.cat([s[i].cpu() if i < len(s) else fill for s in per_prompt]) for i in range(longest)]
    else:
        steps = list(stream(model, prompt_ids, max_new_tokens, compile=compile, **options))
    single = isinstance(prompt_ids, Tensor) and prompt_ids.dim() == 1
    new = torch.stack(steps, dim=1).cpu() if steps else torch.zeros(len(prompts), 0, dtype=torch.long)
    rows = []
    for prompt, continuation in zip(prompts, new):
        if eos_token_id is not None and (continuation == eos_token_id).any():
            continuation = continuation[: int((continuation == eos_token_id).nonzero()[0]) + 1]
        rows.append(torch.cat([prompt.cpu(), continuation]))
    if single:
        return rows[0]
    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad)
