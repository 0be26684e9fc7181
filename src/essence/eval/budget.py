"""A thinking budget at evaluation: after N thinking tokens without `</think>`, close the block
and let the model answer.

Two phases, the same on every backend. Phase 1 is the plain evaluation (so the unbudgeted
result comes with it, and with greedy decoding equals an evaluation without a budget). A
response that closed `</think>` within N thinking tokens, or ended within N tokens, is left as
it is. Every other response is *forced*: cut after exactly N thinking tokens, `</think>` and the
blank line after it appended (as the training template writes them), and phase 2 lets the model
write its answer in at most `answer_max_tokens` new tokens.

The budget caps test-time compute, and it tells "did not finish" apart from "does not know": a
student that knows the answer but never concludes gains accuracy under a budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from statistics import mean

from essence.errors import EssenceError
from essence.eval.generate import Sample, SamplingSettings

THINK_CLOSE = "</think>"
CLOSE_TEXT = THINK_CLOSE + "\n\n"  # the tag and the blank line after it, as training renders it

# (prompts as token ids, sampling settings) -> [prompts][n] Samples, on any backend.
Generate = Callable[[list[list[int]], SamplingSettings], list[list[Sample]]]


@dataclass(frozen=True)
class ThinkingBudget:
    """At most `thinking` thinking tokens, then at most `answer_max_tokens` for the answer."""

    thinking: int
    answer_max_tokens: int = 64

    def check(self) -> None:
        if not isinstance(self.thinking, int) or self.thinking < 1:
            raise EssenceError(f"--thinking-budget (eval.thinking_budget) must be an integer ≥ 1, "
                               f"got {self.thinking!r}; leave it unset for no budget")
        if not isinstance(self.answer_max_tokens, int) or self.answer_max_tokens < 1:
            raise EssenceError(f"--answer-max-tokens (eval.answer_max_tokens) must be an integer "
                               f"≥ 1, got {self.answer_max_tokens!r}")


def find(needle: list[int], haystack: tuple[int, ...] | list[int]) -> int | None:
    """The first index where `needle` starts in `haystack`, or None."""
    width = len(needle)
    for i in range(len(haystack) - width + 1):
        if list(haystack[i:i + width]) == needle:
            return i
    return None


def thinking_tokens(sample: Sample, close: list[int]) -> int:
    """Tokens before `</think>`; a response that never closed thinks for all its tokens."""
    at = find(close, sample.ids)
    return len(sample.ids) if at is None else at


def is_forced(sample: Sample, close: list[int], budget: int) -> bool:
    """Whether the budget cuts this response: no `</think>` within `budget` thinking tokens,
    and the response went on past them."""
    at = find(close, sample.ids)
    return len(sample.ids) > budget and (at is None or at > budget)


@dataclass(frozen=True)
class Budgeted:
    """One response under the budget, beside the unbudgeted one it came from."""

    sample: Sample
    unbudgeted: Sample
    forced: bool
    thinking_tokens: int
    thinking_tokens_unbudgeted: int


def apply_budget(samples: list[list[Sample]], prompt_ids: list[list[int]], generate: Generate,
                 tokenizer, settings: SamplingSettings,
                 budget: ThinkingBudget) -> list[list[Budgeted]]:
    """Phase 2 for every forced response of phase 1's `samples` ([prompts][n])."""
    close = tokenizer(THINK_CLOSE, add_special_tokens=False)["input_ids"]
    close_full = tokenizer(CLOSE_TEXT, add_special_tokens=False)["input_ids"]
    n = budget.thinking
    forced = [(i, s) for i, row in enumerate(samples) for s, sample in enumerate(row)
              if is_forced(sample, close, n)]
    heads = [list(samples[i][s].ids[:n]) + close_full for i, s in forced]
    # Nothing forced, no phase 2: a backend is never asked for zero prompts.
    answers = generate([prompt_ids[i] + head for (i, _), head in zip(forced, heads)],
                       replace(settings, n=1, max_new_tokens=budget.answer_max_tokens)
                       ) if forced else []
    cut = {}
    for (i, s), head, (answer,) in zip(forced, heads, answers):
        ids = head + list(answer.ids)
        cut[i, s] = Sample(tokenizer.decode(ids, skip_special_tokens=False),
                           len(head) + answer.num_tokens, answer.truncated, tuple(ids))
    return [[Budgeted(cut.get((i, s), sample), sample, (i, s) in cut,
                      n if (i, s) in cut else thinking_tokens(sample, close),
                      thinking_tokens(sample, close))
             for s, sample in enumerate(row)] for i, row in enumerate(samples)]


def budget_fields(row: list[Budgeted], unbudgeted_correct: list[bool]) -> dict:
    """What a details line adds under a budget (the unbudgeted responses and their grades)."""
    return {"forced": [b.forced for b in row],
            "thinking_tokens": [b.thinking_tokens for b in row],
            "unbudgeted_responses": [b.unbudgeted.text for b in row],
            "unbudgeted_correct": unbudgeted_correct,
            "unbudgeted_thinking_tokens": [b.thinking_tokens_unbudgeted for b in row],
            "unbudgeted_num_tokens": [b.unbudgeted.num_tokens for b in row]}


def summarize_budget(lines: list[dict], budget: ThinkingBudget) -> dict:
    """The summary's "budget" block, from the details lines alone."""
    def per_problem(key: str) -> float:
        return float(mean(sum(line[key]) / len(line[key]) for line in lines))

    forced = [f for line in lines for f in line["forced"]]
    return {
        "thinking_budget": budget.thinking,
        "answer_max_tokens": budget.answer_max_tokens,
        "pass@1": per_problem("correct"),
        "pass@1_unbudgeted": per_problem("unbudgeted_correct"),
        "thinking_tokens_mean": float(mean(t for line in lines for t in line["thinking_tokens"])),
        "thinking_tokens_mean_unbudgeted": float(mean(
            t for line in lines for t in line["unbudgeted_thinking_tokens"])),
        "forced": sum(forced),
        "forced_frac": sum(forced) / len(forced),
    }


def budgeted_lines(bench: str, problems: list, prompts: list[str], samples: list[list[Sample]],
                   generate: Generate, tokenizer, settings: SamplingSettings,
                   budget: ThinkingBudget) -> list[dict]:
    """The details lines of one benchmark under the budget: the budgeted responses graded, and
    the unbudgeted ones (phase 1) with their grades beside them."""
    from essence.eval.grading import grade_detail
    from essence.eval.results import details_line

    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    rows = apply_budget(samples, prompt_ids, generate, tokenizer, settings, budget)
    lines = []
    for problem, prompt, row in zip(problems, prompts, rows):
        line = details_line(bench, problem, prompt, [b.sample for b in row],
                            [grade_detail(b.sample.text, problem.answer) for b in row])
        plain = [grade_detail(b.unbudgeted.text, problem.answer).correct for b in row]
        lines.append({**line, **budget_fields(row, plain)})
    return lines
