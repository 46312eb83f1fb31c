"""palm models in the Hugging Face stack: the transformers model against palm's, the exported
directory in a fresh process without palm, tokenizers, peft adapters, and `palm push` against a
stand-in for the Hub."""

import ast
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import palm
from palm import PaLM, PaLMConfig, PalmError
from palm.hf.modeling_palm import PaLMForCausalLM
from palm.hf.export import export_hf, to_transformers

from conftest import CORPUS, train_bpe

CONFIG = PaLMConfig(num_tokens=257, dim=64, depth=2, heads=4, dim_head=16, max_seq_len=512)
MIXED = "déf naïve(x):\n    return x ** 2  # ✓ 🙂 ça va? 日本語\tend"


def random_model(seed: int = 0, **changes) -> PaLM:
    torch.manual_seed(seed)
    model = PaLM(CONFIG.replace(**changes)).eval()
    with torch.no_grad():  # gains away from 1, as after training
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "q_scale", "k_scale")):
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Two byte-level models (with and without qk_rmsnorm) saved by palm and exported."""
    root = tmp_path_factory.mktemp("exported")
    dirs = {}
    for qk in (False, True):
        name = "qk" if qk else "plain"
        palm.save_pretrained(random_model(qk_rmsnorm=qk), root / f"{name}-palm")
        dirs[name] = export_hf(str(root / f"{name}-palm"), root / name, tokenizer="bytes")
    return dirs


@pytest.mark.parametrize("qk_rmsnorm", [False, True])
def test_logits_and_hidden_states_equal_palms(qk_rmsnorm):
    model = random_model(qk_rmsnorm=qk_rmsnorm)
    hf_model = to_transformers(model)
    tokens = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = hf_model(tokens, output_hidden_states=True)
        expected = model(tokens)
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=0)
    assert len(out.hidden_states) == CONFIG.depth + 1
    torch.testing.assert_close(out.hidden_states[0], model.token_emb(tokens))
    # explicit positions (absolute xPos) agree too
    with torch.no_grad():
        positioned = hf_model(tokens, position_ids=torch.arange(40)[None].expand(2, -1)).logits
    torch.testing.assert_close(positioned, expected, atol=1e-5, rtol=0)
    assert hf_model.to_logits.weight is hf_model.token_emb.weight


def test_labels_give_the_hand_computed_cross_entropy():
    model = random_model()
    hf_model = to_transformers(model)
    tokens = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(2))
    labels = tokens.clone()
    labels[0, :5] = -100  # a masked prompt
    with torch.no_grad():
        loss = hf_model(tokens, labels=labels).loss
        logprobs = model(tokens).log_softmax(-1)
    terms = [-logprobs[b, t - 1, labels[b, t]] for b in range(2) for t in range(1, 12) if labels[b, t] != -100]
    torch.testing.assert_close(loss, torch.stack(terms).mean(), atol=1e-6, rtol=0)


def run_without_palm(script: str, *args) -> str:
    """Run `script` in a fresh Python (in the test's scratch directory, without the user site)
    where importing palm fails, so only transformers' remote code can serve the model. The
    environment is kept, so that a PYTHONPATH choosing another transformers applies here too."""
    guard = "import sys\nsys.modules['palm'] = None  # any `import palm` now raises ImportError\n"
    result = subprocess.run([sys.executable, "-s", "-c", guard + textwrap.dedent(script), *map(str, args)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_the_exported_directory_loads_with_remote_code_and_no_palm(exported, tmp_path):
    tokens = torch.randint(0, 257, (2, 33), generator=torch.Generator().manual_seed(3))
    torch.save(tokens, tmp_path / "tokens.pt")
    stdout = run_without_palm("""
        import json, sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        try:
            import palm
            raise SystemExit("palm is importable")
        except ImportError:
            pass
        tokens = torch.load(sys.argv[1])
        results = {}
        for name, directory in zip(("plain", "qk"), sys.argv[3:]):
            model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32)
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            with torch.no_grad():
                results[name] = model(tokens).logits
            tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
            results[name + "_ids"] = tokenizer(sys.argv[2], add_special_tokens=False)["input_ids"]
            results[name + "_generated"] = model.generate(tokens[:1, :5], max_new_tokens=8, do_sample=False)
        torch.save(results, sys.argv[1] + ".out")
        print("ok")
    """, tmp_path / "tokens.pt", MIXED, exported["plain"], exported["qk"])
    assert "ok" in stdout
    results = torch.load(str(tmp_path / "tokens.pt") + ".out")
    for name in ("plain", "qk"):
        model = palm.load(exported[name].parent / f"{name}-palm")
        with torch.no_grad():
            torch.testing.assert_close(results[name], model(tokens), atol=1e-5, rtol=0)
        assert results[name + "_ids"] == palm.load_tokenizer("bytes").encode(MIXED)
        expected = palm.generate(model, tokens[0, :5], 8, temperature=0)
        assert results[name + "_generated"][0].tolist() == expected.tolist()


def test_exported_files(exported):
    directory = exported["plain"]
    names = {p.name for p in directory.iterdir()}
    assert {"config.json", "model.safetensors", "configuration_palm.py", "modeling_palm.py", "generation_config.json",
            "tokenizer.json", "tokenizer_config.json"} <= names
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "palm" and config["auto_map"]["AutoModelForCausalLM"] == "modeling_palm.PaLMForCausalLM"
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"],
            config["vocab_size"], config["max_position_embeddings"], config.get("tie_word_embeddings", True)) == (64, 2, 4, 1, 257, 512, True)
    # (transformers 4 leaves out tie_word_embeddings at its default, true)
    # the modeling files import only torch and transformers (besides each other)
    for name in ("configuration_palm.py", "modeling_palm.py"):
        tree = ast.parse((directory / name).read_text())
        imports = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imports |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
        assert imports <= {"torch", "transformers"}, imports


def test_generate_greedy_equals_palms_for_one_prompt_and_a_left_padded_batch(trained_tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    palm.save_pretrained(trained_tiny, tmp_path / "palm")
    export_hf(str(tmp_path / "palm"), tmp_path / "hf", tokenizer="bytes")
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")  # palm's registered class, no remote code
    assert isinstance(hf_model, PaLMForCausalLM)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    tokenizer.padding_side = "left"
    bytes_tok = palm.load_tokenizer("bytes")

    single = "Alice has 7 apples and"
    out = hf_model.generate(**tokenizer(single, return_tensors="pt"), max_new_tokens=30, do_sample=False)
    expected = palm.generate(trained_tiny, torch.tensor(bytes_tok.encode(single)), 30, temperature=0, eos_token_id=256)
    assert out[0].tolist() == expected.tolist()

    prompts = ["The quick brown", "Bob has 12 apples and gives", "Carol"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][2, 0] == 0  # left-padded
    out = hf_model.generate(**batch, max_new_tokens=25, do_sample=False)
    expected = palm.generate(trained_tiny, [bytes_tok.encode(p) for p in prompts], 25, temperature=0, eos_token_id=256)
    width = batch["input_ids"].shape[1]
    for i, prompt in enumerate(prompts):
        n = len(bytes_tok.encode(prompt))
        assert out[i, width:].tolist() == expected[i, n:n + 25].tolist(), prompt

    torch.manual_seed(0)
    sampled = hf_model.generate(**tokenizer(single, return_tensors="pt"), max_new_tokens=10, do_sample=True, top_k=20)
    assert sampled.shape == (1, len(single) + 10)

    from transformers import pipeline

    generator = pipeline("text-generation", model=hf_model, tokenizer=tokenizer)
    text = generator("Alice has", max_new_tokens=12, do_sample=False)[0]["generated_text"]
    assert text.startswith("Alice has") and len(text) > len("Alice has")


def test_auto_tokenizer_gives_palms_ids_for_bpe_and_bytes(tmp_path):
    from transformers import AutoTokenizer

    path = train_bpe([CORPUS, "def f(x):\n    return x  # café ça 🙂 naïve"], tmp_path, vocab_size=300)
    model = PaLM(PaLMConfig(num_tokens=300, dim=32, depth=1, heads=2, dim_head=16, max_seq_len=64))
    palm.save_pretrained(model, tmp_path / "palm")
    export_hf(str(tmp_path / "palm"), tmp_path / "bpe", tokenizer=str(path))
    ours = palm.load_tokenizer(str(path))
    theirs = AutoTokenizer.from_pretrained(tmp_path / "bpe")
    assert theirs(MIXED, add_special_tokens=False)["input_ids"] == ours.encode(MIXED)
    assert theirs.eos_token_id == ours.eos_id == 0
    assert palm.load_tokenizer(str(tmp_path / "bpe")).encode(MIXED) == ours.encode(MIXED)

    palm.save_pretrained(PaLM(CONFIG), tmp_path / "bytes-palm")
    export_hf(str(tmp_path / "bytes-palm"), tmp_path / "bytes", tokenizer="bytes")
    theirs = AutoTokenizer.from_pretrained(tmp_path / "bytes")
    ids = theirs(MIXED, add_special_tokens=False)["input_ids"]
    assert ids == palm.load_tokenizer("bytes").encode(MIXED)
    assert theirs.decode(ids) == MIXED and theirs.eos_token_id == 256 and len(theirs) == 257


def test_palm_loads_the_exported_directory_bit_exactly(exported, tmp_path):
    model = palm.load(exported["qk"].parent / "qk-palm")
    again = palm.load(exported["qk"])
    assert again.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name

    # sharded above max_shard_size: both sides read the shards
    export_hf(str(exported["qk"].parent / "qk-palm"), tmp_path / "sharded", tokenizer=None, max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    tokens = torch.randint(0, 257, (1, 20), generator=torch.Generator().manual_seed(4))
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        expected = model(tokens)
        torch.testing.assert_close(palm.load(tmp_path / "sharded")(tokens), expected, atol=0, rtol=0)
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")(tokens).logits, expected,
                                   atol=1e-5, rtol=0)


def test_a_published_format_checkpoint_exports_and_reproduces_the_reference(reference_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    path, reference = reference_checkpoint
    export_hf(str(path), tmp_path / "out", tokenizer=None)
    tokens = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = reference(tokens)
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "out")(tokens).logits, expected,
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(palm.load(tmp_path / "out")(tokens), expected, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A LoRA run of `palm finetune` (per-part q/v adapters and attn_out) on a small byte model."""
    from palm.training.config import FinetuneConfig
    from palm.training.finetune import finetune

    root = tmp_path_factory.mktemp("finetuned")
    palm.save_pretrained(random_model(), root / "base")
    rows = [{"instruction": f"Add {a} and {b}.", "output": str(a + b)} for a in range(4) for b in range(4)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    finetune(FinetuneConfig(checkpoint=str(root / "base"), data=str(root / "data.jsonl"), val_fraction=0.25,
                            tokenizer="bytes", out_dir=str(root / "run"), max_steps=4, batch_size=4, seq_len=64,
                            prompt_style="chatml", lr=3e-2, min_lr=3e-3, warmup_steps=1, save_every=10, eval_every=2,
                            log_every=2, samples=0, peak_tflops=1.0, lora_dropout=0.0, lora_targets="q,v,attn_out"),
             progress=False)
    return root


def test_a_palm_finetune_adapter_loads_with_peft_onto_the_exported_model(finetuned, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = finetuned / "run"
    export_hf(str(finetuned / "base"), tmp_path / "base", tokenizer="bytes")
    export_hf(str(run / "adapter"), tmp_path / "adapter", base_model=str(tmp_path / "base"))
    hf_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
    adapted = palm.load(run / "adapter")  # palm's adapter model
    tokens = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = adapted(tokens)
        assert (expected - palm.load(finetuned / "base")(tokens)).abs().max() > 1e-3  # the adapter does something
        torch.testing.assert_close(hf_model(tokens).logits, expected, atol=1e-5, rtol=0)
        # palm reads the exported adapter too, and the merged model exports with its chat template
        torch.testing.assert_close(palm.load(tmp_path / "adapter")(tokens), expected, atol=1e-5, rtol=0)
    export_hf(str(run / "model"), tmp_path / "merged", tokenizer="bytes")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_peft_lora_trains_on_the_exported_model(exported):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(exported["plain"])
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["fused_attn_ff_proj", "attn_out"],
                                                  task_type="CAUSAL_LM"))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    tokens = torch.tensor([list(b"the quick brown fox jumps over the lazy dog")] * 2)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = peft_model(input_ids=tokens, labels=tokens).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


