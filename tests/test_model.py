import pytest
import torch
import torch.nn.functional as F

import palm
from palm import PaLM, PaLMConfig
from palm.config import PRESETS

from conftest import SMALL, reference_palm

CONFIGS = [
    dict(),
    dict(qk_rmsnorm=True),
    dict(depth=3, heads=2, dim_head=32, ff_mult=2),
    dict(dim=48, heads=3, dim_head=8, qk_rmsnorm=True, ff_mult=3),
]


@pytest.mark.parametrize("kwargs", CONFIGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_logits_and_loss_match_reference(tmp_path, kwargs):
    ref = reference_palm(seed=1, **kwargs)
    torch.save(ref.state_dict(), tmp_path / "ref.pt")
    model = palm.load(tmp_path / "ref.pt")

    tokens = torch.randint(0, SMALL["num_tokens"], (2, 300))
    tokens[:, ::7] = 0  # id 0 is what the reference leaves out of its loss
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ref(tokens), atol=1e-5, rtol=0)

        compat = PaLM(model.config.replace(loss_ignore_index=0))
        compat.load_state_dict(model.state_dict())
        torch.testing.assert_close(compat.loss(tokens), ref(tokens, return_loss=True), atol=1e-6, rtol=0)


def test_default_loss_trains_on_every_token_including_id_0():
    model = PaLM(PaLMConfig(**SMALL)).eval()
    tokens = torch.randint(0, SMALL["num_tokens"], (2, 33))
    tokens[:, 5] = 0
    with torch.no_grad():
        logits = model(tokens[:, :-1])
        by_hand = -torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None]).mean()
        torch.testing.assert_close(model.loss(tokens), by_hand)


@pytest.mark.parametrize("name", ["palm_150m_8k_v0", "palm_410m_8k_v0", "palm_1b_8k_v0", "palm_2b_8k_v0"])
def test_presets_match_reference_keys_and_shapes(name):
    from palm_rlhf_pytorch import PaLM as ReferencePaLM

    config = PRESETS[name]
    with torch.device("meta"):
        ref = ReferencePaLM(num_tokens=50304, dim=config.dim, depth=config.depth, dim_head=128, heads=8)
        ours = PaLM(config)
    ref_shapes = [(k, tuple(v.shape)) for k, v in ref.state_dict().items()]
    our_shapes = [(k, tuple(v.shape)) for k, v in ours.state_dict().items()]
    assert our_shapes == ref_shapes
    assert ours.num_parameters() == sum(p.numel() for p in ref.parameters())


def test_causal_future_tokens_do_not_change_past_logits():
    model = PaLM(PaLMConfig(**SMALL)).eval()
    tokens = torch.randint(0, SMALL["num_tokens"], (1, 40))
    changed = tokens.clone()
    changed[:, 25:] = torch.randint(0, SMALL["num_tokens"], (1, 15))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens)[:, :25], model(changed)[:, :25])
        assert not torch.allclose(model(tokens)[:, 25:], model(changed)[:, 25:])


def test_logits_to_keep_gives_the_last_positions_of_the_full_forward():
    model = PaLM(PaLMConfig(**SMALL)).eval()
    tokens = torch.randint(0, SMALL["num_tokens"], (2, 31))
    with torch.no_grad():
        full = model(tokens, torch.arange(31))
        for keep in (1, 7):
            cache = model.make_cache(2, 31)
            kept = model(tokens[:, :30], torch.arange(30), None, cache, logits_to_keep=keep)
            assert kept.shape == (2, keep, SMALL["num_tokens"])
            torch.testing.assert_close(kept, full[:, 30 - keep : 30])
            # the cache still got every position's keys: the next step matches the full forward
            step = model(tokens[:, 30:], torch.tensor([30]), torch.ones(2, 1, 1, 31, dtype=torch.bool), cache)
            torch.testing.assert_close(step[:, 0], full[:, 30], atol=1e-5, rtol=1e-5)


