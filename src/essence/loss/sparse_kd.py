"""KD against a sparse teacher: its top-k tokens plus one tail bucket, or tokens it sampled.

A cached teacher (essence.teacher.cache_format) keeps, per target position, either

- **top-k**: the k most likely token ids, their log-probabilities log p_T^τ and the log of the
  mass outside them ("tail"), or
- **sampled**: the distinct ids of m tokens drawn from p_T^τ, their frequencies c/m and their
  teacher log-probabilities.

Top-k, every divergence. Both distributions are collapsed onto k + 1 buckets — the k ids and
the tail — and the divergence (essence.loss.divergences, the one implementation of the family) is taken
over those buckets. The student's tail bucket is exact (a log-sum-exp over the other V − k
logits). With k = V the tail is empty (log 0 = −inf), contributes nothing and the loss is the
dense one. Coarsening loses information, so for forward KL the bucket value is a lower bound on
the dense KL (log-sum inequality); the gap is the part of the teacher's tail that differs from
the student's tail *shape*, which bench/teacher_cache.py measures against k.

Temperature. The cache stores p_T^τ at the experiment's τ (loss.temperature when it is built),
and the loss must use that τ: targets stored at another τ are refused. The top-k ids are the same
at every τ and their ratios follow exactly (log p_T / τ up to a constant), but the tail's mass at
another τ depends on how the tail is spread, which the cache does not keep. The obvious model (an
even spread over the V − k tail tokens: log tail_τ = tail/τ + (1 − 1/τ)·log(V − k)) was measured
at τ = 2 on SmolLM2 and was 29–67 % off in gradient for k = 128…8 (bench/RESULTS.md), so no
approximation is offered: a cache serves one temperature, exactly.

Sampled, forward KL only. With ŵ = c/m, the estimate Σ ŵ (log p_T − log p_S) is unbiased for
KL(p_T‖p_S) and its gradient p_S − ŵ is unbiased for p_S − p_T, whatever m (tests check this by
exact enumeration). It is noisy where top-k is biased; the samples come from p_T at the cache's
build temperature, so training must use that τ.

Gradients. Let ℓ_b be the student's bucket log-probs, G = ∂D/∂ℓ_b (autograd on the small
[rows, k+1] tensor, ℓ_b treated as free variables), b = z/τ, p = p_S. With ℓ_i = b_i − lse(b)
for a kept id and ℓ_tail = lse_tail(b) − lse(b),

    ∂D/∂b_j = G_j·[j kept] + G_tail·[j in tail]·p_j / P_tail − p_j·Σ_b G_b.

For sampled forward KL, ∂D/∂b = p_S·Σŵ − ŵ scattered onto the sampled ids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from essence.loss.divergences import _divergence_values

# Log-probabilities of empty buckets (log 0 = −inf) are raised to this finite floor before the
# divergence, so that 0·log 0 terms give 0, not NaN; exp(FLOOR) is exactly 0 in fp32.
FLOOR = -1.0e4


@dataclass
class SparseTargets:
    """Sparse teacher targets, one row per target position.

    ids: [N, k] long token ids. logp: [N, k] fp32 teacher log-probabilities log p_T^τ. tail: [N]
    fp32 log teacher mass outside ids (top-k; −inf when empty), None when sampled. weights:
    [N, k] fp32 sample frequencies c/m (0 on padding entries), None for top-k. temperature: the
    τ of p_T^τ the targets hold; the loss must use the same.
    """

    ids: Tensor
    logp: Tensor
    tail: Tensor | None
    weights: Tensor | None
    temperature: float = 1.0

    @property
    def sampled(self) -> bool:
        return self.weights is not None

    def positions(self, rows: Tensor) -> "SparseTargets":
        """Targets per token [batch, seq, k] (tail [batch, seq]) → the [N, k] rows of positions
        0..seq−2 that rows [batch·(seq−1)] bool selects, as the loss flattens a batch."""
        flat = lambda t: None if t is None else t[:, :-1].reshape(-1, *t.shape[2:])[rows]  # noqa: E731
        return SparseTargets(flat(self.ids), flat(self.logp), flat(self.tail), flat(self.weights),
                             self.temperature)

    def rows(self, index: Tensor) -> "SparseTargets":
        """The targets of the rows `index` [c]."""
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return SparseTargets(self.ids[index], self.logp[index], pick(self.tail), pick(self.weights),
                             self.temperature)


def narrow_topk(ids: Tensor, logp: Tensor, tail: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top-k' < k targets from top-k ones sorted by probability: the dropped ids join the
    tail (exact). ids, logp: [N, k]; tail: [N]."""
    if k >= ids.shape[1]:
        return ids, logp, tail
    dropped = torch.logsumexp(logp[:, k:].float(), dim=1)
    return ids[:, :k], logp[:, :k], torch.logaddexp(tail.float(), dropped)


