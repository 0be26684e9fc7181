"""The demo models' build record: build.json (one model at a time) and the assets' README.

scripts/build_demo_models.py trains the models; this writes down what it built and measured.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch


def write_readme(out: Path, tok, builds: dict[str, dict], facts: dict) -> None:
    """The assets' README: what the two models are, how they were built, what they score.

    `facts`: the build's constants (STEPS, EASY, EVAL_SEED, MAX_NEW_TOKENS, SEED, TOKENIZER_SEED,
    TRAIN_SEED) as build_demo_models.py defines them.
    """
    f = facts
    def pct(b: dict, label: str, field: str) -> str:
        return f"{b['scores'][label][field]:.1%}" if label in b["scores"] else "–"

    def minutes(seconds: float | None) -> str:
        return f"{seconds / 60:.1f}" if seconds else "–"

    rows = "\n".join(
        f"| {name} | {b['spec']['layers']} x {b['spec']['hidden']} | {b['params']:,} "
        f"| {b['spec']['data'][0]}-{b['spec']['data'][1]} | {b['spec']['steps']} x {b['spec']['batch']}"
        f"{' x ' + str(b['spec']['pack']) + ' packed' if b['spec'].get('pack', 1) > 1 else ''} "
        f"| {b['spec']['lr']:g} | {pct(b, 'hard', 'accuracy')} | {pct(b, 'hard', 'math_verify')} "
        f"| {pct(b, 'hard', 'finished')} | {pct(b, 'easy', 'accuracy')} | {pct(b, 'easy', 'finished')} "
        f"| {minutes(b['train_s'])} |"
        for name, b in builds.items() if name != "_run"
    )
    run = builds.get("_run", {})
    total = f"{run['total_s'] / 60:.1f} minutes" if run.get("total_s") else "(not recorded)"
    load = f"{run['load_average']:.1f}" if run.get("load_average") is not None else "(not recorded)"
    (out / "README.md").write_text(f"""# Embedded demo models

Two small Llama causal LMs for `essence demo`, trained from scratch on the synthetic task
`essence.data.synth` (seeded multi-step arithmetic word problems with long-CoT-shaped traces:
the working, then varied re-checks, then a written-up solution ending in `\\boxed{{}}`). The demo
distils *hard* problems ({f['STEPS'][0]}-{f['STEPS'][1]} steps, the `generate` default); *easy* ones have
{f['EASY'][0]}-{f['EASY'][1]} steps. They share one tokenizer: byte-level BPE, {len(tok)} tokens, one token per
digit, ChatML chat template, `<think>`/`</think>` single tokens, eos `<|im_end|>`, pad
`<|endoftext|>`. Training text: user turn = problem + "\\n" + DEMO_INSTRUCTION, assistant turn =
"<think>\\n" + reasoning + "\\n</think>\\n\\n" + answer; loss on the assistant turn only.

- `teacher/`: trained on complete traces of the hard problems; it solves them.
- `student/`: the base student, made the way a base model is made: trained on complete traces
  of *easy* problems only, two conversations packed per training sequence (as pre-training packs
  documents, so it has ended traces at every position a hard trace reaches; unpacked, a student
  trained longer finished only 83% of the hard problems). It knows the whole format and finishes its traces
  (closes its think block, writes the solution up, boxes an answer, stops) on hard problems
  too, but gets most of those wrong: the teacher has the hard problems to teach it, and a
  fine-tune on lead spans need not teach it how to conclude.

| model | layers x hidden | parameters | trained on (steps) | steps x batch | lr | hard: accuracy | hard: math-verify | hard: finished | easy: accuracy | easy: finished | training minutes |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
{rows}

Greedy decoding of 200 held-out problems of each kind (`generate(200, seed={f['EVAL_SEED']}, steps=...)`,
none of them in the training data), stop at `<|im_end|>` or {f['MAX_NEW_TOKENS']} new tokens.
Accuracy: the last `\\boxed{{}}` integer equals the ground truth; math-verify: the same completions
graded by math-verify; finished: `<think>`, the working, `</think>`, an answer holding a
`\\boxed{{N}}`, then `<|im_end|>`.

Built by `python scripts/build_demo_models.py` (seed {f['SEED']}; tokenizer data seed {f['TOKENIZER_SEED']},
training data seed {f['TRAIN_SEED']}), fp32, torch {torch.__version__}, on one CPU thread (`--threads 1`)
of a 2-core machine: {total} in all, tokenizer, data and grading included (load average
{load} at the end of the build). The same command on the same machine rebuilds
the same files (`build.json` holds the numbers above).
""")


def record_build(out: Path, name: str, spec, params: int, scores: dict,
                 train_s: float | None) -> dict:
    """Merge one model's build into out/build.json (so models built one at a time share a README)."""
    path = out / "build.json"
    builds = json.loads(path.read_text()) if path.is_file() else {}
    builds.pop("_run", None)  # a partial build: the whole build's wall time no longer describes the files
    builds[name] = {"spec": asdict(spec), "params": params, "train_s": train_s,
                    "scores": {k: {f: getattr(s, f) for f in ("accuracy", "math_verify", "finished")}
                               for k, s in scores.items()}}
    path.write_text(json.dumps(builds, indent=1) + "\n")
    return builds
