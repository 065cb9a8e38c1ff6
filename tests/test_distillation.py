"""Tests for ``jaxloss.linear_distillation``, the fused teacher-student divergence.

Oracles: the materialised formulas written out below on ``[N, V]`` logits (values and
gradients for every divergence, β, τ, mask, reduction and chunk geometry), a float64 closed form
of the student-logit gradient, ``jax.test_util.check_grads`` and torch autograd of the same
formulas (``F.kl_div`` with log-targets). Besides: bf16 accumulation, ``-inf`` logits, masks,
misuse errors and the memory bound at a large-vocabulary shape (compiled only). The 8-device
sharding checks are in ``distillation_sharding_checks.py``, run by ``test_sharding.py``.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest
import torch
from jax.experimental import checkify
from jax.test_util import check_grads

import jaxloss
from jaxloss import _distillation_reference as reference
from jaxloss._blockwise import online

N, D, D_T, V = 13, 8, 5, 29
DIVERGENCES = ("kl", "reverse_kl", "jsd")


def _problem(seed=0, n=N, dtype=jnp.float32, scale=1.0):
    """Student (hidden, kernel, bias), teacher (hidden, kernel, bias) and a mask, NumPy-drawn."""
    rng = np.random.default_rng(seed)
    arrays = (
        rng.standard_normal((n, D)),
        (2 * scale / np.sqrt(D)) * rng.standard_normal((D, V)),
        rng.standard_normal(V),
        rng.standard_normal((n, D_T)),
        (3 * scale / np.sqrt(D_T)) * rng.standard_normal((D_T, V)),
        rng.standard_normal(V),
    )
    mask = rng.random(n) > 0.3
    return tuple(jnp.asarray(a, dtype) for a in arrays), jnp.asarray(mask)


# The materialised definition every form is tested against (values and autodiff gradients).
_materialised = reference.reference_loss


@functools.partial(jax.jit, static_argnums=(0,))
def _value_and_vjp(loss_fn, student, teacher, cotangent):
    """The loss and the VJP of ``cotangent`` in the student's hidden, kernel and bias."""
    value, vjp = jax.vjp(lambda *s: loss_fn(*s, *teacher), *student)
    return value, vjp(cotangent.reshape(value.shape).astype(value.dtype))


def _compare(options, chunks=(4, 6), seed=0, masked=True, rtol=2e-5):
    (*student, th, tk, tb), mask = _problem(seed)
    options = {**options, "mask": mask if masked else None}
    fused = functools.partial(
        jaxloss.linear_distillation, token_chunk=chunks[0], vocab_chunk=chunks[1], **options
    )
    dense = functools.partial(_materialised, **options)
    cotangent = jnp.asarray(np.random.default_rng(seed + 1).standard_normal(N), jnp.float32)
    if options.get("reduction", "mean") != "none":
        cotangent = cotangent[:1]

    def fused_fn(h, k, b, th, tk, tb):
        return fused(h, k, th, tk, bias=b, teacher_bias=tb)

    got = _value_and_vjp(fused_fn, tuple(student), (th, tk, tb), cotangent)
    want = _value_and_vjp(dense, tuple(student), (th, tk, tb), cotangent)
    names = ("loss", "d hidden", "d kernel", "d bias")
    for name, g, w in zip(names, (got[0], *got[1]), (want[0], *want[1]), strict=True):
        assert g.dtype == w.dtype, name
        assert np.all(np.isfinite(w)), name
        scale = float(jnp.max(jnp.abs(w)))
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * scale, err_msg=name)


# Every divergence under the default mean, a sum with β and τ, and per token at a low τ.
OPTIONS = {
    "mean": {},
    "sum-beta-temperature": {"reduction": "sum", "beta": 0.2, "temperature": 2.5},
    "none-cold": {"reduction": "none", "temperature": 0.5, "beta": 0.9},
}


