"""`essence frontier`: the cheapest truncation recipe that keeps a target share of the
full-sequence (LSP 1.0) accuracy.

Per family (lsp, cot_lead, replay) the fraction x is bisected in (0, 1]: every probe is trained
and evaluated once per seed into OUT/points/<family>-<x>/seed-S, and the bracket moves on whether
its retention against the baseline (OUT/baseline/seed-S) meets the target on the means. A re-run
reuses every finished run; the statistics are frontier_stats', the files frontier_report's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from essence.config.checks import config_changes
from essence.config.load import load_config, save_config
from essence.config.schema import Config, to_dict
from essence.errors import EssenceError
from essence.experiments.frontier_stats import (
    FAMILIES,
    Estimate,
    compact,
    compatible,
    estimate,
    meets,
    midpoint,
    narrow,
    retention,
)
from essence.experiments.report import accuracy_of, bench_scores
from essence.experiments.sweep import train_with_cache
from essence.io import FolderLock, check_out_dir, write_json_atomic
from essence.stopping import Stopped
from essence.train.provenance import check_data_unchanged

SETTINGS_FILE = "frontier-settings.json"
REUSE_FREE = ("train.progress", "train.log_every", "train.tracker", "train.tracker_project",
              "train.run_name", "train.run_group", "train.collective_timeout_s")
"""Keys a finished run may differ in and still be reused: none changes what it trained or scored."""
FIX = "rerun with the settings it was started with to resume it, or choose another --out"

RunPoint = Callable[[Config, Path], dict]
"""Trains and evaluates one run into a folder; returns its summary (tests pass a stub)."""


@dataclass(frozen=True)
class FrontierOptions:
    """The search's flags, already checked (essence.experiments.frontier_command parses them)."""

    target: float = 0.95
    """Share of the baseline's mean accuracy a recipe must keep, in (0, 1]."""
    families: tuple[str, ...] = FAMILIES
    seeds: tuple[int, ...] = (0,)
    steps: int = 3
    """Bisection probes per family (may grow on a re-run: the earlier probes are reused)."""
    replay_base: tuple[str, float] = ("lsp", 0.5)
    """The truncation the replay family applies to the records it does not replay."""
    baseline: tuple[str, ...] = ()
    """Finished LSP 1.0 run folders to compare against; empty: train one per seed."""
    teacher: str | None = None
    """cache, online, or None: cache when the config's teacher can be cached, else online."""


