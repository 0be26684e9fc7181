"""Evaluate a model on benchmarks: prompts → n samples each → grades → summary.json + details.jsonl."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

from essence.data.render import DEFAULT_INSTRUCTION
from essence.errors import EssenceError
from essence.eval.benchmarks import Problem, load_benchmark
from essence.eval.budget import ThinkingBudget, budgeted_lines, summarize_budget
from essence.eval.generate import (
    Backend,
    SamplingSettings,
    generate_hf,
    generate_vllm,
    load_vllm,
    require_vllm,
)
from essence.eval.grading import grade_detail
from essence.eval.progress import PARTIAL, Progress
from essence.eval.prompting import build_prompt
from essence.eval.results import details_line, print_table, summarize, write_results
from essence.io import check_out_dir
from essence.models.loading import load_causal_lm, load_tokenizer
from essence.paths import resolve
from essence.stopping import Stopped, StopRequest


def evaluate(
    model: Any,
    benches: list[str],
    *,
    out_dir: str | Path,
    n: int = 1,
    max_new_tokens: int = 4096,
    temperature: float = 0.6,
    top_p: float = 0.95,
    backend: Backend = "hf",
    seed: int = 0,
    limit: int | None = None,
    batch_size: int = 8,
    instruction: str | None = DEFAULT_INSTRUCTION,
    system: str | None = None,
    chat_template: str | None = None,
    field_map: dict[str, str] | None = None,
    tokenizer: Any = None,
    progress: bool = True,
    thinking_budget: int | None = None,
    answer_max_tokens: int = 64,
    resumable: bool = False,
) -> dict[str, Any]:
    """Sample `n` responses per problem of each benchmark, grade them, write and return the summary.

    model: a checkpoint directory or hub id, or an already-loaded model (or (model, tokenizer)).
    benches: benchmark names (math500, aime24, aime25, gsm8k) or local .jsonl/.json/.parquet files.
    out_dir: gets summary.json (scores per benchmark) and details.jsonl (one line per problem),
        rewritten after each benchmark so a long run keeps what it finished.
    batch_size: sequences per `generate` call (hf backend; vLLM schedules its own batches).
    progress: show the progress bar and, at the end, the results table.
    thinking_budget: close `</think>` after this many thinking tokens and let the model answer in
        at most answer_max_tokens (essence.eval.budget); the summary then has a "budget" block
        per benchmark with the accuracy and thinking tokens with and without it.
    resumable: Ctrl-C or SIGTERM stops after the current batch, keeping what finished in
        out_dir (essence.eval.progress), and the same call resumes it (`essence eval`).
    Returns the summary.json content: {"model", "settings", "benchmarks": {bench: scores}}.
    """
    settings = SamplingSettings(
        n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed
    )
    _check_request(settings, backend, benches, batch_size)
    budget = None if thinking_budget is None else ThinkingBudget(thinking_budget, answer_max_tokens)
    if budget is not None:
        budget.check()
    elif not isinstance(answer_max_tokens, int) or answer_max_tokens < 1:  # a typo, even unused
        ThinkingBudget(1, answer_max_tokens).check()
    check_out_dir(out_dir)  # a read-only or mistyped --out fails now, not after generating
    # Files, tokenizer and prompts are all checked before the weights load, so a mistake
    # fails in seconds rather than after minutes of loading.
    problems = {bench: load_benchmark(bench, field_map=field_map, limit=limit) for bench in benches}
    model, tokenizer, model_name = _resolve(model, tokenizer, backend)
    prompts = {bench: [build_prompt(tokenizer, p.problem, instruction=instruction, system=system,
                                    chat_template=chat_template) for p in bench_problems]
               for bench, bench_problems in problems.items()}
    if backend == "hf" and isinstance(model, str):
        model = _load_weights(model)
    elif backend == "vllm":
        model = load_vllm(model, tokenizer_path=_path_or_none(tokenizer), seed=seed)

    run_settings = {
        **asdict(settings), "backend": backend, "limit": limit, "batch_size": batch_size,
        "instruction": instruction, "system": system, "chat_template": chat_template,
        **({} if budget is None else {"thinking_budget": budget.thinking,
                                      "answer_max_tokens": budget.answer_max_tokens}),
    }
    summary: dict[str, Any] = {"model": model_name, "settings": run_settings, "benchmarks": {}}
    keep = Progress(Path(out_dir), {"model": model_name, "settings": run_settings,
                                    "benches": list(benches)}) if resumable else None
    run = partial(_run_benchmark, model=model, tokenizer=tokenizer, settings=settings,
                  backend=backend, batch_size=batch_size, progress=progress, budget=budget)
    _run_all(problems, prompts, run, summary, Path(out_dir), keep, budget)
    if progress:
        print_table(list(summary["benchmarks"].values()))
    return summary


def _run_all(problems: dict, prompts: dict, run, summary: dict, out_dir: Path,
             keep: Progress | None, budget: ThinkingBudget | None) -> None:
    """Every benchmark in turn (a finished one of a stopped evaluation reused), the results
    rewritten after each; `keep` (a resumable evaluation) stops on Ctrl-C after a batch."""
    lines: list[dict] = []
    with StopRequest("after this batch") if keep is not None else nullcontext() as stop:
        for bench, bench_problems in problems.items():
            reused = keep.finished(bench) if keep is not None else None
            if reused is None:
                started = time.perf_counter()
                bench_lines = run(bench, bench_problems, prompts[bench],
                                  hooks=_hooks(keep, bench, stop))
                scores = summarize(bench_lines, benchmark=bench, model=summary["model"],
                                   seconds=time.perf_counter() - started)
                if budget is not None:
                    scores["budget"] = summarize_budget(bench_lines, budget)
            else:
                scores, bench_lines = reused
            summary["benchmarks"][bench] = scores
            lines += bench_lines
            write_results(out_dir, summary, lines)
    if keep is not None:
        keep.close()


def _hooks(keep: Progress | None, bench: str, stop: StopRequest | None) -> dict:
    """generate_hf's resume and stop hooks for one benchmark of a resumable evaluation."""
    if keep is None:
        return {}

    def before_batch() -> None:
        if stop is not None and stop.requested:
            raise Stopped(f"stopped: {keep.kept} responses are kept in {keep.out / PARTIAL}",
                          stop.exit_code, resume="the same essence eval command")

    return {"done": keep.samples(bench), "before_batch": before_batch,
            "on_batch": lambda jobs, samples: keep.record(bench, jobs, samples)}


