"""The fused loss written plainly, as the reference: full [N, V] logits and autograd.

Tests and bench/loss_memory.py compare ``essence.loss.fused.distill_loss_sums`` against it;
both check their inputs the same way (``_make_spec``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from essence.loss.divergences import (
    IGNORE_INDEX,
    Divergence,
    TeacherLogitsFn,
    _first_columns,
    divergence,
)
from essence.loss.fused import _fp32_region, _make_spec, _Spec
from essence.loss.sparse_kd import SparseTargets, sparse_divergence


def naive_distill_loss_sums(student_hidden: Tensor, student_head: Tensor, teacher_hidden: Tensor | None,
                            teacher_head: Tensor | None, labels: Tensor, nll_mask: Tensor,
                            kd_mask: Tensor, *,
                            kind: Divergence, temperature: float = 1.0, vocab_size: int | None = None,
                            chunk_size: int = 1024, params: dict[str, float] | None = None,
                            teacher_logits_fn: TeacherLogitsFn | None = None,
                            loss_weights: tuple[float, float] | None = None,
                            sparse_teacher: SparseTargets | None = None,
                            row_weights: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """The same sums as distill_loss_sums, written plainly: full [N, V] logits and autograd.

    The reference for tests and bench/loss_memory.py. chunk_size and loss_weights are accepted
    for an identical signature and ignored.
    """
    spec = _make_spec(student_hidden, student_head, teacher_hidden, teacher_head, labels, nll_mask,
                      kd_mask, kind, temperature, vocab_size, chunk_size, params, teacher_logits_fn,
                      None, sparse_teacher, row_weights)
    with _fp32_region(student_hidden.device):
        return _naive_sums(student_hidden, student_head, teacher_hidden, teacher_head, labels,
                           nll_mask, kd_mask, spec, teacher_logits_fn)


def _naive_sums(student_hidden, student_head, teacher_hidden, teacher_head, labels, nll_mask,
                kd_mask, spec: _Spec, teacher_logits_fn) -> tuple[Tensor, Tensor]:
    v = spec.vocab
    logits = student_hidden.float() @ _first_columns(student_head.T, v).float()
    nll_w, kd_w = (1.0, 1.0) if spec.row_weights is None else spec.row_weights
    nll_sum = (F.cross_entropy(logits, labels.where(nll_mask, IGNORE_INDEX), ignore_index=IGNORE_INDEX,
                               reduction="none") * nll_w).sum()
    if not bool(kd_mask.any()):
        return nll_sum, logits.sum() * 0.0
    if spec.sparse is not None:
        per_token = sparse_divergence(logits, spec.sparse, spec.kind, temperature=spec.temperature,
                                      **spec.params)
        return nll_sum, torch.where(kd_mask, per_token * kd_w, 0.0).sum()
    with torch.no_grad():
        if teacher_logits_fn is not None:
            teacher_logits = teacher_logits_fn(torch.arange(student_hidden.shape[0], device=labels.device))
        else:
            teacher_logits = teacher_hidden.float() @ _first_columns(teacher_head.T, v).float()
    per_token = divergence(logits, teacher_logits, spec.kind, temperature=spec.temperature,
                           vocab_size=v, **spec.params)
    return nll_sum, torch.where(kd_mask, per_token * kd_w, 0.0).sum()
