"""Prompt styles: how a conversation (system, user and assistant messages) becomes text, for
fine-tuning, chat and serving alike.

A style renders a conversation as segments of text, each marked as part of a reply (what a
fine-tuned model learns to write) or not, with the tokenizer's end-of-text token after every
reply, so that fine-tuned models learn to stop. The same rendering, written as a Jinja chat
template (`PromptStyle.chat_template`), travels with a fine-tuned model for tools that format
prompts with `tokenizer.apply_chat_template`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from palm.errors import PalmError

ROLES = ("system", "user", "assistant")
STYLE_FILE = "prompt_style.json"
TEMPLATE_FILE = "chat_template.jinja"
EOS = None  # marks the tokenizer's end-of-text token among the segments


@dataclass(frozen=True)
class PromptStyle:
    """Templates for each part of a conversation; `{content}` is the message's text."""

    name: str
    preamble: str  # once, at the start
    system: str
    user: str
    reply_start: str  # before each assistant reply (and where generation begins)
    reply_end: str  # closes a reply, before the end-of-text token; learned with the reply
    separator: str  # after a reply's end-of-text token, before the next turn
    input_format: str  # an instruction with an input (Alpaca records)

    def segments(self, messages: list[dict], *, generation: bool = False) -> list[tuple[str | None, bool]]:
        """(text, is_reply) pieces of `messages` rendered; text None stands for the end-of-text
        token. With `generation`, ends with `reply_start`, where the next reply begins."""
        check_messages(messages, generation=generation)
        pieces: list[tuple[str | None, bool]] = [(self.preamble, False)] if self.preamble else []
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                pieces += [(self.reply_start, False), (message["content"] + self.reply_end, True), (EOS, True)]
                if i + 1 < len(messages) and self.separator:
                    pieces.append((self.separator, False))
            else:
                pieces.append((getattr(self, message["role"]).format(content=message["content"]), False))
        if generation:
            pieces.append((self.reply_start, False))
        return _merge_adjacent(pieces)

    def render(self, messages: list[dict], *, eos_token: str = "", generation: bool = False) -> str:
        """The whole conversation as one string, the end-of-text token written as `eos_token`."""
        return "".join(eos_token if text is EOS else text for text, _ in self.segments(messages, generation=generation))

    @property
    def stop_text(self) -> str | None:
        """Text that ends a reply besides the end-of-text token, if the style has one."""
        return self.reply_end or None

    @property
    def chat_template(self) -> str:
        """This style as a Jinja chat template (transformers' `apply_chat_template`), rendering
        exactly what `render` does, with `add_generation_prompt` for `generation`."""
        def literal(text: str) -> str:
            return json.dumps(text)

        def with_content(template: str, expression: str) -> str:
            before, after = template.split("{content}")
            return f"{literal(before)} + {expression} + {literal(after)}"

        return "".join([
            "{{- " + literal(self.preamble) + " -}}",
            "{%- for message in messages -%}",
            "{%- if message['role'] == 'assistant' -%}",
            "{{- " + literal(self.reply_start) + " + message['content'] + " + literal(self.reply_end) + " + eos_token -}}",
            "{%- if not loop.last -%}{{- " + literal(self.separator) + " -}}{%- endif -%}",
            "{%- elif message['role'] == 'system' -%}",
            "{{- " + with_content(self.system, "message['content']") + " -}}",
            "{%- else -%}",
            "{{- " + with_content(self.user, "message['content']") + " -}}",
            "{%- endif -%}",
            "{%- endfor -%}",
            "{%- if add_generation_prompt -%}{{- " + literal(self.reply_start) + " -}}{%- endif -%}",
        ])


def _merge_adjacent(pieces: list[tuple[str | None, bool]]) -> list[tuple[str | None, bool]]:
    merged: list[tuple[str | None, bool]] = []
    for text, is_reply in pieces:
        if text == "":
            continue
        if merged and text is not EOS and merged[-1][0] is not EOS and merged[-1][1] == is_reply:
            merged[-1] = (merged[-1][0] + text, is_reply)
        else:
            merged.append((text, is_reply))
    return merged


ALPACA_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"

PROMPT_STYLES: dict[str, PromptStyle] = {
    # Stanford Alpaca's template (Taori et al. 2023), the common one for instruction tuning
    "alpaca": PromptStyle("alpaca", preamble=ALPACA_PREAMBLE, system="{content}\n\n", user="### Instruction:\n{content}\n\n",
                          reply_start="### Response:\n", reply_end="", separator="\n\n",
                          input_format="{instruction}\n\n### Input:\n{input}"),
    # FLAN's zero-shot form (Wei et al. 2022; Chung et al. 2022): the task's text, then the answer
    "flan": PromptStyle("flan", preamble="", system="{content}\n\n", user="{content}\n\n", reply_start="",
                        reply_end="", separator="\n\n", input_format="{instruction}\n\n{input}"),
    # ChatML (OpenAI), as most open chat models write it
    "chatml": PromptStyle("chatml", preamble="", system="<|im_start|>system\n{content}<|im_end|>\n",
                          user="<|im_start|>user\n{content}<|im_end|>\n", reply_start="<|im_start|>assistant\n",
                          reply_end="<|im_end|>", separator="\n", input_format="{instruction}\n\n{input}"),
    # For base models that were never fine-tuned on a format: a plain transcript
    "plain": PromptStyle("plain", preamble="", system="{content}\n\n", user="User: {content}\n", reply_start="Assistant: ",
                         reply_end="", separator="\n", input_format="{instruction}\n\n{input}"),
}
DEFAULT_STYLE = "alpaca"
BASE_MODEL_STYLE = "plain"


def get_prompt_style(name: str) -> PromptStyle:
    if name not in PROMPT_STYLES:
        raise PalmError(f"unknown prompt style {name!r}; choose one of: {', '.join(PROMPT_STYLES)}")
    return PROMPT_STYLES[name]


def check_messages(messages: list[dict], *, generation: bool = False, where: str = "messages") -> None:
    """One PalmError for a conversation palm cannot render: not a list of {role, content}, an
    unknown role, a system message after the first, or (for training) no assistant reply."""
    if not isinstance(messages, list) or not messages:
        raise PalmError(f"{where}: expected a non-empty list of {{role, content}} messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
            raise PalmError(f"{where}: message {i + 1} is not an object with a 'role' and a string 'content'")
        if message["role"] not in ROLES:
            raise PalmError(f"{where}: message {i + 1} has the unknown role {message['role']!r} (use {', '.join(ROLES)})")
        if message["role"] == "system" and i > 0:
            raise PalmError(f"{where}: a system message may only come first (message {i + 1})")
    if not generation and not any(m["role"] == "assistant" for m in messages):
        raise PalmError(f"{where}: no assistant message to learn from")


def save_prompt_style(style: PromptStyle, directory: Path) -> None:
    """Record the style beside a model: its name (for palm) and its Jinja chat template."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / STYLE_FILE).write_text(json.dumps({"prompt_style": style.name}) + "\n")
    (directory / TEMPLATE_FILE).write_text(style.chat_template)


def saved_prompt_style(source: str | Path) -> PromptStyle | None:
    """The style saved beside a local model (or adapter) directory, if any."""
    path = Path(source) / STYLE_FILE
    if not path.is_file():
        return None
    try:
        name = json.loads(path.read_text())["prompt_style"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PalmError(f"{path} is not a prompt style file ({e})") from None
    return get_prompt_style(name)
