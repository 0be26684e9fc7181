"""What a stopped `essence eval` finished, kept in its --out so the same command resumes it.

Every finished generation batch is appended to OUT/partial.jsonl (one line per response, with
its token ids), under OUT/partial.json, which names the settings, model and benchmarks it
belongs to. Re-running the same command reuses the benchmarks already in summary.json and the
batches already in partial.jsonl, and generates only the rest: batches are seeded by their
position, so the resumed results equal an uninterrupted run's. A torn last line (a kill during
the append) is dropped; other settings start over. Both files go once the evaluation ends.
"""

from __future__ import annotations

import json
from pathlib import Path

from essence.eval.generate import Sample
from essence.eval.results import DETAILS_FILE, SUMMARY_FILE
from essence.io import write_json_atomic

PARTIAL = "partial.jsonl"
STATE = "partial.json"


class Progress:
    """The finished work of one evaluation into `out` (see the module docstring)."""

    def __init__(self, out: Path, key: dict):
        self.out, self.key = Path(out), key
        self.kept = 0  # responses in PARTIAL
        self.done: dict[tuple[str, int, int], Sample] = {}
        self.resuming = _read(self.out / STATE) == key  # an evaluation stopped before
        if self.resuming:
            self._load()
        else:
            (self.out / PARTIAL).unlink(missing_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.out / STATE, key)

    def _load(self) -> None:
        path = self.out / PARTIAL
        if not path.is_file():
            return
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                sample = Sample(row["text"], row["num_tokens"], row["truncated"], tuple(row["ids"]))
                self.done[row["bench"], row["i"], row["s"]] = sample
                self.kept += 1
            except (ValueError, KeyError, TypeError):  # a torn last line: redone
                continue
        if self.done:
            print(f"essence eval: resuming: {len(self.done)} responses kept in {path}")

    def finished(self, bench: str) -> tuple[dict, list[dict]] | None:
        """A benchmark this evaluation already finished (its summary and details lines)."""
        summary = _read(self.out / SUMMARY_FILE) if self.resuming else None
        if not summary or summary.get("settings") != self.key["settings"] or summary.get(
                "model") != self.key["model"] or bench not in summary.get("benchmarks", {}):
            return None
        try:
            lines = [json.loads(line) for line in
                     (self.out / DETAILS_FILE).read_text(encoding="utf-8").splitlines()]
        except (OSError, ValueError):
            return None
        mine = [line for line in lines if line.get("benchmark") == bench]
        scores = summary["benchmarks"][bench]
        return (scores, mine) if len(mine) == scores.get("num_problems") else None

    def samples(self, bench: str) -> dict[tuple[int, int], Sample]:
        return {(i, s): sample for (b, i, s), sample in self.done.items() if b == bench}

    def record(self, bench: str, jobs: list[tuple[int, int]], samples: list[Sample]) -> None:
        """Append one finished batch (flushed, so a stop right after keeps it)."""
        text = "".join(json.dumps({"bench": bench, "i": i, "s": s, "text": x.text,
                                   "num_tokens": x.num_tokens, "truncated": x.truncated,
                                   "ids": list(x.ids)}, ensure_ascii=False) + "\n"
                       for (i, s), x in zip(jobs, samples))
        with (self.out / PARTIAL).open("a", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
        self.kept += len(jobs)

    def close(self) -> None:
        """The evaluation ended: its results are in summary.json and details.jsonl."""
        (self.out / PARTIAL).unlink(missing_ok=True)
        (self.out / STATE).unlink(missing_ok=True)


def _read(path: Path) -> dict | None:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
        return found if isinstance(found, dict) else None
    except (OSError, ValueError):
        return None
