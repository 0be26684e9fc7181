"""The embedded synthetic task: seeded multi-step arithmetic word problems with long-CoT-like traces.

Every row is a flat record ``{"id", "problem", "reasoning", "answer", "meta"}``. The reasoning
puts the derivation first (one line per operation) and two verifications after it (the same
total recomputed in another order, then the steps undone back to the start), so — as in real
long-CoT traces — the first correct derivation sits early and the rest is checking. ``meta``
keeps the ground truth (start value, signed operations, result) so a grader can recompute the
answer without trusting the text.

Difficulty knobs: ``steps`` (how many operations follow the start) and ``digits`` (how many
digits each quantity has). The running value stays in [0, 2 * 10 ** digits]; every value the trace
mentions is a non-negative integer.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from essence.errors import EssenceError
from essence.io import write_text_atomic
from essence.rundir import check_out_dir

DEMO_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
"""Appended to each problem (after a newline) in the user turn, in training and at evaluation."""

_NAMES = [("Mia", "She"), ("Tom", "He"), ("Ana", "She"), ("Leo", "He"), ("Zoe", "She"), ("Max", "He")]
_ITEMS = ["apples", "marbles", "stickers", "coins", "pencils", "cards", "shells", "books"]
_CONTAINERS = ["bags", "boxes", "packs", "jars"]
# (third person, base form) so the trace can name the operation its line performs.
_ADD_VERBS = [("finds", "Find"), ("gets", "Get"), ("buys", "Buy"), ("wins", "Win")]
_SUB_VERBS = [("gives away", "Give away"), ("loses", "Lose"), ("sells", "Sell"), ("uses", "Use")]

DEFAULT_STEPS = (2, 4)
DEFAULT_DIGITS = 1
"""The defaults are tuned so a ~1M-parameter model learns the task on a laptop CPU in minutes,
while a model that answers without working guesses right only about one time in six."""


def generate(
    n: int, seed: int, *, steps: tuple[int, int] = DEFAULT_STEPS, digits: int = DEFAULT_DIGITS
) -> list[dict]:
    """Generate ``n`` word problems with traces; the same (n, seed, steps, digits) gives the same rows.

    steps: inclusive range of the number of operations after the start value.
    digits: digits of each quantity (start, amounts added or removed, group sizes); group counts
        have one digit.
    """
    _check_knobs(n, steps, digits)
    rng = random.Random(f"essence-synth:{seed}:{steps[0]}:{steps[1]}:{digits}")
    return [_row(rng, f"synth-{seed}-{i:06d}", rng.randint(*steps), digits) for i in range(n)]


def write_jsonl(rows: list[dict], path: str | os.PathLike) -> None:
    """Write rows as JSON lines, atomically: readers see the old file or the whole new one."""
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def synth_command(
    n: int, seed: int, out: str, steps: tuple[int, int] = DEFAULT_STEPS, digits: int = DEFAULT_DIGITS
) -> int:
    """`essence data synth`: generate ``n`` rows and write them to ``out``; returns the row count."""
    path = Path(out)
    if path.is_dir():
        raise EssenceError(f"--out {out} is a folder; give a file name such as {path / 'synth.jsonl'}")
    check_out_dir(path.parent, "--out", given=out)
    rows = generate(n, seed, steps=steps, digits=digits)
    write_jsonl(rows, out)
    return len(rows)


def solve(meta: dict) -> int:
    """Recompute a row's answer from its recorded start value and signed operations."""
    value = meta["start"]
    for op, amount in meta["ops"]:
        value = value + amount if op == "+" else value - amount
    return value


def _check_knobs(n: int, steps: tuple[int, int], digits: int) -> None:
    if n < 0:
        raise EssenceError(f"synth: --n must be >= 0, got {n}")
    if len(steps) != 2 or not 1 <= steps[0] <= steps[1]:
        raise EssenceError(f"synth: --steps must be MIN MAX with 1 <= MIN <= MAX, got {tuple(steps)}")
    if not 1 <= digits <= 6:
        raise EssenceError(f"synth: --digits must be between 1 and 6, got {digits}")