def _yaml(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(float(value))


def truncation_overrides(family: str, x: float, replay_base: tuple[str, float]) -> list[str]:
    """The data.truncation overrides of one recipe; family "baseline" is LSP 1.0 (no cut)."""
    t = {"lsp": 1.0, "cot_lead": None, "window": None, "cut_after_think": False, "replay": 0.0}
    if family == "lsp":
        t["lsp"] = x
    elif family == "cot_lead":
        t["cot_lead"] = x
    elif family == "replay":
        t[replay_base[0]] = replay_base[1]
        t["replay"] = x
    else:
        assert family == "baseline", f"unknown family {family}"
    return [f"data.truncation.{key}={_yaml(value)}" for key, value in t.items()]


def recipe_label(family: str, x: float, replay_base: tuple[str, float]) -> str:
    """'lsp=0.375', 'cot_lead=0.5', 'lsp=0.5,replay=0.25' or 'lsp=1' (the baseline)."""
    if family == "baseline":
        return "lsp=1"
    if family == "replay":
        return f"{replay_base[0]}={compact(replay_base[1])},replay={compact(x)}"
    return f"{family}={compact(x)}"


def teacher_overrides(config_path: str, overrides: list[str], requested: str | None,
                      cache_root: Path) -> tuple[str, list[str]]:
    """(mode, overrides): cache (one teacher cache for every run), online, or none (no KD)."""
    base = load_config(config_path, overrides)
    m = base.model
    online = ["model.teacher_cache=null", "model.teacher_context=kept"]
    if base.loss.kd_ratio == 0 or not (m.teacher or m.teacher_init or m.teacher_cache):
        if requested is not None:
            raise EssenceError(f"--teacher {requested}: the config trains without a teacher "
                               "(loss.kd_ratio=0 or no model.teacher); drop --teacher")
        return "none", []
    if requested == "online":
        if not (m.teacher or m.teacher_init):
            raise EssenceError("--teacher online: the config has a model.teacher_cache but no "
                               "model.teacher to run; use --teacher cache or set model.teacher")
        return "online", online
    cache = [f"model.teacher_cache={m.teacher_cache or cache_root.resolve()}",
             "model.teacher_context=full"]  # cot_lead is no lead span: the cache saw it whole
    try:
        load_config(config_path, [*overrides, *cache])
    except EssenceError as err:
        if requested == "cache":
            raise EssenceError(f"--teacher cache: {err}") from None
        return "online", online
    return "cache", cache


def train_point(config: Config, run_dir: Path) -> dict:
    """The real runner: train (and evaluate) the run as a sweep point does, resuming it when an
    earlier attempt left its config or a checkpoint."""
    resume = (run_dir / "config.yaml").is_file() or (run_dir / "checkpoints" / "latest").is_file()
    return train_with_cache(config, run_dir, resume)


def scores(summary: dict, where: Path) -> tuple[float, int]:
    """(mean pass@1 over the benchmarks, problems evaluated) of a run's summary."""
    accuracy = accuracy_of(summary)
    problems = sum(int(b.get("num_problems") or 0) for b in bench_scores(summary))
    if accuracy is None or problems < 1:
        raise EssenceError(f"{where} has no eval accuracy: the frontier compares accuracies; set "
                           "eval.benches in the config (or pass --baseline runs that were evaluated)")
    return accuracy, problems


def cost(summary: dict, where: Path) -> float:
    """A run's FLOPs: everything that ran, plus the teacher FLOPs a cache served (so cached and
    online runs compare; the cache's one pass is shared by every run and not charged to any)."""
    if not summary.get("total_flops"):
        raise EssenceError(f"{where} has no total_flops: it is not a training run; pass --baseline "
                           "folders written by essence train")
    return float(summary["total_flops"]) + float(summary.get("teacher_flops_cached") or 0.0)


def read_summary(run_dir: Path) -> dict:
    """RUN/summary.json as a mapping, or one line naming the folder."""
    path = Path(run_dir) / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EssenceError(f"{run_dir} has no summary.json: pass the folder of a finished run") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EssenceError(f"{path} is unreadable ({err}); pass the folder of a finished run") from None
    if not isinstance(summary, dict):
        raise EssenceError(f"{path} does not hold a summary mapping; pass a finished run's folder")
    return summary


def finished(run_dir: Path, config: Config) -> dict | None:
    """The summary of a run already done under this config, or None when it must (still) run."""
    if not (run_dir / "summary.json").is_file():
        return None
    import yaml

    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        assert isinstance(saved, dict)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AssertionError):
        raise EssenceError(f"{run_dir} holds a summary.json without a readable config.yaml; "
                           f"delete {run_dir} to redo it, or choose another --out") from None
    changes = config_changes(saved, config, allowed=REUSE_FREE)
    if changes:
        raise EssenceError(f"{run_dir} was run under other settings ({'; '.join(changes)}); "
                           f"delete it to redo it, or {FIX}")
    check_data_unchanged(run_dir, config, f"the frontier run {run_dir}",
                         f"delete {run_dir} to redo it, or choose another --out")
    return read_summary(run_dir)


