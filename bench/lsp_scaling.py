"""Step time, peak memory and FLOPs of essence's distillation step at LSP 1.0, 0.75, 0.5, 0.25.

    python bench/lsp_scaling.py                                   # SmolLM2 teacher + 11-layer student, CPU
    python bench/lsp_scaling.py --lengths natural,cot2 --repeats 3
    python bench/lsp_scaling.py --models random --device cuda --dtype bfloat16 --lengths 4096
    python bench/lsp_scaling.py --models random --student tiny-student --teacher tiny-teacher --lengths 512

Sequences (--lengths, one micro-batch each, all in one optimizer step): `natural` is the real
Bespoke-Stratos row rendered with the student's tokenizer (2,316 SmolLM2 tokens), `cot2` the
same row with its chain-of-thought written twice, an integer N that trace cut after exactly N
tokens (CoT repeated as needed). Each is truncated to its lead span with essence.data.truncation
(LSP x keeps the first max(1, floor(n·x)) tokens), and trained on with essence's step
(DistillStep, the fused chunked loss, (1-λ)·NLL + λ·forward KL at λ = 0.5, AdamW).

All LSPs run in one process, after one untimed warm-up step at LSP 1.0 (it allocates AdamW's
state), in --repeats rounds whose order rotates; medians are reported. FLOPs are the model
FLOPs of essence.train.accounting (student training 3 × forward, teacher forward; 2·P·T + 4·L·d·T² per
sequence). Memory: "step" is one step's peak above what the process held just before it
(activations, logits, gradients — what truncation can shrink), "peak" the same peak above what
it held once models and data were loaded (adds AdamW's state, which does not shrink), "total"
the whole process (weights of both models included). CPU: RSS; GPU: the CUDA allocator.
Targets at LSP 0.5 vs 1.0: ≤ 0.55× time and FLOPs, ≤ 0.6× peak memory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    EssenceStep,
    Meter,
    add_common_args,
    environment,
    example,
    gib,
    load_models,
    median,
    trace,
)

LSPS = (1.0, 0.75, 0.5, 0.25)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--lengths", default="natural",
                        help="comma-separated sequences: natural, cot2, or a token count (default natural)")
    parser.add_argument("--lsps", default=",".join(str(x) for x in LSPS), help="comma-separated LSPs")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.set_defaults(repeats=2)
    return parser.parse_args(argv)


def traces(tokenizer, spec: str) -> list:
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item == "natural":
            out.append(trace(tokenizer))
        elif item == "cot2":
            out.append(trace(tokenizer, cot_repeats=2))
        elif item.isdigit():
            out.append(trace(tokenizer, int(item)))
        else:
            sys.exit(f"--lengths: {item!r} is not natural, cot2 or a token count")
    return out


def batches_at(items: list, lsp: float, pad_id: int) -> list:
    from essence.data.batching import collate

    return [collate([example(rendered, spans, lsp)], pad_id) for rendered, spans in items]


def measure(args: argparse.Namespace) -> tuple[dict[float, dict], list[int]]:
    from essence.models.flops import flop_model

    student, teacher, tokenizer = load_models(args)
    items = traces(tokenizer, args.lengths)
    lsps = [float(x) for x in args.lsps.split(",")]
    batches = {lsp: batches_at(items, lsp, tokenizer.pad_token_id) for lsp in lsps}
    step = EssenceStep(student, teacher, tokenizer, args)
    student_flops, teacher_flops = flop_model(student), flop_model(teacher)
    meter = Meter(args.device)
    meter.start()
    step(batches_at(items, 1.0, tokenizer.pad_token_id))
    warm = meter.stop()
    print(f"  warm-up step at LSP 1.0: {warm['seconds']:.2f} s", flush=True)
    samples: dict[float, list[dict]] = {lsp: [] for lsp in lsps}
    for round_ in range(args.repeats):
        for lsp in lsps[round_ % len(lsps):] + lsps[:round_ % len(lsps)]:
            meter.start()
            step(batches[lsp])
            samples[lsp].append(meter.stop())
            print(f"  round {round_ + 1} LSP {lsp}: {samples[lsp][-1]['seconds']:.2f} s", flush=True)
    results = {}
    for lsp in lsps:
        lengths = [b.tokens for b in batches[lsp]]
        s = samples[lsp]
        results[lsp] = {
            "tokens": sum(lengths), "lengths": lengths,
            "flops": student_flops.train(lengths) + teacher_flops.forward(lengths),
            "seconds": median([x["seconds"] for x in s]),
            "step_mem": median([x["step_mem"] for x in s]),
            "peak_mem": median([x["peak_mem"] for x in s]),
            "peak_abs": median([x["peak_abs"] for x in s]),
            "seconds_per_round": [round(x["seconds"], 4) for x in s],
        }
    return results, [len(r.input_ids) for r, _ in items]


def print_table(results: dict[float, dict]) -> dict[float, dict]:
    base = results.get(1.0) or next(iter(results.values()))
    ratio = lambda r, key: r[key] / base[key] if base[key] else float("nan")
    print(f"{'LSP':>5} {'tokens':>7} {'s/step':>8} {'×':>5} {'TFLOPs':>8} {'×':>5} {'step GiB':>9} {'×':>5} "
          f"{'peak GiB':>9} {'×':>5} {'total GiB':>10} {'×':>5}")
    ratios = {}
    for lsp, r in results.items():
        ratios[lsp] = {k: ratio(r, k) for k in ("seconds", "flops", "step_mem", "peak_mem", "peak_abs")}
        q = ratios[lsp]
        print(f"{lsp:>5} {r['tokens']:>7} {r['seconds']:>8.3f} {q['seconds']:>5.2f} {r['flops'] / 1e12:>8.3f} "
              f"{q['flops']:>5.2f} {gib(r['step_mem']):>9} {q['step_mem']:>5.2f} {gib(r['peak_mem']):>9} "
              f"{q['peak_mem']:>5.2f} {gib(r['peak_abs']):>10} {q['peak_abs']:>5.2f}")
    return ratios


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    models = (f"SmolLM2-135M-Instruct teacher, keep-every-{args.keep_every} student" if args.models == "smollm2"
              else f"random student {args.student}, random teacher {args.teacher}")
    print(f"lsp scaling: {models}; sequences {args.lengths}; {args.device} {args.dtype}; "
          f"{args.repeats} rounds", flush=True)
    results, full_lengths = measure(args)
    print(f"\n{environment(args)}; full sequence lengths {full_lengths}")
    ratios = print_table(results)
    half = ratios.get(0.5)
    if half:
        print(f"LSP 0.5 / 1.0: time {half['seconds']:.2f}× (target ≤ 0.55), FLOPs {half['flops']:.2f}× "
              f"(≤ 0.55), step memory {half['step_mem']:.2f}×, peak memory {half['peak_mem']:.2f}× (≤ 0.6), "
              f"total {half['peak_abs']:.2f}×")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"args": vars(args), "environment": environment(args), "full_lengths": full_lengths,
             "results": {str(k): v for k, v in results.items()},
             "ratios": {str(k): v for k, v in ratios.items()}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
