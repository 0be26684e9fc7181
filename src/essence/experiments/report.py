"""The trade-off report: accuracy against what each run cost, across a folder of runs.

Every run directory with a summary.json becomes one row. The baseline is the
full-sequence run (truncation lsp=1, or the run named by --baseline); retention and
savings are measured against it. Evaluation-only directories (a summary with an eval
block but no training) appear as reference rows, e.g. the undistilled base student.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from essence.errors import EssenceError
from essence.io import (
    check_out_dir,
    write_failure,
    write_json_atomic,
    write_text_atomic,
)

COLUMNS = ("run", "truncation", "lsp", "accuracy", "retention_pct", "student_tokens",
           "total_flops", "wall_time_s", "peak_memory_bytes", "token_saving_pct",
           "flops_saving_pct", "time_saving_pct", "memory_saving_pct")


SAMPLING_COLUMNS = {"truncation": ("sampling",),
                    "wall_time_s": ("generation_flops", "generation_time_s")}
"""Shown after the key column when a run trained on sampled text (essence.train.sampling): what its
generation cost, apart from (and included in) the run's total FLOPs and time."""


BUDGET_COLUMNS = ("accuracy_unbudgeted", "thinking_tokens", "thinking_tokens_unbudgeted",
                  "forced_pct")
"""Shown after accuracy when a run was evaluated under a thinking budget (eval.thinking_budget):
the accuracy without it, mean thinking tokens with and without it, and the share it closed."""


def columns(rows: list[dict]) -> tuple[str, ...]:
    """The report's columns: COLUMNS, with the sampling ones when any run sampled and the budget
    ones when any run was evaluated under a thinking budget."""
    extra = dict(SAMPLING_COLUMNS) if any(r.get("sampling") not in (None, "none")
                                          for r in rows) else {}
    if any(r.get("accuracy_unbudgeted") is not None for r in rows):
        extra["accuracy"] = BUDGET_COLUMNS
    return tuple(c for column in COLUMNS for c in (column, *extra.get(column, ())))


def budget_of(summary: dict) -> dict:
    """Means over benchmarks of the thinking-budget block (empty: evaluated without a budget)."""
    blocks = [b["budget"] for b in bench_scores(summary) if "budget" in b]
    if not blocks:
        return {}

    def avg(key: str) -> float:
        return sum(b[key] for b in blocks) / len(blocks)

    return {"accuracy_unbudgeted": avg("pass@1_unbudgeted"),
            "thinking_tokens": avg("thinking_tokens_mean"),
            "thinking_tokens_unbudgeted": avg("thinking_tokens_mean_unbudgeted"),
            "forced_pct": 100.0 * avg("forced_frac")}


HEADERS = {"sampling": "sampling", "generation_flops": "gen FLOPs", "generation_time_s": "gen time",
           "run": "run", "truncation": "trunc", "lsp": "LSP", "accuracy": "acc",
           "retention_pct": "retain", "student_tokens": "tokens", "total_flops": "FLOPs",
           "wall_time_s": "time", "peak_memory_bytes": "memory", "token_saving_pct": "-tok",
           "flops_saving_pct": "-FLOPs", "time_saving_pct": "-time", "memory_saving_pct": "-mem",
           "accuracy_unbudgeted": "acc (no budget)", "thinking_tokens": "think tok",
           "thinking_tokens_unbudgeted": "think tok (no budget)", "forced_pct": "forced"}


def bench_scores(summary: dict) -> list[dict]:
    """The per-benchmark score blocks of a run's evaluation (empty when it was not evaluated)."""
    results = summary.get("eval") or {}
    benches = results.get("benchmarks", results) if isinstance(results, dict) else {}
    return [b for b in benches.values() if isinstance(b, dict)]


def accuracy_of(summary: dict) -> float | None:
    """Mean pass@1 over the run's evaluated benchmarks (None when it was not evaluated)."""
    scores = [b["pass@1"] for b in bench_scores(summary) if "pass@1" in b]
    return sum(scores) / len(scores) if scores else None


def _read_summary(path: Path) -> dict | None:
    """A run's summary.json, or None (with a warning) when it is unreadable or not a mapping."""
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        print(f"essence report: warning: skipping {path.parent.name}: {path} is unreadable ({err})")
        return None
    if not isinstance(summary, dict):
        print(f"essence report: warning: skipping {path.parent.name}: {path} holds a "
              f"{type(summary).__name__}, not a summary mapping")
        return None
    return summary


def _lsp(run_dir: Path) -> float | None:
    config = run_dir / "config.yaml"
    if not config.is_file():
        return None
    try:
        tree = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
        truncation = tree.get("data", {}).get("truncation", {})
        assert isinstance(truncation, dict)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError, AssertionError):
        print(f"essence report: warning: {config} is unreadable; its LSP is left blank")
        return None
    if any(truncation.get(k) for k in ("window", "cot_lead", "cut_after_think")):
        return None
    return truncation.get("lsp")


