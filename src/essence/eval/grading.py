"""Grading a model's response against a gold answer, as the field grades, and pass@k.

Extraction and equivalence are math-verify's own (`parse` with its default extraction config,
then `verify`), the conventions lighteval's math metrics build on: a boxed answer, several
boxes joined as one set (`\\boxed{-2} and \\boxed{1}`), "Final Answer: The final answer is
$X$. I hope it is correct.", "Answer: X", a bare last number ("#### 18 dollars"), thousands
separators only in their exact form (`1,234` is 1234; `1, 234` is a list). essence differs
on purpose in three places (each pinned by tests/eval/test_grading_table.py):

- the answer region is the text after the last `</think>` when the model closed its think
  block (a box inside the reasoning is a draft, not the answer), as newer lighteval versions
  strip reasoning; a response with no `</think>` is graded whole;
- `\\fbox{}` counts as a box (math-verify ignores it);
- an answer whose last box holds more than MAX_ANSWER_CHARS characters is a derivation, not
  an answer: it is reported, not parsed.

math-verify runs in a worker process with a time limit (see verifier.py), so grading never
hangs, never raises for any text, works from any thread and records errors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from math import comb

from essence.eval import verifier

THINK_CLOSE = "</think>"

# Long "answers" are almost always a box around a whole derivation; math-verify can spend
# seconds on them and they are wrong anyway. Longer ones are reported, not parsed.
MAX_ANSWER_CHARS = 1000

DEFAULT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class GradeResult:
    """One graded response: whether it is right, the answer read from it, and why grading failed."""

    correct: bool
    extracted: str | None  # None when the response states no final answer
    error: str | None = None  # a parse failure or timeout; such a response counts as wrong


def grade(response: str, gold: str) -> bool:
    """Whether `response`'s final answer equals `gold` (see grade_detail)."""
    return grade_detail(response, gold).correct


def grade_detail(response: str, gold: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> GradeResult:
    """Grade `response` against `gold`; never raises for any text, never runs past `timeout_s`.

    gold: the reference answer as LaTeX (`\\frac{3}{4}`, `(1,4]`, `1,234`, `\\text{(A)}`);
    a `\\boxed{}` or `$...$` around it is accepted too.
    """
    region = _FBOX.sub(r"\\boxed{", answer_region(response))
    boxed = last_boxed(region)
    if boxed is not None and len(boxed) > MAX_ANSWER_CHARS:
        return GradeResult(
            False, boxed, f"answer longer than {MAX_ANSWER_CHARS} characters; not parsed"
        )
    equal, extracted, error = verifier.grade(region, clean_gold(gold), timeout_s)
    return GradeResult(equal, extracted, error)


def extract_answer(text: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> str | None:
    """The final answer math-verify reads from `text` (its extracted string); None if none."""
    return verifier.grade(_FBOX.sub(r"\\boxed{", text), None, timeout_s)[1]


def answer_region(response: str) -> str:
    """The part of a response that holds its final answer: after the last `</think>`, if any."""
    cut = response.rfind(THINK_CLOSE)
    return response if cut < 0 else response[cut + len(THINK_CLOSE) :]


def last_boxed(text: str) -> str | None:
    """The contents of the last `\\boxed{...}` or `\\fbox{...}` whose braces balance."""
    closing = _matching_braces(text)
    for match in reversed(list(_BOX_OPEN.finditer(text))):
        open_at = match.end() - 1
        if open_at in closing:
            return text[open_at + 1 : closing[open_at]]
    return None


def clean_gold(gold: str) -> str:
    """A gold answer as bare LaTeX: the contents of its last box if boxed, without `$`."""
    gold = str(gold)
    boxed = last_boxed(gold)
    return _strip_math_delimiters(boxed if boxed is not None else gold)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 − C(n−c, k) / C(n, k)."""
    assert 0 <= c <= n and 1 <= k <= n, (
        f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}"
    )
    if n - c < k:
        return 1.0  # every k-subset contains a correct sample
    # Exact integers, one division: stays accurate for n in the thousands.
    return 1.0 - comb(n - c, k) / comb(n, k)


_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_FBOX = re.compile(r"\\fbox\s*\{")


def _matching_braces(text: str) -> dict[int, int]:
    """Position of each `{` → its matching `}`; one pass, so a long unbalanced response stays linear."""
    closing: dict[int, int] = {}
    stack: list[int] = []
    for i, ch in enumerate(text):
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            closing[stack.pop()] = i
    return closing


def _strip_math_delimiters(answer: str) -> str:
    """Drop sentence and math-mode wrapping: `$…$`, `\\(…\\)`, `**…**`, a final period."""
    answer = answer.strip()
    for _ in range(3):  # wrappers nest, e.g. "**$5$**."
        before = answer
        answer = answer.rstrip(".").strip()
        for left, right in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("**", "**")):
            if (
                answer.startswith(left)
                and answer.endswith(right)
                and len(answer) >= len(left) + len(right)
            ):
                answer = answer[len(left) : len(answer) - len(right)].strip()
        if answer == before:
            break
    return answer
