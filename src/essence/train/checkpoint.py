"""Atomic, verifiable checkpoints: a crash or a full disk mid-save loses nothing earlier.

Layout of a run directory:

    RUN/checkpoints/step-000100/   student (save_pretrained) + tokenizer + trainer_state.pt
                                   + manifest.json (every file's size; checksums of small ones)
    RUN/checkpoints/latest         the name of the newest checkpoint (informative)
    RUN/model/                     the final student, ready for `essence eval`

Each checkpoint is written to a hidden temporary folder and renamed into place only when
complete, so a kill or a full disk mid-save leaves the one before it as it was. Resuming takes
the checkpoint with the highest step number after checking its files against its manifest; one
that does not match (a truncated or changed file, a deleted optimizer state) was damaged after
it was written, and is refused in one line naming the file and what to do (delete that folder
to resume from the checkpoint before it, or start over), never used and never skipped silently.
A garbled `latest` is only informative and is ignored with a notice.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from essence.errors import EssenceError
from essence.faults import fault_point
from essence.io import is_write_failure, write_failure, write_text_atomic
from essence.models.manifest import MANIFEST, STATE_FILE, verify, write_manifest

STEP_DIR = re.compile(r"step-(\d+)$")


def _write_dir(target: Path, write, phase: str, intact: str) -> None:
    """Run write(tmp_dir), add a manifest, then rename tmp_dir to target (replacing it).

    phase names the fault points; intact says what survives a failed write.
    """
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        write(tmp)
        fault_point(f"{phase}-manifest")
        write_manifest(tmp)
        fault_point(f"{phase}-rename")
        if target.exists():
            old = target.parent / f".old-{target.name}-{os.getpid()}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except (OSError, RuntimeError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_write_failure(err):
            raise
        raise EssenceError(f"{write_failure(target, err)}; {intact}") from None


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_model(model, tokenizer, target: Path) -> None:
    """Write a student in Hugging Face format (safetensors + tokenizer), atomically."""

    def write(tmp: Path) -> None:
        fault_point("save-model-model")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    kept = intact_note(target.parent)
    _write_dir(target, write, "save-model", f"{kept}. Free disk space, then rerun with --resume")


def step_dirs(run_dir: Path) -> dict[int, Path]:
    """The checkpoint folders of a run by step number (not by name)."""
    root = run_dir / "checkpoints"
    found = {}
    if root.is_dir():
        for path in root.iterdir():
            match = STEP_DIR.match(path.name)
            if match and path.is_dir():
                found[int(match.group(1))] = path
    return found


def intact_note(run_dir: Path) -> str:
    """What of a run survives a failure now: its newest checkpoint, or that there is none."""
    steps = step_dirs(run_dir)
    if not steps:
        return "no checkpoint of this run had been written yet"
    return f"the checkpoint {steps[max(steps)]} is intact"


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, trainer_state: dict) -> Path:
    """Write checkpoints/step-N with the student and the trainer state, then point latest at it."""
    root = run_dir / "checkpoints"
    target = checkpoint_dir(run_dir, step)
    phase = f"save-{step}"

    def write(tmp: Path) -> None:
        fault_point(f"{phase}-model")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        fault_point(f"{phase}-state")
        torch.save(trainer_state, tmp / STATE_FILE)

    kept = intact_note(run_dir)
    _write_dir(target, write, phase, f"{kept}. Free disk space, then rerun with --resume")
    fault_point(f"{phase}-latest")
    write_text_atomic(root / "latest", target.name + "\n")
    return target


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """RUN/checkpoints/step-NNNNNN, the folder of the checkpoint after optimizer step `step`."""
    return run_dir / "checkpoints" / f"step-{step:06d}"


def find_checkpoint(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint of a run, verified, and notes to show; None: there is none.

    A newest checkpoint that does not match its manifest is refused (EssenceError)."""
    notes = []
    pointer = run_dir / "checkpoints" / "latest"
    steps = step_dirs(run_dir)
    if pointer.is_file():
        try:
            name = pointer.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            name = "<unreadable>"
        if name not in {p.name for p in steps.values()}:
            notes.append(f"checkpoints/latest names {name[:40]!r}, which is not a checkpoint "
                         "here; ignoring it")
    if not steps:
        return None, notes
    folder = steps[max(steps)]
    problem = verify(folder)
    if problem is None:
        return folder, notes
    if not (folder / MANIFEST).exists() and _complete_without_manifest(folder):
        notes.append(f"{folder.name} has no {MANIFEST} (saved by an older essence); "
                     "resuming from it unverified")
        return folder, notes
    earlier = [steps[s] for s in sorted(steps, reverse=True)[1:] if verify(steps[s]) is None]
    back = (f"delete that folder to resume from {earlier[0].name}, the newest one that verifies, "
            if earlier else "no earlier checkpoint verifies; ")
    raise EssenceError(f"checkpoint {folder} is damaged ({problem}); {back}or pass --overwrite "
                       "instead of --resume to start the run over")


def choose_checkpoint(run_dir: Path, announce: bool) -> Path | None:
    """The checkpoint --resume continues from (None: start from the beginning); announce: print
    the notes (the main process)."""
    checkpoint, notes = find_checkpoint(run_dir)
    for note in notes if announce else ():
        print(f"essence: {note}")
    if checkpoint is None and notes:
        raise EssenceError(f"--resume: no complete checkpoint in {run_dir / 'checkpoints'} "
                           f"({'; '.join(notes)}); pass --overwrite to start this run again")
    if checkpoint is None and announce:
        print(f"essence: no checkpoint in {run_dir}; starting from the beginning")
    return checkpoint


def _complete_without_manifest(folder: Path) -> bool:
    """A checkpoint from before manifests: renamed into place complete, so trust its files."""
    return all((folder / name).is_file() and (folder / name).stat().st_size > 0
               for name in (STATE_FILE, "config.json")) and any(folder.glob("*.safetensors"))


def load_trainer_state(checkpoint: Path) -> dict:
    try:
        return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as err:  # a damaged file can raise many types
        raise EssenceError(f"checkpoint {checkpoint}: {STATE_FILE} is unreadable "
                           f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                           "delete that folder to resume from the one before, or pass "
                           "--overwrite instead of --resume to start over") from None


def prune_checkpoints(run_dir: Path, keep: int, current: int) -> None:
    """Keep the `keep` checkpoints with the highest step numbers up to `current`.

    Checkpoints numbered above `current` were left by a later point of this run that resume
    rejected as incomplete; the run has now passed them by, so they go too.
    """
    fault_point(f"save-{current}-prune")
    steps = step_dirs(run_dir)
    earlier = sorted(s for s in steps if s <= current)
    for step in [s for s in steps if s > current] + earlier[:-keep]:
        shutil.rmtree(steps[step], ignore_errors=True)


def checkpoint_bytes(model) -> int:
    """About how many bytes one checkpoint of `model` takes: weights + AdamW's two moments."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    moments = sum(2 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return weights + moments
