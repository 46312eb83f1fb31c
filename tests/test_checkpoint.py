import os

import pytest
import torch

import palm
from palm import PaLM, PaLMConfig, PalmError
from palm import checkpoint
from palm.checkpoint import infer_config, save_reference_checkpoint

from conftest import SMALL, reference_palm

TOKENS = torch.randint(0, SMALL["num_tokens"], (2, 50))


def logits(model):
    with torch.no_grad():
        return model(TOKENS)


def test_load_builds_on_meta_and_assigns_the_file_tensors(reference_checkpoint):
    path, ref = reference_checkpoint
    model = palm.load(path)
    assert not model.training
    assert model.config == PaLMConfig(**SMALL)  # inferred from the shapes
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert model.to_logits.weight is model.token_emb.weight
    torch.testing.assert_close(logits(model), logits(ref), atol=1e-5, rtol=0)


def test_infer_config_from_shapes():
    ref = reference_palm(depth=3, heads=2, dim_head=32, ff_mult=2, qk_rmsnorm=True)
    config = infer_config(ref.state_dict())
    assert config == PaLMConfig(**{**SMALL, "depth": 3, "heads": 2, "dim_head": 32, "ff_mult": 2, "qk_rmsnorm": True})


def test_save_pretrained_round_trip(tmp_path, reference_checkpoint):
    path, _ = reference_checkpoint
    model = palm.load(path, config=PaLMConfig(**SMALL, max_seq_len=4096))
    palm.save_pretrained(model, tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    again = palm.load(tmp_path / "out")
    assert again.config == model.config
    assert again.to_logits.weight is again.token_emb.weight
    torch.testing.assert_close(logits(again), logits(model), atol=0, rtol=0)
    # a bare .safetensors file finds its config.json beside it
    assert palm.load(tmp_path / "out" / "model.safetensors").config.max_seq_len == 4096


def test_reference_loads_what_we_export(tmp_path, reference_checkpoint):
    path, ref = reference_checkpoint
    palm.save_pretrained(palm.load(path), tmp_path / "ours")
    save_reference_checkpoint(palm.load(tmp_path / "ours"), tmp_path / "back.pt")

    fresh = reference_palm(seed=123)
    fresh.load_state_dict(torch.load(tmp_path / "back.pt", weights_only=True))  # strict
    torch.testing.assert_close(logits(fresh), logits(ref), atol=0, rtol=0)


def test_dtype_and_device_options(reference_checkpoint):
    path, ref = reference_checkpoint
    model = palm.load(path, dtype="bf16", device="cpu")
    assert model.token_emb.weight.dtype == torch.bfloat16
    assert model.layers[0].fn.rotary_emb.inv_freq.dtype == torch.float32
    a, b = logits(model).float(), logits(ref)
    assert (a - b).abs().max() / b.abs().max() < 0.05


def test_rotary_tables_are_recomputed_in_float32(tmp_path):
    # A checkpoint saved from a bf16 model stores bf16 rotary tables; we use exact float32 ones.
    ref = reference_palm().to(torch.bfloat16)
    torch.save(ref.state_dict(), tmp_path / "bf16.pt")
    model = palm.load(tmp_path / "bf16.pt")
    assert model.token_emb.weight.dtype == torch.bfloat16
    inv_freq = model.layers[0].fn.rotary_emb.inv_freq
    assert inv_freq.dtype == torch.float32
    torch.testing.assert_close(inv_freq, PaLM(PaLMConfig(**SMALL)).layers[0].fn.rotary_emb.inv_freq, atol=0, rtol=0)


def test_pickle_carrying_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"token_emb.weight": torch.zeros(2, 2), "x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(PalmError, match="refusing to load .*could run code"):
        palm.load(tmp_path / "evil.pt")
    assert not marker.exists()


def test_wrong_size_names_the_tensor_and_the_config_that_fits(reference_checkpoint):
    path, _ = reference_checkpoint
    with pytest.raises(PalmError) as error:
        palm.load(path, config=palm.get_config("tiny"))
    message = str(error.value)
    assert "\n" not in message
    assert "tensor 'token_emb.weight' has shape (97, 64), expected (512, 256)" in message
    assert "it fits a config with num_tokens=97, dim=64, depth=2, heads=4, dim_head=16" in message


def test_missing_and_unexpected_tensors(tmp_path):
    state = reference_palm().state_dict()
    del state["layers.1.fn.attn_out.weight"]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(PalmError, match="missing tensor 'layers.1.fn.attn_out.weight'"):
        palm.load(tmp_path / "missing.pt", config=PaLMConfig(**SMALL))

    state = reference_palm().state_dict()
    state["layers.0.fn.lora.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "extra.pt")
    with pytest.raises(PalmError, match="unexpected tensor 'layers.0.fn.lora.weight'"):
        palm.load(tmp_path / "extra.pt")


def test_wrapper_prefixes_are_stripped(tmp_path, reference_checkpoint):
    path, ref = reference_checkpoint
    state = {f"module.{k}": v for k, v in ref.state_dict().items()}
    torch.save(state, tmp_path / "ddp.pt")
    torch.testing.assert_close(logits(palm.load(tmp_path / "ddp.pt")), logits(ref), atol=1e-5, rtol=0)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(PalmError, match="is not a .*PyTorch checkpoint"):
        palm.load(tmp_path / "junk.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PalmError, match="not a palm model directory: no config.json or model.safetensors"):
        palm.load(tmp_path / "empty")
    with pytest.raises(PalmError, match="no such file or directory"):
        palm.load(tmp_path / "nope.pt")


def test_preset_offline_says_how_to_pass_a_local_file():
    with pytest.raises(PalmError, match="conceptofmind/palm-150m.*pass its local path"):
        palm.load("150m")
    with pytest.raises(PalmError, match="no published weights"):
        palm.load("tiny")


def test_hub_repo_in_our_format(tmp_path, monkeypatch, reference_checkpoint):
    path, ref = reference_checkpoint
    palm.save_pretrained(palm.load(path), tmp_path / "repo")
    requested = []

    def fake_download(repo_id, filename):
        requested.append((repo_id, filename))
        return tmp_path / "repo" / filename

    monkeypatch.setattr(checkpoint, "hub_download", fake_download)
    model = palm.load("someone/palm-small")
    assert requested == [("someone/palm-small", "config.json"), ("someone/palm-small", "model.safetensors")]
    torch.testing.assert_close(logits(model), logits(ref), atol=1e-5, rtol=0)


def test_preset_downloads_the_published_file(tmp_path, monkeypatch):
    ref = reference_palm()
    torch.save(ref.state_dict(), tmp_path / "palm_150m_8k_v0.pt")
    monkeypatch.setattr(checkpoint, "hub_download", lambda repo, name: tmp_path / name)
    # the preset's config is used, so a file of another size is caught
    with pytest.raises(PalmError, match="does not fit preset palm_150m_8k_v0"):
        palm.load("palm_150m_8k_v0")


def mixed_tensors() -> dict[str, torch.Tensor]:
    """Tensors of several dtypes (so that safetensors' dtype-then-name layout shows), an empty
    one, a scalar and a non-ASCII name."""
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(3, 4, generator=g), "b.bf16": torch.randn(5, generator=g).to(torch.bfloat16),
        "q.int8": torch.randint(-127, 128, (4, 2), generator=g, dtype=torch.int8), "mask": torch.tensor([True, False]),
        "d": torch.randn(2, generator=g, dtype=torch.float64), "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5),
        "h": torch.randn(3, generator=g).half(), "ids": torch.arange(4), "gewicht.ä": torch.ones(2),
    }


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_the_streaming_writer_writes_what_safetensors_writes(tmp_path, metadata):
    from safetensors.torch import load_file, save_file

    for tensors in (mixed_tensors(), {}):
        save_file(tensors, tmp_path / "theirs.safetensors", metadata=metadata)
        checkpoint.write_safetensors(tensors, tmp_path / "ours.safetensors", metadata=metadata)
        assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()
        again = load_file(tmp_path / "ours.safetensors")
        assert again.keys() == tensors.keys()
        assert all(again[k].dtype == t.dtype and torch.equal(again[k], t) for k, t in tensors.items())


def test_the_streaming_writer_takes_non_contiguous_tensors(tmp_path):
    from safetensors.torch import load_file

    x = torch.randn(4, 6)
    tensors = {"transposed": x.T, "strided": x[:, ::2], "bf16": x.to(torch.bfloat16).T}
    checkpoint.write_safetensors(tensors, tmp_path / "t.safetensors")
    again = load_file(tmp_path / "t.safetensors")
    assert all(torch.equal(again[k], t) for k, t in tensors.items())


def test_a_lazy_state_dict_is_written_one_tensor_at_a_time(tmp_path):
    """Each tensor is made once, in the file's order, after the one before it was dropped."""
    import gc
    import weakref

    from safetensors.torch import load_file

    source = mixed_tensors()
    made, alive = [], []

    def make(name):
        gc.collect()
        alive.append(sum(ref() is not None for ref in made))
        tensor = source[name].clone()
        made.append(weakref.ref(tensor))
        return tensor

    lazy = checkpoint.LazyStateDict({k: (t.dtype, tuple(t.shape)) for k, t in source.items()}, make)
    checkpoint.write_safetensors(lazy, tmp_path / "lazy.safetensors")
    assert len(made) == len(source) and alive == [0] * len(source)
    again = load_file(tmp_path / "lazy.safetensors")
    assert all(torch.equal(again[k], t) for k, t in source.items())

    wrong = checkpoint.LazyStateDict({"w": (torch.float32, (3, 5))}, lambda name: torch.zeros(3, 4))
    with pytest.raises(ValueError, match="'w' is torch.float32 \\(3, 4\\); its spec said torch.float32 \\(3, 5\\)"):
        checkpoint.write_safetensors(wrong, tmp_path / "wrong.safetensors")


def test_lazy_reads_give_the_stored_tensors(tmp_path, reference_checkpoint):
    path, ref = reference_checkpoint
    palm.save_pretrained(palm.load(path), tmp_path / "ours")
    expected = palm.load(path).state_dict()
    for source in (path, tmp_path / "ours"):
        lazy = checkpoint.read_lazily(source)
        stored = {k: v for k, v in expected.items() if k in lazy}
        assert set(lazy) - set(expected) == set() and stored.keys() >= {"token_emb.weight", "layers.1.fn.ff_out.2.weight"}
        assert all(torch.equal(lazy[k], v) for k, v in stored.items())
        assert all(lazy.spec(k) == (v.dtype, tuple(v.shape)) for k, v in stored.items())


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_loading_without_mmap_leaves_no_mapping_of_the_file(tmp_path, reference_checkpoint):
    """A model loaded with mmap=False holds its tensors in memory of its own (freed one by one,
    e.g. as it is quantized), and gives the same logits."""
    import gc

    path, ref = reference_checkpoint
    palm.save_pretrained(palm.load(path), tmp_path / "ours")
    weights = str((tmp_path / "ours" / "model.safetensors").resolve())
    mapped = palm.load(tmp_path / "ours")
    assert weights in open("/proc/self/maps").read()
    del mapped
    gc.collect()
    own = palm.load(tmp_path / "ours", mmap=False)
    assert weights not in open("/proc/self/maps").read()
    torch.testing.assert_close(logits(own), logits(ref), atol=1e-5, rtol=0)
