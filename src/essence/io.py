"""Atomic file writes: readers see the old file or the whole new one, never half of one.

A failed write (full disk, read-only folder) is a one-line EssenceError naming the file;
the previous version of the file is left as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
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
        reason = err.strerror or str(err)
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
