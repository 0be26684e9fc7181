"""Metrics: RUN/metrics.jsonl always (the source of truth); any tracker accelerate supports too.

`train.tracker` names them (tensorboard, wandb, trackio, mlflow, aim, ...): the run's
Accelerator is built with `log_with=` those names, `init_trackers` opens them with the whole
resolved config as hyperparameters and the run named after its folder (`train.run_name`),
grouped under its sweep (`train.run_group`); the ids a tracker needs to continue the same run
(W&B's run id, MLflow's) are kept in RUN/tracking.json so that `--resume` continues the curve.
"""

from __future__ import annotations

import importlib.util
import json
import secrets
from pathlib import Path

from essence.errors import EssenceError
from essence.io import append_line, write_json_atomic, write_text_atomic

TRACKERS = {  # accelerate's name -> (module that must import, essence extra that installs it)
    "tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
    "trackio": ("trackio", "trackio"), "mlflow": ("mlflow", "mlflow"), "aim": ("aim", "aim"),
    "comet_ml": ("comet_ml", "comet_ml"), "clearml": ("clearml", "clearml"),
    "dvclive": ("dvclive", "dvclive"), "swanlab": ("swanlab", "swanlab"),
}
IDS_FILE = "tracking.json"


def tracker_names(setting) -> list[str]:
    """The trackers a `train.tracker` setting asks for ('none' and repeats dropped)."""
    names = [setting] if isinstance(setting, str) else list(setting or ())
    return list(dict.fromkeys(n for n in names if n != "none"))


def check_trackers(setting) -> list[str]:
    """The trackers asked for, each importable; else one line naming the package to install."""
    names = tracker_names(setting)
    for name in names:
        module, extra = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise EssenceError(f"train.tracker={name} needs the {module} package, which is not "
                               f"installed: pip install 'essence[{extra}]' (or train.tracker=none)")
    return names


def hyperparameters(config_dict: dict, prefix: str = "") -> dict:
    """The resolved config as flat dotted keys with scalar values (what every tracker accepts)."""
    flat = {}
    for key, value in config_dict.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(hyperparameters(value, name + "."))
        elif value is None or isinstance(value, (list, tuple)):
            flat[name] = json.dumps(value)
        else:
            flat[name] = value
    return flat


def _init_kwargs(names: list[str], run_dir: Path, name: str, group: str | None, ids: dict,
                 resume_step: int) -> dict:
    kwargs = {}
    if "wandb" in names:
        kwargs["wandb"] = {"name": name, "dir": str(run_dir), "id": ids["wandb"], "resume": "allow",
                           **({"group": group} if group else {})}
    if "trackio" in names:
        kwargs["trackio"] = {"name": name, "resume": "allow", **({"group": group} if group else {})}
    if "tensorboard" in names and resume_step:  # steps redone after the checkpoint replace the old
        kwargs["tensorboard"] = {"purge_step": resume_step + 1}
    if "mlflow" in names:
        kwargs["mlflow"] = {"run_name": name, **({"run_id": ids["mlflow"]} if ids.get("mlflow") else {}),
                            **({"tags": {"group": group}} if group else {})}
    return kwargs


def start_trackers(accelerator, config, config_dict: dict, run_dir: Path, resume_step: int) -> list:
    """Open the config's trackers on `accelerator` (built with log_with=); returns them."""
    names = tracker_names(config.train.tracker)
    if not names:
        return []
    ids_path = run_dir / IDS_FILE
    ids = json.loads(ids_path.read_text(encoding="utf-8")) if ids_path.is_file() else {}
    if "wandb" in names and not ids.get("wandb"):
        ids["wandb"] = secrets.token_hex(8)  # W&B ids: lowercase letters and digits
        write_json_atomic(ids_path, ids)  # before the run starts: a crash still resumes it
    name = config.train.run_name or run_dir.resolve().name
    accelerator.init_trackers(config.train.tracker_project, config=hyperparameters(config_dict),
                              init_kwargs=_init_kwargs(names, run_dir, name, config.train.run_group,
                                                       ids, resume_step))
    trackers = list(accelerator.trackers)
    for tracker in trackers:
        if tracker.name == "mlflow" and not ids.get("mlflow"):
            ids["mlflow"] = tracker.active_run.info.run_id
            write_json_atomic(ids_path, ids)
    return trackers


class MetricsLog:
    """One JSON line per logged step in RUN/metrics.jsonl, and the same numbers to each tracker."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int = 0, trackers: list = ()):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.trackers = list(trackers)
        if not enabled:
            return
        if resume_step and self.path.exists():
            lines = _lines_up_to(self.path, resume_step)
            write_text_atomic(self.path, "".join(l + "\n" for l in lines))
        elif not resume_step:
            write_text_atomic(self.path, "")

    def write(self, metrics: dict) -> None:
        if not self.enabled:
            return
        append_line(self.path, json.dumps(metrics))
        self._track(metrics, metrics["step"])

    def write_final(self, summary: dict) -> None:
        """The run's costs and evaluation scores, at its last step, to the trackers only."""
        values = {f"summary/{k}": v for k, v in summary.items() if k != "eval"}
        for key, value in (summary.get("eval") or {}).items():
            if isinstance(value, dict):
                values.update({f"eval/{key}/{k}": v for k, v in value.items()})
            else:
                values[f"eval/{key}"] = value
        self._track(values, summary.get("steps", 0))

    def _track(self, metrics: dict, step: int) -> None:
        values = {k: v for k, v in metrics.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


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
