"""A stopped `essence eval` keeps its finished batches and the same command resumes them: the
results equal an uninterrupted evaluation's."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import torch
from conftest import essence_process, wait_until
from transformers import Qwen3Config, Qwen3ForCausalLM

from essence.cli import main


def model_dir(tmp_path: Path, tokenizer) -> Path:
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=151936, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=8, max_position_embeddings=512, tie_word_embeddings=True)
    path = tmp_path / "model"
    Qwen3ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def bench(tmp_path: Path) -> Path:
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps({"problem": f"What is {k} + {k}?", "answer": str(2 * k)})
                            + "\n" for k in range(1, 7)))
    return path


def without_times(summary: dict) -> dict:
    for scores in summary["benchmarks"].values():
        scores.pop("time_s")
    return summary


def test_a_stopped_eval_resumes_to_the_uninterrupted_results(qwen3_tokenizer, tmp_path, capsys):
    model, problems = model_dir(tmp_path, qwen3_tokenizer), bench(tmp_path)
    args = ["eval", "--model", str(model), "--bench", str(problems), "--n", "2",
            "--batch-size", "2", "--max-new-tokens", "6", "--instruction", ""]
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    out = tmp_path / "stopped"
    # Batches 0 and 1 finish; batch 2 waits at the fault for the signal, finishes, and the
    # evaluation stops before batch 3 with 3 of 6 batches kept.
    process = essence_process([*args, "--out", out], fault="generate-batch-2=wait-stop")
    partial = out / "partial.jsonl"
    wait_until(lambda: partial.is_file() and len(partial.read_text().splitlines()) >= 4, process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert err.strip().splitlines()[-1] == (
        f"essence: stopped: 6 responses are kept in {partial}. Resume with: the same essence "
        "eval command"), err
    assert not (out / "summary.json").exists() and "Traceback" not in err
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 0
    assert f"resuming: 6 responses kept in {partial}" in capsys.readouterr().out
    assert (out / "details.jsonl").read_text() == (tmp_path / "straight" / "details.jsonl").read_text()
    ours, theirs = (json.loads((d / "summary.json").read_text()) for d in (out, tmp_path / "straight"))
    assert without_times(ours) == without_times(theirs)
    assert not partial.exists() and not (out / "partial.json").exists()


def test_a_finished_eval_run_again_generates_again(qwen3_tokenizer, tmp_path, capsys,
                                                   monkeypatch):
    """Only a stopped evaluation is resumed: the same command after a finished one (perhaps
    on a retrained model at the same path) generates everything again."""
    from essence.eval import generate

    model, problems = model_dir(tmp_path, qwen3_tokenizer), bench(tmp_path)
    args = ["eval", "--model", str(model), "--bench", str(problems), "--max-new-tokens", "4",
            "--out", str(tmp_path / "o")]
    assert main(args) == 0
    calls = []
    original = generate.generate_hf
    monkeypatch.setattr("essence.eval.run.generate_hf",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    assert main(args) == 0 and calls == [1]
    assert "resuming" not in capsys.readouterr().out
