"""`palm export hf`: one directory that palm and transformers both read.

Written into OUT: `config.json` (transformers' names, `model_type: palm`, `auto_map` to the modeling
files beside it), `model.safetensors` (sharded above `max_shard_size`, with an index; palm's own
tensor names), `configuration_palm.py` + `modeling_palm.py` (for `trust_remote_code=True` where
palm is not installed), `generation_config.json`, the tokenizer (`tokenizer.json` +
`tokenizer_config.json`, the built-in `bytes` tokenizer included) and, for a fine-tuned model,
its chat template and prompt style. A palm LoRA adapter directory exports as a standard peft
LoRA adapter for the exported model.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from palm.checkpoint import ADAPTER_CONFIG, load
from palm.config import PaLMConfig
from palm.errors import PalmError
from palm.files import check_output_directory
from palm.hf import register
from palm.hf.configuration_palm import PaLMConfig as PaLMHFConfig
from palm.hf.modeling_palm import PaLMForCausalLM
from palm.model import PaLM
from palm.prompts import STYLE_FILE, TEMPLATE_FILE
from palm.tokenizer import DEFAULT_TOKENIZER, ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

register()  # exported directories load through the Auto classes in this process, without remote code

DEFAULT_SHARD_SIZE = "5GB"
BYTES_EOS = "<|endoftext|>"
# palm's LoRA layer puts one rank-r adapter on each chosen part of the fused projection
FUSED = "fused_attn_ff_proj"


def hf_config(config: PaLMConfig, **extra) -> PaLMHFConfig:
    """The transformers config of a palm config (`extra`: further fields, e.g. eos_token_id)."""
    return PaLMHFConfig(
        vocab_size=config.num_tokens, hidden_size=config.dim, num_hidden_layers=config.depth,
        num_attention_heads=config.heads, head_dim=config.dim_head, intermediate_size=config.ff_inner_dim,
        max_position_embeddings=config.max_seq_len, qk_rmsnorm=config.qk_rmsnorm, attn_scale=config.attn_scale,
        xpos_scale_base=config.xpos_scale_base, attention_dropout=config.attn_dropout, ff_dropout=config.ff_dropout,
        loss_ignore_index=config.loss_ignore_index, architectures=["PaLMForCausalLM"], **extra,
    )


def palm_config(data: dict) -> PaLMConfig:
    """The palm config of a transformers `config.json` (a dict with model_type "palm")."""
    if data.get("intermediate_size", 0) % data.get("hidden_size", 1):
        raise PalmError("config: intermediate_size must be a multiple of hidden_size for a palm model")
    names = dict(num_tokens="vocab_size", dim="hidden_size", depth="num_hidden_layers", heads="num_attention_heads",
                 dim_head="head_dim", max_seq_len="max_position_embeddings", attn_dropout="attention_dropout",
                 qk_rmsnorm="qk_rmsnorm", attn_scale="attn_scale", xpos_scale_base="xpos_scale_base",
                 ff_dropout="ff_dropout", loss_ignore_index="loss_ignore_index")
    fields = {ours: data[theirs] for ours, theirs in names.items() if theirs in data}
    return PaLMConfig(**fields, ff_mult=data["intermediate_size"] // data["hidden_size"])


def to_transformers(model: PaLM) -> PaLMForCausalLM:
    """A transformers model sharing `model`'s weights (no copies; a change to one shows in both)."""
    with torch.device("meta"):
        hf_model = PaLMForCausalLM(hf_config(model.config))
    hf_model.load_state_dict(weights(model), strict=False, assign=True)
    hf_model.tie_weights()
    return hf_model.train(model.training)


def weights(model: PaLM) -> dict[str, Tensor]:
    """`model`'s parameters under the names both formats use: no tied output projection, no zero
    LayerNorm biases or rotary tables (both are derived)."""
    return {name: p for name, p in model.named_parameters()}


