"""Evaluation end to end on a tiny random model: benchmarks, prompts, generation, files, CLI, errors."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from essence.data.render import DEFAULT_INSTRUCTION
from essence.errors import EssenceError
from essence.eval import benchmarks as benchmarks_module
from essence.eval import command
from essence.eval import run as run_module
from essence.eval.benchmarks import Problem, load_benchmark
from essence.eval.generate import (
    Sample,
    SamplingSettings,
    generate_hf,
    stop_token_ids,
    to_sample,
)
from essence.eval.grading import pass_at_k
from essence.eval.prompting import build_prompt
from essence.eval.run import evaluate

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures" / "benchmarks"
MATH500 = FIXTURES / "math500_schema.jsonl"
GSM8K = FIXTURES / "gsm8k_schema.jsonl"
AIME = FIXTURES / "aime_schema.jsonl"


@pytest.fixture
def tokenizer(qwen3_tokenizer):
    return qwen3_tokenizer  # conftest's session-wide copy of the fixture tokenizer


def tiny_model() -> Qwen3ForCausalLM:
    # Qwen3's real logit width (151,936 > len(tokenizer)) with 16-wide, 2-layer weights.
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=151936,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    return Qwen3ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, qwen3_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tiny-qwen3")
    tiny_model().save_pretrained(path)
    qwen3_tokenizer.save_pretrained(path)
    return path


def read_details(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "details.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- end to end


def test_evaluate_end_to_end_on_the_three_fixture_schemas(model_dir: Path, tmp_path: Path) -> None:
    benches = [str(MATH500), str(GSM8K), str(AIME)]
    summary = evaluate(
        str(model_dir),
        benches,
        out_dir=tmp_path,
        n=2,
        max_new_tokens=4,
        batch_size=8,
        progress=False,
    )

    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert list(summary["benchmarks"]) == benches
    assert all(summary["benchmarks"][b]["benchmark"] == b for b in benches)
    details = read_details(tmp_path)
    assert [d["benchmark"] for d in details] == [str(MATH500)] * 4 + [str(GSM8K)] * 2 + [str(AIME)]
    assert [d["gold"] for d in details if d["benchmark"] == str(GSM8K)] == ["26", "3600"]
    for entry in summary["benchmarks"].values():
        lines = [d for d in details if d["benchmark"] == entry["benchmark"]]
        assert (
            entry["num_problems"] == len(lines)
            and entry["n"] == 2
            and entry["model"] == str(model_dir)
        )
        # The summary is recomputable from the details alone.
        counts = [sum(d["correct"]) for d in lines]
        assert entry["pass@1"] == pytest.approx(sum(c / 2 for c in counts) / len(lines))
        assert set(entry["pass@k"]) == {"1", "2"}
        assert entry["pass@k"]["2"] == pytest.approx(
            sum(pass_at_k(2, c, 2) for c in counts) / len(lines)
        )
        tokens = [t for d in lines for t in d["num_tokens"]]
        assert entry["mean_response_tokens"] == pytest.approx(sum(tokens) / len(tokens))
        truncated = [t for d in lines for t in d["truncated"]]
        assert entry["truncated_frac"] == pytest.approx(sum(truncated) / len(truncated))
        assert entry["grading_errors"] == sum(
            e is not None for d in lines for e in d["grading_errors"]
        )
    for d in details:
        assert len(d["responses"]) == len(d["extracted"]) == len(d["correct"]) == 2
        assert all(1 <= t <= 4 for t in d["num_tokens"])
        assert all(t == (k == 4) for t, k in zip(d["truncated"], d["num_tokens"]) if t)
        assert d["problem"] in d["prompt"] and DEFAULT_INSTRUCTION in d["prompt"]
        assert d["prompt"].endswith("<|im_start|>assistant\n")  # left open for the model to think


def test_summary_scores_come_from_grading_the_responses(
    monkeypatch, tokenizer, tmp_path: Path
) -> None:
    # Canned responses with known grades, so pass@k and the fractions have non-trivial values.
    canned = {
        "What is $\\sqrt{49} + \\sqrt{16}$?": [
            "<think>7+4</think> \\boxed{11}",
            "<think>hm \\boxed{11}</think> so \\boxed{12}",
        ],
        "Simplify $\\frac{6}{8}$.": ["\\boxed{0.75}", "<think>\\boxed{\\dfrac{3}{4}}"],
        "Solve $x^2 = 9$ for $x > 0$.": ["\\boxed{-3}", "#### 3"],
    }

    def fake_generate(model, tok, prompts, settings, *, batch_size, progress):
        assert settings.n == 2
        problems = [next(p for p in canned if p in prompt) for prompt in prompts]
        return [[Sample(text, 5, "</think>" not in text) for text in canned[p]] for p in problems]

    monkeypatch.setattr(run_module, "generate_hf", fake_generate)
    summary = evaluate(
        (object(), tokenizer), [str(MATH500)], out_dir=tmp_path, n=2, limit=3, progress=False
    )
    entry = summary["benchmarks"][str(MATH500)]
    assert entry["model"] == "in-memory model"
    assert entry["pass@1"] == pytest.approx((1 / 2 + 2 / 2 + 1 / 2) / 3)
    assert entry["pass@k"]["2"] == pytest.approx(1.0)
    assert entry["think_closed_frac"] == pytest.approx(2 / 6)
    assert entry["truncated_frac"] == pytest.approx(4 / 6)
    details = read_details(tmp_path)
    assert details[0]["correct"] == [True, False] and details[0]["extracted"] == ["11", "12"]
    assert details[1]["extracted"] == ["0.75", "\\frac{3}{4}"]  # as math-verify normalizes it
    assert details[2]["correct"] == [False, True]
    # MATH-500's per-subject and per-level breakdown
    assert entry["by_subject"] == {"Algebra": {"num_problems": 1, "pass@1": 0.5},
                                   "Prealgebra": {"num_problems": 2, "pass@1": 0.75}}
    assert entry["by_level"] == {"1": {"num_problems": 3, "pass@1": pytest.approx(2 / 3)}}


def test_breakdown_only_when_every_problem_has_the_column() -> None:
    from essence.eval.results import summarize

    line = {"correct": [True], "num_tokens": [3], "responses": ["x"], "truncated": [False],
            "grading_errors": [None]}
    lines = [dict(line, meta={"level": 2}), dict(line, correct=[False], meta={"level": 5}),
             dict(line, meta={"subject": "Algebra", "level": 5})]
    summary = summarize(lines, benchmark="b", model="m", seconds=1.0)
    assert "by_subject" not in summary
    assert summary["by_level"] == {"2": {"num_problems": 1, "pass@1": 1.0},
                                   "5": {"num_problems": 2, "pass@1": 0.5}}
    assert "by_level" not in summarize([dict(line, meta={})], benchmark="b", model="m", seconds=1)


# ---------------------------------------------------------------- generation


def test_seeded_generation_is_reproducible_and_leaves_the_callers_rng_alone(tokenizer) -> None:
    model = tiny_model()
    prompts = [build_prompt(tokenizer, "What is 1+1?"), build_prompt(tokenizer, "Name a prime.")]
    settings = SamplingSettings(n=2, max_new_tokens=4, temperature=1.0, top_p=1.0, seed=7)
    state = torch.random.get_rng_state()
    first = generate_hf(model, tokenizer, prompts, settings, batch_size=3, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    second = generate_hf(model, tokenizer, prompts, settings, batch_size=3, progress=False)
    other = generate_hf(
        model,
        tokenizer,
        prompts,
        SamplingSettings(n=2, max_new_tokens=4, temperature=1.0, top_p=1.0, seed=8),
        batch_size=3,
        progress=False,
    )
    assert first == second
    assert [[s.text for s in row] for row in first] != [[s.text for s in row] for row in other]
    assert first[0][0].text != first[0][1].text  # the n samples of a prompt differ


def test_greedy_samples_are_identical_and_generation_stops_at_end_of_turn(tokenizer) -> None:
    model = tiny_model()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    class Ones(torch.nn.Module):
        def forward(self, hidden):
            return torch.ones_like(hidden)

    # With constant final hidden states the logits are the lm_head row sums: make <|im_end|> win.
    model.model.norm = Ones()
    with torch.no_grad():
        model.lm_head.weight[im_end] = 10.0
    settings = SamplingSettings(n=3, max_new_tokens=6, temperature=0.0)
    rows = generate_hf(
        model, tokenizer, [build_prompt(tokenizer, "2+2?")], settings, progress=False
    )
    assert rows == [[Sample("", 1, False)] * 3]


def test_to_sample_cuts_at_the_first_stop_token_and_keeps_think_tags(tokenizer) -> None:
    stops = stop_token_ids(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stops
    body = tokenizer("<think>ok</think>\n\\boxed{4}", add_special_tokens=False)["input_ids"]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    sample = to_sample(body + [im_end, 11, 12], stops, tokenizer)
    assert sample == Sample("<think>ok</think>\n\\boxed{4}", len(body) + 1, False)
    assert to_sample(body, stops, tokenizer) == Sample(
        "<think>ok</think>\n\\boxed{4}", len(body), True
    )


# ---------------------------------------------------------------- benchmarks


def test_local_files_in_each_schema(tmp_path: Path) -> None:
    math = load_benchmark(str(MATH500))
    assert math[1] == Problem(
        "fixture/prealgebra/2.json", "Simplify $\\frac{6}{8}$.", "\\frac{3}{4}", math[1].meta
    )
    assert math[1].meta["subject"] == "Prealgebra"
    gsm = load_benchmark(str(GSM8K))
    assert [p.answer for p in gsm] == ["26", "3600"]
    assert gsm[0].id == "gsm8k_schema:0"
    assert [p.answer for p in load_benchmark(str(AIME))] == ["9"]
    assert len(load_benchmark(str(MATH500), limit=2)) == 2

    custom = tmp_path / "custom.jsonl"
    custom.write_text(json.dumps({"q": "1+1?", "a": 2, "key": "k1"}) + "\n")
    assert load_benchmark(str(custom), field_map={"problem": "q", "answer": "a", "id": "key"}) == [
        Problem("k1", "1+1?", "2", {})
    ]
    solution_only = tmp_path / "solutions.json"
    solution_only.write_text(
        json.dumps([{"question": "Q?", "solution": "so $\\boxed{\\frac{1}{2}}$."}])
    )
    assert load_benchmark(str(solution_only))[0].answer == "\\frac{1}{2}"


@pytest.mark.parametrize(
    "name, hub, row, expected",
    [
        (
            "GSM8K",
            ("openai/gsm8k", "main", "test"),
            {"question": "Q?", "answer": "work\n#### 1,234"},
            Problem("gsm8k:0", "Q?", "1234", {}),
        ),
        (
            "math500",
            ("HuggingFaceH4/MATH-500", None, "test"),
            {"problem": "P", "answer": "\\frac{1}{2}", "unique_id": "u/1.json", "level": 3},
            Problem("u/1.json", "P", "\\frac{1}{2}", {"level": 3}),
        ),
        (
            "aime24",
            ("HuggingFaceH4/aime_2024", None, "train"),
            {"problem": "P", "answer": "33", "id": 60},
            Problem("60", "P", "33", {}),
        ),
        (
            "aime25",
            ("math-ai/aime25", None, "test"),
            {"problem": "P", "answer": 70, "id": "0"},
            Problem("0", "P", "70", {}),
        ),
    ],
)
def test_named_benchmarks_read_the_right_hub_dataset(monkeypatch, name, hub, row, expected) -> None:
    calls = []

    def fake_rows(source, config, split):
        calls.append((source, config, split))
        return iter([(row, None)])

    monkeypatch.setattr(benchmarks_module, "_read_rows", fake_rows)
    assert load_benchmark(name) == [expected]
    assert calls == [hub]


# ---------------------------------------------------------------- command line


def test_cli_eval_runs_and_writes_results(model_dir: Path, tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="essence")
    command.add_parser(parser.add_subparsers(dest="command", required=True))
    custom = tmp_path / "qa.jsonl"
    custom.write_text(json.dumps({"q": "1+1?", "a": "2"}) + "\n")
    custom.with_name("qa2.jsonl").write_text(json.dumps({"q": "2+2?", "a": "4"}) + "\n")
    out = tmp_path / "out"
    args = parser.parse_args(
        [
            "eval",
            "--model",
            str(model_dir),
            "--bench",
            str(custom),
            "--bench",
            str(custom.with_name("qa2.jsonl")),
            "--field-map",
            "problem=q,answer=a",
            "--n",
            "1",
            "--max-new-tokens",
            "2",
            "--temperature",
            "0",
            "--out",
            str(out),
        ]
    )
    assert args.func(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["benchmarks"]) == [
        str(custom),
        str(custom.with_name("qa2.jsonl")),
    ]
    assert summary["settings"]["temperature"] == 0.0 and summary["settings"]["max_new_tokens"] == 2
    assert len(read_details(out)) == 2


def test_cli_requires_model_bench_and_out() -> None:
    parser = argparse.ArgumentParser(prog="essence")
    command.add_parser(parser.add_subparsers(dest="command", required=True))
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--model", "m", "--out", "o"])
    args = parser.parse_args(["eval", "--model", "m", "--bench", "math500", "--out", "o"])
    assert (args.n, args.temperature, args.top_p, args.backend, args.field_map) == (
        1,
        0.6,
        0.95,
        "hf",
        None,
    )


# ---------------------------------------------------------------- errors a user can cause


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "make_bench, expected",
    [
        (
            lambda d: "math5000",
            ["unknown benchmark 'math5000'", "math500", "aime24", "gsm8k", "local"],
        ),
        (lambda d: str(d / "nope.jsonl"), ["nope.jsonl", "does not exist"]),
        (lambda d: write(d / "empty.jsonl", ""), ["empty.jsonl", "no problems"]),
        (
            lambda d: write(d / "noans.jsonl", '{"problem": "P"}\n'),
            ["noans.jsonl row 0", "no answer field", "--field-map answer="],
        ),
        (
            lambda d: write(d / "noprob.jsonl", '{"answer": "1"}\n{"text": "x"}\n'),
            [
                "noprob.jsonl row 0",
                "no problem field",
                "problem, question, prompt",
                "--field-map problem=",
            ],
        ),
        (
            lambda d: write(d / "nobox.jsonl", '{"problem": "P", "solution": "it is 4"}\n'),
            ["nobox.jsonl row 0", "'solution' has no \\boxed{}"],
        ),
        (
            lambda d: write(d / "bad.jsonl", '{"problem": "P", "answer": "1"}\n{oops\n'),
            ["bad.jsonl row 1", "malformed JSON"],
        ),
        (lambda d: write(d / "table.csv", "a,b\n"), ["table.csv", "unknown format", ".jsonl"]),
    ],
)
def test_bad_benchmarks_give_one_clear_message(
    tmp_path: Path, make_bench, expected: list[str]
) -> None:
    with pytest.raises(EssenceError) as err:
        load_benchmark(make_bench(tmp_path))
    for fragment in expected:
        assert fragment in str(err.value)


def test_field_map_errors_name_the_flag(tmp_path: Path) -> None:
    with pytest.raises(EssenceError, match="unknown keys \\['question'\\]"):
        load_benchmark(str(MATH500), field_map={"question": "q"})
    with pytest.raises(EssenceError, match="'q' \\(mapped to problem\\) is missing"):
        load_benchmark(str(MATH500), field_map={"problem": "q"})
    with pytest.raises(EssenceError, match="--field-map 'problem'"):
        command.parse_field_map("problem")


def test_bad_model_and_settings_give_one_clear_message(model_dir: Path, tmp_path: Path) -> None:
    bench = [str(AIME)]
    with pytest.raises(EssenceError, match="model path .*missing-model does not exist"):
        evaluate(str(tmp_path / "missing-model"), bench, out_dir=tmp_path)
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(EssenceError, match="has no config.json"):
        evaluate(str(tmp_path / "empty-dir"), bench, out_dir=tmp_path)
    with pytest.raises(EssenceError, match="n must be at least 1"):
        evaluate(str(model_dir), bench, out_dir=tmp_path, n=0)
    with pytest.raises(EssenceError, match="top_p"):
        evaluate(str(model_dir), bench, out_dir=tmp_path, top_p=0)
    with pytest.raises(EssenceError, match="listed twice"):
        evaluate(str(model_dir), bench * 2, out_dir=tmp_path)
    with pytest.raises(EssenceError, match="chat_template 'nope.jinja'"):
        evaluate(
            str(model_dir), bench, out_dir=tmp_path, chat_template="nope.jinja", progress=False
        )
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_backend_without_vllm_says_how_to_install(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(EssenceError, match=r"pip install 'essence\[vllm\]'"):
        evaluate(str(model_dir), [str(AIME)], out_dir=tmp_path, backend="vllm", progress=False)
