"""Speculative decoding: a small draft model proposes tokens, the target model checks them in one forward.

Each round the draft decodes k tokens one at a time; the target then runs a single forward over
its last token and the k proposals (k + 1 positions, about the cost of one decode step while
decoding is bound by reading the weights) and keeps the longest prefix that the rejection rule
accepts, plus one token of its own (Leviathan et al. 2023, https://arxiv.org/abs/2211.17192; Chen
et al. 2023, https://arxiv.org/abs/2302.01318). The emitted tokens follow the target's distribution
exactly; at temperature 0 they are the target's greedy tokens.

Both models keep a KV cache. Keys and values are written at absolute positions and every query
attends only to earlier positions, so rolling a cache back to the accepted prefix needs no copy:
the next forward simply writes over the rejected positions before anything reads them.

One sequence at a time: the accepted length differs between sequences, while `PaLM.forward` takes
one set of positions per batch (`generate` runs the prompts of a batch one after another).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from palm.errors import PalmError
from palm.inference.decoding import (attention_mask, check_context, compiled, decode_step, decoding_view,
                                     forward_step, mark_static, prompt_rows)
from palm.inference.sampling import check_sampling_options, draw, sampling_probs
from palm.model import KVCache, PaLM


@dataclass
class Acceptance:
    """Counts of a speculative run: draft tokens proposed and accepted, target forwards (rounds)."""

    proposed: int = 0
    accepted: int = 0
    rounds: int = 0

    @property
    def rate(self) -> float:
        """Fraction of proposed draft tokens that the target accepted (NaN before any proposal)."""
        return self.accepted / self.proposed if self.proposed else float("nan")


def verify(
    target_probs: Tensor, draft_probs: Tensor, draft_tokens: Tensor, *, greedy: bool,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """The rejection rule for rows of k draft tokens: how many each row accepts (b,), and its next token (b,).

    `target_probs` (b, k + 1, vocab) are the target's distributions at the k proposals and after them,
    `draft_probs` (b, k, vocab) the draft's, `draft_tokens` (b, k) the proposals drawn from them.
    Proposal x is accepted with probability min(1, p(x) / q(x)); the first rejected one is replaced
    by a draw from max(0, p - q) renormalized, and when all k are accepted the next token is drawn
    from the target's last distribution. With one-hot (greedy) distributions this accepts exactly
    the proposals equal to the target's argmax and replaces the first other one by that argmax.
    """
    batch, k = draft_tokens.shape
    index = draft_tokens[..., None]
    p = target_probs[:, :k].gather(-1, index)[..., 0]
    q = draft_probs.gather(-1, index)[..., 0]
    # u < p / q, written without the division; greedy takes u = 0 (accept iff p(x) = 1)
    u = torch.zeros_like(p) if greedy else torch.rand(p.shape, generator=generator, device=p.device)
    accept = u * q < p
    accepted = accept.int().cumprod(dim=-1).sum(dim=-1)  # (b,) length of the accepted prefix
    rows = torch.arange(batch, device=draft_tokens.device)
    padded_draft = torch.cat([draft_probs, draft_probs.new_zeros(batch, 1, draft_probs.shape[-1])], dim=1)  # q = 0 after the last
    residual = (target_probs[rows, accepted] - padded_draft[rows, accepted]).clamp_(min=0)
    empty = residual.sum(dim=-1, keepdim=True) <= 0  # p == q where rounding left nothing: p itself
    residual = torch.where(empty, target_probs[rows, accepted], residual)
    return accepted, draw(residual, greedy, generator)


def check_draft(target: PaLM, draft: PaLM) -> None:
    """One PalmError when `draft` cannot propose tokens for `target` (other vocabulary or device)."""
    if draft.config.num_tokens != target.config.num_tokens:
        raise PalmError(
            f"the draft model has {draft.config.num_tokens:,} tokens but the target {target.config.num_tokens:,}; "
            "speculative decoding needs one vocabulary"
        )
    draft_device, target_device = draft.token_emb.weight.device, target.token_emb.weight.device
    if draft_device != target_device:
        raise PalmError(f"the draft model is on {draft_device} but the target on {target_device}; put both on one device")


def forward_from(model: PaLM, cache: KVCache, tokens: Tensor, start: int, logits_to_keep: int = 0) -> Tensor:
    """Logits (b, n, vocab) of `tokens` (b, n) at positions start..start + n - 1, attending to the
    cached positions before them; their keys and values overwrite whatever the cache held there.
    `logits_to_keep` as `PaLM.forward` takes it (0: all n)."""
    n = tokens.shape[1]
    positions = torch.arange(start, start + n, device=tokens.device)
    mask = None
    if start > 0:
        starts = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        mask = attention_mask(positions, start + n, starts)
    return model(tokens, positions, mask, cache, logits_to_keep)


def draft_decode_step(model: PaLM, cache: KVCache, tokens: Tensor, position: Tensor, starts: Tensor, keys: int) -> Tensor:
    """`decode_step` under a name of its own: torch.compile keeps compiled graphs per function, so
    the draft's steps do not check the guards of the target's graphs (or plain decoding's) first."""
    return decode_step(model, cache, tokens, position, starts, keys)


class SpeculativeStream:
    """The tokens of one speculatively decoded sequence, each a (1,) tensor as `palm.stream` yields
    them; `acceptance` counts proposals and accepted tokens as the stream goes. Made by
    `speculative_stream`."""

    def __init__(self, tokens: Iterator[Tensor], acceptance: Acceptance):
        self._tokens = tokens
        self.acceptance = acceptance

    def __iter__(self) -> Iterator[Tensor]:
        return self._tokens


def speculative_stream(
    model: PaLM,
    draft_model: PaLM,
    prompt_ids,
    max_new_tokens: int,
    *,
    draft_k: int = 4,
    temperature: float = 0.8,
    filter_thres: float | None = 0.9,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    compile: bool = False,
) -> SpeculativeStream:
    """Decode one prompt with `model`, `draft_model` proposing `draft_k` tokens per round.

    Arguments as `palm.stream`, for a single prompt (1-D, or a batch of one). The stream ends after
    `eos_token_id` (yielded) or `max_new_tokens`. Both models run through decoding views of
    themselves (`decoding_view`) and are left unchanged. `compile=True` runs the draft's one-token
    steps and the target's verifying forwards through torch.compile (`palm.inference.decoding.compiled`):
    for small drafts most of a step is fixed per-op cost, which compiling removes.
    """
    check_sampling_options(temperature, filter_thres, top_k, top_p)
    check_draft(model, draft_model)
    if draft_k < 1:
        raise PalmError(f"draft_k must be at least 1, got {draft_k}")
    rows = prompt_rows(prompt_ids)
    if len(rows) != 1:
        raise PalmError(f"speculative decoding takes one prompt at a time, got {len(rows)}")
    prompt = rows[0]
    for checked in (model, draft_model):
        check_context(len(prompt), max_new_tokens, checked.config.max_seq_len)
    if (prompt >= model.config.num_tokens).any() or (prompt < 0).any():
        raise PalmError(f"prompt has token ids outside the model's vocabulary [0, {model.config.num_tokens})")
    acceptance = Acceptance()
    options = dict(temperature=temperature, filter_thres=filter_thres, top_k=top_k, top_p=top_p)
    tokens = rounds(model, draft_model, prompt, max_new_tokens, draft_k, options, eos_token_id, generator, acceptance,
                    compile)
    return SpeculativeStream(tokens, acceptance)


@torch.inference_mode()
def rounds(
    model: PaLM, draft_model: PaLM, prompt: Tensor, max_new_tokens: int, draft_k: int, options: dict,
    eos_token_id: int | None, generator: torch.Generator | None, acceptance: Acceptance, compile: bool = False,
) -> Iterator[Tensor]:
    """The decoding loop of `speculative_stream` (a generator: nothing runs until the first token is asked for)."""
    if max_new_tokens <= 0:
        return
    device = model.token_emb.weight.device
    greedy = options["temperature"] == 0
    target, draft = decoding_view(model), decoding_view(draft_model)
    total = len(prompt) + max_new_tokens
    target_cache, draft_cache = target.make_cache(1, total), draft.make_cache(1, total)
    sequence = prompt.to(device)[None]  # (1, n): prompt and the tokens emitted so far
    # Each cache holds the keys of sequence[:, :filled]; the last token is never cached yet.
    target_filled = draft_filled = len(prompt) - 1
    if target_filled:
        forward_from(target, target_cache, sequence[:, :-1], 0, logits_to_keep=1)  # the caches only
        forward_from(draft, draft_cache, sequence[:, :-1], 0, logits_to_keep=1)
    if compile:
        # Every query attends over the whole preallocated cache, masked to its own position, so
        # that the compiled graphs see the same shapes every round.
        for cache in (target_cache, draft_cache):
            mark_static(cache)
        starts = torch.zeros(1, dtype=torch.long, device=device)
        draft_step, verify_step = compiled(draft_decode_step, device.type), compiled(forward_step, device.type)

        def draft_forward(tokens: Tensor, start: int) -> Tensor:
            for i in range(tokens.shape[1]):
                # a fresh (1, 1) tensor every call: a slice's strides (or a view of the caller's prompt) would recompile
                token = tokens[:, i : i + 1].clone(memory_format=torch.contiguous_format)
                logits = draft_step(draft, draft_cache, token, starts.new_tensor([start + i]), starts, total)
            return logits

        def target_forward(tokens: Tensor, start: int) -> Tensor:
            if tokens.shape[1] == 1:  # a last round with nothing proposed: not worth a graph of its own
                return forward_from(target, target_cache, tokens, start)
            positions = torch.arange(start, start + tokens.shape[1], device=device)
            # one graph for every k (the last round may propose fewer), not a recompile for the first other one
            torch._dynamo.mark_dynamic(tokens, 1)
            torch._dynamo.mark_dynamic(positions, 0)
            return verify_step(target, target_cache, tokens, positions, starts, total)
    else:
        def draft_forward(tokens: Tensor, start: int) -> Tensor:
            return forward_from(draft, draft_cache, tokens, start, logits_to_keep=1)[:, -1]

        def target_forward(tokens: Tensor, start: int) -> Tensor:
            return forward_from(target, target_cache, tokens, start)
    emitted = 0
    while emitted < max_new_tokens:
        n = sequence.shape[1]
        k = min(draft_k, max_new_tokens - emitted - 1)  # a round emits up to k + 1 tokens
        proposals, draft_probs = [], []
        if k:
            logits = draft_forward(sequence[:, draft_filled:], draft_filled)
            for i in range(k):
                q = sampling_probs(logits, **options)
                proposals.append(draw(q, greedy, generator))
                draft_probs.append(q)
                if i < k - 1:
                    logits = draft_forward(proposals[-1][:, None], n + i)
            draft_filled = n + k - 1
        proposed = torch.stack(proposals, dim=1) if k else sequence.new_zeros(1, 0)
        logits = target_forward(torch.cat([sequence[:, -1:], proposed], dim=1), n - 1)
        target_probs = sampling_probs(logits, **options)
        draft_probs = torch.stack(draft_probs, dim=1) if k else target_probs.new_zeros(1, 0, target_probs.shape[-1])
        accepted, next_token = verify(target_probs, draft_probs, proposed, greedy=greedy, generator=generator)
        accepted = int(accepted)
        acceptance.proposed += k
        acceptance.accepted += accepted
        acceptance.rounds += 1
        new = torch.cat([proposed[:, :accepted], next_token[:, None]], dim=1)
        sequence = torch.cat([sequence, new], dim=1)
        target_filled = n + accepted  # the rejected positions beyond are overwritten next round
        draft_filled = min(draft_filled, target_filled)
        for token in new[0]:
            emitted += 1
            yield token[None]
            if eos_token_id is not None and int(token) == eos_token_id:
                return