@pytest.mark.parametrize("name", OPTIONS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matches_materialised(divergence, name):
    _compare({"divergence": divergence, **OPTIONS[name]})


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matches_materialised_without_mask(divergence):
    _compare({"divergence": divergence, "temperature": 1.5}, masked=False)


# (token_chunk, vocab_chunk) against N=13, V=29: unit chunks, uneven last chunks in one or both
# axes, chunks that divide exactly, chunks larger than the sizes. The block loops are shared by
# every divergence; the JSD's second pass gets two geometries of its own.
@pytest.mark.parametrize(
    ("divergence", "chunks"),
    [("kl", (1, 1)), ("reverse_kl", (13, 7)), ("jsd", (5, 29)), ("jsd", (64, 1024))],
)
def test_chunk_geometry(divergence, chunks):
    _compare({"divergence": divergence, "temperature": 1.3, "reduction": "none"}, chunks)


def test_jsd_beta_endpoints_are_zero():
    """β = 0 or 1 make the mixture one of the two distributions: the JSD is exactly 0."""
    (h, k, b, th, tk, tb), _ = _problem()
    for beta in (0.0, 1.0):
        f = lambda h: jaxloss.linear_distillation(
            h, k, th, tk, bias=b, teacher_bias=tb, divergence="jsd", beta=beta, reduction="sum"
        )
        value, grad = jax.jit(jax.value_and_grad(f))(h)
        assert abs(float(value)) < 1e-5
        np.testing.assert_allclose(grad, 0, atol=1e-5)


def test_jsd_symmetry():
    """JSD_β(t, s) = JSD_{1-β}(s, t): swapping the heads and β gives the same value."""
    (h, k, b, th, tk, tb), _ = _problem()
    tk_wide = jnp.concatenate([tk, jnp.zeros((D - D_T, V))])  # same hidden size for the swap
    th_wide = jnp.concatenate([th, jnp.ones((N, D - D_T))], 1)
    a = jaxloss.linear_distillation(
        h,
        k,
        th_wide,
        tk_wide,
        divergence="jsd",
        beta=0.3,
        bias=b,
        teacher_bias=tb,
        reduction="none",
    )
    swapped = jaxloss.linear_distillation(
        th_wide,
        tk_wide,
        h,
        k,
        divergence="jsd",
        beta=0.7,
        bias=tb,
        teacher_bias=b,
        reduction="none",
    )
    np.testing.assert_allclose(a, swapped, rtol=1e-5, atol=1e-7)


def test_batch_shape_and_teacher_hidden_size():
    (h, k, _, th, tk, _), mask = _problem(n=12)
    shaped = jaxloss.linear_distillation(
        h.reshape(3, 4, D),
        k,
        th.reshape(3, 4, D_T),
        tk,
        mask=mask.reshape(3, 4),
        reduction="none",
        vocab_chunk=7,
    )
    flat = jaxloss.linear_distillation(h, k, th, tk, mask=mask, reduction="none", vocab_chunk=7)
    assert shaped.shape == (3, 4)
    np.testing.assert_array_equal(shaped.reshape(-1), flat)
    mean = jaxloss.linear_distillation(h.reshape(2, 6, D), k, th.reshape(2, 6, D_T), tk)
    np.testing.assert_allclose(mean, _materialised(h, k, None, th, tk, None), rtol=1e-6)


def test_teacher_gets_no_gradient():
    (h, k, b, th, tk, tb), mask = _problem()

    def loss(th, tk, tb):
        return jaxloss.linear_distillation(
            h, k, th, tk, bias=b, teacher_bias=tb, mask=mask, divergence="jsd"
        )

    for g in jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(th, tk, tb):
        np.testing.assert_array_equal(g, jnp.zeros_like(g))


# ----------------------------------------------------------------------------------------------
# Masks, -inf logits, degenerate rows, empty batches
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_all_masked_mean_is_nan_with_zero_gradients(divergence):
    (h, k, b, th, tk, tb), _ = _problem()
    mask = jnp.zeros((N,), bool)

    def loss(h, k, b, reduction):
        return jaxloss.linear_distillation(
            h,
            k,
            th,
            tk,
            bias=b,
            teacher_bias=tb,
            mask=mask,
            divergence=divergence,
            reduction=reduction,
        )

    assert np.isnan(loss(h, k, b, "mean"))
    assert loss(h, k, b, "sum") == 0
    for g in jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(h, k, b, "mean"):
        np.testing.assert_array_equal(g, jnp.zeros_like(g))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_degenerate_rows_are_nan_unless_masked(divergence):
    """A token whose teacher logits are all -inf has no distribution: NaN, contained by the mask."""
    (h, k, _, th, tk, _), _ = _problem()
    # Teacher logits z_t = th @ tk + tb: a -inf hidden feature times positive weights is -inf.
    tk = jnp.abs(tk)
    th = th.at[3, 0].set(-jnp.inf)
    per_token = jaxloss.linear_distillation(h, k, th, tk, divergence=divergence, reduction="none")
    assert np.isnan(per_token[3]) and np.all(np.isfinite(np.delete(np.asarray(per_token), 3)))
    mask = jnp.ones((N,), bool).at[3].set(False)

    def loss(h, k):
        return jaxloss.linear_distillation(h, k, th, tk, divergence=divergence, mask=mask)

    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(h, k)
    want = _materialised(h, k, None, th.at[3].set(0), tk, None, divergence=divergence, mask=mask)
    np.testing.assert_allclose(value, want, rtol=2e-5)
    assert all(np.all(np.isfinite(g)) for g in grads)


def _masked_vocabulary(seed=0):
    """Problem data whose biases put -inf on some classes (teacher, student or both)."""
    (h, k, b, th, tk, tb), mask = _problem(seed)
    both, teacher_only, student_only = (jnp.array(c) for c in ([0, 7], [3, 20], [11, 28]))
    tb = tb.at[jnp.concatenate([both, teacher_only])].set(-jnp.inf)
    b = b.at[jnp.concatenate([both, student_only])].set(-jnp.inf)
    return (h, k, b, th, tk, tb), mask, (both, teacher_only, student_only)


@pytest.mark.slow  # ~20 s here
def test_neg_inf_logits_where_both_or_teacher_only():
    """kl and jsd ignore classes the teacher rules out; every divergence ignores shared -inf."""
    (h, k, b, th, tk, tb), mask, (both, teacher_only, student_only) = _masked_vocabulary()
    cases = {
        # -inf in the teacher only: kl and jsd finite (p_t = 0 there adds nothing).
        "kl": (b.at[student_only].set(0.5), tb),
        "jsd": (b, tb),
        # -inf in both only: reverse_kl finite too.
        "reverse_kl": (b.at[student_only].set(0.5), tb.at[teacher_only].set(0.1)),
    }
    for divergence, (b_case, tb_case) in cases.items():
        for chunks in ((4, 6), (13, 5)):
            fused = lambda h, k, b: jaxloss.linear_distillation(
                h,
                k,
                th,
                tk,
                bias=b,
                teacher_bias=tb_case,
                mask=mask,
                divergence=divergence,
                token_chunk=chunks[0],
                vocab_chunk=chunks[1],
                temperature=1.5,
            )
            dense = lambda h, k, b: _materialised(
                h, k, b, th, tk, tb_case, mask=mask, divergence=divergence, temperature=1.5
            )
            (got, got_grads), (want, want_grads) = (
                jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(h, k, b_case)
                for f in (fused, dense)
            )
            assert np.isfinite(got), divergence
            np.testing.assert_allclose(got, want, rtol=2e-5, err_msg=divergence)
            for g, w in zip(got_grads, want_grads, strict=True):
                assert np.all(np.isfinite(g)), divergence
                np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-6, err_msg=divergence)
            assert not np.any(got_grads[2][both]), "a -inf class got a gradient"


