"""The training loss: NLL + KD fused with both LM heads, chunked over tokens.

``distill_loss_sums`` starts from the final hidden states and the LM-head weights, walks the
supervised tokens in chunks, and never holds [tokens × vocab] for the whole micro-batch.
``essence.loss.naive`` is the same loss written plainly (full logits, autograd); tests and
bench/loss_memory.py compare the two. Divergence conventions: see ``essence.loss.divergences``.

Gradients: see ``essence.loss.gradients``.

Memory of the fused loss: per chunk three to five [chunk, vocab] fp32 buffers (logits of both
models plus scratch), the gradients it accumulates ([tokens, hidden] and [vocab, hidden] in
fp32, one set per loss unless ``loss_weights`` is given), and fp32 copies of LM heads that
are not fp32 already.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from essence.loss.divergences import (
    IGNORE_INDEX,
    Divergence,
    TeacherLogitsFn,
    _check_temperature,
    _compared_width,
    divergence_params,
)
from essence.loss.gradients import _divergence_and_grad
from essence.loss.sparse_kd import (
    SparseTargets,
    check_sparse,
    sparse_divergence_and_grad,
)

# ---------------------------------------------------------------------------------------------
# One chunk of tokens


@dataclass(frozen=True)
class _Spec:
    """The checked, non-tensor-gradient arguments of one distill_loss_sums call."""

    kind: str
    params: dict[str, float]
    temperature: float
    vocab: int
    chunk_size: int
    teacher_hidden: Tensor | None
    teacher_head: Tensor | None
    teacher_logits_fn: TeacherLogitsFn | None
    loss_weights: tuple[float, float] | None
    sparse: SparseTargets | None = None
    row_weights: tuple[Tensor, Tensor] | None = None


def _chunk_terms(z: Tensor, zt: Tensor | None, labels: Tensor, nll_rows: Tensor, kd_rows: Tensor,
                 spec: _Spec) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Per-token NLL and KD of one chunk, and their gradients w.r.t. the student logits.

    z: [c, V] fp32 student logits, overwritten (it becomes the NLL gradient).
    zt: [c, V] fp32 teacher logits, overwritten; None when no row is in kd_rows.
    labels: [c]; nll_rows, kd_rows: [c] bool, or float per-row weights (zero outside the rows).
    Returns nll [c], kd [c] (zero outside their rows; kd τ²-scaled), g_nll [c, V] or None,
    g_kd [c, V] or None (zero outside their rows).
    """
    tau = spec.temperature
    log_p1 = z.sub_(torch.logsumexp(z, -1, keepdim=True))     # log_softmax(z) at τ = 1
    nll, kd = z.new_zeros(z.shape[0]), z.new_zeros(z.shape[0])
    g_nll = g_kd = None
    if zt is not None:
        ls = log_p1 if tau == 1.0 else torch.log_softmax(log_p1 / tau, dim=-1)
        if isinstance(zt, SparseTargets):  # a cached teacher: top-k + tail, or samples
            kd, g_kd = sparse_divergence_and_grad(ls, zt, spec.kind, spec.params, tau)
        else:
            lt = zt if tau == 1.0 else zt.div_(tau)
            lt = lt.sub_(torch.logsumexp(lt, -1, keepdim=True))
            kd, g_kd = _divergence_and_grad(ls, lt, spec.kind, spec.params)
            del lt
        del ls
        kd = kd.mul_(tau**2).mul_(kd_rows)
        g_kd = g_kd.mul_(kd_rows[:, None] * tau)
    if bool(nll_rows.any()):
        target = labels.clamp(min=0)[:, None]  # rows outside nll_rows are zeroed below
        nll = -log_p1.gather(1, target).squeeze(1) * nll_rows
        g_nll = log_p1.exp_().scatter_add_(1, target, torch.full_like(target, -1.0, dtype=z.dtype))
        g_nll = g_nll.mul_(nll_rows[:, None])
    return nll, kd, g_nll, g_kd


