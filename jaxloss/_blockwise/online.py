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

    def sum_after(self, old_sum: jax.Array) -> jax.Array:
        """The running ``Σ e^(z - shift)`` with this block's: the old sum moved to the shift."""
        return old_sum * self.rescale + jnp.sum(self.exp, 1)


def online_step(old_max: jax.Array, z: jax.Array) -> OnlineStep:
    top = jnp.maximum(old_max, jnp.max(z, 1))
    shift = finite_or_zero(top)
    gap = shift[:, None] - z
    return OnlineStep(
        top, shift, shift - finite_or_zero(old_max), jnp.exp(old_max - shift), gap, jnp.exp(-gap)
    )


def _anchor(m: jax.Array) -> jax.Array:
    """What a running sum is relative to: ``m`` where finite, 0 where ``+inf`` or NaN (as
    :func:`finite_or_zero`), ``-inf`` where the sum is empty (0), so that no shift rescales it
    to ``0 · inf``."""
    return jnp.where(m == -jnp.inf, m, finite_or_zero(m))


def _fold(a, b):
    """Two ``(max, Σ e^(z - finite_or_zero(max)))`` partials of one row combined.

    cross_entropy's ``_classification._rescaled_sum`` keeps its sums relative to the raw max
    instead (a row holding +inf gets a NaN sum, as PyTorch's softmax); these heads keep theirs
    relative to the finite shift, as :func:`online_step` does, and the two folds agree."""
    (m1, s1), (m2, s2) = a, b
    m = jnp.maximum(m1, m2)
    shift = finite_or_zero(m)
    return m, s1 * jnp.exp(_anchor(m1) - shift) + s2 * jnp.exp(_anchor(m2) - shift)


def _fold_in_two_passes(old_max, old_sum, z):
    online = online_step(old_max, z)
    return online.max, online.sum_after(old_sum)


def _fold_in_one_pass(old_max, old_sum, z):
    init = (jnp.array(-jnp.inf, z.dtype), jnp.array(0, z.dtype))
    block = jax.lax.reduce((z, jnp.exp(z - finite_or_zero(z))), init, _fold, (1,))
    return _fold((old_max, old_sum), block)


def fold_block(old_max: jax.Array, old_sum: jax.Array, z: jax.Array) -> tuple[jax.Array, ...]:
    """The running ``(max, Σ e^(z - shift))`` of each row after one more block ``z`` (rows ×
    cols), where a row's statistics need no other sum over the block.

    XLA:GPU and XLA:TPU run the max and the sum of :func:`online_step` as two passes over the
    block (at 8192×2048 float32, 64 MiB each); a variadic reduction with the rescaling combiner
    reads it once. Modelled value_and_grad of the mean (benchmarks/hlo.py): H100
    linear_cross_entropy 8192×4096×131072 bf16 42.46 -> 41.17 ms (f32 at D = 2048 42.98 ->
    41.70), linear_distillation 69.18 -> 67.90 ms (JSD 94.66 -> 92.09); TPU v5p
    linear_distillation 8192×2048×131072 bf16 69.74 -> 68.15 ms (the linear head's XLA form
    48.21 -> 48.18; its default is the Pallas kernels). XLA:CPU vectorises neither the variadic
    reduction nor its exp (as for cross_entropy, ``_classification._Normalizer``).
    """
    return jax.lax.platform_dependent(
        old_max, old_sum, z, default=_fold_in_two_passes, cuda=_fold_in_one_pass,
        tpu=_fold_in_one_pass,
    )  # fmt: skip


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
