"""Benchmark problems with gold answers, from the hub (MATH-500, AIME 24/25, GSM8K) or a local file.

Hub benchmarks go through `datasets.load_dataset`, so its cache and HF_HUB_OFFLINE apply.
A local .jsonl/.json/.parquet file works too: the problem is read from the first of
problem | question | prompt, the gold from `answer` (a GSM8K `#### N` line is understood) or
else the last `\\boxed{}` of `solution`; `field_map` names any other columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from essence.errors import EssenceError
from essence.eval.grading import last_boxed

PROBLEM_KEYS = ("problem", "question", "prompt")
ANSWER_KEYS = ("answer", "solution")
ID_KEYS = ("unique_id", "id", "problem_id", "idx")
FIELD_MAP_KEYS = ("problem", "answer", "id")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class Problem:
    """One benchmark problem: what the model is asked and the gold answer it is graded against."""

    id: str
    problem: str
    answer: str  # bare LaTeX, e.g. "\\frac{3}{4}", "26", "(1,4]"
    meta: dict[str, Any] = field(
        default_factory=dict
    )  # the row's other columns (subject, level, ...)


class HubBenchmark(NamedTuple):
    """Where a named benchmark lives on the hub and which columns hold what."""

    dataset: str
    config: str | None
    split: str
    problem: str
    answer: str
    id: str | None  # None: number the rows


BENCHMARKS: dict[str, HubBenchmark] = {
    "math500": HubBenchmark(
        "HuggingFaceH4/MATH-500", None, "test", "problem", "answer", "unique_id"
    ),
    "aime24": HubBenchmark("HuggingFaceH4/aime_2024", None, "train", "problem", "answer", "id"),
    "aime25": HubBenchmark("math-ai/aime25", None, "test", "problem", "answer", "id"),
    "gsm8k": HubBenchmark("openai/gsm8k", "main", "test", "question", "answer", None),
}


def load_benchmark(
    name_or_path: str, *, field_map: dict[str, str] | None = None, limit: int | None = None
) -> list[Problem]:
    """The problems of a named benchmark (see BENCHMARKS) or of a local file, in file order.

    field_map: column names for a local file, e.g. {"problem": "q", "answer": "a", "id": "key"};
        named benchmarks ignore it.
    limit: keep only the first `limit` problems.
    """
    if limit is not None and limit < 1:
        raise EssenceError(
            f"limit must be at least 1, got {limit} (leave it unset to use every problem)"
        )
    field_map = _check_field_map(field_map)
    key = name_or_path.strip().lower()
    if key in BENCHMARKS:
        spec = BENCHMARKS[key]
        # A hub benchmark's columns are known; field_map is for local files (and may name
        # columns only those have, when one run mixes both).
        field_map = {
            "problem": spec.problem,
            "answer": spec.answer,
            **({"id": spec.id} if spec.id else {}),
        }
        source = spec.dataset
        rows = _read_rows(spec.dataset, spec.config, spec.split)
    else:
        path = _local_path(name_or_path)
        source = str(path)
        rows = _read_rows(source, None, "train")
    problems: list[Problem] = []
    for index, (row, parse_error) in enumerate(rows):
        if limit is not None and len(problems) >= limit:
            break
        if parse_error:
            raise EssenceError(f"{source} row {index}: {parse_error}; fix or delete that line")
        problems.append(_problem(row, index, source, field_map))
    if not problems:
        raise EssenceError(
            f"{source} holds no problems; point --bench at a file with at least one row"
        )
    return problems


def gsm8k_gold(answer: str) -> str:
    """GSM8K's gold: the text after the last `####`, thousands separators removed ("3,600" → "3600")."""
    return answer.rsplit("####", 1)[-1].strip().replace(",", "")


def _read_rows(source: str, config: str | None, split: str):
    # One reader for every data file in the package: the same formats, the same messages.
    from essence.data.readers import read_rows

    return read_rows(source, config, split)


def _local_path(name: str) -> Path:
    path = Path(name).expanduser()
    if path.suffix.lower() in FILE_SUFFIXES or path.exists():
        if not path.is_file():
            raise EssenceError(f"benchmark file {name} does not exist; check the path")
        if path.suffix.lower() not in FILE_SUFFIXES:
            raise EssenceError(
                f"benchmark file {name}: unknown format; use {', '.join(FILE_SUFFIXES)}"
            )
        return path
    raise EssenceError(
        f"unknown benchmark {name!r}; known benchmarks are {', '.join(BENCHMARKS)}, "
        f"or pass the path of a local {'/'.join(FILE_SUFFIXES)} file with problem and answer fields"
    )


def _check_field_map(field_map: dict[str, str] | None) -> dict[str, str]:
    field_map = dict(field_map or {})
    if "prompt" in field_map and "problem" not in field_map:
        field_map["problem"] = field_map.pop("prompt")  # the training side calls it "prompt"
    unknown = sorted(set(field_map) - set(FIELD_MAP_KEYS))
    if unknown:
        raise EssenceError(
            f"field map has unknown keys {unknown}; valid keys are {', '.join(FIELD_MAP_KEYS)} "
            "(e.g. --field-map problem=question,answer=final)"
        )
    return field_map


def _problem(row: Any, index: int, source: str, field_map: dict[str, str]) -> Problem:
    where = f"{source} row {index}"
    if not isinstance(row, dict):
        raise EssenceError(
            f"{where} is {type(row).__name__}, expected an object with problem and answer fields"
        )
    problem_key = _column(row, where, "problem", field_map, PROBLEM_KEYS)
    answer_key = _column(row, where, "answer", field_map, ANSWER_KEYS)
    problem = _text(row, problem_key, where)
    answer = _gold(_text(row, answer_key, where), answer_key, where)
    id_key = field_map.get("id") or next((k for k in ID_KEYS if row.get(k) is not None), None)
    row_id = (
        str(row[id_key])
        if id_key and row.get(id_key) is not None
        else f"{Path(source).stem}:{index}"
    )
    meta = {k: v for k, v in row.items() if k not in (problem_key, answer_key, id_key)}
    return Problem(id=row_id, problem=problem, answer=answer, meta=meta)


def _column(
    row: dict, where: str, role: str, field_map: dict[str, str], keys: tuple[str, ...]
) -> str:
    if role in field_map:
        if field_map[role] not in row:
            raise EssenceError(
                f"{where}: field {field_map[role]!r} (mapped to {role}) is missing; "
                f"the row has {', '.join(sorted(row)) or 'no fields'}; fix the field map"
            )
        return field_map[role]
    for key in keys:
        if key in row:
            return key
    raise EssenceError(
        f"{where}: no {role} field (looked for {', '.join(keys)}; the row has "
        f"{', '.join(sorted(row)) or 'no fields'}); name it with --field-map {role}=COLUMN "
        f"(field_map={{'{role}': COLUMN}} in Python)"
    )


def _text(row: dict, key: str, where: str) -> str:
    value = row[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # AIME answers are sometimes stored as integers
    if not isinstance(value, str) or not value.strip():
        raise EssenceError(f"{where}: field {key!r} is empty or not text ({value!r}); fix the row")
    return value.strip()


def _gold(value: str, key: str, where: str) -> str:
    """The gold answer from an answer column: a bare answer, a GSM8K solution, or a boxed solution."""
    if "####" in value:
        return gsm8k_gold(value)
    boxed = last_boxed(value)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    if key == "solution":
        raise EssenceError(
            f"{where}: field 'solution' has no \\boxed{{}} answer to grade against; "
            "add an answer field or name one with --field-map answer=COLUMN"
        )
    return value
