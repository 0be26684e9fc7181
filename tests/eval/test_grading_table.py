"""Grading as the field grades: a table of responses checked against math-verify as the oracle.

Each case is (response, gold, essence's verdict). The oracle is math-verify's own
`verify(parse("$" + gold + "$"), parse(response))`, as its README grades; essence must agree with
it on every case except those listed in DISAGREE, which says why essence differs on purpose.
The conventions come from math-verify's and lighteval's documentation and public tests; the
cases are written here.
"""

from __future__ import annotations

import logging

import pytest

from essence.eval.grading import grade_detail

CASES = [    # Minerva / lighteval endings
    ("Final Answer: The final answer is $14{,}916$. I hope it is correct.", "14916", True),
    ("Final Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.", "0.75", True),
    ("Final Answer: The final answer is $5$. I hope it is correct.", "6", False),
    ("The answer is $\\frac12$, since the two halves are equal.", "\\frac{1}{2}", True),
    ("The answer is $\\frac12$, since 3 of the 6 faces are even.", "\\frac{1}{2}", False),  # oracle takes the later 6
    ("The final answer is $\\boxed{7}$.", "7", True),
    ("Final Answer: 42", "42", True),
    ("**Final Answer:** 42", "42", True),
    ("**Final Answer**\n\\[ \\boxed{42} \\]", "42", True),
    ("Answer: 42", "42", True),
    ("ANSWER: 17", "17", True),
    ("#### 18 dollars", "18", True),
    ("She pays 3 * 6 = 18 dollars.\n#### 18", "18", True),
    ("#### 1,234", "1234", True),
    # boxes
    ("so \\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", True),
    ("\\boxed{\\frac34}", "\\dfrac{3}{4}", True),
    ("\\boxed{-\\frac{2}{3}}", "-\\dfrac{2}{3}", True),
    ("\\boxed{7}", "-7", False),
    ("\\boxed{0.6}", "\\frac{1}{2}", False),
    ("first \\boxed{3}. Then corrected: \\boxed{4}", "4", True),
    ("So \\boxed{-2} and \\boxed{1}", "1, -2", True),
    ("\\boxed{(2, 2)} \\quad \\text{and} \\quad \\boxed{(6, 2)}", "(2, 2), (6, 2)", True),
    ("The solutions are \\boxed{1} and \\boxed{2}", "1", False),
    ("\\boxed{x = 5}", "5", True),
    ("\\boxed{5}", "x = 5", True),
    ("\\boxed{\\sqrt{18}}", "3\\sqrt{2}", True),
    ("\\boxed{2\\pi}", "2\\pi", True),
    ("\\boxed{6.28}", "2\\pi", False),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", True),
    ("\\boxed{004}", "4", True),
    ("\\boxed{10^{3}}", "1000", True),
    ("\\boxed{3+4i}", "3+4i", True),
    ("\\boxed{\\infty}", "\\infty", True),
    # thousands separators and lists
    ("\\boxed{1,234,567}", "1234567", True),
    ("\\boxed{1,234}", "1234", True),
    ("\\boxed{32, 349}", "32349", False),  # a list, not a thousands-separated number
    ("\\boxed{1, 234}", "1234", False),
    ("\\boxed{1 000}", "1000", False),  # a space is no thousands separator inside LaTeX
    ("#### 1,235", "1234", False),
    # intervals, sets, tuples
    ("\\boxed{(1, 4]}", "(1,4]", True),
    ("\\boxed{[1,4]}", "(1,4]", False),
    ("\\boxed{(1,4)}", "(1,4]", False),
    ("\\boxed{(-\\infty, 2) \\cup (3, \\infty)}", "(-\\infty,2)\\cup(3,\\infty)", True),
    ("\\boxed{\\{1, 2, 3\\}}", "\\{3, 2, 1\\}", True),
    ("\\boxed{(3, -1)}", "(3,-1)", True),
    ("\\boxed{(-1, 3)}", "(3,-1)", False),
    # text, letters, units, percentages
    ("\\boxed{\\text{(A)}}", "A", True),
    ("\\boxed{A}", "\\text{(A)}", True),
    ("\\boxed{B}", "A", False),
    ("\\boxed{\\text{Monday}}", "\\text{Monday}", True),
    ("\\boxed{\\text{Tuesday}}", "\\text{Monday}", False),
    ("\\boxed{12\\text{ cm}}", "12", True),
    ("\\boxed{30^\\circ}", "30", True),
    ("\\boxed{25\\%}", "25", True),
    ("The probability is $\\boxed{\\frac{1}{4}}$.", "0.25", True),
    ("**$5$**.", "5", True),
    ("The result is \\(x+1\\).", "x+1", True),
    ("\\[\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}\\]", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", True),
    ("no answer here", "5", False),
    ("\\boxed{\\frac{2}{3}}", "\\frac{3}{2}", False),
    ("Answer: 41", "42", False),
    ("\\boxed{x^2}", "x^3", False),
    ("\\boxed{\\sqrt{2}}", "2", False),
    ("Final Answer: The final answer is $(1,2)$. I hope it is correct.", "(2,1)", False),
    ("The final answer is $\\boxed{0.333}$.", "\\frac{1}{3}", False),  # 6-digit precision
    # essence's deliberate differences from the oracle (DISAGREE below says why)
    ("<think>\\boxed{3}</think> The answer is 5", "5", True),
    ("<think>so it is \\boxed{4}</think>\nI am not sure.", "4", False),
    ("\\fbox{42}", "42", True),
    ("\\boxed{" + "1+" * 600 + "1}", "601", False),
]

DISAGREE = {
    "<think>\\boxed{3}</think> The answer is 5":
        "the answer region is the text after </think>: a box in the reasoning is a draft",
    "<think>so it is \\boxed{4}</think>\nI am not sure.":
        "a closed think block holds no final answer; the reply after it states none",
    "\\fbox{42}": "\\fbox is a box too (math-verify does not read it)",
    "\\boxed{" + "1+" * 600 + "1}":
        f"a box over {1000} characters is a derivation, reported and not parsed (time bound)",
}


def oracle(response: str, gold: str) -> bool:
    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeouts are off" warning
    return bool(verify(parse(f"${gold}$", parsing_timeout=None),
                       parse(response, parsing_timeout=None), timeout_seconds=None))


def test_the_table_is_large_and_two_sided():
    assert len(CASES) >= 50 and len({c[0] for c in CASES}) == len(CASES)
    verdicts = [c[2] for c in CASES]
    assert verdicts.count(True) >= 20 and verdicts.count(False) >= 20
    assert set(DISAGREE) <= {c[0] for c in CASES}


@pytest.mark.parametrize("response, gold, expected", CASES, ids=[f"{i:02d}" for i in range(len(CASES))])
def test_essence_grades_as_the_oracle_except_on_purpose(response, gold, expected):
    result = grade_detail(response, gold)
    assert result.correct is expected, result
    assert result.error is None or response in DISAGREE
    if response in DISAGREE:
        assert oracle(response, gold) is not expected, DISAGREE[response]
    else:
        assert oracle(response, gold) is expected
