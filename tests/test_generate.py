import copy
import math

import pytest
import torch
import torch.nn.functional as F

import palm
from palm import PaLM, PaLMConfig, PalmError
from palm.inference.cpu import kernel_available
from palm.inference.decoding import attention_mask, decoding_view, generate, stream
from palm.inference.quantization import Int8Linear, quantize
from palm.inference.sampling import sample

from conftest import CORPUS, SMALL, reference_palm


def reference_loaded(**kwargs):
    ref = reference_palm(seed=3, **kwargs)
    model = PaLM(PaLMConfig(**{**SMALL, **kwargs}))
    model.load_state_dict(ref.state_dict())
    return ref, model.eval()


def incremental_logits(model, tokens, prefill):
    """Logits of every position: prefill `prefill` tokens, then decode the rest one at a time."""
    batch, n = tokens.shape
    starts = torch.zeros(batch, dtype=torch.long)
    cache = model.make_cache(batch, n)
    with torch.no_grad():
        out = [model(tokens[:, :prefill], torch.arange(prefill), None, cache)]
        for i in range(prefill, n):
            position = torch.tensor([i])
            out.append(model(tokens[:, i : i + 1], position, attention_mask(position, n, starts), cache))
    return torch.cat(out, dim=1)


def with_kernels(model, kernels: bool):
    """`model`, or its decoding view through palm's CPU kernels (skipping where they cannot run)."""
    if not kernels:
        return model
    if not kernel_available():
        pytest.skip("palm's CPU kernels cannot run here (not x86 with AVX2, no compiler, or PALM_NO_KERNELS=1)")
    return decoding_view(model)


@pytest.mark.parametrize("kernels", [False, True], ids=["torch", "cpu-kernel"])
@pytest.mark.parametrize("qk_rmsnorm", [False, True])
def test_incremental_decoding_equals_full_forward(kernels, qk_rmsnorm):
    _, model = reference_loaded(qk_rmsnorm=qk_rmsnorm)
    model = with_kernels(model, kernels)
    tokens = torch.randint(0, SMALL["num_tokens"], (2, 300))
    with torch.no_grad():
        full = model(tokens)
    torch.testing.assert_close(incremental_logits(model, tokens, prefill=7), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kernels", [False, True], ids=["torch", "cpu-kernel"])
def test_incremental_decoding_bf16(kernels):
    _, model = reference_loaded()
    model = with_kernels(model.to(torch.bfloat16), kernels)
    tokens = torch.randint(0, SMALL["num_tokens"], (1, 200))
    with torch.no_grad():
        full = model(tokens).float()
    incremental = incremental_logits(model, tokens, prefill=5).float()
    assert (incremental - full).abs().max() <= 0.02 * full.abs().max()


@pytest.mark.parametrize("kernels", [False, True], ids=["torch", "cpu-kernel"])
def test_no_overflow_in_bf16_at_16384_positions(kernels):
    # Tokens at absolute positions 16380..16383 that may only see each other must give the same
    # logits as the same four tokens at positions 0..3: attention depends on distances only.
    _, model = reference_loaded()
    model = PaLM(model.config.replace(max_seq_len=16384)).eval()
    model = with_kernels(model.to(torch.bfloat16), kernels)
    tokens = torch.randint(0, SMALL["num_tokens"], (1, 4))
    cache = model.make_cache(1, 16384)
    starts = torch.tensor([16380])
    with torch.no_grad():
        late = []
        for i in range(4):
            position = torch.tensor([16380 + i])
            late.append(model(tokens[:, i : i + 1], position, attention_mask(position, 16384, starts), cache))
        late = torch.cat(late, dim=1).float()
        early = model(tokens).float()
    assert torch.isfinite(late).all()
    assert (late - early).abs().max() <= 0.02 * early.abs().max()


def test_greedy_matches_the_seeds_generate():
    ref, model = reference_loaded()
    prompt = torch.randint(0, SMALL["num_tokens"], (1, 12))
    torch.manual_seed(0)
    seed_out = ref.generate(12 + 40, prompt, temperature=0.0, filter_thres=0.9)  # continuation only
    ours = generate(model, prompt[0], 40, temperature=0)
    assert ours[:12].tolist() == prompt[0].tolist()
    assert ours[12:].tolist() == seed_out[0].tolist()


def test_seeded_runs_are_reproducible():
    _, model = reference_loaded()
    prompt = torch.tensor([1, 2, 3])
    run = lambda seed: generate(model, prompt, 30, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_batch_of_different_lengths_equals_one_at_a_time():
    _, model = reference_loaded()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3], [40, 41, 42]]
    alone = [generate(model, torch.tensor(p), 25, temperature=0) for p in prompts]
    batch = generate(model, prompts, 25, temperature=0)
    for row, single in zip(batch, alone):
        assert row[: len(single)].tolist() == single.tolist()


def test_compiled_decoding_equals_eager():
    # greedy continuations of a left-padded batch and of a single prompt, through torch.compile
    ref, model = reference_loaded()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3]]
    eager = generate(model, prompts, 20, temperature=0)
    compiled = generate(model, prompts, 20, temperature=0, compile=True)
    assert compiled.tolist() == eager.tolist()
    prompt = torch.tensor(prompts[0])
    assert generate(model, prompt, 20, temperature=0, compile=True)[:20].tolist() == eager[0].tolist()[:20]


