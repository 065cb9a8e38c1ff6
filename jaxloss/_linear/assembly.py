"""cross_entropy's per-token loss and PyTorch's reduction, from per-token logit statistics.

Every form of ``linear_cross_entropy`` (materialised reference, blocked kernel, ``shard_map``)
produces the same ``O(N)`` statistics and assembles the loss here with ordinary JAX, so the
options (ignore mask, class weights, smoothing, z-loss, reduction) are written once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxloss import _common


def ignored(targets: jax.Array, ignore_index: int) -> jax.Array:
    """Boolean mask of ignored positions; none when ``ignore_index`` cannot occur in the dtype."""
    info = np.iinfo(targets.dtype)
    if not info.min <= ignore_index <= info.max:
        return jnp.zeros(targets.shape, jnp.bool_)
    return targets == ignore_index


def index_setup(targets, class_weight, num_classes, ignore_index, cdt):
    """``(valid, bad, per-position weight)`` of index targets, as cross_entropy defines them."""
    valid = ~ignored(targets, ignore_index)
    bad = valid & ((targets < 0) | (targets >= num_classes))
    if class_weight is None:
        return valid, bad, valid.astype(cdt)
    safe = jnp.clip(targets, 0, num_classes - 1)
    return valid, bad, jnp.where(valid, class_weight[safe], 0)


def row_losses(lse, tgt, wsum, valid, bad, pos_weight, sum_weight, num_classes, smoothing, z_loss):
    """cross_entropy's per-position formula in terms of ``lse``, ``z[y]`` and ``Σ_c w_c z_c``.

    ``-log p_y = lse - z_y`` and ``-Σ_c w_c log p_c = lse Σ_c w_c - Σ_c w_c z_c``.
    """
    # Ignored rows are zeroed before any arithmetic so that not even an inf there leaks a NaN
    # into the gradient.
    lse, tgt = jnp.where(valid, lse, 0), jnp.where(valid, tgt, 0)
    loss = (1 - smoothing) * pos_weight * (lse - tgt)
    if smoothing:
        loss = loss + smoothing / num_classes * (sum_weight * lse - jnp.where(valid, wsum, 0))
    if z_loss:
        loss = loss + z_loss * lse**2
    loss = jnp.where(valid, loss, 0)
    # A bad target (out of range, not ignored) is NaN, in value and — as in cross_entropy — in
    # the gradient of every logit of its row; the factor is exactly 0 (and so is its gradient)
    # at every other row.
    return loss + jnp.where(bad, jnp.nan, 0) * lse


def reduce(loss, pos_weight, reduction, sum_over=None):
    """PyTorch's reduction; ``sum_over`` names the mesh axes to sum partial results over."""
    if reduction == "none":
        return loss
    total, denominator = jnp.sum(loss), jnp.sum(pos_weight)
    if sum_over:
        total = jax.lax.psum(total, sum_over)
        denominator = jax.lax.psum(denominator, sum_over)
    if reduction == "sum":
        return total
    return _common.safe_divide(total, denominator)
