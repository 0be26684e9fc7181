"""Distillation losses: the divergence family, per token, in fp32 log-space.

``divergence`` is the plain, autograd-differentiable per-token divergence between two sets
of logits. The training loss (NLL + KD fused with both LM heads, chunked over tokens) lives
in ``essence.loss.fused`` and uses the argument checks defined here.

Conventions (DESIGN.md): p_T, p_S = softmax(logits / τ) of teacher and student, the
divergence is scaled by τ²; only the first ``vocab_size`` logit columns are compared.
As in the paper's reference code: ``js`` at β = 0 is forward KL and at β = 1 reverse KL (not the
vanishing mixture), and ``tvd`` with ``log_scale`` compares log-probabilities.

Reduction (how per-token losses become the step loss; ``loss.reduction``, applied by
``essence.train.step`` and the loop): ``token`` (default) sums each term (NLL, KD) over its targets
in all micro-batches and processes of an optimizer step and divides once by their count, so
every token weighs the same and the gradient does not depend on how the step is split.
``sequence`` replicates the reference code's per-rank means at micro-batch 1: each term is the
mean over each sequence's own targets, then the mean over the step's sequences that have
targets for that term (a sequence without KD targets is left out of the KD mean), so every
sequence weighs the same; it too does not depend on how the step is split.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, get_args

import torch
from torch import Tensor

Divergence = Literal[
    "forward_kl", "reverse_kl", "combined_kl", "js", "tvd", "skew_kl", "skew_reverse_kl"
]
DIVERGENCES: tuple[str, ...] = get_args(Divergence)

IGNORE_INDEX = -100
"""The label of a position with no next-token target."""

TeacherLogitsFn = Callable[[Tensor], Tensor]
"""Given token indices [c] (rows of the flattened micro-batch), the teacher logits [c, V_t]."""


# ---------------------------------------------------------------------------------------------
# Checking arguments


def divergence_params(kind: str, params: dict[str, float] | None = None) -> dict[str, float]:
    """The full parameter set of a divergence: names checked, defaults filled, ranges checked.

    Raises ValueError naming the unknown kind or parameter and the valid choices.
    """
    if kind in ("forward_kl", "reverse_kl"):
        defaults: dict[str, float] = {}
    elif kind == "tvd":
        defaults = {"log_scale": 0.0}
    elif kind == "combined_kl":
        defaults = {"forward_ratio": 0.5}
    elif kind == "js":
        defaults = {"beta": 0.5}
    elif kind in ("skew_kl", "skew_reverse_kl"):
        defaults = {"alpha": 0.1}
    else:
        raise ValueError(f"unknown divergence kind {kind!r}; choose one of {', '.join(DIVERGENCES)}")
    for name in params or {}:
        if name not in defaults:
            takes = f"its parameter is {', '.join(defaults)}" if defaults else "it takes no parameters"
            raise ValueError(f"divergence {kind!r} has no parameter {name!r}; {takes}")
    resolved = {**defaults, **(params or {})}
    if isinstance(resolved.get("log_scale"), bool):  # a switch: true / false read as 1 / 0
        resolved["log_scale"] = float(resolved["log_scale"])
    if resolved.get("log_scale") not in (None, 0.0, 1.0):
        raise ValueError(f"divergence 'tvd': log_scale={resolved['log_scale']!r} must be true or false")
    for name, value in resolved.items():
        # `not (0 <= v <= 1)` also rejects NaN.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"divergence {kind!r}: {name}={value!r} is out of range; "
                             "it must be a number in [0, 1]")
    return {name: float(value) for name, value in resolved.items()}


def _check_temperature(temperature: float) -> None:
    if not isinstance(temperature, (int, float)) or not 0.0 < temperature < math.inf:
        raise ValueError(f"temperature={temperature!r} must be a positive finite number")


def _compared_width(student_width: int, teacher_width: int | None, vocab_size: int | None) -> int:
    """How many leading logit columns to compare: vocab_size, else the narrower model's width."""
    widest_allowed = student_width if teacher_width is None else min(student_width, teacher_width)
    if vocab_size is None:
        return widest_allowed
    if (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
            or not 1 <= vocab_size <= widest_allowed):
        raise ValueError(f"vocab_size={vocab_size!r} must be an integer in [1, {widest_allowed}] "
                         f"(logit widths: student {student_width}, teacher {teacher_width})")
    return vocab_size