def check_sparse(targets: SparseTargets, kind: str, temperature: float, n: int, width: int) -> None:
    """ValueError unless the targets fit the loss: row count n, ids below width, kind allowed."""
    if targets.ids.dim() != 2 or targets.ids.shape[0] != n or targets.logp.shape != targets.ids.shape:
        raise ValueError(f"sparse teacher ids {tuple(targets.ids.shape)} and logp "
                         f"{tuple(targets.logp.shape)} must both be [{n}, k]")
    if targets.ids.numel() and int(targets.ids.max()) >= width:
        raise ValueError(f"sparse teacher ids reach {int(targets.ids.max())}, outside the compared "
                         f"vocabulary of {width}")
    if targets.temperature != temperature:
        raise ValueError(f"the sparse teacher targets hold p_T at τ={targets.temperature}, the loss "
                         f"uses τ={temperature}; build the cache at the loss's temperature")
    if targets.sampled and kind != "forward_kl":
        raise ValueError(f"sampled teacher targets give an unbiased estimate of forward_kl only, "
                         f"not {kind!r}; use a top-k cache for other divergences")


def teacher_buckets(targets: SparseTargets) -> Tensor:
    """Teacher log-probs over the k + 1 buckets, renormalised (fp16 storage rounds): [N, k+1]."""
    return torch.log_softmax(torch.cat([targets.logp.float(), targets.tail.float()[:, None]], 1), 1)


def _topk_divergence_and_grad(ls: Tensor, targets: SparseTargets, kind: str, params: dict[str, float],
                              temperature: float) -> tuple[Tensor, Tensor]:
    ids, k = targets.ids, targets.ids.shape[1]
    lt = teacher_buckets(targets)
    rest = ls.scatter(1, ids, -math.inf)                       # student log-probs of tail tokens
    l_tail = torch.logsumexp(rest, dim=1)                      # −inf when k = V
    ls_b = torch.cat([ls.gather(1, ids), l_tail[:, None]], dim=1)
    with torch.enable_grad():
        free = ls_b.clamp(min=FLOOR).requires_grad_(True)
        value = _divergence_values(free, lt.clamp(min=FLOOR), kind, params)
        (g,) = torch.autograd.grad(value.sum(), free)
    value = value.detach()
    grad = ls.exp().mul_(-g.sum(1, keepdim=True))              # −p_j·Σ G
    grad.scatter_add_(1, ids, g[:, :k])                        # + G_j on kept ids
    safe_tail = torch.where(torch.isinf(l_tail), 0.0, l_tail)
    share = rest.sub_(safe_tail[:, None]).exp_()               # p_j / P_tail on tail tokens, else 0
    return value, grad.add_(share.mul_(g[:, k:]))


def _sampled_divergence_and_grad(ls: Tensor, targets: SparseTargets) -> tuple[Tensor, Tensor]:
    w = targets.weights.float()
    value = (w * (targets.logp.float() - ls.gather(1, targets.ids))).sum(1)
    grad = ls.exp().mul_(w.sum(1, keepdim=True))
    return value, grad.scatter_add_(1, targets.ids, -w)


def sparse_divergence_and_grad(ls: Tensor, targets: SparseTargets, kind: str, params: dict[str, float],
                               temperature: float) -> tuple[Tensor, Tensor]:
    """D per row and ∂D/∂b (b = student logits / τ), without the τ factors, like the dense
    essence.loss.gradients._divergence_and_grad.

    ls: [c, V] fp32 student log-probs at τ (read only); targets: c rows. Returns value [c] and
    gradient [c, V] fp32.
    """
    if targets.sampled:
        return _sampled_divergence_and_grad(ls, targets)
    return _topk_divergence_and_grad(ls, targets, kind, params, temperature)


def sparse_divergence(student_logits: Tensor, targets: SparseTargets, kind: str, *,
                      temperature: float = 1.0, **params: float) -> Tensor:
    """The per-token sparse divergence, τ²-scaled, differentiable by autograd (reference/tests).

    student_logits: [N, V]. Returns [N] fp32.
    """
    from essence.loss.divergences import divergence_params

    p = divergence_params(kind, params)
    ls = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    if targets.sampled:
        w = targets.weights.float()
        return (w * (targets.logp.float() - ls.gather(1, targets.ids))).sum(1) * temperature**2
    k = targets.ids.shape[1]
    if k < ls.shape[1]:
        l_tail = torch.logsumexp(ls.scatter(1, targets.ids, -math.inf), 1, keepdim=True)
    else:  # no tail: a constant, so autograd never sees a log-sum-exp of nothing
        l_tail = ls.new_full((ls.shape[0], 1), -math.inf)
    ls_b = torch.cat([ls.gather(1, targets.ids), l_tail], dim=1)
    lt = teacher_buckets(targets)
    assert ls_b.shape[1] == k + 1
    return _divergence_values(ls_b.clamp(min=FLOOR), lt.clamp(min=FLOOR), kind, p) * temperature**2
