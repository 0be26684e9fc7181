"""Tokens/s and peak memory of one distillation step: essence vs TRL's GKDTrainer vs plain NLL.

    python bench/throughput.py                                  # SmolLM2 teacher, 11-layer student, CPU
    python bench/throughput.py --seq-len 512 --batch-size 2 --steps 3 --repeats 3
    python bench/throughput.py --models random --device cuda --dtype bfloat16 --seq-len 4096
    python bench/throughput.py --models random --student tiny-student --teacher tiny-teacher --seq-len 256

Variants, each a full optimizer step (forward + backward + clip + AdamW) on the same batch:

- essence: DistillStep with the fused chunked loss, (1-λ)·NLL + λ·forward KL at λ = 0.5, the
  step normalised once (loss_weights / combine), under accelerate as essence.train runs it;
- trl_gkd: TRL's GKDTrainer in supervised mode (lmbda=0: never generates on-policy; seq_kd off;
  beta=0: its generalized JSD is then KL(p_T‖p_S), forward KL, checked in trl/experimental/gkd/
  gkd_trainer.py), its own Trainer loop (trainer.train) timed from on_step_begin to on_step_end;
  it materialises both models' full [tokens, vocab] logits. Its loss is KD alone, no NLL term;
  gradient checkpointing (on by default in TRL) is turned off, as it is in essence;
- nll: the student alone with labels (HF cross-entropy over full logits), no teacher: a floor.

Every variant runs in a fresh subprocess (so no allocator state is shared), variants are
interleaved over --repeats rounds, the first --warmup steps of a worker are not timed, and
medians are reported. Memory, each above what the process held once models and data were
loaded: "peak" is the largest over all steps (the first step allocates AdamW's state: with
gradients that is 16 bytes per student parameter, the same for every variant), "step" is a
steady-state step's own peak above the memory held just before it (activations, logits,
gradients). CPU: RSS (VmHWM); GPU: the CUDA allocator. Targets: essence ≥ 1.3× TRL's tokens/s
at ≤ 0.5× its peak memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    EssenceStep, Meter, add_common_args, environment, example, forward_worker_args, gib, load_models,
    median, report, run_worker, trace,
)

VARIANTS = ("essence", "trl_gkd", "nll")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default 1024)")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per step (default 1)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per worker (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps per worker (default 1)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.set_defaults(repeats=2)
    return parser.parse_args(argv)


def make_batch(tokenizer, args: argparse.Namespace):
    """batch_size copies of one realistic trace of seq_len tokens (no padding), as an essence Batch."""
    from essence.data.batching import collate

    rendered, spans = trace(tokenizer, args.seq_len)
    return collate([example(rendered, spans)] * args.batch_size, tokenizer.pad_token_id)


# ---------------------------------------------------------------------------------------------
# Workers: one variant in this process


def essence_worker(args, student, teacher, tokenizer, batch) -> list[dict]:
    step = EssenceStep(student, teacher, tokenizer, args)
    meter = Meter(args.device)
    out = []
    for _ in range(args.warmup + args.steps):
        meter.start()
        loss = step([batch])
        out.append({**meter.stop(), "loss": loss})
    return out


def nll_worker(args, student, teacher, tokenizer, batch) -> list[dict]:
    from essence.config import TrainConfig
    from essence.trainer_setup import build_optimizer, make_accelerator

    config = TrainConfig(mixed_precision="bf16" if args.dtype == "bfloat16" else "no", max_grad_norm=1.0)
    accelerator = make_accelerator(config)
    optimizer, scheduler = build_optimizer(student, config, total_steps=1000)
    model, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)
    batch = batch.to(accelerator.device)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    meter = Meter(args.device)
    out = []
    for _ in range(args.warmup + args.steps):
        meter.start()
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        out.append({**meter.stop(), "loss": float(loss.detach())})
    return out


def trl_worker(args, student, teacher, tokenizer, batch) -> list[dict]:
    """GKDTrainer.train() on the same batch every step, timed by a callback around each step."""
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    total = args.warmup + args.steps
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
              "labels": batch.input_ids.masked_fill(batch.attention_mask == 0, -100)}
    results: list[dict] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.meter.start()

        def on_step_end(self, *a, **k):
            results.append(self.meter.stop())

    timer = Timer()
    config = GKDConfig(
        output_dir=tempfile.mkdtemp(prefix="essence-bench-trl-"), report_to="none",
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1, max_steps=total,
        lmbda=0.0, beta=0.0, seq_kd=False, gradient_checkpointing=False,
        bf16=args.dtype == "bfloat16", fp16=False, use_cpu=args.device == "cpu",
        learning_rate=1e-5, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0, warmup_steps=0,
        logging_steps=10**6, save_strategy="no", eval_strategy="no", dataloader_num_workers=0,
        max_length=None, seed=0, disable_tqdm=True,
    )
    trainer = GKDTrainer(
        model=student, teacher_model=teacher, args=config, processing_class=tokenizer,
        train_dataset=Dataset.from_dict({"row": list(range(total * args.batch_size))}),
        data_collator=lambda rows: dict(inputs), callbacks=[timer],
    )
    timer.meter = Meter(args.device)
    trainer.train()
    assert len(results) == total, f"timed {len(results)} of {total} TRL steps"
    return results


def worker(args: argparse.Namespace) -> dict:
    import torch

    student, teacher, tokenizer = load_models(args)
    batch = make_batch(tokenizer, args)
    run = {"essence": essence_worker, "trl_gkd": trl_worker, "nll": nll_worker}[args.worker]
    try:
        steps = run(args, student, teacher, tokenizer, batch)
    except torch.OutOfMemoryError as err:
        return {"variant": args.worker, "error": f"out of memory: {str(err).splitlines()[0][:200]}"}
    timed = steps[args.warmup:]
    return {
        "variant": args.worker, "tokens": batch.tokens, "threads": torch.get_num_threads(),
        "seconds": median([s["seconds"] for s in timed]),
        "step_mem": median([s["step_mem"] for s in timed]),
        "peak_mem": max(s["peak_mem"] for s in steps),
        "peak_abs": max(s["peak_abs"] for s in steps),
        "all_seconds": [s["seconds"] for s in steps],
    }


# ---------------------------------------------------------------------------------------------
# The driver


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Medians over the repeats of each variant (a worker's seconds are already its median)."""
    out = {}
    for variant, results in runs.items():
        ok = [r for r in results if "error" not in r]
        if not ok:
            out[variant] = {"error": results[0]["error"]}
            continue
        seconds = median([r["seconds"] for r in ok])
        out[variant] = {
            "tokens": ok[0]["tokens"], "seconds": seconds, "tokens_per_s": ok[0]["tokens"] / seconds,
            "peak_mem": median([r["peak_mem"] for r in ok]), "step_mem": median([r["step_mem"] for r in ok]),
            "peak_abs": median([r["peak_abs"] for r in ok]),
            "seconds_per_repeat": [round(r["seconds"], 4) for r in ok],
        }
    return out


