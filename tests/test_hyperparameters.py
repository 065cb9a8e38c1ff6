"""Hyperparameters are data: label_smoothing and z_loss may be traced, and compile once.

Also the chex idioms for the public API: ``chex.variants`` (with and without ``jit``) instead of
hand-rolled jit-versus-eager loops, ``chex.assert_max_traces`` on a train step.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from absl.testing import parameterized
from jax.experimental import checkify

import jaxloss

RNG = np.random.default_rng(7)
Z = RNG.normal(size=(6, 5)).astype(np.float32)
Y = np.array([0, 4, 2, -100, 1, 3])
P = np.asarray(jax.nn.softmax(RNG.normal(size=(6, 5)))).astype(np.float32)
W = RNG.uniform(0.5, 2.0, size=5).astype(np.float32)


class CrossEntropyVariants(chex.TestCase):
    """The same call with and without jit, on every target kind, against torch."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("index", Y, None), ("probabilities", P, None), ("w", Y, W))
    def test_matches_torch(self, targets, weight):
        f = self.variant(
            lambda z, t, eps: jaxloss.cross_entropy(z, t, weight=weight, label_smoothing=eps)
        )
        w = None if weight is None else torch.tensor(weight)
        for eps in (0.0, 0.1, 0.5):
            expected = F.cross_entropy(
                torch.tensor(Z), torch.tensor(targets), weight=w, label_smoothing=eps
            )
            chex.assert_trees_all_close(f(Z, targets, eps), expected.numpy(), rtol=1e-6)


def test_a_smoothing_schedule_inside_jit_compiles_once():
    params = {"w": jnp.asarray(RNG.normal(size=(3, 5)), jnp.float32)}
    x = jnp.asarray(RNG.normal(size=(6, 3)), jnp.float32)
    optimizer = optax.sgd(0.1)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, step_count):
        eps = 0.2 * jnp.minimum(step_count / 10.0, 1.0)  # traced: a warm-up schedule
        lam = 1e-4 * step_count
        loss_fn = lambda p: jaxloss.cross_entropy(x @ p["w"], Y, label_smoothing=eps, z_loss=lam)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = optimizer.update(grads, state)
        return optax.apply_updates(params, updates), state, loss

    chex.clear_trace_counter()
    state = optimizer.init(params)
    losses = []
    for i in range(20):
        params, state, loss = step(params, state, jnp.float32(i))
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_python_floats_do_not_recompile_per_value():
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, *_, **__: (
            compiles.append(event)
            if event == "/jax/core/compile/backend_compile_duration"
            else None
        )
    )
    jaxloss.cross_entropy(Z, Y, label_smoothing=0.05)  # the first non-zero value compiles
    before = len(compiles)
    values = [float(v) for v in np.linspace(0.01, 0.9, 20)]
    outs = [jaxloss.cross_entropy(Z, Y, label_smoothing=v, z_loss=v / 10) for v in values]
    new = len(compiles) - before
    assert new <= 1, f"{new} compilations for 20 values"  # z_loss's first use may compile once
    torch_outs = [
        F.cross_entropy(torch.tensor(Z), torch.tensor(Y), label_smoothing=v).item() for v in values
    ]
    lse = np.log(np.sum(np.exp(Z.astype(np.float64)), -1))
    z_terms = [v / 10 * np.mean(lse[Y != -100] ** 2) for v in values]
    np.testing.assert_allclose(
        outs, np.asarray(torch_outs) + np.asarray(z_terms), rtol=2e-6, atol=1e-6
    )


def test_zero_drops_the_term_and_equals_no_term():
    base = jaxloss.cross_entropy(Z, Y)
    for zero in (0, 0.0, np.float32(0.0), jnp.float32(0.0)):
        chex.assert_trees_all_equal(
            jaxloss.cross_entropy(Z, Y, label_smoothing=zero, z_loss=zero), base
        )
    traced_zero = jax.jit(lambda e: jaxloss.cross_entropy(Z, Y, label_smoothing=e, z_loss=e))
    chex.assert_trees_all_close(traced_zero(0.0), base, rtol=1e-6)


@pytest.mark.parametrize("targets", [Y, P], ids=["index", "probabilities"])
def test_gradient_in_the_hyperparameters_is_the_closed_form(targets):
    """The loss is linear in ε and in λ_z: the derivatives are the two terms' values."""
    with jax.enable_x64(True):
        z = jnp.asarray(Z, jnp.float64)
        t = targets if targets is Y else jnp.asarray(targets, jnp.float64)
        f = lambda eps, lam: jaxloss.cross_entropy(z, t, label_smoothing=eps, z_loss=lam)
        d_eps, d_lam = jax.grad(f, argnums=(0, 1))(0.3, 0.01)
        nll, smooth = f(0.0, 0.0), f(1.0, 0.0)
        np.testing.assert_allclose(d_eps, smooth - nll, rtol=1e-12)
        np.testing.assert_allclose(d_lam, (f(0.0, 1.0) - nll), rtol=1e-12)


@pytest.mark.parametrize(
    ("name", "value", "error", "words"),
    [
        ("label_smoothing", 1.5, ValueError, r"`label_smoothing` must lie in \[0, 1\], got 1.5"),
        ("label_smoothing", -0.1, ValueError, r"`label_smoothing`"),
        ("label_smoothing", np.float32(2.0), ValueError, r"got 2.0"),
        ("label_smoothing", jnp.float32(np.nan), ValueError, r"got nan"),
        ("label_smoothing", np.ones(2), ValueError, r"`label_smoothing` must be a scalar"),
        ("label_smoothing", "0.1", TypeError, r"`label_smoothing` must be a real scalar"),
        ("label_smoothing", True, TypeError, r"`label_smoothing` must be a real scalar"),
        ("z_loss", -1e-3, ValueError, r"`z_loss` must be finite and >= 0, got -0.001"),
        ("z_loss", np.inf, ValueError, r"`z_loss`.*got inf"),
    ],
)
def test_concrete_values_are_range_checked(name, value, error, words):
    with pytest.raises(error, match=words):
        jaxloss.cross_entropy(Z, Y, **{name: value})
    with pytest.raises(error, match=words):  # a Python value inside the caller's jit too
        jax.jit(lambda z: jaxloss.cross_entropy(z, Y, **{name: value}))(Z)


def test_traced_values_are_checkable_with_checkify():
    def step(eps, lam):
        jaxloss.check_hyperparameters(label_smoothing=eps, z_loss=lam)
        return jaxloss.cross_entropy(Z, Y, label_smoothing=eps, z_loss=lam)

    checked = jax.jit(checkify.checkify(step))
    assert checked(0.1, 0.0)[0].get() is None
    assert "label_smoothing must lie in [0, 1], got 1.5" in str(checked(1.5, 0.0)[0].get())
    assert "z_loss must be finite and >= 0" in str(checked(0.1, -1.0)[0].get())
    with pytest.raises(ValueError, match="checkify"):
        jax.jit(lambda e: jaxloss.check_hyperparameters(label_smoothing=e))(0.1)
