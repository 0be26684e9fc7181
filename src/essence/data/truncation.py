"""Truncation protocols: which tokens of a rendered sequence are kept for training.

Every protocol is a pure function of the sequence length and its segment spans, and
returns the kept token ranges with how many prompt / CoT / answer tokens survive.
Truncation runs before batching, so a shorter sequence costs less compute, not just
less loss.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from typing import Literal

from essence.data.render import Spans
from essence.errors import EssenceError
from essence.fields import bounded

WindowPosition = Literal["left", "middle", "right"]


@dataclass(frozen=True)
class TruncationConfig:
    """How each sequence is cut before training. Set at most one protocol besides max_tokens."""

    lsp: float = bounded(1.0, gt=0, le=1)
    """Lead-span proportion: keep the first max(1, floor(n·lsp)) tokens; 1.0 keeps all."""
    window: float | None = bounded(None, gt=0, le=1)
    """Keep a contiguous proportion of the sequence at window_position (None: off)."""
    window_position: WindowPosition = "left"
    """Where the window sits: left (start), middle (centre) or right (end)."""
    cot_lead: float | None = bounded(None, ge=0, le=1)
    """Keep the prompt, the first floor(x·|CoT|) CoT tokens, the closing think tag and the
    whole answer (None: off)."""
    cut_after_think: bool = False
    """End each sequence right after the closing think tag (drops the answer). Combines with lsp
    or window, as in the reference code: cut first, then take the lead span (window) of the rest."""
    max_tokens: int | None = bounded(None, ge=1)
    """Keep at most the first k tokens; applied after the protocol above (None: no cap)."""
    replay: float = bounded(0.0, ge=0, le=1)
    """Finish replay: this fraction of records is trained whole (only max_tokens applies), the
    rest get the protocol above, so the student still sees how sequences end. 0: off."""
    replay_seed: int = 0
    """Seed of the replay choice: a record is replayed when a hash of (seed, record id) falls
    below replay, so the same records are chosen on every run, resume and process."""

    def __post_init__(self) -> None:
        _check_fraction("data.truncation.lsp", self.lsp)
        if self.window is not None:
            _check_fraction("data.truncation.window", self.window)
        if self.cot_lead is not None and not 0.0 <= self.cot_lead <= 1.0:
            raise EssenceError(
                f"data.truncation.cot_lead must be within [0, 1], got {self.cot_lead}"
            )
        if self.window_position not in ("left", "middle", "right"):
            raise EssenceError(
                "data.truncation.window_position must be left, middle or right, "
                f"got {self.window_position!r}"
            )
        if self.max_tokens is not None and self.max_tokens < 1:
            raise EssenceError(f"data.truncation.max_tokens must be ≥ 1, got {self.max_tokens}")
        chosen = [
            name
            for name, on in (
                ("lsp", self.lsp < 1.0),
                ("window", self.window is not None),
                ("cot_lead", self.cot_lead is not None),
            )
            if on
        ]
        if self.cut_after_think and self.cot_lead is not None:
            chosen.append("cut_after_think")
        if len(chosen) > 1:
            raise EssenceError(
                f"data.truncation sets {' and '.join(chosen)}; choose one protocol "
                "(max_tokens may be combined with any of them, cut_after_think with lsp or window)"
            )
        if not 0.0 <= self.replay <= 1.0:
            raise EssenceError(f"data.truncation.replay must be within [0, 1], got {self.replay}")
        if self.replay and not (chosen or self.cut_after_think):
            raise EssenceError(
                f"data.truncation.replay={self.replay:g} trains a fraction of records whole, but no "
                "protocol truncates the others; set lsp < 1, window, cot_lead or cut_after_think "
                "(or replay: 0)")

    def whole(self) -> TruncationConfig:
        """What a replayed record gets: no protocol, the same max_tokens cap."""
        return TruncationConfig(max_tokens=self.max_tokens)

    def without_replay(self) -> TruncationConfig:
        return replace(self, replay=0.0)

    def label(self) -> str:
        """A short name for reports, e.g. 'lsp=0.5', 'window=0.5@middle' or 'cut_after_think,lsp=0.5'."""
        if self.window is not None:
            base = f"window={self.window:g}@{self.window_position}"
        elif self.cot_lead is not None:
            base = f"cot_lead={self.cot_lead:g}"
        elif self.cut_after_think and self.lsp == 1.0:
            base = "cut_after_think"
        else:
            base = f"lsp={self.lsp:g}"
        if self.cut_after_think and base != "cut_after_think":
            base = f"cut_after_think,{base}"
        if self.replay:
            base = f"{base},replay={self.replay:g}"
        return base if self.max_tokens is None else f"{base},max_tokens={self.max_tokens}"


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise EssenceError(f"{name} must be within (0, 1], got {value}")


@dataclass(frozen=True)
class Kept:
    """Kept token ranges [start, end) in order, and the surviving tokens per segment."""

    ranges: tuple[tuple[int, int], ...]
    prompt: int
    cot: int
    answer: int

    @property
    def total(self) -> int:
        return self.prompt + self.cot + self.answer

    def indices(self) -> list[int]:
        return [i for start, end in self.ranges for i in range(start, end)]


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> int:
    return max(0, min(a[1], b[1]) - max(a[0], b[0]))


def _kept(ranges: list[tuple[int, int]], spans: Spans) -> Kept:
    ranges = [r for r in ranges if r[1] > r[0]]
    count = lambda seg: sum(_overlap(r, seg) for r in ranges)  # noqa: E731
    return Kept(tuple(ranges), count(spans.prompt), count(spans.cot), count(spans.answer))


def lead_span(n: int, x: float) -> int:
    """Number of tokens the lead-span proportion x keeps of n: max(1, floor(n·x))."""
    _check_fraction("lsp", x)
    # The epsilon keeps floor(n·x) exact when n·x is an integer that float rounds below.
    return min(n, max(1, math.floor(n * x + 1e-9)))


def window(n: int, x: float, position: WindowPosition) -> tuple[int, int]:
    """A contiguous proportion x of n tokens at the start, centre or end."""
    k = lead_span(n, x)
    if position == "left":
        return 0, k
    if position == "right":
        return n - k, n
    start = (n - k) // 2
    return start, start + k


def replayed(record_id: str, config: TruncationConfig) -> bool:
    """Whether finish replay keeps this record whole: a seeded hash of its id below replay."""
    if not config.replay:
        return False
    digest = hashlib.sha256(f"{config.replay_seed}:{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < config.replay


def truncate(spans: Spans, config: TruncationConfig, record_id: str | None = None) -> Kept:
    """Apply the configured protocol (then the max_tokens cap) to one sequence.

    With finish replay on, record_id chooses whether the record is kept whole instead.
    """
    if config.replay:
        if record_id is None:
            raise ValueError("truncate: data.truncation.replay needs the record id")
        if replayed(record_id, config):
            return truncate(spans, config.whole())
    n = spans.length
    if config.cut_after_think:
        # The reference cuts first; lsp / window then apply to what is left.
        n = spans.think_end if spans.think_end is not None else spans.cot[1]
    if config.window is not None:
        ranges = [window(n, config.window, config.window_position)]
    elif config.cot_lead is not None:
        cot_len = spans.cot[1] - spans.cot[0]
        lead_end = spans.cot[0] + math.floor(cot_len * config.cot_lead + 1e-9)
        # The closing tag stays, so the student still learns to end its thinking.
        tail = spans.think_close if spans.think_close is not None else spans.answer[0]
        ranges = [(0, lead_end), (max(lead_end, tail), spans.answer[1])]
    else:
        ranges = [(0, lead_span(n, config.lsp))]
    if config.max_tokens is not None:
        ranges = _cap(ranges, config.max_tokens)
    ranges = _merge(ranges)
    return _kept(ranges, spans)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Join touching ranges, so one contiguous span is reported as one range."""
    merged: list[tuple[int, int]] = []
    for start, end in ranges:
        if end <= start:
            continue
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def _cap(ranges: list[tuple[int, int]], k: int) -> list[tuple[int, int]]:
    capped, left = [], k
    for start, end in ranges:
        take = min(end - start, left)
        if take > 0:
            capped.append((start, start + take))
        left -= take
    return capped
