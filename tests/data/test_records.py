import json

import pytest
from conftest import RECORDS

from essence.data.records import read_records
from essence.errors import EssenceError


def test_sharegpt_thought_markers():
    result = read_records(str(RECORDS / "bespoke_stratos.jsonl"))
    assert len(result.records) == 3 and not result.skipped
    first = result.records[0]
    assert first.system.startswith("Your role as an assistant")
    assert first.prompt.startswith("Return your final response within")
    assert first.cot.startswith("Okay, let me set up") and first.cot.endswith("Yes, that matches.")
    assert first.answer.startswith("Let the width") and first.answer.endswith("square centimetres.")
    assert "<|" not in first.cot + first.answer


def test_messages_think_tags_and_reasoning_content():
    records = read_records(str(RECORDS / "openr1_messages.jsonl")).records
    assert [r.system for r in records] == [None, None, "You are a careful mathematician."]
    assert records[0].cot.startswith("A polygon with n sides")
    assert records[0].answer.startswith("The interior angles")
    assert records[2].cot.startswith("Average speed is distance over time")
    assert records[2].answer == "The average speed is $\\boxed{72}$ km/h."


def test_flat_columns_every_alias():
    records = read_records(str(RECORDS / "flat_columns.jsonl")).records
    assert [r.prompt[:8] for r in records] == ["What is ", "If f(x) ", "Find the"]
    assert records[0].cot.startswith("2^3 = 8") and "\\boxed{2}" in records[0].answer
    assert records[1].cot == "f(2) = 4 + 1 = 5. Then f(5) = 25 + 1 = 26."  # list of strings
    assert records[2].answer.endswith("$\\boxed{36}$.")
    assert records[0].meta == {"domain": "math"}


def test_reasoning_list_is_joined(tmp_path):
    path = tmp_path / "list.jsonl"
    row = {"question": "q", "thinking_trajectories": ["step one", "step two"], "attempt": "a"}
    path.write_text(json.dumps(row) + "\n")
    assert read_records(str(path)).records[0].cot == "step one\n\nstep two"


def test_bad_rows_are_skipped_with_reasons():
    path = RECORDS / "bad_records.jsonl"
    result = read_records(str(path))
    assert [r.prompt for r in result.records] == ["Valid one among the bad."]
    reasons = {s.row: (s.field, s.reason) for s in result.skipped}
    assert reasons[0] == ("conversations", "has no assistant turn")
    assert reasons[1][0] == "messages" and "</think>" in reasons[1][1]
    assert reasons[2] == ("reasoning", "is empty")
    assert reasons[3] == ("problem", "is int, expected a string")
    assert reasons[5][0] is None and "malformed JSON" in reasons[5][1]
    assert all(str(path) in str(s) for s in result.skipped)


def test_on_error_fail_names_file_row_and_field():
    with pytest.raises(EssenceError, match=r"bad_records.jsonl row 0: field 'conversations'"):
        read_records(str(RECORDS / "bad_records.jsonl"), on_error="fail")


def test_field_map_for_other_columns(tmp_path):
    path = tmp_path / "custom.json"
    path.write_text(json.dumps([{"q": "Q?", "r": "because", "a": "42", "key": 7}]))
    records = read_records(str(path), field_map={"prompt": "q", "cot": "r", "answer": "a",
                                                  "id": "key"}).records
    assert (records[0].id, records[0].prompt, records[0].cot, records[0].answer) == (
        "7", "Q?", "because", "42")
    with pytest.raises(EssenceError, match="field_map has unknown keys"):
        read_records(str(path), field_map={"question": "q"})


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([{"problem": "p", "reasoning": "r", "answer": "a"}]), path)
    records = read_records(str(path)).records
    assert (records[0].prompt, records[0].cot, records[0].answer) == ("p", "r", "a")


def test_missing_unreadable_and_unknown_files(tmp_path):
    with pytest.raises(EssenceError, match="does not exist"):
        read_records(str(tmp_path / "nope.jsonl"))
    odd = tmp_path / "rows.csv"
    odd.write_text("a,b\n")
    with pytest.raises(EssenceError, match="unknown format"):
        read_records(str(odd))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(EssenceError, match="broken.json: not valid JSON"):
        read_records(str(broken))


def test_ids_come_from_rows_or_positions(tmp_path):
    path = tmp_path / "ids.jsonl"
    rows = [{"id": "abc", "problem": "p", "reasoning": "r", "answer": "a"},
            {"problem": "p", "reasoning": "r", "answer": "a"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert [r.id for r in read_records(str(path)).records] == ["abc", "ids:1"]


def write_rows(tmp_path, rows, name="rows.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_synthetic1_nemotron_and_plain_instruction_rows(tmp_path):
    rows = [
        # SYNTHETIC-1: prompt + llm_response with the reasoning inline
        {"prompt": "What is 2+2?", "llm_response": "<think>\n2+2=4\n</think>\n\n$\\boxed{4}$",
         "task_type": "verifiable_math", "gold_standard_solution": "4"},
        {"prompt": ["What is 3+3?"], "llm_response": ["6"]},  # one-element lists; no think block
        # Nemotron: input messages + output, system_prompt column
        {"input": [{"role": "user", "content": "Q1?"}], "output": "<think>\nhmm\n</think>\n\nA1.",
         "system_prompt": "detailed thinking on", "reasoning": "on"},
        {"input": [[{"role": "user", "content": "Q2?"}]], "output": "A2.", "reasoning": "off"},
        # plain instruction data: prompt + response, and the Alpaca layout
        {"prompt": "Say hi", "response": "hi"},
        {"instruction": "Translate", "input": "bonjour", "output": "hello"},
        {"instruction": "Name a colour", "input": "", "output": "blue"},
    ]
    result = read_records(write_rows(tmp_path, rows))
    assert not result.skipped, result.skipped
    got = [(r.system, r.prompt, r.cot, r.answer) for r in result.records]
    assert got == [
        (None, "What is 2+2?", "2+2=4", "$\\boxed{4}$"),
        (None, "What is 3+3?", "", "6"),
        ("detailed thinking on", "Q1?", "hmm", "A1."),
        (None, "Q2?", "", "A2."),
        (None, "Say hi", "", "hi"),
        (None, "Translate\n\nbonjour", "", "hello"),
        (None, "Name a colour", "", "blue"),
    ]
    assert result.records[0].meta == {"task_type": "verifiable_math", "gold_standard_solution": "4"}


def test_new_schemas_name_the_bad_field(tmp_path):
    rows = [{"prompt": "p", "llm_response": ""},
            {"input": [{"role": "system", "content": "s"}], "output": "o"},
            {"input": 7, "output": "o"},
            {"prompt": "p", "response": "<think>\nunclosed"},
            {"problem": "a reasoning row", "reasoning": "", "answer": "still refused"}]
    reasons = {s.row: (s.field, s.reason) for s in read_records(write_rows(tmp_path, rows)).skipped}
    assert reasons[0] == ("llm_response", "is missing or not a non-empty string")
    assert reasons[1] == ("input", "has no user message with string content")
    assert reasons[2] == ("input", "is neither a string nor a list of chat messages")
    assert reasons[3][0] == "response" and "</think>" in reasons[3][1]
    assert reasons[4] == ("reasoning", "is empty")
