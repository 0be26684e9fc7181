"""Run folders are owned and checkpoints verified: no run destroys another, none resumes damage.

Each case is one a user hits by accident: training again into a finished run, two runs into
one folder, a damaged checkpoint, a half-written metrics line, an --out that cannot be
written. Each must end in a one-line error, a notice, or the right behaviour, never a
traceback or lost results.
"""

import json
import re
import shutil

import pytest
from conftest import BENCHMARKS, metrics, tiny_config

from essence.cli import main
from essence.config.load import save_config
from essence.errors import EssenceError
from essence.models.manifest import MANIFEST, verify
from essence.train.checkpoint import find_checkpoint, prune_checkpoints
from essence.train.run import train
from essence.train.rundir import RunLock

RUN = ["train.max_steps=6", "train.save_every=2", "train.epochs=3"]


@pytest.fixture(scope="module")
def finished(tokenizer_dir, data_file, tmp_path_factory):
    """A finished run (checkpoints at steps 4 and 6, the model, the summary)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    train(tiny_config(tokenizer_dir, data_file, *RUN), run)
    return run


def snapshot(run) -> dict:
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in run.rglob("*") if p.is_file()}


def copy_of(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def cli(*argv, capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_a_finished_run_is_not_trained_over(finished, tokenizer_dir, data_file, tmp_path, capsys):
    run = copy_of(finished, tmp_path)
    before = snapshot(run)
    config = tiny_config(tokenizer_dir, data_file, *RUN, "train.lr=0.02")
    with pytest.raises(EssenceError, match=r"holds another run's results .*--resume .*--overwrite"):
        train(config, run)
    assert snapshot(run) == before
    config_file = tmp_path / "c.yaml"
    save_config(config, config_file)
    code, err = cli("train", config_file, "--out", run, "--resume", "--overwrite", capsys=capsys)
    assert code == 2 and "contradict" in err and snapshot(run) == before
    code, err = cli("train", config_file, "--out", run, "--overwrite", capsys=capsys)
    assert code == 0
    assert json.loads((run / "summary.json").read_text())["final_train_loss"] != json.loads(
        before["summary.json"])["final_train_loss"]


def test_a_locked_folder_is_refused(tokenizer_dir, data_file, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lock = RunLock(run).acquire()
    try:
        with pytest.raises(EssenceError, match=r"in use by another run \(pid \d+ on "):
            train(tiny_config(tokenizer_dir, data_file, "train.max_steps=1"), run)
        assert not (run / "checkpoints").exists()
    finally:
        lock.release()
    train(tiny_config(tokenizer_dir, data_file, "train.max_steps=1"), run)
    assert not (run / ".essence.lock").exists()


def test_prune_keeps_the_highest_step_numbers_up_to_the_current_one(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step-9", "step-000010", "step-100", "step-000012", "notes"):
        (root / name).mkdir(parents=True)
    prune_checkpoints(tmp_path, keep=2, current=12)
    # By name "step-9" > "step-100" > "step-000012"; by number 100 is a stale later point.
    assert sorted(p.name for p in root.iterdir()) == ["notes", "step-000010", "step-000012"]


@pytest.mark.parametrize("damage, problem", [
    ("truncate_weights", r"model.safetensors has \d+ bytes, \d+ were written"),
    ("delete_state", "trainer_state.pt is missing"),
    ("garble_manifest", f"{MANIFEST} is unreadable"),
    ("flip_a_byte", "config.json does not match its checksum"),
    ("flip_a_weight_byte", "model.safetensors does not match its checksum"),
])
def test_a_damaged_checkpoint_is_refused_then_the_one_before_resumes(
        damage, problem, finished, tokenizer_dir, data_file, tmp_path, capsys):
    """A checkpoint that does not match its manifest is never resumed from, nor skipped without
    a word: one line names the file and the way back (delete that folder, or start over)."""
    run = copy_of(finished, tmp_path)
    step6 = run / "checkpoints" / "step-000006"
    if damage == "truncate_weights":
        weights = step6 / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "delete_state":
        (step6 / "trainer_state.pt").unlink()
    elif damage == "garble_manifest":
        (step6 / MANIFEST).write_text("{not json")
    else:
        name = "config.json" if damage == "flip_a_byte" else "model.safetensors"
        blob = bytearray((step6 / name).read_bytes())
        blob[len(blob) // 2] ^= 0x01
        (step6 / name).write_bytes(bytes(blob))
    before = snapshot(run)
    config_file = tmp_path / "c.yaml"
    save_config(tiny_config(tokenizer_dir, data_file, *RUN), config_file)
    code, err = cli("train", config_file, "--out", run, "--resume", capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(rf"checkpoint \S*step-000006 is damaged \({problem}\); delete that folder "
                     r"to resume from step-000004, .*--overwrite", err), err
    assert snapshot(run) == before
    shutil.rmtree(step6)  # what the line says: the run continues from the checkpoint before
    summary = train(tiny_config(tokenizer_dir, data_file, *RUN), run, resume=True)
    assert "step-000004 at step 4/6" in capsys.readouterr().out
    # Steps 5 and 6 were redone and reproduce the uninterrupted run.
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(metrics(finished), metrics(run)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-9)
    assert summary["student_tokens"] == json.loads(
        (finished / "summary.json").read_text())["student_tokens"]
    assert verify(step6) is None


@pytest.mark.parametrize("pointer", ["\x00\xff garbage", "step-000099"])
def test_a_bad_latest_pointer_is_ignored_with_a_notice(pointer, finished, tmp_path):
    run = copy_of(finished, tmp_path)
    (run / "checkpoints" / "latest").write_bytes(pointer.encode("utf-8", "surrogateescape"))
    checkpoint, notes = find_checkpoint(run)
    assert checkpoint.name == "step-000006"
    assert len(notes) == 1 and "checkpoints/latest names" in notes[0]


def test_a_checkpoint_from_before_manifests_is_used_with_a_notice(finished, tmp_path):
    run = copy_of(finished, tmp_path)
    (run / "checkpoints" / "step-000006" / MANIFEST).unlink()
    checkpoint, notes = find_checkpoint(run)
    assert checkpoint.name == "step-000006" and "unverified" in notes[0]
    (run / "checkpoints" / "step-000006" / "trainer_state.pt").unlink()  # and incomplete: refused
    with pytest.raises(EssenceError, match=f"step-000006 is damaged \\({MANIFEST} is missing"):
        find_checkpoint(run)


def test_no_verified_checkpoint_refuses_to_start_over(finished, tokenizer_dir, data_file, tmp_path):
    run = copy_of(finished, tmp_path)
    for step in ("step-000004", "step-000006"):
        (run / "checkpoints" / step / "trainer_state.pt").unlink()
    before = snapshot(run)
    with pytest.raises(EssenceError, match=r"step-000006 is damaged \(trainer_state.pt is missing"
                                           r"\); no earlier checkpoint verifies; or pass "
                                           r"--overwrite"):
        train(tiny_config(tokenizer_dir, data_file, *RUN), run, resume=True)
    assert snapshot(run) == before


def test_a_half_written_metrics_line_is_dropped_with_a_notice(finished, tokenizer_dir, data_file,
                                                             tmp_path, capsys):
    run = copy_of(finished, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step-000006")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][:17])
    capsys.readouterr()
    train(tiny_config(tokenizer_dir, data_file, *RUN), run, resume=True)
    assert "dropped line 6 of" in capsys.readouterr().out
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4, 5, 6]


def test_an_interrupted_folder_swap_is_undone(finished, tmp_path, capsys):
    """Killed between `step-N -> .old-step-N` and `.tmp-step-N -> step-N`: the old one is back."""
    from essence.train.rundir import clean_interrupted_writes

    run = copy_of(finished, tmp_path)
    root = run / "checkpoints"
    (root / "step-000006").rename(root / ".old-step-000006-4242")
    (root / ".tmp-step-000006-4242").mkdir()
    done = clean_interrupted_writes(run)
    assert any("restored" in d for d in done)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000004", "step-000006"]
    assert verify(root / "step-000006") is None


# --out that cannot be used, for every command that writes.
def _bad_outs(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    return {"a file": (a_file, "is a file, not a folder"),
            "below a file": (a_file / "sub", "is below .*a_file, which is a file"),
            "empty": ("", "is empty")}


def test_unusable_out_for_train_eval_report_demo(tokenizer_dir, data_file, finished, tmp_path,
                                                 capsys):
    config_file = tmp_path / "c.yaml"
    save_config(tiny_config(tokenizer_dir, data_file, "train.max_steps=1"), config_file)
    bench = BENCHMARKS / "gsm8k_schema.jsonl"
    commands = {
        "train": ["train", config_file, "--out"],
        "eval": ["eval", "--model", finished / "model", "--bench", bench, "--out"],
        "report": ["report", finished.parent, "--out"],
        "demo": ["demo", "--quick", "--out"],
    }
    for name, argv in commands.items():
        for kind, (out, message) in _bad_outs(tmp_path).items():
            code, err = cli(*argv, out, capsys=capsys)
            assert code == 2, (name, kind, err)
            assert err.count("\n") == 1 and re.search(message, err), err


@pytest.mark.parametrize("command", ["train", "eval", "report", "synth"])
def test_read_only_out(command, tokenizer_dir, data_file, finished, tmp_path, monkeypatch, capsys):
    """Root ignores chmod, so the read-only filesystem is injected at the write probe."""
    monkeypatch.setenv("ESSENCE_FAULT", "write-probe=erofs")
    config_file = tmp_path / "c.yaml"
    save_config(tiny_config(tokenizer_dir, data_file, "train.max_steps=1"), config_file)
    argv = {
        "train": ["train", config_file, "--out", tmp_path / "o"],
        "eval": ["eval", "--model", finished / "model", "--bench",
                 BENCHMARKS / "gsm8k_schema.jsonl",
                 "--out", tmp_path / "o"],
        "report": ["report", finished.parent, "--out", tmp_path / "o"],
        "synth": ["data", "synth", "--n", "3", "--out", tmp_path / "o" / "s.jsonl"],
    }[command]
    code, err = cli(*argv, capsys=capsys)
    assert code == 2 and "Read-only file system" in err and err.count("\n") == 1, err


def test_synth_out_below_a_file_or_a_folder(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    code, err = cli("data", "synth", "--n", "3", "--out", tmp_path / "f" / "s.jsonl", capsys=capsys)
    assert code == 2 and "which is a file" in err
    code, err = cli("data", "synth", "--n", "3", "--out", tmp_path, capsys=capsys)
    assert code == 2 and "is a folder; give a file name" in err


def test_eval_of_a_damaged_model(finished, tmp_path, capsys):
    bench = BENCHMARKS / "gsm8k_schema.jsonl"
    no_tokenizer = tmp_path / "no_tok"
    shutil.copytree(finished / "model", no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink(missing_ok=True)
    code, err = cli("eval", "--model", no_tokenizer, "--bench", bench, "--out", tmp_path / "o",
                    capsys=capsys)
    assert code == 2 and "has no tokenizer files" in err
    truncated = tmp_path / "trunc"
    shutil.copytree(finished / "model", truncated)
    (truncated / "model.safetensors").write_bytes(b"\x00" * 100)
    code, err = cli("eval", "--model", truncated, "--bench", bench, "--out", tmp_path / "o",
                    capsys=capsys)
    assert code == 2 and "is damaged: model.safetensors has 100 bytes" in err
    (truncated / MANIFEST).unlink()  # a folder from elsewhere: the loader's own check
    code, err = cli("eval", "--model", truncated, "--bench", bench, "--out", tmp_path / "o",
                    "--max-new-tokens", "4", capsys=capsys)
    assert code == 2 and "cannot load the model" in err and err.count("\n") == 1


def test_report_skips_damaged_summaries_with_a_warning(finished, tmp_path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(finished, runs / "good")
    for name, text in (("truncated", '{"steps": 3, "student'), ("a_list", "[]"),
                       ("binary", "\udcff\x00")):
        (runs / name).mkdir()
        (runs / name / "summary.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    assert main(["report", str(runs)]) == 0
    out = capsys.readouterr().out
    for name in ("truncated", "a_list", "binary"):
        assert f"warning: skipping {name}" in out
    rows = json.loads((runs / "report.json").read_text())
    assert [r["run"] for r in rows] == ["good"]


def test_demo_never_takes_over_another_folder(tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "summary.json").write_text("{}")
    code, err = cli("demo", "--quick", "--out", other, capsys=capsys)
    assert code == 2 and "holds no demo" in err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "demo.json").write_text(json.dumps({"quick": False, "seed": 0}))
    code, err = cli("demo", "--quick", "--out", mine, capsys=capsys)
    assert code == 2 and "demo run with other settings" in err


def test_eval_benches_are_checked_before_the_models_load(tokenizer_dir, data_file, tmp_path):
    config = tiny_config(tokenizer_dir, data_file, f"eval.benches=[{tmp_path / 'missing.jsonl'}]")
    with pytest.raises(EssenceError, match="missing.jsonl does not exist"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_sweep_resumes_its_own_point_killed_before_any_checkpoint(tmp_path, monkeypatch, capsys):
    import os

    from essence.experiments.sweep import run_sweep
    from essence.faults import EXIT_CODE

    config = "configs/tiny.yaml"
    fast = ["train.epochs=1", "train.progress=false", "train.max_steps=3"]
    grid = ["data.truncation.lsp=0.5"]
    monkeypatch.setenv("ESSENCE_FAULT", "step-2=exit")
    pid = os.fork()
    if pid == 0:
        try:
            run_sweep(config, grid, tmp_path, fast)
        finally:
            os._exit(1)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == EXIT_CODE
    monkeypatch.delenv("ESSENCE_FAULT")
    point = tmp_path / "lsp-0.5"
    assert (point / "metrics.jsonl").read_text() and not (point / "checkpoints").exists()
    assert run_sweep(config, grid, tmp_path, fast) == {"lsp-0.5": "complete"}
    assert [m["step"] for m in metrics(point)] == [1, 2, 3]
    # Another run in a point's folder is never trained over.
    before = snapshot(point)
    with pytest.raises(EssenceError, match="other settings"):
        run_sweep(config, grid, tmp_path, [*fast, "train.lr=0.5"])
    assert snapshot(point) == before


def test_a_full_disk_after_generating_is_one_line(finished, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ESSENCE_FAULT", "write-details.jsonl=enospc")
    code, err = cli("eval", "--model", finished / "model", "--bench",
                    BENCHMARKS / "gsm8k_schema.jsonl", "--out", tmp_path / "o", "--limit", "1",
                    "--max-new-tokens", "2", capsys=capsys)
    last = err.strip().splitlines()[-1]  # above it: the loading and generation progress bars
    assert code == 2 and "Traceback" not in err and last.startswith("essence: error: could not")
    assert "details.jsonl (No space left on device)" in last


def test_a_missing_data_file_fails_before_the_models_load(tokenizer_dir, tmp_path, monkeypatch):
    import essence.train.loop as train_module

    monkeypatch.setattr(train_module, "build_models", lambda *a: pytest.fail("models loaded"))
    config = tiny_config(tokenizer_dir, tmp_path / "train.jsnol")
    with pytest.raises(EssenceError, match=r"train.jsnol does not exist \(did you mean .jsonl\?\)"):
        train(config, tmp_path / "run")
