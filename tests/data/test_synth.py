"""The synthetic arithmetic task and the demo models shipped with the package."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest
import torch
from math_verify import parse, verify

import essence
from essence.data.records import row_to_record
from essence.data.render import render
from essence.data.synth import (
    CHECK_KINDS,
    DEFAULT_STEPS,
    DEMO_INSTRUCTION,
    EASY_STEPS,
    first_derivation,
    generate,
    solve,
    synth_command,
    write_jsonl,
)
from essence.errors import EssenceError

DEMO = Path(essence.__file__).parent / "assets" / "demo"
# A chain such as "2 + 2 + 2 = 6" or "7 - 6 = 1"; each is evaluated whole.
EQUATION = re.compile(r"(?<![\d*+-] )\b(\d+(?: [-+*] \d+)+) = (\d+)")


def answer_from_text(problem: str) -> int:
    """The problem's answer, read from its sentences alone (independent of the generator)."""
    sentences = re.split(r"(?<=[.?])\s+", problem)
    value = int(re.fullmatch(r"\w+ has (\d+) \w+\.", sentences[0]).group(1))
    for s in sentences[1:-1]:
        if m := re.fullmatch(r"(?:She|He) buys (\d+) \w+ of (\d+) each\.", s):
            value += int(m.group(1)) * int(m.group(2))
        elif m := re.fullmatch(r"(?:She|He) gives (\d+) friends (\d+) each\.", s):
            value -= int(m.group(1)) * int(m.group(2))
        elif m := re.fullmatch(r"(?:She|He) (?:finds|gets|buys|wins) (\d+) more\.", s):
            value += int(m.group(1))
        elif m := re.fullmatch(r"(?:She|He) (?:gives away|loses|sells|uses) (\d+)\.", s):
            value -= int(m.group(1))
        else:
            raise AssertionError(f"unparsed sentence {s!r}")
    assert sentences[-1].startswith("How many"), sentences[-1]
    return value


def test_same_seed_same_rows_and_another_seed_other_rows():
    assert generate(50, 7) == generate(50, 7)
    assert [r["problem"] for r in generate(50, 7)] != [r["problem"] for r in generate(50, 8)]
    assert generate(5, 7) == generate(50, 7)[:5]
    assert generate(5, 7, checks=(1, 1)) != generate(5, 7)  # every knob is part of the seed


def test_rows_have_the_flat_schema_and_a_written_up_answer_ending_in_a_box():
    for row in generate(20, 0):
        assert set(row) == {"id", "problem", "reasoning", "answer", "meta"}
        result, steps = row["meta"]["result"], row["meta"]["steps"]
        assert row["answer"].endswith(f"\n\nThe answer is \\boxed{{{result}}}.")
        assert [f"{i}. " in row["answer"] for i in range(1, steps + 2)] == [True] * steps + [False]
        assert row["problem"].endswith("?") and DEMO_INSTRUCTION not in row["problem"]
    bare = generate(20, 0, writeup=False)
    assert all(r["answer"] == f"The answer is \\boxed{{{r['meta']['result']}}}." for r in bare)


@pytest.mark.parametrize("steps,digits", [(DEFAULT_STEPS, 1), (EASY_STEPS, 2), ((1, 6), 3)])
def test_every_answer_is_verified_correct_from_the_problem_text(steps, digits):
    for row in generate(150, 3, steps=steps, digits=digits):
        truth = answer_from_text(row["problem"])
        assert truth == solve(row["meta"]) == row["meta"]["result"] >= 0, row["id"]
        assert verify(parse(f"${truth}$"), parse(row["answer"])), row["id"]
        assert not verify(parse(f"${truth + 1}$"), parse(row["answer"]))


