"""Stops a user makes on purpose, data that changed under --resume, a full disk at the start,
and a second command on the same run folder: one line each, and nothing earlier is lost."""

import json
import shlex
import shutil
import signal
import time

import pytest
from conftest import (
    HeldLock,
    essence_process,
    metrics,
    tiny_config,
    train_interrupted,
    wait_until,
)

from essence.cli import main
from essence.config.load import save_config
from essence.train.run import train

RUN = ["train.max_steps=6", "train.save_every=2", "train.epochs=3", "train.log_every=1",
       "train.cpu_threads=1"]


@pytest.fixture(scope="module")
def straight(tokenizer_dir, data_file, tmp_path_factory):
    """The uninterrupted run every stopped-and-resumed one must reproduce."""
    run = tmp_path_factory.mktemp("straight") / "run"
    train(tiny_config(tokenizer_dir, data_file, *RUN), run)
    return run


def same_losses(a, b) -> None:
    assert [m["step"] for m in metrics(a)] == [m["step"] for m in metrics(b)]
    for x, y in zip(metrics(a), metrics(b)):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6, abs=1e-9)


def start(tmp_path, config, fault: str):
    config_file = tmp_path / "c.yaml"
    save_config(config, config_file)
    run = tmp_path / "run"
    process = essence_process(["train", config_file, "--out", run], fault=fault)
    # Step 2 logged: the run is inside its loop, and step 3 waits at the fault until told.
    wait_until(lambda: (run / "metrics.jsonl").is_file()
               and len((run / "metrics.jsonl").read_text().splitlines()) >= 2, process)
    return run, process


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_saves_at_the_step_boundary_and_the_printed_command_resumes_exactly(
        signum, code, straight, tokenizer_dir, data_file, tmp_path, capsys):
    run, process = start(tmp_path, tiny_config(tokenizer_dir, data_file, *RUN),
                         "step-3=wait-stop")
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    assert f"{signum.name} received: stopping after this step" in err
    last = err.strip().splitlines()[-1]
    resume = (f"essence train {shlex.quote(str(run / 'config.yaml'))} --out "
              f"{shlex.quote(str(run))} --resume")
    assert last == (f"essence: stopped after step 3/6; saved {run / 'checkpoints' / 'step-000003'}. "
                    f"Resume with: {resume}"), err
    assert "Traceback" not in err and not (run / "summary.json").exists()
    assert not (run / ".essence.lock").exists()
    assert main(shlex.split(resume)[1:]) == 0  # the line's own command
    assert "step-000003 at step 3/6" in capsys.readouterr().out
    same_losses(straight, run)
    ours, theirs = (json.loads((r / "summary.json").read_text()) for r in (run, straight))
    assert ours["student_tokens"] == theirs["student_tokens"]


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_checkpoint_before(
        straight, tokenizer_dir, data_file, tmp_path):
    run, process = start(tmp_path, tiny_config(tokenizer_dir, data_file, *RUN), "step-3=hang")
    process.send_signal(signal.SIGINT)
    time.sleep(1.0)  # the first asked for a stop after the step; the step hangs
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert err.strip().splitlines()[-1] == "essence: interrupted", err
    steps = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert steps == ["step-000002"], steps
    train(tiny_config(tokenizer_dir, data_file, *RUN), run, resume=True)
    same_losses(straight, run)


def test_changed_data_is_refused_on_resume_unless_accepted(tokenizer_dir, data_file, tmp_path,
                                                           capsys):
    data = tmp_path / "data.jsonl"
    shutil.copy(data_file, data)
    config = tiny_config(tokenizer_dir, data, "train.max_steps=2", "train.save_every=1",
                         "train.cpu_threads=1")
    run = tmp_path / "run"
    train_interrupted(config, run, after_step=1)  # killed in step 2, checkpoint step-1 kept
    saved = json.loads((run / "data.json").read_text())
    assert saved["size"] == data.stat().st_size and len(saved["sha256"]) == 64
    lines = data.read_text().splitlines(keepends=True)
    data.write_text("".join(lines[1:] + lines[:1]))  # same size, other content
    config_file = tmp_path / "c.yaml"
    save_config(config, config_file)
    capsys.readouterr()
    code = main(["train", str(config_file), "--out", str(run), "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert (f"the run in {run} was trained on other data (data.source {data}: content sha256 "
            f"{saved['sha256'][:12]} -> ") in err
    assert "pass --accept-changed-data" in err and not (run / "summary.json").exists()
    code = main(["train", str(config_file), "--out", str(run), "--resume",
                 "--accept-changed-data"])
    assert code == 0 and "--accept-changed-data: continuing" in capsys.readouterr().out
    assert json.loads((run / "data.json").read_text())["sha256"] != saved["sha256"]


def test_a_full_disk_at_the_run_lock_is_one_line(tokenizer_dir, data_file, tmp_path, capsys,
                                                 monkeypatch):
    config_file = tmp_path / "c.yaml"
    save_config(tiny_config(tokenizer_dir, data_file, "train.max_steps=1"), config_file)
    run = tmp_path / "run"
    monkeypatch.setenv("ESSENCE_FAULT", "write-.essence.lock=enospc")
    code = main(["train", str(config_file), "--out", str(run)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"could not write {run / '.essence.lock'} (No space left on device)" in err
    assert not (run / ".essence.lock").exists() and not (run / "config.yaml").exists()


def test_a_second_command_on_a_run_folder_is_refused_naming_the_first(
        tokenizer_dir, data_file, tmp_path, capsys):
    config_file = tmp_path / "c.yaml"
    save_config(tiny_config(tokenizer_dir, data_file, "train.max_steps=1"), config_file)
    run = tmp_path / "run"
    with HeldLock(run) as other:
        code = main(["train", str(config_file), "--out", str(run)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert f"{run} is in use by another run (pid {other.pid} on " in err
    assert not (run / "config.yaml").exists()
    assert main(["train", str(config_file), "--out", str(run)]) == 0



def test_a_full_disk_during_eval_is_one_line_and_keeps_the_results_before(
        straight, tmp_path, capsys, monkeypatch):
    from conftest import BENCHMARKS

    out = tmp_path / "eval"
    argv = ["eval", "--model", str(straight / "model"), "--bench",
            str(BENCHMARKS / "gsm8k_schema.jsonl"), "--limit", "2", "--max-new-tokens", "4",
            "--out", str(out)]
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    monkeypatch.setenv("ESSENCE_FAULT", "write-details.jsonl=enospc")
    code = main(argv)
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("essence:")]
    assert code == 2 and len(said) == 1 and "Traceback" not in err, err
    assert f"could not write {out / 'details.jsonl'} (No space left on device)" in err
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {name: after[name] for name in before} == before
    assert set(after) - set(before) == {"partial.json", "partial.jsonl"}  # kept for the rerun
