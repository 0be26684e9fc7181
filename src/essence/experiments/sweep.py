"""Grids of runs: every point trained (then evaluated) in its own run directory.

Re-running a sweep skips points that are complete (their summary.json exists), resumes a
point that was interrupted from its last checkpoint, and retries a point that failed. A point
made under other settings or on other data is refused, and so is one another command is writing.
"""

from __future__ import annotations

import itertools
import re
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path

from essence.config.checks import check_unchanged
from essence.config.load import load_config, parse_override
from essence.errors import EssenceError
from essence.io import write_json_atomic
from essence.stopping import Stopped
from essence.train.provenance import check_data_unchanged
from essence.train.rundir import RunDirBusy, lock_holder


@dataclass(frozen=True)
class Point:
    """One grid point: its overrides and the run directory name derived from them."""

    overrides: tuple[str, ...]

    @property
    def name(self) -> str:
        parts = []
        for text in self.overrides:
            key, value = text.split("=", 1)
            parts.append(f"{key.split('.')[-1]}-{value}")
        return re.sub(r"[^A-Za-z0-9_.+-]", "_", "__".join(parts)) or "default"


def parse_grid(grid: list[str]) -> list[Point]:
    """['a.b=1,2', 'c=x,y'] → the cartesian product of points, in order."""
    axes = []
    for text in grid:
        key, value = parse_override(text)
        raw = text.split("=", 1)[1]
        values = [v.strip() for v in raw.split(",") if v.strip()]
        if not values:
            raise EssenceError(f"--grid {text!r} has no values; write key=v1,v2,...")
        axes.append([f"{key}={v}" for v in values])
    return [Point(tuple(combo)) for combo in itertools.product(*axes)] if axes else [Point(())]


def point_status(run_dir: Path) -> str:
    """complete, failed, partial (has a checkpoint) or new."""
    if (run_dir / "summary.json").is_file():
        return "complete"
    if (run_dir / "failed.json").is_file():
        return "failed"
    if (run_dir / "checkpoints" / "latest").is_file():
        return "partial"
    return "new"


def _check_not_busy(run_dir: Path, name: str) -> None:
    """Refuse a point whose folder another command (a train, another sweep) is writing."""
    holder = lock_holder(run_dir)
    if holder is not None:
        raise RunDirBusy(f"sweep point {name} ({run_dir}) is in use by another run ({holder}); "
                         "wait for it to finish, or sweep into another --out")


def train_with_cache(config, run_dir: Path, resume: bool) -> dict:
    """Train one point, building (or reusing) its teacher cache first when it reads one: one
    cache per fingerprint serves every point of a sweep or a frontier search."""
    from essence.train.run import train

    if config.model.teacher_cache and config.loss.kd_ratio > 0:
        from essence.teacher.cache_build import ensure_cache

        ensure_cache(config, progress=config.train.progress)
    return train(config, run_dir, resume=resume)


def _check_points(config_path: str, points: list, out: Path, overrides: list[str],
                  overwrite: bool) -> None:
    """Validate every point before spending compute on the first: a point run under other
    settings or on other data is refused (overwrite: deleted, to be redone), and one that
    another command is writing is refused."""
    stale = []
    for point in points:
        config = load_config(config_path, [*overrides, *point.overrides])
        _check_not_busy(out / point.name, point.name)
        try:
            check_unchanged(out / point.name / "config.yaml", config, f"sweep point {point.name}",
                            "rerun with --overwrite to redo it under the new settings, or sweep "
                            "into another --out")
            check_data_unchanged(out / point.name, config, f"sweep point {point.name}",
                                 "rerun with --overwrite to redo it on the new data, or sweep "
                                 "into another --out")
        except EssenceError:
            if not overwrite:
                raise
            stale.append(point.name)
    for name in stale:
        print(f"essence sweep: {name} was run under other settings; --overwrite: redoing it")
        shutil.rmtree(out / name)


def run_sweep(config_path: str, grid: list[str], out: str | Path,
              overrides: list[str] = (), overwrite: bool = False) -> dict[str, str]:
    """Train every grid point not yet complete; returns each point's final status.

    A point whose directory holds a run started under other settings is refused (naming the
    differing keys) before any point trains; overwrite=True deletes such a point and redoes it.
    """

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    points = parse_grid(grid)
    group = f"train.run_group={out.resolve().name}"  # the trackers group a sweep's points
    _check_points(config_path, points, out, [group, *overrides], overwrite)
    results = {}
    for i, point in enumerate(points, 1):
        run_dir = out / point.name
        status = point_status(run_dir)
        print(f"essence sweep: [{i}/{len(points)}] {point.name}: {status}")
        if status == "complete":
            results[point.name] = "complete (skipped)"
            continue
        config = load_config(config_path, [group, *overrides, *point.overrides])
        _check_not_busy(run_dir, point.name)
        (run_dir / "failed.json").unlink(missing_ok=True)
        try:
            # The point's folder is this sweep's own (its config matched above): continue it.
            resume = status != "new" or (run_dir / "config.yaml").is_file()
            train_with_cache(config, run_dir, resume)
            results[point.name] = "complete"
        except RunDirBusy:  # another command writes there: neither record a failure nor go on
            raise
        except Stopped as stop:  # Ctrl-C or SIGTERM: the point saved; the sweep resumes it
            raise Stopped(f"sweep point {point.name}: {stop.message}", stop.exit_code,
                          resume="the same essence sweep command") from None
        except (EssenceError, RuntimeError, ValueError, OSError) as err:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(run_dir / "failed.json",
                              {"error": str(err), "traceback": traceback.format_exc()})
            print(f"essence sweep: {point.name} failed: {err}")
            results[point.name] = f"failed: {err}"
    write_json_atomic(out / "sweep.json", {"config": str(config_path), "grid": grid,
                                           "overrides": list(overrides), "points": results})
    failed = [name for name, r in results.items() if r.startswith("failed")]
    if failed:
        print(f"essence sweep: {len(failed)} point(s) failed: {', '.join(failed)}; "
              "run the same command again to retry them")
    return results