def test_neg_inf_where_the_other_is_finite_is_infinite():
    """Mass where the other distribution has none: kl (student -inf) and reverse_kl are inf."""
    (h, k, b, th, tk, tb), _, _ = _masked_vocabulary()
    for divergence, (b_case, tb_case) in {
        "kl": (b, jnp.zeros(V)),  # student -inf at classes where the teacher is finite
        "reverse_kl": (jnp.zeros(V), tb),  # teacher -inf where the student is finite
    }.items():
        per_token = jaxloss.linear_distillation(
            h,
            k,
            th,
            tk,
            bias=b_case,
            teacher_bias=tb_case,
            divergence=divergence,
            reduction="none",
            vocab_chunk=6,
        )
        assert np.all(np.isposinf(per_token)), (divergence, per_token)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_empty_batch(reduction):
    h, k, th, tk = jnp.zeros((0, D)), jnp.ones((D, V)), jnp.zeros((0, D_T)), jnp.ones((D_T, V))
    got = jaxloss.linear_distillation(h, k, th, tk, reduction=reduction)
    want = _materialised(h, k, None, th, tk, None, reduction=reduction)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow  # test_huge_logits_are_exact holds saturated softmaxes by default
def test_large_logits_are_stable(x64):
    """Logits in the hundreds (saturated softmaxes) against the formulas in float64.

    The fused loss runs in float32; its gradients are held to float32's roundoff of logits of
    that size propagated through the kernel (the true reverse-KL and JSD gradients are ~0 here,
    and ``p_s (log p_s/p_t - KL)`` cancels in every floating-point evaluation).
    """
    (h, k, _, th, tk, _), mask = _problem(scale=200.0)
    assert float(jnp.max(jnp.abs(th @ tk))) > 300
    roundoff = 1e-6 * float(jnp.max(jnp.abs(h @ k))) * float(jnp.max(jnp.abs(k)))
    for divergence in DIVERGENCES:
        f = lambda h, k: jaxloss.linear_distillation(
            h, k, th, tk, mask=mask, divergence=divergence, vocab_chunk=5
        )
        g = lambda h, k: _materialised(
            *(x.astype(jnp.float64) for x in (h, k)),
            None,
            *(x.astype(jnp.float64) for x in (th, tk)),
            None,
            mask=mask,
            divergence=divergence,
        )
        (vf, gf), (vd, gd) = (jax.jit(jax.value_and_grad(fn, (0, 1)))(h, k) for fn in (f, g))
        assert vf.dtype == jnp.float32 and vd.dtype == jnp.float64
        np.testing.assert_allclose(vf, vd, rtol=1e-5, err_msg=divergence)
        for a, w in zip(gf, gd, strict=True):
            assert np.all(np.isfinite(a)) and np.all(np.isfinite(w)), divergence
            np.testing.assert_allclose(a, w, rtol=1e-4, atol=roundoff, err_msg=divergence)


# ----------------------------------------------------------------------------------------------
# float64: closed-form gradient, finite differences, torch autograd
# ----------------------------------------------------------------------------------------------

OPTIONS_64 = dict(beta=0.35, temperature=1.7)


