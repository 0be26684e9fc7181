"""`essence analyze`: per-decile teacher entropy and student KL, and the first statement of the answer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import essence
from essence.cli import main
from essence.data.records import Record
from essence.data.render import render
from essence.experiments.analyze import (
    analyze,
    cot_deciles,
    first_statement,
    token_stats,
)
from essence.models.loading import random_causal_lm

DEMO_TOKENIZER = Path(essence.__file__).parent / "assets" / "demo" / "teacher"
TINY = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 256}


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO_TOKENIZER)


def test_token_stats_match_values_computed_by_hand():
    # Teacher p = softmax([ln 3, 0, 0, 0]) = (1/2, 1/6, 1/6, 1/6); student uniform over 4.
    # Two padded logit columns hold huge values: they must be ignored (vocab_size = 4).
    teacher = torch.tensor([[math.log(3), 0.0, 0.0, 0.0, 50.0, 50.0], [0.0, 0.0, 0.0, 0.0, 9.0, -9.0]])
    student = torch.tensor([[0.0, 0.0, 0.0, 0.0, -50.0, 7.0], [0.0, 0.0, 0.0, 0.0, 1.0, 2.0]])
    entropy, kl = token_stats(teacher, student, vocab_size=4)
    h = 0.5 * math.log(2) + 0.5 * math.log(6)
    assert entropy.tolist() == pytest.approx([h, math.log(4)], abs=1e-6)
    assert kl.tolist() == pytest.approx([math.log(4) - h, 0.0], abs=1e-6)  # KL(p ‖ uniform) = ln V − H(p)
    assert token_stats(teacher, None, vocab_size=4)[1] is None


def test_cot_deciles_split_the_cot_evenly():
    assert cot_deciles((5, 25)) == [d for d in range(10) for _ in range(2)]
    assert cot_deciles((3, 8)) == [0, 2, 4, 6, 8]
    assert cot_deciles((0, 1)) == [0]


def _first_by_decoding(rendered, tok, value: str) -> float:
    """By hand: decode the CoT span one token at a time until its text holds `value` whole."""
    start, end = rendered.spans.cot
    text = ""
    for i in range(start, end):
        text += tok.decode([rendered.input_ids[i]])
        at = text.find(value)
        if at >= 0 and len(text) > at + len(value) and not text[at + len(value)].isdigit():
            return (i - start) / (end - start)  # the token after the number proves it complete
    raise AssertionError("value not found")


def test_first_statement_is_the_first_cot_token_that_states_the_answer(tok):
    record = Record("r", None, "Q?", "Start: 7.\n7 + 3 = 10.\nWait, 10 + 2 = 12.\nSo 12, checked.",
                    "It is \\boxed{12}.")
    rendered = render(record, tok)
    got = first_statement(rendered, record, "12")
    # The number ends at the token before the one that proves it complete.
    assert got == pytest.approx(_first_by_decoding(rendered, tok, "12"))
    assert 0.3 < got < 0.9
    assert first_statement(rendered, record, "99") is None
    # "1" inside "10" is no statement of 1; the first standalone 7 is in "Start: 7".
    assert first_statement(rendered, record, "7") == pytest.approx(_first_by_decoding(rendered, tok, "7"))


def test_first_statement_reads_choice_letters_and_fractions(qwen3_tokenizer):
    letters = Record("l", None, "Q?", "Alright. A is wrong, so B? No: the answer is C. C it is.",
                     "Thus \\boxed{C}.")
    rendered = render(letters, qwen3_tokenizer)
    fraction = first_statement(rendered, letters, "C")
    cot_text = rendered.text[rendered.offsets[rendered.spans.cot[0]][0]:]
    assert fraction is not None and 0.5 < fraction < 0.95, (fraction, cot_text)
    halves = Record("f", None, "Q?", "Half of 2/4 is 1/4, and 2/4 is 1/2.", "\\boxed{\\frac{1}{2}}")
    assert first_statement(render(halves, qwen3_tokenizer), halves, "\\frac{1}{2}") == \
        first_statement(render(halves, qwen3_tokenizer), halves, "2/4")  # 2/4 = 1/2 comes first


def test_analyze_on_a_tiny_model_equals_a_direct_computation(tok):
    records = [Record(f"r{i}", None, f"Q{i}?", "Start: 7.\n7 + 3 = 10.\nSo 10.\nCheck: 10 - 3 = 7." * (i + 1),
                      "The answer is \\boxed{10}.") for i in range(2)]
    rendered = [render(r, tok) for r in records]
    teacher = random_causal_lm(TINY, len(tok), seed=1).eval()
    student = random_causal_lm(TINY, len(tok), seed=2).eval()
    result = analyze(rendered, records, teacher, student, vocab_size=len(tok)).summary()
    sums, kls, counts = [0.0] * 10, [0.0] * 10, [0] * 10
    for item in rendered:  # by hand: loops over positions, softmax written out
        start, end = item.spans.cot
        ids = torch.tensor([item.input_ids])
        with torch.no_grad():
            lt, ls = teacher(input_ids=ids).logits[0].double(), student(input_ids=ids).logits[0].double()
        for i in range(start, end):
            p = torch.exp(lt[i - 1]) / torch.exp(lt[i - 1]).sum()
            q = torch.exp(ls[i - 1]) / torch.exp(ls[i - 1]).sum()
            d = int(10 * (i - start) / (end - start))
            sums[d] += float(-(p * p.log()).sum())
            kls[d] += float((p * (p.log() - q.log())).sum())
            counts[d] += 1
    for row in result["deciles"]:
        d = row["decile"]
        assert row["tokens"] == counts[d]
        assert row["teacher_entropy"] == pytest.approx(sums[d] / counts[d], rel=1e-4)
        assert row["student_teacher_kl"] == pytest.approx(kls[d] / counts[d], rel=1e-4)
    same = analyze(rendered, records, teacher, teacher, vocab_size=len(tok)).summary()
    assert all(abs(r["student_teacher_kl"]) < 1e-5 for r in same["deciles"])
    assert result["first_statement"]["stated"] == 2 and result["first_statement"]["never"] == 0


def test_analyze_command_writes_json_and_plot(tmp_path, capsys, tok):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": "a", "problem": "Q?", "reasoning": "7 + 3 = 10. So 10.",
                                "answer": "\\boxed{10}"}) + "\n")
    model = random_causal_lm(TINY, len(tok), seed=3)
    model.save_pretrained(tmp_path / "m")
    code = main(["analyze", str(data), "--teacher", str(tmp_path / "m"), "--tokenizer", str(DEMO_TOKENIZER),
                 "--out", str(tmp_path / "out")])
    assert code == 0
    summary = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert summary["records"] == 1 and len(summary["deciles"]) == 10
    assert "student_teacher_kl" not in summary["deciles"][0]
    assert (tmp_path / "out" / "analysis.png").stat().st_size > 1000
    assert "answer first stated in the CoT: 1 of 1" in capsys.readouterr().out