def _row(rng: random.Random, row_id: str, n_steps: int, digits: int) -> dict:
    name, pron = rng.choice(_NAMES)
    item = rng.choice(_ITEMS)
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    cap = _value_cap(digits)
    start = rng.randint(lo, hi)
    value = start
    sentences = [f"{name} has {start} {item}."]
    work = [f"Start: {start}."]
    ops: list[tuple[str, int]] = []  # signed change of each step, for the checks and the grader
    for _ in range(n_steps):
        kind = rng.choice(_feasible_kinds(value, lo, hi, cap))
        sentence, lines, op = _step(rng, kind, value, pron, item, lo, hi, cap)
        sentences.append(sentence)
        work.extend(lines)
        ops.append(op)
        value = value + op[1] if op[0] == "+" else value - op[1]
    question = rng.choice(["How many {item} does {name} have now?", "How many {item} does {name} have at the end?"])
    sentences.append(question.format(item=item, name=name))
    work.append(f"So {name} has {value} {item}.")
    reasoning = "\n".join(work + _checks(start, ops, value))
    meta = {"start": start, "ops": [list(op) for op in ops], "result": value, "steps": n_steps, "digits": digits}
    assert solve(meta) == value, f"{row_id}: trace and ground truth disagree"
    return {
        "id": row_id,
        "problem": " ".join(sentences),
        "reasoning": reasoning,
        "answer": f"The answer is \\boxed{{{value}}}.",
        "meta": meta,
    }


def _value_cap(digits: int) -> int:
    """The largest running value: twice the largest quantity, so values stay small and varied."""
    return 2 * 10**digits


def _feasible_kinds(value: int, lo: int, hi: int, cap: int) -> list[str]:
    """Kinds of step that keep the running value in [0, cap] with quantities in [lo, hi]."""
    kinds = []
    if value + lo <= cap:
        kinds += ["add", "groups_add"]
    if value >= lo:
        kinds += ["sub", "groups_sub"]
    return kinds


def _step(rng, kind, value, pron, item, lo, hi, cap) -> tuple[str, list[str], tuple[str, int]]:
    """One operation: its sentence in the problem, its lines in the trace, its signed amount."""
    if kind in ("add", "sub"):
        top = min(hi, cap - value) if kind == "add" else min(hi, value)
        k = rng.randint(lo, top)
        third, base = rng.choice(_ADD_VERBS if kind == "add" else _SUB_VERBS)
        more = " more" if kind == "add" else ""
        sign = "+" if kind == "add" else "-"
        new = value + k if kind == "add" else value - k
        return f"{pron} {third} {k}{more} {item}.", [f"{base} {k}: {value} {sign} {k} = {new}."], (sign, k)
    # Groups: m groups of g, m one digit, g a quantity of the usual size (at least 2).
    top = value if kind == "groups_sub" else cap - value
    sizes = [(m, range(max(2, lo), min(hi, top // m) + 1)) for m in range(2, 10)]
    sizes = [(m, gs) for m, gs in sizes if len(gs)]
    if not sizes:  # no room for groups: a plain step of the same sign instead
        return _step(rng, "add" if kind == "groups_add" else "sub", value, pron, item, lo, hi, cap)
    m, gs = rng.choice(sizes)
    g = rng.choice(gs)
    total = m * g
    if kind == "groups_add":
        box = rng.choice(_CONTAINERS)
        sentence = f"{pron} buys {m} {box} of {g} {item} each."
        lines = [f"{m} {box} of {g} is {m} * {g} = {total}.", f"{value} + {total} = {value + total}."]
        return sentence, lines, ("+", total)
    sentence = f"{pron} gives {m} friends {g} {item} each."
    lines = [f"{m} friends get {g} each: {m} * {g} = {total}.", f"{value} - {total} = {value - total}."]
    return sentence, lines, ("-", total)


def _running_sum(amounts: list[int]) -> str:
    """'36 + 12 = 48, 48 + 40 = 88' — pairwise, so each line is one small addition."""
    if not amounts:
        return "0"
    parts, acc = [], amounts[0]
    for a in amounts[1:]:
        parts.append(f"{acc} + {a} = {acc + a}")
        acc += a
    return ", ".join(parts) if parts else str(acc)


def _checks(start: int, ops: list[tuple[str, int]], result: int) -> list[str]:
    """Two verifications: all additions first then all removals, then every step undone."""
    gains = [a for op, a in ops if op == "+"]
    losses = [a for op, a in ops if op == "-"]
    g, l = sum(gains), sum(losses)
    lines = [
        "Check another way.",
        f"Added in all: {_running_sum(gains)}.",
        f"Removed in all: {_running_sum(losses)}.",
        f"{start} + {g} = {start + g}, {start + g} - {l} = {result}.",
    ]
    back, value = [], result
    for op, a in reversed(ops):
        prev = value - a if op == "+" else value + a
        back.append(f"{value} {'-' if op == '+' else '+'} {a} = {prev}")
        value = prev
    lines.append(f"Going back: {', '.join(back)}, the start.")
    lines.append(f"Both checks give {result}.")
    return lines
