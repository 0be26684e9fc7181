"""Examples → length-grouped batches with little padding.

One ``Batch`` type feeds training, validation and accounting alike. Batches are planned
as lists of example indices, deterministic for a seed and epoch, so a resumed run can
skip exactly the batches it already trained on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

SEGMENT_PAD = 0
SEGMENT_SAMPLED = 4  # generated during training (essence.train.sampling), not read from the data


@dataclass(frozen=True)
class Example:
    """One kept (truncated) sequence with its per-token segment ids and loss masks."""

    record_id: str
    input_ids: list[int]
    segment_ids: list[int]
    nll_mask: list[bool]
    kd_mask: list[bool]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class Batch:
    """A padded micro-batch. Masks mark target tokens (see data.supervision).

    input_ids, attention_mask, segment_ids: [batch, seq] (segment 0 pad, 1 prompt, 2 cot,
    3 answer, 4 sampled); nll_mask, kd_mask: [batch, seq] bool; record_ids: one per row;
    continuation_mask: [batch, seq] bool, the targets of a sampled continuation's own KD term
    (sampling.method lead_then_student), else None. position_ids: [batch, seq], only when
    sequences are packed (data.packing): a row then holds several sequences, record_ids has one
    per sequence, and each sequence's positions restart at 0, which is where it begins.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    nll_mask: torch.Tensor
    kd_mask: torch.Tensor
    segment_ids: torch.Tensor
    record_ids: list[str]
    continuation_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        """Real (non-padding) tokens in the batch."""
        return int(self.attention_mask.sum())

    @property
    def padding(self) -> int:
        return self.attention_mask.numel() - self.tokens

    def sequence_index(self) -> torch.Tensor:
        """Which sequence of the batch each position belongs to, -1 for padding: [batch, seq]."""
        real = self.attention_mask.bool()
        if self.position_ids is None:
            rows = torch.arange(real.shape[0], device=real.device).unsqueeze(1).expand_as(real)
            return torch.where(real, rows, -1)
        starts = (self.position_ids == 0) & real
        return torch.where(real, starts.flatten().cumsum(0).view_as(real) - 1, -1)

    def per_sequence(self, mask: torch.Tensor) -> list[int]:
        """Sum a [batch, width ≤ seq] 0/1 mask per sequence (width < seq: the first columns)."""
        index = self.sequence_index()[:, :mask.shape[1]]
        keep = index >= 0
        sums = torch.zeros(len(self.record_ids), dtype=torch.long, device=mask.device)
        return sums.index_add_(0, index[keep], mask[keep].long()).tolist()

    def sequence_lengths(self) -> list[int]:
        """Real tokens of each sequence (a packed row holds several)."""
        return self.per_sequence(self.attention_mask)

    def to(self, device) -> "Batch":
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return Batch(
            move(self.input_ids), move(self.attention_mask), move(self.nll_mask),
            move(self.kd_mask), move(self.segment_ids), self.record_ids,
            continuation_mask=None if self.continuation_mask is None else move(self.continuation_mask),
            position_ids=None if self.position_ids is None else move(self.position_ids),
        )


def collate(examples: list[Example], pad_id: int, pack: bool = False) -> Batch:
    """Right-pad examples to the longest one of the group; pack=True puts them one after
    another in a single row instead (no padding, position ids restarting per sequence)."""
    if pack:
        return pack_examples(examples)
    width = max(len(e) for e in examples)
    shape = (len(examples), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    attention = torch.zeros(shape, dtype=torch.long)
    segments = torch.full(shape, SEGMENT_PAD, dtype=torch.long)
    nll = torch.zeros(shape, dtype=torch.bool)
    kd = torch.zeros(shape, dtype=torch.bool)
    for row, example in enumerate(examples):
        n = len(example)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        attention[row, :n] = 1
        segments[row, :n] = torch.tensor(example.segment_ids)
        nll[row, :n] = torch.tensor(example.nll_mask)
        kd[row, :n] = torch.tensor(example.kd_mask)
    return Batch(input_ids, attention, nll, kd, segments, [e.record_id for e in examples])


def pack_examples(examples: list[Example]) -> Batch:
    """One row holding every example in turn (data.packing): [1, Σ lengths], no padding.

    The loss masks, segments and supervision of each sequence are its own, unchanged; position
    ids restart at 0 at each sequence, so attention (a block-diagonal causal mask) and the
    targets (none crosses a boundary, see essence.train.step.targets) stay within each sequence.
    """
    row = lambda field, dtype: torch.tensor(  # noqa: E731
        [v for e in examples for v in getattr(e, field)], dtype=dtype).unsqueeze(0)
    positions = torch.cat([torch.arange(len(e)) for e in examples]).unsqueeze(0)
    return Batch(row("input_ids", torch.long), torch.ones_like(positions),
                 row("nll_mask", torch.bool), row("kd_mask", torch.bool),
                 row("segment_ids", torch.long), [e.record_id for e in examples],
                 position_ids=positions)


def plan_batches(
    lengths: list[int], batch_size: int, *, seed: int, epoch: int, shuffle: bool = True,
    group_factor: int = 32,
) -> list[list[int]]:
    """Index lists of length-grouped batches for one epoch.

    Examples are shuffled, cut into pools of ``group_factor`` batches, sorted by length
    within each pool (so neighbours have similar lengths), split into batches, and the
    batches shuffled again so training does not see lengths in order.
    """
    order = list(range(len(lengths)))
    rng = random.Random(seed * 1_000_003 + epoch)
    if shuffle:
        rng.shuffle(order)
    pool = batch_size * group_factor
    batches: list[list[int]] = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches


def padding_fraction(lengths: list[int], batches: list[list[int]]) -> float:
    """Fraction of the padded tensor that is padding, over a batch plan."""
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    real = sum(lengths[i] for b in batches for i in b)
    return 0.0 if padded == 0 else 1.0 - real / padded
