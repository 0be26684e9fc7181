"""`essence demo`: the whole method on the embedded synthetic task, on a laptop CPU.

1. generate training traces and held-out problems (seeded);
2. evaluate the shipped teacher (ceiling) and the undistilled base student (floor);
3. distill the teacher into the base student at LSP 1.0, 0.75, 0.5 and 0.25, and with cot_lead
   at 0.5 and 0.40625 (the frontier's winner), evaluating each;
4. write the trade-off report (table, report.md, report.json, plots).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from essence.data.synth import DEMO_INSTRUCTION, first_derivation, generate, write_jsonl
from essence.errors import EssenceError
from essence.io import check_out_dir, write_json_atomic
from essence.paths import resolve

DEMO_CONFIG = "essence:demo.yaml"
FULL = {"train": 4000, "heldout": 200, "lsp": "1.0,0.75,0.5,0.25", "epochs": 1}
QUICK = {"train": 400, "heldout": 40, "lsp": "1.0,0.5", "epochs": 1}
# Beyond the paper: the answer-preserving variant at the same CoT budget as LSP 0.5, and the
# cheapest recipe `essence frontier` found keeping 95% on the demo (docs/demo.md); --quick runs
# only the first.
EXTRA_GRID = "data.truncation.cot_lead=0.5"
FRONTIER_GRID = "data.truncation.cot_lead=0.40625,0.5"
DEMO_MARKER = "demo.json"  # the settings of the demo that owns a folder


def _with_instruction(problem: str) -> str:
    # The shipped models saw the instruction on its own line after the problem.
    return f"{problem}\n{DEMO_INSTRUCTION}"


def write_data(out: Path, n_train: int, n_heldout: int, seed: int) -> tuple[Path, Path]:
    """Training traces and held-out problems (no overlap) for the demo."""
    out.mkdir(parents=True, exist_ok=True)
    train_rows = generate(n_train, seed)
    for row in train_rows:
        row["problem"] = _with_instruction(row["problem"])
    seen = {row["problem"] for row in train_rows}
    heldout = []
    for row in generate(n_heldout * 2, seed + 10_007):
        problem = _with_instruction(row["problem"])
        if problem not in seen and len(heldout) < n_heldout:
            heldout.append({"id": row["id"], "problem": problem,
                            "answer": str(row["meta"]["result"])})
    train_path, heldout_path = out / "train.jsonl", out / "heldout.jsonl"
    write_jsonl(train_rows, train_path)
    write_jsonl(heldout, heldout_path)
    return train_path, heldout_path


def evaluate_reference(name: str, model: str, heldout: Path, runs: Path, seed: int) -> None:
    """Evaluate an untrained model once; its run folder holds only the eval block."""
    from essence.config.load import load_config
    from essence.eval.run import evaluate_with

    run_dir = runs / name
    if (run_dir / "summary.json").is_file():
        print(f"essence demo: {name} already evaluated")
        return
    started = time.perf_counter()
    result = evaluate_with(load_config(DEMO_CONFIG).eval, resolve(model), [str(heldout)],
                           run_dir / "eval", seed=seed)
    summary = {"run": name, "model": model, "truncation": "-", "eval": result,
               "eval_time_s": time.perf_counter() - started}
    write_json_atomic(run_dir / "summary.json", summary)


def claim_demo_dir(out: str | Path, settings: dict) -> Path:
    """The demo's folder: new, or one an earlier demo with the same settings left (resumed).

    A folder holding anything else, or a demo with other settings, is refused: re-running
    would mix its results into another run's, or retrain over them.
    """
    out = check_out_dir(out)
    marker = out / DEMO_MARKER
    if marker.is_file():
        try:
            before = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            before = None
        if before != settings:
            raise EssenceError(f"{out} holds a demo run with other settings ({marker}: {before}); "
                               "rerun with those settings to resume it, or choose another --out")
        print(f"essence demo: resuming the demo in {out}")
        return out
    others = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    if others:
        raise EssenceError(f"{out} is not empty ({', '.join(others[:5])}) and holds no demo; "
                           "choose a new or empty --out")
    write_json_atomic(marker, settings)
    return out


def derivation_rates(runs: Path) -> dict[str, float]:
    """Per run: the share of held-out answers whose working concluded with the right value.

    Beside the graded accuracy it tells a student that never learned the working from one that
    learned it but did not close its thinking and box the answer (plain LSP's failure here).
    """
    rates = {}
    for details in sorted(runs.glob("*/eval/details.jsonl")):
        rows = [json.loads(line) for line in details.read_text(encoding="utf-8").splitlines()]
        right = sum(first_derivation(r["responses"][0]) == int(r["gold"]) for r in rows if r["responses"])
        rates[details.parents[1].name] = right / len(rows) if rows else 0.0
    return rates


def run_demo(out: str | Path = "runs/demo", *, quick: bool = False, seed: int = 0) -> list[dict]:
    """Run the demo into `out`; re-running skips what is complete. Returns the report rows."""
    import torch

    from essence.experiments.report import build_report, wide_console
    from essence.experiments.sweep import run_sweep

    torch.set_num_threads(1)  # the demo models are tiny: one thread is faster than two
    size = QUICK if quick else FULL
    out = claim_demo_dir(out, {"quick": quick, "seed": seed, **size})
    started = time.perf_counter()
    train_path, heldout = write_data(out / "data", size["train"], size["heldout"], seed)
    runs = out / "runs"
    evaluate_reference("base-student", "essence:demo/student", heldout, runs, seed)
    evaluate_reference("teacher", "essence:demo/teacher", heldout, runs, seed)
    overrides = [f"data.source={train_path}", f"eval.benches=[{heldout}]",
                 f"train.seed={seed}", f"train.epochs={size['epochs']}"]
    run_sweep(DEMO_CONFIG, [f"data.truncation.lsp={size['lsp']}"], runs, overrides)
    run_sweep(DEMO_CONFIG, [EXTRA_GRID if quick else FRONTIER_GRID], runs, overrides)
    rows = build_report(runs, out, console=wide_console())
    rates = derivation_rates(runs)
    write_json_atomic(out / "derivations.json", rates)
    print("working concluded with the right value (first derivation, before any answer): "
          + ", ".join(f"{name} {rate:.1%}" for name, rate in rates.items()))
    print(f"essence demo: finished in {time.perf_counter() - started:.0f} s; "
          f"report in {out / 'report.md'}")
    return rows
