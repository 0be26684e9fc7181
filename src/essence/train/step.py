"""The per-batch math of distillation: student forward, teacher targets, chunked loss sums.

``DistillStep`` is the module accelerate wraps (DDP and friends), so the loss is computed
inside the wrapped forward and gradient synchronisation sees every parameter. It returns
loss *sums*; the loop divides them once per optimizer step by the step's token counts (with
loss.reduction: sequence, sums of per-sequence means, divided by the step's sequence counts).
A lead_then_student batch (essence.train.sampling) adds a third sum, the KD over its sampled
continuation under its own divergence, divided by the step's continuation token count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from essence.config.schema import LossConfig
from essence.loss.fused import distill_loss_sums
from essence.models.sharding import full_weight
from essence.teacher.sources import TeacherOutput


@dataclass
class LossSums:
    """Summed (not averaged) NLL and KD over one micro-batch's supervised targets."""

    nll: torch.Tensor
    kd: torch.Tensor
    continuation: torch.Tensor | None = None
    """KD over a sampled continuation's targets (sampling.method lead_then_student), else None."""


def targets(batch_ids: torch.Tensor, attention: torch.Tensor, nll_mask: torch.Tensor,
            kd_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token labels and the two masks for positions 0..T-2 (each predicts t+1).

    All: [batch, seq-1]; a position is masked out where its target is padding, or (packed rows,
    position_ids given) where its target starts the next sequence.
    """
    real = attention[:, 1:].bool()
    if position_ids is not None:
        real = real & (position_ids[:, 1:] > 0)
    return batch_ids[:, 1:], nll_mask[:, 1:] & real, kd_mask[:, 1:] & real


def step_token_counts(batches, reduction: str = "token") -> tuple[int, int]:
    """NLL and KD target counts of the micro-batches of one optimizer step (this process).

    reduction "sequence" counts the sequences that have at least one target of each term
    instead, the denominators of a mean of per-sequence means.
    """
    nll = kd = 0
    for batch in batches:
        _, n, k = targets(batch.input_ids, batch.attention_mask, batch.nll_mask, batch.kd_mask,
                          getattr(batch, "position_ids", None))
        if reduction == "sequence":
            n, k = n.any(1), k.any(1)
        nll += int(n.sum())
        kd += int(k.sum())
    return nll, kd


class DistillStep(torch.nn.Module):
    """Wraps the student so that forward(batch tensors, teacher output) → loss sums."""

    def __init__(self, student: torch.nn.Module, loss: LossConfig, vocab_size: int,
                 continuation_divergence: str = "reverse_kl",
                 continuation_params: dict[str, float] | None = None):
        super().__init__()
        self.student = student
        self.loss = loss
        self.vocab_size = vocab_size
        self.continuation_divergence = continuation_divergence
        self.continuation_params = dict(continuation_params or {})

    @property
    def _no_split_modules(self):
        """The student's decoder-layer classes: accelerate's FSDP2 makes each one a unit and leaves
        the embeddings, final norm and LM head to this root unit (see essence.models.sharding)."""
        return getattr(self.student, "_no_split_modules", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                nll_mask: torch.Tensor, kd_mask: torch.Tensor,
                teacher: TeacherOutput | None = None,
                weights: tuple[float, float] | None = None,
                continuation_mask: torch.Tensor | None = None,
                continuation_weight: float | None = None,
                position_ids: torch.Tensor | None = None) -> LossSums:
        """Loss sums of one micro-batch; `weights` = the caller's (w_nll, w_kd) combination,
        which lets the fused loss combine its two gradients per chunk (continuation_weight: the
        same for the continuation term, whose targets continuation_mask [batch, seq] marks)."""
        body = self.student.get_decoder()
        # position_ids: a packed row's positions, restarting at 0 for each sequence. With no 2-D
        # mask transformers then builds a block-diagonal causal mask (or runs varlen flash
        # attention where installed), so attention stays within each sequence.
        hidden = body(input_ids=input_ids,
                      attention_mask=attention_mask if position_ids is None else None,
                      position_ids=position_ids, use_cache=False).last_hidden_state
        labels, nll, kd = targets(input_ids, attention_mask, nll_mask, kd_mask, position_ids)
        if teacher is None or self.loss.kd_ratio == 0:
            kd = torch.zeros_like(kd)
        rows = (nll | kd).reshape(-1)
        head = full_weight(self.student.get_output_embeddings().weight)  # whole under FSDP2 too
        sparse = teacher.sparse if teacher is not None else None  # a cached teacher's targets
        dense = teacher is not None and sparse is None

        def sums(rows: torch.Tensor, weights, row_weights=None) -> tuple[torch.Tensor, torch.Tensor]:
            """NLL and KD sums over the positions `rows` ([batch·(seq-1)] bool), each token
            weighed by row_weights (two [batch·(seq-1)] float tensors; None: 1)."""
            flat = lambda t: t[:, :-1].reshape(-1, t.shape[-1])[rows]  # noqa: E731
            return distill_loss_sums(
                flat(hidden), head,
                flat(teacher.hidden) if dense else None,
                teacher.head if dense else None,
                labels.reshape(-1)[rows], nll.reshape(-1)[rows], kd.reshape(-1)[rows],
                kind=self.loss.divergence, temperature=self.loss.temperature,
                vocab_size=self.vocab_size, chunk_size=self.loss.chunk_size,
                params=dict(self.loss.params), loss_weights=weights,
                sparse_teacher=sparse.positions(rows) if sparse is not None else None,
                row_weights=None if row_weights is None else tuple(w[rows] for w in row_weights),
            )

        if self.loss.reduction == "sequence" and bool(rows.any()):
            return sequence_means(nll, kd, sums, weights)
        if continuation_mask is None:
            return LossSums(*sums(rows, weights))
        # lead_then_student: the lead's terms, then the continuation's KD with its own divergence.
        out = LossSums(*sums(rows, None if weights == (0.0, 0.0) else weights))
        cont = (continuation_mask[:, 1:] & attention_mask[:, 1:].bool()).reshape(-1)
        if teacher is not None and bool(cont.any()):
            flat = lambda t: t[:, :-1].reshape(-1, t.shape[-1])[cont]  # noqa: E731
            w = None if not continuation_weight else (0.0, continuation_weight)
            _, out.continuation = distill_loss_sums(
                flat(hidden), head, flat(teacher.hidden), teacher.head, labels.reshape(-1)[cont],
                torch.zeros_like(cont[cont]), torch.ones_like(cont[cont]),
                kind=self.continuation_divergence, temperature=self.loss.temperature,
                vocab_size=self.vocab_size, chunk_size=self.loss.chunk_size,
                params=dict(self.continuation_params), loss_weights=w)
        return out


def sequence_means(nll: torch.Tensor, kd: torch.Tensor, sums, weights) -> LossSums:
    """loss.reduction: sequence — Σ over sequences of each term's mean over that sequence's
    own targets (nll, kd: [batch, seq-1] target masks; sums(rows, weights, row_weights) → the
    two sums), in one fused-loss call: each token weighs 1 / its sequence's target count.

    The loop divides these by the step's count of sequences with targets for each term, as
    it divides token sums by token counts.
    """
    per_sequence = lambda mask: (1.0 / mask.sum(1, keepdim=True).clamp(min=1)).expand(mask.shape)  # noqa: E731
    row_weights = (per_sequence(nll).reshape(-1), per_sequence(kd).reshape(-1))
    return LossSums(*sums((nll | kd).reshape(-1), weights, row_weights))


def loss_weights(n_nll: int, n_kd: int, kd_ratio: float) -> tuple[float, float]:
    """(w_nll, w_kd) so that loss = w_nll·NLL_sum + w_kd·KD_sum = (1-λ)·mean NLL + λ·mean KD."""
    w_nll = (1.0 - kd_ratio) / n_nll if n_nll else 0.0
    w_kd = kd_ratio / n_kd if kd_ratio > 0 and n_kd else 0.0
    return w_nll, w_kd


def continuation_count(batches) -> int:
    """Continuation-term targets of the micro-batches of one optimizer step (this process)."""
    return sum(int((b.continuation_mask[:, 1:] & b.attention_mask[:, 1:].bool()).sum())
               for b in batches if b.continuation_mask is not None)


def continuation_loss_weight(n_continuation: int, weight: float) -> float:
    """w_cont so that w_cont·KD_continuation_sum = weight · mean continuation KD over the step."""
    return weight / n_continuation if n_continuation else 0.0


def combine(sums: LossSums, weights: tuple[float, float], w_continuation: float = 0.0) -> torch.Tensor:
    """The micro-batch's share of the step loss: w_nll·NLL_sum + w_kd·KD_sum (+ w_cont·KD_cont_sum)."""
    loss = sums.nll * weights[0] + sums.kd * weights[1]
    if sums.continuation is not None:
        loss = loss + sums.continuation * w_continuation
    return loss
