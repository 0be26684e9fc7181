"""`essence data profile` / `essence data show` through the real command line entry point."""

import json
import shutil

import pytest
from conftest import QWEN3, RECORDS

from essence.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_profile_json(capsys):
    code, out, _ = run(capsys, "data", "profile", str(RECORDS / "bad_records.jsonl"),
                       "--tokenizer", str(QWEN3), "--lsp", "0.5", "--lsp", "1.0", "--json")
    report = json.loads(out)
    assert code == 0 and report["records"] == 1 and report["skipped"] == 5
    assert set(report["segments"]) == {"prompt", "cot", "answer", "total"}
    for stats in report["segments"].values():
        assert set(stats) >= {"mean", "p50", "p90", "max", "total"}
    total = report["segments"]["total"]["total"]
    half = report["truncations"]["lsp=0.5"]
    assert half["kept_fraction"] == pytest.approx((total // 2) / total)
    assert report["truncations"]["lsp=1"]["kept_fraction"] == 1.0
    assert set(half) == {"kept_fraction", "prompt", "cot", "answer"}


def test_profile_statistics_by_hand(capsys, qwen3_tokenizer):
    from essence.data.records import read_records
    from essence.data.render import render

    path = RECORDS / "flat_columns.jsonl"
    lengths = sorted(len(render(r, qwen3_tokenizer).input_ids)
                     for r in read_records(str(path)).records)
    _, out, _ = run(capsys, "data", "profile", str(path), "--tokenizer", str(QWEN3), "--json",
                    "--cot-lead", "0.5", "--window", "0.5", "--window-position", "right")
    total = json.loads(out)["segments"]["total"]
    assert total["max"] == lengths[-1] and total["p50"] == lengths[1]
    assert total["mean"] == pytest.approx(sum(lengths) / 3)
    truncations = json.loads(out)["truncations"]
    assert truncations["cot_lead=0.5"]["answer"] == 1.0
    assert truncations["window=0.5@right"]["answer"] == 1.0


def test_profile_table(capsys, tmp_path, monkeypatch):
    """The first line is a message, never wrapped however long the path (wherever the clone
    lives) or narrow the terminal; tables fit the terminal, so they are read at a set width."""
    path = tmp_path / ("x" * 90) / "openr1_messages.jsonl"
    path.parent.mkdir()
    shutil.copy(RECORDS / "openr1_messages.jsonl", path)
    monkeypatch.setenv("COLUMNS", "40")
    code, out, _ = run(capsys, "data", "profile", str(path), "--tokenizer", str(QWEN3),
                       "--lsp", "0.25")
    assert code == 0 and f"{path}: 3 records read, 0 skipped\n" in out, out
    monkeypatch.setenv("COLUMNS", "120")
    code, out, _ = run(capsys, "data", "profile", str(path), "--tokenizer", str(QWEN3),
                       "--lsp", "0.25")
    assert code == 0 and "lsp=0.25" in out


def test_show_marks_the_cut(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")  # the header and the record are never wrapped
    code, out, _ = run(capsys, "data", "show", str(RECORDS / "flat_columns.jsonl"),
                       "--tokenizer", str(QWEN3), "--index", "2", "--lsp", "0.5")
    assert code == 0 and "keeps 40: prompt 22, cot 18, answer 0" in out and "✂" in out
    assert "least common multiple of 12 and 18" in out


@pytest.mark.parametrize("argv,message", [
    (["data", "profile", "missing.jsonl", "--tokenizer", str(QWEN3)], "missing.jsonl does not exist"),
    (["data", "show", str(RECORDS / "flat_columns.jsonl"), "--tokenizer", str(QWEN3),
      "--index", "9"], "--index 9 is out of range"),
    (["data", "profile", str(RECORDS / "bad_records.jsonl"), "--tokenizer", str(QWEN3),
      "--on-error", "fail"], "bad_records.jsonl row 0: field 'conversations'"),
    (["data", "profile", str(RECORDS / "flat_columns.jsonl"), "--tokenizer", "./no/tokenizer"],
     "tokenizer path ./no/tokenizer does not exist"),
    (["data", "profile", str(RECORDS / "flat_columns.jsonl"), "--tokenizer", str(QWEN3),
      "--lsp", "0"], "lsp must be within"),
])
def test_user_errors_are_one_line(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err and "Traceback" not in err
    assert err.count("\n") == 1