def _numpy_closed_form(student, teacher, mask, divergence):
    """Mean loss and its gradients from ``∂ℓ/∂z_s`` written out in NumPy float64."""
    h, k, b = (np.asarray(x, np.float64) for x in student)
    th, tk, tb = (np.asarray(x, np.float64) for x in teacher)
    tau, beta, m = OPTIONS_64["temperature"], OPTIONS_64["beta"], np.asarray(mask, np.float64)

    def log_softmax(z):
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    ls, lt = log_softmax((h @ k + b) / tau), log_softmax((th @ tk + tb) / tau)
    ps, pt = np.exp(ls), np.exp(lt)
    if divergence == "kl":
        per_token = np.sum(pt * (lt - ls), 1)
        slope = ps - pt  # ∂ KL(p_t‖p_s) / ∂(z_s/τ)
    elif divergence == "reverse_kl":
        per_token = np.sum(ps * (ls - lt), 1)
        slope = ps * (ls - lt - per_token[:, None])
    else:
        lm = np.log(beta * pt + (1 - beta) * ps)
        kl_s = np.sum(ps * (ls - lm), 1)
        per_token = beta * np.sum(pt * (lt - lm), 1) + (1 - beta) * kl_s
        slope = (1 - beta) * ps * (ls - lm - kl_s[:, None])
    count = m.sum()
    value = tau**2 * np.sum(m * per_token) / count
    dz = (tau**2 / tau) * slope * (m / count)[:, None]
    return value, (dz @ k.T, h.T @ dz, dz.sum(0))


def _fused_mean(student, teacher, mask, divergence, chunks=(4, 6)):
    h, k, b = student
    th, tk, tb = teacher
    return jaxloss.linear_distillation(
        h,
        k,
        th,
        tk,
        bias=b,
        teacher_bias=tb,
        mask=mask,
        divergence=divergence,
        token_chunk=chunks[0],
        vocab_chunk=chunks[1],
        **OPTIONS_64,
    )


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_float64_closed_form_gradient(x64, divergence):
    (*student, th, tk, tb), mask = _problem(dtype=jnp.float64)
    f = lambda *s: _fused_mean(s, (th, tk, tb), mask, divergence)
    value, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(*student)
    assert value.dtype == jnp.float64
    want_value, want_grads = _numpy_closed_form(student, (th, tk, tb), mask, divergence)
    np.testing.assert_allclose(value, want_value, rtol=1e-12)
    for g, w in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_float64_finite_differences(x64, divergence):
    (*student, th, tk, tb), mask = _problem(n=5, dtype=jnp.float64)
    f = lambda *s: _fused_mean(s, (th, tk, tb), mask, divergence, chunks=(2, 7))
    check_grads(jax.jit(f), tuple(student), order=1, modes=("rev",))


def _torch_mean(student, teacher, mask, divergence):
    """The same formulas in torch float64 (``F.kl_div`` with log-targets), through autograd."""
    tau, beta = OPTIONS_64["temperature"], OPTIONS_64["beta"]
    h, k, b = (torch.tensor(np.asarray(x), requires_grad=True) for x in student)
    th, tk, tb = (torch.tensor(np.asarray(x)) for x in teacher)
    ls = torch.log_softmax((h @ k + b) / tau, -1)
    lt = torch.log_softmax((th @ tk + tb) / tau, -1)

    def kl(log_p, log_q):  # KL(p‖q) per row
        return torch.nn.functional.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)

    if divergence == "kl":
        per_token = kl(lt, ls)
    elif divergence == "reverse_kl":
        per_token = kl(ls, lt)
    else:
        lm = torch.logaddexp(lt + np.log(beta), ls + np.log1p(-beta))
        per_token = beta * kl(lt, lm) + (1 - beta) * kl(ls, lm)
    m = torch.tensor(np.asarray(mask))
    loss = tau**2 * per_token[m].mean()
    loss.backward()
    return loss.item(), tuple(x.grad.numpy() for x in (h, k, b))  # type: ignore[union-attr]


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matches_torch_autograd(x64, divergence):
    (*student, th, tk, tb), mask = _problem(seed=3, dtype=jnp.float64)
    f = lambda *s: _fused_mean(s, (th, tk, tb), mask, divergence, chunks=(5, 8))
    value, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(*student)
    want_value, want_grads = _torch_mean(student, (th, tk, tb), mask, divergence)
    np.testing.assert_allclose(value, want_value, rtol=1e-12)
    for g, w in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-13)


# ----------------------------------------------------------------------------------------------
# Half precision
# ----------------------------------------------------------------------------------------------


def _dot_output_dtypes(jaxpr) -> list[str]:
    return re.findall(r"(\w+)\[[\d,]*\] = dot_general", str(jaxpr))


