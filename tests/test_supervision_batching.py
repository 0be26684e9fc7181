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