def _saving(value, base) -> float | None:
    if value is None or not base:
        return None
    return 100.0 * (1.0 - value / base)


def collect(runs_dir: Path, baseline: str | None = None) -> list[dict]:
    """One row per run directory under runs_dir, with retention and savings filled in."""
    if not runs_dir.is_dir():
        raise EssenceError(f"{runs_dir} is not a directory of runs")
    rows = []
    for summary_path in sorted(runs_dir.glob("*/summary.json")):
        summary = _read_summary(summary_path)
        if summary is None:
            continue
        run_dir = summary_path.parent
        rows.append({
            "run": run_dir.name, "truncation": summary.get("truncation", "-"), "lsp": _lsp(run_dir),
            "accuracy": accuracy_of(summary), "trained": "steps" in summary,
            "student_tokens": summary.get("student_tokens"), "total_flops": summary.get("total_flops"),
            "wall_time_s": summary.get("wall_time_s"),
            "peak_memory_bytes": summary.get("peak_memory_bytes"),
            "sampling": summary.get("sampling"), "generation_flops": summary.get("generation_flops"),
            "generation_time_s": summary.get("generation_time_s"), **budget_of(summary),
        })
    if not rows:
        raise EssenceError(f"no run under {runs_dir} has a summary.json yet")
    base = _baseline(rows, baseline)
    # Trained runs first (longest LSP first), then reference rows such as the base student.
    rows.sort(key=lambda r: (not r["trained"], r["lsp"] is None, -(r["lsp"] or 0), r["run"]))
    for row in rows:
        trained = row.pop("trained")
        acc, base_acc = row["accuracy"], base["accuracy"] if base else None
        row["retention_pct"] = 100.0 * acc / base_acc if acc is not None and base_acc else None
        for key, name in (("student_tokens", "token"), ("total_flops", "flops"),
                          ("wall_time_s", "time"), ("peak_memory_bytes", "memory")):
            row[f"{name}_saving_pct"] = _saving(row[key], base[key]) if base and trained else None
    return rows


def _baseline(rows: list[dict], name: str | None) -> dict | None:
    if name is not None:
        for row in rows:
            if row["run"] == name:
                return row
        raise EssenceError(f"--baseline {name!r} is not a run here; runs: "
                           f"{', '.join(r['run'] for r in rows)}")
    full = [r for r in rows if r["truncation"] == "lsp=1"]
    return full[0] if full else None


def _fmt(key: str, value) -> str:
    if value is None:
        return "-"
    if key in ("accuracy", "accuracy_unbudgeted"):
        return f"{value:.1%}"
    if key.startswith("thinking_tokens"):
        return f"{value:.0f}"
    if key.endswith("_pct"):
        return f"{value:.1f}%"
    if key in ("total_flops", "generation_flops"):
        return f"{value:.3g}"
    if key == "peak_memory_bytes":
        return f"{value / 2**20:.0f} MiB"
    if key in ("wall_time_s", "generation_time_s"):
        return f"{value:.1f} s"
    return str(value)


def headline(rows: list[dict], target: float = 95.0) -> str:
    """The table a reader meets first: each trained recipe's retention and FLOPs share, cheapest
    first, beside the paper's figure, and which one keeps `target`% at the lowest cost."""
    trained = [r for r in rows if r.get("retention_pct") is not None
               and r.get("flops_saving_pct") is not None]
    if not trained:
        return ""
    trained.sort(key=lambda r: -r["flops_saving_pct"])
    cheaper = [r for r in trained if r["flops_saving_pct"] > 0]  # not the baseline itself
    keeping = [r for r in cheaper if r["retention_pct"] >= target]
    if keeping:
        best = keeping[0]
        verdict = (f"**{best['run']}** is the cheapest run here keeping ≥ {target:.0f}%: "
                   f"{best['retention_pct']:.0f}% at {1 - best['flops_saving_pct'] / 100:.2f}× "
                   "the FLOPs of LSP 1.0.")
    elif cheaper:
        best = max(cheaper, key=lambda r: r["retention_pct"])
        verdict = (f"No run cheaper than LSP 1.0 keeps {target:.0f}% here; the best is "
                   f"**{best['run']}**, {best['retention_pct']:.0f}% at "
                   f"{1 - best['flops_saving_pct'] / 100:.2f}× the FLOPs.")
    else:
        verdict = "Only the full-sequence run is here."
    lines = ["| recipe | retention | FLOPs vs LSP 1.0 |", "|---|---|---|",
             "| the paper: LSP 0.5 (Qwen3-8B → 4B) | ~94% | ~0.50× |"]
    lines += [f"| {r['run']} | {r['retention_pct']:.0f}% | "
              f"{1 - r['flops_saving_pct'] / 100:.2f}× |" for r in trained]
    return (f"{verdict} One seed: see docs/frontier.md for a search over seeds.\n\n"
            + "\n".join(lines) + "\n")


