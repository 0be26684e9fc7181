"""What a run promises: checked settings, accounting equal to what ran, unmixed settings on
resume and in sweeps, and an end-of-run evaluation that frees training memory first."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BENCHMARKS, free_port

from essence.config.load import load_config, save_config
from essence.errors import EssenceError
from essence.train.run import train

REPO = Path(__file__).resolve().parents[2]
TINY_YAML = REPO / "configs" / "tiny.yaml"
QUICK = ["train.progress=false", "train.max_steps=3"]


# ---------------------------------------------------------------------------------------------
# Every numeric value range-checked at load, one line naming key, value and range


@pytest.mark.parametrize(("override", "message"), [
    ("train.batch_size=0", r"train.batch_size=0 is out of range; valid range: ≥ 1"),
    ("train.grad_accum=0", r"train.grad_accum=0 is out of range; valid range: ≥ 1"),
    ("train.log_every=0", r"train.log_every=0 is out of range; valid range: ≥ 1"),
    ("train.lr=-1", r"train.lr=-1.0 is out of range; valid range: > 0"),
    ("train.lr=.nan", r"train.lr=nan is not a finite number"),
    ("train.lr=.inf", r"train.lr=inf is not a finite number"),
    ("train.epochs=0", r"train.epochs=0.0 is out of range; valid range: > 0"),
    ("train.epochs=-1", r"train.epochs=-1.0 is out of range"),
    ("train.max_steps=0", r"train.max_steps=0 is out of range; valid range: ≥ 1"),
    ("train.warmup_ratio=5", r"train.warmup_ratio=5.0 is out of range; valid range: \[0, 1\]"),
    ("train.cpu_threads=0", r"train.cpu_threads=0 is out of range"),
    ("train.max_grad_norm=0", r"train.max_grad_norm=0.0 is out of range; valid range: > 0"),
    ("loss.temperature=0", r"loss.temperature=0.0 is out of range; valid range: > 0"),
    ("loss.kd_ratio=1.5", r"loss.kd_ratio=1.5 is out of range; valid range: \[0, 1\]"),
    ("loss.kd_ratio=-0.5", r"loss.kd_ratio=-0.5 is out of range"),
    ("loss.chunk_size=0", r"loss.chunk_size=0 is out of range; valid range: ≥ 1"),
    ("loss.params.alpha=0.5", r"loss.params=\{'alpha': 0.5\}: divergence 'forward_kl' has no "
                              r"parameter 'alpha'; it takes no parameters"),
    ("data.val_fraction=1.5", r"data.val_fraction=1.5 is out of range; valid range: \[0, 1\)"),
    ("data.limit=0", r"data.limit=0 is out of range"),
    ("data.truncation.lsp=0", r"data.truncation.lsp=0.0 is out of range; valid range: \(0, 1\]"),
    ("eval.top_p=0", r"eval.top_p=0.0 is out of range; valid range: \(0, 1\]"),
    ("eval.n=0", r"eval.n=0 is out of range"),
    ("train.mixed_precision=fp16", r"train.mixed_precision='fp16' is not one of: auto, no, bf16"),
])
def test_bad_values_are_refused_at_load(override, message):
    with pytest.raises(EssenceError, match=message) as err:
        load_config(TINY_YAML, [override])
    assert "\n" not in str(err.value)


def test_yaml_no_reads_as_the_choice_no():
    assert load_config(TINY_YAML, ["train.mixed_precision=no"]).train.mixed_precision == "no"


def test_kd_without_a_teacher_is_refused_at_load():
    with pytest.raises(EssenceError, match=r"loss.kd_ratio=0.5 needs a teacher"):
        load_config(TINY_YAML, ["model.teacher_init=null"])


def test_a_student_with_another_vocabulary_is_refused(tmp_path, qwen3_tokenizer):
    """A student directory whose own tokenizer differs from model.tokenizer would train on
    the wrong ids."""
    from essence.models.loading import random_causal_lm

    config = load_config(TINY_YAML)
    student = random_causal_lm(config.model.student_init, 400, seed=0)
    student.save_pretrained(tmp_path / "student")
    qwen3_tokenizer.save_pretrained(tmp_path / "student")
    with pytest.raises(EssenceError, match=r"the student .* and model.tokenizer use different "
                                           r"vocabularies .* set model.tokenizer"):
        train(load_config(TINY_YAML, [*QUICK, "model.student_init=null",
                                      f"model.student={tmp_path / 'student'}"]), tmp_path / "run")


def test_profile_window_without_position_takes_the_left_half(capsys):
    from essence.cli import main

    code = main(["data", "profile", str(REPO / "configs" / "data" / "tiny_mix.jsonl"),
                 "--tokenizer", str(REPO / "configs" / "tokenizers" / "tiny-bpe"),
                 "--window", "0.5", "--json"])
    assert code in (0, None)
    report = json.loads(capsys.readouterr().out)
    assert any("window=0.5@left" in json.dumps(t) for t in report["truncations"])


# ---------------------------------------------------------------------------------------------
# Accounting equals execution


def test_no_teacher_is_loaded_or_charged_without_kd(tmp_path, monkeypatch):
    from essence.train import setup as trainer_setup

    built = []
    monkeypatch.setattr(trainer_setup, "OnlineTeacher",
                        lambda *a, **k: built.append(a) or pytest.fail("teacher built"))
    summary = train(load_config(TINY_YAML, [*QUICK, "loss.kd_ratio=0"]), tmp_path / "sft")
    assert not built
    assert summary["teacher_flops"] == 0 and summary["teacher_ran"] is False
    assert summary["kd_tokens"] == 0 and summary["teacher_params"] is None
    assert summary["total_flops"] == summary["student_flops"]


def test_head_flops_are_charged_for_the_supervised_rows(tmp_path):
    """Supervising only the answer projects fewer rows through the head: the student's FLOPs
    fall by exactly 3 · 2 · V · d per row not projected; the body's FLOPs do not change."""
    from essence.models.flops import FlopModel

    full = train(load_config(TINY_YAML, QUICK), tmp_path / "all")
    answer = train(load_config(TINY_YAML, [*QUICK, "data.supervision.nll=[answer]",
                                           "data.supervision.kd=[answer]"]), tmp_path / "answer")
    assert answer["student_tokens"] == full["student_tokens"]
    assert answer["nll_tokens"] < full["nll_tokens"]
    head = 400 * 32  # compared vocabulary × hidden size of tiny.yaml's student
    rows_saved = full["nll_tokens"] - answer["nll_tokens"]  # nll and kd rows coincide here
    assert full["student_flops"] - answer["student_flops"] == 6 * head * rows_saved
    teacher_head = 400 * 48
    assert full["teacher_flops"] - answer["teacher_flops"] == 2 * teacher_head * (
        full["kd_tokens"] - answer["kd_tokens"])
    # The formula itself: body + head rows + attention.
    model = FlopModel(params=100, head=10, layers=2, attn_dim=4)
    assert model.forward([5], [3]) == 2 * 100 * 5 + 2 * 10 * 3 + 4 * 2 * 4 * 25
    assert model.forward([5]) == model.forward([5], [5])
    assert model.train([5], [0]) == 3 * model.forward([5], [0])


