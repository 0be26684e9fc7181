"""Atomic file writes: readers see the old file or the whole new one, never half of one.

A failed write (full disk, read-only folder) is a one-line EssenceError naming the file;
the previous version of the file is left as it was. `FolderLock`: one writer per folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

from essence.errors import EssenceError
from essence.faults import fault_point

# torch.save reports a failed write (ENOSPC included) as a RuntimeError with one of these.
_TORCH_WRITE_FAILURES = ("file write failed", "unexpected pos", "No space left on device")


def is_write_failure(err: BaseException) -> bool:
    """An OSError, or the RuntimeError torch.save raises when the disk fills up."""
    if isinstance(err, OSError):
        return True
    return isinstance(err, RuntimeError) and any(s in str(err) for s in _TORCH_WRITE_FAILURES)


def write_failure(path: str | os.PathLike, err: BaseException) -> str:
    """'could not write PATH (reason)' for an error accepted by is_write_failure."""
    if isinstance(err, OSError):
        code = err.errno if err.errno is not None else (err.args or (None,))[0]
        reason = err.strerror or (os.strerror(code) if isinstance(code, int) else str(err))
    else:
        reason = "the write failed; is the disk full?"
    return f"could not write {path} ({reason})"


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temp file in the same folder, then rename it over `path`."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            fault_point(f"write-{path.name}")
            handle.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes the file owner-only
        os.replace(tmp, path)
    except OSError as err:
        raise EssenceError(f"{write_failure(path, err)}; any previous {path.name} is unchanged. "
                           "Free disk space or choose a writable --out") from None
    finally:
        if tmp is not None and Path(tmp).exists():
            Path(tmp).unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, data) -> None:
    """Write `data` as indented JSON, atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line (a metrics record) to a log file; a failed write is an EssenceError."""
    path = Path(path)
    try:
        with path.open("a", encoding="utf-8") as handle:
            fault_point(f"write-{path.name}")
            handle.write(line + "\n")
    except OSError as err:
        raise EssenceError(f"{write_failure(path, err)}; free disk space, then rerun with "
                           "--resume to continue from the last checkpoint") from None


def check_out_dir(path: str | os.PathLike, flag: str = "--out",
                  given: str | os.PathLike | None = None) -> Path:
    """Create folder `path` if needed and prove it writable; a one-line error otherwise.

    given: what the user passed as `flag`, when `path` is derived from it (a file's folder).
    """
    shown = path if given is None else given
    if not str(shown).strip():
        raise EssenceError(f"{flag} is empty; give a folder to write into")
    out = Path(path).expanduser()
    for parent in (out, *out.parents):
        if parent.exists():
            if not parent.is_dir():
                what = ("is a file, not a folder" if parent == out and given is None
                        else f"is below {parent}, which is a file")
                raise EssenceError(f"{flag} {shown} {what}; choose another {flag}")
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
        # Root ignores permission bits, so only a real write shows a read-only mount.
        with tempfile.TemporaryFile(dir=out, prefix=".essence-probe-"):
            fault_point("write-probe")
    except OSError as err:
        raise EssenceError(f"{flag} {shown}: {write_failure(out, err)}; "
                           f"choose a writable {flag}") from None
    return out


LOCK_FILE = ".essence.lock"


class FolderBusy(EssenceError):
    """Another process holds the folder's lock (the message names its pid)."""


class FolderLock:
    """An exclusive lock on a folder (a run, a teacher cache), held while a command writes there.

    An flock on FOLDER/.essence.lock, which names the holder (pid and host): the kernel drops it
    when the process dies, so a killed command never leaves a folder locked.
    """

    def __init__(self, folder: Path, what: str = "run"):
        self.path, self.what = Path(folder) / LOCK_FILE, what
        self.handle = None

    def acquire(self) -> "FolderLock":
        try:
            import fcntl
        except ImportError:  # no flock on this platform: run unlocked
            return self
        try:
            for _ in range(3):
                handle = self.path.open("a+")
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _holder(handle)
                    raise FolderBusy(
                        f"{self.path.parent} is in use by another {self.what} ({holder}); wait "
                        "for it to finish or choose another --out") from None
                if self._claim(handle):
                    return self
        except OSError as err:
            raise EssenceError(f"{write_failure(self.path, err)}; nothing in {self.path.parent} "
                               "was changed. Free disk space or choose a writable --out") from None
        raise EssenceError(f"could not lock {self.path}; is another {self.what} starting there?")

    def _claim(self, handle) -> bool:
        """Write our pid into the locked file; False when a releasing holder unlinked it."""
        if not (self.path.exists()
                and os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino):
            handle.close()
            return False
        try:
            handle.seek(0)
            handle.truncate()
            fault_point(f"write-{LOCK_FILE}")
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
        except BaseException:
            self.handle = handle
            self.release()
            raise
        self.handle = handle
        return True

    def release(self) -> None:
        if self.handle is not None:
            handle, self.handle = self.handle, None
            self.path.unlink(missing_ok=True)
            try:
                handle.close()
            except OSError:  # a pid line that could not be flushed: the file is gone anyway
                pass

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(handle) -> str:
    handle.seek(0)
    holder = handle.read().strip() or "another process"
    handle.close()
    return holder


def lock_holder(folder: Path) -> str | None:
    """Who holds `folder`'s lock ("pid N on HOST"), or None when nobody does. Only reads."""
    path = Path(folder) / LOCK_FILE
    try:
        import fcntl

        handle = path.open("r")
    except (ImportError, OSError):  # no lock file (or no flock): nobody holds it
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(handle)
    handle.close()  # closing drops the shared lock we just took
    return None


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse to start when `folder`'s disk cannot hold `needed` bytes (e.g. one checkpoint)."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise EssenceError(
            f"{folder} has {_size(free)} free, but {what} needs about {_size(needed)}; "
            "free disk space or choose another --out")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()