# The accumulation is the engine's, shared by the three divergences: jsd (which reads both
# directions) by default, the others in the full run.
@pytest.mark.parametrize(
    "divergence",
    [d if d == "jsd" else pytest.param(d, marks=pytest.mark.slow) for d in DIVERGENCES],
)
def test_bf16_accumulates_in_float32(divergence):
    (*student, th, tk, tb), mask = _problem(n=37)
    low = [x.astype(jnp.bfloat16) for x in student]
    teacher = [x.astype(jnp.bfloat16) for x in (th, tk, tb)]

    def f(h, k, b):
        return jaxloss.linear_distillation(
            h,
            k,
            teacher[0],
            teacher[1],
            bias=b,
            teacher_bias=teacher[2],
            mask=mask[:37],
            divergence=divergence,
            temperature=1.5,
            token_chunk=8,
            vocab_chunk=16,
        )

    value, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(*low)
    assert value.dtype == jnp.bfloat16
    assert [g.dtype for g in grads] == [jnp.bfloat16] * 3
    # The reference sees the same bf16 numbers but computes in float32 throughout.
    up = [x.astype(jnp.float32) for x in low]
    t_up = [x.astype(jnp.float32) for x in teacher]
    dense = lambda h, k, b: _materialised(
        h, k, b, *t_up, mask=mask[:37], divergence=divergence, temperature=1.5
    )
    want, want_grads = jax.jit(jax.value_and_grad(dense, argnums=(0, 1, 2)))(*up)
    np.testing.assert_allclose(np.float32(value), want, rtol=2**-7)
    for g, w in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(
            np.float32(g), w, rtol=2**-6, atol=2**-6 * float(jnp.max(jnp.abs(w)))
        )
    dots = _dot_output_dtypes(jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2)))(*low))
    assert dots and set(dots) == {"f32"}, dots


# ----------------------------------------------------------------------------------------------
# Misuse
# ----------------------------------------------------------------------------------------------

_H, _K, _TH, _TK = jnp.zeros((4, 3)), jnp.zeros((3, 5)), jnp.zeros((4, 2)), jnp.zeros((2, 5))
MISUSE = {
    "integer hidden": (TypeError, "`hidden`", (_H.astype(int), _K, _TH, _TK), {}),
    "integer teacher_kernel": (TypeError, "`teacher_kernel`", (_H, _K, _TH, _TK.astype(int)), {}),
    "kernel rows != D": (ValueError, "`kernel`", (_H, jnp.zeros((4, 5)), _TH, _TK), {}),
    "teacher kernel rows": (ValueError, "`teacher_kernel`", (_H, _K, _TH, jnp.zeros((3, 5))), {}),
    "teacher classes": (ValueError, "`teacher_kernel`", (_H, _K, _TH, jnp.zeros((2, 6))), {}),
    "teacher tokens": (ValueError, "`teacher_hidden`", (_H, _K, jnp.zeros((3, 2)), _TK), {}),
    "scalar hidden": (ValueError, "`hidden`", (jnp.zeros(()), _K, _TH, _TK), {}),
    "bias shape": (ValueError, "`bias`", (_H, _K, _TH, _TK), {"bias": jnp.zeros(4)}),
    "teacher_bias shape": (
        ValueError,
        "`teacher_bias`",
        (_H, _K, _TH, _TK),
        {"teacher_bias": jnp.zeros(6)},
    ),
    "mask dtype": (TypeError, "`mask`", (_H, _K, _TH, _TK), {"mask": jnp.ones(4)}),
    "mask shape": (ValueError, "`mask`", (_H, _K, _TH, _TK), {"mask": jnp.ones(3, bool)}),
    "divergence": (ValueError, "`divergence`", (_H, _K, _TH, _TK), {"divergence": "js"}),
    "beta": (ValueError, "`beta`", (_H, _K, _TH, _TK), {"beta": 1.5}),
    "temperature 0": (ValueError, "`temperature`", (_H, _K, _TH, _TK), {"temperature": 0.0}),
    "temperature inf": (ValueError, "`temperature`", (_H, _K, _TH, _TK), {"temperature": np.inf}),
    "temperature array": (
        ValueError,
        "`temperature`",
        (_H, _K, _TH, _TK),
        {"temperature": jnp.float32(-1.0)},
    ),
    "beta array": (ValueError, "`beta`", (_H, _K, _TH, _TK), {"beta": jnp.float32(1.5)}),
    "temperature string": (TypeError, "`temperature`", (_H, _K, _TH, _TK), {"temperature": "2"}),
    "temperature vector": (
        ValueError,
        "`temperature`",
        (_H, _K, _TH, _TK),
        {"temperature": jnp.ones(2)},
    ),
    "reduction": (ValueError, "`reduction`", (_H, _K, _TH, _TK), {"reduction": "batchmean"}),
    "token_chunk 0": (ValueError, "`token_chunk`", (_H, _K, _TH, _TK), {"token_chunk": 0}),
    "vocab_chunk float": (TypeError, "`vocab_chunk`", (_H, _K, _TH, _TK), {"vocab_chunk": 2.0}),
    "axes without mesh": (ValueError, "`mesh`", (_H, _K, _TH, _TK), {"vocab_axis": "model"}),
}


@pytest.fixture
def package_errors_only():
    """The package's own messages, as a user without runtime type checking gets them (the
    suite's jaxtyping hook, when on, would raise its own TypeCheckError first)."""
    before = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    yield
    jaxtyping.config.update("jaxtyping_disable", before)


@pytest.mark.usefixtures("package_errors_only")
@pytest.mark.parametrize("case", MISUSE)
def test_misuse_names_the_argument(case):
    error, name, args, kwargs = MISUSE[case]
    with pytest.raises(error, match=re.escape(name)) as info:
        jaxloss.linear_distillation(*args, **kwargs)
    assert "linear_distillation" in str(info.value)