def test_every_equation_in_trace_and_answer_is_true_and_the_working_comes_first():
    for row in generate(150, 5, digits=2):
        for text in (row["reasoning"], row["answer"]):
            equations = EQUATION.findall(text)
            for lhs, rhs in equations:
                assert eval(lhs) == int(rhs) >= 0, (row["id"], lhs, rhs)  # digits and + - * only
        assert len(EQUATION.findall(row["reasoning"])) >= row["meta"]["steps"] + len(row["meta"]["checks"]) - 1
        meta = row["meta"]
        working, checks = row["reasoning"][: meta["derivation_end"]], row["reasoning"][meta["derivation_end"]:]
        conclusion = working.split("\n")[-1]
        assert re.fullmatch(rf"So \w+ has {meta['result']} \w+\.", conclusion), conclusion
        assert working.split("\n")[1] == f"Start: {meta['start']}."
        assert "Start:" not in checks and str(meta["result"]) in checks.split("\n")[-1]
        assert len(checks.strip().split("\n")) == len(meta["checks"]) + 1  # one line each, then a closer


def test_checks_are_distinct_varied_kinds_within_the_knob():
    rows = generate(300, 1)
    counts = [len(r["meta"]["checks"]) for r in rows]
    assert set(counts) == {4, 5, 6}
    assert all(len(set(r["meta"]["checks"])) == len(r["meta"]["checks"]) for r in rows)
    firsts = {r["meta"]["checks"][0] for r in rows}
    assert firsts == set(CHECK_KINDS)  # every kind leads some trace: the re-checks vary
    unchecked = generate(30, 1, checks=(0, 0))
    assert {len(r["meta"]["checks"]) for r in unchecked} == {0}
    assert not any(r["reasoning"].endswith("agrees") or "Everything agrees" in r["reasoning"] for r in unchecked)


def test_first_derivation_reads_the_conclusion_of_the_working_not_the_answer():
    for row in generate(50, 4):
        assert first_derivation("<think>\n" + row["reasoning"]) == row["meta"]["result"]
    looping = "<think>\nStart: 3.\nBuy 5: 3 + 5 = 8.\nSo Max has 8 shells.\nSo Max has 9 shells.\nLet me"
    assert first_derivation(looping) == 8  # the first conclusion counts, boxed or not
    assert first_derivation("The answer is \\boxed{8}.") is None


def test_difficulty_knobs_set_steps_and_digits():
    for n_steps in (1, 3, 6):
        rows = generate(30, 1, steps=(n_steps, n_steps))
        assert {len(r["meta"]["ops"]) for r in rows} == {n_steps}
        assert all(r["problem"].count(".") == n_steps + 1 for r in rows)
    assert {len(str(r["meta"]["start"])) for r in generate(30, 1, digits=3)} == {3}
    assert {len(r["meta"]["ops"]) for r in generate(200, 1)} == set(range(DEFAULT_STEPS[0], DEFAULT_STEPS[1] + 1))
    assert {len(r["meta"]["ops"]) for r in generate(200, 1, steps=EASY_STEPS)} == {1, 2}


@pytest.mark.parametrize("kwargs", [{"n": -1}, {"steps": (0, 2)}, {"steps": (3, 2)}, {"digits": 0},
                                    {"checks": (3, 2)}, {"checks": (0, len(CHECK_KINDS) + 1)}])
def test_bad_knobs_are_refused_with_a_message(kwargs):
    args = {"n": 3, "seed": 0, **kwargs}
    with pytest.raises(EssenceError, match="synth"):
        generate(args.pop("n"), args.pop("seed"), **args)


def test_synth_command_writes_jsonl_atomically(tmp_path):
    out = tmp_path / "sub" / "synth.jsonl"
    assert synth_command(12, 4, str(out), (1, 2), 1, (0, 1), False) == 12
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == generate(12, 4, steps=(1, 2), digits=1, checks=(0, 1), writeup=False)
    write_jsonl(rows[:2], out)
    assert len(out.read_text().splitlines()) == 2
    assert [p.name for p in out.parent.iterdir()] == ["synth.jsonl"]  # no temporary left behind


# --- proportions, as the demo renders them ----------------------------------------------


@pytest.fixture(scope="module")
def demo_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO / "teacher")


