"""The fused divergence: values and analytic gradients w.r.t. the student logits, with few
[rows, V] buffers (the fused loss calls it once per chunk of tokens).

Gradients, as the fused loss computes them in its forward pass. For one token let z be the
student logits, b = z/τ, ℓ = log p_S = log_softmax(b) and t = log p_T. Each divergence D is a
function of ℓ with the teacher fixed. Since ℓ_k = b_k − logsumexp(b), ∂ℓ_k/∂b_j =
δ_kj − p_S,j, so with G = ∂D/∂ℓ (ℓ treated as free variables)

    ∂D/∂b = G − p_S · ΣG,    and for the loss τ²·D:   ∂/∂z = τ² · (1/τ) · ∂D/∂b = τ · ∂D/∂b.

    forward_kl       D = Σ p_T (t − ℓ)             G = −p_T
                     ∂D/∂b = p_S − p_T
    reverse_kl       D = Σ p_S (ℓ − t)             G = p_S (ℓ − t + 1)
                     ∂D/∂b = p_S (ℓ − t − D)
    combined_kl      r·forward_kl + (1−r)·reverse_kl, and so are G and ∂D/∂b
    js               m = β p_T + (1−β) p_S,  D = β KL(p_T‖m) + (1−β) KL(p_S‖m)
                     G = (1−β) p_S (ℓ − log m)     (the terms from ∂log m/∂ℓ cancel)
                     ∂D/∂b = (1−β) p_S (ℓ − log m − KL(p_S‖m))
                     β = 0 is forward_kl and β = 1 reverse_kl (the reference's convention)
    tvd              D = ½ Σ |p_T − p_S|           G = ½ p_S sign(p_S − p_T)   (sign(0) = 0)
    tvd, log_scale   D = ½ Σ |t − ℓ|               G = ½ sign(ℓ − t)
    skew_kl          m = α p_T + (1−α) p_S,  D = Σ p_T (t − log m)
                     G = −(1−α) p_T p_S / m
    skew_reverse_kl  m = α p_S + (1−α) p_T,  D = Σ p_S (ℓ − log m)
                     G = p_S (ℓ − log m + 1 − α p_S / m)

The "+1" terms cancel in G − p_S·ΣG because Σ p_S = 1. So forward KL's gradient w.r.t. the
student logits is τ·(p_S − p_T). The NLL is taken at τ = 1: −log softmax(z)_y, gradient
softmax(z) − onehot(y). With z = h Wᵀ, a logit gradient g gives ∂/∂h = g W and ∂/∂W = gᵀ h.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from essence.loss.divergences import _log_mix


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Σ_v a·b per row: [rows, V] × [rows, V] → [rows].

    In eighths of the rows, so the product's temporary is an eighth of a buffer. Not bmm:
    a matmul may run in TF32 on a GPU, and the reverse-KL and JS gradients use these sums.
    """
    step = max(1, -(-a.shape[0] // 8))
    return torch.cat([(a[i:i + step] * b[i:i + step]).sum(-1) for i in range(0, a.shape[0], step)])


def _through_softmax(g: Tensor, ps: Tensor) -> Tensor:
    """∂D/∂b = G − p_S·ΣG from G = ∂D/∂ℓ, in G's storage: [rows, V]."""
    return g.addcmul_(ps, g.sum(-1, keepdim=True), value=-1.0)


def _divergence_and_grad(ls: Tensor, lt: Tensor, kind: str, p: dict[str, float]) -> tuple[Tensor, Tensor]:
    """D per row and ∂D/∂b (b = student logits / τ), without the τ factors.

    ls = log p_S, lt = log p_T: [rows, V] fp32. ls is read only; lt is scratch (overwritten),
    which saves a buffer. Returns value [rows] and gradient [rows, V]. Formulas: module docstring.
    """
    if kind == "forward_kl" or (kind == "skew_kl" and p["alpha"] == 0.0) or (
            kind == "js" and p["beta"] == 0.0):                # β = 0: forward KL (reference)
        pt = lt.exp()
        d = lt.sub_(ls)                                        # t − ℓ
        value = _rowdot(pt, d)
        return value, d.copy_(ls).exp_().sub_(pt)              # p_S − p_T
    elif kind == "reverse_kl" or (kind == "skew_reverse_kl" and p["alpha"] == 0.0) or (
            kind == "js" and p["beta"] == 1.0):                # β = 1: reverse KL (reference)
        ps = ls.exp()
        d = lt.neg_().add_(ls)                                 # ℓ − t
        value = _rowdot(ps, d)
        return value, d.sub_(value[:, None]).mul_(ps)
    elif kind == "combined_kl":
        r = p["forward_ratio"]
        ps, pt = ls.exp(), lt.exp()
        d = lt.neg_().add_(ls)                                 # ℓ − t
        forward, reverse = -_rowdot(pt, d), _rowdot(ps, d)
        grad = d.sub_(reverse[:, None]).mul_(ps).mul_(1.0 - r).add_(ps, alpha=r).sub_(pt, alpha=r)
        return r * forward + (1.0 - r) * reverse, grad
    elif kind == "tvd" and p["log_scale"]:
        ps = ls.exp()
        d = lt.neg_().add_(ls)                                 # ℓ − t
        value = 0.5 * torch.linalg.vector_norm(d, ord=1, dim=-1)
        return value, _through_softmax(d.sign_().mul_(0.5), ps)
    elif kind == "tvd":
        ps = ls.exp()
        d = lt.exp_().neg_().add_(ps)                          # p_S − p_T
        value = 0.5 * torch.linalg.vector_norm(d, ord=1, dim=-1)
        return value, _through_softmax(d.sign_().mul_(ps).mul_(0.5), ps)
    elif kind in ("skew_kl", "skew_reverse_kl") and p["alpha"] == 1.0:
        return ls.new_zeros(ls.shape[0]), lt.zero_()
    elif kind == "js":
        beta = p["beta"]
        log_m = _log_mix(lt, ls, beta)
        pt = lt.exp()
        to_teacher = _rowdot(pt, lt.sub_(log_m))               # KL(p_T‖m)
        del pt
        ps = ls.exp()
        d = lt.copy_(ls).sub_(log_m)                           # ℓ − log m
        to_student = _rowdot(ps, d)                            # KL(p_S‖m)
        grad = d.sub_(to_student[:, None]).mul_(ps).mul_(1.0 - beta)
        return beta * to_teacher + (1.0 - beta) * to_student, grad
    elif kind == "skew_kl":
        alpha = p["alpha"]
        log_m = _log_mix(lt, ls, alpha)
        pt = lt.exp()
        d = lt.sub_(log_m)                                     # t − log m
        value = _rowdot(pt, d)
        del pt
        g = d.add_(ls).add_(math.log1p(-alpha)).exp_().neg_()  # −(1−α) p_T p_S / m
        return value, _through_softmax(g, ls.exp())
    elif kind == "skew_reverse_kl":
        alpha = p["alpha"]
        log_m = _log_mix(ls, lt, alpha)
        ps = ls.exp()
        d = lt.copy_(ls).sub_(log_m)                           # ℓ − log m
        value = _rowdot(ps, d)
        mixed_share = log_m.copy_(d).add_(math.log(alpha)).exp_()  # α p_S / m
        return value, _through_softmax(d.sub_(mixed_share).mul_(ps), ps)
    raise AssertionError(f"unchecked divergence kind {kind!r}")