@pytest.mark.usefixtures("package_errors_only")
def test_mesh_axis_errors():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    with pytest.raises(ValueError, match="not in the mesh"):
        jaxloss.linear_distillation(_H, _K, _TH, _TK, mesh=mesh, vocab_axis="model")
    with pytest.raises(ValueError, match="different mesh axes"):
        jaxloss.linear_distillation(
            _H, _K, _TH, _TK, mesh=mesh, vocab_axis="data", batch_axis="data"
        )


# ----------------------------------------------------------------------------------------------
# Memory (compiled only; nothing runs)
# ----------------------------------------------------------------------------------------------

BIG_N, BIG_D, BIG_V = 8192, 2048, 131072


def _temp_bytes(loss_fn, *shapes) -> int:
    args = [jax.ShapeDtypeStruct(s, dtype) for s, dtype in shapes]
    compiled = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow  # compiles at an LLM shape
@pytest.mark.parametrize("divergence", ["kl", "jsd"])
def test_memory_within_twice_linear_cross_entropy(divergence):
    """value_and_grad at N=8192, D=2048, V=131072 f32: each [N, V] logit matrix would be 4 GiB."""
    f32 = jnp.float32
    student = [((BIG_N, BIG_D), f32), ((BIG_D, BIG_V), f32)]
    fused = _temp_bytes(
        lambda h, k, th, tk: jaxloss.linear_distillation(h, k, th, tk, divergence=divergence),
        *student,
        *student,
    )
    linear = _temp_bytes(jaxloss.linear_cross_entropy, *student, ((BIG_N,), jnp.int32))
    assert fused <= 2 * linear, (
        f"{fused / 2**20:.1f} MiB vs linear_cross_entropy {linear / 2**20:.1f}"
    )
    assert fused < BIG_N * BIG_V * 4 // 16, "temporaries on the scale of the logits"


# ----------------------------------------------------------------------------------------------
# Extremes (issue 19)
# ----------------------------------------------------------------------------------------------

# Logits a few ulps below a huge top, exactly representable in the dtype (2^26 in bfloat16 too).
HUGE = {"float32": (2.0**26, 8.0), "float64": (2.0**56, 16.0), "bfloat16": (2.0**26, 8.0)}
HUGE_RTOL = {"float32": 1e-6, "float64": 1e-13, "bfloat16": 2**-7}
# The reverse-KL and JSD slopes p_s (log p_s/p_t - KL) cancel (8.0000 - 7.9950 here) in any
# evaluation: the gradients are held to that conditioning (the old error was of order 1).
HUGE_GRAD_RTOL = {"float32": 1e-3, "float64": 1e-8, "bfloat16": 2**-6}


@pytest.mark.parametrize(
    "dtype", [pytest.param(d, marks=pytest.mark.slow) if d == "float64" else d for d in HUGE]
)
def test_huge_logits_are_exact(dtype):
    """``lse_t - lse_s`` rounded each log-sum-exp to its max first (off by O(1) at 2^26 in
    float32): the log-sums are now kept apart from the shifts, as ``log_softmax`` does."""
    top, ulp = HUGE[dtype]
    with jax.enable_x64(dtype == "float64"):
        ones, kernel = jnp.ones((2, 1), dtype), jnp.full((1, 4), top, dtype)
        bias = jnp.asarray([0.0, -ulp, -2 * ulp, -3 * ulp], dtype)
        teacher_bias = jnp.asarray([-ulp, 0.0, -3 * ulp, -ulp], dtype)

        def every_divergence(loss):
            def f(k, b):
                return {d: loss(k, b, d) for d in DIVERGENCES}

            return jax.jit(lambda k, b: jax.tree.map(
                lambda d: jax.value_and_grad(lambda k, b: f(k, b)[d], (0, 1))(k, b),
                {d: d for d in DIVERGENCES},
            ))  # fmt: skip

        fused = every_divergence(
            lambda k, b, d: jaxloss.linear_distillation(
                ones, k, ones, kernel, bias=b, teacher_bias=teacher_bias, divergence=d,
                vocab_chunk=3, beta=0.3,
            )
        )(kernel, bias)  # fmt: skip
        wide = jnp.float32 if dtype == "bfloat16" else dtype  # the oracle's logits exact
        dense = every_divergence(
            lambda k, b, d: _materialised(
                ones.astype(wide), k, b, ones.astype(wide), kernel.astype(wide),
                teacher_bias.astype(wide), divergence=d, beta=0.3,
            )
        )(kernel.astype(wide), bias.astype(wide))  # fmt: skip
        rtol = HUGE_GRAD_RTOL[dtype]
        for d in DIVERGENCES:
            (value, grads), (want, want_grads) = fused[d], dense[d]
            assert value.dtype == jnp.dtype(dtype)
            np.testing.assert_allclose(np.float64(value), want, rtol=HUGE_RTOL[dtype], err_msg=d)
            for name, g, w in zip(("kernel", "bias"), grads, want_grads, strict=True):
                w = np.asarray(w, np.float64)
                np.testing.assert_allclose(
                    np.asarray(g, np.float64), w, rtol=rtol, atol=rtol * np.max(np.abs(w)),
                    err_msg=f"{d}: {name}",
                )  # fmt: skip


