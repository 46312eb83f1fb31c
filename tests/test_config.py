import pytest

from palm import PaLMConfig, PalmError, get_config
from palm.config import preset_matching


def test_json_round_trip(tmp_path):
    config = PaLMConfig(num_tokens=1000, dim=96, depth=3, heads=2, dim_head=48, qk_rmsnorm=True, attn_scale=8.0)
    path = tmp_path / "config.json"
    path.write_text(config.to_json())
    assert PaLMConfig.from_json(path) == config


@pytest.mark.parametrize(
    "name, dim, depth",
    [("palm_150m_8k_v0", 768, 12), ("410m", 1024, 24), ("1b", 2048, 16), ("palm_2b_8k_v0", 2560, 24)],
)
def test_published_presets(name, dim, depth):
    config = get_config(name)
    assert (config.dim, config.depth) == (dim, depth)
    assert (config.num_tokens, config.heads, config.dim_head, config.max_seq_len) == (50304, 8, 128, 8192)
    assert not config.qk_rmsnorm


def test_tiny_fits_the_byte_tokenizer():
    assert get_config("tiny").num_tokens >= 257


def test_preset_matching_ignores_training_fields():
    assert preset_matching(get_config("1b").replace(ff_dropout=0.1, loss_ignore_index=0)) == "palm_1b_8k_v0"
    assert preset_matching(get_config("1b").replace(depth=3)) is None


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: get_config("3b"), "unknown preset '3b'"),
        (lambda: PaLMConfig(dim=0), "dim must be a positive integer"),
        (lambda: PaLMConfig(dim_head=63), "dim_head must be even"),
        (lambda: PaLMConfig(ff_dropout=1.0), "ff_dropout must be in [0, 1)"),
        (lambda: PaLMConfig.from_dict({"dim": 8, "flash": True}), "unknown field(s) flash"),
    ],
)
def test_bad_configs_raise_clear_errors(make, message):
    with pytest.raises(PalmError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        make()
