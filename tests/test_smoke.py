"""Every public function once, against a few lines of ``jax.nn``/``jnp``: value and gradient.

The other test files check each function in depth on the JAX that the ``test`` extra pins. This
one is short enough to run on any JAX, and ``.ci/run`` also runs it (with ``conftest.py``, which
gives it eight CPU devices) on the oldest jax/jaxlib that ``pyproject.toml`` declares, so that
the declared floor is tested, not just claimed: the ``shard_map`` forms of the linear heads
(``batch_axis``/``vocab_axis``, under automatic and explicit axis types) included. It needs only
jaxloss's own dependencies plus pytest, pytest-xdist, beartype and hypothesis (what
``pyproject.toml``'s pytest options and ``conftest.py`` load). It is ``slow``: on the pinned JAX
it repeats, shallowly, what the default run checks in depth.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxloss

pytestmark = pytest.mark.slow

N, D, C = 8, 6, 16  # rows split over the mesh's 2 x 4 devices, classes too
RNG = np.random.default_rng(0)
Z = jnp.asarray(RNG.normal(size=(N, C)), jnp.float32)
Y = jnp.asarray(RNG.integers(0, C, N), jnp.int32)
P01 = jnp.asarray(RNG.uniform(0.05, 0.95, (N, C)), jnp.float32)
T = jnp.asarray(RNG.dirichlet(np.ones(C), N), jnp.float32)
H = jnp.asarray(RNG.normal(size=(N, D)), jnp.float32)
K = jnp.asarray(RNG.normal(size=(D, C)) / np.sqrt(D), jnp.float32)
H_T = jnp.asarray(RNG.normal(size=(N, 4)), jnp.float32)
K_T = jnp.asarray(RNG.normal(size=(4, C)), jnp.float32)
ARGS = (H, K, Y, H_T, K_T)  # the linear heads': student, targets, teacher


def _ce(z, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], 1))


def _kl_rows(log_p, log_q):
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1)


# name -> (jaxloss call, reference): functions of one float array, the one differentiated.
CASES = {
    "sigmoid": (lambda x: jaxloss.sigmoid(x), jax.nn.sigmoid, Z),
    "log_sigmoid": (lambda x: jaxloss.log_sigmoid(x), jax.nn.log_sigmoid, Z),
    "softmax": (lambda x: jaxloss.softmax(x), jax.nn.softmax, Z),
    "log_softmax": (
        lambda x: jaxloss.log_softmax(x, axis=0),
        lambda x: jax.nn.log_softmax(x, 0),
        Z,
    ),
    "entropy": (lambda p: jaxloss.entropy(p), lambda p: -jnp.sum(p * jnp.log(p), -1), T),
    "kl_div": (
        lambda lq: jaxloss.kl_div(lq, T, reduction="sum"),
        lambda lq: jnp.sum(T * (jnp.log(T) - lq)),
        jnp.log(P01),
    ),
    "bce": (
        lambda p: jaxloss.bce(p, T),
        lambda p: -jnp.mean(T * jnp.log(p) + (1 - T) * jnp.log1p(-p)),
        P01,
    ),
    "bce_with_logits": (
        lambda x: jaxloss.bce_with_logits(x, T),
        lambda x: jnp.mean(T * jax.nn.softplus(-x) + (1 - T) * jax.nn.softplus(x)),
        Z,
    ),
    "nll": (lambda lp: jaxloss.nll(lp, Y), lambda lp: -jnp.mean(lp[jnp.arange(N), Y]), Z),
    "cross_entropy": (lambda z: jaxloss.cross_entropy(z, Y), lambda z: _ce(z, Y), Z),
    "linear_cross_entropy": (
        lambda h: jaxloss.linear_cross_entropy(h, K, Y, token_chunk=4, vocab_chunk=8),
        lambda h: _ce(h @ K, Y),
        H,
    ),
    "torch_linear_cross_entropy": (
        lambda h: jaxloss.torch_linear_cross_entropy(h, K.T, Y),
        lambda h: _ce(h @ K, Y),
        H,
    ),
    "linear_distillation": (
        lambda h: jaxloss.linear_distillation(h, K, H_T, K_T, token_chunk=4, vocab_chunk=8),
        lambda h: jnp.mean(_kl_rows(jax.nn.log_softmax(H_T @ K_T), jax.nn.log_softmax(h @ K))),
        H,
    ),
}
# Not differentiable losses: checked by their own cases below.
OTHERS = {"LogitStats", "check_targets", "check_hyperparameters"}


def test_every_public_function_has_a_case():
    assert set(jaxloss.__all__) == set(CASES) | OTHERS


@pytest.mark.parametrize("name", CASES)
def test_value_and_gradient_match_the_reference(name):
    ours, reference, x = CASES[name]
    fn = lambda f: jax.jit(lambda x: (f(x), jax.grad(lambda x: jnp.sum(f(x)))(x)))
    (value, grad), (want, want_grad) = fn(ours)(x), fn(reference)(x)
    np.testing.assert_allclose(value, want, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=2e-5, atol=1e-6)


def test_stats_and_the_checkify_checks():
    from jax.experimental import checkify

    _, stats = jaxloss.cross_entropy(Z, Y, return_stats=True)
    assert isinstance(stats, jaxloss.LogitStats)
    np.testing.assert_allclose(stats.lse, jax.nn.logsumexp(Z, -1), rtol=1e-6)
    np.testing.assert_array_equal(stats.correct, jnp.argmax(Z, -1) == Y)

    def step(y, eps):
        jaxloss.check_targets(y, C)
        jaxloss.check_hyperparameters(label_smoothing=eps)
        return jaxloss.cross_entropy(Z, y, label_smoothing=eps)

    checked = jax.jit(checkify.checkify(step))
    assert checked(Y, 0.1)[0].get() is None
    assert "out of range" in checked(Y.at[0].set(C), 0.1)[0].get()
    assert "label_smoothing" in checked(Y, 1.5)[0].get()


def _axes_cases(mesh: Mesh):
    explicit = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Explicit,) * 2)
    return [
        (mesh, dict(mesh=mesh, batch_axis="data", vocab_axis="model")),
        (mesh, dict(mesh=mesh, vocab_axis=("data", "model"))),
        (explicit, dict(batch_axis="data", vocab_axis="model")),
    ]


@pytest.mark.parametrize("form", range(3), ids=["shard_map", "vocab_only", "explicit"])
def test_shard_map_forms_match_one_device(form, mesh):
    """linear_cross_entropy and linear_distillation with named axes: the one-device results."""
    mesh, axes = _axes_cases(mesh)[form]
    rows = "data" if "batch_axis" in axes else None
    cols = axes["vocab_axis"]
    specs = [P(rows, None), P(None, cols), P(rows), P(rows, None), P(None, cols)]
    placed = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(ARGS, specs, strict=True)]

    def both(h, k, y, ht, kt, **axes):
        lce = lambda h, k: jaxloss.linear_cross_entropy(h, k, y, vocab_chunk=2, **axes)
        ld = lambda h, k: jaxloss.linear_distillation(h, k, ht, kt, vocab_chunk=2, **axes)
        return [jax.value_and_grad(f, argnums=(0, 1))(h, k) for f in (lce, ld)]

    want = jax.jit(both)(*ARGS)
    with jax.set_mesh(mesh) if AxisType.Explicit in mesh.axis_types else contextlib.nullcontext():
        got = jax.jit(lambda *a: both(*a, **axes))(*placed)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-6)
