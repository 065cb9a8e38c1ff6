"""Corners an outside oracle (PyTorch's OpInfo samples and error inputs, optax's tests) found.

Each test pins one reproducer of the correctness issue, against torch where torch has the
operation, in float32, float64 and bfloat16 where the corner applies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.experimental import checkify

import jaxloss

DTYPES = ["float32", "float64", "bfloat16"]
X = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
WHERE = np.array([[True, False, True], [False, False, False]])


def _in(dtype: str):
    """x64 on for float64 cases only (scoped), and the input in that dtype."""
    return jax.enable_x64(dtype == "float64")


# 1. A fully masked row: NaN output (as torch.masked), but a zero gradient (as jax.nn).


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_fully_masked_row_has_a_zero_gradient(name, dtype):
    with _in(dtype):
        x = jnp.asarray(X, dtype)
        cot = jnp.asarray([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], dtype)
        out, vjp = jax.vjp(lambda v: getattr(jaxloss, name)(v, where=WHERE), x)
        (grad,) = vjp(cot)
        _, peer_vjp = jax.vjp(lambda v: getattr(jax.nn, name)(v, where=WHERE), x)
        (peer,) = peer_vjp(cot)
        assert np.all(np.isnan(np.asarray(out[1], np.float32)))  # torch.masked: NaN
        np.testing.assert_array_equal(np.asarray(grad[1], np.float32), 0.0)
        tol = 2e-2 if dtype == "bfloat16" else 1e-6
        np.testing.assert_allclose(
            np.asarray(grad[0], np.float32), np.asarray(peer[0], np.float32), rtol=tol, atol=tol
        )
        # The padded row's NaN does not leak into a loss that drops it.
        loss = lambda v: jnp.sum(jnp.where(WHERE, getattr(jaxloss, name)(v, where=WHERE), 0))
        assert np.all(np.isfinite(np.asarray(jax.grad(loss)(x), np.float32)))


def test_fully_masked_row_forward_matches_torch_masked():
    xt, mt = torch.tensor(X), torch.tensor(WHERE)
    for name in ("softmax", "log_softmax"):
        expected = getattr(torch.masked, name)(xt, 1, mask=mt).numpy()
        with jax.enable_x64(True):
            actual = np.asarray(getattr(jaxloss, name)(jnp.asarray(X), where=WHERE))
        np.testing.assert_allclose(actual, expected, rtol=1e-12)


# 2. Probabilities outside the domain give NaN, never a finite number.


@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_div_negative_target_is_nan_as_in_torch(dtype):
    value = -0.9712404
    expected = F.kl_div(torch.tensor([value]), torch.tensor([value]), reduction="none")
    assert torch.isnan(expected).all()
    with _in(dtype):
        t = jnp.asarray([value, 0.5], dtype)
        for reduction in ("none", "sum", "mean", "batchmean"):
            out = np.asarray(jaxloss.kl_div(t, t, reduction=reduction), np.float32)
            assert np.isnan(out.ravel()[0]), reduction
        grad = jax.grad(lambda q, t: jaxloss.kl_div(q, t, reduction="sum"), argnums=1)(t, t)
        assert np.isnan(np.asarray(grad, np.float32)[0])
        assert np.isfinite(np.asarray(grad, np.float32)[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_entropy_of_a_negative_probability_is_nan(dtype):
    with _in(dtype):
        p = jnp.asarray([[-0.5, 1.5], [0.25, 0.75]], dtype)
        out = np.asarray(jaxloss.entropy(p), np.float32)
        assert np.isnan(out[0]) and np.isfinite(out[1])
        # torch's formula -Σ p log p is NaN as well (Categorical refuses the input outright).
        pt = torch.tensor([-0.5, 1.5])
        assert torch.isnan(-(pt * pt.log()).sum())
        grad = np.asarray(jax.grad(lambda v: jaxloss.entropy(v).sum())(p), np.float32)
        assert np.isnan(grad[0, 0]) and np.all(np.isfinite(grad[1]))


def test_zero_probability_keeps_its_conventions():
    p = jnp.array([0.0, 1.0])
    assert float(jaxloss.entropy(p)) == 0.0
    np.testing.assert_array_equal(jax.grad(jaxloss.entropy)(p), [0.0, -1.0])
    assert float(jaxloss.kl_div(jnp.array([-jnp.inf, 0.0]), p, reduction="sum")) == 0.0


# 3. Probability targets cannot be ignored.


@pytest.mark.parametrize("ignore_index", [0, 2, 5])
def test_probability_targets_with_ignore_index_raise_as_in_torch(ignore_index):
    z, t = np.zeros((4, 3), np.float32), np.full((4, 3), 1 / 3, np.float32)
    with pytest.raises(RuntimeError, match="ignore_index is not supported"):
        F.cross_entropy(torch.tensor(z), torch.tensor(t), ignore_index=ignore_index)
    with pytest.raises(ValueError, match=r"`ignore_index`=\d+ is not supported for floating"):
        jaxloss.cross_entropy(z, t, ignore_index=ignore_index)


def test_probability_targets_accept_a_negative_ignore_index_as_torch():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4, 3)).astype(np.float32)
    t = jax.nn.softmax(rng.normal(size=(4, 3))).astype(np.float32)
    expected = F.cross_entropy(torch.tensor(z), torch.tensor(np.asarray(t)), ignore_index=-1)
    actual = jaxloss.cross_entropy(z, t, ignore_index=-1)
    np.testing.assert_allclose(actual, expected.numpy(), rtol=1e-6)


# 4. 0-d inputs, as PyTorch reads them.


@pytest.mark.parametrize("value", [-4.8, 0.0, 1e4, -np.inf, np.inf, np.nan])
@pytest.mark.parametrize("axis", [0, -1])
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_scalar_softmax_matches_torch(name, axis, value):
    xt = torch.tensor(value, dtype=torch.float64, requires_grad=True)
    expected = getattr(F, name)(xt, axis)
    expected.backward()
    with jax.enable_x64(True):
        f = lambda v: getattr(jaxloss, name)(v, axis)
        out, grad = jax.value_and_grad(f)(jnp.float64(value))
    assert out.shape == ()
    np.testing.assert_array_equal(out, expected.detach().numpy())
    np.testing.assert_array_equal(grad, xt.grad.numpy())


@pytest.mark.parametrize("log_target", [False, True])
def test_scalar_kl_div_batchmean_is_the_pointwise_value_as_in_torch(log_target):
    log_q, target = -0.5, (-1.2 if log_target else 0.3)
    qt = torch.tensor(log_q, dtype=torch.float64, requires_grad=True)
    tt = torch.tensor(target, dtype=torch.float64, requires_grad=True)
    expected = F.kl_div(qt, tt, reduction="batchmean", log_target=log_target)
    expected.backward()
    with jax.enable_x64(True):
        f = lambda q, t: jaxloss.kl_div(q, t, reduction="batchmean", log_target=log_target)
        out, grads = jax.value_and_grad(f, argnums=(0, 1))(jnp.float64(log_q), jnp.float64(target))
    np.testing.assert_allclose(out, expected.item(), rtol=1e-12)
    np.testing.assert_allclose(grads, [qt.grad.item(), tt.grad.item()], rtol=1e-12)


# 5. The documented convention of log_softmax(where=) on a partially masked row.


def test_masked_log_softmax_gradient_is_the_documented_formula():
    x, m = np.array([[1.0, 2.0, 3.0]]), np.array([[True, False, True]])
    g = np.array([[1.0, 10.0, 100.0]])
    p = np.where(m, np.exp(x - np.log(np.sum(np.exp(x), where=m))), 0)
    ours = m * (g - p * np.sum(g * m))  # masked-out cotangents dropped (as jax.nn)
    torchs = m * (g - p * np.sum(g))  # torch.masked sends them through the normaliser
    with jax.enable_x64(True):
        _, vjp = jax.vjp(lambda v: jaxloss.log_softmax(v, where=m), jnp.asarray(x))
        np.testing.assert_allclose(vjp(jnp.asarray(g))[0], ours, rtol=1e-12)
    xt = torch.tensor(x, requires_grad=True)
    torch.masked.log_softmax(xt, 1, mask=torch.tensor(m)).backward(torch.tensor(g))
    np.testing.assert_allclose(xt.grad.numpy(), torchs, rtol=1e-12)
    assert not np.allclose(ours, torchs)  # the two conventions do differ here
    doc = jaxloss.log_softmax.__doc__ or ""
    assert "torch.masked.log_softmax" in doc and r"\sum_{j: m_j} g_j" in doc


# 6. An out-of-range class index outside jit raises PyTorch's error.


@pytest.mark.parametrize("fn", ["cross_entropy", "nll"])
def test_concrete_out_of_range_target_raises_naming_value_position_and_range(fn):
    z = np.zeros((2, 3, 4), np.float32)
    y = np.zeros((2, 4), np.int64)
    y[1, 2] = 3
    with pytest.raises(IndexError, match="Target 3 is out of bounds"):
        getattr(F, fn.replace("nll", "nll_loss"))(torch.tensor(z), torch.tensor(y))
    pattern = r"class index 3 at position \(1, 2\).*\[0, 3\)"
    with pytest.raises(ValueError, match=pattern):
        getattr(jaxloss, fn)(z, y, axis=1)
    with pytest.raises(ValueError, match=pattern):  # concrete targets under grad: still raises
        jax.grad(lambda v: getattr(jaxloss, fn)(v, y, axis=1))(z)
    with pytest.raises(ValueError, match=pattern):
        getattr(jaxloss, fn)(z, jnp.asarray(y), axis=1)  # a concrete jax.Array too


def test_single_class_logits_suggest_bce_with_logits():
    with pytest.raises(ValueError, match=r"single class.*bce_with_logits"):
        jaxloss.cross_entropy(jnp.zeros((2, 1)), jnp.array([0, 1]))


@pytest.mark.parametrize("fn", ["cross_entropy", "nll"])
def test_traced_targets_stay_nan_with_no_error(fn):
    z, y = jnp.zeros((2, 3)), jnp.array([0, 3])
    assert np.isnan(jax.jit(getattr(jaxloss, fn))(z, y))
    per = jax.vmap(lambda v, t: getattr(jaxloss, fn)(v[None], t[None]))(z, y)
    assert np.isfinite(per[0]) and np.isnan(per[1])
    # ignore_index itself is never out of range, whatever its value
    assert np.isfinite(getattr(jaxloss, fn)(z, jnp.array([0, -7]), ignore_index=-7))


# 7. Floating targets of the index shape.


def test_float_targets_of_the_index_shape_explain_both_readings(monkeypatch):
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)  # the package's own message
    with pytest.raises(TypeError, match=r"class probabilities.*\(4, 3\).*integer dtype"):
        jaxloss.cross_entropy(np.zeros((4, 3), np.float32), np.zeros(4, np.float32))


# 8. PyTorch's (N, C, d1) layout without axis=1.


def test_pytorch_layout_without_axis_suggests_axis_1():
    with pytest.raises(ValueError, match=r"\(N, C, d1, \.\.\.\) layout is axis=1.*`axis=1`"):
        jaxloss.cross_entropy(np.zeros((4, 3, 5), np.float32), np.zeros((4, 5), np.int32))


def test_ambiguous_layout_is_documented():
    # C == d1: both readings have the targets' shape; only `axis` can tell them apart.
    z = np.random.default_rng(1).normal(size=(2, 3, 3)).astype(np.float32)
    y = np.array([[0, 1, 2], [2, 1, 0]])
    torch_value = F.cross_entropy(torch.tensor(z), torch.tensor(y)).item()
    np.testing.assert_allclose(jaxloss.cross_entropy(z, y, axis=1), torch_value, rtol=1e-6)
    assert not np.isclose(jaxloss.cross_entropy(z, y), torch_value)
    assert "axis=1" in (jaxloss.cross_entropy.__doc__ or "")
    assert "ambiguous" in (jaxloss.cross_entropy.__doc__ or "")


# 9. check_targets under plain jit.


def test_check_targets_under_plain_jit_says_to_use_checkify():
    y = jnp.array([0, 7])
    pattern = r"(?s)check_targets: .*checkify\.checkify.*err\.throw\(\)"
    with pytest.raises(ValueError, match=pattern):
        jax.jit(lambda t: jaxloss.check_targets(t, 3))(y)
    with pytest.raises(ValueError, match=pattern):
        jax.jit(lambda t: jax.lax.map(lambda r: jaxloss.check_targets(r, 3), t[None]))(y)


def test_check_targets_under_checkify_still_works_nested_and_plain():
    def step(z, y):
        jaxloss.check_targets(y, z.shape[-1])
        return jaxloss.cross_entropy(z, y)

    z, bad, good = jnp.zeros((2, 3)), jnp.array([0, 7]), jnp.array([0, 2])
    for run in (jax.jit(checkify.checkify(step)), jax.jit(checkify.checkify(jax.jit(step)))):
        assert "out of range [0, 3): 7" in str(run(z, bad)[0].get())
        assert run(z, good)[0].get() is None


# debug_nans: the NaN a bad target or an empty mean gets is made only where it belongs.


@pytest.mark.slow  # every loss run op by op (disable_jit): ~35 s here
def test_debug_nans_is_quiet_on_clean_data_for_every_loss():
    z = jnp.array([[1.0, 2.0, 0.5], [0.1, 0.2, 0.3]])
    y, k = jnp.array([0, 2]), jnp.ones((3, 4))
    calls = {
        "cross_entropy": lambda: jaxloss.cross_entropy(z, y, label_smoothing=0.1),
        "nll": lambda: jaxloss.nll(z, y, reduction="none"),
        "cross_entropy grad": lambda: jax.grad(lambda v: jaxloss.cross_entropy(v, y))(z),
        "linear_cross_entropy grad": lambda: jax.grad(
            lambda k: jaxloss.linear_cross_entropy(z, k, y)
        )(k),
        "bce_with_logits": lambda: jaxloss.bce_with_logits(z, z * 0),
        "kl_div": lambda: jaxloss.kl_div(z, z),
        "linear_distillation": lambda: jaxloss.linear_distillation(z, k, z, k),
    }
    with jax.disable_jit(), jax.debug_nans(True):
        for name, call in calls.items():
            out = call()
            assert np.all(np.isfinite(np.asarray(out))), name
    bad = jaxloss.cross_entropy(z, jnp.array([0, 2]), weight=jnp.zeros(3))  # mean over 0 weight
    assert np.isnan(bad)


def test_a_float16_sum_past_65504_is_inf_as_in_torch_and_float32_of_none_is_the_way_out():
    n = 50_000  # n · log 4 ≈ 69315 > 65504, the largest float16
    expected = F.cross_entropy(
        torch.zeros(n, 4, dtype=torch.float16), torch.zeros(n, dtype=torch.long), reduction="sum"
    )
    z, y = jnp.zeros((n, 4), jnp.float16), jnp.zeros(n, jnp.int32)
    total = jaxloss.cross_entropy(z, y, reduction="sum")
    assert torch.isinf(expected) and np.isinf(np.asarray(total, np.float32))
    wide = jnp.sum(jaxloss.cross_entropy(z, y, reduction="none"), dtype=jnp.float32)
    np.testing.assert_allclose(wide, n * np.log(4), rtol=1e-3)
