"""Property tests (hypothesis) for the softmax family, bce, bce_with_logits, kl_div and entropy.

Identities that must hold for every input, not just the golden ones: the logits form of a loss
equals the probability form, logs of the activations agree, jit equals eager, vmap over examples
equals the batched ``"none"`` reduction, and per-example gradients from ``vmap(grad)`` equal the
batched gradient and its closed form. Shapes come from a small fixed set so that hypothesis
explores values, not compilations. float64 runs inside ``jax.enable_x64`` scoped to the example.
"""

from __future__ import annotations

import functools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxloss

# No example database: the working tree is shared and .hypothesis/ is not ignored.
# 12 examples reach every (shape, reduction) program several times; each new one is a compile.
PROPERTY_SETTINGS = settings(max_examples=12, deadline=None, database=None)
SHAPES = [(4, 3), (2, 3, 5)]
REDUCTIONS = ("none", "sum", "mean")


def floats(low, high):
    return st.floats(low, high, allow_nan=False, allow_infinity=False, allow_subnormal=False)


@st.composite
def arrays(draw, shape, low, high):
    return draw(hnp.arrays(np.float64, shape, elements=floats(low, high)))


@st.composite
def logits_and_targets(draw, low=-15.0, high=15.0, shapes=tuple(SHAPES)):
    """Logits of a drawn shape and soft or hard targets of the same shape."""
    shape = draw(st.sampled_from(shapes))
    z = draw(arrays(shape, low, high))
    if draw(st.booleans()):
        y = draw(hnp.arrays(np.float64, shape, elements=st.sampled_from([0.0, 1.0])))
    else:
        y = draw(arrays(shape, 0.0, 1.0))
    return z, y


