"""The README's Python examples run as written. What they would download from the Hub is served
from local stand-ins: a small model under the 410m preset's name, and a small BPE tokenizer
under GPT-NeoX's; the transformers example reads that model exported as `palm export hf` does."""

import re
from pathlib import Path

import torch

import palm
from palm.checkpoint import save_reference_checkpoint

from conftest import CORPUS, train_bpe

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def test_readme_python_examples_run(tmp_path, monkeypatch, capsys):
    small = palm.PaLMConfig(num_tokens=320, dim=64, depth=2, heads=4, dim_head=16, max_seq_len=1024)
    monkeypatch.setitem(palm.config.PRESETS, "palm_410m_8k_v0", small)
    torch.manual_seed(0)
    model = palm.PaLM(small)
    save_reference_checkpoint(model, tmp_path / "palm_410m_8k_v0.pt")
    palm.save_pretrained(model, tmp_path / "repo")
    hub = {
        ("conceptofmind/palm-410m", "palm_410m_8k_v0.pt"): tmp_path / "palm_410m_8k_v0.pt",
        ("user/repo", "config.json"): tmp_path / "repo" / "config.json",
        ("user/repo", "model.safetensors"): tmp_path / "repo" / "model.safetensors",
        ("EleutherAI/gpt-neox-20b", "tokenizer.json"): train_bpe([CORPUS], tmp_path),
    }
    requested = []

    def hub_download(repo: str, filename: str) -> Path:
        requested.append((repo, filename))
        if (repo, filename) not in hub:
            raise palm.PalmError(f"could not get {filename} from the Hugging Face Hub repo {repo}")
        return hub[repo, filename]

    monkeypatch.setattr("palm.checkpoint.hub_download", hub_download)
    monkeypatch.setattr("palm.tokenizer.hub_download", hub_download)
    # the local files the examples name, in the working directory
    save_reference_checkpoint(model, "palm_410m_8k_v0.pt")
    palm.save_pretrained(model, "runs/my-model")
    from palm.hf.export import export_hf

    export_hf(str(tmp_path / "repo"), "out/palm-410m", tokenizer=str(hub["EleutherAI/gpt-neox-20b", "tokenizer.json"]))

    blocks = python_blocks(README.read_text())
    assert blocks
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})
    assert set(hub) <= set(requested)
    assert capsys.readouterr().out  # the streamed text
