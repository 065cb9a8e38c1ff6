"""cross_entropy's soft-capping (Gemma 2) and per-position statistics (``return_stats``).

Oracles: the materialised formula in float64 (``F.cross_entropy`` of ``c·tanh(z/c)`` in torch,
with autograd), the closed-form gradient, ``check_grads``, and the fused linear head's own
statistics (the two must agree on ``hidden @ kernel``).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.test_util import check_grads

import jaxloss

RNG = np.random.default_rng(11)
Z = RNG.normal(scale=6.0, size=(7, 5))
Y = np.array([0, 4, 2, -100, 1, 3, 4])
_U = RNG.normal(size=(7, 5))
P = np.exp(_U) / np.sum(np.exp(_U), -1, keepdims=True)  # float64
W = RNG.uniform(0.5, 2.0, size=5)
CAP = 3.0

OPTIONS = {
    "plain": {},
    "weighted_mean": {"weight": W},
    "smoothing_sum": {"label_smoothing": 0.2, "reduction": "sum"},
    "none_weighted_smoothing": {"weight": W, "label_smoothing": 0.1, "reduction": "none"},
}


def _torch_capped(z, targets, z_loss=0.0, **options):
    zt = torch.tensor(z, requires_grad=True)
    capped = CAP * torch.tanh(zt / CAP)
    kwargs = {k: torch.tensor(v) if k == "weight" else v for k, v in options.items()}
    loss = F.cross_entropy(capped, torch.tensor(targets), **kwargs)
    if z_loss:
        lse = torch.logsumexp(capped, -1)
        valid = torch.tensor(targets != -100) if targets.dtype.kind == "i" else True
        loss = loss + z_loss * torch.where(valid, lse**2, 0).sum() / (
            valid.sum() if targets.dtype.kind == "i" else len(z)
        )
    value = loss.sum()
    value.backward()
    return loss.detach().numpy(), zt.grad.numpy()


@pytest.mark.parametrize("targets", ["index", "probabilities"])
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_soft_cap_matches_torch_of_the_capped_logits(name, targets):
    options = OPTIONS[name]
    t = Y if targets == "index" else P
    expected, expected_grad = _torch_capped(Z, t, **options)
    with jax.enable_x64(True):
        f = lambda z: jaxloss.cross_entropy(z, t, soft_cap=CAP, **options)
        out = f(jnp.asarray(Z))
        grad = jax.grad(lambda z: jnp.sum(f(z)))(jnp.asarray(Z))
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-10, atol=1e-14)


def test_soft_cap_gradient_is_the_closed_form_and_passes_check_grads():
    with jax.enable_x64(True):
        z = jnp.asarray(Z)
        f = lambda v: jaxloss.cross_entropy(v, Y, soft_cap=CAP, z_loss=1e-2, reduction="sum")
        u = CAP * np.tanh(Z / CAP)
        p = np.exp(u - np.log(np.sum(np.exp(u), -1, keepdims=True)))
        lse = np.log(np.sum(np.exp(u), -1, keepdims=True))
        onehot = np.eye(5)[np.where(Y < 0, 0, Y)]
        d_u = (p - onehot + 2e-2 * lse * p) * (Y[:, None] != -100)
        expected = d_u * (1 - np.tanh(Z / CAP) ** 2)
        np.testing.assert_allclose(jax.grad(f)(z), expected, rtol=1e-10, atol=1e-14)
        check_grads(f, (z,), order=2, modes=("fwd", "rev"))


def test_soft_cap_with_z_loss_matches_torch():
    expected, expected_grad = _torch_capped(Z, Y, z_loss=1e-2)
    with jax.enable_x64(True):
        f = lambda z: jaxloss.cross_entropy(z, Y, soft_cap=CAP, z_loss=1e-2)
        value, grad = jax.value_and_grad(f)(jnp.asarray(Z))
    np.testing.assert_allclose(value, expected, rtol=1e-12)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-10, atol=1e-14)


def test_traced_soft_cap_compiles_once_and_bounds_the_logits():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def loss(z, cap):
        return jaxloss.cross_entropy(z, Y, soft_cap=cap, return_stats=True)

    chex.clear_trace_counter()
    for cap in (1.0, 5.0, 30.0):
        value, stats = loss(jnp.asarray(Z, jnp.float32), cap)
        # The capped logits lie in (-c, c): lse ≤ c + log C.
        assert float(jnp.max(stats.lse)) <= cap + np.log(5) + 1e-5
    uncapped = jaxloss.cross_entropy(jnp.asarray(Z, jnp.float32), Y)
    assert not np.isclose(float(value), float(uncapped))


@pytest.mark.parametrize("cap", [0.0, -1.0, np.inf, np.nan])
def test_non_positive_soft_cap_raises(cap):
    with pytest.raises(ValueError, match=r"`soft_cap` must be finite and > 0"):
        jaxloss.cross_entropy(Z, Y, soft_cap=cap)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stats_are_the_plain_formulas(dtype):
    z = jnp.asarray(Z, dtype).at[1, 2].set(-jnp.inf)  # a masked class: entropy stays finite
    loss, stats = jaxloss.cross_entropy(z, Y, return_stats=True, reduction="none")
    chex.assert_trees_all_close(loss, jaxloss.cross_entropy(z, Y, reduction="none"))
    zc = np.asarray(z, np.float64)
    lse = np.log(np.sum(np.exp(zc), -1))
    p = np.exp(zc - lse[:, None])
    entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), -1)
    tol = 2e-2 if dtype == "bfloat16" else 1e-5
    np.testing.assert_allclose(np.asarray(stats.lse, np.float64), lse, rtol=tol)
    np.testing.assert_allclose(np.asarray(stats.entropy, np.float64), entropy, rtol=tol, atol=tol)
    expected_correct = (np.argmax(zc, -1) == Y) & (Y != -100)
    np.testing.assert_array_equal(stats.correct, expected_correct)
    np.testing.assert_array_equal(stats.argmax, np.argmax(zc, -1))
    assert stats.lse.dtype == jnp.dtype(dtype) and stats.correct.dtype == jnp.bool_
    assert stats.argmax.dtype == jnp.int32


def test_stats_ties_go_to_the_lowest_class_and_probability_targets_use_their_argmax():
    z = jnp.array([[1.0, 3.0, 3.0], [2.0, 2.0, 0.0]])
    _, stats = jaxloss.cross_entropy(z, jnp.array([1, 1]), return_stats=True)
    np.testing.assert_array_equal(stats.correct, [True, False])
    np.testing.assert_array_equal(stats.argmax, [1, 0])
    t = jnp.array([[0.1, 0.6, 0.3], [0.2, 0.5, 0.3]])
    _, stats = jaxloss.cross_entropy(z, t, return_stats=True)
    np.testing.assert_array_equal(stats.correct, [True, False])


def test_stats_are_not_differentiated_and_out_of_range_is_not_correct():
    z = jnp.asarray(Z, jnp.float32)
    grad = jax.grad(lambda v: jnp.sum(jaxloss.cross_entropy(v, Y, return_stats=True)[1].lse))(z)
    np.testing.assert_array_equal(grad, 0.0)
    f = jax.jit(lambda v, y: jaxloss.cross_entropy(v, y, return_stats=True))
    _, stats = f(z, jnp.array([9, 4, 2, -100, 1, 3, 4]))
    assert not bool(stats.correct[0])


def test_stats_agree_with_the_fused_linear_head():
    rng = np.random.default_rng(3)
    h = jnp.asarray(rng.normal(size=(12, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(8, 37)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 37, size=12)).at[2].set(-100)
    loss, stats = jaxloss.cross_entropy(h @ k, y, soft_cap=4.0, return_stats=True)
    fused_loss, fused = jaxloss.linear_cross_entropy(
        h, k, y, soft_cap=4.0, return_stats=True, token_chunk=5, vocab_chunk=16
    )
    chex.assert_trees_all_close(fused_loss, loss, rtol=1e-5)
    chex.assert_trees_all_close(fused.lse, stats.lse, rtol=1e-5)
    chex.assert_trees_all_close(fused.entropy, stats.entropy, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(fused.correct, stats.correct)
    np.testing.assert_array_equal(fused.argmax, stats.argmax)