def _fresh_fp32(x: Tensor) -> Tensor:
    """x as a new contiguous fp32 tensor that the caller may overwrite."""
    if x.dtype != torch.float32:
        return x.to(torch.float32)
    return x.clone(memory_format=torch.contiguous_format)


def _teacher_logits(idx: Tensor, spec: _Spec, teacher_head32: Tensor | None) -> Tensor:
    """Teacher logits of the tokens idx [c] as a fresh [c, V] fp32 buffer (no grad)."""
    if spec.sparse is not None:
        return spec.sparse.rows(idx)
    if spec.teacher_logits_fn is not None:
        out = spec.teacher_logits_fn(idx)
        if out.dim() != 2 or out.shape[0] != idx.numel() or out.shape[1] < spec.vocab:
            raise ValueError(f"teacher_logits_fn returned shape {tuple(out.shape)} for {idx.numel()} "
                             f"tokens; expected [{idx.numel()}, >= {spec.vocab}] (pass vocab_size "
                             "when the teacher is narrower than the student)")
        return _fresh_fp32(out[:, :spec.vocab])
    assert spec.teacher_hidden is not None and teacher_head32 is not None, "teacher checked in _make_spec"
    return spec.teacher_hidden[idx].float() @ teacher_head32.T


class _Gradients:
    """fp32 gradients per stream (NLL and KD, or one combined), filled chunk by chunk.

    hidden[s]: [N, H]; head[s]: [V_s, H] (rows past the compared vocabulary stay 0); None while
    stream s has had no tokens, or when that gradient is not wanted.
    """

    def __init__(self, streams: int, student_hidden: Tensor, student_head: Tensor, head32: Tensor,
                 want_hidden: bool, want_head: bool):
        self.hidden: list[Tensor | None] = [None] * streams
        self.head: list[Tensor | None] = [None] * streams
        self._shapes = (student_hidden.shape, student_head.shape)
        self._head32, self._want = head32, (want_hidden, want_head)

    def add(self, s: int, g: Tensor | None, idx: Tensor, h: Tensor) -> None:
        """Add stream s's logit gradient g [c, V] (None: nothing) of the tokens idx [c], whose
        fp32 hidden states are h [c, H]."""
        if g is None:
            return
        if self._want[0]:
            if self.hidden[s] is None:
                self.hidden[s] = g.new_zeros(self._shapes[0])
            self.hidden[s].index_copy_(0, idx, g @ self._head32)  # each token is in one chunk
        if self._want[1]:
            if self.head[s] is None:
                self.head[s] = g.new_zeros(self._shapes[1])
            self.head[s][:g.shape[1]].addmm_(g.T, h)


def _fp32_region(device: torch.device):
    """Autocast off: an enclosing bf16 autocast would otherwise run the logit and gradient
    matmuls in bf16 (and refuse to add their bf16 results into fp32 accumulators)."""
    return torch.autocast(device_type=device.type, enabled=False)


@torch.no_grad()
def _fused_forward(student_hidden: Tensor, student_head: Tensor, labels: Tensor, nll_mask: Tensor,
                   kd_mask: Tensor, spec: _Spec, want_hidden: bool,
                   want_head: bool) -> tuple[Tensor, Tensor, _Gradients]:
    """Walk the supervised tokens chunk by chunk; sum the losses, accumulate their gradients.

    Returns nll_sum, kd_sum (fp32 scalars) and the gradients of each stream: NLL and KD, or
    one combined stream when spec.loss_weights is set. All arithmetic is fp32, whatever
    autocast context the caller is in.
    """
    with _fp32_region(student_hidden.device):
        return _fused_forward_fp32(student_hidden, student_head, labels, nll_mask, kd_mask, spec,
                                   want_hidden, want_head)


