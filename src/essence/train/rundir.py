"""Output folders are owned: checked before any work, locked while written, never clobbered.

`check_out_dir` is the one check of an --out folder for every command (not a file, not below
a file, writable). `claim_run_dir` is what `essence train` does on top: it takes the folder's
lock (a second run into it is refused), refuses a folder that holds another run's results
unless the user said --resume or --overwrite, and clears what a killed run left half done.
"""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path

from essence.errors import EssenceError
from essence.io import LOCK_FILE, FolderBusy, FolderLock, check_out_dir, lock_holder

__all__ = ["LOCK_FILE", "RunLock", "RunDirBusy", "lock_holder", "claim_run_dir", "run_results",
           "clean_interrupted_writes", "resume_command", "stop_message"]

# What a run leaves behind; any of these means the folder holds a run's results.
RESULTS = ("summary.json", "checkpoints", "model", "metrics.jsonl", "eval")
RUN_FILES = (*RESULTS, "config.yaml", "failed.json", "tensorboard", "data.json")

RunLock = FolderLock
"""The lock of a run folder (essence.io.FolderLock): a second run into it is refused."""
RunDirBusy = FolderBusy


def run_results(run_dir: Path) -> list[str]:
    """The names of a run's results present in `run_dir` (empty: a fresh folder)."""
    found = []
    for name in RESULTS:
        path = run_dir / name
        if path.is_file() and path.stat().st_size > 0:
            found.append(name)
        elif path.is_dir() and any(p for p in path.iterdir() if not p.name.startswith(".")):
            found.append(name)
    return found


def claim_run_dir(out: str | os.PathLike, *, resume: bool, overwrite: bool) -> RunLock:
    """Check, lock and (for --overwrite) empty a training run folder; returns the held lock."""
    if resume and overwrite:
        raise EssenceError("--resume and --overwrite contradict each other; pass one")
    run_dir = check_out_dir(out)
    lock = RunLock(run_dir).acquire()
    try:
        found = run_results(run_dir)
        if found and overwrite:
            print(f"essence: --overwrite: removing the previous run's {', '.join(found)} "
                  f"from {run_dir}")
            for name in RUN_FILES:
                path = run_dir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        elif found and not resume:
            raise EssenceError(
                f"{run_dir} holds another run's results ({', '.join(found)}); pass --resume to "
                "continue that run, --overwrite to replace it, or choose another --out")
        for note in clean_interrupted_writes(run_dir):
            print(f"essence: {note}")
    except BaseException:
        lock.release()
        raise
    return lock


def clean_interrupted_writes(run_dir: Path) -> list[str]:
    """Remove what a killed run left half written (temp folders and files); put back a
    folder whose replacement was interrupted between its two renames. Returns what it did."""
    done = []
    for folder in (run_dir, run_dir / "checkpoints"):
        if not folder.is_dir():
            continue
        for old in sorted(folder.glob(".old-*")):
            name = old.name[len(".old-"):].rsplit("-", 1)[0]
            if not (folder / name).exists():
                old.rename(folder / name)
                done.append(f"restored {folder / name}")
            else:
                shutil.rmtree(old, ignore_errors=True)
        for tmp in sorted(folder.glob(".tmp-*")):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
            done.append(f"removed the unfinished {tmp.name}")
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
    return done


def resume_command(run_dir: Path) -> str:
    """The exact command that continues the run in `run_dir` (its own resolved config.yaml)."""
    run = shlex.quote(str(run_dir))
    return f"essence train {shlex.quote(str(Path(run_dir) / 'config.yaml'))} --out {run} --resume"


def stop_message(step: int, total: int, saved: Path | None) -> str:
    """What a run stopped on request says it kept (essence.stopping.Stopped adds the resume)."""
    where = (f"saved {saved}" if saved is not None
             else "nothing saved (train.save_checkpoints is false), so a resume starts over")
    return f"stopped after step {step}/{total}; {where}"
