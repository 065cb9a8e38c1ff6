"""Forms written for XLA:CPU's fusion rules (the CPU backend is where our users debug and test).

Each is exact on every backend and exists because XLA:CPU otherwise materialises an N×C
temporary; ``tests/test_memory.py`` pins the temporaries they save (compiler figures), and a
form goes when that test no longer needs it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxloss._dtypes import upcast


def upcast_apart(x: jax.Array) -> jax.Array:
    """:func:`upcast`, written so that XLA does not merge it with another upcast of ``x``.

    Two consumers of one ``convert`` (say a loss's sum and its gradient) make XLA:CPU
    materialise the float32 copy as an N×C temporary. For bf16 this widening is a bit shift
    (exact: bf16 is the top half of a float32), which XLA leaves apart and fuses into its own
    consumer.
    """
    return _widen_bf16_bits(x) if x.dtype == jnp.bfloat16 else upcast(x)


# Custom JVP for correctness: a bitcast has no derivative in JAX; the widening's is the identity.
@jax.custom_jvp
def _widen_bf16_bits(x: jax.Array) -> jax.Array:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32) << 16
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


@_widen_bf16_bits.defjvp
def _widen_bf16_bits_jvp(primals, tangents):
    # A bitcast has no derivative in JAX (its tangent would be silently zero): the widening's
    # derivative is the identity, as for the convert it stands for.
    (x,), (dx,) = primals, tangents
    return _widen_bf16_bits(x), dx.astype(jnp.float32)


# XLA:CPU fuses elementwise producers into a reduction only when they hold no select: a
# ``jnp.where`` in front of a sum materialises the full array first. The zero-probability
# corners are therefore written with ``sign`` arithmetic, and the conventions that need a select
# (gradients at zero probability) live in custom JVP rules, which run only when differentiated.


def zero_indicator(p: jax.Array) -> jax.Array:
    """1 where ``p == 0``, 0 elsewhere (NaN stays NaN), without a select."""
    return 1 - jnp.abs(jnp.sign(p))


def _finite_where_zero(w: jax.Array, x: jax.Array) -> jax.Array:
    """``x`` clipped to the finite range where ``w == 0``, untouched elsewhere (no select)."""
    bound = jax.lax.stop_gradient(jnp.finfo(x.dtype).max / zero_indicator(w).astype(x.dtype))
    return jnp.clip(x, -bound, bound)


# Custom JVP for a convention: 0 · ±inf = 0 in value and in the derivative in w.
@jax.custom_jvp
def absorbing_product(w: jax.Array, x: jax.Array) -> jax.Array:
    """``w · x`` where a zero ``w`` absorbs an infinite ``x``: ``0 · ±inf = 0``, not NaN.

    The derivative in ``w`` at such a corner is 0 as well (``x`` there is taken as 0).
    """
    return w * _finite_where_zero(w, x)


@absorbing_product.defjvp
def _absorbing_product_jvp(primals, tangents):
    (w, x), (dw, dx) = primals, tangents
    silenced = (w == 0) & jnp.isinf(x)
    return absorbing_product(w, x), jnp.where(silenced, 0, x) * dw + w * dx