def _fused_forward_fp32(student_hidden: Tensor, student_head: Tensor, labels: Tensor,
                        nll_mask: Tensor, kd_mask: Tensor, spec: _Spec, want_hidden: bool,
                        want_head: bool) -> tuple[Tensor, Tensor, _Gradients]:
    head32 = student_head[:spec.vocab].float()  # fp32 arithmetic for bf16 heads; no copy when fp32
    teacher_head32 = None if spec.teacher_head is None else spec.teacher_head[:spec.vocab].float()
    grads = _Gradients(2 if spec.loss_weights is None else 1, student_hidden, student_head, head32,
                       want_hidden, want_head)
    nll_sum = kd_sum = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
    rows = torch.nonzero(nll_mask | kd_mask).squeeze(1)
    nll_w, kd_w = (nll_mask, kd_mask) if spec.row_weights is None else (
        spec.row_weights[0].float() * nll_mask, spec.row_weights[1].float() * kd_mask)
    for start in range(0, rows.numel(), spec.chunk_size):
        idx = rows[start:start + spec.chunk_size]
        h = student_hidden[idx].float()
        zt = _teacher_logits(idx, spec, teacher_head32) if bool(kd_mask[idx].any()) else None
        nll, kd, g_nll, g_kd = _chunk_terms(h @ head32.T, zt, labels[idx], nll_w[idx], kd_w[idx], spec)
        del zt
        nll_sum, kd_sum = nll_sum + nll.sum(), kd_sum + kd.sum()
        if spec.loss_weights is not None:
            # One combined logit gradient: half the gradient matmuls and one [V, H] accumulator.
            w_nll, w_kd = spec.loss_weights
            if g_nll is None or g_kd is None:
                g_nll = g_kd.mul_(w_kd) if g_nll is None else g_nll.mul_(w_nll)
            else:
                g_nll = g_nll.mul_(w_nll).add_(g_kd, alpha=w_kd)
            g_kd = None  # its buffer is freed before the gradient matmuls
        grads.add(0, g_nll, idx, h)
        grads.add(1, g_kd, idx, h)
        # Free this chunk's [c, V] buffers before the next chunk allocates its own.
        del g_nll, g_kd
    return nll_sum, kd_sum, grads


def _weighted_scale(g_nll: Tensor, g_kd: Tensor, weights: tuple[float, float]) -> float:
    """The s with (g_nll, g_kd) = s·(w_nll, w_kd), checking the loss combined the sums as promised."""
    w_nll, w_kd = weights
    gn, gk = float(g_nll), float(g_kd)
    s = gn / w_nll if abs(w_nll) >= abs(w_kd) else gk / w_kd
    tol = 1e-6 * abs(s) * max(abs(w_nll), abs(w_kd))
    if not (math.isclose(gn, s * w_nll, rel_tol=1e-4, abs_tol=tol)
            and math.isclose(gk, s * w_kd, rel_tol=1e-4, abs_tol=tol)):
        raise ValueError(f"distill_loss_sums(loss_weights={weights}) expects the loss to be "
                         f"s·({w_nll}·nll_sum + {w_kd}·kd_sum), but the gradients arriving are "
                         f"{gn} and {gk}; pass the weights the loss uses, or loss_weights=None")
    return s


def _scaled_sum(parts: list[Tensor | None], scales: list[Tensor | float],
                dtype: torch.dtype) -> Tensor | None:
    """Σ scale·part over the streams that got tokens, in the first part's storage, cast to dtype."""
    total = None
    for part, scale in zip(parts, scales):
        if part is None:
            continue
        total = part.mul_(scale) if total is None else total.add_(part.mul_(scale))
    return None if total is None else total.to(dtype)