def export_hf(
    source: str,
    out: str | Path,
    *,
    tokenizer: str | None = "auto",
    dtype: str | torch.dtype | None = None,
    max_shard_size: str | int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    base_model: str | None = None,
) -> Path:
    """Write `source` (anything `palm.load` takes; a palm LoRA adapter directory gives a peft
    adapter, see `export_adapter`) as a transformers model directory `out`.

    `tokenizer`: "bytes", a tokenizer.json, a directory or a Hub repo; "auto" takes the one beside
    the model (its tokenizer.json, or the run's config.yaml), else GPT-NeoX's for the published
    checkpoints; None writes no tokenizer. `base_model` (adapters only): the base to name in
    adapter_config.json, e.g. the exported base model's directory or Hub repo. The directory is written beside `out` and moved there
    when complete; an existing `out` is replaced only with `overwrite`.
    """
    out = Path(out)
    # only an earlier export (its modeling file or adapter config marks it) is replaced, never the source
    check_output_directory(out, flag="OUT", marker=("modeling_palm.py", ADAPTER_CONFIG), what="an export",
                           overwrite=overwrite, inputs=[source])
    if (Path(source) / ADAPTER_CONFIG).is_file():
        return _write_atomically(out, overwrite, lambda tmp: export_adapter(Path(source), tmp, base_model))
    model = load(source, dtype=dtype)
    tok = resolve_tokenizer(source, tokenizer)
    if tok is not None and tok.vocab_size > model.config.num_tokens:
        raise PalmError(f"the tokenizer has {tok.vocab_size} tokens, more than the model's {model.config.num_tokens}")

    def write(tmp: Path) -> None:
        save_transformers(model, tmp, tokenizer=tok, max_shard_size=max_shard_size)
        source_dir = Path(source)
        for name in (STYLE_FILE, TEMPLATE_FILE):
            if source_dir.is_dir() and (source_dir / name).is_file():
                shutil.copyfile(source_dir / name, tmp / name)
        if tok is not None:
            template = source_dir / TEMPLATE_FILE if source_dir.is_dir() else None
            save_tokenizer(tok, tmp, max_length=model.config.max_seq_len,
                           chat_template=template.read_text() if template and template.is_file() else None)

    return _write_atomically(out, overwrite, write)


def save_transformers(model: PaLM, directory: Path, *, tokenizer: Tokenizer | None = None,
                      max_shard_size: str | int = DEFAULT_SHARD_SIZE) -> None:
    """Weights, config (with auto_map), modeling files and generation config of `model` in `directory`."""
    from transformers import GenerationConfig

    hf_model = to_transformers(model)
    eos = tokenizer.eos_id if tokenizer is not None else None
    hf_model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=eos)
    # copy the modeling files beside the weights and name them in config.json's auto_map
    PaLMHFConfig.register_for_auto_class()
    PaLMForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    try:
        hf_model.save_pretrained(directory, max_shard_size=max_shard_size)
    finally:
        PaLMHFConfig._auto_class = None
        PaLMForCausalLM._auto_class = None


def resolve_tokenizer(source: str, tokenizer: str | None) -> Tokenizer | None:
    """The tokenizer to export with `source` (see `export_hf`)."""
    if tokenizer is None or tokenizer == "none":
        return None
    if tokenizer != "auto":
        return load_tokenizer(tokenizer)
    directory = Path(source)
    if directory.is_dir() and (directory / "tokenizer.json").is_file():
        return load_tokenizer(str(directory))
    run_config = directory.parent / "config.yaml" if directory.is_dir() else None
    if run_config is not None and run_config.is_file():
        import yaml

        recorded = (yaml.safe_load(run_config.read_text()) or {}).get("tokenizer")
        if isinstance(recorded, str):
            return load_tokenizer(recorded)
    if directory.exists() and not directory.suffix == ".pt":
        raise PalmError(f"cannot tell which tokenizer {source} uses: pass --tokenizer (or --tokenizer none)")
    return load_tokenizer(DEFAULT_TOKENIZER)  # the published checkpoints' (GPT-NeoX)


