"""Information-theoretic losses: Kullback-Leibler divergence and entropy."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from jaxloss import _autodiff, _dtypes, _reductions, _validation, _xla_cpu


# Custom JVP for a convention: the derivative of p log p is 0 at p = 0 (autodiff: -inf).
@jax.custom_jvp
def xlogx(p: jax.Array) -> jax.Array:
    """``p log p`` with ``0 log 0 = 0``, NaN for ``p < 0``, in float32 for half-precision ``p``;
    its derivative ``log p + 1`` is taken as 0 at ``p = 0``."""
    q = _dtypes.upcast(p)
    # q + tiny·[q = 0] rather than a select: 0 · log(tiny) = 0 exactly, a negative q (outside
    # the domain) gives log of a negative number, NaN, as in PyTorch.
    return q * jnp.log(q + jnp.finfo(q.dtype).tiny * _xla_cpu.zero_indicator(q))


@xlogx.defjvp
def _xlogx_jvp(primals, tangents):
    (p,), (dp,) = primals, tangents
    # A zero derivative at p = 0 (not -inf) keeps entropy(softmax(z)) trainable with -inf
    # (masked) logits. Without a select (see _xla_cpu.zero_indicator) it fuses into a reduction;
    # its own derivative is 1/p, and 0 at p = 0. Both the widening and the log are written
    # differently from the value's (q + [q == 0] here, q + tiny·[q == 0] there): identical ones
    # would be merged by XLA into one N×C float32 temporary for half-precision p.
    q = _xla_cpu.upcast_apart(p)
    slope = jnp.abs(jnp.sign(q)) * (jnp.log(q + _xla_cpu.zero_indicator(q)) + 1)
    return xlogx(p), slope * _dtypes.upcast(dp)


# Custom JVP for conventions and memory: 0 gradients where the target probability is 0, and the
# gradient's widening kept apart from the value's (no shared float32 copy of half inputs).
@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _kl_pointwise(log_q: jax.Array, target: jax.Array, log_target: bool) -> jax.Array:
    """``t (log t - log q)`` elementwise, 0 wherever the target probability is 0.

    Half-precision inputs are widened inside (float32 result), the gradient's widening kept
    apart from the value's so that XLA does not materialise a shared float32 copy.
    """
    # Select-free (see _xla_cpu.zero_indicator): a zero target probability absorbs a -inf log_q.
    log_q, target = _dtypes.upcast(log_q), _dtypes.upcast(target)
    if log_target:
        p = jnp.exp(target)
        return _xla_cpu.absorbing_product(p, target) - _xla_cpu.absorbing_product(p, log_q)
    return xlogx(target) - _xla_cpu.absorbing_product(target, log_q)


def _kl_pointwise_jvp(log_target, primals, tangents):
    (log_q, target), (d_log_q, d_target) = primals, tangents
    out = _kl_pointwise(log_q, target, log_target)
    wide_target = _xla_cpu.upcast_apart(target)
    p = jnp.exp(wide_target) if log_target else wide_target
    # ∂/∂log_q = -p everywhere (0 where p = 0): no select, so it fuses into the gradient's write.
    tangent = jnp.zeros_like(out) if _autodiff.is_zero(d_log_q) else -p * _dtypes.upcast(d_log_q)
    if not _autodiff.is_zero(d_target):
        log_q, target, d_target = (_dtypes.upcast(a) for a in (log_q, target, d_target))
        # ∂/∂t = log t + 1 - log q (for a log-target s: e^s (s - log q + 1)), taken as 0 where
        # the target probability is 0 so that a masked class sends no NaN to a learned teacher.
        absent = p == 0
        safe_q = jnp.where(absent, 0, log_q)
        if log_target:
            d_t = jnp.where(absent, 0, p * (jnp.where(absent, 0, target) - safe_q + 1))
        else:
            d_t = jnp.where(absent, 0, jnp.log(jnp.where(absent, 1, target)) + 1 - safe_q)
        tangent = tangent + d_t * d_target
    return out, tangent


_kl_pointwise.defjvp(_kl_pointwise_jvp, symbolic_zeros=True)


@functools.partial(_validation.jit, static_argnames=("reduction", "log_target"))
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
        ``"batchmean"`` (the sum over the size of axis 0: the true KL per example; for 0-d
        inputs the pointwise value, as PyTorch).
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
    log_q = _validation.check_floating(fn, "log_q", log_q)
    target = _validation.check_floating(fn, "target", target)
    _validation.check_same_shape(fn, ("log_q", "target"), log_q, target)
    _validation.check_reduction(fn, reduction, ("none", "mean", "sum", "batchmean"))
    log_target = _validation.check_flag(fn, "log_target", log_target)
    loss = _kl_pointwise(log_q, target, log_target)
    if reduction == "batchmean":
        # PyTorch divides by the size of axis 0; a 0-d input has none and keeps its value.
        batch = log_q.shape[0] if log_q.ndim else 1
        return _reductions.reduce_loss(loss, "mean", batch).astype(log_q.dtype)
    return _reductions.reduce_loss(loss, reduction).astype(log_q.dtype)


@functools.partial(_validation.jit, static_argnames=("axis",))
def entropy(probs: Float[ArrayLike, "*shape"], *, axis: int = -1) -> Float[Array, "*positions"]:
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
    probs = _validation.check_floating("entropy", "probs", probs)
    axis = _validation.class_axis("entropy", axis, probs.ndim)
    return (-jnp.sum(xlogx(probs), axis)).astype(probs.dtype)