class StandInHub:
    """Records what `palm push` asks of huggingface_hub's HfApi."""

    def __init__(self, monkeypatch):
        from huggingface_hub import HfApi

        self.calls = []
        self.files = {}
        monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: self.calls.append(("create_repo", repo_id, kw)))
        monkeypatch.setattr(HfApi, "create_branch", lambda api, repo_id, **kw: self.calls.append(("create_branch", repo_id, kw)))

        def create_commit(api, repo_id, operations, **kw):
            self.calls.append(("create_commit", repo_id, kw))
            for op in operations:
                source = op.path_or_fileobj
                self.files[op.path_in_repo] = source if isinstance(source, bytes) else open(source, "rb").read()
            return f"https://huggingface.co/{repo_id}/commit/0"

        monkeypatch.setattr(HfApi, "create_commit", create_commit)


def hf_cli(argv):
    import argparse

    from palm.hf.cli import add_commands

    parser = argparse.ArgumentParser(prog="palm")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


def test_push_sends_an_exported_model_and_its_card_to_the_hub(finetuned, monkeypatch, capsys):
    hub = StandInHub(monkeypatch)
    hf_cli(["push", str(finetuned / "run" / "model"), "you/palm-chat", "--private", "--revision", "v1", "--license", "mit"])
    assert [c[0] for c in hub.calls] == ["create_repo", "create_branch", "create_commit"]
    assert hub.calls[0][2]["private"] is True and hub.calls[1][2]["branch"] == "v1"
    assert hub.calls[2][2]["revision"] == "v1"
    assert {"config.json", "model.safetensors", "modeling_palm.py", "configuration_palm.py", "tokenizer.json",
            "chat_template.jinja", "README.md"} <= set(hub.files)
    assert json.loads(hub.files["config.json"])["model_type"] == "palm"  # exported on the way
    card = hub.files["README.md"].decode()
    metadata = card.split("---")[1]
    assert "library_name: transformers" in metadata and "license: mit" in metadata and "- palm" in metadata
    last_eval = [json.loads(line) for line in (finetuned / "run" / "metrics.jsonl").read_text().splitlines()
                 if "val_loss" in line][-1]
    assert f"{last_eval['val_loss']:.4f}" in card and f"{last_eval['val_ppl']:.2f}" in card
    assert 'palm.load("you/palm-chat")' in card and 'AutoModelForCausalLM.from_pretrained("you/palm-chat"' in card
    assert "you/palm-chat" in capsys.readouterr().out

    hub = StandInHub(monkeypatch)
    hf_cli(["push", str(finetuned / "run" / "adapter"), "you/palm-lora"])
    config = json.loads(hub.files["adapter_config.json"])
    assert "fused_parts" not in config and config["rank_pattern"]["fused_attn_ff_proj"] == 16
    assert "library_name: peft" in hub.files["README.md"].decode()


