"""The frontier search's outputs: frontier.json, frontier.md, frontier.png and winner.yaml.

In: the search's settings, its baseline row and one row per probed recipe (essence.experiments
.frontier). Out: the rows with Pareto flags, the winner stated plainly, and a ready config.
"""

from __future__ import annotations

from pathlib import Path

from essence.config.load import save_config
from essence.config.schema import Config
from essence.errors import EssenceError
from essence.experiments.frontier_stats import cheapest, compact, pareto_flags
from essence.io import write_failure, write_json_atomic, write_text_atomic

PAPER = ("The paper (arXiv 2512.21002) kept about 94% of the full-sequence accuracy at about 50% "
         "of the compute (LSP 0.5, AIME24/25).")
CHOSEN_KEYS = ("recipe", "family", "x", "overrides", "mean", "half_width", "retention",
               "retention_half_width", "flops_ratio")


def _brief(row: dict | None) -> dict | None:
    return {key: row[key] for key in CHOSEN_KEYS} if row else None


def summarize(settings: dict, baseline: dict, rows: list[dict], brackets: dict) -> dict:
    """frontier.json's content: every row with its Pareto flag, and the chosen recipes."""
    everything = [baseline, *rows]
    for row, flag in zip(everything, pareto_flags([(r["mean"], r["flops_ratio"]) for r in everything])):
        row["pareto"] = flag
    best = max(rows, key=lambda r: (r["retention"], -r["flops_ratio"])) if rows else None
    return {"settings": {k: v for k, v in settings.items() if k != "base_config"},
            "baseline": baseline, "points": rows, "brackets": brackets,
            "winner": _brief(cheapest(rows, "meets")),
            "compatible": _brief(cheapest(rows, "compatible")), "best": _brief(best)}


def _pct(value: float, half: float | None = None) -> str:
    return f"{value:.1%}" if half is None else f"{value:.1%} ± {half:.1%}"


def _flag(value) -> str:
    return "-" if value is None else ("yes" if value else "no")


