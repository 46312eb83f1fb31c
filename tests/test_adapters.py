import copy

import pytest
import torch
import torch.nn.functional as F

import palm
from palm import PaLM, PaLMConfig, PalmError
from palm.adapters import add_lora, load_adapter, lora_config, merged_state_dict
from palm.checkpoint import model_from_state_dict
from palm.inference.quantization import quantize

CONFIG = PaLMConfig(num_tokens=97, dim=64, depth=2, heads=4, dim_head=16)
TOKENS = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))


def base_model() -> PaLM:
    torch.manual_seed(0)
    return PaLM(CONFIG).eval()


def with_random_adapters(model, targets, r=4):
    """Adapters whose B is not zero (a fresh adapter changes nothing), as after some training."""
    peft_model = add_lora(copy.deepcopy(model).requires_grad_(False), lora_config(targets, r=r, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    return peft_model.eval()


@pytest.mark.parametrize("targets, parts", [
    (["q", "v"], ("q", "v")), (["k", "ff_in"], ("k", "ff_in")), (["fused"], None), (["q", "attn_out", "ff_out"], ("q",)),
])
def test_part_adapters_change_only_their_parts(targets, parts):
    """The fused projection's output under LoRA equals W x + scaling * B_i A_i x on each chosen
    part and W x elsewhere, computed here from the adapter's own matrices."""
    model = base_model()
    peft_model = with_random_adapters(model, targets)
    layer = peft_model.base_model.model.layers[0].fn.fused_attn_ff_proj
    base = model.layers[0].fn.fused_attn_ff_proj
    x = torch.randn(3, 64)
    expected = F.linear(x, base.weight)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    chosen = list(base.parts) if parts is None else list(parts)
    if parts is None:  # one adapter over the whole projection
        expected = expected + 2.0 * (x @ a.T @ b.T)
    else:
        start, row = 0, 0
        for i, (name, width) in enumerate(base.parts.items()):
            if name in chosen:
                k = chosen.index(name)
                a_i, b_i = a[4 * k : 4 * (k + 1)], b[row : row + width]
                expected[:, start : start + width] += 2.0 * (x @ a_i.T @ b_i.T)
                row += width
            start += width
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    adapted = {n.split(".layers.0.fn.")[1].split(".lora_A")[0] for n in trainable if ".layers.0.fn." in n and "lora_A" in n}
    expected_modules = {"fused_attn_ff_proj"} | ({"attn_out"} if "attn_out" in targets else set()) | (
        {"ff_out.2"} if "ff_out" in targets else set())
    assert adapted == expected_modules


@pytest.mark.parametrize("targets", [["q", "v"], ["all"]])
def test_the_merged_model_gives_the_adapter_models_logits(targets):
    model = base_model()
    peft_model = with_random_adapters(model, targets)
    merged = model_from_state_dict(merged_state_dict(peft_model), CONFIG).eval()
    with torch.no_grad():
        adapted, plain = peft_model(TOKENS), model(TOKENS)
        torch.testing.assert_close(merged(TOKENS), adapted, atol=1e-5, rtol=0)
        assert (adapted - plain).abs().max() > 0.05  # the adapters do something
    assert model.layers[0].fn.fused_attn_ff_proj.__class__.__name__ == "FusedProjection"  # base left alone


def test_adapters_over_an_int8_base_merge_onto_the_original_weights():
    model = base_model()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = with_random_adapters(quantize(copy.deepcopy(model)), ["q", "v", "attn_out"])
    with pytest.raises(PalmError, match="int8"):
        merged_state_dict(peft_model)
    merged = model_from_state_dict(merged_state_dict(peft_model, base=original), CONFIG).eval()
    # the adapter on int8 and the merge onto fp32 differ only by the int8 rounding of the base
    with torch.no_grad():
        int8_logits, merged_logits = peft_model(TOKENS), merged(TOKENS)
    assert (int8_logits - merged_logits).abs().max() <= 0.03 * merged_logits.abs().max()
    loss = F.cross_entropy(peft_model(TOKENS).flatten(0, 1), TOKENS.flatten())
    loss.backward()  # gradients reach the adapters through the int8 layers
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_saved_adapters_load_back_and_through_palm_load(tmp_path):
    model = base_model()
    palm.save_pretrained(model, tmp_path / "base")
    peft_model = with_random_adapters(model, ["q", "v", "ff_out"])
    peft_model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    with torch.no_grad():
        expected = peft_model(TOKENS)
        again = load_adapter(palm.load(tmp_path / "base"), tmp_path / "adapter")
        torch.testing.assert_close(again(TOKENS), expected, atol=1e-6, rtol=0)
        loaded = palm.load(tmp_path / "adapter")  # the base named in adapter_config.json, with the adapter
        torch.testing.assert_close(loaded(TOKENS), expected, atol=1e-6, rtol=0)
    assert isinstance(loaded, PaLM) and not any(p.requires_grad for n, p in loaded.named_parameters() if "lora_" in n)
    generated = palm.generate(loaded, TOKENS[0, :5], 5, temperature=0)  # the decoding view keeps the adapters
    assert generated[5:].tolist() == [int(t) for t in _greedy(loaded, TOKENS[0, :5], 5)]


def _greedy(model, prompt, steps):
    ids = prompt.tolist()
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("targets, r, message", [
    (["qv"], 8, "unknown LoRA target 'qv'"),
    (["q", "fused"], 8, "'fused' already covers q"),
    ([], 8, "unknown LoRA target"),
    (["q"], 0, "--lora_r must be at least 1"),
])
def test_bad_adapter_settings(targets, r, message):
    with pytest.raises(PalmError, match=message):
        lora_config(targets, r=r)


def test_a_lazily_merged_model_saves_one_matrix_at_a_time_and_loads_with_the_adapters_logits(tmp_path):
    import gc
    import weakref

    from palm.adapters import base_weights, merger
    from palm.checkpoint import LazyStateDict, save_state_dict

    model = base_model()
    peft_model = with_random_adapters(model, ["q", "v", "attn_out"])
    merge, made, alive = merger(peft_model), [], []

    def merge_one(name, tensor):
        gc.collect()
        alive.append(sum(ref() is not None for ref in made))
        merged = merge(name, tensor)
        if merged.data_ptr() != tensor.data_ptr():  # an adapted matrix: a new tensor
            made.append(weakref.ref(merged))
        return merged

    save_state_dict(LazyStateDict.of(base_weights(peft_model)).mapped(merge_one, dtype=torch.float32), CONFIG,
                    tmp_path / "merged")
    assert len(made) == 2 * CONFIG.depth and set(alive) == {0}  # fused and attn_out: each dropped before the next
    with torch.no_grad():
        torch.testing.assert_close(palm.load(tmp_path / "merged")(TOKENS), peft_model(TOKENS), atol=1e-5, rtol=0)