def shares(rows: list[dict], tok) -> dict[str, float]:
    """Token shares of prompt / CoT / answer over all rows, and where the working ends (mean)."""
    totals = {"prompt": 0, "cot": 0, "answer": 0}
    derivation = []
    for row in rows:
        row = {**row, "problem": f"{row['problem']}\n{DEMO_INSTRUCTION}"}  # as the demo trains
        rendered = render(row_to_record(row, row["id"]), tok)
        spans = rendered.spans
        for name in totals:
            lo, hi = getattr(spans, name)
            totals[name] += hi - lo
        end_char = rendered.text.index(row["reasoning"]) + row["meta"]["derivation_end"]
        end_tok = sum(1 for a, _ in rendered.offsets if a < end_char)
        derivation.append((end_tok - spans.cot[0]) / (spans.cot[1] - spans.cot[0]))
    n = sum(totals.values())
    return {**{k: v / n for k, v in totals.items()}, "derivation_in_cot": statistics.mean(derivation)}


def test_default_traces_have_the_proportions_of_real_long_cot_traces(demo_tokenizer):
    # Bespoke-Stratos (system prompt dropped): ~8% prompt, ~71% CoT, ~21% answer.
    got = shares(generate(200, 11), demo_tokenizer)
    assert got["prompt"] <= 0.15 and 0.15 <= got["answer"] <= 0.25 and got["cot"] >= 0.6, got
    # The working comes first: it ends in the first half of the CoT; the rest is re-checking.
    assert 0.2 <= got["derivation_in_cot"] <= 0.5, got


def test_the_knobs_move_the_proportions(demo_tokenizer):
    base = shares(generate(100, 11), demo_tokenizer)
    few_checks = shares(generate(100, 11, checks=(0, 1)), demo_tokenizer)
    bare = shares(generate(100, 11, writeup=False), demo_tokenizer)
    assert few_checks["cot"] < base["cot"] - 0.15 and few_checks["derivation_in_cot"] > 0.6
    assert bare["answer"] < 0.06 < 0.15 < base["answer"]


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
    assert sum(p.stat().st_size for p in files) <= 10 * 2**20
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


def _solve(tok, model, rows, max_new_tokens: int = 512) -> list[str]:
    """Greedy completions, decoded with special tokens, cut after the first <|im_end|>."""
    tok.padding_side = "left"
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": r["problem"] + "\n" + DEMO_INSTRUCTION}],
                                tokenize=False, add_generation_prompt=True)
        for r in rows
    ]
    enc = tok(prompts, add_special_tokens=False, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    texts = [tok.decode(o, skip_special_tokens=False) for o in out[:, enc["input_ids"].shape[1]:]]
    return [t[: t.index("<|im_end|>") + len("<|im_end|>")] if "<|im_end|>" in t else t for t in texts]


def _boxed(text: str) -> int | None:
    found = re.findall(r"\\boxed\{(\d+)\}", text)
    return int(found[-1]) if found else None


def _finished(text: str) -> bool:
    """Closed its think block, then an answer holding a \\boxed{N}, then stopped."""
    return bool(re.fullmatch(r"<think>\n.+\n</think>\n\n(?:(?!</?think>).)*\\boxed\{\d+\}\.<\|im_end\|>", text, re.S))


def test_demo_teacher_solves_fresh_hard_problems(demo):
    tok, teacher, _ = demo
    rows = generate(12, 2024)
    texts = _solve(tok, teacher, rows)
    solved = [_boxed(t) == r["meta"]["result"] for t, r in zip(texts, rows)]
    assert sum(solved) >= 10, (solved, texts[solved.index(False)] if False in solved else "")


@pytest.mark.slow
def test_base_student_finishes_hard_problems_it_was_never_trained_on_but_mostly_fails_them(demo):
    # The base student saw only easy problems: it must still close its thinking, box an
    # answer and stop (as a real base model concludes), on at least 95% of the hard ones.
    tok, _, student = demo
    rows = generate(100, 2025)
    texts = _solve(tok, student, rows)
    done = [_finished(t) for t in texts]
    assert sum(done) >= 95, [t for t, d in zip(texts, done) if not d][:2]
    solved = sum(_boxed(t) == r["meta"]["result"] for t, r in zip(texts, rows))
    assert solved <= 40, solved  # the teacher has the hard problems to teach it
    easy = generate(40, 2026, steps=EASY_STEPS)
    easy_solved = sum(_boxed(t) == r["meta"]["result"] for t, r in zip(_solve(tok, student, easy), easy))
    assert easy_solved >= 30, easy_solved
