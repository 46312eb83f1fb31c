"""Bad input across every command: each row must end with its own one-line error and a non-zero
exit, print no traceback, and leave every file the user had byte-for-byte as it was."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import CORPUS, train_bpe, write_corpus
from palm import PaLM, PaLMConfig, save_pretrained
from palm.cli import main

SMALL_BYTES = PaLMConfig(num_tokens=257, dim=32, depth=1, heads=2, dim_head=16, max_seq_len=128)
TRAIN = ["--max_steps", "2", "--batch_size", "2", "--seq_len", "32", "--save_every", "1", "--eval_every", "1",
         "--samples", "0", "--peak_tflops", "1", "--quiet"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """What a user has: a model, a corpus, a dataset built from it (bytes) and one built with a
    BPE tokenizer, a finished run, instruction data, YAML files, and a directory of their own."""
    root = tmp_path_factory.mktemp("user")
    torch.manual_seed(0)
    save_pretrained(PaLM(SMALL_BYTES), root / "model")
    write_corpus(root / "corpus", 4)
    (root / "bpe").mkdir()
    tokenizer = train_bpe([CORPUS], root / "bpe")
    for name, tok in (("dataset", "bytes"), ("bpe-dataset", str(tokenizer))):
        assert main(["build-dataset", "--dataset_name", str(root / "corpus"), "--output", str(root / name),
                     "--tokenizer", tok, "--seq_len", "32", "--quiet"]) == 0
    assert main(["train", "--init_from", str(root / "model"), "--data", str(root / "dataset"),
                 "--out_dir", str(root / "runs" / "done"), *TRAIN]) == 0
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("my notes\n")
    (root / "mine" / "config.yaml").write_text("lr: 1e-3\n")
    (root / "eight.yaml").write_text("batch_size: eight\n")
    (root / "unknown.yaml").write_text("learning_rate: 0.1\n")
    (root / "list.yaml").write_text("- lr\n")
    (root / "no-output.jsonl").write_text(json.dumps({"instruction": "a"}) + "\n")
    (root / "bad-role.jsonl").write_text(json.dumps({"messages": [{"role": "robot", "content": "hi"}]}) + "\n")
    (root / "good.jsonl").write_text("".join(json.dumps({"instruction": f"say {i}", "output": f"{i}"}) + "\n" for i in range(8)))
    (root / "notes.pt").write_text("not a checkpoint\n")
    return root


# (id, argv with {w} for the workspace, words the error must contain, exit code)
ROWS = [
    # build-dataset
    ("dataset-over-its-input", ["build-dataset", "--dataset_name", "{w}/corpus", "--output", "{w}/corpus", "--overwrite", "--tokenizer", "bytes"], "holds the input", 1),
    ("dataset-over-a-parent-of-its-input", ["build-dataset", "--dataset_name", "{w}/corpus", "--output", "{w}", "--overwrite", "--tokenizer", "bytes"], "holds the input", 1),
    ("dataset-over-users-files", ["build-dataset", "--dataset_name", "{w}/corpus", "--output", "{w}/mine", "--overwrite", "--tokenizer", "bytes"], "did not write", 1),
    ("dataset-exists", ["build-dataset", "--dataset_name", "{w}/corpus", "--output", "{w}/dataset", "--tokenizer", "bytes"], "--overwrite", 1),
    ("dataset-output-is-a-file", ["build-dataset", "--dataset_name", "{w}/corpus", "--output", "{w}/good.jsonl", "--tokenizer", "bytes"], "is a file", 1),
    ("dataset-all-held-out", ["build-dataset", "--dataset_name", "{w}/corpus", "--output", "{w}/new", "--val_docs", "1000", "--tokenizer", "bytes", "--seq_len", "32", "--quiet"], "none are left to train on", 1),
    ("dataset-negative-val-docs", ["build-dataset", "--dataset_name", "{w}/corpus", "--output", "{w}/new", "--val_docs", "-1", "--tokenizer", "bytes"], "--val_docs must be at least 0", 1),
    ("dataset-val-fraction-above-1", ["build-dataset", "--dataset_name", "{w}/corpus", "--output", "{w}/new", "--val_fraction", "1.5", "--tokenizer", "bytes"], "--val_fraction", 1),
    ("dataset-both-val-options", ["build-dataset", "--dataset_name", "{w}/corpus", "--output", "{w}/new", "--val_docs", "1", "--val_fraction", "0.5", "--tokenizer", "bytes"], "not both", 1),
    ("dataset-seq-len-1", ["build-dataset", "--dataset_name", "{w}/corpus", "--output", "{w}/new", "--seq_len", "1", "--tokenizer", "bytes"], "--seq_len must be at least 2", 1),
    ("dataset-no-destination", ["build-dataset", "--dataset_name", "{w}/corpus", "--tokenizer", "bytes"], "--output", 1),
    ("dataset-missing-local-file", ["build-dataset", "--dataset_name", "{w}/corpus/typo.txt", "--output", "{w}/new", "--tokenizer", "bytes"], "no such file or directory", 1),
    ("dataset-mistyped-local-dir", ["build-dataset", "--dataset_name", "runs/typo", "--output", "{w}/new", "--tokenizer", "bytes"], "no such file or directory", 1),
    ("dataset-missing-tokenizer-file", ["build-dataset", "--dataset_name", "{w}/corpus", "--output", "{w}/new", "--tokenizer", "./typo.json"], "no such file or directory", 1),
    ("dataset-not-a-number", ["build-dataset", "--dataset_name", "{w}/corpus", "--seq_len", "many"], "invalid int value", 2),
    # train
    ("train-negative-grad-clip", ["train", "--grad_clip", "-1"], "--grad_clip must be at least 0", 1),
    ("train-zero-steps", ["train", "--max_steps", "0"], "--max_steps must be at least 1", 1),
    ("train-negative-steps", ["train", "--max_steps", "-3"], "--max_steps must be at least 1", 1),
    ("train-nan-lr", ["train", "--lr", "nan"], "--lr must be a finite number", 1),
    ("train-zero-lr", ["train", "--lr", "0", "--min_lr", "0"], "--lr must be positive", 1),
    ("train-min-lr-above-lr", ["train", "--lr", "1e-3", "--min_lr", "1e-2"], "--min_lr", 1),
    ("train-negative-warmup", ["train", "--warmup_steps", "-1"], "--warmup_steps must be at least 0", 1),
    ("train-zero-batch", ["train", "--batch_size", "0"], "--batch_size must be at least 1", 1),
    ("train-infinite-weight-decay", ["train", "--weight_decay", "inf"], "--weight_decay must be a finite number", 1),
    ("train-unknown-precision", ["train", "--precision", "fp64"], "--precision must be one of", 1),
    ("train-unknown-optimizer", ["train", "--optimizer", "sgd"], "--optimizer must be one of", 1),
    ("train-yaml-word-for-number", ["train", "--config", "{w}/eight.yaml"], "option batch_size: expected a number", 1),
    ("train-yaml-unknown-option", ["train", "--config", "{w}/unknown.yaml"], "unknown training option", 1),
    ("train-yaml-not-a-mapping", ["train", "--config", "{w}/list.yaml"], "expected a mapping", 1),
    ("train-yaml-missing", ["train", "--config", "{w}/typo.yaml"], "--config", 1),
    ("train-over-a-finished-run", ["train", "--init_from", "{w}/model", "--data", "{w}/dataset", "--out_dir", "{w}/runs/done", *TRAIN], "already holds a run", 1),
    ("train-into-users-directory", ["train", "--init_from", "{w}/model", "--data", "{w}/dataset", "--out_dir", "{w}/mine", *TRAIN], "did not write", 1),
    ("train-overwrite-a-run-holding-its-data", ["train", "--init_from", "{w}/runs/done/model", "--data", "{w}/dataset", "--out_dir", "{w}/runs/done", "--overwrite", *TRAIN], "holds the input", 1),
    ("train-push-to-not-a-repo-id", ["train", "--push_to", "my model"], "--push_to must be a Hub repo id", 1),
    ("finetune-push-to-not-a-repo-id", ["finetune", "--checkpoint", "{w}/model", "--push_to", "a/b/c"], "--push_to must be a Hub repo id", 1),
    ("train-resume-and-overwrite", ["train", "--out_dir", "{w}/runs/done", "--resume", "auto", "--overwrite"], "give one of them", 1),
    ("train-unwritable-out-dir", ["train", "--init_from", "{w}/model", "--data", "{w}/dataset", "--out_dir", "/proc/palm-run", *TRAIN], "--out_dir /proc/palm-run", 1),
    ("train-tokenizer-unlike-the-datasets", ["train", "--init_from", "{w}/model", "--data", "{w}/bpe-dataset", "--tokenizer", "bytes", "--out_dir", "{w}/new", *TRAIN], "was tokenized with", 1),
    ("train-from-a-run-directory", ["train", "--init_from", "{w}/runs/done", "--data", "{w}/dataset", "--out_dir", "{w}/new", *TRAIN], "its model is", 1),
    ("train-from-a-checkpoint-directory", ["train", "--init_from", "{w}/runs/done/checkpoints/step-000001", "--data", "{w}/dataset", "--out_dir", "{w}/new", *TRAIN], "its model is", 1),
    ("train-seq-len-above-the-models", ["train", "--init_from", "{w}/model", "--data", "{w}/dataset", "--out_dir", "{w}/new", *TRAIN, "--seq_len", "256"], "exceeds the model's max_seq_len", 1),
    ("train-resume-from-nothing", ["train", "--resume", "{w}/mine", "--out_dir", "{w}/new"], "not a complete palm training checkpoint", 1),
    ("train-boolean-with-a-value", ["train", "--compile=yes"], "ignored explicit argument", 2),
    # generate
    ("generate-nan-temperature", ["generate", "x", "--checkpoint", "{w}/model", "--tokenizer", "bytes", "--temperature", "nan"], "temperature must be >= 0 and finite", 1),
    ("generate-negative-new-tokens", ["generate", "x", "--checkpoint", "{w}/model", "--tokenizer", "bytes", "--max_new_tokens", "-5"], "--max_new_tokens must be at least 1", 1),
    ("generate-cuda-on-a-cpu-build", ["generate", "x", "--checkpoint", "{w}/model", "--tokenizer", "bytes", "--device", "cuda"], "--device cuda", 1),
    ("generate-unknown-device", ["generate", "x", "--checkpoint", "{w}/model", "--tokenizer", "bytes", "--device", "tpu"], "--device tpu", 1),
    ("generate-mistyped-checkpoint", ["generate", "x", "--checkpoint", "runs/tiny-typo", "--tokenizer", "bytes"], "runs/tiny-typo: no such file or directory", 1),
    ("generate-top-p-zero", ["generate", "x", "--checkpoint", "{w}/model", "--tokenizer", "bytes", "--top_p", "0"], "top_p must be in (0, 1]", 1),
    ("generate-filter-thres-above-1", ["generate", "x", "--checkpoint", "{w}/model", "--tokenizer", "bytes", "--filter_thres", "1.5"], "filter_thres must be in [0, 1)", 1),
    ("generate-no-samples", ["generate", "x", "--checkpoint", "{w}/model", "--tokenizer", "bytes", "--num_samples", "0"], "--num_samples must be at least 1", 1),
    ("generate-empty-prompt", ["generate", "", "--checkpoint", "{w}/model", "--tokenizer", "bytes"], "empty prompt", 1),
    ("generate-prompt-beyond-context", ["generate", "x" * 200, "--checkpoint", "{w}/model", "--tokenizer", "bytes"], "context", 1),
    ("generate-not-a-checkpoint", ["generate", "x", "--checkpoint", "{w}/notes.pt", "--tokenizer", "bytes"], "not a readable PyTorch checkpoint", 1),
    ("generate-draft-k-zero", ["generate", "x", "--checkpoint", "{w}/model", "--tokenizer", "bytes", "--draft", "{w}/model", "--draft_k", "0"], "--draft_k must be at least 1", 1),
    ("generate-missing-draft", ["generate", "x", "--checkpoint", "{w}/model", "--tokenizer", "bytes", "--draft", "{w}/typo"], "no such file or directory", 1),
    ("generate-draft-with-samples", ["generate", "x", "--checkpoint", "{w}/model", "--tokenizer", "bytes", "--draft", "{w}/model", "--num_samples", "2"], "--num_samples 1", 1),
    ("generate-unknown-flag", ["generate", "x", "--temprature", "0.5"], "unrecognized arguments", 2),
    # info and convert
    ("info-missing-file", ["info", "{w}/typo.pt"], "no such file or directory", 1),
    ("info-run-directory", ["info", "{w}/runs/done"], "its model is", 1),
    ("info-nothing", ["info"], "or --system", 1),
    ("convert-onto-a-model", ["convert", "{w}/model", "{w}/model"], "already holds a model", 1),
    ("convert-missing-source", ["convert", "{w}/typo", "{w}/out.pt"], "no such file or directory", 1),
    # finetune
    ("finetune-no-checkpoint", ["finetune", "--data", "{w}/good.jsonl"], "--checkpoint is required", 1),
    ("finetune-rank-zero", ["finetune", "--checkpoint", "{w}/model", "--lora_r", "0"], "--lora_r must be at least 1", 1),
    ("finetune-int8-full", ["finetune", "--checkpoint", "{w}/model", "--quantize", "int8", "--method", "full"], "--quantize int8", 1),
    ("finetune-record-without-output", ["finetune", "--checkpoint", "{w}/model", "--data", "{w}/no-output.jsonl", "--out_dir", "{w}/new", *TRAIN], "no-output.jsonl line 1", 1),
    ("finetune-unknown-role", ["finetune", "--checkpoint", "{w}/model", "--data", "{w}/bad-role.jsonl", "--out_dir", "{w}/new", *TRAIN], "robot", 1),
    ("finetune-targets-match-nothing", ["finetune", "--checkpoint", "{w}/model", "--data", "{w}/good.jsonl", "--lora_targets", "wq", "--out_dir", "{w}/new", *TRAIN], "wq", 1),
    ("finetune-over-its-base", ["finetune", "--checkpoint", "{w}/runs/done/model", "--data", "{w}/good.jsonl", "--out_dir", "{w}/runs/done", "--overwrite", *TRAIN], "holds the input", 1),
    ("finetune-negative-dropout", ["finetune", "--checkpoint", "{w}/model", "--lora_dropout", "-0.1"], "--lora_dropout", 1),
    # eval, export, push, serve
    ("eval-missing-checkpoint", ["eval", "--checkpoint", "{w}/typo"], "no such file or directory", 1),
    ("eval-stride-above-seq-len", ["eval", "--checkpoint", "{w}/model", "--tokenizer", "bytes", "--seq_len", "32", "--stride", "64", "--data", "{w}/corpus"], "--stride", 1),
    ("eval-lengths-not-numbers", ["eval", "--checkpoint", "{w}/model", "--tokenizer", "bytes", "--lengths", "1,x"], "--lengths", 1),
    ("export-over-its-source", ["export", "hf", "{w}/model", "{w}", "--tokenizer", "bytes", "--overwrite"], "holds the input", 1),
    ("export-over-users-files", ["export", "hf", "{w}/model", "{w}/mine", "--tokenizer", "bytes", "--overwrite"], "did not write", 1),
    ("export-missing-source", ["export", "hf", "{w}/typo", "{w}/new"], "no such file or directory", 1),
    ("push-missing-directory", ["push", "{w}/typo", "me/repo"], "no such", 1),
    ("serve-missing-checkpoint", ["serve", "--checkpoint", "{w}/typo"], "no such file or directory", 1),
    ("serve-no-batch", ["serve", "--checkpoint", "{w}/model", "--tokenizer", "bytes", "--max_batch_size", "0"], "--max_batch_size must be at least 1", 1),
    ("serve-bad-port", ["serve", "--checkpoint", "{w}/model", "--tokenizer", "bytes", "--port", "-3"], "--port", 1),
    # chat
    ("chat-missing-checkpoint", ["chat", "--checkpoint", "{w}/typo"], "no such file or directory", 1),
    ("chat-negative-temperature", ["chat", "--checkpoint", "{w}/model", "--temperature", "-1"], "temperature", 1),
    ("chat-unknown-prompt-style", ["chat", "--checkpoint", "{w}/model", "--prompt_style", "vicuna"], "vicuna", 1),
]


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*")) if p.name != ".lock"}


def test_the_table_covers_every_command():
    assert len(ROWS) >= 40 and len({r[0] for r in ROWS}) == len(ROWS)
    assert {r[1][0] for r in ROWS} == {"build-dataset", "train", "generate", "info", "convert", "finetune", "chat",
                                       "eval", "export", "push", "serve"}


@pytest.mark.parametrize("argv, expected, code", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_is_one_line_and_touches_nothing(workspace, argv, expected, code, capsys, monkeypatch):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    (Path.cwd() / "runs").mkdir()  # so that runs/typo looks local, as it does in a project directory
    monkeypatch.setattr("sys.stdin", open("/dev/null"))
    before = snapshot(workspace)
    try:
        exit_code = main([arg.replace("{w}", str(workspace)) for arg in argv])
    except SystemExit as e:  # argparse
        exit_code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_code == code and len(lines) == 1, err
    assert expected in lines[0] and "Traceback" not in err, err
    after = snapshot(workspace)
    assert {name: after.get(name) for name in before} == before
    shutil.rmtree(workspace / "new", ignore_errors=True)  # what a failed start leaves (a run's marker)