class _FusedDistillLoss(torch.autograd.Function):
    """Linear + loss fused: the forward pass computes the gradients; backward only scales them."""

    @staticmethod
    def forward(ctx, student_hidden, student_head, labels, nll_mask, kd_mask, spec):
        nll_sum, kd_sum, ctx.grads = _fused_forward(student_hidden, student_head, labels, nll_mask,
                                                    kd_mask, spec, *ctx.needs_input_grad[:2])
        ctx.loss_weights = spec.loss_weights
        ctx.dtypes = (student_hidden.dtype, student_head.dtype)
        return nll_sum, kd_sum

    @staticmethod
    @once_differentiable
    def backward(ctx, g_nll, g_kd):
        if ctx.grads is None:
            raise RuntimeError("backward ran twice through distill_loss_sums: its stored gradients "
                               "are used up (retain_graph is not supported); recompute the loss")
        if ctx.loss_weights is None:
            scales = [g_nll, g_kd]
        else:
            scales = [_weighted_scale(g_nll, g_kd, ctx.loss_weights)]
        grad_hidden = _scaled_sum(ctx.grads.hidden, scales, ctx.dtypes[0])
        grad_head = _scaled_sum(ctx.grads.head, scales, ctx.dtypes[1])
        ctx.grads = None
        return grad_hidden, grad_head, None, None, None, None


# ---------------------------------------------------------------------------------------------
# Public loss functions


def _make_spec(student_hidden: Tensor, student_head: Tensor, teacher_hidden: Tensor | None,
               teacher_head: Tensor | None, labels: Tensor, nll_mask: Tensor, kd_mask: Tensor,
               kind: str, temperature: float, vocab_size: int | None, chunk_size: int,
               params: dict[str, float] | None, teacher_logits_fn: TeacherLogitsFn | None,
               loss_weights: tuple[float, float] | None,
               sparse_teacher: SparseTargets | None = None,
               row_weights: tuple[Tensor, Tensor] | None = None) -> _Spec:
    """Check every argument of distill_loss_sums once; ValueError names the culprit."""
    p = divergence_params(kind, params)
    _check_temperature(temperature)
    if (student_hidden.dim() != 2 or student_head.dim() != 2
            or student_head.shape[1] != student_hidden.shape[1]):
        raise ValueError(f"student_hidden {tuple(student_hidden.shape)} and student_head "
                         f"{tuple(student_head.shape)} must be [tokens, hidden] and [vocab, hidden]")
    n = student_hidden.shape[0]
    for name, t in (("labels", labels), ("nll_mask", nll_mask), ("kd_mask", kd_mask)):
        if t.shape != (n,):
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [{n}] (one per token)")
    if nll_mask.dtype != torch.bool or kd_mask.dtype != torch.bool:
        raise ValueError(f"nll_mask and kd_mask must be bool tensors, got {nll_mask.dtype} "
                         f"and {kd_mask.dtype}")
    if (teacher_hidden is None) != (teacher_head is None):
        raise ValueError("pass teacher_hidden and teacher_head together, or neither")
    if teacher_logits_fn is not None and teacher_hidden is not None:
        raise ValueError("pass either teacher_hidden/teacher_head or teacher_logits_fn, not both")
    if teacher_hidden is not None and (teacher_hidden.dim() != 2 or teacher_hidden.shape[0] != n
                                       or teacher_head.dim() != 2
                                       or teacher_head.shape[1] != teacher_hidden.shape[1]):
        raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} and teacher_head "
                         f"{tuple(teacher_head.shape)} must be [{n}, hidden] and [vocab, hidden]")
    if sparse_teacher is not None and (teacher_hidden is not None or teacher_logits_fn is not None):
        raise ValueError("pass one teacher: sparse_teacher, teacher_hidden/teacher_head or "
                         "teacher_logits_fn")
    if teacher_hidden is None and teacher_logits_fn is None and sparse_teacher is None \
            and bool(kd_mask.any()):
        raise ValueError("kd_mask selects tokens but no teacher was given (teacher_hidden and "
                         "teacher_head, or teacher_logits_fn)")
    v = _compared_width(student_head.shape[0], None if teacher_head is None else teacher_head.shape[0],
                        vocab_size)
    targets = labels[nll_mask]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= v):
        raise ValueError(f"labels under nll_mask must lie in [0, {v}) (the compared vocabulary), "
                         f"found {int(targets.min())}..{int(targets.max())}; {IGNORE_INDEX} marks "
                         "a position without a target and must be outside nll_mask")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer")
    if loss_weights is not None:
        if len(loss_weights) != 2 or not all(math.isfinite(w) for w in loss_weights) \
                or all(w == 0 for w in loss_weights):
            raise ValueError(f"loss_weights={loss_weights!r} must be two finite numbers, not both 0")
        loss_weights = (float(loss_weights[0]), float(loss_weights[1]))
    if sparse_teacher is not None:
        check_sparse(sparse_teacher, kind, temperature, n, v)
    if row_weights is not None:
        if len(row_weights) != 2 or any(w.shape != (n,) or not w.is_floating_point()
                                        or not bool(torch.isfinite(w).all()) or bool((w < 0).any())
                                        for w in row_weights):
            raise ValueError(f"row_weights must be two [{n}] float tensors of finite weights ≥ 0 "
                             "(NLL and KD weight per token)")
    return _Spec(kind, p, float(temperature), v, chunk_size, teacher_hidden, teacher_head,
                 teacher_logits_fn, loss_weights, sparse_teacher, row_weights)