def claim(out: Path, settings: dict, base: Config) -> None:
    """Own `out`: new or empty, or an earlier search's with the same settings (then resumed);
    `steps` may differ (more probes refine the search)."""
    marker = out / SETTINGS_FILE
    if marker.is_file():
        try:
            before = json.loads(marker.read_text(encoding="utf-8"))
            assert isinstance(before, dict)
        except (OSError, ValueError, AssertionError):
            raise EssenceError(f"{marker} is unreadable; delete {out} or choose another --out") from None
        differs = [f"{key} {before.get(key)!r} → {settings[key]!r}" for key in settings
                   if key not in ("config", "overrides", "base_config", "steps")
                   and before.get(key) != settings[key]]
        changes = config_changes(before.get("base_config") or {}, base, allowed=REUSE_FREE)
        differs += [f"the base config (CONFIG and overrides): {'; '.join(changes)}"] if changes else []
        if differs:
            raise EssenceError(f"{out} holds a frontier search with other settings: "
                               f"{'; '.join(differs)}; {FIX}")
        print(f"essence frontier: resuming the search in {out}")
    elif any(not p.name.startswith(".") for p in out.iterdir()):
        raise EssenceError(f"{out} is not empty and holds no frontier search; choose a new or "
                           "empty --out")
    write_json_atomic(marker, settings)


@dataclass
class Search:
    """One frontier search: trains (or reuses) runs and turns their summaries into rows."""

    config_path: str
    overrides: list[str]
    """The user's overrides, then the run group's and the teacher's."""
    options: FrontierOptions
    out: Path
    run_point: RunPoint
    base: Estimate | None = None
    base_flops: float = 0.0
    rows: list[dict] = field(default_factory=list)

    def config(self, family: str, x: float, seed: int) -> Config:
        name = f"{recipe_label(family, x, self.options.replay_base)}-seed-{seed}"
        return load_config(self.config_path, [
            *self.overrides, *truncation_overrides(family, x, self.options.replay_base),
            f"train.seed={seed}", f"train.run_name={name}"])

    def _one(self, run_dir: Path, config: Config, what: str) -> tuple[float, int, float]:
        """(accuracy, problems, FLOPs) of one run, trained unless it is finished already."""
        summary = finished(run_dir, config)
        if summary is None:
            print(f"essence frontier: {what}: training into {run_dir}")
            try:
                summary = self.run_point(config, run_dir)
            except Stopped as stop:  # the run saved a checkpoint: the same command resumes it
                raise Stopped(f"frontier {what}: {stop.message}", stop.exit_code,
                              resume="the same essence frontier command") from None
            if not (run_dir / "summary.json").is_file():  # a runner that did not write one
                save_config(config, run_dir / "config.yaml")
                write_json_atomic(run_dir / "summary.json", summary)
        else:
            print(f"essence frontier: {what}: finished before, reused ({run_dir})")
        accuracy, problems = scores(summary, run_dir)
        flops = cost(summary, run_dir)
        ratio = f"FLOPs ratio {flops / self.base_flops:.3f}" if self.base_flops else f"FLOPs {flops:.3g}"
        print(f"essence frontier: {what}: accuracy {accuracy:.1%}, {ratio}")
        return accuracy, problems, flops

    def runs(self, family: str, x: float) -> dict:
        """Every seed of one recipe: the raw numbers of its row."""
        label = recipe_label(family, x, self.options.replay_base)
        folder = self.out / ("baseline" if family == "baseline" else f"points/{family}-{compact(x)}")
        found = [self._one(folder / f"seed-{seed}", self.config(family, x, seed),
                           f"{label} seed {seed}") for seed in self.options.seeds]
        return {"family": family, "x": x, "recipe": label,
                "overrides": truncation_overrides(family, x, self.options.replay_base),
                "seeds": list(self.options.seeds), "accuracies": [a for a, _, _ in found],
                "problems": min(n for _, n, _ in found), "flops": [f for _, _, f in found],
                "runs": [str(folder / f"seed-{seed}") for seed in self.options.seeds]}

    def baseline(self) -> dict:
        """The LSP 1.0 row: trained per seed, or read from the --baseline folders."""
        if self.options.baseline:
            found = []
            for text in self.options.baseline:
                summary = read_summary(Path(text))
                found.append((*scores(summary, Path(text)), cost(summary, Path(text))))
            row = {"family": "baseline", "x": 1.0, "recipe": "lsp=1", "overrides": [],
                   "seeds": [None] * len(found), "accuracies": [a for a, _, _ in found],
                   "problems": min(n for _, n, _ in found), "flops": [f for _, _, f in found],
                   "runs": [str(Path(t).resolve()) for t in self.options.baseline]}
        else:
            row = self.runs("baseline", 1.0)
        self.base = estimate(row["accuracies"], row["problems"])
        self.base_flops = sum(row["flops"]) / len(row["flops"])
        if self.base.mean <= 0:
            raise EssenceError(f"the baseline's mean accuracy is 0 ({', '.join(row['runs'])}): "
                               "retention is undefined; evaluate on problems the full run solves")
        row.update(self._stats(row), meets=None, compatible=None)
        row["retention_half_width"] = None  # the baseline against itself: 1 exactly
        return row

    def _stats(self, row: dict) -> dict:
        point = estimate(row["accuracies"], row["problems"])
        r, h_r = retention(point, self.base)
        return {"mean": point.mean, "sd": point.sd, "half_width": point.half_width,
                "interval": [point.mean - point.half_width, point.mean + point.half_width],
                "retention": r, "retention_half_width": h_r,
                "flops_ratio": sum(row["flops"]) / len(row["flops"]) / self.base_flops}

    def point(self, family: str, x: float) -> dict:
        """Train (or reuse) one probe for every seed; its row, with meets / compatible."""
        row = self.runs(family, x)
        row.update(self._stats(row))
        row["meets"] = meets(row["retention"], self.options.target)
        row["compatible"] = compatible(row["retention"], row["retention_half_width"],
                                       self.options.target)
        self.rows.append(row)
        return row

    def bisect(self, family: str) -> dict:
        """`steps` probes of one family; x = 1 counts as meeting (it is the full run, or near it)."""
        lo, hi = 0.0, 1.0
        for _ in range(self.options.steps):
            x = midpoint(lo, hi)
            lo, hi = narrow(lo, hi, x, self.point(family, x)["meets"])
        return {"bracket": [lo, hi]}


