"""Reading and writing weights: reference `.pt` state dicts, our safetensors format, and the Hub.

Formats:
- reference: a `torch.save`d state dict written by palm-rlhf-pytorch 0.2.1-0.2.3 (the published
  `palm_*_8k_v0.pt` files). Read with `weights_only=True` and memory-mapped; no config inside.
- ours: a directory with `config.json` and `model.safetensors` (`save_pretrained`), locally or on
  the Hugging Face Hub.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import torch
from torch import Tensor

from palm.config import PaLMConfig, canonical_name, get_config, preset_matching
from palm.dtypes import resolve_dtype
from palm.errors import PalmError
from palm.files import write_atomically
from palm.hub import REPO_ID, check_exists_or_remote, hub_download
from palm.model import PaLM, RotaryEmbedding

CONFIG_NAME = "config.json"
ADAPTER_CONFIG = "adapter_config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # sharded weights (`palm export hf` of a large model)

# Where the published checkpoints live on the Hub: preset -> (repo, file).
HUB_CHECKPOINTS = {
    "palm_150m_8k_v0": ("conceptofmind/palm-150m", "palm_150m_8k_v0.pt"),
    "palm_410m_8k_v0": ("conceptofmind/palm-410m", "palm_410m_8k_v0.pt"),
    "palm_1b_8k_v0": ("conceptofmind/palm-1b", "palm_1b_8k_v0.pt"),
    "palm_2b_8k_v0": ("conceptofmind/palm-2b", "palm_2b_8k_v0.pt"),
}

# Prefixes added by DDP (`module.`) and torch.compile (`_orig_mod.`) when a wrapped model is saved.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def load(
    source: str | os.PathLike,
    *,
    config: PaLMConfig | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> PaLM:
    """Load a ready model in eval mode.

    `source` is a preset name (`palm_410m_8k_v0` or `410m`: downloads the published checkpoint),
    a local reference `.pt` state dict, a `.safetensors` file, a directory written by
    `save_pretrained`, a Hub repo in that format, or a LoRA adapter directory written by
    `palm finetune` (its base model, as its adapter_config.json names it, with the adapter). Without `config`, it comes from the preset,
    the directory's `config.json`, or the tensor shapes. `dtype` None keeps the stored dtype.
    """
    dtype = resolve_dtype(dtype)
    if (Path(source) / ADAPTER_CONFIG).is_file():
        return load_with_adapter(Path(source), device=device, dtype=dtype)
    state_dict, found_config, description = read_source(source)
    config = config or found_config or infer_config(state_dict, description)
    model = model_from_state_dict(state_dict, config, description)
    del state_dict  # the model now holds the only references to the tensors
    return model.to(device=device, dtype=dtype).eval()


def load_with_adapter(directory: Path, *, device=None, dtype: torch.dtype | None = None) -> PaLM:
    """The base model an adapter directory names, with the adapter on it (unmerged, inference only)."""
    from palm.adapters import load_adapter, read_adapter_config

    base = read_adapter_config(directory).base_model_name_or_path
    if not base:
        raise PalmError(f"{directory}: its adapter_config.json names no base model (base_model_name_or_path)")
    model = load(base).float()
    return load_adapter(model, directory).get_base_model().to(device=device, dtype=dtype).eval()


def read_source(source: str | os.PathLike) -> tuple[dict[str, Tensor], PaLMConfig | None, str]:
    """The state dict behind `source`, its config when one travels with it, and a description."""
    path = Path(source)
    if path.is_dir():
        return read_pretrained_dir(path), PaLMConfig.from_json(path / CONFIG_NAME), str(path)
    if path.is_file():
        sibling_config = path.with_name(CONFIG_NAME)
        if path.suffix == ".safetensors":
            found = PaLMConfig.from_json(sibling_config) if sibling_config.is_file() else None
            return read_safetensors(path), found, str(path)
        sidecar = reference_config_path(path)
        return read_torch_state_dict(path), PaLMConfig.from_json(sidecar) if sidecar.is_file() else None, str(path)

    check_exists_or_remote(str(source))
    name = canonical_name(str(source))
    if name is not None:
        repo, filename = HUB_CHECKPOINTS.get(name, (None, None))
        if repo is None:
            raise PalmError(f"preset {name!r} has no published weights; build it with palm.PaLM(palm.get_config({name!r}))")
        local = hub_download(repo, filename)
        return read_torch_state_dict(local), get_config(name), f"{repo}/{filename}"

    if REPO_ID.match(str(source)):
        config_path = hub_download(str(source), CONFIG_NAME)
        weights_path = hub_download(str(source), WEIGHTS_NAME)
        return read_safetensors(weights_path), PaLMConfig.from_json(config_path), str(source)

    raise PalmError(f"{source}: no such file or directory, and not a preset name or Hub repo id")


def read_torch_state_dict(path: Path) -> dict[str, Tensor]:
    """A `torch.save`d state dict, memory-mapped, refusing anything but tensors (no pickled code)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        # The weights-only unpickler names a GLOBAL when the file asks for code (a function or class).
        blocked = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]
        if blocked:
            raise PalmError(f"refusing to load {path}: it holds pickled objects other than tensors, which could run code ({blocked[0]})") from None
        raise PalmError(f"{path} is not a readable PyTorch checkpoint (unpickling failed)") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise PalmError(f"{path} is not a readable PyTorch checkpoint ({str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise PalmError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return strip_wrapper_prefixes(state)


def read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return strip_wrapper_prefixes(load_file(path))
    except (SafetensorError, OSError) as e:
        raise PalmError(f"{path} is not a readable safetensors file ({e})") from None


def read_pretrained_dir(directory: Path) -> dict[str, Tensor]:
    if not (directory / WEIGHTS_NAME).is_file() and (directory / WEIGHTS_INDEX).is_file():
        try:
            shards = sorted(set(json.loads((directory / WEIGHTS_INDEX).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise PalmError(f"{directory / WEIGHTS_INDEX} is not a safetensors index ({e})") from None
        return {name: t for shard in shards for name, t in read_safetensors(directory / shard).items()}
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (directory / name).is_file()]
    if missing and (directory / "model" / CONFIG_NAME).is_file():  # a training run or one of its checkpoints
        raise PalmError(f"{directory} is a training run (or checkpoint) directory; its model is {directory / 'model'}")
    if missing:
        raise PalmError(f"{directory} is not a palm model directory: no {' or '.join(missing)} in it")
    return read_safetensors(directory / WEIGHTS_NAME)


def strip_wrapper_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def infer_config(state: dict[str, Tensor], description: str = "checkpoint") -> PaLMConfig:
    """The architecture a reference-style state dict was written for, from its tensor shapes.

    Fields the shapes cannot tell (max_seq_len, xpos_scale_base, dropouts) keep their defaults.
    """
    try:
        num_tokens, dim = state["token_emb.weight"].shape
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
        fused_out = state["layers.0.fn.fused_attn_ff_proj.weight"].shape[0]
        attn_inner = state["layers.0.fn.attn_out.weight"].shape[1]
        ff_inner = state["layers.0.fn.ff_out.2.weight"].shape[1]
    except (KeyError, ValueError, IndexError) as e:
        raise PalmError(f"cannot infer the model size of {description}: it has no tensor {e}; pass a config") from None
    dim_head = (fused_out - attn_inner - 2 * ff_inner) // 2
    if dim_head <= 0 or attn_inner % dim_head or ff_inner % dim:
        raise PalmError(f"cannot infer the model size of {description}: its tensor shapes fit no PaLM; pass a config")
    return PaLMConfig(
        num_tokens=num_tokens,
        dim=dim,
        depth=depth,
        heads=attn_inner // dim_head,
        dim_head=dim_head,
        ff_mult=ff_inner // dim,
        qk_rmsnorm="layers.0.fn.q_scale" in state,
    )


def describe_config(config: PaLMConfig) -> str:
    """A short description: the preset's name, or the fields that the tensor shapes determine."""
    preset = preset_matching(config)
    if preset:
        return f"preset {preset}"
    shape_fields = ("num_tokens", "dim", "depth", "heads", "dim_head", "ff_mult", "qk_rmsnorm")
    return "a config with " + ", ".join(f"{k}={getattr(config, k)}" for k in shape_fields)


def model_from_state_dict(state: dict[str, Tensor], config: PaLMConfig, description: str = "checkpoint") -> PaLM:
    """Build `config`'s model on the meta device and assign `state`'s tensors to it (no copies)."""
    with torch.device("meta"):
        model = PaLM(config)
    check_state_dict(state, model, description)

    tensors = {}
    for name, tensor in state.items():
        if name == "to_logits.weight":
            if not _same_tensor(tensor, state["token_emb.weight"]):
                raise PalmError(f"{description}: to_logits.weight differs from token_emb.weight, but PaLM ties them")
        elif name.endswith(("rotary_emb.inv_freq", "rotary_emb.scale")):
            pass  # derived from the config; the model computes them in float32 (see RotaryEmbedding)
        else:
            tensors[name] = tensor
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    _materialize_derived_buffers(model, config)
    return model


def check_state_dict(state: dict[str, Tensor], model: PaLM, description: str) -> None:
    """Raise one PalmError naming the first tensor that is missing, unexpected or the wrong shape."""
    expected = model.state_dict()
    derived = ("to_logits.weight", "rotary_emb.inv_freq", "rotary_emb.scale", ".beta")
    problem = None
    for name, tensor in expected.items():
        if name not in state and not name.endswith(derived):
            problem = f"missing tensor {name!r}"
        elif name in state and state[name].shape != tensor.shape:
            problem = f"tensor {name!r} has shape {tuple(state[name].shape)}, expected {tuple(tensor.shape)}"
        if problem:
            break
    if problem is None:
        unexpected = [name for name in state if name not in expected]
        if not unexpected:
            return
        problem = f"unexpected tensor {unexpected[0]!r}"
    hint = ""
    try:
        fitting = infer_config(state, description)
        if fitting != model.config:
            hint = f"; it fits {describe_config(fitting)}"
    except PalmError:
        pass
    raise PalmError(f"{description} does not fit {describe_config(model.config)}: {problem}{hint}")


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape:
        return False
    return (a.data_ptr() == b.data_ptr() and a.stride() == b.stride()) or torch.equal(a, b)


def _materialize_derived_buffers(model: PaLM, config: PaLMConfig) -> None:
    """Give the meta-built model real rotary tables (float32) and, where absent, zero norm biases."""
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            fresh = RotaryEmbedding(config.dim_head, config.xpos_scale_base)
            module.inv_freq, module.scale = fresh.inv_freq, fresh.scale
        elif getattr(module, "beta", None) is not None and module.beta.is_meta:
            module.beta = torch.zeros(module.beta.shape, dtype=module.gamma.dtype)


def save_pretrained(model: PaLM, directory: str | os.PathLike) -> None:
    """Write `config.json` and `model.safetensors` into `directory`, replacing any earlier ones."""
    save_state_dict(model.state_dict(), model.config, directory)


def save_state_dict(state: dict[str, Tensor], config: PaLMConfig, directory: str | os.PathLike) -> None:
    """`save_pretrained` for a full state dict, e.g. one gathered from a sharded (FSDP) model."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # safetensors stores no aliases, so the tied output projection is left out (it is re-tied on load)
    state = {k: v.detach().contiguous() for k, v in strip_wrapper_prefixes(state).items() if k != "to_logits.weight"}
    write_atomically(directory / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    write_atomically(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(config.to_json()))


def save_reference_checkpoint(model: PaLM, path: str | os.PathLike) -> None:
    """Write a `.pt` state dict that palm-rlhf-pytorch 0.2.1-0.2.3 loads with `load_state_dict`,
    and its config beside it (`x.pt` -> `x.config.json`): the tensors alone do not tell the
    context length, and palm reads the config back when it is there."""
    path = Path(path)
    write_atomically(path, lambda tmp: torch.save(model.state_dict(), tmp))
    write_atomically(reference_config_path(path), lambda tmp: Path(tmp).write_text(model.config.to_json()))


def reference_config_path(path: Path) -> Path:
    return path.with_suffix(".config.json")
