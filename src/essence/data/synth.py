"""The embedded synthetic task: seeded multi-step arithmetic word problems with long-CoT-like traces.

Every row is a flat record ``{"id", "problem", "reasoning", "answer", "meta"}`` shaped like a real
long-CoT trace (Bespoke-Stratos: about 8% prompt, 71% CoT, 21% answer once rendered):

- a short problem (one sentence per operation, then the question);
- reasoning that does the working first (an opening line, one line per operation, then "So …
  has N"), followed by a varied run of re-checks — the total regrouped, the steps undone, the
  problem re-read, the values recounted, a moment of doubt about one step — and a closing line,
  so the first correct derivation sits early and the rest is verification;
- an answer that writes the solution up (one numbered line per operation) and ends in
  ``The answer is \\boxed{N}.``

``meta`` keeps the ground truth (start value, signed operations, result) so a grader can
recompute the answer without trusting the text, and ``derivation_end``: the character offset in
``reasoning`` just after the working's conclusion.

Knobs: ``steps`` (operations after the start value; the difficulty), ``digits`` (digits of each
quantity), ``checks`` (how many re-checks follow the working; the CoT's share), ``writeup``
(a written-up solution, or the bare boxed line; the answer's share). The running value stays in
[0, 2 * 10 ** digits]; every value the trace mentions is a non-negative integer, and every
equation in it is true.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

from essence.errors import EssenceError
from essence.io import check_out_dir, write_text_atomic

DEMO_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
"""Appended to each problem (after a newline) in the user turn, in training and at evaluation."""

_NAMES = [("Mia", "She"), ("Tom", "He"), ("Ana", "She"), ("Leo", "He"), ("Zoe", "She"), ("Max", "He")]
_ITEMS = ["apples", "marbles", "stickers", "coins", "pencils", "cards", "shells", "books"]
_CONTAINERS = ["bags", "boxes", "packs", "jars"]
# (third person, base form) so the trace can name the operation its line performs.
_ADD_VERBS = [("finds", "Find"), ("gets", "Get"), ("buys", "Buy"), ("wins", "Win")]
_SUB_VERBS = [("gives away", "Give away"), ("loses", "Lose"), ("sells", "Sell"), ("uses", "Use")]
_OPENERS = [  # real traces open by restating the problem
    "Okay, so {name} has {start} {item}, and then {n} things happen. I need the number at the end. "
    "Let me go step by step.",
    "Let me figure out how many {item} {name} ends up with. There are {n} changes after the start, "
    "so I'll take them one at a time.",
    "Alright, {name} starts with {start} {item}. Then come {n} changes. Let me work through them in order.",
]
_CLOSERS = ["So the answer is {result}.", "I'm confident: {name} has {result} {item}.",
            "Everything agrees, so the answer is {result}."]
_AGREE = ["Same.", "That matches.", "Good.", "Yes, {result}."]

DEFAULT_STEPS = (3, 5)
"""The demo's task: the teacher solves these; the base student only saw ``EASY_STEPS``."""
EASY_STEPS = (1, 2)
"""The easier problems the demo's base student is pre-trained on (complete traces)."""
DEFAULT_DIGITS = 1
DEFAULT_CHECKS = (4, 6)
"""With these defaults (the demo tokenizer, rendered as the demo renders them) a sequence is
about 10% prompt, 70% CoT and 20% answer, and the working ends about a third into the CoT."""
CHECK_KINDS = ("regroup", "backward", "reread", "recount", "redo", "doubt")


def generate(
    n: int, seed: int, *, steps: tuple[int, int] = DEFAULT_STEPS, digits: int = DEFAULT_DIGITS,
    checks: tuple[int, int] = DEFAULT_CHECKS, writeup: bool = True,
) -> list[dict]:
    """Generate ``n`` word problems with traces; the same arguments give the same rows.

    steps: inclusive range of the number of operations after the start value.
    digits: digits of each quantity (start, amounts added or removed, group sizes); group counts
        have one digit.
    checks: inclusive range of the number of re-checks after the working (0 to 5; distinct kinds).
    writeup: the answer writes the solution up before its boxed line (True), or is the boxed
        line alone.
    """
    _check_knobs(n, steps, digits, checks)
    key = f"essence-synth:{seed}:{steps[0]}:{steps[1]}:{digits}:{checks[0]}:{checks[1]}:{writeup}"
    rng = random.Random(key)
    return [_row(rng, f"synth-{seed}-{i:06d}", rng.randint(*steps), digits, rng.randint(*checks), writeup)
            for i in range(n)]


