"""`essence demo --quick` end to end: shipped models, synthetic data, sweep, evaluation, report."""

import json

import pytest

from essence.cli import main


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    rows = {r["run"]: r for r in json.loads((tmp_path / "report.json").read_text())}
    assert set(rows) == {"lsp-1.0", "lsp-0.5", "cot_lead-0.5", "base-student", "teacher"}
    for row in rows.values():
        assert 0.0 <= row["accuracy"] <= 1.0
    assert rows["teacher"]["accuracy"] >= 0.9  # the shipped teacher solves the task
    half = rows["lsp-0.5"]
    assert half["token_saving_pct"] == pytest.approx(50, abs=2)
    assert 40 < half["flops_saving_pct"] < 60 and half["time_saving_pct"] is not None
    assert rows["lsp-1.0"]["retention_pct"] == pytest.approx(100.0)
    assert rows["base-student"]["flops_saving_pct"] is None
    for name in ("report.md", "accuracy_vs_flops.png", "accuracy_vs_lsp.png"):
        assert (tmp_path / name).is_file()
    derivations = json.loads((tmp_path / "derivations.json").read_text())  # working right, per run
    assert set(derivations) == set(rows) and derivations["teacher"] >= rows["teacher"]["accuracy"] - 0.1
    details = (tmp_path / "runs" / "lsp-1.0" / "eval" / "details.jsonl").read_text().splitlines()
    assert len(details) == 40
    capsys.readouterr()

    # A second run finds every point complete and rebuilds the same report.
    before = (tmp_path / "report.json").read_text()
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "lsp-0.5: complete" in out and "base-student already evaluated" in out
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(before)

    # Deterministic for a seed: a fresh run elsewhere measures the same tokens and accuracy.
    assert main(["demo", "--quick", "--out", str(tmp_path / "again")]) == 0
    again = {r["run"]: r for r in json.loads((tmp_path / "again" / "report.json").read_text())}
    for name, row in rows.items():
        assert (again[name]["accuracy"], again[name]["student_tokens"], again[name]["total_flops"]) \
            == (row["accuracy"], row["student_tokens"], row["total_flops"]), name
