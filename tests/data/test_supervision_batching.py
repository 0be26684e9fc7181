import pytest
import torch
from conftest import RECORDS

from essence.data.batching import Example, collate, padding_fraction, plan_batches
from essence.data.pipeline import DataConfig, prepare
from essence.data.supervision import SupervisionConfig, supervise
from essence.data.truncation import TruncationConfig
from essence.errors import EssenceError

SEGMENTS = [1, 1, 1, 2, 2, 2, 2, 3, 3]


@pytest.mark.parametrize("segments,expected", [
    (("prompt", "cot", "answer"), [0, 1, 1, 1, 1, 1, 1, 1, 1]),
    (("cot", "answer"), [0, 0, 0, 1, 1, 1, 1, 1, 1]),
    (("answer",), [0, 0, 0, 0, 0, 0, 0, 1, 1]),
    (("prompt", "answer"), [0, 1, 1, 0, 0, 0, 0, 1, 1]),
    (("cot",), [0, 0, 0, 1, 1, 1, 1, 0, 0]),
    (("prompt", "cot"), [0, 1, 1, 1, 1, 1, 1, 0, 0]),
])
def test_paper_segment_settings(segments, expected):
    masks = supervise("r", SEGMENTS, SupervisionConfig(nll=segments, kd=("cot",)))
    assert [int(m) for m in masks.nll] == expected
    assert [int(m) for m in masks.kd] == [0, 0, 0, 1, 1, 1, 1, 0, 0]


def test_segments_from_plus_string_and_bad_names():
    assert SupervisionConfig(nll="cot+answer").nll == ("cot", "answer")
    with pytest.raises(EssenceError, match="unknown segments"):
        SupervisionConfig(kd=("reasoning",))
    with pytest.raises(EssenceError, match="random_drop"):
        SupervisionConfig(random_drop=1.0)


def test_random_drop_is_seeded_and_exact():
    segments = [1] + [2] * 100
    config = SupervisionConfig(random_drop=0.25, seed=3)
    a = supervise("rec", segments, config)
    b = supervise("rec", segments, config)
    assert a.nll == b.nll and sum(a.nll) == 75  # round(100 * 0.75)
    assert supervise("other", segments, config).nll != a.nll
    assert supervise("rec", segments, SupervisionConfig(random_drop=0.25, seed=4)).nll != a.nll


def test_random_drop_is_shared_by_default_as_in_the_reference():
    segments = [1] * 21 + [2] * 60 + [3] * 20  # 100 targets (the first token is none)
    shared = supervise("rec", segments, SupervisionConfig(random_drop=0.5))
    unsupervised = sum(not (n or k) for n, k in zip(shared.nll[1:], shared.kd[1:]))
    assert shared.nll == shared.kd and sum(shared.nll) == 50 and unsupervised == 50
    apart = supervise("rec", segments, SupervisionConfig(random_drop=0.5,
                                                         random_drop_mode="independent"))
    assert sum(apart.nll) == sum(apart.kd) == 50 and apart.nll != apart.kd
    neither = sum(not (n or k) for n, k in zip(apart.nll[1:], apart.kd[1:]))
    assert 15 <= neither <= 35  # about a quarter
    # Different segments per term: one draw over their union, removed from both.
    split = supervise("rec", segments, SupervisionConfig(nll=("answer",), kd=("cot",),
                                                         random_drop=0.5))
    assert sum(split.nll) + sum(split.kd) == 40
    assert not any(n and segments[i] != 3 for i, n in enumerate(split.nll))


def test_pipeline_truncates_before_batching(qwen3_tokenizer):
    full = prepare(DataConfig(source=str(RECORDS / "flat_columns.jsonl")), qwen3_tokenizer)
    half = prepare(DataConfig(source=str(RECORDS / "flat_columns.jsonl"),
                              truncation=TruncationConfig(lsp=0.5)), qwen3_tokenizer)
    for f, h in zip(full.examples, half.examples):
        assert len(h) == len(f) // 2 and h.input_ids == f.input_ids[: len(h)]
        assert h.segment_ids == f.segment_ids[: len(h)]


