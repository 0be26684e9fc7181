"""Trackers through accelerate, read back from their own files (offline: no network)."""

import importlib.util
import json
import struct

import pytest
from conftest import metrics, tiny_config, train_interrupted

from essence.errors import EssenceError
from essence.train.run import train
from essence.train.tracking import hyperparameters, tracker_names


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def test_tracker_setting_names_and_flat_config():
    assert tracker_names(("none",)) == [] and tracker_names("wandb") == ["wandb"]
    assert tracker_names(("tensorboard", "wandb", "tensorboard")) == ["tensorboard", "wandb"]
    flat = hyperparameters({"train": {"lr": 0.1, "tracker": ["wandb"]}, "eval": {"limit": None}})
    assert flat == {"train.lr": 0.1, "train.tracker": '["wandb"]', "eval.limit": "null"}


def test_missing_tracker_fails_before_training(tokenizer_dir, data_file, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(EssenceError, match=r"train.tracker=mlflow needs the mlflow package.*essence\[mlflow\]"):
        train(tiny_config(tokenizer_dir, data_file, "train.tracker=[tensorboard,mlflow]"), tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_unknown_tracker_is_refused_in_config(tokenizer_dir, data_file):
    with pytest.raises(EssenceError, match="train.tracker"):
        tiny_config(tokenizer_dir, data_file, "train.tracker=neptune")


def _log_records(path):
    """The payloads of a W&B transaction log: a 7-byte header, then LevelDB-log records
    (32 KiB blocks; each record: crc32, length, type FULL/FIRST/MIDDLE/LAST, payload)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, out, pending = 7, [], b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
            if kind == 4:
                out.append(pending)
    return out


def _wandb_records(run_dir):
    """(run record, config, history rows) of each offline W&B run under run_dir."""
    from wandb.proto import wandb_internal_pb2

    runs = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        run, config, history = None, {}, []
        for data in _log_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = record.run
                config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "config":
                config.update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif kind == "history":
                history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                for i in record.history.item})
        runs.append((run, config, history))
    return runs


@pytest.mark.skipif(not _have("wandb"), reason="wandb not installed (pip install 'essence[wandb]')")
def test_wandb_offline_config_name_metrics_and_resumed_id(tokenizer_dir, data_file, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "lsp-0.5"
    config = tiny_config(tokenizer_dir, data_file, "train.tracker=wandb", "train.log_every=1",
                         "train.save_every=2", "train.epochs=3")
    train_interrupted(config, run_dir, after_step=4)
    first_id = json.loads((run_dir / "tracking.json").read_text())["wandb"]
    train(config, run_dir, resume=True)
    assert json.loads((run_dir / "tracking.json").read_text())["wandb"] == first_id
    runs = _wandb_records(run_dir)
    assert len(runs) == 2, "one offline run per process start"
    for run, config_seen, _ in runs:
        assert run.run_id == first_id and run.display_name == "lsp-0.5"
        assert config_seen["train.lr"] == 0.01
        assert config_seen["data.source"] == str(data_file)
    steps = [m["step"] for m in metrics(run_dir)]
    logged = [row["_step"] for _, _, history in runs for row in history if "loss" in row]
    assert logged[:4] == steps[:4] and logged[-1] == steps[-1]
    resumed = [row["_step"] for row in runs[1][2] if "loss" in row]
    assert resumed[0] == 5, "the resumed run continues after its checkpoint (step 4)"
    loss = {m["step"]: m["loss"] for m in metrics(run_dir)}
    assert all(row["loss"] == pytest.approx(loss[row["_step"]]) for _, _, h in runs for row in h if "loss" in row)


@pytest.mark.skipif(not _have("tensorboard"), reason="tensorboard not installed (pip install 'essence[tensorboard]')")
def test_tensorboard_event_files_hold_the_scalars_at_their_steps(tokenizer_dir, data_file, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    train(tiny_config(tokenizer_dir, data_file, "train.tracker=tensorboard", "train.log_every=1"), run_dir)
    events = [p.parent for p in (run_dir / "tensorboard").rglob("events.out.tfevents.*")]
    assert events
    scalars = {}
    for folder in set(events):
        acc = EventAccumulator(str(folder))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    rows = metrics(run_dir)
    assert [s for s, _ in scalars["loss"]] == [m["step"] for m in rows]
    assert [v for _, v in scalars["loss"]] == pytest.approx([m["loss"] for m in rows], rel=1e-6)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert scalars["summary/total_flops"] == [(summary["steps"], pytest.approx(summary["total_flops"], rel=1e-6))]


@pytest.mark.skipif(not _have("trackio"), reason="trackio not installed (pip install 'essence[trackio]')")
def test_trackio_local_run_holds_config_and_metrics(tokenizer_dir, data_file, tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    from trackio.sqlite_storage import SQLiteStorage

    run_dir = tmp_path / "point"
    train(tiny_config(tokenizer_dir, data_file, "train.tracker=trackio", "train.log_every=1",
                      "train.tracker_project=essence-test", "train.run_name=my-run"), run_dir)
    logs = [row for row in SQLiteStorage.get_logs("essence-test", "my-run") if "loss" in row]
    rows = metrics(run_dir)
    assert [row["step"] for row in logs] == [m["step"] for m in rows]
    assert [row["loss"] for row in logs] == pytest.approx([m["loss"] for m in rows])
    assert SQLiteStorage.get_run_config("essence-test", "my-run")["train.lr"] == 0.01


@pytest.mark.skipif(not _have("wandb"), reason="wandb not installed (pip install 'essence[wandb]')")
def test_sweep_points_carry_the_sweeps_name_as_group(tokenizer_dir, data_file, tmp_path, monkeypatch):
    from essence.experiments.sweep import run_sweep

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = tiny_config(tokenizer_dir, data_file)
    from essence.config.load import save_config

    save_config(config, tmp_path / "base.yaml")
    run_sweep(str(tmp_path / "base.yaml"), ["data.truncation.lsp=0.5"], tmp_path / "my-sweep",
              ["train.tracker=wandb", "train.epochs=1"])
    (run, _, _), = _wandb_records(tmp_path / "my-sweep" / "data.truncation.lsp-0.5"
                                  if (tmp_path / "my-sweep" / "data.truncation.lsp-0.5").is_dir()
                                  else next((tmp_path / "my-sweep").glob("*lsp*")))
    assert run.run_group == "my-sweep"


def test_final_summary_and_eval_scores_go_to_every_tracker(tmp_path):
    from essence.train.tracking import MetricsLog

    class Recorder:
        def __init__(self):
            self.logged, self.finished = [], False

        def log(self, values, step):
            self.logged.append((step, values))

        def finish(self):
            self.finished = True

    a, b = Recorder(), Recorder()
    log = MetricsLog(tmp_path, True, trackers=[a, b])
    log.write({"step": 1, "loss": 2.5, "note": "text", "flag": True})
    log.write_final({"steps": 3, "total_flops": 1e9, "device": "cpu",
                     "eval": {"accuracy": 0.5, "heldout": {"accuracy": 0.5, "closed": 0.9}}})
    log.close()
    for tracker in (a, b):
        assert tracker.logged == [(1, {"loss": 2.5}),
                                  (3, {"summary/steps": 3, "summary/total_flops": 1e9, "eval/accuracy": 0.5,
                                       "eval/heldout/accuracy": 0.5, "eval/heldout/closed": 0.9})]
        assert tracker.finished
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": 2.5, "note": "text",
                                                                   "flag": True}
