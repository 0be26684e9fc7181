"""What a run was trained on: data.source's path, size and sha256, kept in RUN/data.json.

Written when a run starts; a run that carries results over (a checkpoint, a summary) is not
continued on other data unless the user says so: `essence train --resume` refuses, naming what
changed (`--accept-changed-data` continues anyway), and so does a sweep reusing the point.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from essence.config.schema import Config
from essence.errors import EssenceError
from essence.io import sha256_file, write_json_atomic
from essence.paths import looks_local, resolve

DATA_FILE = "data.json"
TRAIN_FIX = "pass --accept-changed-data to continue on the new data, or train into a new --out"
_HASHES: dict[tuple, str] = {}  # one hash per file version in a process (a sweep's points share it)


def data_fingerprint(config: Config) -> dict:
    """data.source as a run reads it: the file's resolved path, size and sha256 (a hub dataset:
    its name, config and split; its rows are not hashed)."""
    data = config.data
    spec = resolve(data.source)
    if not looks_local(spec):
        return {"source": data.source, "hub": {"config": data.config, "split": data.split}}
    path = Path(spec).expanduser().resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(path)
    return {"source": data.source, "path": str(path), "size": stat.st_size, "sha256": _HASHES[key]}


def data_changes(saved: dict, now: dict) -> list[str]:
    """What differs between two fingerprints, one phrase each; a moved but identical file is
    not a change."""
    if "hub" in saved or "hub" in now:
        same = (saved.get("source"), saved.get("hub")) == (now.get("source"), now.get("hub"))
        return [] if same else [f"the dataset was {_name(saved)}, now {_name(now)}"]
    if (saved.get("size"), saved.get("sha256")) == (now.get("size"), now.get("sha256")):
        return []
    changes = []
    if saved.get("path") != now.get("path"):
        changes.append(f"path {saved.get('path')} -> {now.get('path')}")
    if saved.get("size") != now.get("size"):
        changes.append(f"size {saved.get('size')} -> {now.get('size')} bytes")
    changes.append(f"content sha256 {str(saved.get('sha256'))[:12]} -> {now['sha256'][:12]}")
    return changes


def _name(fp: dict) -> str:
    hub = fp.get("hub") or {}
    return f"{fp.get('source')} (config {hub.get('config')}, split {hub.get('split')})"


def carries_results(run_dir: Path) -> bool:
    """Whether continuing `run_dir` builds on what it has trained (a checkpoint or a summary)."""
    checkpoints = run_dir / "checkpoints"
    has_step = checkpoints.is_dir() and any(p.name.startswith("step-") for p in checkpoints.iterdir())
    return has_step or (run_dir / "summary.json").is_file()


def data_change(run_dir: Path, config: Config, what: str | None = None) -> str | None:
    """How the data differs from what `run_dir` recorded, as a sentence; None when it is the
    same, or nothing was recorded or carried over."""
    saved_path = run_dir / DATA_FILE
    if not saved_path.is_file() or not carries_results(run_dir):
        return None
    try:
        saved = json.loads(saved_path.read_text(encoding="utf-8"))
        assert isinstance(saved, dict)
    except (OSError, ValueError, AssertionError):
        return f"{saved_path} is unreadable"
    changes = data_changes(saved, data_fingerprint(config))
    if not changes:
        return None
    return (f"{what or f'the run in {run_dir}'} was trained on other data (data.source "
            f"{config.data.source}: {'; '.join(changes)})")


def check_data_unchanged(run_dir: str | os.PathLike, config: Config, what: str | None = None,
                         fix: str = TRAIN_FIX) -> None:
    """Refuse, in one line, to continue the run in `run_dir` on data other than it recorded;
    `fix` is the advice the line ends with (a sweep names its own flag)."""
    change = data_change(Path(run_dir), config, what)
    if change is not None:
        raise EssenceError(f"{change}; {fix}")


def record_data(run_dir: Path, config: Config, resume: bool, accept_changed: bool) -> None:
    """At a run's start: check the data against what the run recorded (resume), then record it."""
    change = data_change(run_dir, config) if resume else None
    if change is not None and not accept_changed:
        raise EssenceError(f"{change}; {TRAIN_FIX}")
    if change is not None:
        print(f"essence: --accept-changed-data: continuing; {change}")
    write_json_atomic(run_dir / DATA_FILE, data_fingerprint(config))
