import json
from pathlib import Path

import pytest
import yaml

from essence.errors import EssenceError
from essence.experiments.report import build_report, collect
from essence.experiments.sweep import parse_grid, point_status, run_sweep

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
FAST = ["train.epochs=1", "train.progress=false", "train.save_every=1"]


def test_grid_is_a_product_with_readable_names():
    points = parse_grid(["data.truncation.lsp=1.0,0.5", "loss.divergence=forward_kl,js"])
    assert [p.name for p in points] == [
        "lsp-1.0__divergence-forward_kl", "lsp-1.0__divergence-js",
        "lsp-0.5__divergence-forward_kl", "lsp-0.5__divergence-js"]
    with pytest.raises(EssenceError, match="no values"):
        parse_grid(["data.truncation.lsp="])


def test_bad_grid_value_fails_before_any_training(tmp_path):
    with pytest.raises(EssenceError, match=r"lsp=1.5 is out of range"):
        run_sweep(str(CONFIG), ["data.truncation.lsp=1.0,1.5"], tmp_path, FAST)
    assert not any(tmp_path.glob("*/summary.json"))


def test_sweep_resumes_an_interrupted_point_and_retries_a_failed_one(tmp_path, monkeypatch):
    grid = ["data.truncation.lsp=1.0,0.5,0.25"]
    from essence.train import loop as train_module

    original = train_module.Trainer.optimizer_step

    def dying(self, batches):
        if self.config.data.truncation.lsp == 0.5 and self.step == 2:
            raise KeyboardInterrupt  # the machine went away in the middle of point 2
        return original(self, batches)

    monkeypatch.setattr(train_module.Trainer, "optimizer_step", dying)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(str(CONFIG), grid, tmp_path, FAST)
    monkeypatch.setattr(train_module.Trainer, "optimizer_step", original)
    assert point_status(tmp_path / "lsp-1.0") == "complete"
    assert point_status(tmp_path / "lsp-0.5") == "partial"
    first_summary = (tmp_path / "lsp-1.0" / "summary.json").read_text()

    from essence.train import run as run_module

    real_train = run_module.train

    def failing(config, out_dir, resume=False):
        if config.data.truncation.lsp == 0.25:
            raise EssenceError("simulated failure")
        return real_train(config, out_dir, resume)

    monkeypatch.setattr(run_module, "train", failing)
    results = run_sweep(str(CONFIG), grid, tmp_path, FAST)
    assert results == {"lsp-1.0": "complete (skipped)", "lsp-0.5": "complete",
                       "lsp-0.25": "failed: simulated failure"}
    assert (tmp_path / "lsp-1.0" / "summary.json").read_text() == first_summary
    steps = [json.loads(l)["step"] for l in (tmp_path / "lsp-0.5" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # resumed from its step-2 checkpoint, nothing logged twice
    assert point_status(tmp_path / "lsp-0.25") == "failed"

    monkeypatch.setattr(run_module, "train", real_train)
    results = run_sweep(str(CONFIG), grid, tmp_path, FAST)
    assert results["lsp-0.25"] == "complete" and results["lsp-1.0"] == "complete (skipped)"
    assert not (tmp_path / "lsp-0.25" / "failed.json").exists()


def fake_run(root: Path, name: str, lsp, accuracy, tokens, flops, time_s, memory):
    run = root / name
    run.mkdir(parents=True)
    summary = {"eval": {"benchmarks": {"heldout": {"pass@1": accuracy}}}}
    if lsp is not None:
        summary.update(truncation=f"lsp={lsp:g}", steps=10, student_tokens=tokens,
                       total_flops=flops, wall_time_s=time_s, peak_memory_bytes=memory)
        (run / "config.yaml").write_text(yaml.safe_dump({"data": {"truncation": {"lsp": lsp}}}))
    (run / "summary.json").write_text(json.dumps(summary))


def test_report_computes_retention_and_savings(tmp_path):
    fake_run(tmp_path, "lsp-1.0", 1.0, 0.80, 1000, 8e12, 100.0, 4 * 2**30)
    fake_run(tmp_path, "lsp-0.5", 0.5, 0.76, 500, 4e12, 52.0, 2.5 * 2**30)
    fake_run(tmp_path, "base-student", None, 0.10, None, None, None, None)
    rows = build_report(tmp_path)
    by_run = {r["run"]: r for r in rows}
    half = by_run["lsp-0.5"]
    assert half["retention_pct"] == pytest.approx(95.0)
    assert half["token_saving_pct"] == pytest.approx(50.0)
    assert half["flops_saving_pct"] == pytest.approx(50.0)
    assert half["time_saving_pct"] == pytest.approx(48.0)
    assert half["memory_saving_pct"] == pytest.approx(37.5)
    assert by_run["base-student"]["retention_pct"] == pytest.approx(12.5)
    assert by_run["base-student"]["flops_saving_pct"] is None
    assert [r["run"] for r in rows] == ["lsp-1.0", "lsp-0.5", "base-student"]
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(rows))
    markdown = (tmp_path / "report.md").read_text()
    assert "| lsp-0.5 | lsp=0.5 | 0.5 | 76.0% | 95.0% |" in markdown
    for png in ("accuracy_vs_flops.png", "accuracy_vs_lsp.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_report_errors(tmp_path):
    with pytest.raises(EssenceError, match="not a directory"):
        collect(tmp_path / "nope")
    with pytest.raises(EssenceError, match="no run under"):
        collect(tmp_path)
    fake_run(tmp_path, "a", 1.0, 0.5, 10, 1.0, 1.0, 1)
    with pytest.raises(EssenceError, match="--baseline 'b' is not a run here"):
        collect(tmp_path, baseline="b")


def test_the_first_table_names_the_cheapest_run_keeping_95_percent_beside_the_paper():
    from essence.experiments.report import headline

    rows = [{"run": "lsp-1.0", "retention_pct": 100.0, "flops_saving_pct": 0.0},
            {"run": "lsp-0.5", "retention_pct": 12.0, "flops_saving_pct": 56.0},
            {"run": "cot_lead-0.5", "retention_pct": 96.0, "flops_saving_pct": 38.0},
            {"run": "base-student", "retention_pct": 13.0, "flops_saving_pct": None}]
    text = headline(rows)
    assert text.startswith("**cot_lead-0.5** is the cheapest run here keeping ≥ 95%: 96% at "
                           "0.62× the FLOPs of LSP 1.0.")
    table = text.split("\n\n")[1].splitlines()
    assert table[2] == "| the paper: LSP 0.5 (Qwen3-8B → 4B) | ~94% | ~0.50× |"
    assert table[3:] == ["| lsp-0.5 | 12% | 0.44× |", "| cot_lead-0.5 | 96% | 0.62× |",
                         "| lsp-1.0 | 100% | 1.00× |"]
    rows[2]["retention_pct"] = 90.0
    assert headline(rows).startswith("No run cheaper than LSP 1.0 keeps 95% here; the best is "
                                     "**cot_lead-0.5**, 90% at 0.62× the FLOPs.")
