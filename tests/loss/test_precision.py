"""bf16 where users train: autocast around the loss, bf16 weights, gradient checkpointing.

torch runs bf16 autocast on CPU, so every precision path a GPU run takes is exercised here;
the CUDA variants run the same cases when a GPU is present.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_losses import CASES, IDS, assert_same, problem, run

from essence.config.load import load_config
from essence.config.schema import TrainConfig
from essence.loss.fused import distill_loss_sums
from essence.loss.naive import naive_distill_loss_sums
from essence.train.run import train

REPO = Path(__file__).resolve().parents[2]
TINY_YAML = REPO / "configs" / "tiny.yaml"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _on(device: str, inputs: dict) -> dict:
    return {k: v.detach().to(device).requires_grad_(v.requires_grad) for k, v in inputs.items()}


def _in_autocast(fn, device: str):
    def wrapped(**kw):
        with torch.autocast(device, dtype=torch.bfloat16):
            return fn(**kw)
    return wrapped


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("kind", "params"), CASES, ids=IDS)
def test_fused_loss_under_autocast_equals_fp32_naive(kind, params, device):
    """Called inside bf16 autocast, the fused loss is still fp32 arithmetic: value and both
    gradients equal the naive loss computed in fp32 outside any autocast."""
    inputs = _on(device, problem(seed=11))
    kw = dict(kind=kind, temperature=2.0, params=params)
    expected = run(naive_distill_loss_sums, inputs, **kw)
    got = run(_in_autocast(distill_loss_sums, device), inputs, chunk_size=5, **kw)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.float32
    assert_same(got, expected, rtol=1e-5, atol=1e-5)
    combined = run(_in_autocast(distill_loss_sums, device), inputs, chunk_size=5,
                   loss_weights=(0.3, 0.7), **kw)
    assert_same(combined, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "tvd"])
def test_bf16_inputs_under_autocast_get_bf16_gradients(kind, device):
    inputs = _on(device, problem(seed=12, dtype=torch.bfloat16))
    expected = run(naive_distill_loss_sums, inputs, kind=kind)
    got = run(_in_autocast(distill_loss_sums, device), inputs, kind=kind, chunk_size=4)
    assert got[2].dtype == torch.bfloat16 and got[3].dtype == torch.bfloat16
    assert_same(got[:2], expected[:2], rtol=1e-4, atol=1e-4)
    assert_same(got[2:], expected[2:], rtol=2e-2, atol=2e-3)  # one bf16 rounding each


def test_the_students_forward_runs_under_autocast():
    """With mixed_precision=bf16, the student's matmuls inside the wrapped step produce bf16."""
    from essence.models.loading import random_causal_lm
    from essence.models.runtime import make_accelerator
    from essence.train.step import DistillStep

    config = load_config(TINY_YAML)
    accelerator = make_accelerator(TrainConfig(mixed_precision="bf16", cpu_threads=1))
    student = random_causal_lm(config.model.student_init, 400, seed=0)
    seen = []
    student.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda module, args, out: seen.append(out.dtype))
    step = accelerator.prepare(DistillStep(student, config.loss.__class__(kd_ratio=0.0), 400))
    ids = torch.randint(0, 400, (2, 9))
    mask = torch.ones_like(ids, dtype=torch.bool)
    out = step(ids, torch.ones_like(ids), mask, mask)
    assert seen == [torch.bfloat16]
    assert out.nll.dtype == torch.float32 and torch.isfinite(out.nll)
    out.nll.backward()
    assert student.model.embed_tokens.weight.grad.dtype == torch.float32


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fp32") / "run"
    train(load_config(TINY_YAML, ["train.mixed_precision=no", "train.epochs=8",
                                  "train.progress=false"]), out)
    return out


def test_bf16_training_tracks_fp32(fp32_run, tmp_path):
    """configs/tiny.yaml under bf16 autocast: every step's loss within 2% of the fp32 run's, and
    not all identical (autocast really changed the arithmetic)."""
    train(load_config(TINY_YAML, ["train.mixed_precision=bf16", "train.epochs=8",
                                  "train.progress=false"]), tmp_path / "bf16")
    bf16, fp32 = _losses(tmp_path / "bf16"), _losses(fp32_run)
    assert len(bf16) == len(fp32) >= 20
    worst = max(abs(a - b) / abs(b) for a, b in zip(bf16, fp32))
    assert worst < 0.02, worst
    assert bf16 != fp32


def test_bf16_teacher_fp32_student_with_checkpointing(fp32_run, tmp_path, monkeypatch):
    """A bf16 teacher beside an fp32 student, gradient checkpointing and autocast all on."""
    from essence.train import loop as train_module

    built = {}
    original = train_module.build_models

    def spy(*args, **kwargs):
        models = original(*args, **kwargs)
        built.update(checkpointing=models.student.model.gradient_checkpointing,
                     student=models.student.dtype, teacher=models.teacher.model.dtype)
        return models

    monkeypatch.setattr(train_module, "build_models", spy)
    train(load_config(TINY_YAML, [
        "train.mixed_precision=bf16", "train.epochs=8", "train.progress=false",
        "model.teacher_dtype=bfloat16", "model.gradient_checkpointing=true"]), tmp_path / "mixed")
    assert built == {"checkpointing": True, "student": torch.float32, "teacher": torch.bfloat16}
    got, fp32 = _losses(tmp_path / "mixed"), _losses(fp32_run)
    assert len(got) == len(fp32) and all(torch.isfinite(torch.tensor(got)))
    # The teacher's bf16 weights change the KD targets a little, not the run.
    assert max(abs(a - b) / abs(b) for a, b in zip(got, fp32)) < 0.05


def test_bf16_student_weights_train(tmp_path):
    """model.dtype=bfloat16: bf16 weights and bf16 gradients from the fp32 loss."""
    summary = train(load_config(TINY_YAML, ["model.dtype=bfloat16", "train.mixed_precision=bf16",
                                            "train.max_steps=4", "train.progress=false"]),
                    tmp_path / "bf16w")
    losses = _losses(tmp_path / "bf16w")
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert summary["final_train_loss"] == losses[-1]
