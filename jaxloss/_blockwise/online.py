"""The online log-sum-exp (Milakov & Gimelshein 2018) and its merge over vocabulary shards.

Blocks of one row's logits arrive one at a time; a running maximum and a running sum of
``e^(z - shift)`` (``shift`` the maximum's finite part) are kept, the sum rescaled whenever the
maximum grows. Sums that other statistics keep relative to the shift move with it the same way.
Over ``shard_map`` vocabulary shards, each shard's log-sum is moved to the global shift and the
shards' shares are summed (:func:`combine_shards`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxloss._blockwise.blocks import finite_or_zero, take


class OnlineStep(NamedTuple):
    """One block ``z`` (rows × cols) folded into a running maximum ``old_max`` (rows,)."""

    max: jax.Array  # the new running maximum
    shift: jax.Array  # its finite part (0 where it is ±inf or NaN)
    step: jax.Array  # how far the shift moved up: sums relative to it move by this much
    rescale: jax.Array  # e^(old_max - shift): the factor of the old running sum
    gap: jax.Array  # shift - z (rows × cols), ≥ 0 at every column of a finite row
    exp: jax.Array  # e^(z - shift)


def online_step(old_max: jax.Array, z: jax.Array) -> OnlineStep:
    top = jnp.maximum(old_max, jnp.max(z, 1))
    shift = finite_or_zero(top)
    gap = shift[:, None] - z
    return OnlineStep(
        top, shift, shift - finite_or_zero(old_max), jnp.exp(old_max - shift), gap, jnp.exp(-gap)
    )


class Normaliser(NamedTuple):
    """Per-token ``shift`` (the finite max) and ``log_sum = log Σ_c e^(z_c - shift)``."""

    shift: jax.Array
    log_sum: jax.Array

    def rows(self, start, width: int) -> Normaliser:
        return Normaliser(*(take(a, start, width)[:, None] for a in self))

    def log_softmax(self, z: jax.Array) -> jax.Array:
        # (z - shift) first: at large logits shift + log_sum rounds to the max.
        return (z - self.shift) - self.log_sum

    def softmax(self, z: jax.Array) -> jax.Array:
        return jnp.exp(self.log_softmax(z))

    def finite(self) -> jax.Array:
        """Whether the row has a distribution (no ``+inf``/NaN logit, not all ``-inf``)."""
        return jnp.isfinite(self.shift + self.log_sum)


def combine_shards(top: jax.Array, log_sum: jax.Array, axis) -> tuple[jax.Array, ...]:
    """``(max, log_sum, step)`` over every shard of ``axis`` from each shard's own ``max`` and
    ``log_sum`` (relative to its own finite max); ``step`` ≥ 0 is how far each shard's shift
    moves to the global one. A shard whose logits of a row are all ``-inf`` (``log_sum = -inf``)
    adds exactly nothing, with a zero cotangent."""
    top_all = jax.lax.pmax(jax.lax.stop_gradient(top), axis)
    step = finite_or_zero(top_all) - jax.lax.stop_gradient(finite_or_zero(top))
    return top_all, _log_sum_over(log_sum - step, axis), step


def combine_normaliser(top: jax.Array, log_sum: jax.Array, axis):
    """The :class:`Normaliser` over every shard of ``axis`` (``None``: no shards), and this
    shard's own ``log_sum`` moved to the global shift (``-inf`` where it has no probability)."""
    if axis is None:
        return Normaliser(finite_or_zero(top), log_sum), log_sum
    top, total, step = combine_shards(top, log_sum, axis)
    return Normaliser(finite_or_zero(top), total), log_sum - step


# Custom VJP for a convention: the gradient of the unsharded log-sum at a row holding +inf
# (softmax with a finite shift: NaN at the +inf logits, 0 elsewhere). Autodiff would give every
# shard the share inf/inf = NaN, a NaN at every logit of the row.
@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _log_sum_over(local: jax.Array, axis) -> jax.Array:
    """``log Σ_shards e^local``: the log-sum of the whole vocabulary from the shards' own, each
    relative to the global shift."""
    return jnp.log(jax.lax.psum(jnp.exp(local), axis))


def _log_sum_over_fwd(local, axis):
    total = _log_sum_over(local, axis)
    return total, (local, total)


def _log_sum_over_bwd(axis, residuals, g):
    local, total = residuals
    # Each shard's share of the probability; at +inf, the shards holding +inf take it all.
    share = jnp.where(
        jnp.isposinf(total), jnp.isposinf(local).astype(local.dtype), jnp.exp(local - total)
    )
    return (g * share,)


_log_sum_over.defvjp(_log_sum_over_fwd, _log_sum_over_bwd)
