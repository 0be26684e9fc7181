"""Supervision allocation: which kept tokens carry the NLL loss and which the KD loss.

Masks are aligned with the token ids and mark *target* tokens: mask[i] means "the model
is trained to predict token i (from the tokens before it)". The first token of a
sequence is never a target.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Literal

from essence.errors import EssenceError
from essence.fields import bounded

Segment = Literal["prompt", "cot", "answer"]
SEGMENTS: tuple[Segment, ...] = ("prompt", "cot", "answer")
SEGMENT_IDS = {"prompt": 1, "cot": 2, "answer": 3}


@dataclass(frozen=True)
class SupervisionConfig:
    """Which segments carry each loss term; the paper's default supervises all of them."""

    nll: tuple[Segment, ...] = SEGMENTS
    """Segments whose tokens carry the NLL (cross-entropy on the data) term."""
    kd: tuple[Segment, ...] = SEGMENTS
    """Segments whose tokens carry the KD (divergence from the teacher) term."""
    random_drop: float = bounded(0.0, ge=0, lt=1)
    """Control: drop this fraction of the supervised tokens at random (seeded per record)."""
    random_drop_mode: Literal["shared", "independent"] = "shared"
    """shared: the same targets leave both terms, as in the paper's reference code (at 0.5 half
    the targets get no supervision); independent: NLL and KD drop their own draws (a quarter)."""
    seed: int = 0
    """Seed of the random-drop control."""

    def __post_init__(self) -> None:
        for term in ("nll", "kd"):
            value = getattr(self, term)
            if isinstance(value, str):
                value = tuple(s.strip() for s in value.split("+") if s.strip())
                object.__setattr__(self, term, value)
            bad = [s for s in value if s not in SEGMENTS]
            if bad:
                raise EssenceError(
                    f"data.supervision.{term} has unknown segments {bad}; choose any of "
                    f"{list(SEGMENTS)} (e.g. [cot, answer] or 'cot+answer')"
                )
        if not 0.0 <= self.random_drop < 1.0:
            raise EssenceError(
                f"data.supervision.random_drop must be within [0, 1), got {self.random_drop}"
            )


@dataclass
class Masks:
    """Per-token segment ids and supervision masks of one kept sequence."""

    segment_ids: list[int]
    nll: list[bool] = field(default_factory=list)
    kd: list[bool] = field(default_factory=list)


def _drop(mask: list[bool], fraction: float, rng: random.Random) -> list[bool]:
    on = [i for i, m in enumerate(mask) if m]
    dropped = set(rng.sample(on, round(len(on) * fraction)))
    return [m and i not in dropped for i, m in enumerate(mask)]


def supervise(record_id: str, segment_ids: list[int], config: SupervisionConfig) -> Masks:
    """Masks for one sequence from its per-token segment ids (1 prompt, 2 cot, 3 answer)."""
    nll_ids = {SEGMENT_IDS[s] for s in config.nll}
    kd_ids = {SEGMENT_IDS[s] for s in config.kd}
    nll = [i > 0 and seg in nll_ids for i, seg in enumerate(segment_ids)]
    kd = [i > 0 and seg in kd_ids for i, seg in enumerate(segment_ids)]
    if config.random_drop > 0:
        # Seed from the record id, not the position, so the control is order-independent.
        digest = hashlib.sha256(f"{config.seed}:{record_id}".encode()).digest()
        seed = int.from_bytes(digest[:8], "little")
        if config.random_drop_mode == "shared":
            # One draw over every target of either term, removed from both.
            kept = _drop([a or b for a, b in zip(nll, kd)], config.random_drop, random.Random(seed))
            nll = [a and k for a, k in zip(nll, kept)]
            kd = [b and k for b, k in zip(kd, kept)]
        else:
            nll = _drop(nll, config.random_drop, random.Random(seed))
            kd = _drop(kd, config.random_drop, random.Random(seed + 1))
    return Masks(segment_ids=segment_ids, nll=nll, kd=kd)
