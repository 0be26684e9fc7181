"""A seeded fuzz of the readers and renderers: hostile rows never raise a traceback.

Every generated line is either read into a Record or skipped with a reason, and every record
read is rendered (or skipped as over-long). The CI run is 400 rows per seed and two seeds;
a longer run: ESSENCE_FUZZ_ROWS=20000 .venv/bin/pytest tests/data/test_fuzz_readers.py
"""

import json
import os
import random

import pytest

from essence.data.pipeline import DataConfig, render_records
from essence.data.records import read_records
from essence.errors import EssenceError

ROWS = int(os.environ.get("ESSENCE_FUZZ_ROWS", "400"))
TAGS = ["<think>", "</think>", "<|begin_of_thought|>", "<|end_of_thought|>",
        "<|begin_of_solution|>", "<|end_of_solution|>", "<|im_start|>", "<|im_end|>",
        "<|endoftext|>", "{{ messages }}", "{% if %}"]


def hostile_text(rng: random.Random) -> object:
    kind = rng.randrange(12)
    if kind == 0:
        return ""
    if kind == 1:
        return " \t\n" * rng.randrange(1, 5)
    if kind == 2:
        return "".join(chr(rng.randrange(0, 32)) for _ in range(rng.randrange(1, 20)))
    if kind == 3:
        return "x" * rng.choice([1, 1000, 70000])
    if kind == 4:
        return "".join(rng.choice(TAGS) for _ in range(rng.randrange(1, 6)))
    if kind == 5:
        return "<think>" + rng.choice(["", "a", "<think>b</think>"]) + rng.choice(["", "</think>"])
    if kind == 6:
        return rng.choice([None, 0, -1, 3.5, True, [], {}, ["a", 1], {"k": "v"}, [["x"]]])
    if kind == 7:
        return "".join(chr(rng.choice([0xD7FF, 0xFEFF, 0x202E, 0x0301, 0x1F600, 0x10FFFF]))
                       for _ in range(rng.randrange(1, 8)))
    if kind == 8:
        return "\\boxed{" * rng.randrange(1, 4) + "1"
    return rng.choice(["What is 2+2?", "Think: 2+2=4.", "\\boxed{4}", "ok"])


def hostile_row(rng: random.Random) -> object:
    t = lambda: hostile_text(rng)  # noqa: E731
    shape = rng.randrange(8)
    if shape == 0:
        return {"problem": t(), "reasoning": t(), "answer": t(), "id": t()}
    if shape == 1:
        return {"conversations": rng.choice([t(), [{"from": "user", "value": t()},
                                                   {"from": rng.choice(["gpt", "assistant", 7]),
                                                    "value": t()}]]), "system": t()}
    if shape == 2:
        return {"messages": rng.choice([t(), [{"role": "user", "content": t()},
                                              {"role": "assistant", "content": t(),
                                               "reasoning_content": t()}]])}
    if shape == 3:
        return {"prompt": t(), "llm_response": t()}
    if shape == 4:
        return {"input": rng.choice([t(), [{"role": "user", "content": t()}]]), "output": t()}
    if shape == 5:
        return t()  # not an object at all
    if shape == 6:
        return {"question": t(), "thinking_trajectories": [t(), t()], "attempt": t(),
                "extra": {"nested": [t()]}}
    return {rng.choice(["problem", "reasoning", "answer", "junk"]): t() for _ in range(3)}


def hostile_line(rng: random.Random) -> bytes:
    kind = rng.randrange(20)
    if kind == 0:
        return b'{"problem": "cut sh'
    if kind == 1:
        return bytes(rng.randrange(128, 256) for _ in range(rng.randrange(1, 30)))
    if kind == 2:
        return b"[" * 100000 + b"]" * 100000  # deeper than json's recursion limit
    if kind == 3:
        return json.dumps({"problem": "a\ud800b", "reasoning": "r", "answer": "1"}).encode()
    return json.dumps(hostile_row(rng), ensure_ascii=rng.random() < 0.5).encode(
        "utf-8", "surrogatepass")


@pytest.mark.parametrize("seed", [0, 1])
def test_hostile_rows_are_read_or_skipped_with_a_reason(seed, tmp_path, small_tokenizer):
    rng = random.Random(seed)
    lines = [hostile_line(rng) for _ in range(ROWS)]
    # A few valid rows so rendering is exercised whatever the seed.
    lines += [json.dumps({"problem": "p", "reasoning": "r", "answer": "a"}).encode()] * 3
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    outcome = {"read": 0, "skipped": 0, "rendered": 0, "too_long": 0}
    result = read_records(str(path))
    outcome["read"], outcome["skipped"] = len(result.records), len(result.skipped)
    assert outcome["read"] + outcome["skipped"] == sum(1 for l in lines if l.strip())
    assert all(s.reason and str(s).count("\n") == 0 for s in result.skipped)
    for template in (None, "chatml-think"):
        config = DataConfig(source=str(path), chat_template=template, max_length=4096)
        try:
            rendered, too_long = render_records(result.records, small_tokenizer, config, str(path))
        except EssenceError as err:  # a whole-dataset refusal must still be one line
            assert "\n" not in str(err)
            continue
        assert len(rendered) + len(too_long) == len(result.records)
        outcome["rendered"], outcome["too_long"] = len(rendered), len(too_long)
    print(f"seed {seed}: {outcome}")
    assert outcome["read"] > 0 and outcome["skipped"] > 0


def test_fail_mode_names_the_first_bad_row(tmp_path):
    rng = random.Random(7)
    lines = [hostile_line(rng) for _ in range(50)]
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    skipped = read_records(str(path)).skipped
    with pytest.raises(EssenceError, match=rf"hostile.jsonl row {skipped[0].row}\b"):
        read_records(str(path), on_error="fail")