def save_tokenizer(tokenizer: Tokenizer, directory: Path, *, max_length: int, chat_template: str | None = None) -> None:
    """tokenizer.json and tokenizer_config.json such that `AutoTokenizer.from_pretrained(directory)`
    gives palm's ids. The end-of-text token doubles as the padding token."""
    from transformers import PreTrainedTokenizerFast

    if isinstance(tokenizer, ByteTokenizer):
        backend, eos = byte_tokenizer_json(), BYTES_EOS
    elif isinstance(tokenizer, HFTokenizer):
        backend = tokenizer._tokenizer
        eos = backend.id_to_token(tokenizer.eos_id) if tokenizer.eos_id is not None else None
    else:
        raise PalmError(f"cannot export a tokenizer of type {type(tokenizer).__name__}")
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, pad_token=eos, model_max_length=max_length,
                                   clean_up_tokenization_spaces=False)
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(str(directory))
    # the class name transformers 4 and 5 both know (5 writes its new name, which 4 lacks)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["model_input_names"] = ["input_ids", "attention_mask"]  # no token_type_ids, which generate refuses
    config.pop("backend", None)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def byte_tokenizer_json():
    """palm's `bytes` tokenizer as a `tokenizers.Tokenizer`: UTF-8 bytes are ids 0-255 (a byte-level
    BPE with no merges), and `<|endoftext|>` is 256. Unlike palm's, it reads that token's text
    in a prompt as the token itself, as every Hugging Face tokenizer does with special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = _byte_level_chars()
    vocab = {byte_to_char[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(BYTES_EOS, special=True)])
    return tokenizer


def _byte_level_chars() -> dict[int, str]:
    """The printable character GPT-2's byte-level scheme gives each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def export_adapter(directory: Path, out: Path, base: str | None = None) -> None:
    """A palm LoRA adapter directory as a standard peft LoRA adapter for the exported model.

    palm's per-part adapters on the fused projection (q, k, v, ff_in), a rank-r pair per part,
    are exactly one LoRA of rank parts x r on the whole projection: A stacks the parts' A
    matrices, B places each part's B on its rows and columns (zero elsewhere), and the alpha is
    scaled by the number of parts so that alpha / rank, the scaling, is unchanged."""
    from safetensors.torch import load_file

    from palm.adapters import read_adapter_config
    from palm.checkpoint import write_safetensors

    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    parts = config.pop("fused_parts", None)
    state = load_file(directory / "adapter_model.safetensors")
    if parts:
        model_parts = _fused_parts_of(read_adapter_config(directory).base_model_name_or_path, state)
        r, alpha = config["r"], config["lora_alpha"]
        for key in [k for k in state if f".{FUSED}.lora_B" in k]:
            state[key] = _block_b(state[key], model_parts, parts, r)
        config["rank_pattern"] = {**config.get("rank_pattern", {}), FUSED: r * len(parts)}
        config["alpha_pattern"] = {**config.get("alpha_pattern", {}), FUSED: alpha * len(parts)}
    if base is not None:
        config["base_model_name_or_path"] = base
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(state, out / "adapter_model.safetensors", metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in (STYLE_FILE, TEMPLATE_FILE):
        if (directory / name).is_file():
            shutil.copyfile(directory / name, out / name)


def _fused_parts_of(base: str | None, state: dict[str, Tensor]) -> dict[str, int]:
    """Widths of the fused projection's parts (q, k, v, ff_in), from the base model's config."""
    if not base:
        raise PalmError("the adapter's config names no base model; cannot tell the fused projection's layout")
    config = base_config(base)
    return {"q": config.attn_inner_dim, "k": config.dim_head, "v": config.dim_head, "ff_in": 2 * config.ff_inner_dim}


def base_config(source: str) -> PaLMConfig:
    """The palm config of a model source without reading its weights where a config file or a
    preset tells it (a palm directory, an exported one, a preset), else from the loaded model."""
    from palm.config import canonical_name, get_config

    config_file = Path(source) / "config.json"
    if config_file.is_file():
        data = json.loads(config_file.read_text())
        return palm_config(data) if data.get("model_type") == "palm" else PaLMConfig.from_dict(data)
    if canonical_name(source):
        return get_config(source)
    return load(source).config


def _block_b(b: Tensor, model_parts: dict[str, int], adapted: list[str], r: int) -> Tensor:
    """palm's stacked B (adapted outputs, r) as the B (all outputs, parts x r) of one LoRA."""
    full = torch.zeros(sum(model_parts.values()), r * len(adapted), dtype=b.dtype)
    start, row, k = 0, 0, 0
    for name, width in model_parts.items():
        if name in adapted:
            full[start:start + width, k * r:(k + 1) * r] = b[row:row + width]
            row, k = row + width, k + 1
        start += width
    return full


def _write_atomically(out: Path, overwrite: bool, write) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
