"""PyTorch's reductions and its NaN conventions (a bad target, a mean over nothing)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def nan_where(mask: jax.Array, x: jax.Array) -> jax.Array:
    """``x`` with NaN where ``mask`` holds (PyTorch's NaN for a bad target or an empty mean).

    The NaN is made only where ``mask`` holds (``-inf + inf``), never as a constant: under
    ``jax.debug_nans`` a NaN literal would raise on clean data (with ``jax.disable_jit``).
    """
    nan_or_inf = jnp.where(mask, -jnp.inf, 0).astype(x.dtype) + jnp.inf
    return jnp.where(mask, nan_or_inf, x)


def safe_divide(total: jax.Array, denominator: jax.Array) -> jax.Array:
    """``total / denominator``, NaN when the denominator is 0, with a zero gradient there.

    PyTorch returns NaN for a mean over nothing (every target ignored) yet zero gradients; the
    double ``where`` keeps the 0/0 out of the backward pass.
    """
    empty = denominator == 0
    return nan_where(empty, total / jnp.where(empty, 1, denominator))


def reduce_loss(
    loss: jax.Array,
    reduction: str,
    denominator: jax.Array | float | int | None = None,
    *,
    weights: jax.Array | None = None,
) -> jax.Array:
    """Applies a PyTorch reduction to per-position losses.

    Args:
      loss: per-position losses, any shape.
      reduction: ``"none"``, ``"sum"`` or ``"mean"``.
      denominator: the divisor for ``"mean"``; the number of elements when omitted.
      weights: per-position weights, the shape of ``loss``: ``"mean"`` divides by their sum
        (instead of ``denominator``).

    Returns:
      ``loss`` itself, its sum, or its sum over ``denominator``.
    """
    if reduction == "none":
        return loss
    if reduction == "mean" and weights is not None:
        # Both sums in one reduction: at small shapes each reduction is a kernel launch or two,
        # and these launches, not the arithmetic, set the time.
        pair = jnp.stack([loss, weights.astype(loss.dtype)]).reshape(2, -1)
        total, weight_sum = jnp.sum(pair, axis=1)
        return safe_divide(total, weight_sum)
    total = jnp.sum(loss)
    if reduction == "sum":
        return total
    if denominator is None:
        denominator = loss.size
    return safe_divide(total, jnp.asarray(denominator, total.dtype))