def write_jsonl(rows: list[dict], path: str | os.PathLike) -> None:
    """Write rows as JSON lines, atomically: readers see the old file or the whole new one."""
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def synth_command(
    n: int, seed: int, out: str, steps: tuple[int, int] = DEFAULT_STEPS, digits: int = DEFAULT_DIGITS,
    checks: tuple[int, int] = DEFAULT_CHECKS, writeup: bool = True,
) -> int:
    """`essence data synth`: generate ``n`` rows and write them to ``out``; returns the row count."""
    path = Path(out)
    if path.is_dir():
        raise EssenceError(f"--out {out} is a folder; give a file name such as {path / 'synth.jsonl'}")
    check_out_dir(path.parent, "--out", given=out)
    rows = generate(n, seed, steps=steps, digits=digits, checks=checks, writeup=writeup)
    write_jsonl(rows, out)
    return len(rows)


def solve(meta: dict) -> int:
    """Recompute a row's answer from its recorded start value and signed operations."""
    value = meta["start"]
    for op, amount in meta["ops"]:
        value = value + amount if op == "+" else value - amount
    return value


_CONCLUSION = re.compile(r"^So \S+ has (\d+)\b", re.M)


def first_derivation(response: str) -> int | None:
    """The value a response's working concludes with (its first "So Mia has N" line), or None.

    The first correct derivation, read without the answer: a student that works the problem out
    and then never closes its thinking is right here and wrong by the grader.
    """
    found = _CONCLUSION.search(response)
    return int(found.group(1)) if found else None


def _check_knobs(n: int, steps: tuple[int, int], digits: int, checks: tuple[int, int]) -> None:
    if n < 0:
        raise EssenceError(f"synth: --n must be >= 0, got {n}")
    if len(steps) != 2 or not 1 <= steps[0] <= steps[1]:
        raise EssenceError(f"synth: --steps must be MIN MAX with 1 <= MIN <= MAX, got {tuple(steps)}")
    if not 1 <= digits <= 6:
        raise EssenceError(f"synth: --digits must be between 1 and 6, got {digits}")
    if len(checks) != 2 or not 0 <= checks[0] <= checks[1] <= len(CHECK_KINDS):
        raise EssenceError(f"synth: --checks must be MIN MAX with 0 <= MIN <= MAX <= {len(CHECK_KINDS)}, "
                           f"got {tuple(checks)}")


def _row(rng: random.Random, row_id: str, n_steps: int, digits: int, n_checks: int, writeup: bool) -> dict:
    name, pron = rng.choice(_NAMES)
    item = rng.choice(_ITEMS)
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    cap = 2 * 10**digits  # the largest running value: twice the largest quantity
    start = rng.randint(lo, hi)
    value = start
    sentences = [f"{name} has {start} {item}."]
    steps: list[dict] = []  # one per operation: sentence, working lines, write-up line, signed change
    for _ in range(n_steps):
        kind = rng.choice(_feasible_kinds(value, lo, cap))
        step = _step(rng, kind, value, pron, lo, hi, cap)
        sentences.append(step["sentence"])
        steps.append(step)
        value = step["after"]
    question = rng.choice(["How many {item} does {name} have now?", "How many {item} does {name} have at the end?"])
    sentences.append(question.format(item=item, name=name))
    ops = [step["op"] for step in steps]
    fill = {"name": name, "item": item, "start": start, "n": n_steps, "result": value}
    working = [rng.choice(_OPENERS).format(**fill), f"Start: {start}."]
    working += [line for step in steps for line in step["work"]]
    working.append(f"So {name} has {value} {item}.")
    kinds = rng.sample(CHECK_KINDS, n_checks)
    checks = [_check(rng, kind, start, steps, value) + " " + rng.choice(_AGREE).format(**fill) for kind in kinds]
    closer = rng.choice(_CLOSERS)  # drawn either way, so every row draws the same numbers
    if not kinds:
        closer = _CLOSERS[0]  # nothing was re-checked: no "everything agrees"
    reasoning = "\n".join(working + checks + [closer.format(**fill)])
    meta = {"start": start, "ops": [list(op) for op in ops], "result": value, "steps": n_steps,
            "digits": digits, "checks": kinds, "derivation_end": len("\n".join(working))}
    assert solve(meta) == value, f"{row_id}: trace and ground truth disagree"
    return {
        "id": row_id,
        "problem": " ".join(sentences),
        "reasoning": reasoning,
        "answer": _writeup(name, item, start, steps, value) if writeup else _boxed(value),
        "meta": meta,
    }


def _boxed(value: int) -> str:
    return f"The answer is \\boxed{{{value}}}."


def _writeup(name: str, item: str, start: int, steps: list[dict], result: int) -> str:
    """The answer section: the solution written up, one numbered line per operation, then the box."""
    lines = [f"{name} starts with {start} {item}."]
    lines += [f"{i}. {step['summary']}" for i, step in enumerate(steps, 1)]
    return "\n".join(lines + [f"{name} has {result} {item} at the end.", "", _boxed(result)])


