"""The run's cost summary: tokens, FLOPs (formula in essence.models.flops), peak memory, time."""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from essence.data.batching import SEGMENT_SAMPLED
from essence.models.flops import FlopModel

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA stats on GPU; on Linux CPUs, the kernel's RSS high-water mark.

    Without the reset, runs sharing one process (a sweep, the demo) would all report the
    largest peak seen so far.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif _CLEAR_REFS.exists():
        try:
            _CLEAR_REFS.write_text("5")  # "5" resets VmHWM to the current RSS
        except OSError:
            pass  # not permitted: fall back to the process-lifetime peak


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA max allocated on GPU; peak resident set size on CPU (since the last reset on Linux)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if _STATUS.exists():
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


@dataclass
class Ledger:
    """Running totals of what a training run processed."""

    student_tokens: int = 0
    padding_tokens: int = 0
    nll_tokens: int = 0
    kd_tokens: int = 0
    student_flops: float = 0.0
    teacher_flops: float = 0.0
    sequences: int = 0
    teacher_flops_cached: float = 0.0
    """What the online teacher would have cost for the targets a teacher cache served (not run,
    so not in teacher_flops; the cache's one-off pass is in its manifest)."""
    # Sampled training text (essence.train.sampling): generation is forward-only work of its own;
    # the teacher's forward over sampled tokens is its scoring, apart from teacher_flops.
    continuation_tokens: int = 0
    """Targets of the lead_then_student continuation term."""
    generated_tokens: int = 0
    generation_flops: float = 0.0
    generation_s: float = 0.0
    """Wall time spent generating, summed over processes."""
    sampled_sequences: int = 0
    teacher_scoring_flops: float = 0.0
    """The teacher's forward FLOPs added by sampled tokens: its forward over each sequence minus
    its forward over the same sequence without them."""

    def add(self, batch, student: FlopModel, teacher: FlopModel | None, cached: bool = False) -> None:
        """Count one micro-batch (lengths from its attention mask). teacher: the model that ran
        for this batch, or None when no teacher ran (then its KD targets are not trained);
        cached: its targets were read from a cache instead."""
        lengths = batch.sequence_lengths()  # per sequence: a packed row holds several
        real = batch.attention_mask[:, 1:].bool()
        if batch.position_ids is not None:  # no target crosses into the next packed sequence
            real = real & (batch.position_ids[:, 1:] > 0)
        nll = batch.nll_mask[:, 1:] & real
        kd = batch.kd_mask[:, 1:] & real if teacher is not None else torch.zeros_like(nll)
        cont = (batch.continuation_mask[:, 1:] & real
                if teacher is not None and batch.continuation_mask is not None
                else torch.zeros_like(nll))
        self.sequences += len(lengths)
        self.student_tokens += int(sum(lengths))
        self.padding_tokens += batch.padding
        self.nll_tokens += int(nll.sum())
        self.kd_tokens += int(kd.sum())
        self.continuation_tokens += int(cont.sum())
        self.student_flops += student.train(lengths, batch.per_sequence(nll | kd | cont))
        scored = kd | cont
        if teacher is not None and cached:
            self.teacher_flops_cached += teacher.forward(lengths, batch.per_sequence(scored))
        elif teacher is not None:
            spent = teacher.forward(lengths, batch.per_sequence(scored))
            sampled = batch.segment_ids == SEGMENT_SAMPLED
            if bool(sampled.any()):
                given = (batch.attention_mask.bool() & ~sampled).sum(dim=1).tolist()
                base = teacher.forward(given, (scored & ~sampled[:, 1:]).sum(dim=1).tolist())
                self.teacher_flops += base
                self.teacher_scoring_flops += spent - base
            else:
                self.teacher_flops += spent

    def add_generation(self, tokens: int, flops: float, seconds: float, sequences: int) -> None:
        """Count one step's generation (essence.train.sampling.GenerationCost) on this process."""
        self.generated_tokens += tokens
        self.generation_flops += flops
        self.generation_s += seconds
        self.sampled_sequences += sequences

    def cost_fields(self, sampling: str) -> dict:
        """The summary's token and FLOPs fields; `sampling` names the sampling method (or none).
        What sampled text cost (all zero without sampling) is kept apart from training."""
        return {
            "student_tokens": int(self.student_tokens), "padding_tokens": int(self.padding_tokens),
            "padding_fraction": self.padding_tokens / max(self.student_tokens + self.padding_tokens, 1),
            "nll_tokens": int(self.nll_tokens), "kd_tokens": int(self.kd_tokens),
            "sequences": int(self.sequences),
            "student_flops": self.student_flops, "teacher_flops": self.teacher_flops,
            "total_flops": self.total_flops,
            "sampling": sampling, "sampled_sequences": int(self.sampled_sequences),
            "generated_tokens": int(self.generated_tokens),
            "continuation_tokens": int(self.continuation_tokens),
            "generation_flops": self.generation_flops, "generation_time_s": self.generation_s,
            "teacher_scoring_flops": self.teacher_scoring_flops,
        }

    @property
    def total_flops(self) -> float:
        """Everything that ran: student training, teacher forwards, scoring and generation."""
        return self.student_flops + self.teacher_flops + self.teacher_scoring_flops + self.generation_flops