def distill_loss_sums(student_hidden: Tensor, student_head: Tensor, teacher_hidden: Tensor | None,
                      teacher_head: Tensor | None, labels: Tensor, nll_mask: Tensor, kd_mask: Tensor, *,
                      kind: Divergence, temperature: float = 1.0, vocab_size: int | None = None,
                      chunk_size: int = 1024, params: dict[str, float] | None = None,
                      teacher_logits_fn: TeacherLogitsFn | None = None,
                      loss_weights: tuple[float, float] | None = None,
                      sparse_teacher: SparseTargets | None = None,
                      row_weights: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Summed NLL and τ²-scaled KD over the masked tokens, chunked so memory is O(chunk × vocab).

    sparse_teacher: [N, k] cached teacher targets instead of a dense teacher (essence.loss.sparse_kd).
    row_weights: (nll_w, kd_w), each [N] float ≥ 0: weigh each token's NLL and KD in the sums
    (None: every masked token weighs 1), e.g. 1/(the sequence's target count) for sums of
    per-sequence means in one call.

    student_hidden: [N, H] final hidden states (any float dtype); student_head: [V_s, H] LM-head
    weight. teacher_hidden: [N, H_t] and teacher_head: [V_t, H_t], or None when kd_mask is empty
    or teacher_logits_fn gives the teacher logits instead (token indices [c] → logits [c, V_t]).
    labels: [N] next-token ids, -100 where there is none; nll_mask, kd_mask: [N] bool.
    Only the first vocab_size columns (default min(V_s, V_t); V_s with teacher_logits_fn) are
    used, by the NLL too. The teacher is never differentiated.

    Returns (nll_sum, kd_sum): fp32 scalars, differentiable w.r.t. student_hidden and
    student_head. The caller divides by the whole optimizer step's token counts. The gradients
    are computed during this call and stored, one set per sum, so that any combination of the
    two sums back-propagates correctly. A caller that already knows its combination
    loss = s·(w_nll·nll_sum + w_kd·kd_sum) may pass loss_weights=(w_nll, w_kd): the two
    gradients are then combined per chunk, halving the gradient matmuls and the stored [V, H]
    gradient; backward checks that the arriving gradients have that ratio. Backward may run once.
    """
    spec = _make_spec(student_hidden, student_head, teacher_hidden, teacher_head, labels, nll_mask,
                      kd_mask, kind, temperature, vocab_size, chunk_size, params, teacher_logits_fn,
                      loss_weights, sparse_teacher, row_weights)
    grad_wanted = torch.is_grad_enabled() and (student_hidden.requires_grad or student_head.requires_grad)
    if not grad_wanted:
        nll_sum, kd_sum, _ = _fused_forward(student_hidden, student_head, labels, nll_mask, kd_mask,
                                            spec, False, False)
        return nll_sum, kd_sum
    return _FusedDistillLoss.apply(student_hidden, student_head, labels, nll_mask, kd_mask, spec)
