"""Metrics logging: RUN/metrics.jsonl always; TensorBoard or W&B when asked for."""

from __future__ import annotations

import json
from pathlib import Path

from essence.errors import EssenceError


class MetricsLog:
    """Append one JSON line per logged step (main process only)."""

    def __init__(self, run_dir: Path, tracker: str, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.backend = None
        if not enabled:
            return
        if resume_step and self.path.exists():
            # A run killed after its last checkpoint logged steps it will now redo.
            lines = [l for l in self.path.read_text().splitlines()
                     if l.strip() and json.loads(l).get("step", 0) <= resume_step]
            self.path.write_text("".join(l + "\n" for l in lines))
        elif not resume_step:
            self.path.write_text("")
        self.backend = _open_tracker(tracker, run_dir)

    def write(self, metrics: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(metrics) + "\n")
        if self.backend is not None:
            self.backend(metrics)

    def close(self) -> None:
        closer = getattr(self.backend, "close", None)
        if closer:
            closer()


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
