"""The `essence eval` command: flags in, `evaluate` called, files written."""

from __future__ import annotations

import argparse

from essence.data.render import DEFAULT_INSTRUCTION
from essence.errors import EssenceError
from essence.eval.benchmarks import BENCHMARKS


def add_parser(subparsers) -> None:
    """Register `eval` on the CLI's subparsers; its handler is `run`."""
    parser = subparsers.add_parser(
        "eval",
        help="sample answers on math benchmarks and grade them with math-verify",
        description="Sample n responses per problem, grade the final answers with math-verify, and "
        "write OUT/summary.json (pass@k per benchmark) and OUT/details.jsonl (every response).",
    )
    parser.add_argument(
        "--model",
        required=True,
        metavar="PATH_OR_ID",
        help="checkpoint directory, hub id, or essence:demo/student",
    )
    parser.add_argument(
        "--bench",
        required=True,
        action="append",
        metavar="NAME_OR_FILE",
        help=f"benchmark ({', '.join(BENCHMARKS)}) or a local .jsonl/.json/.parquet file; repeat for several",
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="folder for summary.json and details.jsonl"
    )
    _generation_flags(parser)
    _prompt_flags(parser)
    parser.set_defaults(func=run)


def _generation_flags(parser) -> None:
    """How responses are sampled: n, length, temperature, backend, seed, batches, the budget."""
    parser.add_argument("--n", type=int, default=1, help="responses per problem (default 1)")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=4096,
        help="generation budget per response (default 4096)",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.6,
        help="sampling temperature; 0 is greedy (default 0.6)",
    )
    parser.add_argument(
        "--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)"
    )
    parser.add_argument(
        "--backend", choices=("hf", "vllm"), default="hf", help="generation backend (default hf)"
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument(
        "--limit", type=int, default=None, help="only the first N problems of each benchmark"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="sequences per generate call, hf backend (default 8)",
    )
    parser.add_argument(
        "--thinking-budget",
        type=int,
        default=None,
        metavar="N",
        help="after N thinking tokens without </think>, close it and let the model answer; the "
        "summary gives accuracy with and without the budget (default: no budget)",
    )
    parser.add_argument(
        "--answer-max-tokens",
        type=int,
        default=64,
        metavar="N",
        help="with --thinking-budget: new tokens for the answer after a forced </think> (default 64)",
    )


def _prompt_flags(parser) -> None:
    """What the prompts are made of: the benchmark's columns, the template, the instruction."""
    parser.add_argument(
        "--field-map",
        default=None,
        metavar="problem=COL,answer=COL",
        help="column names of local benchmark files, e.g. problem=q,answer=a (keys: problem, answer, id)",
    )
    parser.add_argument(
        "--chat-template",
        default=None,
        metavar="NAME_OR_FILE",
        help="chat template: a built-in name or a Jinja file (default: the tokenizer's own)",
    )
    parser.add_argument(
        "--instruction",
        default=DEFAULT_INSTRUCTION,
        help="text appended to each problem; '' for none (default: reason step by step, answer in \\boxed{})",
    )


def run(args: argparse.Namespace) -> int:
    """Handle `essence eval`: evaluate and write the results; 0 on success."""
    from essence.eval.run import evaluate

    evaluate(
        args.model,
        args.bench,
        out_dir=args.out,
        n=args.n,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        backend=args.backend,
        seed=args.seed,
        limit=args.limit,
        batch_size=args.batch_size,
        instruction=args.instruction,
        chat_template=args.chat_template,
        field_map=parse_field_map(args.field_map),
        thinking_budget=args.thinking_budget,
        answer_max_tokens=args.answer_max_tokens,
        resumable=True,
    )
    print(f"wrote {args.out}/summary.json and {args.out}/details.jsonl")
    return 0


def parse_field_map(text: str | None) -> dict[str, str] | None:
    """`problem=q,answer=a` → {"problem": "q", "answer": "a"}."""
    if not text:
        return None
    mapping: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = (s.strip() for s in part.partition("="))
        if not sep or not key or not value:
            raise EssenceError(
                f"--field-map {text!r}: each entry must be KEY=COLUMN, comma-separated, e.g. problem=q,answer=a"
            )
        mapping[key] = value
    return mapping
