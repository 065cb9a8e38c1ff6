"""The online log-sum-exp (Milakov & Gimelshein 2018) and its merge over vocabulary shards.

Blocks of one row's logits arrive one at a time; a running maximum and a running sum of
``e^(z - shift)`` (``shift`` the maximum's finite part) are kept, the sum rescaled whenever the
maximum grows. Sums that other statistics keep relative to the shift move with it the same way.
Over ``shard_map`` vocabulary shards, each shard's log-sum is moved to the global shift and the
shards' shares are summed (:func:`combine_shards`).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
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

    def sum_after(self, old_sum: jax.Array, weight: jax.Array | None = None) -> jax.Array:
        """The running ``Σ e^(z - shift)`` (``Σ e^(z - shift)·weight`` with a ``weight`` of the
        block's shape) with this block's: the old sum moved to the shift."""
        terms = self.exp if weight is None else self.exp * weight
        return old_sum * self.rescale + jnp.sum(terms, 1)


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
    """Two partials ``(max, Σ e^(z - finite_or_zero(max)), *Σ e^(z - ...)·w)`` of one row
    combined: every sum moves to the combined shift.

    cross_entropy's ``_classification._rescaled_sum`` keeps its sums relative to the raw max
    instead (a row holding +inf gets a NaN sum, as PyTorch's softmax); these heads keep theirs
    relative to the finite shift, as :func:`online_step` does, and the two folds agree."""
    (m1, *s1), (m2, *s2) = a, b
    m = jnp.maximum(m1, m2)
    shift = finite_or_zero(m)
    r1, r2 = jnp.exp(_anchor(m1) - shift), jnp.exp(_anchor(m2) - shift)
    return (m, *(x * r1 + y * r2 for x, y in zip(s1, s2, strict=True)))


# A fold group: a head's running ``(max, Σ e^(z - shift), *Σ e^(z - shift)·w)`` per row, and its
# next block ``(z, *w)`` (rows × cols each): ``w`` weighs a sum kept relative to the same shift.
Group = tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]


def _fold_in_two_passes(groups: Sequence[Group]) -> tuple[tuple[jax.Array, ...], ...]:
    out = []
    for (old_max, old_sum, *old_weighted), (z, *weights) in groups:
        step = online_step(old_max, z)
        weighted = (step.sum_after(u, w) for u, w in zip(old_weighted, weights, strict=True))
        out.append((step.max, step.sum_after(old_sum), *weighted))
    return tuple(out)


def _fold_in_one_pass(groups: Sequence[Group]) -> tuple[tuple[jax.Array, ...], ...]:
    operands, inits, sizes = [], [], []
    for _, (z, *weights) in groups:
        e = jnp.exp(z - finite_or_zero(z))  # each entry a partial of its own: (z, e, e·w...)
        operands += [z, e, *(e * w for w in weights)]
        inits += [jnp.array(-jnp.inf, z.dtype), *[jnp.array(0, z.dtype)] * (1 + len(weights))]
        sizes.append(2 + len(weights))
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]

    def combine(a, b):
        return tuple(x for i, j in itertools.pairwise(bounds) for x in _fold(a[i:j], b[i:j]))

    block = jax.lax.reduce(tuple(operands), tuple(inits), combine, (1,))
    spans = itertools.pairwise(bounds)
    return tuple(_fold(run, block[i:j]) for (run, _), (i, j) in zip(groups, spans, strict=True))


def fold_blocks(groups: Sequence[Group]) -> tuple[tuple[jax.Array, ...], ...]:
    """Each group's running statistics after its next block (:data:`Group`), where a row's
    statistics need no sum over the block other than those weighted sums.

    XLA:GPU and XLA:TPU run the max and the sums of :func:`online_step` as a pass over the
    block for the max and one for the sums (at 8192×2048 float32, 64 MiB each per head); one
    variadic reduction of every group with the rescaling combiner reads each block once.
    Modelled value_and_grad of the mean (benchmarks/hlo.py): H100 linear_cross_entropy
    8192×4096×131072 bf16 42.46 -> 41.17 ms (f32 at D = 2048 42.98 -> 41.70),
    linear_distillation KL 69.18 -> 67.90 ms with the student's fold alone (JSD 94.66 ->
    92.09), 65.34 -> 62.77 ms with both heads and the log-ratio sum in one reduction (JSD
    92.09 -> 89.53); TPU v5p linear_distillation 8192×2048×131072 bf16 69.74 -> 68.15 ms, then
    66.57 ms (the linear head's XLA form 48.21 -> 48.18; its default is the Pallas kernels).
    XLA:CPU vectorises neither the variadic reduction nor its exp (as for cross_entropy,
    ``_classification._Normalizer``).
    """
    return jax.lax.platform_dependent(
        tuple(groups), default=_fold_in_two_passes, cuda=_fold_in_one_pass, tpu=_fold_in_one_pass
    )


def fold_block(old_max: jax.Array, old_sum: jax.Array, z: jax.Array) -> tuple[jax.Array, ...]:
    """The running ``(max, Σ e^(z - shift))`` of each row after one more block ``z`` (rows ×
    cols): :func:`fold_blocks` of one group with no other sum."""
    ((top, total),) = fold_blocks((((old_max, old_sum), (z,)),))
    return top, total


def _sums_apart(x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jnp.sum(x, 1), jnp.sum(y, 1)


def _sums_as_one(x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    both = jnp.sum(jax.lax.complex(x, y), 1)  # the parts of a complex sum are the two sums
    return both.real, both.imag


def row_sums(x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(Σ_cols x, Σ_cols y)`` per row of two float32/float64 blocks that share an expensive
    intermediate.

    XLA:GPU fuses an exp or log feeding two reductions into neither (a variadic reduction
    included) and writes it to memory for both: the JSD's log-mixture, a 64 MiB float32
    temporary per 8192×2048 block. Summed as the real and imaginary parts of one complex block,
    it is computed inside the one reduction. Modelled value_and_grad of the mean
    (benchmarks/hlo.py), linear_distillation JSD bf16 8192×4096×131072: H100 89.53 -> 84.40 ms.
    TPUs (v5p JSD 86.53 ms either way) and CPU (times within noise) keep the two sums.
    """
    return jax.lax.platform_dependent(x, y, default=_sums_apart, cuda=_sums_as_one)


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
