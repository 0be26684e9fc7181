"""What a spec names: a shipped asset (essence:...), a local path, or a hub id."""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path

from essence.errors import EssenceError

ASSET_PREFIX = "essence:"


def resolve(spec: str) -> str:
    """Map 'essence:demo/teacher' (or essence:demo.yaml) to the shipped asset; pass others through."""
    if spec.startswith(ASSET_PREFIX):
        path = Path(str(resources.files("essence").joinpath("assets", spec[len(ASSET_PREFIX):])))
        if not path.exists():
            raise EssenceError(f"{spec!r} is not an asset shipped with essence (no {path})")
        return str(path)
    return spec


DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow", ".txt", ".tsv")


def near_data_suffix(spec: str) -> str | None:
    """The data suffix (.jsonl, ...) that `spec` ends in, or nearly does (.jsnol), else None."""
    for suffix in reversed(Path(spec).suffixes):
        close = difflib.get_close_matches(suffix.lower(), DATA_SUFFIXES, n=1, cutoff=0.7)
        if close:
            return close[0]
    return None


def looks_local(spec: str) -> bool:
    """Whether `spec` names a local path rather than a hub id: it exists, starts with . / or ~,
    has more than one slash or a backslash, or ends in (nearly) a data suffix. Such a spec is
    never sent to the hub, so a mistyped file name fails as a missing file, not a network error.
    """
    return (spec.startswith((".", "/", "~")) or "\\" in spec or spec.count("/") > 1
            or Path(spec).expanduser().exists() or near_data_suffix(spec) is not None)
