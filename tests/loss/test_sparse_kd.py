"""Sparse KD (top-k + tail bucket, and sampled forward KL) against formulas written out here."""

import itertools
import math

import pytest
import torch

from essence.loss.divergences import DIVERGENCES, divergence, divergence_params
from essence.loss.sparse_kd import (
    SparseTargets,
    sparse_divergence,
    sparse_divergence_and_grad,
)

PARAMS = {"forward_kl": {}, "reverse_kl": {}, "tvd": {}, "combined_kl": {"forward_ratio": 0.3},
          "js": {"beta": 0.4}, "skew_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}


def kl(p, q):
    return (p * (p.log() - q.log())).sum(-1)


def written_out(q_s, q_t, kind, p):
    """The divergences over probability vectors, in plain probability space (DESIGN.md)."""
    if kind == "forward_kl":
        return kl(q_t, q_s)
    if kind == "reverse_kl":
        return kl(q_s, q_t)
    if kind == "combined_kl":
        r = p["forward_ratio"]
        return r * kl(q_t, q_s) + (1 - r) * kl(q_s, q_t)
    if kind == "js":
        b = p["beta"]
        m = b * q_t + (1 - b) * q_s
        return b * kl(q_t, m) + (1 - b) * kl(q_s, m)
    if kind == "tvd":
        return 0.5 * (q_t - q_s).abs().sum(-1)
    if kind == "skew_kl":
        return kl(q_t, p["alpha"] * q_t + (1 - p["alpha"]) * q_s)
    return kl(q_s, p["alpha"] * q_s + (1 - p["alpha"]) * q_t)


def topk_targets(teacher_logits, k, tau=1.0):
    """Top-k ids, their log-probs at τ and the log of the remaining mass."""
    logp = torch.log_softmax(teacher_logits.double() / tau, -1)
    top, ids = logp.topk(k, dim=-1)
    tail = torch.log1p(-top.exp().sum(-1).clamp(max=1.0))
    return SparseTargets(ids, top.float(), tail.float(), None, tau)


def fused_value_and_grad(z, targets, kind, tau):
    """What the fused loss computes per token: τ²·D and ∂(τ²·D)/∂z = τ·∂D/∂b."""
    ls = torch.log_softmax(z / tau, -1)
    params = divergence_params(kind, PARAMS[kind])
    value, grad_b = sparse_divergence_and_grad(ls, targets, kind, params, tau)
    return value * tau**2, grad_b * tau


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_topk_buckets_match_the_written_formula(kind, tau):
    torch.manual_seed(0)
    n, vocab, k = 5, 40, 6
    z = torch.randn(n, vocab, dtype=torch.float64) * 2
    teacher = torch.randn(n, vocab) * 2
    targets = topk_targets(teacher, k, tau)

    # The buckets, written out: student probabilities at τ on the k ids, 1 − their sum as tail;
    # the teacher tempered exactly from its full logits.
    z_ref = z.clone().requires_grad_(True)
    ps = torch.softmax(z_ref / tau, -1)
    top_s = ps.gather(1, targets.ids)
    q_s = torch.cat([top_s, 1 - top_s.sum(1, keepdim=True)], 1)
    pt = torch.softmax(teacher.double() / tau, -1)
    top_t = pt.gather(1, targets.ids)
    q_t = torch.cat([top_t, 1 - top_t.sum(1, keepdim=True)], 1)
    expected = written_out(q_s, q_t, kind, PARAMS[kind]) * tau**2
    expected.sum().backward()

    value, grad = fused_value_and_grad(z.float(), targets, kind, tau)
    torch.testing.assert_close(value.double(), expected.detach(), rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(grad.double(), z_ref.grad, rtol=2e-3, atol=1e-6)
    auto = sparse_divergence(z.float(), targets, kind, temperature=tau, **PARAMS[kind])
    torch.testing.assert_close(auto.double(), expected.detach(), rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_k_equal_to_vocabulary_is_the_dense_loss(kind):
    torch.manual_seed(1)
    n, vocab = 4, 12
    z = torch.randn(n, vocab) * 2
    teacher = torch.randn(n, vocab) * 2
    targets = topk_targets(teacher, vocab, 1.5)
    assert torch.isinf(targets.tail).all() or (targets.tail < -15).all()
    z_ref = z.clone().requires_grad_(True)
    dense = divergence(z_ref, teacher, kind, temperature=1.5, **PARAMS[kind])
    dense.sum().backward()
    value, grad = fused_value_and_grad(z, targets, kind, 1.5)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(value, dense.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, z_ref.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_empty_or_tiny_tails_give_no_nan(kind):
    n = 3
    z = torch.tensor([[30.0] + [-30.0] * 9, [0.0] * 10, [-5.0] * 9 + [40.0]])
    ids = torch.tensor([[0, 1, 2, 3]] * 3)
    logp = torch.log_softmax(torch.tensor([[50.0, 0.0, -10.0, -20.0]] * 3), -1)
    tails = torch.tensor([-math.inf, -200.0, -1e-30])  # empty, tiny, and almost all the mass
    targets = SparseTargets(ids, logp, tails, None, 1.0)
    value, grad = fused_value_and_grad(z, targets, kind, 1.0)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    assert (value >= -1e-6).all()
    # The gradient w.r.t. logits of a softmax sums to zero per row.
    torch.testing.assert_close(grad.sum(1), torch.zeros(n), atol=1e-5, rtol=0)


def test_sampled_forward_kl_is_unbiased_by_exact_enumeration():
    """E over every multiset of m draws from p_T of the estimate equals the dense value and
    gradient: enumerate all outcomes with their multinomial probabilities."""
    torch.manual_seed(2)
    vocab, m, tau = 3, 4, 1.5
    z = torch.randn(1, vocab, dtype=torch.float64)
    teacher = torch.randn(1, vocab, dtype=torch.float64)
    log_pt = torch.log_softmax(teacher / tau, -1)[0]
    expected_value = divergence(z, teacher, "forward_kl", temperature=tau)[0].double()
    dense_grad = tau * (torch.softmax(z / tau, -1) - torch.softmax(teacher / tau, -1))[0]

    mean_value, mean_grad, total = 0.0, torch.zeros(vocab, dtype=torch.float64), 0.0
    for draw in itertools.product(range(vocab), repeat=m):   # every ordered draw, equally weighted
        prob = math.prod(float(log_pt[i].exp()) for i in draw)
        counts = torch.bincount(torch.tensor(draw), minlength=vocab)
        ids = torch.nonzero(counts).squeeze(1)
        targets = SparseTargets(ids[None], log_pt[ids][None].float(), None,
                                (counts[ids].double() / m)[None].float(), tau)
        value, grad = fused_value_and_grad(z.float(), targets, "forward_kl", tau)
        mean_value += prob * float(value[0])
        mean_grad += prob * grad[0].double()
        total += prob
    assert total == pytest.approx(1.0)
    assert mean_value == pytest.approx(float(expected_value), rel=1e-5)
    torch.testing.assert_close(mean_grad, dense_grad, rtol=1e-5, atol=1e-6)
    # And one draw alone is not the dense gradient (the estimator is noisy, not exact).
    assert not torch.allclose(grad[0].double(), dense_grad, atol=1e-3)


@pytest.mark.parametrize("kind", ["forward_kl", "js"])
def test_fused_sparse_loss_equals_the_plain_one_and_refuses_another_temperature(kind):
    """distill_loss_sums with sparse targets (chunked, analytic gradients) against the plain
    autograd version; targets stored at one τ are refused by a loss at another."""
    from essence.loss.fused import distill_loss_sums
    from essence.loss.naive import naive_distill_loss_sums

    torch.manual_seed(3)
    n, hidden, vocab, k, tau = 11, 8, 30, 5, 2.0
    h = torch.randn(n, hidden)
    head = torch.randn(vocab, hidden)
    labels = torch.randint(0, vocab, (n,))
    nll_mask = torch.rand(n) > 0.3
    kd_mask = torch.rand(n) > 0.3
    targets = topk_targets(torch.randn(n, vocab) * 2, k, tau)
    results = []
    for loss in (distill_loss_sums, naive_distill_loss_sums):
        hh, ww = h.clone().requires_grad_(True), head.clone().requires_grad_(True)
        nll, kd = loss(hh, ww, None, None, labels, nll_mask, kd_mask, kind=kind, temperature=tau,
                       chunk_size=4, sparse_teacher=targets)
        (0.3 * nll + 0.7 * kd).backward()
        results.append((nll.detach(), kd.detach(), hh.grad, ww.grad))
    for fused, plain in zip(*results):
        torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5)
    assert results[0][1] > 0
    with pytest.raises(ValueError, match="hold p_T at τ=2.0, the loss uses τ=1.0"):
        distill_loss_sums(h, head, None, None, labels, nll_mask, kd_mask, kind=kind,
                          sparse_teacher=targets)
