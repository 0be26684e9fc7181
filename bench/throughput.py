"""Tokens/s and peak memory of one distillation step: essence vs TRL's GKDTrainer vs plain NLL.

    python bench/throughput.py                                  # SmolLM2 teacher, 11-layer student, CPU
    python bench/throughput.py --seq-len 512 --batch-size 2 --steps 3 --repeats 3
    python bench/throughput.py --models random --device cuda --dtype bfloat16 --seq-len 4096
    python bench/throughput.py --models random --student tiny-student --teacher tiny-teacher --seq-len 256

Variants, each a full optimizer step (forward + backward + clip + AdamW) on the same batch:

- essence: DistillStep with the fused chunked loss, (1-λ)·NLL + λ·forward KL at λ = 0.5, the
  step normalised once (loss_weights / combine), under accelerate as essence.train.loop runs it;
- trl_gkd: TRL's GKDTrainer in supervised mode (lmbda=0: never generates on-policy; seq_kd off;
  beta=0: its generalized JSD is then KL(p_T‖p_S), forward KL, checked in trl/experimental/gkd/
  gkd_trainer.py), its own Trainer loop (trainer.train) timed from on_step_begin to on_step_end;
  it materialises both models' full [tokens, vocab] logits. Its loss is KD alone, no NLL term;
  gradient checkpointing (on by default in TRL) is turned off, as it is in essence;
- nll: the student alone with labels (HF cross-entropy over full logits), no teacher: a floor.

Memory: each variant runs in a fresh subprocess (no allocator state shared), one warm-up step
then measured steps, each figure above what the process held once models, data (and TRL's
trainer) were built: "peak" is the largest over all steps (the first step allocates AdamW's
state: with the gradients that is 16 bytes per student parameter, the same for every variant),
"step" a steady-state step's own peak above the memory held just before it (activations,
logits, gradients). CPU: RSS (VmHWM); GPU: the CUDA allocator. Time (--timing): "interleaved"
(CPU default) takes step times from one process in which the variants step in turn, each with
its own copy of the student, so load from other processes on shared cores hits all alike;
"subprocess" (GPU default) takes them from --repeats fresh processes per variant, interleaved.
The first --warmup steps are not timed; medians are reported (and the fastest step, since on a
shared CPU noise only ever slows a step down). Targets: essence ≥ 1.3× TRL's tokens/s at
≤ 0.5× its peak memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    EssenceStep,
    Meter,
    add_common_args,
    environment,
    example,
    forward_worker_args,
    gib,
    load_models,
    median,
    report,
    run_worker,
    trace,
)

VARIANTS = ("essence", "trl_gkd", "nll")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per step (default 1)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant and round (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps per process (default 1)")
    parser.add_argument("--timing", choices=("auto", "interleaved", "subprocess"), default="auto",
                        help="interleaved: step times from one process that steps the variants in turn "
                        "(memory still from a fresh process per variant); subprocess: times and memory "
                        "from --repeats fresh processes per variant. auto: interleaved on CPU (shared "
                        "cores), subprocess on GPU (three students may not fit together)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--worker", choices=(*VARIANTS, "interleaved"), help=argparse.SUPPRESS)
    parser.set_defaults(repeats=2)
    args = parser.parse_args(argv)
    if args.timing == "auto":
        args.timing = "interleaved" if args.device == "cpu" else "subprocess"
    return args


def make_batch(tokenizer, args: argparse.Namespace):
    """batch_size copies of one realistic trace of seq_len tokens (no padding), as an essence Batch."""
    from essence.data.batching import collate

    rendered, spans = trace(tokenizer, args.seq_len)
    return collate([example(rendered, spans)] * args.batch_size, tokenizer.pad_token_id)


# ---------------------------------------------------------------------------------------------
# Workers


def essence_step(args, student, teacher, tokenizer, batch):
    """essence's optimizer step on `batch`, as a no-argument function returning the loss."""
    step = EssenceStep(student, teacher, tokenizer, args)
    return lambda: step([batch])