def _feasible_kinds(value: int, lo: int, cap: int) -> list[str]:
    """Kinds of step that keep the running value in [0, cap] with quantities of at least lo."""
    kinds = []
    if value + lo <= cap:
        kinds += ["add", "groups_add"]
    if value >= lo:
        kinds += ["sub", "groups_sub"]
    return kinds


def _step(rng, kind, value, pron, lo, hi, cap) -> dict:
    """One operation: its sentence, working lines, write-up line, signed change and the value after."""
    if kind in ("add", "sub"):
        top = min(hi, cap - value) if kind == "add" else min(hi, value)
        k = rng.randint(lo, top)
        third, base = rng.choice(_ADD_VERBS if kind == "add" else _SUB_VERBS)
        sign = "+" if kind == "add" else "-"
        new = value + k if kind == "add" else value - k
        eq = f"{value} {sign} {k} = {new}"
        return {"sentence": f"{pron} {third} {k}{' more' if kind == 'add' else ''}.",
                "work": [f"{base} {k}: {eq}."], "summary": f"{pron} {third} {k}: {eq}.",
                "op": (sign, k), "before": value, "after": new, "group": None}
    # Groups: m groups of g, m one digit, g a quantity of the usual size (at least 2).
    top = value if kind == "groups_sub" else cap - value
    sizes = [(m, range(max(2, lo), min(hi, top // m) + 1)) for m in range(2, 10)]
    sizes = [(m, gs) for m, gs in sizes if len(gs)]
    if not sizes:  # no room for groups: a plain step of the same sign instead
        return _step(rng, "add" if kind == "groups_add" else "sub", value, pron, lo, hi, cap)
    m, gs = rng.choice(sizes)
    g = rng.choice(gs)
    total = m * g
    if kind == "groups_add":
        box = rng.choice(_CONTAINERS)
        new = value + total
        return {"sentence": f"{pron} buys {m} {box} of {g} each.",
                "work": [f"{m} {box} of {g} is {m} * {g} = {total}.", f"{value} + {total} = {new}."],
                "summary": f"{pron} buys {m} * {g} more: {value} + {total} = {new}.",
                "op": ("+", total), "before": value, "after": new, "group": (m, g)}
    new = value - total
    return {"sentence": f"{pron} gives {m} friends {g} each.",
            "work": [f"{m} friends get {g} each: {m} * {g} = {total}.", f"{value} - {total} = {new}."],
            "summary": f"{pron} gives away {m} * {g}: {value} - {total} = {new}.",
            "op": ("-", total), "before": value, "after": new, "group": (m, g)}


def _running_sum(amounts: list[int]) -> str:
    """'36 + 12 = 48, 48 + 40 = 88' — pairwise, so each part is one small addition."""
    if not amounts:
        return "0"
    parts, acc = [], amounts[0]
    for a in amounts[1:]:
        parts.append(f"{acc} + {a} = {acc + a}")
        acc += a
    return ", ".join(parts) if parts else str(acc)


def _check(rng: random.Random, kind: str, start: int, steps: list[dict], result: int) -> str:
    """One re-check of the working, as real traces re-derive and doubt (every equation true)."""
    ops = [step["op"] for step in steps]
    if kind == "regroup":
        gains = [a for op, a in ops if op == "+"]
        losses = [a for op, a in ops if op == "-"]
        g, l = sum(gains), sum(losses)
        return (f"Wait, let me check another way. Added in all: {_running_sum(gains)}. Removed in all: "
                f"{_running_sum(losses)}. {start} + {g} = {start + g}, {start + g} - {l} = {result}.")
    if kind == "backward":
        back, value = [], result
        for op, a in reversed(ops):
            prev = value - a if op == "+" else value + a
            back.append(f"{value} {'-' if op == '+' else '+'} {a} = {prev}")
            value = prev
        return f"Let me go backwards from {result}: {', '.join(back)}, the start."
    if kind == "reread":
        signed = ", ".join(f"{op}{a}" for op, a in ops)
        return f"Let me re-read the problem. It starts at {start}, then {signed}. Those are the amounts I used."
    if kind == "recount":
        values = ", ".join(str(step["after"]) for step in steps)
        return f"Recounting the running values: {start}, {values}. It ends at {result}."
    if kind == "redo":
        chain = ", ".join(f"{s['before']} {s['op'][0]} {s['op'][1]} = {s['after']}" for s in steps)
        return f"Actually, let me redo the whole thing quickly: {chain}. Still {result}."
    step = rng.choice(steps)  # doubt one step and redo it another way
    before, after, (op, a) = step["before"], step["after"], step["op"]
    if step["group"]:
        m, g = step["group"]
        return (f"Hmm, is {m} * {g} really {a}? {' + '.join([str(g)] * m)} = {a}. Yes, "
                f"and {before} {op} {a} = {after}.")
    inverse = f"{after} + {a} = {before}" if op == "-" else f"{after} - {a} = {before}"
    return f"Hmm, did I get {before} {op} {a} right? {inverse}, so {after} is right."