# ---------------------------------------------------------------------------------------------
# The plain divergence (autograd)


def _log_mix(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """log(w·a + (1−w)·b) from log a, log b ([..., V]); 0 < w < 1, callers handle the ends."""
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p‖q) over the last dim from log-probabilities: [..., V] → [...]."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _divergence_values(ls: Tensor, lt: Tensor, kind: str, p: dict[str, float]) -> Tensor:
    """D(p_T, p_S) per row from ls = log p_S, lt = log p_T: [..., V] → [...] (no τ² scale)."""
    if kind == "forward_kl":
        return _kl(lt, ls)
    elif kind == "reverse_kl":
        return _kl(ls, lt)
    elif kind == "combined_kl":
        r = p["forward_ratio"]
        return r * _kl(lt, ls) + (1.0 - r) * _kl(ls, lt)
    elif kind == "js":
        beta = p["beta"]
        # At the ends m is one of the two distributions and the mixture is 0; the reference
        # code (and TRL) read β = 0 as forward KL and β = 1 as reverse KL instead.
        if beta == 0.0:
            return _kl(lt, ls)
        if beta == 1.0:
            return _kl(ls, lt)
        log_m = _log_mix(lt, ls, beta)
        return beta * _kl(lt, log_m) + (1.0 - beta) * _kl(ls, log_m)
    elif kind == "tvd":
        if p["log_scale"]:
            return 0.5 * (lt - ls).abs().sum(-1)
        return 0.5 * (lt.exp() - ls.exp()).abs().sum(-1)
    elif kind == "skew_kl":
        alpha = p["alpha"]
        if alpha == 1.0:
            return ls.sum(-1) * 0.0
        return _kl(lt, ls if alpha == 0.0 else _log_mix(lt, ls, alpha))
    elif kind == "skew_reverse_kl":
        alpha = p["alpha"]
        if alpha == 1.0:
            return ls.sum(-1) * 0.0
        return _kl(ls, lt if alpha == 0.0 else _log_mix(ls, lt, alpha))
    raise AssertionError(f"unchecked divergence kind {kind!r}")


def divergence(student_logits: Tensor, teacher_logits: Tensor, kind: Divergence, *,
               temperature: float = 1.0, vocab_size: int | None = None, **params: float) -> Tensor:
    """Per-token divergence between teacher and student, τ²-scaled, computed in fp32.

    student_logits: [..., V_s]; teacher_logits: [..., V_t] with the same leading dims.
    Only the first vocab_size columns (default min(V_s, V_t)) are compared.
    params: forward_ratio (combined_kl), beta (js), alpha (skew_kl, skew_reverse_kl),
    log_scale (tvd: ½·Σ|log p_S − log p_T| instead of ½·Σ|p_S − p_T|).
    Returns [...] fp32, differentiable w.r.t. both inputs. Logits must be finite; probabilities
    that underflow to 0 are fine.
    """
    p = divergence_params(kind, params)
    _check_temperature(temperature)
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ before the vocabulary dim")
    v = _compared_width(student_logits.shape[-1], teacher_logits.shape[-1], vocab_size)
    ls = torch.log_softmax(_scaled(_first_columns(student_logits, v).float(), temperature), dim=-1)
    lt = torch.log_softmax(_scaled(_first_columns(teacher_logits, v).float(), temperature), dim=-1)
    return _divergence_values(ls, lt, kind, p) * temperature**2


def _first_columns(x: Tensor, v: int) -> Tensor:
    """x[..., :v]; x itself when it is v wide, so autograd keeps no full-size slice gradient."""
    return x if x.shape[-1] == v else x[..., :v]


def _scaled(x: Tensor, temperature: float) -> Tensor:
    """x / τ, skipping the [..., V] copy at τ = 1."""
    return x if temperature == 1.0 else x / temperature
