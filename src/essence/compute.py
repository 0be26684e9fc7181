"""Compute accounting: FLOPs per sequence, peak memory, and the run's cost summary.

FLOPs formula (model FLOPs, the convention of Kaplan et al. and PaLM):

    forward(T) = 2 · P · T  +  4 · L · d_attn · T²
    training   = 3 · forward   (the backward pass costs about twice the forward)

for one sequence of T tokens, where P counts every weight matrix a token passes through
(all parameters except the input embedding, plus the LM head even when it is tied to the
embedding), L is the number of layers and d_attn = heads × head_dim. The attention term
counts the score and value products over the whole T × T square, as dense kernels do.
Recomputation by gradient checkpointing is not counted: these are model FLOPs, not
hardware FLOPs. Every processed token counts, supervised or not; padding does not.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class FlopModel:
    """The numbers the FLOPs formula needs from one model."""

    params: int
    """P: parameters a token's forward pass multiplies by (see module docstring)."""
    layers: int
    attn_dim: int

    def forward(self, lengths: list[int] | torch.Tensor) -> float:
        """Forward FLOPs of sequences with these lengths (padding excluded)."""
        lengths = [int(n) for n in lengths]
        return float(sum(2 * self.params * n + 4 * self.layers * self.attn_dim * n * n
                         for n in lengths))

    def train(self, lengths: list[int] | torch.Tensor) -> float:
        return 3.0 * self.forward(lengths)


def flop_model(model: torch.nn.Module) -> FlopModel:
    """Read P, L and d_attn off a transformers causal LM."""
    config = model.config
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    params = sum(p.numel() for p in model.parameters() if p is not embed and p is not head)
    params += head.numel()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return FlopModel(params=params, layers=config.num_hidden_layers, attn_dim=heads * head_dim)


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

    def add(self, batch, student: FlopModel, teacher: FlopModel | None) -> None:
        """Count one micro-batch (lengths from its attention mask)."""
        lengths = batch.attention_mask.sum(dim=1).tolist()
        self.sequences += len(lengths)
        self.student_tokens += int(sum(lengths))
        self.padding_tokens += batch.padding
        self.nll_tokens += int((batch.nll_mask[:, 1:] & batch.attention_mask[:, 1:].bool()).sum())
        self.kd_tokens += int((batch.kd_mask[:, 1:] & batch.attention_mask[:, 1:].bool()).sum())
        self.student_flops += student.train(lengths)
        if teacher is not None:
            self.teacher_flops += teacher.forward(lengths)
