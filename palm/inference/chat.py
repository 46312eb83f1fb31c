"""Replies to a conversation: the conversation rendered in a prompt style and fitted to the
context, then the reply streamed as text until the end-of-text token or the style's stop text."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from palm.errors import PalmError
from palm.inference.decoding import stream
from palm.model import PaLM
from palm.prompts import EOS, PromptStyle


def prompt_ids(tokenizer, style: PromptStyle, messages: list[dict], max_len: int) -> list[int]:
    """Token ids that ask for the next reply to `messages`, tokenized segment by segment as
    fine-tuning tokenizes them. The oldest turns (after a leading system message) are left out
    until the prompt fits `max_len` tokens."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    while True:
        ids = []
        for text, _ in style.segments(system + turns, generation=True):
            ids += [tokenizer.eos_id] if text is EOS else tokenizer.encode(text)
        if len(ids) <= max_len:
            return ids
        if len(turns) <= 1:
            raise PalmError(f"the conversation's last message takes {len(ids)} tokens of the {max_len} the context "
                            "leaves for it; write a shorter one (or ask for fewer new tokens)")
        turns = turns[1:]
        while turns and turns[0]["role"] != "user":  # a conversation resumes with a user turn
            turns = turns[1:]


class StopAtText:
    """Passes text through until one of `stops` appears; never lets out a piece of a stop text
    (text that could be the start of one is held back until it is clearly not)."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """The text that is safe to show now."""
        self.pending += text
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.pending, self.stopped = self.pending[: min(found)], "", True
            return out
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return out

    def flush(self) -> str:
        """What was held back, once the text has ended without a stop."""
        out, self.pending = self.pending, ""
        return out


def reply(model: PaLM, tokenizer, style: PromptStyle, messages: list[dict], max_new_tokens: int,
          **sampling) -> Iterator[str]:
    """Stream the model's reply to `messages` as text. `sampling` goes to `palm.stream`
    (temperature, filter_thres, top_k, top_p, generator, compile)."""
    from palm.tokenizer import TextStreamer

    max_new_tokens = min(max_new_tokens, model.config.max_seq_len - 1)
    ids = prompt_ids(tokenizer, style, messages, model.config.max_seq_len - max_new_tokens)
    text = TextStreamer(tokenizer)
    stop = StopAtText([style.stop_text] if style.stop_text else [])
    device = model.token_emb.weight.device
    for token in stream(model, torch.tensor(ids, device=device), max_new_tokens, eos_token_id=tokenizer.eos_id, **sampling):
        token = int(token[0])
        if token == tokenizer.eos_id:
            break
        piece = stop.push(text.push(token))
        if piece:
            yield piece
        if stop.stopped:
            return
    if rest := stop.flush():
        yield rest
