"""Fault injection: kills at seeded points, full and read-only disks at every write site.

ESSENCE_FAULT (essence.faults) makes the process os._exit at a named point, or a write raise
ENOSPC/EROFS there; this machine may run as root, where chmod does not stop a write, so the
errors are injected. Kills run training in a forked child, so nothing of the child's cleanup
(finally blocks, lock release, buffered writes) runs: the same as kill -9.

The CI set is five kill points and the write sites of one run (~40 s). Every kill point:
    ESSENCE_LONG_TESTS=1 .venv/bin/pytest tests/train/test_faults.py -m slow
"""

import os

import pytest
from conftest import metrics, tiny_config

from essence.errors import EssenceError
from essence.faults import EXIT_CODE
from essence.models.manifest import verify
from essence.train.checkpoint import find_checkpoint
from essence.train.run import train

LONG = os.environ.get("ESSENCE_LONG_TESTS") == "1"
# max_steps=6, checkpoints at 2 and 4, then the final one at 6 and the model.
RUN = ["train.max_steps=6", "train.save_every=2", "train.epochs=3"]
CI_KILLS = ["step-3", "save-4-state", "save-4-rename", "save-4-latest", "save-model-rename"]
MORE_KILLS = ["step-1", "step-6", "save-2-model", "save-2-manifest", "save-4-prune",
              "save-6-state", "save-model-model", "save-model-manifest", "write-summary.json",
              "write-metrics.jsonl", "write-config.yaml", "write-latest"]


@pytest.fixture(scope="module")
def straight(tokenizer_dir, data_file, tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce."""
    run = tmp_path_factory.mktemp("straight") / "run"
    summary = train(tiny_config(tokenizer_dir, data_file, *RUN), run)
    return run, summary


def killed_at(point: str, config, run_dir, monkeypatch) -> int:
    """Train in a forked child that dies at `point`; returns its exit status."""
    monkeypatch.setenv("ESSENCE_FAULT", f"{point}=exit")
    pid = os.fork()
    if pid == 0:  # the child: train until the fault kills it
        try:
            train(config, run_dir)
        finally:
            os._exit(1)  # the point was never reached
    _, status = os.waitpid(pid, 0)
    monkeypatch.delenv("ESSENCE_FAULT")
    return os.waitstatus_to_exitcode(status)


def check_kill_then_resume(point, tokenizer_dir, data_file, straight, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    config = tiny_config(tokenizer_dir, data_file, *RUN)
    assert killed_at(point, config, run_dir, monkeypatch) == EXIT_CODE
    resumed = train(config, run_dir, resume=True)
    base_dir, base = straight
    assert [m["step"] for m in metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(metrics(base_dir), metrics(run_dir)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-9), point
    assert resumed["final_train_loss"] == pytest.approx(base["final_train_loss"], rel=1e-6)
    assert resumed["student_tokens"] == base["student_tokens"]
    # Nothing half written survives, and what is left verifies.
    root = run_dir / "checkpoints"
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000004", "step-000006"]
    assert verify(root / "step-000006") is None and verify(run_dir / "model") is None


@pytest.mark.parametrize("point", CI_KILLS)
def test_kill_then_resume_reproduces_the_run(point, tokenizer_dir, data_file, straight, tmp_path,
                                             monkeypatch):
    check_kill_then_resume(point, tokenizer_dir, data_file, straight, tmp_path, monkeypatch)


@pytest.mark.slow
@pytest.mark.skipif(not LONG, reason="every kill point: set ESSENCE_LONG_TESTS=1")
@pytest.mark.parametrize("point", MORE_KILLS)
def test_kill_then_resume_every_point(point, tokenizer_dir, data_file, straight, tmp_path,
                                      monkeypatch):
    check_kill_then_resume(point, tokenizer_dir, data_file, straight, tmp_path, monkeypatch)


def test_a_kill_mid_save_leaves_a_temp_folder_that_the_next_run_removes(
        tokenizer_dir, data_file, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    config = tiny_config(tokenizer_dir, data_file, *RUN)
    assert killed_at("save-4-rename", config, run_dir, monkeypatch) == EXIT_CODE
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert leftovers and leftovers[0].startswith(".tmp-step-000004")
    # The killed run's lock died with it: resuming is allowed, and cleans up first.
    train(config, run_dir, resume=True)
    out = capsys.readouterr().out
    assert "removed the unfinished .tmp-step-000004" in out
    assert "resumed from" in out and "step-000002" in out


# Every place a run writes, in the order a run reaches them.
WRITE_SITES = ["write-probe", "write-config.yaml", "write-metrics.jsonl", "save-2-model",
               "save-2-state", "save-2-manifest", "write-latest", "save-4-state",
               "save-model-model", "save-model-manifest", "write-summary.json"]


@pytest.mark.parametrize("site", WRITE_SITES)
def test_full_disk_at_each_write_site(site, tokenizer_dir, data_file, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    config = tiny_config(tokenizer_dir, data_file, *RUN)
    monkeypatch.setenv("ESSENCE_FAULT", f"{site}=enospc")
    with pytest.raises(EssenceError) as info:
        train(config, run_dir)
    message = str(info.value)
    assert "\n" not in message and "No space left on device" in message
    # No false promise: a message says a checkpoint is intact only when one is.
    step, _ = find_checkpoint(run_dir)
    if "intact" in message:
        assert step is not None and step.name in message and verify(step) is None
    if site.startswith("save-2") or site in ("write-probe", "write-config.yaml"):
        assert "intact" not in message
    assert not list(run_dir.glob("checkpoints/.tmp-*")) and not list(run_dir.glob(".tmp-*"))
    assert not (run_dir / ".essence.lock").exists()
    # Space freed, --resume finishes the run from what survived.
    monkeypatch.delenv("ESSENCE_FAULT")
    summary = train(config, run_dir, resume=True)
    assert summary["steps"] == 6 and verify(run_dir / "model") is None


@pytest.mark.parametrize("fault", ["erofs", "torch-enospc"])
def test_read_only_disk_and_torch_save_errors(fault, tokenizer_dir, data_file, tmp_path,
                                             monkeypatch):
    """torch.save reports a full disk as RuntimeError, not OSError; a read-only disk is EROFS."""
    run_dir = tmp_path / "run"
    monkeypatch.setenv("ESSENCE_FAULT", f"save-4-state={fault}")
    with pytest.raises(EssenceError,
                       match=r"could not write .*step-000004 .*step-000002 is intact"):
        train(tiny_config(tokenizer_dir, data_file, *RUN), run_dir)
    assert verify(run_dir / "checkpoints" / "step-000002") is None


def test_too_little_free_space_fails_before_training(tokenizer_dir, data_file, tmp_path,
                                                     monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("essence.train.rundir.shutil.disk_usage", lambda _: usage(10**9, 10**9, 1000))
    with pytest.raises(EssenceError, match=r"has 1000 B free, but one checkpoint needs about"):
        train(tiny_config(tokenizer_dir, data_file, *RUN), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_a_non_finite_loss_before_any_checkpoint_claims_none(tokenizer_dir, data_file, tmp_path):
    config = tiny_config(tokenizer_dir, data_file, "train.lr=1e30", "train.max_grad_norm=null",
                         "train.max_steps=5")
    with pytest.raises(EssenceError, match="no checkpoint of this run had been written yet"):
        train(config, tmp_path / "nan")
