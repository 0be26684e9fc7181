"""Metrics logging: RUN/metrics.jsonl always; TensorBoard or W&B when asked for."""

from __future__ import annotations

import json
from pathlib import Path

from essence.errors import EssenceError
from essence.io import append_line, write_text_atomic


class MetricsLog:
    """Append one JSON line per logged step (main process only)."""

    def __init__(self, run_dir: Path, tracker: str, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.backend = None
        if not enabled:
            return
        if resume_step and self.path.exists():
            lines = _lines_up_to(self.path, resume_step)
            write_text_atomic(self.path, "".join(l + "\n" for l in lines))
        elif not resume_step:
            write_text_atomic(self.path, "")
        self.backend = _open_tracker(tracker, run_dir)

    def write(self, metrics: dict) -> None:
        if not self.enabled:
            return
        append_line(self.path, json.dumps(metrics))
        if self.backend is not None:
            self.backend(metrics)

    def close(self) -> None:
        closer = getattr(self.backend, "close", None)
        if closer:
            closer()


def _lines_up_to(path: Path, step: int) -> list[str]:
    """The metrics lines of steps up to `step` (a run killed after its last checkpoint logged
    steps it will now redo); a line cut short by the kill is dropped with a notice."""
    kept = []
    text = path.read_bytes().decode("utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            line_step = record.get("step", 0) if isinstance(record, dict) else None
        except json.JSONDecodeError:
            line_step = None
        if not isinstance(line_step, int):
            print(f"essence: dropped line {number} of {path} (half written or not a metrics "
                  "record)")
            continue
        if line_step <= step:
            kept.append(line)
    return kept


def _open_tracker(tracker: str, run_dir: Path):
    if tracker == "none":
        return None
    if tracker == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise EssenceError("train.tracker=tensorboard needs `pip install tensorboard`") from None
        writer = SummaryWriter(str(run_dir / "tensorboard"))

        def log(metrics: dict) -> None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key != "step":
                    writer.add_scalar(key, value, metrics["step"])

        log.close = writer.close
        return log
    try:
        import wandb
    except ImportError:
        raise EssenceError("train.tracker=wandb needs `pip install wandb`") from None
    run = wandb.init(dir=str(run_dir), config={})

    def log_wandb(metrics: dict) -> None:
        run.log({k: v for k, v in metrics.items() if v is not None}, step=metrics["step"])

    log_wandb.close = run.finish
    return log_wandb