def test_each_sequence_stops_at_its_own_eos():
    _, model = reference_loaded()
    prompts = [[5, 6, 7], [30, 31]]
    free = [generate(model, torch.tensor(p), 20, temperature=0) for p in prompts]
    eos = int(free[0][3 + 4])  # the 5th token the first prompt produces
    batch = generate(model, prompts, 20, temperature=0, eos_token_id=eos, pad_token_id=-1)
    for row, p, unconstrained in zip(batch, prompts, free):
        new = unconstrained[len(p):].tolist()
        expected = p + (new[: new.index(eos) + 1] if eos in new else new)
        assert row[: len(expected)].tolist() == expected
        assert (row[len(expected):] == -1).all()
    single = generate(model, torch.tensor(prompts[0]), 20, temperature=0, eos_token_id=eos)
    first_eos = free[0][3:].tolist().index(eos)
    assert single.tolist() == free[0][: 3 + first_eos + 1].tolist()


def test_stream_yields_each_next_token_of_the_full_forward():
    """Against a loop with no cache: the model's full forward over prompt + tokens so far, then
    `sample` with the same generator (greedy, and sampled at temperature 1 from the top 20)."""
    _, model = reference_loaded()
    prompts = torch.tensor([[4, 5, 6], [9, 2, 7]])
    for options in (dict(temperature=0), dict(temperature=1.0, filter_thres=0.8)):
        tokens, g = prompts, torch.Generator().manual_seed(5)
        expected = []
        with torch.no_grad():
            for _ in range(15):
                expected.append(sample(model(tokens)[:, -1], generator=g, **options))
                tokens = torch.cat([tokens, expected[-1][:, None]], dim=1)
        streamed = stream(model, prompts, 15, generator=torch.Generator().manual_seed(5), **options)
        assert [t.tolist() for t in streamed] == [t.tolist() for t in expected]


def test_bad_arguments():
    _, model = reference_loaded()
    with pytest.raises(PalmError, match="temperature must be >= 0"):
        generate(model, torch.tensor([1]), 5, temperature=-1)
    with pytest.raises(PalmError, match=r"filter_thres must be in \[0, 1\)"):
        generate(model, torch.tensor([1]), 5, filter_thres=1.0)
    with pytest.raises(PalmError, match="empty prompt"):
        generate(model, [[]], 5)
    with pytest.raises(PalmError, match="exceeds the model's context of 8192"):
        generate(model, torch.tensor([1]), 8192)
    with pytest.raises(PalmError, match="outside the model's vocabulary"):
        generate(model, torch.tensor([500]), 5)


def test_int8_stays_close_to_fp32(trained_tiny):
    # Per-channel int8 rounds each weight by at most max|row| / 254 (0.4% of the row's largest
    # weight); over a dot product these errors mostly cancel, so logits move by ~1% of their
    # magnitude. Greedy choices can only flip where the top two logits are closer than that.
    quantized = quantize(copy.deepcopy(trained_tiny))
    linears = [m for m in quantized.modules() if isinstance(m, (torch.nn.Linear, Int8Linear))]
    assert linears and all(isinstance(m, Int8Linear) and m.weight.dtype == torch.int8 for m in linears)
    assert quantized.token_emb.weight.dtype == torch.float32
    text = torch.tensor([list(CORPUS[2000:2300].encode())])
    with torch.no_grad():
        a, b = trained_tiny(text), quantized(text)
        assert (a - b).abs().max() <= 0.03 * a.abs().max()
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.98
        assert math.isclose(trained_tiny.loss(text), quantized.loss(text), rel_tol=0.02)
    # Decoding (CPU kernel for single rows, dequantized matmul for the prefill) agrees with the
    # full forward, up to the kernel's rounding of activations to >= 14 bits (~1e-4 relative).
    tokens = text[:, :60]
    with torch.no_grad():
        full = quantized(tokens)
        for decoder in (quantized, decoding_view(quantized)):
            assert (incremental_logits(decoder, tokens, prefill=9) - full).abs().max() <= 1e-4 * full.abs().max()


def model_state(model):
    return ([(name, type(m)) for name, m in model.named_modules()], list(model.state_dict()),
            [(n, p.requires_grad, p.dtype) for n, p in model.named_parameters()], model.training,
            {n: b.data_ptr() for n, b in model.named_buffers()})


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "int8"])
def test_generation_leaves_the_model_as_it_was(quantized):
    """generate and stream, through the CPU kernels where they run, change nothing of the caller's
    model: its modules, state dict, requires_grad flags, training mode and weights."""
    _, model = reference_loaded()
    if quantized:
        quantize(model)
    model.train()
    model.token_emb.weight.requires_grad_(False)
    before = model_state(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    generate(model, torch.tensor([1, 2, 3]), 10, temperature=0)
    for _ in stream(model, [[4, 5], [6]], 5):
        pass
    palm.generate(model, torch.tensor([1, 2, 3]), 3)
    assert model_state(model) == before
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "int8"])
def test_the_decoding_view_shares_the_models_weights(quantized):
    _, model = reference_loaded()
    if quantized:
        quantize(model)
    view = with_kernels(model, kernels=True)
    assert any(type(m).__name__ == "KernelLinear" for m in view.modules())
    ours, theirs = model.state_dict(), view.state_dict()
    assert list(theirs) == list(ours)
    assert all(theirs[k].data_ptr() == v.data_ptr() for k, v in ours.items())
    assert not view.training and all(m.single_query_attention is not F.scaled_dot_product_attention
                                     for m in view.modules() if hasattr(m, "single_query_attention"))
