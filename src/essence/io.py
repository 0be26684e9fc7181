"""Atomic file writes: readers see the old file or the whole new one, never half of one.

A failed write (full disk, read-only folder) is a one-line EssenceError naming the file;
the previous version of the file is left as it was.
"""

from __future__ import annotations

import json
import os
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
