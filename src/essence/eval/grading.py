"""Grading a model's response against a gold answer, and the pass@k estimator.

A response is graded on its final answer only: the text after the last `</think>` when the
model closed its think block (a box inside the reasoning is a draft, not the answer), else the
whole response. The answer is the last balanced `\\boxed{}` / `\\fbox{}`, else a GSM8K-style
`#### N`, else "the answer is …". Equivalence is math-verify's, run in a worker process with a
time limit (see verifier.py), so grading never hangs and works from any thread.
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
    extracted = extract_answer(answer_region(response))
    if extracted is None:
        return GradeResult(False, None)
    gold_answer = clean_gold(gold)
    if _canonical(extracted) == _canonical(gold_answer):
        return GradeResult(True, extracted)  # identical up to notation: no need for math-verify
    if len(extracted) > MAX_ANSWER_CHARS:
        return GradeResult(
            False, extracted, f"answer longer than {MAX_ANSWER_CHARS} characters; not parsed"
        )
    equal, error = verifier.check(extracted, gold_answer, timeout_s)
    return GradeResult(equal, extracted, error)


def answer_region(response: str) -> str:
    """The part of a response that holds its final answer: after the last `</think>`, if any."""
    cut = response.rfind(THINK_CLOSE)
    return response if cut < 0 else response[cut + len(THINK_CLOSE) :]


def extract_answer(text: str) -> str | None:
    """The final answer stated in `text`, as LaTeX without `$`; None if it states none."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip() or None  # an empty box states nothing
    hashes = _HASHES.findall(text)
    if hashes:
        return _strip_math_delimiters(hashes[-1]) or None
    stated = _ANSWER_IS.findall(text)
    if stated:
        return _strip_math_delimiters(stated[-1]) or None
    return None


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
_HASHES = re.compile(r"####[ \t]*([^\n]+)")
_ANSWER_IS = re.compile(r"the (?:final )?answer is[ \t]*:?[ \t]*([^\n]+)", re.IGNORECASE)
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_TEXT_WRAP = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}")
_LETTER = re.compile(r"\(?([A-Za-z])\)?")
_SPACING = re.compile(r"\\left|\\right|\\[!,;: ]|\s+")


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


def _canonical(answer: str) -> str:
    """A conservative normal form: two answers equal here are certainly equivalent."""
    answer = _SPACING.sub("", answer).replace("$", "")
    answer = answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    answer = _TEXT_WRAP.sub(r"\1", answer).rstrip(".")
    if _THOUSANDS.fullmatch(answer):
        answer = answer.replace(",", "")
    letter = _LETTER.fullmatch(answer)
    if letter:  # a multiple-choice letter: "(A)", "A", "a"
        return letter.group(1).upper()
    return answer
