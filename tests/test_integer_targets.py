"""Index targets of every integer dtype give the int32 results: no wrap of ``C`` in a narrow dtype.

Byte-level models (``C = 256``) and uint16 token ids (a 65536 vocabulary) are real uses; the
class count and its ``C - 1`` clip must not be formed in the targets' own dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.experimental import checkify

import jaxloss

NARROW = ["uint8", "int8", "int16", "uint16"]
DTYPES = ["float32", "float64", "bfloat16"]


def _case(target_dtype: str, dtype: str, classes: int = 256):
    """Logits over ``classes`` and targets near both ends of the target dtype's range."""
    top = min(classes, np.iinfo(target_dtype).max + 1) - 1
    labels = np.array([0, 65, top // 2 + 7, top])
    z = np.random.default_rng(0).normal(size=(4, classes)) * 3
    return jnp.asarray(z, dtype), labels.astype(target_dtype), labels


def _close(actual, expected, dtype):
    tol = 2e-2 if dtype == "bfloat16" else 1e-6
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    np.testing.assert_allclose(a, e, rtol=tol, atol=tol)


# By default one diagonal of the grid (every target dtype and every logit dtype at least once: the
# widening depends on the target dtype, the comparison's tolerance on the logits'); --full all.
DIAGONAL = [
    pytest.param(t, d, marks=() if (i + j) % len(DTYPES) == 0 else pytest.mark.slow)
    for i, t in enumerate(NARROW) for j, d in enumerate(DTYPES)
]  # fmt: skip


@pytest.mark.parametrize(("target_dtype", "dtype"), DIAGONAL)
def test_cross_entropy_and_nll_read_narrow_targets_as_int32(target_dtype, dtype):
    with jax.enable_x64(dtype == "float64"):
        z, narrow, wide = _case(target_dtype, dtype)
        weight = jnp.linspace(0.5, 2.0, z.shape[-1], dtype=dtype)
        for kw in ({}, {"weight": weight}, {"label_smoothing": 0.1}):
            for fn in (jaxloss.cross_entropy, jaxloss.nll):
                if fn is jaxloss.nll and "label_smoothing" in kw:
                    continue
                expected = fn(z, jnp.asarray(wide, jnp.int32), reduction="none", **kw)
                actual = fn(z, narrow, reduction="none", **kw)
                assert np.all(np.isfinite(np.asarray(actual, np.float32)))
                _close(actual, expected, dtype)
        loss = lambda v, y: jaxloss.cross_entropy(v, y, weight=weight).astype(jnp.float32)
        _close(jax.grad(loss)(z, narrow), jax.grad(loss)(z, wide), dtype)


def test_cross_entropy_with_uint8_targets_matches_torch():
    z, narrow, wide = _case("uint8", "float32")
    expected = F.cross_entropy(torch.tensor(np.asarray(z)), torch.tensor(wide), reduction="none")
    actual = jax.jit(lambda v, y: jaxloss.cross_entropy(v, y, reduction="none"))(z, narrow)
    _close(actual, expected.numpy(), "float32")


def test_uint16_token_ids_over_a_65536_vocabulary():
    z, narrow, wide = _case("uint16", "float32", classes=65536)
    _close(jaxloss.cross_entropy(z, narrow), jaxloss.cross_entropy(z, wide), "float32")


@pytest.mark.parametrize("target_dtype", NARROW)
def test_linear_cross_entropy_reads_narrow_targets_as_int32(target_dtype):
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(4, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(8, 256)), jnp.float32)
    _, narrow, wide = _case(target_dtype, "float32")
    for reduction in ("none", "mean"):
        expected = jaxloss.cross_entropy(h @ k, wide, reduction=reduction)
        actual = jaxloss.linear_cross_entropy(h, k, narrow, reduction=reduction, vocab_chunk=64)
        _close(actual, expected, "float32")


@pytest.mark.parametrize("target_dtype", NARROW)
def test_check_targets_accepts_every_valid_narrow_target(target_dtype):
    _, narrow, _ = _case(target_dtype, "float32")
    err, _ = checkify.checkify(lambda y: jaxloss.check_targets(y, 256))(narrow)
    assert err.get() is None
    bad = jnp.asarray(np.array([0, 5], target_dtype))
    err, _ = checkify.checkify(lambda y: jaxloss.check_targets(y, 5))(bad)
    assert "out of range [0, 5): 5" in str(err.get())
