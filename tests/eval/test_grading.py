"""Answer extraction, math-verify equivalence (bounded in time, any thread) and pass@k."""

from __future__ import annotations

import threading
import time
from math import comb

import pytest

from essence.eval.grading import (
    MAX_ANSWER_CHARS,
    GradeResult,
    answer_region,
    clean_gold,
    extract_answer,
    grade,
    grade_detail,
    last_boxed,
    pass_at_k,
)


@pytest.mark.parametrize(
    "response, gold",
    [
        ("so \\boxed{0.5}", "\\frac{1}{2}"),
        ("so \\boxed{\\frac{1}{2}}", "0.5"),
        ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}"),
        ("\\boxed{\\frac34}", "\\dfrac{3}{4}"),
        ("\\boxed{(1, 4]}", "(1,4]"),
        ("\\boxed{-7}", "-7"),
        ("\\boxed{-\\frac{2}{3}}", "-\\dfrac{2}{3}"),
        ("#### 1,234", "1234"),
        ("#### 1234", "1,234"),
        ("\\boxed{1,234,567}", "1234567"),
        ("\\boxed{\\text{(A)}}", "A"),
        ("\\boxed{A}", "\\text{(A)}"),
        ("\\boxed{\\text{Monday}}", "\\text{Monday}"),
        ("\\boxed{\\sqrt{18}}", "3\\sqrt{2}"),
        ("The answer is $\\frac{1}{2}$.", "0.5"),
        ("The final answer is: **12**", "12"),
        ("\\fbox{42}", "42"),
        ("\\boxed{5}", "\\boxed{5}"),  # a boxed gold is unwrapped
        ("\\boxed{5}", "$5$"),
    ],
)
def test_equivalent_answers_are_correct(response: str, gold: str) -> None:
    result = grade_detail(response, gold)
    assert result.correct, result
    assert result.error is None


@pytest.mark.parametrize(
    "response, gold",
    [
        ("\\boxed{[1,4]}", "(1,4]"),  # closed vs half-open interval
        ("\\boxed{(1,4)}", "(1,4]"),
        ("\\boxed{7}", "-7"),  # sign matters
        ("\\boxed{0.6}", "\\frac{1}{2}"),
        ("\\boxed{B}", "A"),
        ("\\boxed{\\text{Tuesday}}", "\\text{Monday}"),
        ("#### 1,235", "1234"),
    ],
)
def test_different_answers_are_wrong(response: str, gold: str) -> None:
    assert not grade(response, gold)


def test_the_last_boxed_answer_wins() -> None:
    assert grade("first \\boxed{3}. Then corrected: \\boxed{4}", "4")
    assert not grade("first \\boxed{4}. Then corrected: \\boxed{3}", "4")
    # math-verify joins boxes separated only by a comma or "and" into one set
    assert grade("first \\boxed{3}, then corrected: \\boxed{4}", "3, 4")
    assert last_boxed("\\boxed{1} and \\boxed{\\frac{a}{b}}") == "\\frac{a}{b}"
    assert last_boxed("\\boxed{2} then an unclosed \\boxed{3") == "2"


def test_the_answer_after_the_think_block_wins() -> None:
    response = "<think>maybe \\boxed{3}</think>\nThe result is \\boxed{4}."
    assert answer_region(response) == "\nThe result is \\boxed{4}."
    assert grade_detail(response, "4").correct
    assert not grade_detail(response, "3").correct


def test_a_boxed_answer_only_inside_a_closed_think_block_does_not_count() -> None:
    result = grade_detail("<think>so it is \\boxed{4}</think>\nI am not sure.", "4")
    assert result == GradeResult(correct=False, extracted=None, error=None)


def test_an_unclosed_think_block_is_graded_as_a_whole() -> None:
    # Without </think> the whole response is the answer region (a model that never opened one).
    assert grade("<think>reasoning... \\boxed{4}", "4")


