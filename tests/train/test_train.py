"""Whole training runs on CPU with tiny random models and the small test tokenizer."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import (
    TINY,
    build_small_tokenizer,
    free_port,
    metrics,
    tiny_config,
    train_interrupted,
)

from essence.data.batching import collate
from essence.data.pipeline import prepare
from essence.errors import EssenceError
from essence.teacher.sources import OnlineTeacher, check_vocabularies
from essence.train.run import train
from essence.train.step import DistillStep, combine, loss_weights, step_token_counts


def test_tiny_run_learns_and_accounts(tokenizer_dir, data_file, tmp_path):
    full = train(tiny_config(tokenizer_dir, data_file, "train.epochs=6"), tmp_path / "full")
    losses = [m["loss"] for m in metrics(tmp_path / "full")]
    assert losses[-1] < losses[0] - 0.3
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary == json.loads(json.dumps(full))
    for key in ("student_tokens", "padding_tokens", "nll_tokens", "kd_tokens", "student_flops",
                "teacher_flops", "wall_time_s", "time_per_step_s", "peak_memory_bytes",
                "tokens_per_s", "final_train_loss"):
        assert summary[key] is not None, key
    assert (tmp_path / "full" / "config.yaml").is_file()
    assert (tmp_path / "full" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "full" / "model" / "tokenizer.json").is_file()
    half = train(tiny_config(tokenizer_dir, data_file, "train.epochs=6",
                             "data.truncation.lsp=0.5"), tmp_path / "half")
    token_ratio = half["student_tokens"] / full["student_tokens"]
    flop_ratio = half["total_flops"] / full["total_flops"]
    assert 0.45 < token_ratio < 0.52 and 0.3 < flop_ratio < 0.52
    assert half["kd_tokens"] < full["kd_tokens"]


def test_accumulation_is_equivalent_to_a_big_batch(tokenizer_dir, data_file):
    config = tiny_config(tokenizer_dir, data_file)
    tokenizer = build_small_tokenizer()
    examples = prepare(config.data, tokenizer).examples[:8]
    from essence.models.loading import random_causal_lm

    student = random_causal_lm(TINY, len(tokenizer), seed=0)
    teacher = OnlineTeacher(random_causal_lm(dict(TINY, hidden_size=24), len(tokenizer), 1),
                            torch.device("cpu"))
    step = DistillStep(student, config.loss, len(tokenizer))

    def gradient(groups):
        student.zero_grad()
        batches = [collate(g, tokenizer.pad_token_id) for g in groups]
        weights = loss_weights(*step_token_counts(batches), config.loss.kd_ratio)
        for b in batches:
            out = step(b.input_ids, b.attention_mask, b.nll_mask, b.kd_mask,
                       teacher(b.input_ids, b.attention_mask), weights)
            combine(out, weights).backward()
        return torch.cat([p.grad.flatten() for p in student.parameters()])

    one_big = gradient([examples])
    many_small = gradient([[e] for e in examples])
    torch.testing.assert_close(many_small, one_big, rtol=1e-4, atol=1e-6)


def test_kill_and_resume_equals_uninterrupted(tokenizer_dir, data_file, tmp_path):
    overrides = ["train.max_steps=6", "train.save_every=2", "train.epochs=3"]
    train(tiny_config(tokenizer_dir, data_file, *overrides), tmp_path / "straight")
    # steps 1-3 done, checkpoint at 2: die in the middle of step 4
    train_interrupted(tiny_config(tokenizer_dir, data_file, *overrides), tmp_path / "killed",
                      after_step=3)
    assert (tmp_path / "killed" / "checkpoints" / "latest").read_text().strip() == "step-000002"
    resumed = train(tiny_config(tokenizer_dir, data_file, *overrides), tmp_path / "killed",
                    resume=True)
    straight = metrics(tmp_path / "straight")
    again = metrics(tmp_path / "killed")
    assert [m["step"] for m in again] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(straight, again):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-9)
    assert resumed["student_tokens"] == json.loads(
        (tmp_path / "straight" / "summary.json").read_text())["student_tokens"]


def test_non_finite_loss_stops_and_keeps_checkpoint(tokenizer_dir, data_file, tmp_path):
    config = tiny_config(tokenizer_dir, data_file, "train.lr=1e30", "train.save_every=1",
                         "train.max_grad_norm=null", "train.max_steps=5")
    with pytest.raises(EssenceError, match=r"non-finite loss at step \d+ \(records \[.*intact"):
        train(config, tmp_path / "nan")
    latest = (tmp_path / "nan" / "checkpoints" / "latest").read_text().strip()
    assert (tmp_path / "nan" / "checkpoints" / latest / "model.safetensors").is_file()


def test_full_disk_at_checkpoint_keeps_previous(tokenizer_dir, data_file, tmp_path, monkeypatch):
    config = tiny_config(tokenizer_dir, data_file, "train.save_every=1", "train.max_steps=3")
    from transformers import PreTrainedModel

    original = PreTrainedModel.save_pretrained
    calls = {"n": 0}

    def flaky(self, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", flaky)
    with pytest.raises(EssenceError, match="No space left on device.*step-000001 is intact"):
        train(config, tmp_path / "disk")
    root = tmp_path / "disk" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-000001"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000001"]


def test_bad_models_and_tokenizers(tokenizer_dir, data_file, tmp_path, qwen3_tokenizer):
    with pytest.raises(EssenceError, match="student path .* does not exist"):
        train(tiny_config(tokenizer_dir, data_file, "model.student_init=null",
                          "model.student=./no/such/model"), tmp_path / "x")
    with pytest.raises(EssenceError, match="different vocabularies"):
        check_vocabularies(build_small_tokenizer(), qwen3_tokenizer, "qwen3")
    with pytest.raises(EssenceError, match="needs a teacher"):
        train(tiny_config(tokenizer_dir, data_file, "model.teacher_init=null"), tmp_path / "y")
    with pytest.raises(EssenceError, match="too few for one optimizer step"):
        train(tiny_config(tokenizer_dir, data_file, "train.batch_size=64"), tmp_path / "z")


def test_validation_loss_is_reported(tokenizer_dir, data_file, tmp_path):
    summary = train(tiny_config(tokenizer_dir, data_file, "data.val_fraction=0.25",
                                "train.val_every=2", "train.max_steps=4"), tmp_path / "val")
    assert summary["val_records"] == 2 and summary["final_val_loss"] > 0
    assert "val_loss" in metrics(tmp_path / "val")[1]


@pytest.mark.slow
def test_two_process_ddp_matches_accumulation(tokenizer_dir, data_file, tmp_path):
    common = ["train.max_steps=3", "train.batch_size=1", "train.epochs=1"]
    config_file = tmp_path / "c.yaml"
    from essence.config.load import save_config

    save_config(tiny_config(tokenizer_dir, data_file, *common), config_file)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
         "--dynamo_backend", "no", "-m", "essence", "train", str(config_file),
         "--out", str(tmp_path / "ddp")],
        check=True, env=env, capture_output=True, timeout=300,
    )
    single = train(tiny_config(tokenizer_dir, data_file, *common, "train.grad_accum=2"),
                   tmp_path / "single")
    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert ddp["processes"] == 2 and ddp["student_tokens"] == single["student_tokens"]
    for a, b in zip(metrics(tmp_path / "ddp"), metrics(tmp_path / "single")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