def nll_step(args, student, batch):
    """Plain fine-tuning: HF's own cross-entropy over the full logits, same optimizer and loop."""
    from essence.config.schema import TrainConfig
    from essence.models.runtime import make_accelerator
    from essence.train.setup import build_optimizer

    config = TrainConfig(mixed_precision="bf16" if args.dtype == "bfloat16" else "no", max_grad_norm=1.0)
    accelerator = make_accelerator(config)
    optimizer, scheduler = build_optimizer(student, config, total_steps=1000)
    model, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)
    batch = batch.to(accelerator.device)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)

    def step() -> float:
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def trl_trainer(args, student, teacher, tokenizer, batch, steps: int, begin, end):
    """TRL's GKDTrainer in supervised mode on `batch` every step; `begin` / `end` are called
    around each optimizer step (from on_step_begin / on_step_end of its own loop)."""
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
              "labels": batch.input_ids.masked_fill(batch.attention_mask == 0, -100)}

    class Hooks(TrainerCallback):
        def on_step_begin(self, *a, **k):
            begin()

        def on_step_end(self, *a, **k):
            end()

    config = GKDConfig(
        output_dir=tempfile.mkdtemp(prefix="essence-bench-trl-"), report_to="none",
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1, max_steps=steps,
        lmbda=0.0, beta=0.0, seq_kd=False, gradient_checkpointing=False,
        bf16=args.dtype == "bfloat16", fp16=False, use_cpu=args.device == "cpu",
        learning_rate=1e-5, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0, warmup_steps=0,
        logging_steps=10**6, save_strategy="no", eval_strategy="no", dataloader_num_workers=0,
        max_length=None, seed=0, disable_tqdm=True,
    )
    return GKDTrainer(
        model=student, teacher_model=teacher, args=config, processing_class=tokenizer,
        train_dataset=Dataset.from_dict({"row": list(range(steps * args.batch_size))}),
        data_collator=lambda rows: dict(inputs), callbacks=[Hooks()],
    )


def one_variant(args, student, teacher, tokenizer, batch) -> list[dict]:
    """warmup + steps optimizer steps of args.worker, each timed and its memory measured."""
    total = args.warmup + args.steps
    if args.worker == "trl_gkd":
        results: list[dict] = []
        meter: list[Meter] = []
        trainer = trl_trainer(args, student, teacher, tokenizer, batch, total,
                              begin=lambda: meter[0].start(), end=lambda: results.append(meter[0].stop()))
        meter.append(Meter(args.device))  # baseline: models, data and the trainer built
        trainer.train()
        assert len(results) == total, f"timed {len(results)} of {total} TRL steps"
        return results
    step = (essence_step(args, student, teacher, tokenizer, batch) if args.worker == "essence"
            else nll_step(args, student, batch))
    meter = Meter(args.device)
    out = []
    for _ in range(total):
        meter.start()
        step()
        out.append(meter.stop())
    return out


def interleaved(args, student, teacher, tokenizer, batch) -> dict[str, list[float]]:
    """Step times of all variants taken in turn in one process (trl_gkd, essence, nll, trl_gkd, ...):
    on a shared CPU, load from other processes then hits every variant alike. Each variant has
    its own copy of the student; TRL's loop drives, the others step inside its step-end hook."""
    import copy

    variants = [v for v in args.variants.split(",") if v]
    others = {}
    if "essence" in variants:
        others["essence"] = essence_step(args, copy.deepcopy(student), teacher, tokenizer, batch)
    if "nll" in variants:
        others["nll"] = nll_step(args, copy.deepcopy(student), batch)
    times: dict[str, list[float]] = {v: [] for v in variants}
    meter = Meter(args.device)

    def after_trl() -> None:
        if "trl_gkd" in times:
            times["trl_gkd"].append(meter.stop()["seconds"])
        for name, step in others.items():
            meter.start()
            step()
            times[name].append(meter.stop()["seconds"])

    rounds = args.warmup + args.steps * args.repeats
    if "trl_gkd" in variants:
        trl_trainer(args, student, teacher, tokenizer, batch, rounds, begin=meter.start, end=after_trl).train()
    else:
        for _ in range(rounds):
            after_trl()
    return {v: t[args.warmup:] for v, t in times.items()}


def worker(args: argparse.Namespace) -> dict:
    import torch

    student, teacher, tokenizer = load_models(args)
    batch = make_batch(tokenizer, args)
    if args.worker == "interleaved":
        times = interleaved(args, student, teacher, tokenizer, batch)
        return {"variant": "interleaved", "tokens": batch.tokens, "times": times}
    try:
        steps = one_variant(args, student, teacher, tokenizer, batch)
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


