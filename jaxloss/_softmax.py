"""Softmax, log-softmax, sigmoid and log-sigmoid with float32 accumulation for half inputs."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float

from jaxloss import _common


def _mask(fn: str, where: ArrayLike | None, shape: tuple[int, ...]) -> jax.Array | None:
    if where is None:
        return None
    mask = _common.as_array("where", fn, where)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"{fn}: `where` must be a boolean mask, got dtype {mask.dtype}")
    out = _common.broadcast_like("where", fn, mask, shape, boolean=True)
    assert out is not None
    return out


def _shifted(x: jax.Array, axis: int, where: jax.Array | None) -> jax.Array:
    """``x`` minus its (gradient-free) maximum along ``axis``, -inf where masked out."""
    m = jnp.max(x, axis, keepdims=True, where=where, initial=-jnp.inf)
    # A row that is entirely -inf (or masked) keeps a finite shift so that the result is the NaN
    # PyTorch gives rather than an inf - inf produced here.
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0))
    shifted = x - m
    return shifted if where is None else jnp.where(where, shifted, -jnp.inf)


@functools.partial(_common.jit, static_argnames=("axis",))
def log_softmax(
    x: Float[ArrayLike, "*shape"], axis: int = -1, where: Bool[ArrayLike, "*shape"] | None = None
) -> Float[Array, "*shape"]:
    r"""Log of the softmax along ``axis``, stable for any magnitude of ``x``.

    $$
    \mathrm{log\_softmax}(x)_i = x_i - \log \sum_j \exp(x_j)
    $$

    Args:
      x: floating input of any rank ≥ 1.
      axis: the class axis (``-1``, JAX layout; ``1`` for PyTorch's ``(N, C, ...)``).
      where: optional boolean mask broadcastable to ``x``; masked-out entries take no part in the
        normaliser and come out as ``-inf``.

    Returns:
      Log-probabilities with the shape and dtype of ``x`` (half-precision inputs are accumulated
      in float32).

    Examples:
      >>> import jax.numpy as jnp, jaxloss
      >>> jaxloss.log_softmax(jnp.array([0.0, 0.0])).round(4)
      Array([-0.6931, -0.6931], dtype=float32)

    References:
      PyTorch ``torch.nn.functional.log_softmax``; JAX ``jax.nn.log_softmax``.
    """
    x = _common.check_floating("x", "log_softmax", x)
    axis = _common.class_axis("log_softmax", axis, x.ndim)
    mask = _mask("log_softmax", where, x.shape)
    shifted = _shifted(_common.upcast(x), axis, mask)
    lse = jnp.log(jnp.sum(jnp.exp(shifted), axis, keepdims=True, where=mask))
    return (shifted - lse).astype(x.dtype)


# The custom JVP is for speed and numerics: the tangent y * (t - sum(y * t)) needs no second exp,
# and stays finite (zero) at masked or -inf entries where autodiff of exp(x - lse) would not.
@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _softmax(x: jax.Array, axis: int, where: jax.Array | None) -> jax.Array:
    e = jnp.exp(_shifted(x, axis, where))
    return e / jnp.sum(e, axis, keepdims=True, where=where)


@_softmax.defjvp
def _softmax_jvp(axis, primals, tangents):
    x, where = primals
    dx, _ = tangents
    y = _softmax(x, axis, where)
    dy = y * (dx - jnp.sum(y * dx, axis, keepdims=True, where=where))
    return y, dy if where is None else jnp.where(where, dy, 0)


@functools.partial(_common.jit, static_argnames=("axis",))
def softmax(
    x: Float[ArrayLike, "*shape"], axis: int = -1, where: Bool[ArrayLike, "*shape"] | None = None
) -> Float[Array, "*shape"]:
    r"""Softmax along ``axis``, stable for any magnitude of ``x``.

    $$
    \mathrm{softmax}(x)_i = \frac{\exp(x_i - \max x)}{\sum_j \exp(x_j - \max x)}
    $$

    Args:
      x: floating input of any rank ≥ 1.
      axis: the class axis.
      where: optional boolean mask broadcastable to ``x``; masked-out entries get probability 0.

    Returns:
      Probabilities with the shape and dtype of ``x``; ``-inf`` entries get exactly 0 and a zero
      gradient.

    Examples:
      >>> import jax.numpy as jnp, jaxloss
      >>> jaxloss.softmax(jnp.array([0.0, -jnp.inf]))
      Array([1., 0.], dtype=float32)

    References:
      PyTorch ``torch.nn.functional.softmax``; JAX ``jax.nn.softmax``.
    """
    x = _common.check_floating("x", "softmax", x)
    axis = _common.class_axis("softmax", axis, x.ndim)
    mask = _mask("softmax", where, x.shape)
    return _softmax(_common.upcast(x), axis, mask).astype(x.dtype)


@_common.jit
def sigmoid(x: Float[ArrayLike, "*shape"]) -> Float[Array, "*shape"]:
    r"""Logistic sigmoid, exact at both tails.

    $$
    \sigma(x) = \frac{1}{1 + e^{-x}}
    $$

    Args:
      x: floating input of any shape.

    Returns:
      ``σ(x)`` with the shape and dtype of ``x``.

    Examples:
      >>> import jax.numpy as jnp, jaxloss
      >>> jaxloss.sigmoid(jnp.array([0.0]))
      Array([0.5], dtype=float32)

    References:
      PyTorch ``torch.sigmoid``; JAX ``jax.nn.sigmoid``.
    """
    x = _common.check_floating("x", "sigmoid", x)
    return jax.lax.logistic(_common.upcast(x)).astype(x.dtype)


def softplus_neg(x: jax.Array) -> jax.Array:
    """``log(1 + exp(-x))``, exact and finite for any magnitude of ``x``."""
    # relu, not maximum: its derivative at 0 is 0, so that d/dx at x = 0 comes out as exactly 1/2
    # (maximum splits a tie 1/2-1/2 and abs' derivative there is 1, which would give 1).
    return jnp.log1p(jnp.exp(-jnp.abs(x))) + jax.nn.relu(-x)


@_common.jit
def log_sigmoid(x: Float[ArrayLike, "*shape"]) -> Float[Array, "*shape"]:
    r"""Log of the logistic sigmoid, finite for any magnitude of ``x``.

    $$
    \log \sigma(x) = -\log(1 + e^{-x})
    $$

    Args:
      x: floating input of any shape.

    Returns:
      ``log σ(x)`` with the shape and dtype of ``x``; ``log_sigmoid(-1e4) == -1e4``.

    Examples:
      >>> import jax.numpy as jnp, jaxloss
      >>> jaxloss.log_sigmoid(jnp.array([-1e4]))
      Array([-10000.], dtype=float32)

    References:
      PyTorch ``torch.nn.functional.logsigmoid``; JAX ``jax.nn.log_sigmoid``.
    """
    x = _common.check_floating("x", "log_sigmoid", x)
    return (-softplus_neg(_common.upcast(x))).astype(x.dtype)