@pytest.mark.parametrize(
    "chunks", [(4, 6), *(pytest.param(c, marks=pytest.mark.slow) for c in [(1, 1), (N, V)])]
)
def test_non_finite_hidden_at_masked_tokens_contributes_nothing(chunks):
    """Padded positions may hold NaN/inf hidden states (student's or teacher's): a masked token
    adds nothing to the value or any gradient, and its own hidden gradient is 0."""
    (h, k, b, th, tk, tb), mask = _problem()
    masked = [int(i) for i in np.flatnonzero(~np.asarray(mask))[:2]]
    poisoned_h = h.at[masked[0]].set(jnp.nan).at[masked[1], 0].set(-jnp.inf)
    poisoned_th = th.at[masked[1]].set(jnp.inf)

    def run(loss_fn, h, th):
        def f(h, k, b):
            return {d: loss_fn(h, k, b, th, tk, tb, divergence=d, mask=mask) for d in DIVERGENCES}

        return jax.jit(lambda h, k, b: {
            d: jax.value_and_grad(lambda *s: f(*s)[d], (0, 1, 2))(h, k, b) for d in DIVERGENCES
        })(h, k, b)  # fmt: skip

    def fused(h, k, b, th, tk, tb, **options):
        return jaxloss.linear_distillation(
            h, k, th, tk, bias=b, teacher_bias=tb, token_chunk=chunks[0], vocab_chunk=chunks[1],
            **options,
        )  # fmt: skip

    got, want = run(fused, poisoned_h, poisoned_th), run(_materialised, h, th)
    for d in DIVERGENCES:
        names = ("loss", "hidden", "kernel", "bias")
        for name, g, w in zip(names, (got[d][0], *got[d][1]), (want[d][0], *want[d][1]),
                              strict=True):  # fmt: skip
            assert np.all(np.isfinite(g)), f"{d}: {name}"
            scale = float(jnp.max(jnp.abs(w)))
            np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5 * scale, err_msg=f"{d}: {name}")
        np.testing.assert_array_equal(np.asarray(got[d][1][0])[masked], 0.0)


# ----------------------------------------------------------------------------------------------
# β and τ are data (issue 19, item 6)
# ----------------------------------------------------------------------------------------------


def test_fifty_temperatures_and_betas_compile_once(monkeypatch):
    """A schedule of Python floats traces (and compiles) once; they were static arguments, one
    compilation each."""
    from jaxloss import _distillation

    traces, check = [], _distillation._check_options

    def counted(*args):  # runs once per trace of linear_distillation's body
        traces.append(args)
        return check(*args)

    monkeypatch.setattr(_distillation, "_check_options", counted)
    (h, k, _, th, tk, _), mask = _problem(n=6)  # shapes of this test only: a cold cache
    for i in range(50):
        temperature, beta = 0.5 + i / 20, i / 49  # β = 0 and β = 1 among them
        loss = jaxloss.linear_distillation(
            h, k, th, tk, divergence="jsd", temperature=temperature, beta=beta, mask=mask,
            vocab_chunk=7,
        )  # fmt: skip
        if i in (0, 17, 49):
            want = _materialised(h, k, None, th, tk, None, divergence="jsd", mask=mask,
                                 temperature=temperature, beta=beta)  # fmt: skip
            np.testing.assert_allclose(loss, want, rtol=2e-5, atol=1e-7, err_msg=str(i))
    assert len(traces) == 1, f"{len(traces)} traces"


def test_traced_temperature_and_beta_under_jit():
    """A schedule computed inside ``jit`` (it failed with JAX's "Non-hashable static
    arguments"): values and gradients as the formula's at each value, one trace."""
    (h, k, b, th, tk, tb), mask = _problem()
    traces = []

    @jax.jit
    def step(temperature, beta, k):
        traces.append(None)
        return jax.value_and_grad(
            lambda k: jaxloss.linear_distillation(
                h, k, th, tk, bias=b, teacher_bias=tb, mask=mask, divergence="jsd",
                temperature=temperature, beta=beta, vocab_chunk=6,
            )
        )(k)  # fmt: skip

    for temperature, beta in ((0.7, 0.0), (2.5, 0.3), (1.0, 1.0)):
        got = step(jnp.float32(temperature), jnp.float32(beta), k)
        want = jax.value_and_grad(
            lambda k: _materialised(h, k, b, th, tk, tb, divergence="jsd", mask=mask,
                                    temperature=temperature, beta=beta)
        )(k)  # fmt: skip
        for g, w in zip(got, want, strict=True):
            scale = float(jnp.max(jnp.abs(w)))
            np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6 * scale + 1e-7)
    assert len(traces) == 1


