"""Output folders are owned: checked before any work, locked while written, never clobbered.

`check_out_dir` is the one check of an --out folder for every command (not a file, not below
a file, writable). `claim_run_dir` is what `essence train` does on top: it takes the folder's
lock (a second run into it is refused), refuses a folder that holds another run's results
unless the user said --resume or --overwrite, and clears what a killed run left half done.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

from essence.errors import EssenceError
from essence.io import check_out_dir

LOCK_FILE = ".essence.lock"
# What a run leaves behind; any of these means the folder holds a run's results.
RESULTS = ("summary.json", "checkpoints", "model", "metrics.jsonl", "eval")
RUN_FILES = (*RESULTS, "config.yaml", "failed.json", "tensorboard")


class RunLock:
    """An exclusive lock on a run folder, held while a run writes into it.

    An flock on RUN/.essence.lock: the kernel drops it when the process dies, so a killed
    run never leaves a folder locked.
    """

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self.handle = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # no flock on this platform: run unlocked
            return self
        for _ in range(3):
            handle = self.path.open("a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise EssenceError(
                    f"{self.path.parent} is in use by another run ({holder}); wait for it to "
                    "finish or choose another --out") from None
            # A releasing run unlinks the file: make sure we locked the one at the path.
            if self.path.exists() and os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino:
                handle.seek(0)
                handle.truncate()
                handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
                handle.flush()
                self.handle = handle
                return self
            handle.close()
        raise EssenceError(f"could not lock {self.path}; is another run starting there?")

    def release(self) -> None:
        if self.handle is not None:
            self.path.unlink(missing_ok=True)
            self.handle.close()
            self.handle = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


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
