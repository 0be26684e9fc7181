"""Config fields that carry their valid range, checked once when a config is loaded.

``lr: float = bounded(1e-5, gt=0)`` declares a field whose value must be > 0. The loader
(``essence.config.schema``) checks every bounded field, and every float field for NaN and infinity,
right after reading the YAML and the overrides — before any model or dataset is touched —
and names the key, the value and the valid range in one line.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, Field, dataclass, field
from typing import Any

from essence.errors import EssenceError


@dataclass(frozen=True)
class Bounds:
    """A closed or open interval; None leaves that side unbounded."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def contains(self, value: float) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def describe(self) -> str:
        """The interval in words and brackets, e.g. '(0, 1]' or '≥ 1'."""
        low = (f"[{_num(self.ge)}" if self.ge is not None
               else f"({_num(self.gt)}" if self.gt is not None else None)
        high = (f"{_num(self.le)}]" if self.le is not None
                else f"{_num(self.lt)})" if self.lt is not None else None)
        if low and high:
            return f"{low}, {high}"
        if low:
            return f"{'≥' if self.ge is not None else '>'} {_num(self.ge if self.ge is not None else self.gt)}"
        if high:
            return f"{'≤' if self.le is not None else '<'} {_num(self.le if self.le is not None else self.lt)}"
        return "any finite number"


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def bounded(default: Any = MISSING, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None,
            default_factory: Any = MISSING) -> Any:
    """A dataclass field whose (non-None) value must lie within the given bounds."""
    meta = {"bounds": Bounds(ge=ge, gt=gt, le=le, lt=lt)}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def check_value(key: str, value: Any, spec: Field) -> None:
    """Refuse a non-finite float or a value outside the field's bounds, naming key and range."""
    numbers = value if isinstance(value, (list, tuple)) else [value]
    bounds: Bounds | None = spec.metadata.get("bounds")
    for number in numbers:
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            continue
        if isinstance(number, float) and not math.isfinite(number):
            raise EssenceError(f"config {key}={number} is not a finite number"
                               + (f"; valid range: {bounds.describe()}" if bounds else ""))
        if bounds is not None and not bounds.contains(number):
            raise EssenceError(f"config {key}={number} is out of range; valid range: "
                               f"{bounds.describe()}")


def count(text: str) -> int:
    """An argparse type: a whole number ≥ 1 (record, problem and sample counts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value
