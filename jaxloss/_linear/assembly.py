"""cross_entropy's per-token loss and PyTorch's reduction, from per-token logit statistics.

Every form of ``linear_cross_entropy`` (materialised reference, blocked kernel, fused gradient
pass, ``shard_map``) produces the same ``O(N)`` statistics and assembles the loss here with
ordinary JAX, so the options (ignore mask, class weights, smoothing, z-loss, reduction) are
written once.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxloss import _reductions, _targets


def index_setup(targets, class_weight, num_classes, ignore_index, cdt):
    """``(valid, bad, per-position weight)`` of index targets, from the shared core."""
    idx = _targets.index_targets(targets, num_classes, ignore_index, class_weight, cdt)
    return idx.valid, idx.bad, idx.weight


@dataclasses.dataclass(frozen=True)
class Options:
    """The static options; ``smoothing``/``z_loss`` values travel as ``hyper`` arrays.

    ``smoothing``/``z_loss`` say whether the term is present at all (a Python 0 is not, a
    traced value is).
    """

    num_classes: int
    ignore_index: int = -100
    reduction: str = "mean"
    smoothing: bool = False
    z_loss: bool = False


def _loss_log_sum(s) -> jax.Array:
    """``log_sum`` as the loss reads it: NaN where the row's maximum is not finite.

    ``cross_entropy`` forms its loss relative to the unclipped maximum (``+inf - +inf`` is NaN),
    and its gradient relative to a finite shift; so here the loss (with the class weights'
    gradients) is NaN at such a row, while the logits' gradient keeps ``softmax`` taken with the
    finite shift (NaN at a ``+inf`` logit only). The added constant has no derivative.
    """
    return s.log_sum + _reductions.nan_where(~jnp.isfinite(s.max), jnp.zeros_like(s.log_sum))


def index_losses(o: Options, s, valid, bad, pos_weight, sum_weight, hyper):
    """cross_entropy's per-position formula from the statistics ``s`` (a ``chunked.Stats``).

    ``-log p_y = log_sum - (z_y - shift)`` and ``-Σ_c w_c log p_c = Σ_c w_c (shift - z_c) +
    log_sum Σ_c w_c``: every term relative to the row's maximum, as ``cross_entropy`` forms
    them (``lse - z_y`` would cancel at large logits).
    """
    smoothing, z_loss = hyper
    # Ignored rows are zeroed before any arithmetic so that not even an inf there leaks a NaN
    # into the gradient.
    log_sum = jnp.where(valid, _loss_log_sum(s), 0)
    target = jnp.where(valid, s.tgt - s.shift, 0)
    loss = pos_weight * (log_sum - target)
    if o.smoothing:
        smooth = (jnp.where(valid, s.wgap, 0) + sum_weight * log_sum) / o.num_classes
        loss = (1 - smoothing) * loss + smoothing * smooth
    if o.z_loss:
        loss = loss + z_loss * jnp.where(valid, s.shift + log_sum, 0) ** 2
    loss = jnp.where(valid & ~bad, loss, 0)
    # A bad target (out of range, not ignored) is NaN, in value and — as in cross_entropy — in
    # the gradient of every logit of its row (and in no class weight's); the factor is exactly 0
    # (and so is its gradient) at every other row.
    return loss + _reductions.nan_where(bad, jnp.zeros_like(log_sum)) * log_sum


def prob_losses(o: Options, s, mass, sum_weight, hyper):
    """``-Σ_c w_c t'_c log p_c`` with ``t' = (1-ε) t + ε/V``, from the statistics ``s``.

    ``= (1-ε)(Σ_c w_c t_c (shift - z_c) + log_sum Σ_c w_c t_c) + ε/V (Σ_c w_c (shift - z_c) +
    log_sum Σ_c w_c)``, ``mass = Σ_c w_c t_c``.
    """
    smoothing, z_loss = hyper
    log_sum = _loss_log_sum(s)
    loss = s.tgap + mass * log_sum
    if o.smoothing:
        smooth = (s.wgap + sum_weight * log_sum) / o.num_classes
        loss = (1 - smoothing) * loss + smoothing * smooth
    if o.z_loss:
        loss = loss + z_loss * (s.shift + log_sum) ** 2
    return loss


def target_mass(probs: jax.Array, class_weight: jax.Array | None) -> jax.Array:
    """``Σ_c w_c t_{n,c}`` per row."""
    if class_weight is None:
        return jnp.sum(probs, -1)
    return probs @ class_weight.astype(probs.dtype)


@dataclasses.dataclass(frozen=True)
class RowLoss:
    """Per-row losses of a block of rows, from its statistics (what the fused pass calls)."""

    options: Options

    def __call__(self, stats: Any, blk: Any, class_weight, hyper) -> jax.Array:
        o = self.options
        v = o.num_classes
        sum_weight = v if class_weight is None else jnp.sum(class_weight)
        if blk.probs is not None:
            mass = target_mass(blk.probs, class_weight)
            return prob_losses(o, stats, mass, sum_weight, hyper)
        valid, bad, pos_weight = index_setup(
            blk.labels, class_weight, v, o.ignore_index, stats.log_sum.dtype
        )
        return index_losses(o, stats, valid, bad, pos_weight, sum_weight, hyper)


def denominator(o: Options, labels, class_weight, n: int, cdt) -> jax.Array:
    """PyTorch's ``"mean"`` divisor: total weight of the non-ignored targets, or positions."""
    if labels is None:
        return jnp.asarray(n, cdt)
    return jnp.sum(index_setup(labels, class_weight, o.num_classes, o.ignore_index, cdt)[2])


def reduce(loss, denominator_value, reduction, sum_over=None):
    """PyTorch's reduction; ``sum_over`` names the mesh axes to sum partial results over."""
    if reduction == "none":
        return loss
    total, den = jnp.sum(loss), jnp.sum(denominator_value)
    if sum_over:
        total = jax.lax.psum(total, sum_over)
        den = jax.lax.psum(den, sum_over)
    if reduction == "sum":
        return total
    return _reductions.safe_divide(total, den)
