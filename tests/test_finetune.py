import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import palm
from palm import PaLM, PaLMConfig
from palm.cli import main
from palm.training.config import FinetuneConfig
from palm.training.finetune import Finetuning, finetune, reply_loss
from palm.training.loop import run

SMALL_BYTES = PaLMConfig(num_tokens=257, dim=64, depth=2, heads=4, dim_head=16, max_seq_len=256)
PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small random byte-level model and 24 short instruction records."""
    root = tmp_path_factory.mktemp("finetune")
    torch.manual_seed(0)
    palm.save_pretrained(PaLM(SMALL_BYTES), root / "base")
    rows = [{"instruction": f"Add {a} and {b}.", "output": str(a + b)} for a in range(4) for b in range(6)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def options(setup, out_dir, **overrides):
    values = dict(checkpoint=str(setup / "base"), data=str(setup / "data.jsonl"), val_fraction=0.25, tokenizer="bytes",
                  out_dir=str(out_dir), max_steps=8, batch_size=4, seq_len=64, prompt_style="flan", lr=1e-2, min_lr=1e-3,
                  warmup_steps=1,
                  save_every=3, eval_every=4, log_every=4, samples=0, peak_tflops=1.0, lora_dropout=0.0)
    values.update(overrides)
    return values


def records(out_dir: Path, key: str = "loss") -> dict[int, dict]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if key in r}


def test_the_loss_is_the_mean_over_reply_tokens_only(setup, tmp_path):
    """The first step's loss, computed by hand: each example rendered as Alpaca's template,
    scored by a full forward pass, averaged over its reply bytes and end-of-text token."""
    rows = [json.loads(line) for line in (setup / "data.jsonl").read_text().splitlines()]
    (tmp_path / "four.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    finetune(FinetuneConfig(**options(setup, tmp_path / "run", data=str(tmp_path / "four.jsonl"), val_fraction=None,
                                      method="full", max_steps=1, prompt_style="alpaca", seq_len=192)), progress=False)
    model = palm.load(setup / "base")
    total, count = 0.0, 0
    for row in rows[:4]:
        prompt = (PREAMBLE + f"### Instruction:\n{row['instruction']}\n\n### Response:\n").encode()
        ids = list(prompt) + list(row["output"].encode()) + [256]
        with torch.no_grad():
            logprobs = model(torch.tensor([ids[:-1]]))[0].log_softmax(-1)
        for position in range(len(prompt) - 1, len(ids) - 1):  # predicting each reply token and EOS
            total -= logprobs[position, ids[position + 1]].item()
            count += 1
    assert records(tmp_path / "run")[1]["loss"] == pytest.approx(total / count, abs=1e-6)


def test_prompt_tokens_get_no_gradient(setup):
    task = Finetuning(FinetuneConfig(**options(setup, None, method="full")))
    model = task.build_model()  # the loop's order: the model (and tokenizer), then the data
    batch = next(task.training_batches(model, 0, 1))
    logits = model(batch["input_ids"])
    logits.retain_grad()
    F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100).backward()
    learned = batch["labels"] != -100
    assert logits.grad[~learned].abs().max() == 0 and logits.grad[learned].abs().amax(-1).min() > 0
    torch.testing.assert_close(reply_loss(model, batch["input_ids"], batch["labels"]),
                               F.cross_entropy(logits[learned], batch["labels"][learned]))


@pytest.fixture(scope="module")
def lora_run(setup):
    out = setup / "lora"
    config = FinetuneConfig(**options(setup, out))
    task = Finetuning(config)
    run(config, task, progress=False)
    return out, task


def test_lora_trains_only_the_adapters_and_saves_both_forms(setup, lora_run):
    out, task = lora_run
    base = palm.load(setup / "base").state_dict()
    trained = {k.replace(".base_layer.", "."): v for k, v in task.peft_model.get_base_model().state_dict().items()
               if "lora_" not in k}
    assert sorted(trained) == sorted(base)
    assert all(torch.equal(trained[k], base[k]) for k in base)  # the base weights did not move
    b = [p for n, p in task.peft_model.named_parameters() if "lora_B" in n]
    assert b and all(p.abs().max() > 0 for p in b)  # zero at the start: training moved them
    losses = [r["loss"] for r in records(out).values()]
    assert losses[-1] < losses[0]
    # the adapter (peft's format) and the merged model give the same logits
    tokens = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapter, merged = palm.load(out / "adapter"), palm.load(out / "model")
        torch.testing.assert_close(merged(tokens), adapter(tokens), atol=1e-5, rtol=0)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str((setup / "base").resolve())
    assert json.loads((out / "model" / "prompt_style.json").read_text()) == {"prompt_style": "flan"}


def test_lora_checkpoints_hold_the_adapter_only(lora_run):
    out, _ = lora_run
    checkpoint = out / "checkpoints" / "step-000006"
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k for k in keys)
    assert (checkpoint / "model" / "adapter_model.safetensors").is_file()
    assert not (checkpoint / "model" / "model.safetensors").exists()
    full = (out / "model" / "model.safetensors").stat().st_size
    assert sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file()) < 0.2 * full


def test_lora_resume_reproduces_the_uninterrupted_run(setup, lora_run, tmp_path, monkeypatch):
    import palm.training.loop

    saves = []
    real_save = palm.training.loop.save_checkpoint

    def save_then_stop(*args, **kwargs):
        saves.append(real_save(*args, **kwargs))
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(palm.training.loop, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        finetune(FinetuneConfig(**options(setup, tmp_path)), progress=False)
    monkeypatch.undo()
    assert max(records(tmp_path)) == 6
    finetune(FinetuneConfig(**options(setup, tmp_path, resume="auto")), progress=False)
    expected, got = records(lora_run[0]), records(tmp_path)
    assert sorted(got) == sorted(expected) == list(range(1, 9))
    assert all(got[s]["loss"] == pytest.approx(expected[s]["loss"], abs=1e-5) for s in expected)
    assert records(tmp_path, "val_loss")[8]["val_loss"] == pytest.approx(records(lora_run[0], "val_loss")[8]["val_loss"], abs=1e-5)
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), framework="pt") as a, \
            safe_open(str(lora_run[0] / "adapter" / "adapter_model.safetensors"), framework="pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(torch.allclose(a.get_tensor(k), b.get_tensor(k), atol=1e-5) for k in a.keys())


def test_lora_over_int8_trains(setup, tmp_path):
    finetune(FinetuneConfig(**options(setup, tmp_path, quantize="int8", lora_targets="all", max_steps=6)), progress=False)
    losses = [r["loss"] for r in records(tmp_path).values()]
    assert losses[-1] < losses[0] and all(math.isfinite(x) for x in losses)
    merged = palm.load(tmp_path / "model")
    assert merged.token_emb.weight.dtype == torch.float32
    # merged onto the fp32 originals: the adapter on the fp32 base gives the same logits
    tokens = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens), palm.load(tmp_path / "adapter")(tokens), atol=1e-5, rtol=0)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_an_int8_base_keeps_nothing_of_the_full_precision_file(setup, tmp_path):
    """Quantized as it is loaded, the base holds no mapping of the checkpoint (a mapped file's
    pages would stay resident for the whole run, kept by the weights that stay full precision)."""
    import gc
    import shutil

    shutil.copytree(setup / "base", tmp_path / "base")  # a file no other test's model maps
    task = Finetuning(FinetuneConfig(**options(setup, None, checkpoint=str(tmp_path / "base"), quantize="int8")))
    model = task.build_model()
    gc.collect()
    assert str((tmp_path / "base" / "model.safetensors").resolve()) not in Path("/proc/self/maps").read_text()
    assert model.get_base_model().layers[0].fn.fused_attn_ff_proj.base_layer.weight.dtype == torch.int8


def test_chat_data_learns_every_assistant_turn(setup, tmp_path):
    conversation = {"messages": [{"role": "system", "content": "Count."}, {"role": "user", "content": "1"},
                                 {"role": "assistant", "content": "2"}, {"role": "user", "content": "3"},
                                 {"role": "assistant", "content": "4"}]}
    (tmp_path / "chat.jsonl").write_text((json.dumps(conversation) + "\n") * 8)
    config = FinetuneConfig(**options(setup, tmp_path / "run", data=str(tmp_path / "chat.jsonl"), val_fraction=None,
                                      prompt_style="chatml", seq_len=200, max_steps=2))
    task = Finetuning(config)
    batch = next(task.training_batches(task.build_model(), 0, 1))
    learned = bytes(t for t in batch["labels"][0].tolist() if 0 <= t < 256)
    assert learned == b"2<|im_end|>4<|im_end|>" and (batch["labels"][0] == 256).sum() == 2


@pytest.mark.parametrize("extra, message", [
    (["--lora_r", "0"], "--lora_r must be at least 1"),
    (["--quantize", "int8", "--method", "full"], "goes with --method lora"),
    (["--lora_targets", "q,wq"], "unknown LoRA target 'wq'"),
    (["--method", "sft"], "--method must be one of lora, full"),
    (["--prompt_style", "vicuna"], "unknown prompt style 'vicuna'"),
    (["--columns", "instruction"], "is not ours=theirs"),
    (["--val_fraction", "1.5"], "--val_fraction must be in (0, 1)"),
])
def test_bad_settings_are_one_line_and_touch_nothing(setup, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    (tmp_path / "keep.txt").write_text("mine")
    argv = ["finetune", "--checkpoint", str(setup / "base"), "--data", str(setup / "data.jsonl"), "--seq_len", "64",
            "--out_dir", str(out), "--quiet", *extra]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"] and (tmp_path / "keep.txt").read_text() == "mine"


def test_bad_data_is_one_line(setup, tmp_path, capsys):
    (tmp_path / "missing.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    (tmp_path / "role.jsonl").write_text(json.dumps({"messages": [{"role": "narrator", "content": "x"}]}) + "\n")
    long = {"instruction": "x" * 500, "output": "y"}
    (tmp_path / "long.jsonl").write_text(json.dumps(long) + "\n")
    no_eos = tmp_path / "tok"
    no_eos.mkdir()
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    tokenizer.save(str(no_eos / "tokenizer.json"))
    cases = [
        (["--data", str(tmp_path / "missing.jsonl")], "missing.jsonl line 2: missing the field 'output'"),
        (["--data", str(tmp_path / "role.jsonl")], "role.jsonl line 1: message 1 has the unknown role 'narrator'"),
        (["--data", str(tmp_path / "long.jsonl")], "no example fits --seq_len 64"),
        (["--data", str(tmp_path / "nowhere.jsonl")], "no such file or directory"),
        (["--data", str(setup / "data.jsonl"), "--tokenizer", str(no_eos)], "has no end-of-text token"),
        (["--data", str(setup / "data.jsonl")], "--checkpoint is required"),
    ]
    for extra, message in cases:
        checkpoint = [] if "required" in message else ["--checkpoint", str(setup / "base")]
        assert main(["finetune", *checkpoint, "--seq_len", "64", "--out_dir", str(tmp_path / "run"), "--quiet", *extra]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (message, err)
    assert not (tmp_path / "run").exists()


def test_full_fine_tuning_changes_every_weight_and_keeps_the_dtype(setup, tmp_path):
    bf16 = tmp_path / "bf16-base"
    palm.save_pretrained(palm.load(setup / "base", dtype="bf16"), bf16)
    finetune(FinetuneConfig(**options(setup, tmp_path / "run", checkpoint=str(bf16), method="full", max_steps=3,
                                      save_every=100, eval_every=100)), progress=False)
    tuned, base = palm.load(tmp_path / "run" / "model"), palm.load(bf16)
    assert tuned.token_emb.weight.dtype == torch.bfloat16  # cast once, back to the base's dtype
    assert not torch.equal(tuned.layers[0].fn.attn_out.weight, base.layers[0].fn.attn_out.weight)
    assert not (tmp_path / "run" / "adapter").exists()