def _run_benchmark(
    bench: str,
    problems: list[Problem],
    prompts: list[str],
    model: Any,
    tokenizer: Any,
    settings: SamplingSettings,
    backend: Backend,
    batch_size: int,
    progress: bool,
    budget: ThinkingBudget | None = None,
    hooks: dict | None = None,
) -> list[dict]:
    """Generate and grade one benchmark; its details lines. hooks: generate_hf's resume and stop
    hooks for the plain generation (a stopped vLLM evaluation keeps its finished benchmarks)."""
    hooks = hooks or {}

    def generate(batch: list, sampling: SamplingSettings, **first) -> list:
        if backend == "vllm":  # one call per benchmark: the stop is checked before it
            if "before_batch" in hooks:
                hooks["before_batch"]()
            return generate_vllm(model, tokenizer, batch, sampling, progress=progress)
        extra = {k: v for k, v in (("before_batch", hooks.get("before_batch")), *first.items())
                 if v is not None}  # none when not resumable: the plain call
        return generate_hf(model, tokenizer, batch, sampling, batch_size=batch_size,
                           progress=progress, **extra)

    samples = generate(prompts, settings, done=hooks.get("done"), on_batch=hooks.get("on_batch"))
    if budget is not None:
        return budgeted_lines(bench, problems, prompts, samples, generate, tokenizer, settings,
                              budget)
    return [
        details_line(
            bench, problem, prompt, row, [grade_detail(s.text, problem.answer) for s in row]
        )
        for problem, prompt, row in zip(problems, prompts, samples)
    ]


def _check_request(
    settings: SamplingSettings, backend: str, benches: list[str], batch_size: int
) -> None:
    settings.check()
    if backend not in ("hf", "vllm"):
        raise EssenceError(f"backend must be 'hf' or 'vllm', got {backend!r}")
    if backend == "vllm":
        require_vllm()
    if not benches:
        raise EssenceError("no benchmark given; pass at least one --bench NAME_OR_FILE")
    if len(set(benches)) != len(benches):
        raise EssenceError(f"a benchmark is listed twice in {benches}; list each once")
    if batch_size < 1:
        raise EssenceError(f"batch_size must be at least 1, got {batch_size}")


def _resolve(model: Any, tokenizer: Any, backend: Backend) -> tuple[Any, Any, str]:
    """(a loaded model, or the checked path / hub id to load; the tokenizer; the name for the summary)."""
    if isinstance(model, tuple):
        model, tokenizer = model
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(str(tokenizer))
    if not isinstance(model, (str, Path)):
        if backend == "vllm":
            raise EssenceError(
                "backend 'vllm' loads the model itself: pass a checkpoint path or hub id, "
                "not a loaded model"
            )
        if tokenizer is None:
            raise EssenceError(
                "a loaded model needs its tokenizer: pass (model, tokenizer) or tokenizer=..."
            )
        return model, tokenizer, getattr(model, "name_or_path", "") or "in-memory model"
    spec = str(model)
    path = resolve(spec)  # essence:demo/student and the like
    _check_model_path(path)
    return path, tokenizer if tokenizer is not None else load_tokenizer(path), spec


def _load_weights(path: str):
    import torch

    model = load_causal_lm(path, dtype="auto", role="model", flag="--model")
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _check_model_path(name: str) -> None:
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EssenceError(
                f"model directory {name} has no config.json; point --model at a Hugging Face checkpoint "
                "directory (config.json, weights and tokenizer files) or a hub id"
            )
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise EssenceError(
                f"model directory {name} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}); "
                "copy them from the model it was trained from (tokenizer.save_pretrained)"
            )
    elif path.exists():
        raise EssenceError(
            f"model {name} is a file; point --model at a checkpoint directory or a hub id"
        )
    # A hub id is "name" or "org/name"; anything else that does not exist is a mistyped path.
    elif name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name:
        raise EssenceError(
            f"model path {name} does not exist; check the path (or pass a hub id such as Qwen/Qwen3-8B)"
        )


def _path_or_none(tokenizer: Any) -> str | None:
    path = getattr(tokenizer, "name_or_path", None)
    return path if path and Path(path).exists() else None


def evaluate_with(settings, model: Any, benches: list[str], out_dir: str | Path, *, seed: int,
                  chat_template: str | None = None) -> dict[str, Any]:
    """`evaluate` with the sampling settings of a config's `eval:` block (an EvalConfig)."""
    return evaluate(
        model, benches, out_dir=out_dir, n=settings.n, max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature, top_p=settings.top_p, limit=settings.limit,
        batch_size=settings.batch_size, backend=settings.backend, seed=seed,
        chat_template=chat_template, instruction=settings.instruction or None,
        thinking_budget=settings.thinking_budget, answer_max_tokens=settings.answer_max_tokens,
    )
