"""Atomic checkpoints: a crash or a full disk mid-save leaves the previous one intact.

Layout of a run directory:

    RUN/checkpoints/step-000100/   student (save_pretrained) + tokenizer + trainer_state.pt
    RUN/checkpoints/latest         the name of the newest complete checkpoint
    RUN/model/                     the final student, ready for `essence eval`

Each checkpoint is written to a hidden temporary folder and renamed into place only when
complete; `latest` is replaced (atomically) after that, so a reader never sees a partial one.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from essence.errors import EssenceError
from essence.io import write_text_atomic

STATE_FILE = "trainer_state.pt"


def _write_dir(target: Path, write) -> None:
    """Run write(tmp_dir), then rename tmp_dir to target, replacing any old one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        if target.exists():
            old = target.parent / f".old-{target.name}-{os.getpid()}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise EssenceError(
            f"could not write {target} ({err.strerror or err}); earlier checkpoints are intact. "
            "Free disk space or choose another --out, then rerun with --resume"
        ) from None


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
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    _write_dir(target, write)


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, trainer_state: dict) -> Path:
    """Write checkpoints/step-N with the student and the trainer state, then point latest at it."""
    root = run_dir / "checkpoints"
    target = root / f"step-{step:06d}"

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save(trainer_state, tmp / STATE_FILE)

    _write_dir(target, write)
    write_text_atomic(root / "latest", target.name + "\n")
    return target


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    return path if (path / STATE_FILE).is_file() else None


def load_trainer_state(checkpoint: Path) -> dict:
    try:
        return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as err:  # a damaged file can raise many types
        raise EssenceError(f"checkpoint {checkpoint} is unreadable ({err}); "
                           "delete it and point checkpoints/latest at an older one") from None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints."""
    root = run_dir / "checkpoints"
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