def test_max_length_is_bad_input(qwen3_tokenizer):
    config = DataConfig(source=str(RECORDS / "flat_columns.jsonl"), max_length=90)
    prepared = prepare(config, qwen3_tokenizer)
    assert len(prepared.examples) == 2 and len(prepared.skipped) == 1
    assert "155 tokens, over data.max_length=90" in str(prepared.skipped[0])
    with pytest.raises(EssenceError, match="flat_columns.jsonl row 0 .*max_length"):
        prepare(DataConfig(source=config.source, max_length=90, on_error="fail"), qwen3_tokenizer)


def test_limit_counts_records_that_pass_the_length_filter(qwen3_tokenizer, tmp_path):
    # Filter first, then limit: the reference keeps its first N traces under max_length.
    import json

    rows = [{"id": f"r{i}", "problem": f"Problem {i}?", "reasoning": "step " * (120 if i % 2 else 2),
             "answer": str(i)} for i in range(10)]  # odd rows are long
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = DataConfig(source=str(path), max_length=60, limit=3)
    head = prepare(config, qwen3_tokenizer)
    assert [e.record_id for e in head.examples] == ["r0", "r2", "r4"]
    assert [s.record_id for s in head.skipped] == ["r1", "r3"]  # rows after the limit: unread
    sample = prepare(DataConfig(source=str(path), max_length=60, limit=3, selection="sample",
                                selection_seed=1), qwen3_tokenizer)
    ids = [e.record_id for e in sample.examples]
    assert len(ids) == 3 and all(int(i[1:]) % 2 == 0 for i in ids) and ids != ["r0", "r2", "r4"]
    again = prepare(DataConfig(source=str(path), max_length=60, limit=3, selection="sample",
                               selection_seed=1), qwen3_tokenizer)
    assert [e.record_id for e in again.examples] == ids
    assert len(prepare(DataConfig(source=str(path), max_length=60), qwen3_tokenizer).examples) == 5


def test_cot_relative_truncation_of_plain_rows_is_refused(qwen3_tokenizer, tmp_path):
    path = tmp_path / "plain.jsonl"
    path.write_text('{"id": "p1", "prompt": "Say hi", "response": "hi"}\n')
    for truncation in (TruncationConfig(cot_lead=0.5), TruncationConfig(cut_after_think=True)):
        with pytest.raises(EssenceError, match="record 'p1' has no chain of thought"):
            prepare(DataConfig(source=str(path), truncation=truncation), qwen3_tokenizer)
    example = prepare(DataConfig(source=str(path), truncation=TruncationConfig(lsp=0.5)),
                      qwen3_tokenizer).examples[0]
    assert 3 not in example.segment_ids  # the lead half of a short plain row: no answer left


def test_collate_pads_right_and_keeps_masks():
    a = Example("a", [5, 6, 7], [1, 2, 3], [False, True, True], [False, False, True])
    b = Example("b", [8], [1], [False], [False])
    batch = collate([a, b], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.segment_ids.tolist() == [[1, 2, 3], [1, 0, 0]]
    assert batch.kd_mask.tolist() == [[False, False, True], [False, False, False]]
    assert batch.record_ids == ["a", "b"] and batch.tokens == 4 and batch.padding == 2


def test_length_grouping_reduces_padding():
    lengths = [int(x) for x in torch.randint(10, 2000, (512,), generator=torch.Generator().manual_seed(0))]
    grouped = plan_batches(lengths, 8, seed=0, epoch=0)
    random_plan = plan_batches(lengths, 8, seed=0, epoch=0, group_factor=1)
    assert sorted(i for b in grouped for i in b) == list(range(512))
    assert padding_fraction(lengths, grouped) < 0.1 < padding_fraction(lengths, random_plan)
    assert plan_batches(lengths, 8, seed=0, epoch=0) == grouped
    assert plan_batches(lengths, 8, seed=0, epoch=1) != grouped