def _table(result: dict) -> list[str]:
    rows = sorted([result["baseline"], *result["points"]],
                  key=lambda r: (r["flops_ratio"], r["recipe"]))
    lines = ["| recipe | seeds | accuracy | retention | FLOPs ratio | meets | compatible | Pareto |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kept = "-" if r["family"] == "baseline" else _pct(r["retention"], r["retention_half_width"])
        name = f"{r['recipe']} (baseline)" if r["family"] == "baseline" else r["recipe"]
        lines.append(f"| {name} | {len(r['accuracies'])} | {_pct(r['mean'], r['half_width'])} "
                     f"| {kept} | {r['flops_ratio']:.3f} | {_flag(r['meets'])} "
                     f"| {_flag(r['compatible'])} | {_flag(r['pareto'])} |")
    return lines


def _kept(row: dict) -> str:
    kept = _pct(row["retention"], row["retention_half_width"])
    return f"{kept} retention at {row['flops_ratio']:.2f}× the FLOPs"


def _verdict(result: dict, out: Path) -> list[str]:
    """The sentences that say which recipe won, or that none did."""
    target, base = result["settings"]["target"], result["baseline"]
    winner, near, best = result["winner"], result["compatible"], result["best"]
    if winner:
        said = (f"**Winner: {winner['recipe']}**, {_kept(winner)} of the full-sequence run "
                f"(LSP 1.0: {_pct(base['mean'], base['half_width'])} accuracy): the cheapest "
                f"recipe that meets the {target:.0%} target on the means of "
                f"{len(base['accuracies'])} baseline and {len(result['settings']['seeds'])} "
                f"recipe seed(s). {PAPER}")
        lines = [said, f"`{out / 'winner.yaml'}` is that recipe as a config, for `essence train`."]
    else:
        named = f" The best was {best['recipe']}, {_kept(best)}." if best else ""
        lines = [(f"**No recipe met the {target:.0%} target** on the means.{named} "
                  f"No winner.yaml was written. {PAPER}")]
    if near and (not winner or near["recipe"] != winner["recipe"]):
        lines.append(f"Cheapest recipe *compatible with* the target (retention + half-width ≥ "
                     f"{target:.0%}, not met on the means): {near['recipe']}, {_kept(near)}.")
    return lines


def to_markdown(result: dict, out: Path) -> str:
    """frontier.md: the verdict, the table sorted by cost, the brackets and how to read them."""
    s, base = result["settings"], result["baseline"]
    replay = f" (replay over {s['replay_base']})" if "replay" in s["families"] else ""
    seeds = ", ".join(str(x) for x in s["seeds"])
    setup = (f"Config `{s['config']}` {' '.join(s['overrides']) or '(no overrides)'}; families "
             f"{', '.join(s['families'])}{replay}; seeds {seeds}; {s['steps']} probe(s) per "
             f"family; teacher {s['teacher']}; N = {base['problems']} problems per run.")
    head = [f"# Frontier: the cheapest recipe keeping {s['target']:.0%} of full-sequence accuracy",
            "", setup, "", *_verdict(result, out), ""]
    brackets = ["", "The cheapest x meeting the target lies in (lo, hi] (x = 1 counts as meeting):",
                ""]
    brackets += [f"- {family}: ({compact(lo)}, {compact(hi)}]"
                 for family, (lo, hi) in result["brackets"].items()]
    notes = ["", ("Accuracy: mean pass@1 over the seeds ± 1.96·sqrt(m(1−m)/(N·S) + sd²/S). "
                  "Retention: m / m_baseline ± sqrt(h² + (r·h_baseline)²) / m_baseline. FLOPs "
                  "ratio: mean FLOPs (cached teacher FLOPs included) / the baseline's. Pareto: no "
                  "other recipe is as accurate and as cheap. See docs/frontier.md.")]
    return "\n".join([*head, *_table(result), *brackets, *notes]) + "\n"


def plot(result: dict, path: Path) -> Path | None:
    """frontier.png: accuracy against FLOPs ratio per family, the Pareto line and the target;
    None (with a notice) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("essence frontier: matplotlib is not installed; frontier.png skipped")
        return None
    base, rows = result["baseline"], result["points"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for family in dict.fromkeys(r["family"] for r in rows):
        mine = [r for r in rows if r["family"] == family]
        ax.errorbar([r["flops_ratio"] for r in mine], [100 * r["mean"] for r in mine],
                    yerr=[100 * r["half_width"] for r in mine], fmt="o", capsize=3, label=family)
    ax.errorbar([1.0], [100 * base["mean"]], yerr=[100 * base["half_width"]], fmt="*", ms=12,
                color="black", capsize=3, label="LSP 1.0")
    front = sorted((r for r in [base, *rows] if r["pareto"]), key=lambda r: r["flops_ratio"])
    ax.plot([r["flops_ratio"] for r in front], [100 * r["mean"] for r in front], "-", color="grey",
            alpha=0.6, label="Pareto frontier")
    ax.axhline(100 * result["settings"]["target"] * base["mean"], ls="--", color="red", alpha=0.6,
               label=f"target ({result['settings']['target']:.0%} of LSP 1.0)")
    if result["winner"]:
        w = result["winner"]
        ax.annotate(f"winner {w['recipe']}", (w["flops_ratio"], 100 * w["mean"]), fontsize=8,
                    textcoords="offset points", xytext=(6, -12))
    ax.set_xlabel("FLOPs / FLOPs of LSP 1.0")
    ax.set_ylabel("accuracy (pass@1, %)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as err:
        raise EssenceError(f"{write_failure(path, err)}; free disk space or choose a "
                           "writable --out") from None
    finally:
        plt.close(fig)
    return path


def write_outputs(out: Path, result: dict, winner: Config | None) -> None:
    """frontier.json, frontier.md, frontier.png and winner.yaml (removed when nothing won)."""
    write_json_atomic(out / "frontier.json", result)
    write_text_atomic(out / "frontier.md", to_markdown(result, out))
    plot(result, out / "frontier.png")
    if winner is not None:
        save_config(winner, out / "winner.yaml")
    else:
        (out / "winner.yaml").unlink(missing_ok=True)
    print("\n".join(_verdict(result, out)))
    print(f"essence frontier: wrote frontier.json, frontier.md, frontier.png"
          f"{', winner.yaml' if winner is not None else ''} to {out}")