# ---------------------------------------------------------------------------------------------
# Runs and sweeps never mix settings


def test_resume_refuses_other_settings_and_allows_the_schedule_keys(tmp_path):
    run = tmp_path / "run"
    train(load_config(TINY_YAML, [*QUICK, "train.save_every=1"]), run)
    with pytest.raises(EssenceError, match=r"started with other settings .*data.truncation.lsp: "
                                           r"1.0 → 0.5; train.batch_size: 3 → 2; train.lr"):
        train(load_config(TINY_YAML, ["train.progress=false", "train.max_steps=5",
                                      "train.lr=0.01", "train.batch_size=2",
                                      "data.truncation.lsp=0.5"]), run, resume=True)
    summary = train(load_config(TINY_YAML, ["train.progress=false", "train.max_steps=5",
                                            "train.log_every=2", "eval.n=2"]), run, resume=True)
    assert summary["steps"] == 5


def test_sweep_refuses_a_point_made_under_other_settings(tmp_path):
    from essence.experiments.sweep import run_sweep

    out = tmp_path / "sweep"
    grid = ["data.truncation.lsp=1.0"]
    assert run_sweep(str(TINY_YAML), grid, out, QUICK) == {"lsp-1.0": "complete"}
    with pytest.raises(EssenceError, match=r"sweep point lsp-1.0 was started with other settings"
                                           r".*train.lr: 0.003 → 0.001.*--overwrite"):
        run_sweep(str(TINY_YAML), grid, out, [*QUICK, "train.lr=0.001"])
    assert run_sweep(str(TINY_YAML), grid, out, QUICK) == {"lsp-1.0": "complete (skipped)"}
    redone = run_sweep(str(TINY_YAML), grid, out, [*QUICK, "train.lr=0.001"], overwrite=True)
    assert redone == {"lsp-1.0": "complete"}
    assert load_config(out / "lsp-1.0" / "config.yaml").train.lr == 0.001