def print_table(summary: dict[str, dict]) -> None:
    print(f"{'variant':>8} {'tokens':>7} {'s/step':>8} {'tokens/s':>9} {'peak GiB':>9} {'step GiB':>9} "
          f"{'RSS/alloc GiB':>14}  s/step per repeat")
    for variant, r in summary.items():
        if "error" in r:
            print(f"{variant:>8}  failed: {r['error']}")
            continue
        print(f"{variant:>8} {r['tokens']:>7} {r['seconds']:>8.3f} {r['tokens_per_s']:>9.1f} "
              f"{gib(r['peak_mem']):>9} {gib(r['step_mem']):>9} {gib(r['peak_abs']):>14}  "
              f"{r['seconds_per_repeat']}")


def ratios(summary: dict[str, dict]) -> dict[str, float]:
    e, t = summary.get("essence", {}), summary.get("trl_gkd", {})
    if "tokens_per_s" not in e or "tokens_per_s" not in t:
        return {}
    return {"speed": e["tokens_per_s"] / t["tokens_per_s"], "peak_mem": e["peak_mem"] / t["peak_mem"],
            "step_mem": e["step_mem"] / t["step_mem"]}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        report(worker(args))
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    shared = forward_worker_args(args) + [
        "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
        "--steps", str(args.steps), "--warmup", str(args.warmup)]
    models = (f"SmolLM2-135M-Instruct teacher, keep-every-{args.keep_every} student" if args.models == "smollm2"
              else f"random student {args.student}, random teacher {args.teacher}")
    print(f"throughput: {models}; batch {args.batch_size} × {args.seq_len} tokens of the real "
          f"Bespoke-Stratos trace; {args.device} {args.dtype}; {args.repeats} rounds × "
          f"({args.warmup} warm-up + {args.steps} timed steps)", flush=True)
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for round_ in range(args.repeats):
        for variant in variants[round_ % len(variants):] + variants[:round_ % len(variants)]:
            result = run_worker(__file__, ["--worker", variant, *shared])
            runs[variant].append(result)
            said = result.get("error") or f"{result['seconds']:.3f} s/step, {gib(result['peak_mem'])} GiB peak"
            print(f"  round {round_ + 1} {variant}: {said}", flush=True)
    summary = summarize(runs)
    print(f"\n{environment(args)}")
    print_table(summary)
    r = ratios(summary)
    if r:
        print(f"essence / TRL GKD: tokens/s {r['speed']:.2f}× (target ≥ 1.3), peak memory "
              f"{r['peak_mem']:.2f}× (target ≤ 0.5), step memory {r['step_mem']:.2f}×")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "environment": environment(args),
                                               "results": summary, "ratios": r}, indent=2) + "\n")


if __name__ == "__main__":
    main()
