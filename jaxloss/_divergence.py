"""Information-theoretic losses: Kullback-Leibler divergence and entropy."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from jaxloss import _common


def xlogx(p: jax.Array) -> jax.Array:
    """``p log p`` with ``0 log 0 = 0`` and a finite (zero) gradient at ``p = 0``."""
    zero = p == 0
    return jnp.where(zero, 0, p * jnp.log(jnp.where(zero, 1, p)))


@functools.partial(_common.jit, static_argnames=("reduction", "log_target"))
def kl_div(
    log_q: Float[ArrayLike, "*shape"],
    target: Float[ArrayLike, "*shape"],
    *,
    reduction: str = "mean",
    log_target: bool = False,
) -> Float[Array, "*shape"] | Float[Array, ""]:
    r"""Kullback-Leibler divergence, as ``torch.nn.functional.kl_div``.

    $$
    \ell = t \, (\log t - \log q), \qquad 0 \log 0 = 0
    $$

    Args:
      log_q: log-probabilities of the model distribution ``q``.
      target: probabilities ``t`` (or log-probabilities with ``log_target=True``), same shape.
      reduction: ``"none"``, ``"sum"``, ``"mean"`` (over all elements, as PyTorch) or
        ``"batchmean"`` (the sum over the size of axis 0: the true KL per example).
      log_target: whether ``target`` holds log-probabilities.

    Returns:
      Pointwise terms or a scalar, in the dtype of ``log_q``.

    Examples:
      >>> import jax.numpy as jnp, jaxloss
      >>> t = jnp.array([[0.5, 0.5]])
      >>> float(jaxloss.kl_div(jnp.log(t), t, reduction="batchmean"))
      0.0

    References:
      PyTorch ``torch.nn.functional.kl_div``; Kullback and Leibler (1951).
    """
    fn = "kl_div"
    log_q = _common.check_floating("log_q", fn, log_q)
    target = _common.check_floating("target", fn, target)
    _common.check_same_shape(fn, ("log_q", "target"), log_q, target)
    _common.check_reduction(fn, reduction, ("none", "mean", "sum", "batchmean"))
    if reduction == "batchmean" and log_q.ndim == 0:
        raise ValueError(
            f"{fn}: reduction='batchmean' needs an input with a batch axis, got shape ()"
        )
    x, t = _common.upcast(log_q), _common.upcast(target)
    if log_target:
        # A -inf log-target is a zero-probability class: it contributes 0, not exp(-inf)·inf.
        absent = t == -jnp.inf
        safe_t = jnp.where(absent, 0, t)
        loss = jnp.where(absent, 0, jnp.exp(safe_t) * (safe_t - x))
    else:
        # 0 · (log 0 - log q) = 0 even where log q = -inf.
        # The inner where keeps 0 · (-inf) out of the target's gradient as well as the value.
        loss = xlogx(t) - t * jnp.where(t == 0, 0, x)
    if reduction == "batchmean":
        return _common.reduce_loss(loss, "mean", log_q.shape[0]).astype(log_q.dtype)
    return _common.reduce_loss(loss, reduction).astype(log_q.dtype)


@functools.partial(_common.jit, static_argnames=("axis",))
def entropy(probs: Float[ArrayLike, "*batch classes"], *, axis: int = -1) -> Float[Array, "*batch"]:
    r"""Shannon entropy (natural log) of each distribution along ``axis``.

    $$
    H(p) = -\sum_c p_c \log p_c, \qquad 0 \log 0 = 0
    $$

    The gradient at ``p_c = 0`` is taken as 0 (not ``+inf``), so ``entropy(softmax(z))`` with
    ``-inf`` (masked) logits has finite gradients.

    Args:
      probs: probabilities, classes along ``axis``.
      axis: the class axis.

    Returns:
      One entropy per distribution: the shape of ``probs`` without ``axis``, in its dtype.

    Examples:
      >>> import jax.numpy as jnp, jaxloss
      >>> jaxloss.entropy(jnp.array([0.5, 0.5, 0.0])).round(4)
      Array(0.6931, dtype=float32)

    References:
      Shannon (1948); ``torch.distributions.Categorical.entropy``.
    """
    probs = _common.check_floating("probs", "entropy", probs)
    axis = _common.class_axis("entropy", axis, probs.ndim)
    return (-jnp.sum(xlogx(_common.upcast(probs)), axis)).astype(probs.dtype)
