"""The `essence frontier` command: flags checked into FrontierOptions, then run_frontier.

Every flag is read as text and checked here, so a bad one is a single line naming it (exit 2)
instead of argparse's usage block.
"""

from __future__ import annotations

import argparse
import math

from essence.errors import EssenceError
from essence.experiments.frontier_stats import FAMILIES


def parse_target(text: str) -> float:
    """--target: a share of the baseline's accuracy in (0, 1]."""
    try:
        target = float(text)
    except ValueError:
        raise EssenceError(f"--target {text!r} is not a number; give a share of the full-sequence "
                           "accuracy in (0, 1], e.g. --target 0.95") from None
    if not 0.0 < target <= 1.0:  # NaN fails this too
        raise EssenceError(f"--target {text} is outside (0, 1]; give a share of the full-sequence "
                           "accuracy, e.g. --target 0.95")
    return target


def parse_families(text: str) -> tuple[str, ...]:
    """--families: a comma-separated subset of lsp, cot_lead, replay (order kept, repeats dropped)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise EssenceError(f"--families {text!r} names no family; choose from "
                           f"{', '.join(FAMILIES)}")
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise EssenceError(f"--families: unknown family {unknown[0]!r}; choose from "
                           f"{', '.join(FAMILIES)}, e.g. --families lsp,cot_lead")
    return tuple(dict.fromkeys(names))


def _integer(text: str, what: str, example: str) -> int:
    """int(text), or one line: 'WHAT is not an integer; e.g. EXAMPLE'."""
    try:
        return int(text)
    except ValueError:
        raise EssenceError(f"{what} is not an integer; e.g. {example}") from None


def parse_seeds(text: str) -> tuple[int, ...]:
    """--seeds: one or more distinct non-negative integers, e.g. 0,1."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise EssenceError(f"--seeds {text!r} names no seed; give at least one, e.g. --seeds 0,1")
    seeds = []
    for part in parts:
        seed = _integer(part, f"--seeds {text!r}: {part!r}", "--seeds 0,1")
        if seed < 0:
            raise EssenceError(f"--seeds {text!r}: {seed} is negative; seeds are integers ≥ 0")
        seeds.append(seed)
    if len(set(seeds)) != len(seeds):
        raise EssenceError(f"--seeds {text!r} repeats a seed; list each once")
    return tuple(seeds)


def parse_steps(text: str) -> int:
    """--steps: bisection probes per family, at least 1."""
    steps = _integer(text, f"--steps {text!r}", "--steps 3")
    if steps < 1:
        raise EssenceError(f"--steps {steps} must be at least 1 (bisection probes per family)")
    return steps


def parse_replay_base(text: str) -> tuple[str, float]:
    """--replay-base: lsp=X (0 < X < 1) or cot_lead=X (0 ≤ X ≤ 1): how the records that are not
    replayed are cut."""
    name, sep, raw = (s.strip() for s in text.partition("="))
    try:
        value = float(raw) if sep else math.nan
    except ValueError:
        value = math.nan
    ok = (name == "lsp" and 0.0 < value < 1.0) or (name == "cot_lead" and 0.0 <= value <= 1.0)
    if not ok:
        raise EssenceError(f"--replay-base {text!r}: write lsp=X with 0 < X < 1 or cot_lead=X with "
                           "0 ≤ X ≤ 1, e.g. --replay-base lsp=0.5")
    return name, value


def parse_teacher(text: str | None) -> str | None:
    """--teacher: cache, online, or None (cache when the config's teacher can be cached)."""
    if text is not None and text not in ("cache", "online"):
        raise EssenceError(f"--teacher {text!r}: choose cache or online")
    return text


def options_from(args: argparse.Namespace):
    """The checked FrontierOptions of the parsed flags."""
    from essence.experiments.frontier import FrontierOptions

    baseline = tuple(p.strip() for p in (args.baseline or "").split(",") if p.strip())
    return FrontierOptions(
        target=parse_target(args.target), families=parse_families(args.families),
        seeds=parse_seeds(args.seeds), steps=parse_steps(args.steps),
        replay_base=parse_replay_base(args.replay_base), baseline=baseline,
        teacher=parse_teacher(args.teacher))


def run(args: argparse.Namespace) -> int:
    """Handle `essence frontier`; 0 when it finished (whether or not a recipe met the target)."""
    options = options_from(args)  # every flag checked before the config is read
    from essence.experiments.frontier import run_frontier

    run_frontier(args.config, args.overrides, args.out, options)
    return 0


def add_parser(sub) -> None:
    """Register `essence frontier` on the CLI's subparsers."""
    p = sub.add_parser(
        "frontier", help="the cheapest truncation recipe that keeps a target share of LSP 1.0 accuracy",
        description="Bisect the fraction of each truncation family (lsp, cot_lead, replay), training "
        "and evaluating every probe per seed, and report the cheapest recipe whose retention of the "
        "full-sequence accuracy meets --target. Re-running the same command reuses finished runs.")
    p.add_argument("config", help="experiment YAML file with eval.benches (or essence:demo.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every run, e.g. train.lr=1e-4")
    p.add_argument("--out", required=True, help="the search's folder (rerun to resume)")
    p.add_argument("--target", default="0.95", help="share of LSP 1.0 accuracy to keep (default 0.95)")
    p.add_argument("--families", default=",".join(FAMILIES),
                   help="families to search (default lsp,cot_lead,replay)")
    p.add_argument("--seeds", default="0,1",
                   help="training seeds per recipe; two or more give a seed spread (default 0,1)")
    p.add_argument("--steps", default="3", help="bisection probes per family (default 3)")
    p.add_argument("--replay-base", default="lsp=0.5",
                   help="the cut replay applies to the other records: lsp=X or cot_lead=X "
                   "(default lsp=0.5)")
    p.add_argument("--baseline", default=None, metavar="DIR[,DIR]",
                   help="finished LSP 1.0 runs to compare against (default: train one per seed)")
    p.add_argument("--teacher", default=None, metavar="cache|online",
                   help="one teacher cache for all runs, or the online teacher (default: cache "
                   "when the config's teacher can be cached)")
    p.set_defaults(func=run)