def test_push_without_a_hub_is_one_line(exported):
    # HF_HUB_OFFLINE=1 (conftest): huggingface_hub refuses, as it would without a network or a token
    with pytest.raises(PalmError, match=r"^could not push to the Hugging Face Hub repo you/x \(.*\); log in") as e:
        from palm.hf.push import push

        push(exported["plain"], "you/x")
    assert "\n" not in str(e.value)


def test_export_refuses_to_overwrite(exported, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(PalmError, match="already holds files that palm did not write"):
        export_hf(str(exported["plain"].parent / "plain-palm"), tmp_path / "out", tokenizer="bytes", overwrite=True)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    with pytest.raises(PalmError, match="holds the input"):
        export_hf(str(exported["plain"].parent / "plain-palm"), exported["plain"].parent, tokenizer="bytes", overwrite=True)
    with pytest.raises(PalmError, match="cannot tell which tokenizer"):
        export_hf(str(exported["plain"].parent / "plain-palm"), tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_train_push_to_uploads_the_final_model(monkeypatch, capsys, tmp_path):
    from palm.cli import main

    hub = StandInHub(monkeypatch)
    (tmp_path / "corpus.txt").write_text("def f(x):\n    return x + 1\n" * 200)
    palm.save_pretrained(PaLM(PaLMConfig(num_tokens=257, dim=32, depth=1, heads=2, dim_head=16, max_seq_len=64)), tmp_path / "init")
    assert main(["train", "--init_from", str(tmp_path / "init"), "--data", str(tmp_path / "corpus.txt"), "--tokenizer", "bytes",
                 "--out_dir", str(tmp_path / "run"), "--max_steps", "2", "--batch_size", "2", "--seq_len", "32",
                 "--samples", "0", "--peak_tflops", "1", "--quiet", "--push_to", "you/tiny", "--private"]) == 0
    assert [c[0] for c in hub.calls] == ["create_repo", "create_commit"] and hub.calls[0][2]["private"] is True
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(hub.files)
    assert "pushed " in capsys.readouterr().out
