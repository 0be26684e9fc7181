"""The frozen teacher behind a small interface: kept tokens in, final hidden states out.

The loss applies the teacher's LM head chunk by chunk (see essence.fused_loss), so the
interface hands over hidden states plus the head weight instead of full logits. A cached
teacher (precomputed top-k logits) can implement the same two members later without the
training loop changing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from essence.errors import EssenceError


@dataclass
class TeacherOutput:
    """hidden: [batch, seq, hidden] final hidden states; head: [vocab, hidden] LM-head weight."""

    hidden: torch.Tensor
    head: torch.Tensor


class Teacher(Protocol):
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TeacherOutput: ...


class OnlineTeacher:
    """A causal LM run forward on the fly: frozen, eval mode, no grad, its own dtype."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model = model.to(device).eval()
        self.model.requires_grad_(False)
        self.device = device

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TeacherOutput:
        body = self.model.get_decoder()
        out = body(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                   use_cache=False)
        return TeacherOutput(out.last_hidden_state, self.model.get_output_embeddings().weight)


def check_vocabularies(student_tokenizer, teacher_tokenizer, teacher_name: str) -> None:
    """Refuse a teacher whose tokenizer maps tokens to different ids than the student's."""
    if teacher_tokenizer is None:
        return
    student_vocab = student_tokenizer.get_vocab()
    teacher_vocab = teacher_tokenizer.get_vocab()
    if student_vocab == teacher_vocab:
        return
    differing = [t for t, i in student_vocab.items() if teacher_vocab.get(t) != i]
    sample = ", ".join(repr(t) for t in differing[:3])
    raise EssenceError(
        f"the teacher {teacher_name!r} and the student use different vocabularies "
        f"({len(student_vocab)} vs {len(teacher_vocab)} tokens; {len(differing)} tokens differ, "
        f"e.g. {sample}); token-level distillation needs one shared tokenizer — pick a teacher "
        "from the student's model family"
    )