def test_extraction_fallbacks_in_order() -> None:
    # math-verify's priorities: "final answer is … I hope", then boxes and "final answer … is",
    # then "answer …" anchors, then any expression or number (the rightmost wins within one).
    assert extract_answer("#### 26\nthe answer is 3") == "3"  # an anchor beats a bare number
    assert extract_answer("\\boxed{7}\n#### 26") == "7"  # a box beats a bare number
    assert extract_answer("The answer is \\(x+1\\).") == "x+1"
    assert extract_answer("no answer here") is None
    assert extract_answer("\\boxed{  }") is None  # an empty box states nothing


def test_clean_gold_unwraps_boxes_and_dollars() -> None:
    assert clean_gold("$\\frac{1}{2}$") == "\\frac{1}{2}"
    assert clean_gold("so \\boxed{(1,4]}.") == "(1,4]"
    assert clean_gold(26) == "26"  # type: ignore[arg-type]  (AIME golds arrive as ints)


@pytest.mark.parametrize(
    "response",
    [
        "\\boxed{\\frac{1}{2",  # unbalanced
        "\\boxed{\\frac{1}{}}",
        "\\boxed{x^2+}",
        "\\boxed{\\left( 1, 2}",
        "\\boxed{\\begin{pmatrix} 1 & }",
        "\\boxed{}}}}{{{",
        "$$$\\boxed{\\sqrt{}}$$$",
        "\\boxed{" + "{" * 5000,  # long and unbalanced: extraction stays linear
    ],
)
def test_malformed_latex_never_crashes(response: str) -> None:
    result = grade_detail(response, "\\frac{1}{2}")
    assert result.correct is False


def test_an_unparseable_gold_is_a_recorded_error_not_a_crash() -> None:
    result = grade_detail("\\boxed{5}", "}{")
    assert result.correct is False
    assert "gold" in (result.error or "")


def test_an_overlong_answer_is_reported_not_parsed() -> None:
    result = grade_detail("\\boxed{" + "1+" * MAX_ANSWER_CHARS + "1}", "5")
    assert not result.correct and "longer than" in (result.error or "")


def test_a_hanging_comparison_times_out_and_grading_continues() -> None:
    # 10^{10^{10}} hangs inside integer arithmetic, where no signal can interrupt it.
    started = time.perf_counter()
    result = grade_detail("\\boxed{10^{10^{10}}}", "5", timeout_s=1.0)
    assert time.perf_counter() - started < 15
    assert not result.correct and "timed out" in (result.error or "")
    assert grade("\\boxed{0.5}", "\\frac{1}{2}")  # a fresh worker takes over


def test_grading_works_from_worker_threads() -> None:
    cases = [
        ("\\boxed{0.5}", "\\frac{1}{2}", True),
        ("\\boxed{(1,4]}", "(1,4]", True),
        ("\\boxed{3}", "-3", False),
    ]
    results: dict[int, bool] = {}
    errors: list[BaseException] = []

    def work(i: int, response: str, gold: str) -> None:
        try:
            results[i] = grade_detail(response, gold).correct
        except BaseException as exc:  # a SIGALRM-based timeout would raise here
            errors.append(exc)

    threads = [
        threading.Thread(target=work, args=(i, r, g)) for i, (r, g, _) in enumerate(cases * 2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert results == {i: expected for i, (_, _, expected) in enumerate(cases * 2)}


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (10, 0, 1, 0.0),
        (10, 10, 5, 1.0),
        (10, 3, 1, 0.3),
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (8, 7, 2, 1.0),  # every pair holds a correct sample
    ],
)
def test_pass_at_k_values(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_matches_the_definition_and_is_monotone_in_k() -> None:
    for n in (1, 3, 16):
        for c in range(n + 1):
            values = [pass_at_k(n, c, k) for k in range(1, n + 1)]
            assert values == pytest.approx(
                [1 - comb(n - c, k) / comb(n, k) for k in range(1, n + 1)]
            )
            assert values == sorted(values)
    assert pass_at_k(1024, 1, 1) == pytest.approx(1 / 1024)  # big n stays exact
