"""The divergence family against formulas written out here, and the chunked loss against the plain one."""

from __future__ import annotations

import pytest
import torch

from essence.loss.divergences import DIVERGENCES, divergence
from essence.loss.fused import distill_loss_sums
from essence.loss.naive import naive_distill_loss_sums

# Every kind with its default parameters, plus non-default and boundary parameters.
CASES = [(kind, {}) for kind in DIVERGENCES] + [
    ("combined_kl", {"forward_ratio": 0.3}), ("combined_kl", {"forward_ratio": 1.0}),
    ("js", {"beta": 0.2}), ("js", {"beta": 0.0}), ("js", {"beta": 1.0}),
    ("skew_kl", {"alpha": 0.5}), ("skew_kl", {"alpha": 0.0}), ("skew_kl", {"alpha": 1.0}),
    ("skew_reverse_kl", {"alpha": 0.5}), ("skew_reverse_kl", {"alpha": 0.0}),
    ("skew_reverse_kl", {"alpha": 1.0}), ("tvd", {"log_scale": True}),
]
IDS = [f"{kind}-{params}" for kind, params in CASES]


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Σ p (log p − log q), with 0·log 0 = 0, written from probabilities."""
    return torch.where(p > 0, p * (torch.log(p) - torch.log(q)), 0.0).sum(-1)


def reference(student: torch.Tensor, teacher: torch.Tensor, kind: str, tau: float = 1.0,
              **params) -> torch.Tensor:
    """The DESIGN.md definitions in float64 from explicit probabilities (no log-space tricks)."""
    ps = torch.softmax(student.double() / tau, -1)
    pt = torch.softmax(teacher.double() / tau, -1)
    if kind == "forward_kl":
        d = kl(pt, ps)
    elif kind == "reverse_kl":
        d = kl(ps, pt)
    elif kind == "combined_kl":
        r = params.get("forward_ratio", 0.5)
        d = r * kl(pt, ps) + (1 - r) * kl(ps, pt)
    elif kind == "js":
        b = params.get("beta", 0.5)
        m = b * pt + (1 - b) * ps
        d = b * kl(pt, m) + (1 - b) * kl(ps, m)
        if b in (0.0, 1.0):  # the reference code's ends: forward KL and reverse KL
            d = kl(pt, ps) if b == 0.0 else kl(ps, pt)
    elif kind == "tvd" and params.get("log_scale"):
        d = 0.5 * (torch.log(pt) - torch.log(ps)).abs().sum(-1)
    elif kind == "tvd":
        d = 0.5 * (pt - ps).abs().sum(-1)
    elif kind == "skew_kl":
        a = params.get("alpha", 0.1)
        d = kl(pt, a * pt + (1 - a) * ps)
    elif kind == "skew_reverse_kl":
        a = params.get("alpha", 0.1)
        d = kl(ps, a * ps + (1 - a) * pt)
    return d * tau**2


def logits(*shape: int, seed: int, scale: float = 3.0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


# ---------------------------------------------------------------------------------------------
# divergence()


@pytest.mark.parametrize(("kind", "params"), CASES, ids=IDS)
@pytest.mark.parametrize("tau", [1.0, 2.0, 0.5])
def test_divergence_matches_the_written_out_formula(kind, params, tau):
    s, t = logits(2, 5, 11, seed=1), logits(2, 5, 11, seed=2)
    got = divergence(s, t, kind, temperature=tau, **params)
    assert got.shape == (2, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference(s, t, kind, tau, **params), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("kind", "params"), CASES, ids=IDS)
def test_divergence_of_bf16_inputs_is_fp32_arithmetic(kind, params):
    s, t = logits(6, 9, seed=3, dtype=torch.bfloat16), logits(6, 9, seed=4, dtype=torch.bfloat16)
    got = divergence(s, t, kind, temperature=1.5, **params)
    assert got.dtype == torch.float32
    # The reference sees the same bf16 values, exactly representable in float64.
    torch.testing.assert_close(got.double(), reference(s, t, kind, 1.5, **params), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("kind", "params"), CASES, ids=IDS)
def test_padded_columns_are_ignored(kind, params):
    s, t = logits(4, 10, seed=5), logits(4, 10, seed=6)
    padded = torch.cat([t, torch.full((4, 6), 40.0)], dim=-1)  # huge logits: visible if compared
    expected = reference(s, t, kind, **params)
    torch.testing.assert_close(divergence(s, padded, kind, **params).double(), expected,
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(divergence(padded, s, kind, vocab_size=10, **params).double(),
                               reference(t, s, kind, **params), rtol=1e-5, atol=1e-6)
    # vocab_size below both widths compares only that many columns.
    torch.testing.assert_close(divergence(s, padded, kind, vocab_size=7, **params).double(),
                               reference(s[:, :7], t[:, :7], kind, **params), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("kind", "params"), CASES, ids=IDS)
def test_identical_distributions_diverge_by_zero(kind, params):
    s = logits(3, 17, seed=7)
    torch.testing.assert_close(divergence(s, s.clone(), kind, temperature=2.0, **params),
                               torch.zeros(3), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("kind", "params"), CASES, ids=IDS)
def test_extreme_logits_stay_finite(kind, params):
    # ±1e4 logits: most probabilities underflow to exactly 0 in fp32.
    s = torch.tensor([[1e4, -1e4, 0.0, 5.0], [-1e4, -1e4, 1e4, 1e4], [0.0, 0.0, 0.0, 0.0]])
    t = torch.tensor([[-1e4, 1e4, 0.0, 5.0], [1e4, -1e4, -1e4, 1e4], [1e4, -1e4, 0.0, 0.0]])
    s.requires_grad_(True)
    for tau in (1.0, 0.5):
        got = divergence(s, t, kind, temperature=tau, **params)
        got.sum().backward()
        assert torch.isfinite(got).all() and torch.isfinite(s.grad).all(), (got, s.grad)
        s.grad = None
    if kind == "forward_kl":  # row 1: teacher mass on a class where the student has ~e^-2e4
        assert divergence(s, t, kind)[0] > 1e4


def test_js_ends_are_forward_and_reverse_kl_as_in_the_reference():
    # The mixture vanishes at β = 0 and 1; the paper's code (and TRL) train KL there instead.
    s, t = logits(4, 11, seed=21), logits(4, 11, seed=22)
    forward, reverse = divergence(s, t, "forward_kl"), divergence(s, t, "reverse_kl")
    torch.testing.assert_close(divergence(s, t, "js", beta=0.0), forward)
    torch.testing.assert_close(divergence(s, t, "js", beta=1.0), reverse)
    assert (forward > 1e-3).all() and not torch.allclose(forward, reverse)
    h, w = torch.randn(4, 8, dtype=torch.float64), torch.randn(11, 8, dtype=torch.float64)
    teacher_h = torch.randn(4, 8, dtype=torch.float64)
    mask = torch.ones(4, dtype=torch.bool)
    for beta, kind in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        got = distill_loss_sums(h.float(), w.float(), teacher_h.float(), w.float(),
                                torch.zeros(4, dtype=torch.long), ~mask, mask, kind="js",
                                params={"beta": beta})[1]
        want = distill_loss_sums(h.float(), w.float(), teacher_h.float(), w.float(),
                                 torch.zeros(4, dtype=torch.long), ~mask, mask, kind=kind)[1]
        torch.testing.assert_close(got, want)
        assert got > 1e-3


def test_tvd_log_scale_compares_log_probabilities():
    s, t = logits(3, 9, seed=23), logits(3, 9, seed=24)
    want = 0.5 * (torch.log_softmax(s, -1) - torch.log_softmax(t, -1)).abs().sum(-1)
    torch.testing.assert_close(divergence(s, t, "tvd", log_scale=True), want)
    torch.testing.assert_close(divergence(s, t, "tvd", log_scale=False), divergence(s, t, "tvd"))
    assert (divergence(s, t, "tvd", log_scale=True) > divergence(s, t, "tvd")).all()
    with pytest.raises(ValueError, match="log_scale=0.5 must be true or false"):
        divergence(s, t, "tvd", log_scale=0.5)


def test_bad_kind_and_params_name_the_choices():
    s, t = logits(2, 4, seed=8), logits(2, 4, seed=9)
    with pytest.raises(ValueError, match=r"unknown divergence kind 'kl'.*forward_kl.*skew_reverse_kl"):
        divergence(s, t, "kl")
    with pytest.raises(ValueError, match=r"'js' has no parameter 'alpha'; its parameter is beta"):
        divergence(s, t, "js", alpha=0.2)
    with pytest.raises(ValueError, match=r"'forward_kl' has no parameter 'beta'; it takes no parameters"):
        divergence(s, t, "forward_kl", beta=0.2)
    with pytest.raises(ValueError, match=r"'skew_kl': alpha=1.5 is out of range.*\[0, 1\]"):
        divergence(s, t, "skew_kl", alpha=1.5)
    with pytest.raises(ValueError, match=r"forward_ratio=nan is out of range"):
        divergence(s, t, "combined_kl", forward_ratio=float("nan"))
    with pytest.raises(ValueError, match=r"temperature=0 must be a positive"):
        divergence(s, t, "tvd", temperature=0)
    with pytest.raises(ValueError, match=r"vocab_size=5 must be an integer in \[1, 4\]"):
        divergence(s, t, "tvd", vocab_size=5)


# ---------------------------------------------------------------------------------------------
# distill_loss_sums() against naive_distill_loss_sums()

N, H, HT, VS, VT = 23, 8, 6, 13, 16  # the teacher's head is wider (padded vocabulary)


def problem(seed: int = 0, dtype=torch.float32, vs: int = VS):
    """Random hidden states and heads; nll/kd masks overlap partly and leave some tokens out."""
    g = torch.Generator().manual_seed(seed)
    nll_mask = torch.rand(N, generator=g) < 0.6
    kd_mask = torch.rand(N, generator=g) < 0.6
    nll_mask[:2], kd_mask[:2] = False, False  # tokens in neither mask
    return dict(
        student_hidden=torch.randn(N, H, generator=g).to(dtype).requires_grad_(True),
        student_head=torch.randn(vs, H, generator=g).to(dtype).requires_grad_(True),
        teacher_hidden=torch.randn(N, HT, generator=g).to(dtype),
        teacher_head=torch.randn(VT, HT, generator=g).to(dtype),
        labels=torch.randint(0, min(vs, VT), (N,), generator=g).where(nll_mask, -100),
        nll_mask=nll_mask, kd_mask=kd_mask,
    )


def run(fn, inputs, weights=(0.3, 0.7), **kw):
    """Both sums, and the gradients of weights[0]·nll + weights[1]·kd w.r.t. hidden and head."""
    for name in ("student_hidden", "student_head"):
        inputs[name].grad = None
    nll, kd = fn(**inputs, **kw)
    (weights[0] * nll + weights[1] * kd).backward()
    return nll.detach(), kd.detach(), inputs["student_hidden"].grad, inputs["student_head"].grad


def assert_same(a, b, rtol=1e-5, atol=1e-5):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


@pytest.mark.parametrize(("kind", "params"), CASES, ids=IDS)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_chunked_equals_naive_in_value_and_gradients(kind, params, tau):
    inputs = problem(seed=1)
    kw = dict(kind=kind, temperature=tau, params=params)
    expected = run(naive_distill_loss_sums, inputs, **kw)
    assert expected[1].abs() > 0 or kind in ("js", "skew_kl", "skew_reverse_kl")
    for chunk in (4, 64):  # N = 23 is not a multiple of 4; 64 > N
        assert_same(run(distill_loss_sums, inputs, chunk_size=chunk, **kw), expected)
    assert_same(run(distill_loss_sums, inputs, chunk_size=7, loss_weights=(0.3, 0.7), **kw), expected)


def test_chunks_of_one_token_equal_naive():
    inputs = problem(seed=9)
    expected = run(naive_distill_loss_sums, inputs, kind="skew_reverse_kl", temperature=3.0)
    got = run(distill_loss_sums, inputs, kind="skew_reverse_kl", temperature=3.0, chunk_size=1)
    assert_same(got, expected)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "js"])
def test_chunked_equals_naive_for_bf16_inputs(kind):
    inputs = problem(seed=2, dtype=torch.bfloat16)
    expected = run(naive_distill_loss_sums, inputs, kind=kind, temperature=1.5)
    got = run(distill_loss_sums, inputs, kind=kind, temperature=1.5, chunk_size=5)
    assert got[2].dtype == torch.bfloat16 and got[3].dtype == torch.bfloat16
    assert_same(got[:2], expected[:2], rtol=1e-4, atol=1e-4)   # fp32 arithmetic on both sides
    assert_same(got[2:], expected[2:], rtol=2e-2, atol=2e-3)   # bf16 gradients: one rounding each


@pytest.mark.parametrize(("kind", "params"), CASES, ids=IDS)
def test_chunked_loss_of_extreme_logits_stays_finite(kind, params):
    inputs = problem(seed=11)
    with torch.no_grad():  # logits of order ±1e4: nearly every probability underflows
        inputs["student_hidden"] *= 3e3
        inputs["teacher_hidden"] *= 3e3
    nll, kd, grad_hidden, grad_head = run(distill_loss_sums, inputs, kind=kind, params=params,
                                          temperature=0.7, chunk_size=5)
    assert nll > 1e3 and torch.isfinite(kd)
    assert torch.isfinite(grad_hidden).all() and torch.isfinite(grad_head).all()


def test_each_sum_gets_its_own_gradient():
    inputs = problem(seed=3)
    for weights in ((1.0, 0.0), (0.0, 1.0), (-2.0, 0.5)):
        expected = run(naive_distill_loss_sums, inputs, weights=weights, kind="forward_kl")
        got = run(distill_loss_sums, inputs, weights=weights, kind="forward_kl", chunk_size=5)
        assert_same(got, expected)


def test_masks_are_respected():
    inputs = problem(seed=4)
    nll, kd, grad_hidden, _ = run(distill_loss_sums, inputs, kind="forward_kl", chunk_size=4)
    outside = ~(inputs["nll_mask"] | inputs["kd_mask"])
    assert outside.sum() >= 2 and (grad_hidden[outside] == 0).all()
    assert (grad_hidden[~outside].abs().sum(-1) > 0).all()
    # Changing tokens outside the masks (hidden state and label) changes nothing.
    changed = {k: (v.detach().clone() if v.is_floating_point() else v.clone()) for k, v in inputs.items()}
    changed["student_hidden"][outside] += 100.0
    changed["teacher_hidden"][outside] -= 100.0
    changed["labels"][outside] = 3
    changed["student_hidden"].requires_grad_(True)
    changed["student_head"].requires_grad_(True)
    again = run(distill_loss_sums, changed, kind="forward_kl", chunk_size=4)
    assert_same(again[:2], (nll, kd))
    # A token only in kd_mask adds to kd_sum, not to nll_sum (and the reverse).
    only_kd = inputs["kd_mask"] & ~inputs["nll_mask"]
    assert only_kd.any()
    changed["student_hidden"] = changed["student_hidden"].detach()
    changed["student_hidden"][only_kd] *= 3.0
    nll3, kd3 = distill_loss_sums(**changed, kind="forward_kl", chunk_size=4)
    torch.testing.assert_close(nll3, nll)
    assert not torch.isclose(kd3, kd)


def test_frozen_head_and_no_grad():
    inputs = problem(seed=5)
    inputs["student_head"].requires_grad_(False)
    expected = run(naive_distill_loss_sums, inputs, kind="tvd")
    got = run(distill_loss_sums, inputs, kind="tvd", chunk_size=6)
    assert got[3] is None and expected[3] is None
    assert_same(got[:3], expected[:3])
    with torch.no_grad():
        nll, kd = distill_loss_sums(**inputs, kind="tvd", chunk_size=6)
    assert not nll.requires_grad
    assert_same((nll, kd), expected[:2])


def test_teacher_logits_fn_and_no_teacher():
    inputs = problem(seed=6)
    expected = run(distill_loss_sums, inputs, kind="js", chunk_size=5)
    teacher_logits = inputs["teacher_hidden"] @ inputs["teacher_head"].T  # [N, VT]
    calls = []

    def from_cache(idx):
        calls.append(idx.numel())
        return teacher_logits[idx]

    got = run(distill_loss_sums, dict(inputs, teacher_hidden=None, teacher_head=None), kind="js",
              chunk_size=5, teacher_logits_fn=from_cache, vocab_size=VS)
    assert_same(got, expected)
    assert calls and max(calls) <= 5
    # Without a teacher and without KD tokens the NLL alone is computed.
    nll_only = dict(inputs, teacher_hidden=None, teacher_head=None,
                    kd_mask=torch.zeros(N, dtype=torch.bool))
    nll, kd, _, _ = run(distill_loss_sums, nll_only, kind="forward_kl")
    torch.testing.assert_close(nll, expected[0])
    assert kd == 0


def test_wrong_loss_weights_and_second_backward_are_refused():
    inputs = problem(seed=7)
    nll, kd = distill_loss_sums(**inputs, kind="forward_kl", loss_weights=(0.5, 0.5))
    with pytest.raises(ValueError, match=r"loss_weights=\(0.5, 0.5\)\) expects the loss"):
        (0.2 * nll + 0.8 * kd).backward()
    nll, kd = distill_loss_sums(**inputs, kind="forward_kl")
    (nll + kd).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        (nll + kd).backward()


def test_bad_inputs_are_named():
    inputs = problem(seed=8)
    with pytest.raises(ValueError, match=r"unknown divergence kind 'fkl'; choose one of forward_kl"):
        distill_loss_sums(**inputs, kind="fkl")
    with pytest.raises(ValueError, match=r"'tvd' has no parameter 'beta'"):
        distill_loss_sums(**inputs, kind="tvd", params={"beta": 0.5})
    bad = dict(inputs, labels=inputs["labels"].where(~inputs["nll_mask"], VS - 1))
    with pytest.raises(ValueError, match=r"labels under nll_mask must lie in \[0, 12\)"):
        distill_loss_sums(**bad, kind="tvd", vocab_size=12)
    bad = dict(inputs, labels=torch.full((N,), -100))
    with pytest.raises(ValueError, match=r"-100 marks a position without a target"):
        distill_loss_sums(**bad, kind="tvd")
    with pytest.raises(ValueError, match="kd_mask selects tokens but no teacher was given"):
        distill_loss_sums(**dict(inputs, teacher_hidden=None, teacher_head=None), kind="tvd")
    with pytest.raises(ValueError, match=r"chunk_size=0 must be a positive integer"):
        distill_loss_sums(**inputs, kind="tvd", chunk_size=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("kind", "params"), CASES, ids=IDS)
def test_chunked_equals_naive_on_gpu(kind, params, dtype):
    on_cpu = problem(seed=10, dtype=dtype)
    inputs = {k: v.detach().cuda().requires_grad_(v.requires_grad) for k, v in on_cpu.items()}
    kw = dict(kind=kind, temperature=2.0, params=params)
    expected = run(naive_distill_loss_sums, inputs, **kw)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    got = run(distill_loss_sums, inputs, chunk_size=7, **kw)
    assert got[2].is_cuda and got[3].dtype == dtype
    assert_same(got[:2], expected[:2], rtol=1e-4, atol=1e-4)
    assert_same(got[2:], expected[2:], **tol)
    weighted = run(distill_loss_sums, inputs, chunk_size=7, loss_weights=(0.3, 0.7), **kw)
    assert_same(weighted[2:], expected[2:], **tol)


@pytest.mark.parametrize(("kind", "params"), [("forward_kl", {}), ("reverse_kl", {}), ("js", {"beta": 0.3})])
def test_row_weights_weigh_each_token(kind, params):
    """Per-token weights: chunked equals naive, and equals Σ w·(per-token loss) of unweighted calls."""
    inputs = problem(seed=13)
    g = torch.Generator().manual_seed(14)
    weights = (torch.rand(N, generator=g), torch.rand(N, generator=g) * 3)
    kw = dict(kind=kind, temperature=1.5, params=params, row_weights=weights)
    expected = run(naive_distill_loss_sums, inputs, **kw)
    assert_same(run(distill_loss_sums, inputs, chunk_size=5, **kw), expected)
    assert_same(run(distill_loss_sums, inputs, chunk_size=5, loss_weights=(0.3, 0.7), **kw), expected)
    # The weighted NLL sum is Σ_i w_i · nll_i, token by token.
    per_token = []
    for i in range(N):
        one = torch.zeros(N, dtype=torch.bool)
        one[i] = True
        nll, _ = distill_loss_sums(**dict(inputs, nll_mask=inputs["nll_mask"] & one,
                                          kd_mask=inputs["kd_mask"] & one), kind=kind, params=params,
                                   temperature=1.5)
        per_token.append(float(nll.detach()))
    torch.testing.assert_close(expected[0], (torch.tensor(per_token) * weights[0]).sum(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"row_weights must be two \[23\] float tensors"):
        distill_loss_sums(**inputs, kind=kind, row_weights=(weights[0], -weights[1]))
