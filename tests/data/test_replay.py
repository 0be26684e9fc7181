"""Finish replay: a seeded fraction of records trained whole, the rest truncated."""

import json

import pytest
import torch
from conftest import tiny_config

from essence.data.pipeline import prepare
from essence.data.truncation import TruncationConfig, lead_span, replayed, truncate
from essence.errors import EssenceError
from essence.models.flops import flop_model
from essence.train.run import train
from essence.train.setup import build_models


def test_replay_choice_is_seeded_and_near_the_fraction():
    ids = [f"r{i}" for i in range(4000)]
    half = TruncationConfig(lsp=0.5, replay=0.25)
    chosen = [i for i in ids if replayed(i, half)]
    assert chosen == [i for i in ids if replayed(i, half)]  # the same on every call
    assert 0.22 < len(chosen) / len(ids) < 0.28  # binomial sd 0.007: 4 sd either side
    other = TruncationConfig(lsp=0.5, replay=0.25, replay_seed=1)
    assert chosen != [i for i in ids if replayed(i, other)]
    # A larger fraction keeps every record a smaller one chose (nested choices).
    more = TruncationConfig(lsp=0.5, replay=0.5)
    assert set(chosen) <= {i for i in ids if replayed(i, more)}
    assert not any(replayed(i, TruncationConfig(lsp=0.5)) for i in ids)
    assert all(replayed(i, TruncationConfig(lsp=0.5, replay=1.0)) for i in ids)


def test_replayed_records_are_whole_and_capped(qwen3_tokenizer, data_file):
    from essence.data.pipeline import DataConfig

    config = DataConfig(source=str(data_file), truncation=TruncationConfig(lsp=0.5, replay=0.5))
    prepared = prepare(config, qwen3_tokenizer)
    whole = [replayed(r.record_id, config.truncation) for r in prepared.rendered]
    assert any(whole) and not all(whole)
    for item, kept, full in zip(prepared.rendered, prepared.kept, whole):
        n = item.spans.length
        assert kept.total == (n if full else lead_span(n, 0.5))
    capped = TruncationConfig(lsp=0.5, replay=1.0, max_tokens=7)
    assert truncate(prepared.rendered[0].spans, capped, "any").total == 7
    with pytest.raises(ValueError, match="record id"):
        truncate(prepared.rendered[0].spans, capped)


def test_replay_needs_a_truncation_and_a_fraction():
    with pytest.raises(EssenceError, match="replay=0.2 .*no protocol truncates"):
        TruncationConfig(replay=0.2)
    with pytest.raises(EssenceError, match="replay=0.2 .*no protocol truncates"):
        TruncationConfig(replay=0.2, max_tokens=10)
    with pytest.raises(EssenceError, match=r"replay must be within \[0, 1\]"):
        TruncationConfig(lsp=0.5, replay=1.5)
    assert TruncationConfig(cot_lead=0.3, replay=0.1).label() == "cot_lead=0.3,replay=0.1"


def test_replay_accounting_is_exact(tokenizer_dir, data_file, tmp_path):
    """Tokens and FLOPs of a replay run equal the sum, record by record, of whole sequences
    for the replayed records and lead spans for the rest (computed here from the masks)."""
    overrides = ("train.epochs=1", "train.batch_size=1", "data.truncation.lsp=0.5",
                 "data.truncation.replay=0.5")
    config = tiny_config(tokenizer_dir, data_file, *overrides)
    models = build_models(config, torch.device("cpu"), None)
    prepared = prepare(config.data, models.tokenizer)
    chosen = [replayed(e.record_id, config.data.truncation) for e in prepared.examples]
    assert any(chosen) and not all(chosen)
    lengths = [len(e) for e in prepared.examples]
    assert lengths == [r.spans.length if c else lead_span(r.spans.length, 0.5)
                       for r, c in zip(prepared.rendered, chosen)]
    rows = [sum(n or k for n, k in zip(e.nll_mask[1:], e.kd_mask[1:])) for e in prepared.examples]
    student = flop_model(models.student, len(models.tokenizer))
    teacher = models.teacher_flops
    summary = train(config, tmp_path / "replay")
    assert summary["student_tokens"] == sum(lengths)
    assert summary["padding_tokens"] == 0
    assert summary["student_flops"] == pytest.approx(student.train(lengths, rows), rel=1e-12)
    kd_rows = [sum(e.kd_mask[1:]) for e in prepared.examples]
    assert summary["teacher_flops"] == pytest.approx(teacher.forward(lengths, kd_rows), rel=1e-12)
    assert json.loads((tmp_path / "replay" / "summary.json").read_text())["truncation"] == \
        "lsp=0.5,replay=0.5"