def _softmax_np(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


@st.composite
def distributions(draw, shape=None, *, zeros=True):
    """Probabilities along the last axis of a (drawn) shape, optionally with exact zeros."""
    shape = shape or draw(st.sampled_from(SHAPES))
    p = _softmax_np(draw(arrays(shape, -6.0, 6.0)))
    if zeros and draw(st.booleans()):
        drop = draw(hnp.arrays(np.bool_, shape))
        drop[..., 0] = False  # every distribution keeps some mass
        p = np.where(drop, 0.0, p)
        p /= p.sum(-1, keepdims=True)
    return p


@st.composite
def kl_problems(draw):
    """Model log-probabilities (no zeros) and target probabilities (maybe zeros), same shape."""
    shape = draw(st.sampled_from(SHAPES))
    log_q = np.log(draw(distributions(shape, zeros=False)))
    return log_q, draw(distributions(shape))


# ---------------------------------------------------------------------------------------------
# Identities between functions


@PROPERTY_SETTINGS
@given(data=logits_and_targets(), reduction=st.sampled_from(REDUCTIONS))
def test_bce_with_logits_equals_bce_of_sigmoid(data, reduction):
    z, y = data
    with jax.enable_x64(True):
        z, y = jnp.asarray(z), jnp.asarray(y)

        def via_logits(z):
            return jaxloss.bce_with_logits(z, y, reduction=reduction)

        def via_probs(z):
            return jaxloss.bce(jaxloss.sigmoid(z), y, reduction=reduction)

        np.testing.assert_allclose(via_logits(z), via_probs(z), rtol=1e-9, atol=1e-12)
        # The chain rule through bce's PyTorch gradient collapses to σ(z) - y.
        ct = jnp.ones_like(via_logits(z))
        grad_logits = jax.vjp(via_logits, z)[1](ct)[0]
        grad_probs = jax.vjp(via_probs, z)[1](ct)[0]
        np.testing.assert_allclose(grad_logits, grad_probs, rtol=1e-7, atol=1e-12)


@PROPERTY_SETTINGS
@given(
    x=st.sampled_from(SHAPES).flatmap(lambda shape: arrays(shape, -20.0, 20.0)),
    axis=st.sampled_from([0, -1]),
)
def test_log_softmax_equals_log_of_softmax(x, axis):
    x = jnp.asarray(x, jnp.float32)
    np.testing.assert_allclose(
        jaxloss.log_softmax(x, axis=axis), jnp.log(jaxloss.softmax(x, axis=axis)), atol=2e-5
    )


@PROPERTY_SETTINGS
@given(x=arrays((16,), -30.0, 30.0))
def test_log_sigmoid_equals_log_of_sigmoid(x):
    x = jnp.asarray(x, jnp.float32)
    np.testing.assert_allclose(
        jaxloss.log_sigmoid(x), jnp.log(jaxloss.sigmoid(x)), rtol=1e-5, atol=1e-6
    )
    # And their derivatives: (log σ)' = σ'/σ = σ(-x).
    np.testing.assert_allclose(
        jax.vmap(jax.grad(jaxloss.log_sigmoid))(x), jaxloss.sigmoid(-x), rtol=1e-5, atol=1e-7
    )


# ---------------------------------------------------------------------------------------------
# jit ≡ eager


def _loss_cases(z, y):
    """Every function of this suite on one drawn problem, as ``(name, fn, args)``."""
    p = jax.nn.sigmoid(z)
    q, t = jax.nn.log_softmax(z), jax.nn.softmax(y)
    return [
        ("softmax", functools.partial(jaxloss.softmax, axis=0), (z,)),
        ("log_softmax", jaxloss.log_softmax, (z,)),
        ("sigmoid", jaxloss.sigmoid, (z,)),
        ("log_sigmoid", jaxloss.log_sigmoid, (z,)),
        ("bce", functools.partial(jaxloss.bce, reduction="mean"), (p, y)),
        ("bce_with_logits", functools.partial(jaxloss.bce_with_logits, reduction="sum"), (z, y)),
        ("kl_div", functools.partial(jaxloss.kl_div, reduction="batchmean"), (q, t)),
        ("entropy", jaxloss.entropy, (t,)),
    ]


@settings(max_examples=2, deadline=None, database=None)
@given(data=logits_and_targets(low=-8.0, high=8.0, shapes=((4, 3),)))
def test_jit_equals_eager(data):
    # Two examples of one shape: eager mode compiles every primitive on its own, once per shape
    # (~4 s an example here), and the programs do not depend on the values.
    z, y = (jnp.asarray(a, jnp.float32) for a in data)
    for name, fn, args in _loss_cases(z, y):
        out = fn(*args)
        # A non-uniform cotangent, so that a wrong gradient cannot hide behind a symmetric sum.
        ct = jnp.arange(1.0, 1.0 + out.size).reshape(out.shape)

        def scalar(*a, fn=fn, ct=ct):
            return jnp.sum(fn(*a) * ct)

        jitted_value, jitted_grad = jax.value_and_grad(scalar)(*args)
        with jax.disable_jit():
            eager_value, eager_grad = jax.value_and_grad(scalar)(*args)
            eager_out = fn(*args)
        # Absolute floors: a KL of near-identical distributions is a cancellation near 0.
        np.testing.assert_allclose(out, eager_out, rtol=1e-6, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(jitted_value, eager_value, rtol=1e-6, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(jitted_grad, eager_grad, rtol=1e-5, atol=1e-6, err_msg=name)


# ---------------------------------------------------------------------------------------------
# vmap over examples ≡ batched "none"; per-example gradients


@PROPERTY_SETTINGS
@given(data=logits_and_targets(), pos_weight=arrays((3,), 0.2, 5.0))
def test_vmap_bce_with_logits_equals_batched_none(data, pos_weight):
    z, y = (jnp.asarray(a, jnp.float32) for a in data)
    # pos_weight lies along the axis of size 3 in both layouts: (4, 3) last, (2, 3, 5) middle.
    # It broadcasts against one example as well as against the batch.
    pw = jnp.asarray(pos_weight, jnp.float32)
    pw = pw if z.shape[-1] == 3 else pw[:, None]

    def loss(z, y, reduction):
        return jaxloss.bce_with_logits(z, y, pos_weight=pw, reduction=reduction)

    batched = jaxloss.bce_with_logits(z, y, pos_weight=pw, reduction="none")
    np.testing.assert_allclose(jax.vmap(lambda z, y: loss(z, y, "none"))(z, y), batched, rtol=1e-6)
    per_example_sum = jax.vmap(lambda z, y: loss(z, y, "sum"))(z, y)
    trailing = tuple(range(1, z.ndim))
    np.testing.assert_allclose(per_example_sum, jnp.sum(batched, trailing), rtol=1e-5, atol=1e-5)

    # Per-example gradients: vmap(grad) of each example's sum = grad of the batch sum = closed form.
    per_example_grad = jax.vmap(jax.grad(lambda z, y: loss(z, y, "sum")))(z, y)
    batch_grad = jax.grad(lambda z: jaxloss.bce_with_logits(z, y, pos_weight=pw, reduction="sum"))(
        z
    )
    np.testing.assert_allclose(per_example_grad, batch_grad, rtol=1e-6, atol=1e-7)
    s, pw_full = jax.nn.sigmoid(z), jnp.broadcast_to(pw, z.shape)
    closed_form = s * (1 - y + pw_full * y) - pw_full * y
    np.testing.assert_allclose(per_example_grad, closed_form, rtol=1e-5, atol=1e-6)


@PROPERTY_SETTINGS
@given(problem=kl_problems())
def test_vmap_kl_div_equals_batched_none(problem):
    log_q, t = (jnp.asarray(a, jnp.float32) for a in problem)
    batched = jaxloss.kl_div(log_q, t, reduction="none")
    per_example = jax.vmap(functools.partial(jaxloss.kl_div, reduction="none"))(log_q, t)
    np.testing.assert_allclose(per_example, batched, rtol=1e-6, atol=1e-7)
    # batchmean over the batch = mean over examples of each example's sum.
    example_sums = jax.vmap(functools.partial(jaxloss.kl_div, reduction="sum"))(log_q, t)
    batchmean = jaxloss.kl_div(log_q, t, reduction="batchmean")
    np.testing.assert_allclose(jnp.mean(example_sums), batchmean, rtol=1e-5, atol=1e-6)
    per_example_grad = jax.vmap(jax.grad(functools.partial(jaxloss.kl_div, reduction="sum")))(
        log_q, t
    )
    np.testing.assert_allclose(per_example_grad, -t, rtol=1e-6)


@PROPERTY_SETTINGS
@given(p=distributions())
def test_vmap_entropy_equals_batched(p):
    p = jnp.asarray(p, jnp.float32)
    np.testing.assert_allclose(jax.vmap(jaxloss.entropy)(p), jaxloss.entropy(p), rtol=1e-6)
    per_example_grad = jax.vmap(jax.grad(lambda v: jnp.sum(jaxloss.entropy(v))))(p)
    batch_grad = jax.grad(lambda v: jnp.sum(jaxloss.entropy(v)))(p)
    np.testing.assert_allclose(per_example_grad, batch_grad, rtol=1e-6)
    expected = jnp.where(p > 0, -(jnp.log(jnp.where(p > 0, p, 1.0)) + 1), 0.0)
    np.testing.assert_allclose(per_example_grad, expected, rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(per_example_grad))


@PROPERTY_SETTINGS
@given(
    x=st.sampled_from(SHAPES).flatmap(lambda shape: arrays(shape, -20.0, 20.0)),
    name=st.sampled_from(["softmax", "log_softmax"]),
)
def test_vmap_softmax_family_equals_batched(x, name):
    fn = getattr(jaxloss, name)
    x = jnp.asarray(x, jnp.float32)
    np.testing.assert_allclose(jax.vmap(fn)(x), fn(x), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Second derivatives in half precision (the bf16 paths widen with bit shifts: their derivative
# must still be the identity, or Hessians silently lose terms).

_RNG = np.random.default_rng(11)
_Z = _RNG.normal(size=(3, 4))
_P = np.exp(_Z) / np.exp(_Z).sum(-1, keepdims=True)
_HALF_HESSIAN_CASES = {
    "cross_entropy_index": (lambda z: jaxloss.cross_entropy(z, jnp.array([1, 0, 3])), _Z),
    "cross_entropy_probs": (lambda z: jaxloss.cross_entropy(z, jnp.asarray(_P[::-1])), _Z),
    "cross_entropy_smooth": (
        lambda z: jaxloss.cross_entropy(z, jnp.array([1, 0, 3]), label_smoothing=0.2),
        _Z,
    ),
    "log_softmax": (lambda z: jnp.sum(jaxloss.log_softmax(z) * jnp.asarray(_P)), _Z),
    "softmax": (lambda z: jnp.sum(jaxloss.softmax(z) * jnp.asarray(_Z)), _Z),
    "entropy": (lambda p: jnp.sum(jaxloss.entropy(p)), _P),
    "kl_div": (lambda lq: jaxloss.kl_div(lq, jnp.asarray(_P[::-1])), np.log(_P)),
    "bce_with_logits": (lambda z: jaxloss.bce_with_logits(z, jnp.asarray(_P)), _Z),
}


# float16 repeats every bfloat16 check with another mantissa: slow.
@pytest.mark.parametrize("dtype", [jnp.bfloat16, pytest.param(jnp.float16, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", sorted(_HALF_HESSIAN_CASES))
def test_half_precision_hessian_matches_float32(name, dtype):
    fn, x = _HALF_HESSIAN_CASES[name]
    reference = np.asarray(jax.hessian(fn)(jnp.asarray(x, jnp.float32)), np.float64)
    half = np.asarray(jax.hessian(fn)(jnp.asarray(x, dtype)).astype(jnp.float32), np.float64)
    scale = np.max(np.abs(reference))
    np.testing.assert_allclose(half, reference, rtol=3e-2, atol=3e-2 * scale)
