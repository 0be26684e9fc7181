"""Sampled training text: the share of a step spent generating, at 256 and 1,024 new tokens.

Whole `essence train` runs on one trace (the real Bespoke-Stratos row, Qwen3 tokenizer, cut to
--seq-len tokens and trained at LSP 0.5), random-init models of the bench presets (weights are
random, so generation rarely stops early: every sampled sequence runs to max_new_tokens, the
worst case). Per --new-tokens value, side by side in one process:

  plain               sampling off (the LSP 0.5 step)
  lead_then_student   every step samples the student's continuation from the cut
  on_policy           every step samples a response from the prompt

and for each: seconds per step (from the second step on), the share of the step's wall time spent in generate, generation
FLOPs as a share of all FLOPs, and the sampled step's time over the plain one's.

    python bench/sampling_share.py --threads 1                       # CPU, tiny presets
    python bench/sampling_share.py --device cuda --student qwen3-1.7b --teacher qwen3-4b \
        --new-tokens 256                                              # GPU (bench/gpu_check.sh)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PRESETS, QWEN3_TOKENIZER, REAL_ROW, dims  # noqa: E402

METHODS = ("plain", "lead_then_student", "on_policy")


def run(args, method: str, new_tokens: int, out: Path) -> dict:
    from essence.config.load import load_config
    from essence.train.run import train

    overrides = [
        f"model.tokenizer={QWEN3_TOKENIZER}", f"model.student_init={json.dumps(dims(args.student))}",
        f"model.teacher_init={json.dumps(dims(args.teacher))}", f"data.source={REAL_ROW}",
        "data.max_length=100000", f"data.truncation.max_tokens={args.seq_len}",
        "data.truncation.lsp=0.5", "loss.chunk_size=1024", "train.batch_size=1",
        f"train.max_steps={args.steps}", f"train.epochs={args.steps}", "train.warmup_ratio=0",
        "train.save_checkpoints=false", "train.progress=false", "train.lr=1e-5",
        f"model.gradient_checkpointing={str(args.device == 'cuda').lower()}",
        *([f"train.cpu_threads={args.threads}"] if args.threads else []),
    ]
    if method != "plain":
        overrides += [f"sampling.method={method}", "sampling.fraction=1",
                      f"sampling.max_new_tokens={new_tokens}"]
    run_dir = out / f"{method}-{new_tokens}"
    summary = train(load_config(None, overrides), run_dir)
    steps = summary["steps"]
    # Timings from step 2 on: the first step also pays one-off allocations and kernel choices.
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    wall = lines[-1]["elapsed_s"] - lines[0]["elapsed_s"]
    generating = sum(m.get("generation_s") or 0.0 for m in lines[1:])
    return {"method": method, "new_tokens": new_tokens, "steps": steps,
            "step_s": wall / (len(lines) - 1),
            "generated_per_step": summary["generated_tokens"] / steps,
            "generation_time_share": generating / wall,
            "generation_flops_share": summary["generation_flops"] / summary["total_flops"],
            "scoring_flops_share": summary["teacher_scoring_flops"] / summary["total_flops"],
            "total_flops_per_step": summary["total_flops"] / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student", default="tiny-student", help=f"preset ({', '.join(PRESETS)}) or JSON")
    parser.add_argument("--teacher", default="tiny-teacher", help="preset or JSON")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seq-len", type=int, default=1024, help="trace tokens before the LSP 0.5 cut")
    parser.add_argument("--new-tokens", default="256,1024", help="sampling.max_new_tokens values")
    parser.add_argument("--steps", type=int, default=3,
                        help="optimizer steps per run (all sampled; timed from the second on)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    if args.device == "cpu":
        import os

        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    rows = []
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is not timed)")
    with tempfile.TemporaryDirectory() as tmp:
        run(args, "plain", 1, Path(tmp) / "warmup")  # imports and first-call costs, not measured
        for new_tokens in (int(n) for n in args.new_tokens.split(",")):
            plain = run(args, "plain", new_tokens, Path(tmp))
            rows.append(plain)
            for method in METHODS[1:]:
                row = run(args, method, new_tokens, Path(tmp))
                row["step_vs_plain"] = row["step_s"] / plain["step_s"]
                rows.append(row)
    print(f"\n{args.student} student, {args.teacher} teacher, {args.device}, trace {args.seq_len} "
          f"tokens at LSP 0.5, {args.steps} steps per run (every step sampled)")
    print(f"{'method':<18} {'new':>5} {'gen/step':>8} {'s/step':>8} {'x plain':>8} "
          f"{'gen time':>9} {'gen FLOPs':>9} {'scoring':>8}")
    for r in rows:
        print(f"{r['method']:<18} {r['new_tokens']:>5} {r['generated_per_step']:>8.0f} "
              f"{r['step_s']:>8.2f} {r.get('step_vs_plain', 1.0):>8.2f} "
              f"{r['generation_time_share']:>9.1%} {r['generation_flops_share']:>9.1%} "
              f"{r['scoring_flops_share']:>8.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
