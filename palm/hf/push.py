"""`palm push DIR REPO`: a model (or adapter) directory to the Hugging Face Hub with a model card.

A palm directory that is not in the exported format yet (`palm.save_pretrained`'s, a training
run's `model/`, a palm LoRA adapter) is exported first (`palm.hf.export`), so that what lands on
the Hub loads in transformers as well as in palm. The Hub calls go through huggingface_hub.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
from pathlib import Path

from palm.checkpoint import ADAPTER_CONFIG
from palm.errors import PalmError

CARD_NAME = "README.md"


def push(directory: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         license: str | None = None, tokenizer: str | None = "auto", commit_message: str | None = None,
         token: str | None = None) -> str:
    """Upload `directory` to the Hub model repo `repo_id` (created if needed, `private` then) as
    one commit on `revision` (a branch, created from main if needed), with a generated model card
    unless the directory has a README.md. Returns the commit's URL."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PalmError(f"{directory}: no such directory")
    with tempfile.TemporaryDirectory(prefix="palm-push-") as scratch:
        folder = directory if is_exported(directory) else _export(directory, Path(scratch) / "export", tokenizer)
        card = None if (folder / CARD_NAME).is_file() else model_card(folder, repo_id, run_dir=_run_dir(directory), license=license)
        return upload(folder, repo_id, card=card, private=private, revision=revision,
                      commit_message=commit_message or f"Upload {directory.name} with palm", token=token)


def is_exported(directory: Path) -> bool:
    """Whether `directory` already is in the exported format (or a standard peft adapter)."""
    adapter = directory / ADAPTER_CONFIG
    if adapter.is_file():
        return json.loads(adapter.read_text()).get("fused_parts") is None
    config = directory / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "palm"


def _export(directory: Path, out: Path, tokenizer: str | None) -> Path:
    from palm.hf.export import export_hf

    return export_hf(str(directory), out, tokenizer=tokenizer)


def _run_dir(directory: Path) -> Path | None:
    """The training run a model directory came from (runs/NAME/model -> runs/NAME), if any."""
    for candidate in (directory, directory.parent):
        if (candidate / "metrics.jsonl").is_file() or (candidate / "config.yaml").is_file():
            return candidate
    return None


def upload(folder: Path, repo_id: str, *, card: str | None, private: bool, revision: str | None,
           commit_message: str, token: str | None = None) -> str:
    """One commit of every file under `folder` (and `card` as README.md) to `repo_id`."""
    from huggingface_hub import CommitOperationAdd, HfApi

    files = sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    operations = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p)) for p in files]
    if card is not None:
        operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card.encode()))
    with hub_errors(f"push to the Hugging Face Hub repo {repo_id}"):
        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        info = api.create_commit(repo_id, operations, commit_message=commit_message, repo_type="model", revision=revision)
    return str(getattr(info, "commit_url", info))


@contextlib.contextmanager
def hub_errors(action: str):
    """Any failure of the Hub calls inside as one PalmError line (as palm.hub does)."""
    from huggingface_hub.utils import logging as hub_logging

    verbosity = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()
    try:
        yield
    except PalmError:
        raise
    except Exception as e:  # no token, no network, no permission: all end the same way for the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PalmError(f"could not {action} ({reason}); log in with `hf auth login` or set HF_TOKEN") from None
    finally:
        hub_logging.set_verbosity(verbosity)


def model_card(folder: Path, repo_id: str, *, run_dir: Path | None = None, license: str | None = None) -> str:
    """README.md for the Hub: metadata (library_name, tags, base_model, datasets, license), the
    final validation loss and perplexity of the run, and how to use the model from palm and from
    transformers."""
    from huggingface_hub import ModelCard, ModelCardData

    run = _run_config(run_dir)
    adapter = (folder / ADAPTER_CONFIG).is_file()
    base = run.get("checkpoint") or run.get("init_from")
    if adapter:
        base = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") or base
    data = run.get("data")
    datasets = [data] if isinstance(data, str) and _looks_like_repo(data) else None
    metadata = ModelCardData(
        library_name="peft" if adapter else "transformers", license=license or "other",
        tags=["palm", "text-generation", "custom_code"] + (["lora"] if adapter else []),
        base_model=base if isinstance(base, str) and _looks_like_repo(base) else None,
        datasets=datasets, pipeline_tag=None if adapter else "text-generation",
    )
    lines = [f"# {repo_id.split('/')[-1]}", "",
             f"A PaLM-architecture {'LoRA adapter' if adapter else 'language model'} made with [palm](https://github.com/conceptofmind/PaLM) "
             "(parallel attention and SwiGLU blocks, multi-query attention, xPos rotary embeddings).", ""]
    if base:
        lines += [f"Base model: `{base}`.", ""]
    if data:
        lines += [f"Training data: `{data}`.", ""]
    val = final_validation(run_dir)
    if val is not None:
        lines += ["| step | validation loss | validation perplexity |", "| --- | --- | --- |",
                  f"| {val['step']} | {val['val_loss']:.4f} | {val['val_ppl']:.2f} |", ""]
    lines += ["## Use with palm", "", "```python", "import palm", "import torch", ""]
    if adapter:
        lines += ["# the adapter on its base model: download the repo, then", f'model = palm.load("path/to/{repo_id.split("/")[-1]}")']
    else:
        lines += [f'model = palm.load("{repo_id}")', f'tokenizer = palm.load_tokenizer("{repo_id}")',
                  'ids = torch.tensor(tokenizer.encode("Hello"))',
                  "print(tokenizer.decode(palm.generate(model, ids, 50, temperature=0).tolist()))"]
    lines += ["```", "", "## Use with transformers", "", "```python"]
    if adapter:
        lines += ["from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
                  f'base = AutoModelForCausalLM.from_pretrained("{base or "BASE_MODEL"}", trust_remote_code=True)',
                  f'model = PeftModel.from_pretrained(base, "{repo_id}")']
    else:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}", trust_remote_code=True)',
                  f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)',
                  'inputs = tokenizer("Hello", return_tensors="pt")',
                  "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=50, do_sample=False)[0]))"]
    lines += ["```", ""]
    return str(ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(lines)))


def final_validation(run_dir: Path | None) -> dict | None:
    """The last evaluation in a run's metrics.jsonl: {step, val_loss, val_ppl}, or None."""
    path = run_dir / "metrics.jsonl" if run_dir is not None else None
    if path is None or not path.is_file():
        return None
    last = None
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "val_loss" in record:
            last = record
    if last is None:
        return None
    loss = float(last["val_loss"])
    return {"step": last.get("step"), "val_loss": loss, "val_ppl": float(last.get("val_ppl", math.exp(min(loss, 700))))}


def _run_config(run_dir: Path | None) -> dict:
    path = run_dir / "config.yaml" if run_dir is not None else None
    if path is None or not path.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _looks_like_repo(name: str) -> bool:
    return name.count("/") == 1 and not Path(name).exists() and not name.startswith((".", "/"))
