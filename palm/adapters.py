"""LoRA adapters (Hu et al. 2021, https://arxiv.org/abs/2106.09685) on palm models, through peft.

peft does the adapter bookkeeping and its on-disk format (`adapter_config.json` +
`adapter_model.safetensors`). palm adds one LoRA layer of its own, registered with peft: the
fused projection of a PaLM block computes queries, the key head, the value head and the
feedforward input in one matrix, and users put adapters on some of those parts only (queries
and values is the common choice). `PartsLoraLinear` keeps one rank-r adapter per chosen part;
it also serves int8 base layers (`--quantize int8`), which peft's own layers do not know.

Targets (`--lora_targets`): `q`, `k`, `v`, `ff_in` (parts of the fused projection), `fused`
(the whole fused projection, one adapter), `attn_out`, `ff_out`, or `all` (fused, attn_out, ff_out).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.utils import CONFIG_NAME as ADAPTER_CONFIG
from torch import Tensor, nn

from palm.errors import PalmError
from palm.inference.quantization import Int8Linear
from palm.model import FusedProjection

FUSED = "fused_attn_ff_proj"
FUSED_PARTS = ("q", "k", "v", "ff_in")
MODULE_TARGETS = {"attn_out": "attn_out", "ff_out": "ff_out.2"}  # name in palm -> module path suffix
TARGETS = (*FUSED_PARTS, "fused", *MODULE_TARGETS, "all")


@dataclass
class PaLMLoraConfig(LoraConfig):
    """peft's LoraConfig plus the parts of the fused projection that get adapters (None: the
    whole projection, one adapter, when it is targeted at all)."""

    fused_parts: Optional[list[str]] = field(default=None, metadata={"help": "parts of palm's fused projection"})

    def __post_init__(self):
        super().__post_init__()
        self._register_custom_module({FusedProjection: PartsLoraLinear, Int8Linear: PartsLoraLinear})


def lora_config(targets: list[str], *, r: int = 8, alpha: float = 16, dropout: float = 0.05,
                base: str | None = None) -> PaLMLoraConfig:
    """The peft config for adapters on palm's `targets` (see the module docstring)."""
    if r < 1:
        raise PalmError(f"--lora_r must be at least 1, got {r}")
    if not 0 <= dropout < 1:
        raise PalmError(f"--lora_dropout must be in [0, 1), got {dropout}")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise PalmError(f"unknown LoRA target {unknown[0] if unknown else '(none)'!r}; choose from: {', '.join(TARGETS)}")
    if "all" in targets:
        targets = ["fused", *MODULE_TARGETS]
    parts = [t for t in FUSED_PARTS if t in targets]
    if parts and "fused" in targets:
        raise PalmError(f"--lora_targets: 'fused' already covers {', '.join(parts)}; give one or the other")
    modules = ([FUSED] if parts or "fused" in targets else []) + [MODULE_TARGETS[t] for t in MODULE_TARGETS if t in targets]
    return PaLMLoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules,
                          fused_parts=parts or None, base_model_name_or_path=base)


def add_lora(model: nn.Module, config: PaLMLoraConfig) -> PeftModel:
    """`model` wrapped by peft with fresh adapters; only the adapters are trainable."""
    try:
        # peft names the base after the model's `name_or_path` (a transformers attribute): ours is set after
        peft_model = get_peft_model(model, dataclasses.replace(config, base_model_name_or_path=None))
    except ValueError as e:  # peft's word for targets that match no module
        raise PalmError(f"LoRA: {str(e).splitlines()[0]}") from None
    peft_model.peft_config["default"].base_model_name_or_path = config.base_model_name_or_path
    return peft_model


