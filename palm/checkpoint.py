"""Reading and writing weights: reference `.pt` state dicts, our safetensors format, and the Hub.

Formats:
- reference: a `torch.save`d state dict written by palm-rlhf-pytorch 0.2.1-0.2.3 (the published
  `palm_*_8k_v0.pt` files). Read with `weights_only=True` and memory-mapped; no config inside.
- ours: a directory with `config.json` and `model.safetensors` (`save_pretrained`), locally or on
  the Hugging Face Hub.

safetensors files are written one tensor at a time (`write_safetensors`), so that saving never
holds a second copy of the model, and a `LazyStateDict` (tensors computed or read when asked for)
can be written, e.g. a merged model one matrix at a time.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
import zipfile
from collections.abc import Callable, Iterator, Mapping
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
    mmap: bool = True,
) -> PaLM:
    """Load a ready model in eval mode.

    `source` is a preset name (`palm_410m_8k_v0` or `410m`: downloads the published checkpoint),
    a local reference `.pt` state dict, a `.safetensors` file, a directory written by
    `save_pretrained`, a Hub repo in that format, or a LoRA adapter directory written by
    `palm finetune` (its base model, as its adapter_config.json names it, with the adapter). Without `config`, it comes from the preset,
    the directory's `config.json`, or the tensor shapes. `dtype` None keeps the stored dtype.
    `mmap`: map the weight file, its pages read when first touched (the default); False reads each
    tensor into memory of its own, freed when that tensor is dropped (a mapped file's pages stay
    resident while any tensor of it lives: for a model whose weights are about to be replaced,
    e.g. quantized).
    """
    dtype = resolve_dtype(dtype)
    if (Path(source) / ADAPTER_CONFIG).is_file():
        return load_with_adapter(Path(source), device=device, dtype=dtype)
    state_dict, found_config, description = read_source(source, mmap=mmap)
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


def read_source(source: str | os.PathLike, *, mmap: bool = True) -> tuple[dict[str, Tensor], PaLMConfig | None, str]:
    """The state dict behind `source`, its config when one travels with it, and a description.
    `mmap`: as in `load`."""
    files, config, description = locate_source(source)
    if files[0].suffix != ".safetensors":
        return read_torch_state_dict(files[0], mmap=mmap), config, description
    return {name: t for file in files for name, t in read_safetensors(file, mmap=mmap).items()}, config, description


def read_lazily(source: str | os.PathLike) -> LazyStateDict:
    """The state dict behind `source`, each tensor read from its file when asked for, into memory
    of its own, and not kept: a model's weights one at a time, never all at once. (A `.pt` state
    dict is memory-mapped instead; the pages read stay resident until the state dict is dropped.)"""
    files, _, _ = locate_source(source)
    if files[0].suffix != ".safetensors":
        return LazyStateDict.of(read_torch_state_dict(files[0]))
    from safetensors import SafetensorError, safe_open

    specs, where = {}, {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    view = f.get_slice(name)
                    specs[name] = (_SAFETENSORS_TO_TORCH[view.get_dtype()], tuple(view.get_shape()))
                    where[name] = file
        except (SafetensorError, OSError, KeyError) as e:
            raise PalmError(f"{file} is not a readable safetensors file ({e})") from None

    def read(name: str) -> Tensor:
        with safe_open(where[name], framework="pt", backend="pread") as f:
            return f.get_tensor(name)

    return strip_wrapper_prefixes(LazyStateDict(specs, read))


def locate_source(source: str | os.PathLike) -> tuple[list[Path], PaLMConfig | None, str]:
    """The local weight files behind `source` (safetensors files, shards in order, or one torch
    state dict), downloading them from the Hub where it names a preset or repo; its config when one
    travels with it; and a description."""
    path = Path(source)
    if path.is_dir():
        return pretrained_files(path), PaLMConfig.from_json(path / CONFIG_NAME), str(path)
    if path.is_file():
        if path.suffix == ".safetensors":
            sibling_config = path.with_name(CONFIG_NAME)
            return [path], PaLMConfig.from_json(sibling_config) if sibling_config.is_file() else None, str(path)
        sidecar = reference_config_path(path)
        return [path], PaLMConfig.from_json(sidecar) if sidecar.is_file() else None, str(path)

    check_exists_or_remote(str(source))
    name = canonical_name(str(source))
    if name is not None:
        repo, filename = HUB_CHECKPOINTS.get(name, (None, None))
        if repo is None:
            raise PalmError(f"preset {name!r} has no published weights; build it with palm.PaLM(palm.get_config({name!r}))")
        return [Path(hub_download(repo, filename))], get_config(name), f"{repo}/{filename}"

    if REPO_ID.match(str(source)):
        config_path = hub_download(str(source), CONFIG_NAME)
        weights_path = hub_download(str(source), WEIGHTS_NAME)
        return [Path(weights_path)], PaLMConfig.from_json(config_path), str(source)

    raise PalmError(f"{source}: no such file or directory, and not a preset name or Hub repo id")


def read_torch_state_dict(path: Path, *, mmap: bool = True) -> dict[str, Tensor]:
    """A `torch.save`d state dict, memory-mapped unless `mmap` is False, refusing anything but
    tensors (no pickled code)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
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