def test_traced_temperature_is_checkable_with_checkify():
    """The documented recipe for a traced τ (concrete ones raise ``ValueError``)."""
    (h, k, _, th, tk, _), _ = _problem()

    def step(temperature, beta):
        jaxloss.check_hyperparameters(temperature=temperature, beta=beta)
        return jaxloss.linear_distillation(
            h, k, th, tk, temperature=temperature, beta=beta, divergence="jsd"
        )

    checked = jax.jit(checkify.checkify(step))
    error, _ = checked(jnp.float32(-1.0), jnp.float32(0.5))
    assert "temperature must be finite and > 0, got -1" in str(error.get())
    error, _ = checked(jnp.float32(1.0), jnp.float32(1.5))
    assert "beta must lie in [0, 1], got 1.5" in str(error.get())
    error, value = checked(jnp.float32(2.0), jnp.float32(0.5))
    assert error.get() is None and np.isfinite(value)


# ----------------------------------------------------------------------------------------------
# Non-finite inputs at counted tokens (issue 19, item 7, through the shared blockwise engine)
# ----------------------------------------------------------------------------------------------


def _nonfinite_heads(value):
    """``{name: (h, k, b, th, tk, tb)}`` with ``value`` (NaN or ±inf) in one input, the tokens
    counted (no mask)."""
    (h, k, b, th, tk, tb), _ = _problem(3)
    return {
        "student kernel": (h, k.at[1, 27].set(value), b, th, tk, tb),
        "student kernel, early column": (h, k.at[0, 2].set(value), b, th, tk, tb),
        "student hidden row": (h.at[11].set(value), k, b, th, tk, tb),
        "student hidden entry": (h.at[2, 0].set(value), k, b, th, tk, tb),
        "student bias": (h, k, b.at[26].set(value), th, tk, tb),
        "teacher kernel": (h, k, b, th, tk.at[1, 28].set(value), tb),
        "teacher hidden row": (h, k, b, th.at[12].set(value), tk, tb),
    }


@pytest.mark.parametrize(
    "chunks",  # the default run: (1, 2), the stale-column case; --full all three
    [
        pytest.param((4, 6), marks=pytest.mark.slow),
        (1, 2),
        pytest.param((5, 8), marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize("forms", ["cpu", "gpu"])
def test_non_finite_inputs_give_the_materialised_non_finite_gradients(
    chunks, forms, accelerator_forms
):
    """NaN or ±inf in a head's kernel, hidden or bias at counted tokens: the value and every
    entry of the student's gradients (NaN, ±inf and finite alike) are autodiff's of the
    materialised formula. A slid-back last chunk (V = 29, N = 13 here) multiplied the zero
    logit gradient of the columns and rows it shares with the previous chunk by an infinite
    kernel or hidden entry (``0 · inf = NaN``) where the materialised gradient is finite.
    ``gpu``: the forward's reductions of GPUs (``online.fold_blocks``' one pass over both heads,
    ``online.row_sums``' complex sum), here on CPU."""
    if forms == "gpu":
        accelerator_forms(reductions=True)

    def run(loss_fn):
        def every(arrays):
            out = {}
            for name, (h, k, b, th, tk, tb) in arrays.items():
                for d in DIVERGENCES:
                    f = lambda h, k, b, th=th, tk=tk, tb=tb, d=d: loss_fn(
                        h, k, b, th, tk, tb, divergence=d, reduction="sum", beta=0.3
                    )
                    out[name, d] = jax.value_and_grad(f, (0, 1, 2))(h, k, b)
            return out

        return jax.jit(every)

    def fused(h, k, b, th, tk, tb, **options):
        return jaxloss.linear_distillation(
            h, k, th, tk, bias=b, teacher_bias=tb, token_chunk=chunks[0], vocab_chunk=chunks[1],
            **options,
        )  # fmt: skip

    got_fn, want_fn = run(fused), run(_materialised)
    for value in (jnp.nan, jnp.inf, -jnp.inf):
        arrays = _nonfinite_heads(value)
        got, want = got_fn(arrays), want_fn(arrays)
        for key in want:
            names = ("loss", "hidden", "kernel", "bias")
            for what, g, w in zip(names, (got[key][0], *got[key][1]),
                                  (want[key][0], *want[key][1]), strict=True):  # fmt: skip
                # atol: entries of order 1 (the reverse-KL slope cancels at a row with -inf).
                np.testing.assert_allclose(
                    g, w, rtol=2e-5, atol=1e-5, err_msg=f"{value} in {key}: {what}"
                )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_complex_row_sums_are_the_two_sums(dtype, request):
    """GPUs' two row sums as one complex sum (``online.row_sums``): each part is its sum, the
    non-finite ones included (an inf or NaN in one block leaves the other's sum alone)."""
    if dtype == "float64":
        request.getfixturevalue("x64")
    rng = np.random.default_rng(4)
    x, y = (rng.normal(size=(6, 9)).astype(dtype) * 1e3 for _ in range(2))
    x[1, 2], x[2, 3], y[3, 4], y[4, 0], x[5, 1], y[5, 1] = np.inf, np.nan, -np.inf, np.nan, 1, 2
    got = jax.jit(online._sums_as_one)(jnp.asarray(x), jnp.asarray(y))
    want = online._sums_apart(jnp.asarray(x), jnp.asarray(y))
    for g, w in zip(got, want, strict=True):
        assert g.dtype == dtype
        np.testing.assert_allclose(g, w, rtol=1e-6 if dtype == "float32" else 1e-14)
