"""What turns whole token sequences into a teacher cache's targets: the `TeacherPass` interface
and `TorchTeacherPass` (a transformers model), so another backend (e.g. vLLM prompt log-probs)
plugs in beside it."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from essence.teacher.cache_format import CacheSettings, RecordTargets


class TeacherPass(Protocol):
    """Turns whole token sequences into per-position sparse targets (rows = tokens − 1)."""

    def __call__(self, sequences: list[list[int]], ordinals: list[int]) -> list[RecordTargets]: ...


class TorchTeacherPass:
    """A transformers causal LM run over right-padded batches; top-k or sampled targets per row,
    the LM head applied `chunk` positions at a time so memory stays O(chunk × vocab)."""

    def __init__(self, model: torch.nn.Module, settings: CacheSettings, vocab: int, device,
                 pad_id: int, chunk: int = 256):
        self.model = model.to(device).eval().requires_grad_(False)
        self.settings, self.vocab, self.device, self.pad_id = settings, vocab, device, pad_id
        self.chunk = chunk

    @torch.no_grad()
    def __call__(self, sequences: list[list[int]], ordinals: list[int]) -> list[RecordTargets]:
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(sequences):
            ids[row, :len(seq)], mask[row, :len(seq)] = torch.tensor(seq), 1
        body = self.model.get_decoder()
        hidden = body(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                      use_cache=False).last_hidden_state
        head = self.model.get_output_embeddings().weight[:self.vocab].float()
        return [self._targets(hidden[row, :len(seq) - 1], head, ordinal)
                for row, (seq, ordinal) in enumerate(zip(sequences, ordinals))]

    def _targets(self, hidden: torch.Tensor, head: torch.Tensor, ordinal: int) -> RecordTargets:
        """hidden: [rows, H] of one record → its targets (numpy, fp32 values)."""
        s, parts = self.settings, []
        generator = torch.Generator().manual_seed(s.seed * 1_000_003 + ordinal)
        for start in range(0, hidden.shape[0], self.chunk):
            logits = hidden[start:start + self.chunk].float() @ head.T
            parts.append(self._topk(logits) if s.mode == "topk" else self._sampled(logits, generator))
        k = s.k
        if not parts:
            empty = np.zeros((0, k), np.float32)
            topk = s.mode == "topk"
            return RecordTargets(empty.astype(np.int64), empty, np.zeros(0, np.float32) if topk else None,
                                 None if topk else empty.astype(np.uint8))
        cat = [np.concatenate(p) if p[0] is not None else None for p in zip(*parts)]
        return RecordTargets(*cat)

    def _topk(self, logits: torch.Tensor):
        logp = torch.log_softmax(logits / self.settings.temperature, dim=-1)
        top, ids = logp.topk(min(self.settings.k, logp.shape[1]), dim=-1)
        tail = torch.logsumexp(logp.scatter_(1, ids, -torch.inf), dim=-1)  # exact, −inf if empty
        return ids.cpu().numpy(), top.cpu().numpy(), tail.cpu().numpy(), None

    def _sampled(self, logits: torch.Tensor, generator: torch.Generator):
        s = self.settings
        logp = torch.log_softmax(logits / s.temperature, dim=-1)
        draws = torch.multinomial(logp.exp().cpu(), s.k, replacement=True, generator=generator)
        counts = torch.zeros(logp.shape, dtype=torch.int16).scatter_add_(
            1, draws, torch.ones_like(draws, dtype=torch.int16))
        top_counts, ids = counts.topk(s.k, dim=-1)  # distinct ids first, padding (count 0) after
        return (ids.numpy(), logp.cpu().gather(1, ids).numpy(), None,
                top_counts.to(torch.uint8).numpy())