def to_markdown(rows: list[dict]) -> str:
    shown = columns(rows)
    header = "| " + " | ".join(shown) + " |"
    rule = "|" + "|".join("---" for _ in shown) + "|"
    body = ["| " + " | ".join(_fmt(c, r.get(c)) for c in shown) + " |" for r in rows]
    return "\n".join([header, rule, *body]) + "\n"


def plot(rows: list[dict], out: Path) -> list[Path]:
    """accuracy_vs_flops.png and accuracy_vs_lsp.png; reference rows as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in rows if r["accuracy"] is not None and r["total_flops"]]
    references = [r for r in rows if r["accuracy"] is not None and not r["total_flops"]]
    written = []
    for name, key, label in (("accuracy_vs_flops.png", "total_flops", "total FLOPs (student + teacher + generation)"),
                             ("accuracy_vs_lsp.png", "lsp", "lead-span proportion (LSP)")):
        points = sorted((r for r in trained if r[key] is not None), key=lambda r: r[key])
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r[key] for r in points], [100 * r["accuracy"] for r in points], "o-")
        for r in points:
            ax.annotate(r["run"], (r[key], 100 * r["accuracy"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
        for r in references:
            ax.axhline(100 * r["accuracy"], linestyle="--", color="grey")
            ax.text(ax.get_xlim()[0], 100 * r["accuracy"], f" {r['run']}", fontsize=7, va="bottom")
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (pass@1, %)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        try:
            fig.savefig(out / name, dpi=120)
        except OSError as err:
            raise EssenceError(f"{write_failure(out / name, err)}; free disk space or choose "
                               "a writable --out") from None
        finally:
            plt.close(fig)
        written.append(out / name)
    return written


def wide_console():
    """A console at least 150 columns wide, so the report table is not squeezed in logs."""
    from rich.console import Console

    console = Console()
    return console if console.width >= 150 else Console(width=150)


def build_report(runs_dir: str | Path, out: str | Path | None = None,
                 baseline: str | None = None, console=None) -> list[dict]:
    """Write report.md, report.json and the plots; print the table; return the rows."""
    runs_dir = Path(runs_dir)
    rows = collect(runs_dir, baseline)
    out = check_out_dir(out if out is not None else runs_dir)
    write_json_atomic(out / "report.json", rows)
    teacher = teacher_costs(runs_dir)
    first = headline(rows)
    write_text_atomic(out / "report.md", "# Trade-off report\n\n"
                      + (f"{first}\n## Every run\n\n" if first else "") + to_markdown(rows)
                      + (f"\n{teacher['line']}\n" if teacher else ""))
    plot(rows, out)
    if teacher and console is not None:
        console.print(teacher["line"])
    if console is not None:
        from rich.table import Table

        table = Table(title=f"trade-off report: {runs_dir} (savings against the full-sequence run)")
        shown = columns(rows)
        for column in shown:
            table.add_column(HEADERS[column], justify="left" if column == "run" else "right")
        for row in rows:
            table.add_row(*(_fmt(c, row.get(c)) for c in shown))
        console.print(table)
    return rows


def teacher_costs(runs_dir: Path) -> dict | None:
    """The runs' teacher FLOPs as spent — each teacher cache's one pass, counted once, plus any
    online teacher — beside what every run running its teacher online would have cost.
    None when no run read a cache."""
    caches: dict[str, tuple[float, float]] = {}
    spent = online = 0.0
    for path in sorted(runs_dir.glob("*/summary.json")):
        summary = _read_summary(path) or {}
        spent += summary.get("teacher_flops") or 0.0
        online += (summary.get("teacher_flops") or 0.0) + (summary.get("teacher_flops_cached") or 0.0)
        if summary.get("teacher_source") == "cache":
            caches[summary["teacher_cache"]] = (summary["teacher_cache_flops"],
                                                summary["teacher_cache_wall_time_s"])
    if not caches:
        return None
    cache_flops = sum(f for f, _ in caches.values())
    total = cache_flops + spent
    line = (f"Teacher FLOPs of these runs: {total:.3g} ({len(caches)} cache pass(es): "
            f"{cache_flops:.3g} FLOPs, {sum(t for _, t in caches.values()):.1f} s; online teachers: "
            f"{spent:.3g}) vs {online:.3g} with every teacher run online "
            f"({total / online if online else float('nan'):.2f}x).")
    return {"caches": len(caches), "cache_flops": cache_flops, "online_flops": spent,
            "total_flops": total, "all_online_flops": online, "line": line}
