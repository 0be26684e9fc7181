"""The reference code's optimisation recipe: one-cycle schedule, betas, decay scope, the
sequence-mean loss reduction and the global-batch check (issue 10)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import RECORDS, build_small_tokenizer

from essence.config.load import load_config
from essence.config.schema import LossConfig, TrainConfig
from essence.data.batching import collate
from essence.data.pipeline import DataConfig, prepare
from essence.errors import EssenceError
from essence.models.loading import random_causal_lm
from essence.teacher.sources import OnlineTeacher
from essence.train.setup import build_optimizer, warn_global_batch
from essence.train.step import DistillStep, combine, loss_weights, step_token_counts

TINY = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 512}


def schedule(train: TrainConfig, steps: int) -> list[tuple[float, float]]:
    """(lr, β1) before each of `steps` optimizer steps."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    optimizer, scheduler = build_optimizer(model, train, steps)
    seen = []
    for _ in range(steps):
        group = optimizer.param_groups[0]
        seen.append((group["lr"], group["betas"][0]))
        optimizer.step()
        scheduler.step()
    return seen


def test_one_cycle_follows_torch_defaults_with_momentum_cycling():
    lr = 4e-6
    seen = schedule(TrainConfig(lr=lr, schedule="one_cycle", warmup_ratio=0.1), 100)
    lrs, betas = [s[0] for s in seen], [s[1] for s in seen]
    assert lrs[0] == pytest.approx(lr / 25) and betas[0] == pytest.approx(0.95)
    peak = lrs.index(max(lrs))
    assert peak == 9 and lrs[peak] == pytest.approx(lr) and betas[peak] == pytest.approx(0.85)
    assert lrs[-1] == pytest.approx(lr / (25 * 1e4), rel=0.05) and betas[-1] == pytest.approx(0.95, abs=1e-4)
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))  # rises, then anneals
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))
    cosine = schedule(TrainConfig(lr=lr, warmup_ratio=0.1), 100)
    assert cosine[0][0] == pytest.approx(lr / 10) and cosine[-1][1] == 0.9  # the default differs
    with pytest.raises(EssenceError, match="divide by zero"):
        schedule(TrainConfig(lr=lr, schedule="one_cycle", warmup_ratio=0.1), 10)


def test_betas_and_weight_decay_scope():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    optimizer, _ = build_optimizer(model, TrainConfig(betas=(0.9, 0.999), weight_decay=0.05,
                                                      weight_decay_scope="all"), 10)
    assert [(g["betas"], g["weight_decay"], len(g["params"])) for g in optimizer.param_groups] == [
        ((0.9, 0.999), 0.05, 4)]
    optimizer, _ = build_optimizer(model, TrainConfig(weight_decay=0.05), 10)
    assert [(g["betas"], g["weight_decay"], len(g["params"])) for g in optimizer.param_groups] == [
        ((0.9, 0.95), 0.05, 1), ((0.9, 0.95), 0.0, 3)]
    with pytest.raises(EssenceError, match=r"train.betas=\[0.9\] must be two numbers"):
        load_config(None, ["model.student=x", "loss.kd_ratio=0", "train.betas=[0.9]"])
    with pytest.raises(EssenceError, match="train.betas=1.5 is out of range"):
        load_config(None, ["model.student=x", "loss.kd_ratio=0", "train.betas=[0.9, 1.5]"])


def test_global_batch_warning():
    pinned = TrainConfig(batch_size=1, grad_accum=1, expect_global_batch=4)
    assert warn_global_batch(pinned, 4) is None
    message = warn_global_batch(pinned, 1)
    assert "1 processes × train.batch_size 1 × train.grad_accum 1 = 1" in message
    assert "expects 4" in message
    assert warn_global_batch(TrainConfig(), 3) is None  # nothing pinned: no check


@pytest.fixture(scope="module")
def distill_setup():
    tokenizer = build_small_tokenizer()
    data = DataConfig(source=str(RECORDS / "bespoke_stratos.jsonl"))
    examples = prepare(data, tokenizer).examples
    examples += prepare(DataConfig(source=str(RECORDS / "flat_columns.jsonl")), tokenizer).examples
    student = random_causal_lm(TINY, len(tokenizer), seed=0)
    teacher = OnlineTeacher(random_causal_lm(dict(TINY, hidden_size=24), len(tokenizer), 1),
                            torch.device("cpu"))
    return tokenizer, examples[:4], student, teacher


def gradient(setup, groups, reduction: str) -> torch.Tensor:
    tokenizer, _, student, teacher = setup
    step = DistillStep(student, LossConfig(kd_ratio=0.5, reduction=reduction), len(tokenizer))
    student.zero_grad()
    batches = [collate(g, tokenizer.pad_token_id) for g in groups]
    weights = loss_weights(*step_token_counts(batches, reduction), 0.5)
    for b in batches:
        out = step(b.input_ids, b.attention_mask, b.nll_mask, b.kd_mask,
                   teacher(b.input_ids, b.attention_mask), weights)
        combine(out, weights).backward()
    return torch.cat([p.grad.flatten() for p in student.parameters()])


def test_sequence_reduction_is_the_mean_of_per_sequence_means(distill_setup):
    examples = distill_setup[1]
    assert len({len(e) for e in examples}) == 4  # different lengths: the reductions differ
    together = gradient(distill_setup, [examples], "sequence")
    # Token reduction of one sequence is that sequence's own mean: average those gradients.
    alone = torch.stack([gradient(distill_setup, [[e]], "token") for e in examples]).mean(0)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-7)
    # Still independent of how the step is split into micro-batches.
    split = gradient(distill_setup, [examples[:1], examples[1:3], examples[3:]], "sequence")
    torch.testing.assert_close(split, together, rtol=1e-4, atol=1e-7)
    token = gradient(distill_setup, [examples], "token")
    assert not torch.allclose(token, together, rtol=1e-2, atol=1e-6)


def test_sequence_counts_leave_out_sequences_without_targets(distill_setup):
    tokenizer, examples = distill_setup[:2]
    batch = collate(examples[:2], tokenizer.pad_token_id)
    batch.kd_mask[0] = False  # the first sequence has no KD targets
    assert step_token_counts([batch], "sequence") == (2, 1)
    tokens = step_token_counts([batch])
    assert tokens[0] > 2 and tokens[1] == int(batch.kd_mask[:, 1:].sum())


def test_sequence_reduction_trains_end_to_end(tmp_path):
    tok = tmp_path / "tok"
    build_small_tokenizer().save_pretrained(tok)
    config = load_config(None, [
        f"model.tokenizer={tok}", f"data.source={RECORDS / 'bespoke_stratos.jsonl'}",
        f"model.student_init={json.dumps(TINY)}",
        f"model.teacher_init={json.dumps(dict(TINY, hidden_size=24))}",
        "train.batch_size=3", "train.epochs=2", "train.progress=false", "train.lr=0.01",
        "loss.reduction=sequence", "train.schedule=one_cycle", "train.warmup_ratio=0.3",
        "data.supervision.random_drop=0.5"])
    from essence.train.run import train

    summary = train(config, tmp_path / "run")
    assert summary["steps"] == 2 and summary["final_train_loss"] > 0
