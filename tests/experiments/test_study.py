"""`essence study`: the real-model study's config validates, and every stage runs two steps and resumes.

SmolLM2 itself is hours of CPU for the study (and a download), so the stages run here on a tiny
random Llama with SmolLM2's shape of things (ChatML template, a tokenizer with think tags): the
demo's tokenizer. What is checked is the driver: config, stages, resumption, report.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import essence
from essence.cli import main
from essence.config.load import load_config
from essence.errors import EssenceError
from essence.experiments.study import STUDY_CONFIG, run_study

DEMO_TOKENIZER = Path(essence.__file__).parent / "assets" / "demo" / "teacher"
TINY = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 3,
        "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 1024,
        "tie_word_embeddings": True}
TWO_STEPS = ["train.max_steps=2", "train.batch_size=2", "train.save_every=1", "eval.max_new_tokens=8",
             "eval.batch_size=4"]


def test_the_study_config_validates_with_the_stage_overrides(tmp_path):
    config = load_config(STUDY_CONFIG, ["model.student=s", "model.teacher=t", "data.source=d.jsonl"])
    assert config.loss.kd_ratio == 0.5 and config.train.lr == 5e-5 and config.data.system_prompt == "drop"
    teacher_stage = load_config(STUDY_CONFIG, ["model.student=s", "model.teacher=null", "loss.kd_ratio=0.0"])
    assert teacher_stage.model.teacher is None
    with pytest.raises(EssenceError, match="train.lr"):
        load_config(STUDY_CONFIG, ["model.student=s", "model.teacher=t", "train.lr=-1"])


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> str:
    from transformers import AutoTokenizer

    from essence.models.loading import random_causal_lm

    tok = AutoTokenizer.from_pretrained(DEMO_TOKENIZER)
    folder = tmp_path_factory.mktemp("base") / "model"
    random_causal_lm(TINY, len(tok), seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.mark.slow
def test_every_stage_runs_two_steps_then_a_rerun_resumes_without_training(tiny_base, tmp_path, capsys):
    out = tmp_path / "study"
    rows = {r["run"]: r for r in run_study(out, base=tiny_base, n_train=8, n_heldout=4, overrides=TWO_STEPS)}
    assert set(rows) == {"lsp-1.0", "lsp-0.5", "base-student", "teacher"}
    student = json.loads((out / "models" / "student" / "config.json").read_text())
    assert student["num_hidden_layers"] == 2  # layers 0 and 2 of 3: every third, and the last
    teacher = json.loads((out / "teacher" / "lr-0.0001" / "summary.json").read_text())
    assert teacher["steps"] == 2 and teacher["teacher_flops"] == 0  # the teacher stage is NLL only
    assert (out / "teacher" / "lr-0.0001" / "model" / "model.safetensors").is_file()
    for lsp in ("1.0", "0.5"):
        summary = json.loads((out / "runs" / f"lsp-{lsp}" / "summary.json").read_text())
        assert summary["steps"] == 2 and summary["teacher_flops"] > 0, lsp
    assert rows["lsp-0.5"]["token_saving_pct"] > 30
    assert (out / "report.md").is_file()
    capsys.readouterr()

    assert main(["study", "--out", str(out), "--base", tiny_base, "--train", "8", "--heldout", "4", *TWO_STEPS]) == 0
    said = capsys.readouterr().out
    assert "resuming" in said and said.count(": complete") >= 3, said  # teacher and both LSPs
    with pytest.raises(EssenceError, match="other settings"):
        run_study(out, base=tiny_base, n_train=9, n_heldout=4, overrides=TWO_STEPS)