# ---------------------------------------------------------------------------------------------
# End-of-run evaluation


def _eval_overrides() -> list[str]:
    return [f"eval.benches=[{BENCHMARKS / 'gsm8k_schema.jsonl'}]", "eval.limit=1",
            "eval.max_new_tokens=4", "eval.temperature=0", "eval.batch_size=1"]


def test_evaluation_starts_after_training_memory_is_freed(tmp_path, monkeypatch):
    import gc
    import weakref

    from essence.eval import run as eval_run
    from essence.train import loop as train_module

    refs, seen = {}, {}
    finish = train_module.Trainer.finish

    def watch(self):
        optimizer = self.optimizer.optimizer  # accelerate's wrapper holds the torch optimizer
        assert len(optimizer.state) > 0, "training left optimizer state to free"
        refs.update(optimizer=weakref.ref(optimizer), student=weakref.ref(self.models.student),
                    teacher=weakref.ref(self.models.teacher))
        finish(self)

    evaluate_with = eval_run.evaluate_with

    def spy(*args, **kwargs):
        gc.collect()
        optimizer, student = refs["optimizer"](), refs["student"]()
        seen["optimizer_state"] = 0 if optimizer is None else len(optimizer.state)
        seen["grads"] = 0 if student is None else sum(p.grad is not None for p in student.parameters())
        seen["teacher_alive"] = refs["teacher"]() is not None
        return evaluate_with(*args, **kwargs)

    monkeypatch.setattr(train_module.Trainer, "finish", watch)
    monkeypatch.setattr(eval_run, "evaluate_with", spy)
    summary = train(load_config(TINY_YAML, [*QUICK, *_eval_overrides()]), tmp_path / "run")
    assert seen == {"optimizer_state": 0, "grads": 0, "teacher_alive": False}
    assert "eval" in summary
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["eval"] == summary["eval"] and on_disk["steps"] == 3


@pytest.mark.slow
def test_two_processes_survive_an_evaluation_longer_than_the_collective_timeout(tmp_path):
    """The main process evaluates for 8 s with a 3 s collective timeout: the other process must
    not sit in a barrier until it times out (it leaves the process group first)."""
    config = load_config(TINY_YAML, [*QUICK, "train.batch_size=1", "train.collective_timeout_s=3",
                                     *_eval_overrides()])
    save_config(config, tmp_path / "c.yaml")
    env = dict(os.environ, OMP_NUM_THREADS="1", ESSENCE_TEST_EVAL_DELAY_S="8")
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
         "--dynamo_backend", "no", "-m", "essence", "train", str(tmp_path / "c.yaml"),
         "--out", str(tmp_path / "ddp")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["processes"] == 2 and "eval" in summary


def test_a_binary_data_file_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    from essence.train import loop as train_module

    data = tmp_path / "garbage.jsonl"
    data.write_bytes(bytes(range(256)) * 32)
    monkeypatch.setattr(train_module, "build_models",
                        lambda *a, **k: pytest.fail("models were built for a doomed run"))
    with pytest.raises(EssenceError, match=r"garbage.jsonl is binary"):
        train(load_config(TINY_YAML, [*QUICK, f"data.source={data}"]), tmp_path / "run")


@pytest.mark.parametrize(("argv", "message"), [
    (["data", "synth", "--n", "0", "--out", "x.jsonl"], "argument --n: 0 must be at least 1"),
    (["data", "profile", "d.jsonl", "--tokenizer", "t", "--limit", "0"], "--limit: 0 must be at least 1"),
    (["analyze", "d.jsonl", "--teacher", "t", "--limit", "x"], "--limit: 'x' is not a whole number"),
    (["study", "--train", "0"], "argument --train: 0 must be at least 1"),
    (["study", "--lsp", "1.0,1.5", "--out", "OUT"], r"--lsp '1.0,1.5': .*lsp must be within \(0, 1\]"),
])
def test_bad_command_counts_are_one_line(argv, message, tmp_path, capsys):
    from essence.cli import main

    argv = [str(tmp_path / "study") if a == "OUT" else a for a in argv]
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse refuses a bad type before the command runs
        code = exit.code
    assert code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err and not (tmp_path / "study" / "data").exists()
