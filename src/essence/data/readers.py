"""Rows from a local file (.jsonl, .json, .parquet) or a hub dataset, as (row, parse error) pairs.

A bad row is reported with its line and why, never raised mid-read; a file that cannot be
read at all (missing, a folder, binary, not UTF-8) is refused before anything loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from essence.errors import EssenceError

# A row longer than this is bad input, not a reason to read gigabytes into one string.
MAX_ROW_BYTES = 64 * 2**20


def _check_text_file(path: Path) -> None:
    """Refuse a binary file given as JSON text (NUL bytes never occur in UTF-8 JSON)."""
    with path.open("rb") as handle:
        head = handle.read(8192)
    if b"\x00" in head:
        raise EssenceError(f"data file {path} is binary (NUL bytes in its first 8 KB), not "
                           "UTF-8 JSON text; pass a .jsonl/.json file of rows, or a .parquet file")


def _decode(raw: bytes, first: bool) -> str:
    """A line of UTF-8 text (a leading byte-order mark dropped); UnicodeDecodeError otherwise."""
    return raw.decode("utf-8-sig" if first else "utf-8")


def _not_utf8(err: UnicodeDecodeError) -> str:
    return (f"not UTF-8 text (byte 0x{err.object[err.start]:02x} at column {err.start + 1}); "
            "re-save the file as UTF-8")


LONE_SURROGATE = "holds a \\ud800-\\udfff escape that is not a character (half a pair)"


def _has_lone_surrogate(text: str, row: Any) -> bool:
    """Whether JSON `text` decoded to a string no tokenizer accepts (an unpaired surrogate)."""
    if "\\ud" not in text.lower():
        return False
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _lines(handle, limit: int) -> Iterator[tuple[bytes, bool]]:
    """(line, complete) pairs; a line longer than `limit` bytes is skipped over, not kept."""
    while True:
        line = handle.readline(limit)
        if not line:
            return
        if len(line) < limit or line.endswith(b"\n"):
            yield line, True
            continue
        while line and not line.endswith(b"\n"):  # drain the rest of the oversized line
            line = handle.readline(limit)
        yield b"", False


def _rows_jsonl(path: Path) -> Iterator[tuple[Any, str | None]]:
    with path.open("rb") as handle:
        for number, (raw, complete) in enumerate(_lines(handle, MAX_ROW_BYTES)):
            if not complete:
                yield None, f"row is longer than {MAX_ROW_BYTES // 2**20} MiB"
                continue
            try:
                line = _decode(raw, first=number == 0)
            except UnicodeDecodeError as err:
                yield None, _not_utf8(err)
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                yield None, f"malformed JSON line ({err.msg} at column {err.colno})"
            except RecursionError:
                yield None, "JSON nested too deeply"
            else:
                yield (None, LONE_SURROGATE) if _has_lone_surrogate(line, row) else (row, None)


def _rows_json(path: Path) -> Iterator[tuple[Any, str | None]]:
    try:
        text = _decode(path.read_bytes(), first=True)
        data = json.loads(text)
    except UnicodeDecodeError as err:
        raise EssenceError(f"data file {path}: {_not_utf8(err)}") from None
    except RecursionError:
        raise EssenceError(f"{path}: JSON nested too deeply to read") from None
    except json.JSONDecodeError as err:
        raise EssenceError(f"{path}: not valid JSON ({err.msg}, line {err.lineno}); "
                           "a .json file must hold a list of row objects") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise EssenceError(f"{path}: expected a JSON list of row objects")
    escapes = "\\ud" in text.lower()  # only then can a row hold half a surrogate pair
    for row in data:
        bad = escapes and _has_lone_surrogate("\\ud", row)
        yield (None, LONE_SURROGATE) if bad else (row, None)


def _rows_parquet(path: Path) -> Iterator[tuple[Any, str | None]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for unreadable files
        raise EssenceError(f"{path}: cannot read as Parquet ({err})") from None
    for row in table.to_pylist():
        yield row, None


def _rows_hub(name: str, config: str | None, split: str) -> Iterator[tuple[Any, str | None]]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # the hub client raises many types; the user needs the text
        raise EssenceError(
            f"dataset {name!r} (config {config!r}, split {split!r}) could not be loaded: "
            f"{err}. Pass a local .jsonl/.json/.parquet file, or check the name, the split "
            "and network access (HF_HUB_OFFLINE=1 reads the local cache only)"
        ) from None
    for row in dataset:
        yield row, None


def read_rows(source: str, config: str | None = None,
              split: str = "train") -> Iterator[tuple[Any, str | None]]:
    """(row, parse error) pairs of a local file or hub dataset; errors for unreadable sources.

    Anything that looks like a local path (see essence.paths.looks_local) is read from disk
    and never sent to the hub.
    """
    from essence.paths import looks_local, near_data_suffix

    if not looks_local(source):
        return _rows_hub(source, config, split)
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if path.is_dir():
        raise EssenceError(f"data file {source} is a folder; pass one .jsonl, .json or "
                           ".parquet file")
    if not path.exists():
        near = near_data_suffix(source)
        hint = f" (did you mean {near}?)" if near and near != suffix else ""
        raise EssenceError(f"data file {source} does not exist{hint}; check the path")
    readers = {".jsonl": _rows_jsonl, ".json": _rows_json, ".parquet": _rows_parquet}
    if suffix not in readers:
        raise EssenceError(f"data file {source}: unknown format; use .jsonl, .json or .parquet")
    try:
        path.open("rb").close()
    except OSError as err:
        raise EssenceError(f"data file {source} cannot be read: {err.strerror}") from None
    if suffix in (".jsonl", ".json"):  # here, not in the lazy readers: checked on the call
        _check_text_file(path)
    return readers[suffix](path)
