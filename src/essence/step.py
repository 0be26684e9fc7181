"""The per-batch math of distillation: student forward, teacher targets, chunked loss sums.

``DistillStep`` is the module accelerate wraps (DDP and friends), so the loss is computed
inside the wrapped forward and gradient synchronisation sees every parameter. It returns
loss *sums*; the loop divides them once per optimizer step by the step's token counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from essence.config import LossConfig
from essence.fused_loss import distill_loss_sums
from essence.teacher import TeacherOutput


@dataclass
class LossSums:
    """Summed (not averaged) NLL and KD over one micro-batch's supervised targets."""

    nll: torch.Tensor
    kd: torch.Tensor


def targets(batch_ids: torch.Tensor, attention: torch.Tensor, nll_mask: torch.Tensor,
            kd_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token labels and the two masks for positions 0..T-2 (each predicts t+1).

    All: [batch, seq-1]; a position is masked out where its target is padding.
    """
    real = attention[:, 1:].bool()
    return batch_ids[:, 1:], nll_mask[:, 1:] & real, kd_mask[:, 1:] & real


def step_token_counts(batches) -> tuple[int, int]:
    """NLL and KD target counts of the micro-batches of one optimizer step (this process)."""
    nll = kd = 0
    for batch in batches:
        _, n, k = targets(batch.input_ids, batch.attention_mask, batch.nll_mask, batch.kd_mask)
        nll += int(n.sum())
        kd += int(k.sum())
    return nll, kd


class DistillStep(torch.nn.Module):
    """Wraps the student so that forward(batch tensors, teacher output) → loss sums."""

    def __init__(self, student: torch.nn.Module, loss: LossConfig, vocab_size: int):
        super().__init__()
        self.student = student
        self.loss = loss
        self.vocab_size = vocab_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                nll_mask: torch.Tensor, kd_mask: torch.Tensor,
                teacher: TeacherOutput | None = None,
                weights: tuple[float, float] | None = None) -> LossSums:
        """Loss sums of one micro-batch; `weights` = the caller's (w_nll, w_kd) combination,
        which lets the fused loss combine its two gradients per chunk."""
        body = self.student.get_decoder()
        hidden = body(input_ids=input_ids, attention_mask=attention_mask,
                      use_cache=False).last_hidden_state
        labels, nll, kd = targets(input_ids, attention_mask, nll_mask, kd_mask)
        if teacher is None or self.loss.kd_ratio == 0:
            kd = torch.zeros_like(kd)
        rows = (nll | kd).reshape(-1)
        flat = lambda t: t[:, :-1].reshape(-1, t.shape[-1])[rows]  # noqa: E731
        head = self.student.get_output_embeddings().weight
        nll_sum, kd_sum = distill_loss_sums(
            flat(hidden), head,
            flat(teacher.hidden) if teacher is not None else None,
            teacher.head if teacher is not None else None,
            labels.reshape(-1)[rows], nll.reshape(-1)[rows], kd.reshape(-1)[rows],
            kind=self.loss.divergence, temperature=self.loss.temperature,
            vocab_size=self.vocab_size, chunk_size=self.loss.chunk_size,
            params=dict(self.loss.params), loss_weights=weights,
        )
        return LossSums(nll_sum, kd_sum)


def loss_weights(n_nll: int, n_kd: int, kd_ratio: float) -> tuple[float, float]:
    """(w_nll, w_kd) so that loss = w_nll·NLL_sum + w_kd·KD_sum = (1-λ)·mean NLL + λ·mean KD."""
    w_nll = (1.0 - kd_ratio) / n_nll if n_nll else 0.0
    w_kd = kd_ratio / n_kd if kd_ratio > 0 and n_kd else 0.0
    return w_nll, w_kd


def combine(sums: LossSums, weights: tuple[float, float]) -> torch.Tensor:
    """The micro-batch's share of the step loss: w_nll·NLL_sum + w_kd·KD_sum."""
    return sums.nll * weights[0] + sums.kd * weights[1]
