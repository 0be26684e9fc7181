"""The synthetic arithmetic task and the demo models shipped with the package."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from math_verify import parse, verify

import essence
from essence.data.synth import DEMO_INSTRUCTION, generate, solve, synth_command, write_jsonl
from essence.errors import EssenceError

DEMO = Path(essence.__file__).parent / "assets" / "demo"
EQUATION = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def answer_from_text(problem: str) -> int:
    """The problem's answer, read from its sentences alone (independent of the generator)."""
    sentences = re.split(r"(?<=[.?])\s+", problem)
    value = int(re.fullmatch(r"\w+ has (\d+) \w+\.", sentences[0]).group(1))
    for s in sentences[1:-1]:
        if m := re.search(r"(?:buys|gets) (\d+) \w+ of (\d+) \w+ each\.", s):
            value += int(m.group(1)) * int(m.group(2))
        elif m := re.search(r"gives (\d+) friends (\d+) \w+ each\.", s):
            value -= int(m.group(1)) * int(m.group(2))
        elif m := re.search(r"(?:finds|gets|buys|wins) (\d+) more \w+\.", s):
            value += int(m.group(1))
        elif m := re.search(r"(?:gives away|loses|sells|uses) (\d+) \w+\.", s):
            value -= int(m.group(1))
        else:
            raise AssertionError(f"unparsed sentence {s!r}")
    assert sentences[-1].startswith("How many"), sentences[-1]
    return value


def test_same_seed_same_rows_and_another_seed_other_rows():
    assert generate(50, 7) == generate(50, 7)
    assert [r["problem"] for r in generate(50, 7)] != [r["problem"] for r in generate(50, 8)]
    assert generate(5, 7) == generate(50, 7)[:5]


def test_rows_have_the_flat_schema_and_a_boxed_integer_answer():
    for row in generate(20, 0):
        assert set(row) == {"id", "problem", "reasoning", "answer", "meta"}
        assert row["answer"] == f"The answer is \\boxed{{{row['meta']['result']}}}."
        assert row["problem"].endswith("?") and DEMO_INSTRUCTION not in row["problem"]


@pytest.mark.parametrize("steps,digits", [((2, 4), 1), ((2, 4), 2), ((1, 6), 3)])
def test_every_answer_is_verified_correct_from_the_problem_text(steps, digits):
    for row in generate(150, 3, steps=steps, digits=digits):
        truth = answer_from_text(row["problem"])
        assert truth == solve(row["meta"]) == row["meta"]["result"] >= 0, row["id"]
        assert verify(parse(f"${truth}$"), parse(row["answer"])), row["id"]
        assert not verify(parse(f"${truth + 1}$"), parse(row["answer"]))


def test_every_line_of_the_trace_is_correct_arithmetic_and_derivation_comes_before_checks():
    for row in generate(100, 5):
        equations = EQUATION.findall(row["reasoning"])
        assert len(equations) >= 2 * row["meta"]["steps"]
        for a, op, b, c in equations:
            assert OPS[op](int(a), int(b)) == int(c) >= 0, (row["id"], a, op, b, c)
        lines = row["reasoning"].split("\n")
        conclusion = next(i for i, l in enumerate(lines) if l.startswith("So "))
        assert lines[0] == f"Start: {row['meta']['start']}."
        assert str(row["meta"]["result"]) in lines[conclusion]
        assert lines[conclusion + 1].startswith("Check") and lines[-1].startswith("Both checks")


def test_difficulty_knobs_set_steps_and_digits():
    for n_steps in (1, 3, 6):
        rows = generate(30, 1, steps=(n_steps, n_steps))
        assert {len(r["meta"]["ops"]) for r in rows} == {n_steps}
        assert all(r["problem"].count(".") == n_steps + 1 for r in rows)
    assert {len(str(r["meta"]["start"])) for r in generate(30, 1, digits=3)} == {3}
    mixed = {len(r["meta"]["ops"]) for r in generate(200, 1, steps=(2, 4))}
    assert mixed == {2, 3, 4}


@pytest.mark.parametrize("kwargs", [{"n": -1}, {"steps": (0, 2)}, {"steps": (3, 2)}, {"digits": 0}])
def test_bad_knobs_are_refused_with_a_message(kwargs):
    args = {"n": 3, "seed": 0, **kwargs}
    with pytest.raises(EssenceError, match="synth"):
        generate(args.pop("n"), args.pop("seed"), **args)


def test_synth_command_writes_jsonl_atomically(tmp_path):
    out = tmp_path / "sub" / "synth.jsonl"
    assert synth_command(12, 4, str(out), (1, 2), 1) == 12
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == generate(12, 4, steps=(1, 2), digits=1)
    write_jsonl(rows[:2], out)
    assert len(out.read_text().splitlines()) == 2
    assert [p.name for p in out.parent.iterdir()] == ["synth.jsonl"]  # no temporary left behind


# --- the shipped demo models ------------------------------------------------------------


@pytest.fixture(scope="module")
def demo():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(DEMO / "teacher")
    teacher = AutoModelForCausalLM.from_pretrained(DEMO / "teacher").eval()
    student = AutoModelForCausalLM.from_pretrained(DEMO / "student").eval()
    return tok, teacher, student


def test_demo_assets_are_small_and_share_one_tokenizer():
    files = [p for p in DEMO.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (DEMO / "teacher" / name).read_bytes() == (DEMO / "student" / name).read_bytes()
    assert (DEMO / "README.md").is_file()


def test_demo_tokenizer_has_chatml_think_tokens_and_one_token_per_digit(demo):
    tok, teacher, student = demo
    assert teacher.config.vocab_size == student.config.vocab_size == len(tok)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for special in ("<think>", "</think>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1, special
    assert tok.tokenize("12 + 345 = 357")[:2] == ["1", "2"]
    assert sum(t.isdigit() for t in tok.tokenize("12 + 345 = 357")) == 8
    messages = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "<think>\nr\n</think>\n\nA"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n<think>\nr\n</think>\n\nA<|im_end|>\n"
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert "".join(text[a:b] for a, b in enc["offset_mapping"]) == text
    assert tok.decode(enc["input_ids"]) == text


def _solve(tok, model, rows) -> list[str]:
    tok.padding_side = "left"
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": r["problem"] + "\n" + DEMO_INSTRUCTION}],
                                tokenize=False, add_generation_prompt=True)
        for r in rows
    ]
    enc = tok(prompts, add_special_tokens=False, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=300, do_sample=False)
    return [tok.decode(o, skip_special_tokens=False) for o in out[:, enc["input_ids"].shape[1]:]]


def _boxed(text: str) -> int | None:
    found = re.findall(r"\\boxed\{(\d+)\}", text)
    return int(found[-1]) if found else None


def test_demo_teacher_solves_fresh_problems_and_student_knows_the_format(demo):
    tok, teacher, student = demo
    rows = generate(10, 2024)
    solved = [_boxed(t) == r["meta"]["result"] for t, r in zip(_solve(tok, teacher, rows), rows)]
    assert sum(solved) >= 8, solved
    for text in _solve(tok, student, rows[:4]):
        assert re.search(r"</think>\n\nThe answer is \\boxed\{\d+\}\.<\|im_end\|>", text), text