def read_safetensors(path: Path, *, mmap: bool = True) -> dict[str, Tensor]:
    """A safetensors file's tensors, memory-mapped, or with `mmap` False each read into memory of its own."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return strip_wrapper_prefixes(load_file(path, backend="mmap" if mmap else "pread"))
    except (SafetensorError, OSError) as e:
        raise PalmError(f"{path} is not a readable safetensors file ({e})") from None


def pretrained_files(directory: Path) -> list[Path]:
    """The safetensors file(s) of a palm model directory: model.safetensors, or its shards in order."""
    if not (directory / WEIGHTS_NAME).is_file() and (directory / WEIGHTS_INDEX).is_file():
        try:
            shards = sorted(set(json.loads((directory / WEIGHTS_INDEX).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise PalmError(f"{directory / WEIGHTS_INDEX} is not a safetensors index ({e})") from None
        return [directory / shard for shard in shards]
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (directory / name).is_file()]
    if missing and (directory / "model" / CONFIG_NAME).is_file():  # a training run or one of its checkpoints
        raise PalmError(f"{directory} is a training run (or checkpoint) directory; its model is {directory / 'model'}")
    if missing:
        raise PalmError(f"{directory} is not a palm model directory: no {' or '.join(missing)} in it")
    return [directory / WEIGHTS_NAME]


def strip_wrapper_prefixes(state: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """`state` without the prefixes that wrappers (DDP, torch.compile) put on every name; a
    `LazyStateDict` stays lazy."""
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            names = {k[len(prefix):]: k for k in state}
            state = state.select(names) if isinstance(state, LazyStateDict) else {new: state[old] for new, old in names.items()}
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


def save_state_dict(state: Mapping[str, Tensor], config: PaLMConfig, directory: str | os.PathLike) -> None:
    """`save_pretrained` for a full state dict, e.g. one gathered from a sharded (FSDP) model, or a
    `LazyStateDict` (written one tensor at a time as it is computed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = strip_wrapper_prefixes(LazyStateDict.of(state))
    # safetensors stores no aliases, so the tied output projection is left out (it is re-tied on load)
    state = state.select({name: name for name in state if name != "to_logits.weight"})
    write_atomically(directory / WEIGHTS_NAME, lambda tmp: write_safetensors(state, tmp, metadata={"format": "pt"}))
    write_atomically(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(config.to_json()))


class LazyStateDict(Mapping[str, Tensor]):
    """A state dict whose tensors are made (read from a file, or computed) each time one is asked
    for, and not kept, so that a model can be read, merged or written one tensor at a time.
    `specs` names each tensor's dtype and shape, known without making it; `make(name)` makes it.
    (Building a dict of it, e.g. `dict(lazy)`, makes every tensor at once.)"""

    def __init__(self, specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], make: Callable[[str], Tensor]):
        self._specs = {name: (dtype, tuple(shape)) for name, (dtype, shape) in specs.items()}
        self._make = make

    @classmethod
    def of(cls, state: Mapping[str, Tensor]) -> LazyStateDict:
        """`state` itself when it is lazy, else a lazy view of its tensors (no copies)."""
        if isinstance(state, LazyStateDict):
            return state
        return cls({name: (t.dtype, tuple(t.shape)) for name, t in state.items()}, state.__getitem__)

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._specs:
            raise KeyError(name)
        return self._make(name)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def spec(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """The dtype and shape of tensor `name`."""
        return self._specs[name]

    def select(self, names: Mapping[str, str]) -> LazyStateDict:
        """The tensors `names` maps to (new name -> name here), under their new names."""
        return LazyStateDict({new: self._specs[old] for new, old in names.items()}, lambda new: self._make(names[new]))

    def mapped(self, fn: Callable[[str, Tensor], Tensor], dtype: torch.dtype | None = None) -> LazyStateDict:
        """Each tensor as `fn(name, tensor)` makes it (of the same shape), cast to `dtype` (None:
        to the tensor's dtype here)."""
        specs = {name: (dtype or old, shape) for name, (old, shape) in self._specs.items()}
        return LazyStateDict(specs, lambda name: fn(name, self._make(name)).to(dtype or specs[name][0]))


# safetensors' dtype names, in the order its writer lays tensors out (then by name): the order of
# its Dtype enum, descending.
_TORCH_TO_SAFETENSORS = {
    getattr(torch, dtype): name for dtype, name in [
        ("uint64", "U64"), ("int64", "I64"), ("float64", "F64"), ("complex64", "C64"), ("float32", "F32"),
        ("uint32", "U32"), ("int32", "I32"), ("bfloat16", "BF16"), ("float16", "F16"), ("uint16", "U16"),
        ("int16", "I16"), ("float8_e5m2fnuz", "F8_E5M2FNUZ"), ("float8_e4m3fnuz", "F8_E4M3FNUZ"),
        ("float8_e8m0fnu", "F8_E8M0"), ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("int8", "I8"),
        ("uint8", "U8"), ("bool", "BOOL"),
    ] if hasattr(torch, dtype)  # the float8 kinds depend on the torch version
}
_SAFETENSORS_TO_TORCH = {name: dtype for dtype, name in _TORCH_TO_SAFETENSORS.items()}
_LAYOUT_RANK = {dtype: rank for rank, dtype in enumerate(_TORCH_TO_SAFETENSORS)}


def write_safetensors(tensors: Mapping[str, Tensor], path: str | os.PathLike,
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` to `path` in the safetensors format, laid out as `safetensors.torch.save_file`
    lays them out (the same bytes), but one tensor at a time: the header (from the tensors' dtypes
    and shapes, or a `LazyStateDict`'s specs), then each tensor's bytes, asking `tensors` for each
    one once and dropping it after. Nothing is copied but a non-contiguous or non-CPU tensor."""
    tensors = LazyStateDict.of(tensors)
    unknown = [name for name in tensors if tensors.spec(name)[0] not in _TORCH_TO_SAFETENSORS]
    if unknown:
        raise ValueError(f"safetensors has no dtype for {unknown[0]!r} ({tensors.spec(unknown[0])[0]})")
    order = sorted(tensors, key=lambda name: (_LAYOUT_RANK[tensors.spec(name)[0]], name))
    header: dict[str, object] = {}
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata maps strings to strings")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name in order:
        dtype, shape = tensors.spec(name)
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _TORCH_TO_SAFETENSORS[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name in order:
            tensor = tensors[name]
            if (tensor.dtype, tuple(tensor.shape)) != tensors.spec(name):
                raise ValueError(f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}; "
                                 f"its spec said {tensors.spec(name)[0]} {tensors.spec(name)[1]}")
            if tensor.numel():
                f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            del tensor



def save_reference_checkpoint(model: PaLM, path: str | os.PathLike) -> None:
    """Write a `.pt` state dict that palm-rlhf-pytorch 0.2.1-0.2.3 loads with `load_state_dict`,
    and its config beside it (`x.pt` -> `x.config.json`): the tensors alone do not tell the
    context length, and palm reads the config back when it is there."""
    path = Path(path)
    write_atomically(path, lambda tmp: torch.save(model.state_dict(), tmp))
    write_atomically(reference_config_path(path), lambda tmp: Path(tmp).write_text(model.config.to_json()))


def reference_config_path(path: Path) -> Path:
    return path.with_suffix(".config.json")
