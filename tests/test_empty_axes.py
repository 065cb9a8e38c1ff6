"""Zero classes or zero features: PyTorch's values, no crash (StopIteration, gathers, modulo)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jaxloss
from jaxloss import _classification

REDUCTIONS = ["none", "sum", "mean"]


def _same(actual, expected):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected.numpy(), rtol=1e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_and_nll_of_no_classes_match_torch(reduction, weighted):
    z, y = jnp.zeros((3, 0)), jnp.full((3,), -100)
    kw = {"weight": jnp.zeros((0,))} if weighted else {}
    tw = {"weight": torch.zeros(0)} if weighted else {}
    expected = F.cross_entropy(torch.zeros(3, 0), torch.full((3,), -100), reduction=reduction, **tw)
    _same(jaxloss.cross_entropy(z, y, reduction=reduction, **kw), expected)
    _same(jaxloss.nll(z, y, reduction=reduction, **kw), expected)
    grad = jax.grad(lambda v: jaxloss.cross_entropy(v, y, reduction="sum", **kw))(z)
    assert grad.shape == (3, 0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_probability_targets_over_no_classes_match_torch(reduction):
    expected = F.cross_entropy(torch.zeros(3, 0), torch.zeros(3, 0), reduction=reduction)
    actual = jaxloss.cross_entropy(jnp.zeros((3, 0)), jnp.zeros((3, 0)), reduction=reduction)
    _same(actual, expected)


def test_a_counted_target_over_no_classes_is_nan_under_jit():
    loss = jax.jit(lambda z, y: jaxloss.cross_entropy(z, y, reduction="none"))
    out = loss(jnp.zeros((2, 0)), jnp.array([0, -100]))
    assert np.isnan(out[0]) and out[1] == 0


def test_stats_over_no_classes():
    _, stats = jaxloss.cross_entropy(jnp.zeros((2, 0)), jnp.full((2,), -100), return_stats=True)
    np.testing.assert_array_equal(stats.lse, -np.inf)
    np.testing.assert_array_equal(stats.entropy, 0.0)
    np.testing.assert_array_equal(stats.argmax, 0)
    assert not np.any(stats.correct)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_linear_cross_entropy_of_no_features_matches_torch(reduction, dtype):
    with jax.enable_x64(dtype == "float64"):
        h, k = jnp.zeros((2, 0), dtype), jnp.ones((0, 4), dtype)
        b = jnp.asarray([0.0, 1.0, 2.0, 3.0], dtype)
        y = jnp.array([0, 1])
        expected = F.cross_entropy(
            torch.zeros(2, 0) @ torch.ones(0, 4) + torch.arange(4.0), torch.tensor([0, 1]),
            reduction=reduction,
        )  # fmt: skip
        actual = jaxloss.linear_cross_entropy(h, k, y, bias=b, reduction=reduction)
        tol = 1e-2 if dtype == "bfloat16" else 1e-6
        np.testing.assert_allclose(np.asarray(actual, np.float64), expected.numpy(), rtol=tol)
        loss = lambda h, k, b: jaxloss.linear_cross_entropy(h, k, y, bias=b).astype(jnp.float32)
        gh, gk, gb = jax.grad(loss, argnums=(0, 1, 2))(h, k, b)
        assert gh.shape == (2, 0) and gk.shape == (0, 4)
        p = jax.nn.softmax(jnp.arange(4.0))
        onehot = jax.nn.one_hot(jnp.array([0, 1]), 4)
        expected_gb = jnp.mean(p[None, :] - onehot, axis=0)
        np.testing.assert_allclose(np.asarray(gb, np.float64), expected_gb, atol=tol)


def test_gpu_row_pieces_is_the_fewest_equal_pieces_and_handles_no_classes():
    def brute_force(classes):
        pieces = next(
            k for k in range(1, classes + 1) if classes % k == 0 and classes // k <= 16384
        )
        return pieces if classes // pieces >= 1024 else 1

    for classes in [1, 1000, 1024, 16384, 16385, 32768, 50257, 131072, 152064, 256000, 65537]:
        assert _classification._gpu_row_pieces(classes) == brute_force(classes)
    assert _classification._gpu_row_pieces(0) == 1
    # A prime vocabulary: no qualifying piece count (the old search walked all 10^7 candidates).
    assert _classification._gpu_row_pieces(10_000_019) == 1


def test_linear_distillation_of_no_features_is_zero_divergence():
    """Both heads without features: every logit is 0, both distributions uniform, KL 0."""
    h, k = jnp.zeros((2, 0)), jnp.ones((0, 4))
    assert float(jaxloss.linear_distillation(h, k, h, k)) == 0.0
    grads = jax.grad(lambda k: jaxloss.linear_distillation(h, k, h, k), argnums=0)(k)
    assert grads.shape == (0, 4)