def summarize(runs: dict[str, list[dict]], times: dict[str, list[float]] | None) -> dict[str, dict]:
    """Per variant: the median step time (over the interleaved steps, or over the repeats'
    medians) and the median memory over its fresh-process runs."""
    out = {}
    for variant, results in runs.items():
        ok = [r for r in results if "error" not in r]
        if not ok:
            out[variant] = {"error": results[0]["error"]}
            continue
        samples = times[variant] if times else [r["seconds"] for r in ok]
        seconds = median(samples)
        out[variant] = {
            "tokens": ok[0]["tokens"], "seconds": seconds, "min_seconds": min(samples),
            "tokens_per_s": ok[0]["tokens"] / seconds,
            "peak_mem": median([r["peak_mem"] for r in ok]), "step_mem": median([r["step_mem"] for r in ok]),
            "peak_abs": median([r["peak_abs"] for r in ok]),
            "samples": [round(x, 3) for x in samples],
        }
    return out


def print_table(summary: dict[str, dict]) -> None:
    print(f"{'variant':>8} {'tokens':>7} {'s/step':>8} {'min s':>7} {'tokens/s':>9} {'peak GiB':>9} "
          f"{'step GiB':>9} {'total GiB':>10}  step times (s)")
    for variant, r in summary.items():
        if "error" in r:
            print(f"{variant:>8}  failed: {r['error']}")
            continue
        print(f"{variant:>8} {r['tokens']:>7} {r['seconds']:>8.3f} {r['min_seconds']:>7.3f} "
              f"{r['tokens_per_s']:>9.1f} {gib(r['peak_mem']):>9} {gib(r['step_mem']):>9} "
              f"{gib(r['peak_abs']):>10}  {r['samples']}")


def ratios(summary: dict[str, dict]) -> dict[str, float]:
    e, t = summary.get("essence", {}), summary.get("trl_gkd", {})
    if "tokens_per_s" not in e or "tokens_per_s" not in t:
        return {}
    return {"speed": e["tokens_per_s"] / t["tokens_per_s"], "speed_min": t["min_seconds"] / e["min_seconds"],
            "peak_mem": e["peak_mem"] / t["peak_mem"], "step_mem": e["step_mem"] / t["step_mem"]}


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
          f"Bespoke-Stratos trace; {args.device} {args.dtype}; {args.timing} timing, {args.repeats} rounds × "
          f"{args.steps} timed steps after {args.warmup} warm-up", flush=True)
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    memory_only = args.timing == "interleaved"
    rounds = 1 if memory_only else args.repeats
    for round_ in range(rounds):
        for variant in variants[round_ % len(variants):] + variants[:round_ % len(variants)]:
            argv = ["--worker", variant, *shared]
            if memory_only:  # one warm-up and one measured step: memory only
                argv += ["--warmup", "1", "--steps", "1"]
            result = run_worker(__file__, argv)
            runs[variant].append(result)
            said = result.get("error") or (f"{result['seconds']:.3f} s/step, " if not memory_only else "") + \
                f"{gib(result['peak_mem'])} GiB peak, {gib(result['step_mem'])} GiB step"
            print(f"  {'memory' if memory_only else f'round {round_ + 1}'} {variant}: {said}", flush=True)
    times = None
    if memory_only:
        result = run_worker(__file__, ["--worker", "interleaved", *shared, "--variants", ",".join(variants),
                                       "--repeats", str(args.repeats)])
        if "error" in result:
            sys.exit(result["error"])
        times = result["times"]
        print(f"  interleaved step times: {json.dumps({k: [round(x, 2) for x in v] for k, v in times.items()})}")
    summary = summarize(runs, times)
    print(f"\n{environment(args)}")
    print_table(summary)
    r = ratios(summary)
    if r:
        print(f"essence / TRL GKD: tokens/s {r['speed']:.2f}× (target ≥ 1.3; {r['speed_min']:.2f}× on the "
              f"fastest steps), peak memory "
              f"{r['peak_mem']:.2f}× (target ≤ 0.5), step memory {r['step_mem']:.2f}×")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "environment": environment(args),
                                               "results": summary, "ratios": r}, indent=2) + "\n")


if __name__ == "__main__":
    main()
