"""Helpers that several test modules share (fixtures live in ``conftest.py``)."""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads

GOLDEN_ELEMENTWISE = pathlib.Path(__file__).parent / "golden" / "elementwise.npz"


def load_golden(family: str) -> dict[str, dict[str, np.ndarray]]:
    """Cases of one family from the elementwise golden file: ``{case: {field: array}}``."""
    cases: dict[str, dict[str, np.ndarray]] = {}
    with np.load(GOLDEN_ELEMENTWISE) as golden:
        for key in golden.files:
            fam, case, field = key.split("__")
            if fam == family:
                cases.setdefault(case, {})[field] = golden[key]
    return cases


def value_and_vjp(fn: Callable, args: Sequence, ct) -> tuple:
    """``fn(*args)`` and the VJP of ``ct`` with respect to every argument.

    Eager ``jax.vjp`` of the jitted loss: its compilations are cached per shape and static
    arguments, so a module's closed-form tests reuse those of its golden tests.
    """
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(ct)


def check_grads_eagerly(fn: Callable, args: Sequence) -> None:
    """``check_grads`` orders 1 and 2, forward and reverse, run op by op.

    Under ``disable_jit`` each primitive compiles once and is shared by every later call, where
    jit would compile every transformed function anew (about 3x the compile time). The jitted
    path is held equal to this one by ``test_properties.test_jit_equals_eager``.
    """
    with jax.disable_jit():
        check_grads(fn, args, order=2, modes=("fwd", "rev"))


def assert_half_matches_float32(fn: Callable, args: Sequence, dtype, atol: float) -> None:
    """``fn`` on half inputs: the same dtype out and in its gradients, within 1e-2 relative
    (and ``atol`` for the gradients) of float32."""
    half = tuple(jnp.asarray(a, dtype) for a in args)
    argnums = tuple(range(len(args)))
    out, grads = jax.value_and_grad(fn, argnums)(*half)
    ref_out, ref_grads = jax.value_and_grad(fn, argnums)(*(a.astype(jnp.float32) for a in half))
    assert out.dtype == dtype
    assert all(g.dtype == dtype for g in grads)
    np.testing.assert_allclose(out.astype(np.float32), ref_out, rtol=1e-2)
    for g, ref in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g.astype(np.float32), ref, rtol=1e-2, atol=atol)


def assert_close_to_scale(actual, expected, tol: float, what: str = "") -> None:
    """``actual`` within ``tol`` of ``expected``, relative to each entry and to the largest
    finite magnitude of ``expected``, with NaN at the same places (an infinite entry must match
    exactly: it never widens the tolerance to infinity)."""
    a, b = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=f"{what}: NaN pattern")
    finite = np.abs(b[np.isfinite(b)])
    scale = finite.max() if finite.size else 1.0
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale, err_msg=what)
