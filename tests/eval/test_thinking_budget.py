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
from essence.eval.budget import CLOSE_TEXT, THINK_CLOSE, ThinkingBudget, find
from essence.eval.generate import SamplingSettings
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
    model = tiny_model()  # random: some responses stop early, most run on
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
