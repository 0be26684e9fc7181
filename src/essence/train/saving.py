"""The student as a checkpoint stores it: an ordinary Hugging Face model, whatever wraps it.

Under FSDP2 the student's weights are shards spread over the processes, and under LoRA they are a
frozen base plus adapters; ``SavedStudent`` gathers the full weights (every process takes part)
and gives the checkpoint writers (essence.train.checkpoint) an object whose ``save_pretrained`` writes
what `essence eval`, `--resume` and any other tool read: the full model (with a LoRA run's
adapters merged in) and, for LoRA, the adapter alone in adapter/.
"""

from __future__ import annotations

from pathlib import Path

import torch

from essence.models.sharding import full_model_state
from essence.train.lora import is_lora, save_lora


class SavedStudent:
    """A snapshot of the student for one save; build it on every process, write on the main one."""

    def __init__(self, accelerator, step_module: torch.nn.Module, student: torch.nn.Module):
        self.student = student
        # A collective under FSDP2: every process gathers, the main process keeps the result.
        self.state = full_model_state(accelerator, step_module)

    def save_pretrained(self, folder: Path, safe_serialization: bool = True) -> None:
        folder = Path(folder)
        if is_lora(self.student):
            save_lora(self.student, folder, self.state)
        elif self.state is not None:
            # A shallow copy: save_pretrained empties the dict it is given, and a final save
            # writes the same snapshot twice (the checkpoint and model/).
            self.student.save_pretrained(folder, state_dict=dict(self.state),
                                         safe_serialization=safe_serialization)
        else:
            self.student.save_pretrained(folder, safe_serialization=safe_serialization)

