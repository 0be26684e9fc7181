import pytest

from essence.data.render import Spans
from essence.data.truncation import TruncationConfig, lead_span, truncate, window
from essence.errors import EssenceError

# 10 tokens: prompt 0-2, cot 3-7 (closing think tag is token 6, so it ends at 7), answer 8-9.
SPANS = Spans(prompt=(0, 3), cot=(3, 8), answer=(8, 10), think_end=7, think_close=6)


def kept(**kwargs):
    return truncate(SPANS, TruncationConfig(**kwargs))


@pytest.mark.parametrize("n,x,expected", [
    (10, 1.0, 10), (10, 0.5, 5), (10, 0.25, 2), (10, 0.3, 3), (7, 0.5, 3), (3, 0.7, 2),
    (1, 0.5, 1), (1, 1.0, 1), (4, 0.1, 1), (100, 0.29, 29), (100, 0.57, 57), (9, 1 / 3, 3),
])
def test_lead_span_is_max_one_floor(n, x, expected):
    assert lead_span(n, x) == expected


@pytest.mark.parametrize("x", [0.0, -0.5, 1.01, 2.0])
def test_lsp_out_of_range_is_an_error(x):
    with pytest.raises(EssenceError, match="lsp must be within"):
        TruncationConfig(lsp=x)


def test_lsp_counts_every_segment():
    assert kept(lsp=1.0) == kept()
    k = kept(lsp=0.5)
    assert k.ranges == ((0, 5),) and (k.prompt, k.cot, k.answer) == (3, 2, 0)
    k = kept(lsp=0.9)
    assert (k.prompt, k.cot, k.answer, k.total) == (3, 5, 1, 9)


def test_lsp_on_a_single_token_sequence():
    one = Spans(prompt=(0, 1), cot=(1, 1), answer=(1, 1), think_end=None)
    k = truncate(one, TruncationConfig(lsp=0.25))
    assert k.ranges == ((0, 1),) and k.total == 1 and k.prompt == 1


def test_windows():
    assert window(10, 0.5, "left") == (0, 5)
    assert window(10, 0.5, "right") == (5, 10)
    assert window(10, 0.5, "middle") == (2, 7)
    assert window(10, 0.4, "middle") == (3, 7)
    assert window(7, 0.5, "middle") == (2, 5)
    k = kept(window=0.5, window_position="right")
    assert (k.prompt, k.cot, k.answer) == (0, 3, 2)
    k = kept(window=0.5, window_position="middle")
    assert (k.prompt, k.cot, k.answer) == (1, 4, 0)


def test_max_tokens_and_combination():
    k = kept(max_tokens=4)
    assert k.ranges == ((0, 4),) and (k.prompt, k.cot) == (3, 1)
    assert kept(max_tokens=50).total == 10
    k = kept(lsp=0.5, max_tokens=2)
    assert k.ranges == ((0, 2),)


def test_cut_after_think():
    k = kept(cut_after_think=True)
    assert k.ranges == ((0, 7),) and (k.prompt, k.cot, k.answer) == (3, 4, 0)
    no_tag = Spans(prompt=(0, 3), cot=(3, 8), answer=(8, 10), think_end=None)
    assert truncate(no_tag, TruncationConfig(cut_after_think=True)).ranges == ((0, 8),)


def test_cut_after_think_combines_with_lsp_and_window():
    # Cut after the tag (7 tokens left), then the lead span / window of those, as the reference.
    k = kept(cut_after_think=True, lsp=0.5)
    assert k.ranges == ((0, 3),) and (k.prompt, k.cot, k.answer) == (3, 0, 0)
    assert kept(cut_after_think=True, lsp=0.6).ranges == ((0, 4),)  # floor(7 * 0.6) = 4
    assert kept(cut_after_think=True, window=0.5, window_position="right").ranges == ((4, 7),)
    assert kept(cut_after_think=True, window=0.5, window_position="middle").ranges == ((2, 5),)
    assert kept(lsp=0.6).ranges == ((0, 6),)  # without the cut: floor(10 * 0.6)
    assert TruncationConfig(cut_after_think=True, lsp=0.5).label() == "cut_after_think,lsp=0.5"
    with pytest.raises(EssenceError, match="cot_lead and cut_after_think"):
        TruncationConfig(cut_after_think=True, cot_lead=0.5)


def test_cot_lead_keeps_prompt_closing_tag_and_answer():
    k = kept(cot_lead=0.5)  # floor(0.5 * 5) = 2 CoT tokens, then </think> (6) and the blank (7)
    assert k.ranges == ((0, 5), (6, 10)) and (k.prompt, k.cot, k.answer) == (3, 4, 2)
    assert kept(cot_lead=0.0).ranges == ((0, 3), (6, 10))
    assert kept(cot_lead=0.8).ranges == ((0, 10),)  # 4 lead tokens reach the tag: contiguous
    assert kept(cot_lead=1.0).total == 10
    assert kept(cot_lead=0.5, max_tokens=6).ranges == ((0, 5), (6, 7))
    assert kept(cot_lead=0.5).indices() == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    no_tag = Spans(prompt=(0, 3), cot=(3, 8), answer=(8, 10), think_end=None)
    assert truncate(no_tag, TruncationConfig(cot_lead=0.5)).ranges == ((0, 5), (8, 10))


def test_protocols_are_exclusive_and_validated():
    with pytest.raises(EssenceError, match="choose one protocol"):
        TruncationConfig(lsp=0.5, window=0.5)
    with pytest.raises(EssenceError, match="window_position"):
        TruncationConfig(window=0.5, window_position="top")
    with pytest.raises(EssenceError, match="max_tokens"):
        TruncationConfig(max_tokens=0)
    with pytest.raises(EssenceError, match="cot_lead"):
        TruncationConfig(cot_lead=1.5)


def test_labels():
    assert TruncationConfig(lsp=0.5).label() == "lsp=0.5"
    assert TruncationConfig(window=0.5, window_position="middle").label() == "window=0.5@middle"
    assert TruncationConfig(cot_lead=0.25, max_tokens=9).label() == "cot_lead=0.25,max_tokens=9"
