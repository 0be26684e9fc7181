"""The thinking budget: a response still thinking after N tokens is closed at exactly N and
answers in at most answer_max_tokens; one that closed earlier is untouched; the unbudgeted
result beside it is the plain evaluation; bad budgets are one line."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from essence.cli import main
from essence.config.load import load_config
from essence.errors import EssenceError
from essence.eval import run as run_module
from essence.eval.benchmarks import load_benchmark
from essence.eval.budget import (
    CLOSE_TEXT,
    THINK_CLOSE,
    ThinkingBudget,
    find,
    is_forced,
    summarize_budget,
    thinking_tokens,
)
from essence.eval.generate import Sample, SamplingSettings
from essence.eval.run import evaluate

GSM8K = Path(__file__).resolve().parents[1] / "fixtures" / "benchmarks" / "gsm8k_schema.jsonl"
N, ANSWER = 12, 5


def tiny_model(favourite: int | None = None) -> Qwen3ForCausalLM:
    """A 2-layer random Qwen3; with `favourite`, a head that always picks that token."""
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=151936, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=8, max_position_embeddings=512, tie_word_embeddings=False)
    model = Qwen3ForCausalLM(config).eval()
    if favourite is not None:
        head = torch.nn.Linear(16, config.vocab_size, bias=True)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        head.bias.data[favourite] = 10.0
        model.lm_head = head
    return model


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def run(model, tokenizer, out, **budget):
    summary = evaluate((model, tokenizer), [str(GSM8K)], out_dir=out, temperature=0,
                       max_new_tokens=40, progress=False, **budget)
    details = [json.loads(line) for line in (out / "details.jsonl").read_text().splitlines()]
    return summary["benchmarks"][str(GSM8K)], details


def test_a_model_that_never_closes_is_closed_at_exactly_n(qwen3_tokenizer, tmp_path):
    word = ids(qwen3_tokenizer, " so")[0]
    scores, details = run(tiny_model(word), qwen3_tokenizer, tmp_path / "b",
                          thinking_budget=N, answer_max_tokens=ANSWER)
    close, close_full = ids(qwen3_tokenizer, THINK_CLOSE), ids(qwen3_tokenizer, CLOSE_TEXT)
    for line in details:
        (text,), (plain,) = line["responses"], line["unbudgeted_responses"]
        got = ids(qwen3_tokenizer, text)
        assert find(close, got) == N and got[:N] == [word] * N
        assert got[N:N + len(close_full)] == close_full
        assert len(got) - N - len(close_full) == ANSWER  # the answer ran to its cap
        assert line["forced"] == [True] and line["thinking_tokens"] == [N]
        assert THINK_CLOSE not in plain and line["unbudgeted_thinking_tokens"] == [40]
    budget = scores["budget"]
    assert budget["forced"] == len(details) and budget["forced_frac"] == 1.0
    assert budget["thinking_tokens_mean"] == N and budget["thinking_tokens_mean_unbudgeted"] == 40
    assert scores["think_closed_frac"] == 1.0


def test_a_model_that_closes_at_once_is_untouched(qwen3_tokenizer, tmp_path):
    close = ids(qwen3_tokenizer, THINK_CLOSE)
    assert len(close) == 1  # Qwen3's </think> is one token
    scores, details = run(tiny_model(close[0]), qwen3_tokenizer, tmp_path / "b",
                          thinking_budget=N, answer_max_tokens=ANSWER)
    for line in details:
        assert line["responses"] == line["unbudgeted_responses"]
        assert line["forced"] == [False] and line["thinking_tokens"] == [0]
    assert scores["budget"]["forced"] == 0


def test_the_unbudgeted_result_is_the_plain_evaluation_and_the_summary_adds_up(
        qwen3_tokenizer, tmp_path):
    model = tiny_model()  # random: every response thinks on past N (mixed: the test below)
    plain, plain_details = run(model, qwen3_tokenizer, tmp_path / "plain")
    scores, details = run(model, qwen3_tokenizer, tmp_path / "b", thinking_budget=N,
                          answer_max_tokens=ANSWER)
    assert "budget" not in plain and "unbudgeted_responses" not in plain_details[0]
    assert [d["unbudgeted_responses"] for d in details] == [d["responses"] for d in plain_details]
    assert [d["unbudgeted_correct"] for d in details] == [d["correct"] for d in plain_details]
    budget = scores["budget"]
    assert budget["pass@1_unbudgeted"] == plain["pass@1"]
    assert budget["pass@1"] == scores["pass@1"]
    forced = [f for d in details for f in d["forced"]]
    assert budget["forced"] == sum(forced) and budget["forced_frac"] == sum(forced) / len(forced)
    for d in details:  # forced exactly where the plain response thought on past N tokens
        plain_ids = ids(qwen3_tokenizer, d["unbudgeted_responses"][0])
        at = find(ids(qwen3_tokenizer, THINK_CLOSE), plain_ids)
        assert d["forced"][0] == (len(plain_ids) > N and (at is None or at > N))
        if not d["forced"][0]:
            assert d["responses"] == d["unbudgeted_responses"]
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["settings"]["thinking_budget"] == N
    assert "thinking_budget" not in json.loads((tmp_path / "plain" / "summary.json").read_text())[
        "settings"]


def test_the_vllm_backend_applies_the_same_two_phases(qwen3_tokenizer, monkeypatch):
    """vLLM is GPU-only; a stand-in engine that always emits one token shows the same cut."""
    word = ids(qwen3_tokenizer, " so")[0]
    calls = []

    class Params:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    class Engine:
        def generate(self, inputs, params, use_tqdm):
            calls.append([p.max_tokens for p in params])
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(
                token_ids=[word] * p.max_tokens)]) for p in params]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=Params))
    problems = load_benchmark(str(GSM8K), limit=2)
    settings = SamplingSettings(n=1, max_new_tokens=40, temperature=0)
    lines = run_module._run_benchmark("b", problems, [p.problem for p in problems], Engine(),
                                      qwen3_tokenizer, settings, "vllm", 8, False,
                                      ThinkingBudget(N, ANSWER))
    assert calls == [[40, 40], [ANSWER, ANSWER]]  # phase 1, then the forced answers
    for line in lines:
        got = ids(qwen3_tokenizer, line["responses"][0])
        assert line["forced"] == [True] and find(ids(qwen3_tokenizer, THINK_CLOSE), got) == N


class ScriptedEngine:
    """A stand-in vLLM engine: a prompt gets the response of the first script key its text ends
    with (a phase-2 prompt ends with CLOSE_TEXT) or, failing that, contains."""

    def __init__(self, tokenizer, script: dict[str, str]):
        self.tokenizer, self.script, self.calls = tokenizer, script, []

    def respond(self, prompt_ids: list[int]) -> list[int]:
        text = self.tokenizer.decode(prompt_ids, skip_special_tokens=False)
        key = next((k for k in self.script if text.endswith(k)), None)
        key = key or next(k for k in self.script if k in text)
        return ids(self.tokenizer, self.script[key] + "<|im_end|>")

    def generate(self, inputs, params, use_tqdm):
        self.calls.append(len(inputs))
        return [types.SimpleNamespace(outputs=[types.SimpleNamespace(
            token_ids=self.respond(x["prompt_token_ids"])[:p.max_tokens])])
            for x, p in zip(inputs, params)]


def test_the_summary_adds_up_when_only_some_responses_are_forced(qwen3_tokenizer, monkeypatch):
    """The apples problem closes early and is right; the pencils one is right only after 30
    thinking tokens, so the budget forces it and its forced answer is wrong: 1 of 2 forced,
    accuracy 1.0 without the budget and 0.5 with it."""
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(
        SamplingParams=lambda **kwargs: types.SimpleNamespace(**kwargs)))
    problems = load_benchmark(str(GSM8K))
    prompts = [f"<|im_start|>user\n{p.problem}<|im_end|>\n<|im_start|>assistant\n"
               for p in problems]
    engine = ScriptedEngine(qwen3_tokenizer, {
        CLOSE_TEXT: "\\boxed{7}",
        "apples": "<think>\nok" + CLOSE_TEXT + "\\boxed{3600}",
        "pencils": "<think>" + " so" * 29 + CLOSE_TEXT + "\\boxed{26}",
    })
    settings = SamplingSettings(n=1, max_new_tokens=40, temperature=0)
    lines = run_module._run_benchmark("b", problems, prompts, engine, qwen3_tokenizer, settings,
                                      "vllm", 8, False, ThinkingBudget(N, ANSWER))
    assert engine.calls == [2, 1]  # phase 1 for both problems, phase 2 for the forced one only
    pencils, apples = lines  # the fixture's order
    assert apples["forced"] == [False] and apples["responses"] == apples["unbudgeted_responses"]
    assert pencils["forced"] == [True] and pencils["correct"] == [False]
    assert pencils["unbudgeted_correct"] == [True]
    assert pencils["responses"] == ["<think>" + " so" * (N - 1) + CLOSE_TEXT + "\\boxed{7}"]
    short_thinking = len(ids(qwen3_tokenizer, "<think>\nok"))
    assert pencils["unbudgeted_thinking_tokens"] == [30]
    assert apples["thinking_tokens"] == apples["unbudgeted_thinking_tokens"] == [short_thinking]
    budget = summarize_budget(lines, ThinkingBudget(N, ANSWER))
    assert budget["forced"] == 1 and budget["forced_frac"] == 0.5
    assert budget["pass@1"] == 0.5 and budget["pass@1_unbudgeted"] == 1.0
    assert budget["thinking_tokens_mean"] == (N + short_thinking) / 2
    assert budget["thinking_tokens_mean_unbudgeted"] == (30 + short_thinking) / 2


def test_nothing_forced_means_no_second_phase(qwen3_tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(
        SamplingParams=lambda **kwargs: types.SimpleNamespace(**kwargs)))
    problems = load_benchmark(str(GSM8K))
    engine = ScriptedEngine(qwen3_tokenizer, {"": "<think>\nok" + CLOSE_TEXT + "\\boxed{1}"})
    lines = run_module._run_benchmark("b", problems, [p.problem for p in problems], engine,
                                      qwen3_tokenizer, SamplingSettings(n=1, temperature=0), "vllm",
                                      8, False, ThinkingBudget(N, ANSWER))
    assert engine.calls == [2] and [line["forced"] for line in lines] == [[False], [False]]


@pytest.mark.parametrize("think, close, forced", [
    (N, True, False),  # closed after exactly N thinking tokens: within the budget
    (N + 1, True, True),  # closed one token too late
    (N, False, False),  # ended (a stop token) after N tokens without closing
    (N + 1, False, True),  # still going past N
])
def test_the_budget_boundary(think, close, forced):
    word, close_id = 11, 151668
    sample = Sample("", think + 1, False, tuple([word] * think + [close_id] * close))
    assert is_forced(sample, [close_id], N) is forced
    assert thinking_tokens(sample, [close_id]) == think


def test_a_budget_below_one_is_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(EssenceError, match=r"eval\.thinking_budget"):
        load_config(None, ["eval.thinking_budget=0"])
    with pytest.raises(EssenceError, match=r"eval\.answer_max_tokens"):
        load_config(None, ["eval.answer_max_tokens=0"])
    code = main(["eval", "--model", "essence:demo/student", "--bench", str(GSM8K),
                 "--thinking-budget", "0", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "--thinking-budget (eval.thinking_budget) must be an integer ≥ 1, got 0" in err
    assert not (tmp_path / "o").exists()


def test_a_bad_answer_cap_is_refused_even_without_a_budget(tmp_path, capsys):
    code = main(["eval", "--model", "essence:demo/student", "--bench", str(GSM8K),
                 "--answer-max-tokens", "0", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "--answer-max-tokens (eval.answer_max_tokens) must be an integer ≥ 1, got 0" in err
