import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from palm import PalmError
from palm.prompts import EOS, PROMPT_STYLES, get_prompt_style, save_prompt_style, saved_prompt_style

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a {prime}?"},  # braces must come through as text
    {"role": "assistant", "content": "7"},
    {"role": "user", "content": "And an even one?"},
    {"role": "assistant", "content": "2"},
]


def test_alpaca_renders_the_stanford_template():
    text = get_prompt_style("alpaca").render([{"role": "user", "content": "Add 2 and 3."},
                                              {"role": "assistant", "content": "5"}], eos_token="</s>")
    assert text == ("Below is an instruction that describes a task. Write a response that appropriately completes "
                    "the request.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n5</s>")


def test_chatml_marks_only_the_replies_and_their_ends_as_learned():
    segments = get_prompt_style("chatml").segments(CONVERSATION)
    learned = [text for text, is_reply in segments if is_reply]
    assert learned == ["7<|im_end|>", EOS, "2<|im_end|>", EOS]
    prompt_text = "".join(text for text, is_reply in segments if not is_reply)
    assert prompt_text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a {prime}?<|im_end|>\n"
                           "<|im_start|>assistant\n\n<|im_start|>user\nAnd an even one?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("name", sorted(PROMPT_STYLES))
@pytest.mark.parametrize("generation", [False, True])
def test_the_jinja_chat_template_renders_what_palm_renders(name, generation):
    # the environment transformers' apply_chat_template uses
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    style = get_prompt_style(name)
    messages = CONVERSATION[:-1] if generation else CONVERSATION
    jinja = env.from_string(style.chat_template).render(messages=messages, eos_token="<EOS>",
                                                        add_generation_prompt=generation)
    assert jinja == style.render(messages, eos_token="<EOS>", generation=generation)


@pytest.mark.parametrize("messages, message", [
    ([], "non-empty list"),
    ([{"role": "robot", "content": "hi"}], "unknown role 'robot'"),
    ([{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}], "system message may only come first"),
    ([{"role": "user", "content": 3}], "string 'content'"),
    ([{"role": "user", "content": "no reply"}], "no assistant message"),
])
def test_conversations_palm_cannot_render(messages, message):
    with pytest.raises(PalmError, match=message):
        get_prompt_style("alpaca").segments(messages)


def test_a_saved_style_is_found_again(tmp_path):
    save_prompt_style(get_prompt_style("chatml"), tmp_path / "model")
    assert saved_prompt_style(tmp_path / "model").name == "chatml"
    assert (tmp_path / "model" / "chat_template.jinja").read_text() == get_prompt_style("chatml").chat_template
    assert saved_prompt_style(tmp_path) is None
    with pytest.raises(PalmError, match="unknown prompt style 'nope'"):
        get_prompt_style("nope")
