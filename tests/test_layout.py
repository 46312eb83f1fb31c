"""Where code lives: each package imports only from the layers below it (the model from the config
alone), so that data, models and inference never depend on training or the command line."""

import ast
from pathlib import Path

import palm

ROOT = Path(palm.__file__).parent
# unit -> the palm units it may import (its own package is always allowed)
ALLOWED = {
    "errors": set(),
    "files": {"errors"},
    "dtypes": {"errors"},
    "checks": {"errors"},
    "config": {"errors"},
    "prompts": {"errors"},
    "hub": {"errors"},
    "kernels": {"files"},
    "model": {"config"},
    "tokenizer": {"errors", "checks", "hub", "kernels"},
    "inference": {"errors", "dtypes", "model", "kernels", "prompts", "tokenizer"},
    "adapters": {"errors", "model", "inference"},
    "checkpoint": {"errors", "files", "hub", "dtypes", "config", "model", "adapters"},
    "data": {"errors", "checks", "files", "hub", "prompts"},
    "training": {"errors", "checks", "dtypes", "files", "hub", "config", "model", "checkpoint", "tokenizer", "data",
                 "inference", "prompts", "adapters"},
    "hf": {"errors", "dtypes", "files", "config", "model", "checkpoint", "tokenizer", "prompts", "adapters"},
    "serve": {"errors", "checks", "dtypes", "model", "checkpoint", "tokenizer", "inference", "prompts"},
    "eval": {"errors", "checks", "dtypes", "model", "checkpoint", "tokenizer", "data", "inference"},
}
TOP = {"__init__", "__main__", "cli"}  # the public API and the command line may use everything


def palm_imports(path: Path) -> set[str]:
    """The palm units a file imports, at any depth (imports inside functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "palm" else []  # `from palm import __version__`
        found |= {name.split(".")[1] for name in names if name.startswith("palm.")}
    return found


def test_every_module_imports_only_from_below():
    units = {p.stem if p.parent == ROOT else p.relative_to(ROOT).parts[0] for p in ROOT.rglob("*.py")}
    assert units - TOP == set(ALLOWED), "a new unit needs its row in ALLOWED"
    upward = []
    for path in ROOT.rglob("*.py"):
        unit = path.stem if path.parent == ROOT else path.relative_to(ROOT).parts[0]
        if unit in TOP:
            continue
        for imported in palm_imports(path) - ALLOWED[unit] - {unit}:
            upward.append(f"{path.relative_to(ROOT)} imports palm.{imported}")
    assert not upward, upward


def test_the_model_file_imports_nothing_of_palm_but_the_config():
    assert palm_imports(ROOT / "model.py") == {"config"}
