"""A saved folder's manifest: every file's size and the checksum of the small ones, written last
and checked before the folder is used (checkpoints, final models)."""

from __future__ import annotations

import json
from pathlib import Path

from essence.io import sha256_file

STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"
# Files up to this size also get a checksum; hashing multi-GB weights at every save would
# cost more than it buys, and a truncated weight file is caught by its size.
CHECKSUM_LIMIT = 64 * 2**20


def write_manifest(folder: Path) -> None:
    """folder/manifest.json: the size of every file, and the sha256 of the small ones."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        size = path.stat().st_size
        entry = {"size": size}
        if size <= CHECKSUM_LIMIT:
            entry["sha256"] = sha256_file(path)
        files[path.relative_to(folder).as_posix()] = entry
    with (folder / MANIFEST).open("w", encoding="utf-8") as handle:
        json.dump({"files": files}, handle, indent=1)


def verify(folder: Path) -> str | None:
    """None when `folder` matches its manifest; otherwise what is wrong, in a few words."""
    try:
        files = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
        assert isinstance(files, dict)
    except FileNotFoundError:
        return f"{MANIFEST} is missing (an interrupted or damaged save)"
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return f"{MANIFEST} is unreadable"
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != entry.get("size"):
            return f"{name} has {size} bytes, {entry.get('size')} were written"
        if entry.get("sha256") and sha256_file(path) != entry["sha256"]:
            return f"{name} does not match its checksum"
    if STATE_FILE not in files and folder.parent.name == "checkpoints":
        return f"{STATE_FILE} was never written"
    return None
