"""Evaluation results: one details line per problem, a summary per benchmark, files and a table.

The summary is computed from the details lines alone, so anyone can recompute (or re-grade)
a benchmark from details.jsonl and get the same numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean
from typing import Any

from essence.eval.benchmarks import Problem
from essence.eval.generate import Sample
from essence.eval.grading import THINK_CLOSE, GradeResult, pass_at_k
from essence.io import write_text_atomic

SUMMARY_FILE = "summary.json"
DETAILS_FILE = "details.jsonl"


def details_line(
    benchmark: str, problem: Problem, prompt: str, samples: list[Sample], grades: list[GradeResult]
) -> dict:
    """Everything about one problem: its prompt, gold, and each response with its grade."""
    return {
        "benchmark": benchmark,
        "id": problem.id,
        "problem": problem.problem,
        "prompt": prompt,
        "gold": problem.answer,
        "responses": [s.text for s in samples],
        "extracted": [g.extracted for g in grades],
        "correct": [g.correct for g in grades],
        "num_tokens": [s.num_tokens for s in samples],
        "truncated": [s.truncated for s in samples],
        "grading_errors": [g.error for g in grades],
        "meta": problem.meta,
    }


def pass_k_values(n: int) -> list[int]:
    """The k reported for n samples: powers of two up to n, and n itself."""
    ks = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return ks if ks[-1] == n else ks + [n]


def summarize(lines: list[dict], *, benchmark: str, model: str, seconds: float) -> dict[str, Any]:
    """One benchmark's scores from its details lines (all with the same number of samples n)."""
    n = len(lines[0]["correct"])
    assert all(len(line["correct"]) == n for line in lines), "every problem must have n samples"
    counts = [sum(line["correct"]) for line in lines]
    tokens = [t for line in lines for t in line["num_tokens"]]
    responses = [r for line in lines for r in line["responses"]]
    return {
        "benchmark": benchmark,
        "model": model,
        "n": n,
        "num_problems": len(lines),
        # pass@1 is the mean accuracy over all samples (pass_at_k(n, c, 1) == c / n).
        "pass@1": float(mean(c / n for c in counts)),
        "pass@k": {
            str(k): float(mean(pass_at_k(n, c, k) for c in counts)) for k in pass_k_values(n)
        },
        "mean_response_tokens": float(mean(tokens)),
        "think_closed_frac": float(mean(THINK_CLOSE in r for r in responses)),
        "truncated_frac": float(mean(t for line in lines for t in line["truncated"])),
        "grading_errors": sum(e is not None for line in lines for e in line["grading_errors"]),
        "time_s": round(seconds, 3),
        **{f"by_{key}": _breakdown(lines, key) for key in BREAKDOWN_KEYS
           if all(line.get("meta", {}).get(key) is not None for line in lines)},
    }


BREAKDOWN_KEYS = ("subject", "level")
"""Columns a benchmark's scores are also broken down by, when every problem has them (MATH-500)."""


def _breakdown(lines: list[dict], key: str) -> dict[str, dict[str, Any]]:
    """pass@1 and problem count per value of meta[key], in sorted order of the values."""
    groups: dict[str, list[float]] = {}
    for line in lines:
        correct = line["correct"]
        groups.setdefault(str(line["meta"][key]), []).append(sum(correct) / len(correct))
    return {value: {"num_problems": len(scores), "pass@1": float(mean(scores))}
            for value, scores in sorted(groups.items())}


def write_results(out_dir: Path, summary: dict, lines: list[dict]) -> None:
    """Write details.jsonl, then summary.json; each file is replaced whole or not at all, so a
    failed write (a full disk) leaves the summary describing details that are all there."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # default=str: a local file's extra columns (dates, decimals) must not stop the write.
    text = "".join(json.dumps(line, ensure_ascii=False, default=str) + "\n" for line in lines)
    write_text_atomic(out_dir / DETAILS_FILE, text)
    write_text_atomic(out_dir / SUMMARY_FILE, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")


def print_table(entries: list[dict]) -> None:
    """The per-benchmark scores as a console table (files shown by stem; summary.json has the path)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    # think: share of responses that closed </think>; cut: share that hit max_new_tokens;
    # err: grading errors (timeouts, unparseable answers), each counted wrong.
    table = Table(
        title="evaluation",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
        caption="think: closed </think>  cut: hit max_new_tokens",
    )
    names = [Path(e["benchmark"]).stem for e in entries]
    table.add_column("benchmark", overflow="fold", min_width=min(24, max(map(len, names))))
    for column in ("probs", "n", "pass@1", "pass@n", "tokens", "think", "cut", "err", "time"):
        table.add_column(column, justify="right", no_wrap=True)
    for name, e in zip(names, entries):
        table.add_row(
            name,
            str(e["num_problems"]),
            str(e["n"]),
            f"{e['pass@1']:.3f}",
            f"{e['pass@k'][str(e['n'])]:.3f}",
            f"{e['mean_response_tokens']:.0f}",
            f"{e['think_closed_frac']:.0%}",
            f"{e['truncated_frac']:.0%}",
            str(e["grading_errors"]),
            f"{e['time_s']:.0f}s",
        )
    Console().print(table)
    for name, e in zip(names, entries):
        for key in BREAKDOWN_KEYS:
            if f"by_{key}" in e:
                Console().print(_breakdown_table(f"{name} by {key}", e[f"by_{key}"]))


def _breakdown_table(title: str, groups: dict[str, dict[str, Any]]):
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("group")
    for column in ("probs", "pass@1"):
        table.add_column(column, justify="right", no_wrap=True)
    for value, g in groups.items():
        table.add_row(value, str(g["num_problems"]), f"{g['pass@1']:.3f}")
    return table