def test_no_biases_and_embedding_tied():
    model = PaLM(PaLMConfig(**SMALL))
    assert not [n for n, _ in model.named_parameters() if "bias" in n]
    assert model.to_logits.weight is model.token_emb.weight


def test_dropout_only_in_training():
    model = PaLM(PaLMConfig(**SMALL, attn_dropout=0.3, ff_dropout=0.3))
    tokens = torch.randint(0, SMALL["num_tokens"], (1, 16))
    with torch.no_grad():
        assert not torch.allclose(model.train()(tokens), model(tokens))
        model.eval()
        torch.testing.assert_close(model(tokens), model(tokens))


def test_bf16_keeps_rotary_tables_in_float32_and_positions_exact():
    config = PaLMConfig(**{**SMALL, "max_seq_len": 8192})
    model = PaLM(config).to(torch.bfloat16)
    rotary = model.layers[0].fn.rotary_emb
    assert rotary.inv_freq.dtype == torch.float32 and rotary.scale.dtype == torch.float32
    assert model.token_emb.weight.dtype == torch.bfloat16

    # Angles at late positions, against float64 math: exact to float32 rounding, whereas the
    # seed's bf16 tables are off by radians.
    positions = torch.arange(8000, 8192)
    cos, sin, _ = rotary(positions, xpos_offset=0)
    inv_freq64 = 1.0 / (10000 ** (torch.arange(0, config.dim_head, 2, dtype=torch.float64) / config.dim_head))
    angles64 = torch.outer(positions.double(), inv_freq64)
    assert (cos[:, : config.dim_head // 2].double() - angles64.cos()).abs().max() < 1e-3
    assert (sin[:, : config.dim_head // 2].double() - angles64.sin()).abs().max() < 1e-3

    # And a bf16 forward over 1024 positions stays within bf16 tolerance of fp32.
    fp32 = PaLM(config).eval()
    bf16 = PaLM(config).eval()
    bf16.load_state_dict(fp32.state_dict())
    bf16.to(torch.bfloat16)
    tokens = torch.randint(0, SMALL["num_tokens"], (1, 1024))
    with torch.no_grad():
        a, b = fp32(tokens), bf16(tokens).float()
    assert (a - b).abs().max() / a.abs().max() < 0.05
    assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999


def test_attention_scale_option():
    """attn_scale s scales the scores q.k by s instead of dim_head ** -0.5. With qk_rmsnorm, the
    same scores come from the default scale with q_scale multiplied by s * sqrt(dim_head): the
    logits must agree, in the full forward and in one-token decoding steps."""
    base = PaLMConfig(**SMALL, qk_rmsnorm=True)
    torch.manual_seed(0)
    default, scaled, rescaled_q = PaLM(base).eval(), PaLM(base.replace(attn_scale=8.0)).eval(), PaLM(base).eval()
    scaled.load_state_dict(default.state_dict())
    rescaled_q.load_state_dict(default.state_dict())
    with torch.no_grad():
        for block in rescaled_q.layers:
            block.fn.q_scale.mul_(8.0 * SMALL["dim_head"] ** 0.5)
    tokens = torch.randint(0, SMALL["num_tokens"], (1, 16))
    with torch.no_grad():
        expected = rescaled_q(tokens)
        torch.testing.assert_close(scaled(tokens), expected, atol=1e-5, rtol=1e-5)
        assert (scaled(tokens) - default(tokens)).abs().max() > 0.01  # and 8 is not the default scale
        cache = scaled.make_cache(1, 16)
        steps = [scaled(tokens[:, :1], torch.tensor([0]), None, cache)]
        for i in range(1, 16):  # the decoding path (one query per head) applies it too
            steps.append(scaled(tokens[:, i : i + 1], torch.tensor([i]), torch.ones(1, 1, 1, i + 1, dtype=torch.bool), cache))
        torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=1e-5, rtol=1e-5)
