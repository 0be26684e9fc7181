"""`essence study`: the paper's claim on a real pretrained model, resumable across sessions.

Stages, each skipped when complete and each resumed when interrupted (rerun the same command):

1. data: the embedded task's training traces and held-out problems (seeded, as `essence demo`);
2. student: SmolLM2-135M-Instruct (`essence models fetch smollm2`), cut to its 11-layer
   drop_layers copy (every third layer kept; `--full-student` keeps all 30);
3. teacher: SmolLM2 fine-tuned on the full traces (NLL only), evaluated on the held-out
   problems; its cost and accuracy are the run's summary.json (OUT/teacher/);
4. distil: the student at each LSP, the same learning rate for every LSP, the teacher of
   stage 3, each evaluated (OUT/runs/), beside the undistilled student (floor) and the teacher;
5. report: `essence report` over OUT/runs into OUT/.

On a 2-core CPU a 135M model trains at ~100 tokens/s: `--train` is the token budget's knob.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from essence.errors import EssenceError

STUDY_CONFIG = "essence:study-smollm2.yaml"
TEACHER_LR, TEACHER_EPOCHS = 1e-4, 2
"""The teacher stage: a stronger fine-tune of the base than the distillation's."""
MARKER = "study.json"


def claim_study_dir(out: Path, settings: dict) -> Path:
    """The study's folder: new, or one an earlier study with the same settings left (resumed)."""
    from essence.io import check_out_dir, write_json_atomic

    out = check_out_dir(out)
    marker = out / MARKER
    if marker.is_file():
        before = json.loads(marker.read_text(encoding="utf-8"))
        if before != settings:
            raise EssenceError(f"{out} holds a study with other settings ({marker}: {before}); "
                               "rerun with those settings to resume it, or choose another --out")
        print(f"essence study: resuming the study in {out}")
    elif any(not p.name.startswith(".") for p in out.iterdir()):
        raise EssenceError(f"{out} is not empty and holds no study; choose a new or empty --out")
    else:
        write_json_atomic(marker, settings)
    return out


def build_student(base: str, out: Path, *, full: bool) -> str:
    """The student's folder: the base itself, or its every-third-layer copy saved once."""
    if full:
        return base
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return str(out)
    import shutil

    from transformers import AutoModelForCausalLM

    from essence.models.layers import drop_layers, save_student
    from essence.models.loading import load_tokenizer

    student = drop_layers(AutoModelForCausalLM.from_pretrained(base), keep_every=3)
    partial = out.with_name(out.name + ".partial")  # an interrupted save leaves no half student
    shutil.rmtree(partial, ignore_errors=True)
    save_student(student, load_tokenizer(base), partial)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return str(out)


def reference_row(name: str, model: str, heldout: Path, runs: Path, seed: int,
                  overrides: list[str]) -> None:
    """Evaluate an untrained model once into runs/<name> (the report's floor or ceiling row)."""
    from essence.config.load import load_config
    from essence.eval.run import evaluate_with
    from essence.io import write_json_atomic

    run_dir = runs / name
    if (run_dir / "summary.json").is_file():
        return
    started = time.perf_counter()
    settings = load_config(STUDY_CONFIG, [f"model.student={model}", "loss.kd_ratio=0.0", *overrides]).eval
    result = evaluate_with(settings, model, [str(heldout)], run_dir / "eval", seed=seed)
    write_json_atomic(run_dir / "summary.json", {"run": name, "model": model, "truncation": "-",
                                                 "eval": result, "eval_time_s": time.perf_counter() - started})


def _check_lsps(lsp: str) -> None:
    """Refuse a bad --lsp list before any stage runs (each value as data.truncation.lsp checks it)."""
    from essence.data.truncation import TruncationConfig

    for text in lsp.split(","):
        try:
            TruncationConfig(lsp=float(text))
        except ValueError:
            raise EssenceError(f"--lsp {lsp!r}: {text!r} is not a number; e.g. 1.0,0.5") from None
        except EssenceError as err:
            raise EssenceError(f"--lsp {lsp!r}: {err}") from None


def run_study(out: str | Path, *, base: str | None = None, n_train: int = 1000, n_heldout: int = 100,
              lsp: str = "1.0,0.5", seed: int = 0, full_student: bool = False,
              overrides: list[str] = ()) -> list[dict]:
    """Run (or resume) every stage into `out`; returns the report rows."""
    from essence.experiments.demo import write_data
    from essence.experiments.report import build_report, wide_console
    from essence.experiments.sweep import run_sweep

    _check_lsps(lsp)
    settings = {"base": base or "smollm2", "train": n_train, "heldout": n_heldout, "lsp": lsp,
                "seed": seed, "full_student": full_student, "overrides": list(overrides)}
    out = claim_study_dir(Path(out), settings)
    train_path, heldout = write_data(out / "data", n_train, n_heldout, seed)  # same files each time
    if base is None:
        from essence.models.fetch import fetch_smollm2

        base = str(fetch_smollm2())
    student = build_student(base, out / "models" / "student", full=full_student)
    data = [f"data.source={train_path}", f"eval.benches=[{heldout}]", f"train.seed={seed}"]
    teacher_grid = [f"train.lr={TEACHER_LR}"]
    run_sweep(STUDY_CONFIG, teacher_grid, out / "teacher",
              [f"model.student={base}", "model.teacher=null", "loss.kd_ratio=0.0",
               f"train.epochs={TEACHER_EPOCHS}", *data, *overrides])
    from essence.experiments.sweep import parse_grid

    teacher_run = out / "teacher" / parse_grid(teacher_grid)[0].name
    teacher = teacher_run / "model"
    runs = out / "runs"
    reference_row("base-student", student, heldout, runs, seed, list(overrides))
    if not (runs / "teacher" / "summary.json").is_file():  # the ceiling: the teacher stage's own eval
        from essence.io import write_json_atomic

        stage = json.loads((teacher_run / "summary.json").read_text(encoding="utf-8"))
        write_json_atomic(runs / "teacher" / "summary.json",
                          {"run": "teacher", "model": str(teacher), "truncation": "-",
                           "eval": stage.get("eval"), "eval_time_s": stage.get("eval_time_s"),
                           "teacher_stage": {k: stage.get(k) for k in ("steps", "student_tokens",
                                                                        "total_flops", "train_time_s")}})
    run_sweep(STUDY_CONFIG, [f"data.truncation.lsp={lsp}"], runs,
              [f"model.student={student}", f"model.teacher={teacher}", *data, *overrides])
    return build_report(runs, out, console=wide_console())


def add_parser(sub) -> None:
    """The `essence study` subcommand."""
    from essence.fields import count

    p = sub.add_parser("study", help="the LSP claim on SmolLM2-135M (hours on CPU; resumable)")
    p.add_argument("--out", default="runs/study", help="the study's folder (rerun to resume)")
    p.add_argument("--train", type=count, default=1000, help="training traces (the token budget)")
    p.add_argument("--heldout", type=count, default=100, help="held-out problems")
    p.add_argument("--lsp", default="1.0,0.5", help="LSPs to distil at, e.g. 1.0,0.75,0.5,0.25")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", default=None, help="base model folder (default: the fetched SmolLM2)")
    p.add_argument("--full-student", action="store_true", help="the 30-layer student, not 11 layers")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every stage, e.g. train.max_steps=2")
    p.set_defaults(func=lambda a: run_study(
        a.out, base=a.base, n_train=a.train, n_heldout=a.heldout, lsp=a.lsp, seed=a.seed,
        full_student=a.full_student, overrides=a.overrides) and 0)