def run_frontier(config_path: str, overrides: list[str], out: str | Path,
                 options: FrontierOptions = FrontierOptions(), *,
                 run_point: RunPoint = train_point) -> dict:
    """Search every family, write the outputs into `out`, and return frontier.json's content."""
    from essence.experiments.frontier_report import summarize, write_outputs

    overrides, out = list(overrides), Path(out).expanduser()
    base = load_config(config_path, overrides)  # a bad config fails before anything is written
    if not base.eval.benches:
        raise EssenceError("the frontier compares accuracies, but the config's eval.benches is "
                           "empty; set eval.benches=[NAME_OR_FILE]")
    mode, teacher = teacher_overrides(config_path, overrides, options.teacher, out / "teacher-cache")
    group = f"train.run_group={out.resolve().name}"  # the trackers group the search's runs
    search = Search(str(config_path), [*overrides, group, *teacher], options, out, run_point)
    for family in options.families:  # every recipe's config is valid before the first run
        search.config(family, 0.5, options.seeds[0])
    for text in options.baseline:  # and so is every --baseline run, before --out is claimed
        summary = read_summary(Path(text))
        scores(summary, Path(text)), cost(summary, Path(text))
    settings = {"config": str(config_path), "overrides": overrides, "base_config": to_dict(base),
                "target": options.target, "families": list(options.families),
                "seeds": list(options.seeds), "steps": options.steps,
                "replay_base": f"{options.replay_base[0]}={compact(options.replay_base[1])}",
                "baseline": [str(Path(p).resolve()) for p in options.baseline], "teacher": mode}
    check_out_dir(out)
    with FolderLock(out, "frontier search"):
        claim(out, settings, base)
        baseline = search.baseline()
        brackets = {family: search.bisect(family)["bracket"] for family in options.families}
        result = summarize(settings, baseline, search.rows, brackets)
        winner = result["winner"]
        config = (load_config(config_path, [*overrides, *teacher, *winner["overrides"]])
                  if winner else None)
        write_outputs(out, result, config)
    return result