class PartsLoraLinear(LoraLinear):
    """peft's LoRA layer for palm's fused projection (a rank-r adapter on each chosen part of its
    output) and for int8 base layers. Vanilla LoRA only (no DoRA or other variants)."""

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: LoraConfig, **kwargs) -> None:
        if self.resolve_lora_variant(config=config) is not None:
            raise PalmError("palm's LoRA layer supports plain LoRA only (no DoRA or other variants)")
        base = self.get_base_layer()
        names = getattr(config, "fused_parts", None) if isinstance(getattr(base, "parts", None), dict) else None
        if names:
            parts, start, self.segments = base.parts, 0, []
            for name, width in parts.items():  # (start, stop, adapted) in output order
                self.segments.append((start, start + width, name in names))
                start += width
        else:
            self.segments = [(0, self.out_features, True)]
        super().update_layer(adapter_name, r, lora_alpha, config, **kwargs)
        if names:  # stacked: lora_A is (parts * r, in), lora_B (adapted outputs, r)
            adapted = [stop - start for start, stop, on in self.segments if on]
            self.lora_A[adapter_name] = nn.Linear(self.in_features, r * len(adapted), bias=False)
            self.lora_B[adapter_name] = nn.Linear(r, sum(adapted), bias=False)
            self.reset_lora_parameters(adapter_name, config.init_lora_weights)
            self._move_adapter_to_device_of_base_layer(adapter_name)
            self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        out_features, in_features = module.weight.shape
        return in_features, out_features

    def _adapted(self) -> list[tuple[int, int]]:
        return [(start, stop) for start, stop, on in self.segments if on]

    def _part_outputs(self, adapter: str, a: Tensor) -> list[Tensor]:
        """The adapter's output on each adapted part, from lora_A's output `a` (..., parts * r)."""
        r, weight_b = self.r[adapter], self.lora_B[adapter].weight
        widths = [stop - start for start, stop in self._adapted()]
        return [a_i @ b_i.T for a_i, b_i in zip(a.split(r, dim=-1), weight_b.split(widths, dim=0))]

    def get_delta_weight(self, adapter: str) -> Tensor:
        """The adapter's change to the base weight, (out, in), in float32."""
        weight_a = self.lora_A[adapter].weight.float()
        deltas = self._part_outputs(adapter, weight_a.T)  # each (in, width): A_i^T B_i^T
        full = torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=weight_a.device)
        for (start, stop), delta in zip(self._adapted(), deltas):
            full[start:stop] = delta.T
        return full * self.scaling[adapter]

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            lora_x = self._cast_input_dtype(x, self.lora_A[adapter].weight.dtype)
            a = self.lora_A[adapter](self.lora_dropout[adapter](lora_x))
            scaling = self.scaling[adapter]
            deltas = iter(self._part_outputs(adapter, a))
            pieces = result.split([stop - start for start, stop, _ in self.segments], dim=-1)
            result = torch.cat([p + (next(deltas) * scaling).to(p.dtype) if on else p
                                for p, (_, _, on) in zip(pieces, self.segments)], dim=-1)
        return result

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        if isinstance(self.get_base_layer(), Int8Linear):
            raise PalmError("cannot merge an adapter into int8 weights in place; use palm.adapters.merged_state_dict")
        super().merge(safe_merge, adapter_names)


def merged_state_dict(model: nn.Module, base: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The float32 state dict of a plain PaLM whose weights are the base weights plus every active
    LoRA delta, summed in float32 (so that one cast afterwards is the only rounding). `model`
    holds the adapters (a PeftModel, or a PaLM they were injected into) and is left unchanged.
    `base`: the state dict to merge onto instead of the model's own base weights (the
    full-precision originals of an int8 base). To merge one tensor at a time instead of building
    the whole merged model, apply `merger(model)` to each base tensor as it is needed."""
    merge = merger(model)
    return {name: merge(name, tensor) for name, tensor in (base if base is not None else base_weights(model)).items()}


def base_weights(model: nn.Module) -> dict[str, Tensor]:
    """The model's own base weights (no copies), under the names a plain PaLM gives them; refused
    for an int8 base, whose full-precision weights are not in the model."""
    palm = model.get_base_model() if isinstance(model, PeftModel) else model
    if any(isinstance(m, Int8Linear) for m in palm.modules()):
        raise PalmError("the base weights are int8: pass the full-precision base weights to merge onto")
    return {name.replace(".base_layer.", "."): tensor for name, tensor in palm.state_dict().items() if ".lora_" not in name}


def merger(model: nn.Module) -> Callable[[str, Tensor], Tensor]:
    """A function of (name, base tensor) giving the merged model's tensor `name` in float32: the
    base tensor plus the active LoRA deltas of the layer it is the weight of, if any (a new
    tensor), else the base tensor itself (as float32). `model` is left unchanged."""
    palm = model.get_base_model() if isinstance(model, PeftModel) else model
    layers = {f"{name}.weight": module for name, module in palm.named_modules() if isinstance(module, LoraLinear)}

    @torch.no_grad()
    def merge(name: str, tensor: Tensor) -> Tensor:
        tensor = tensor.float()
        layer = layers.get(name)
        if layer is not None:
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    tensor = tensor + layer.get_delta_weight(adapter).float()
        return tensor

    return merge


def read_adapter_config(directory: Path) -> PaLMLoraConfig:
    """The LoRA config saved in an adapter directory (peft's adapter_config.json)."""
    try:
        data = json.loads((directory / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise PalmError(f"{directory}: unreadable {ADAPTER_CONFIG} ({e})") from None
    if data.get("peft_type") != "LORA":
        raise PalmError(f"{directory}: a {data.get('peft_type')} adapter; palm reads LoRA adapters")
    fields = PaLMLoraConfig.__dataclass_fields__
    return PaLMLoraConfig(**{k: v for k, v in data.items() if k in fields and fields[k].init})


def load_adapter(model: nn.Module, directory: str | Path, *, trainable: bool = False) -> PeftModel:
    """`model` with the LoRA adapter saved in `directory` (by `PeftModel.save_pretrained`)."""
    directory = Path(directory)
    config = read_adapter_config(directory)
    try:
        return PeftModel.from_pretrained(model, str(directory), config=config, is_trainable=trainable)
    except (ValueError, RuntimeError, KeyError) as e:
        raise PalmError(f"{directory}: the adapter does not fit the model ({str(e).splitlines()[0]})") from None
