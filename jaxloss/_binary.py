"""Binary (multi-label) losses: bce on probabilities and bce_with_logits, PyTorch semantics."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Real

from jaxloss import _autodiff, _dtypes, _reductions, _validation
from jaxloss._softmax import softplus_neg

# PyTorch clamps each log at -100 so that p = 0 or 1 gives a finite loss.
_LOG_CLAMP = -100.0
# PyTorch's backward divides by max(p (1 - p), 1e-12), its 1e-12 rounded to float32 even in
# float64; the same constant keeps float64 results bit-comparable.
_GRAD_EPS = float(np.float32(1e-12))


def _upcast_or_none(w: jax.Array | None) -> jax.Array | None:
    return None if w is None else _dtypes.upcast(w)


def _binary_inputs(fn, inputs, targets, weight, reduction, input_name):
    inputs = _validation.check_floating(fn, input_name, inputs)
    targets = _validation.check_floating(fn, "targets", targets)
    _validation.check_same_shape(fn, (input_name, "targets"), inputs, targets)
    _validation.check_reduction(fn, reduction)
    weight = _validation.broadcast_like(fn, "weight", weight, inputs.shape)
    return inputs, targets, weight


def _bce_loss(static, p, data):
    del static
    y, w = data
    log_p = jnp.maximum(jnp.log(p), _LOG_CLAMP)
    log_1mp = jnp.maximum(jnp.log1p(-p), _LOG_CLAMP)
    loss = -(y * log_p + (1 - y) * log_1mp)
    return loss if w is None else w * loss


def _bce_grad(p, y, w):
    g = (p - y) / jnp.maximum(p * (1 - p), _GRAD_EPS)
    return g if w is None else w * g


# Custom JVP for parity: PyTorch's gradient is (p - y) / max(p(1-p), 1e-12) even where the -100
# clamp is active, whereas autodiff of the clamp would give 0 there.
def _bce_loss_and_grad(static, p, data):
    return _bce_loss(static, p, data), _bce_grad(p, *data)


_bce = _autodiff.fused_jvp(_bce_loss, _bce_loss_and_grad, _autodiff.contract_elementwise)


@functools.partial(_validation.jit, static_argnames=("reduction",))
def bce(
    probs: Float[ArrayLike, "*shape"],
    targets: Float[ArrayLike, "*shape"],
    *,
    weight: Real[ArrayLike, "*#shape"] | None = None,
    reduction: str = "mean",
) -> Float[Array, "*shape"] | Float[Array, ""]:
    r"""Binary cross-entropy on probabilities, as ``torch.nn.functional.binary_cross_entropy``.

    $$
    \ell = -w \left[ y \max(\log p, -100) + (1 - y) \max(\log(1 - p), -100) \right]
    $$

    Args:
      probs: probabilities ``p`` in ``[0, 1]`` (outside it the loss is NaN).
      targets: targets ``y`` with the shape of ``probs`` (soft targets allowed).
      weight: optional weight broadcast against ``probs`` (trailing axes aligned, never
        enlarging it).
      reduction: ``"none"``, ``"sum"`` or ``"mean"`` (over all elements).

    Returns:
      Elementwise losses or a scalar, in the dtype of ``probs``. ``p = 0`` with ``y = 1`` gives
      exactly 100, as in PyTorch.

    Examples:
      >>> import jax.numpy as jnp, jaxloss
      >>> jaxloss.bce(jnp.array([0.0, 0.5]), jnp.array([1.0, 1.0]), reduction="none").round(4)
      Array([100.    ,   0.6931], dtype=float32)

    References:
      PyTorch ``torch.nn.functional.binary_cross_entropy``.
    """
    probs, targets, weight = _binary_inputs("bce", probs, targets, weight, reduction, "probs")
    up = _dtypes.upcast
    loss = _bce(None, up(probs), (up(targets), _upcast_or_none(weight)))
    return _reductions.reduce_loss(loss, reduction).astype(probs.dtype)


def _bce_logits_loss(static, x, data):
    del static
    y, w, pw = data
    log_weight = 1 if pw is None else 1 + (pw - 1) * y
    loss = (1 - y) * x + log_weight * softplus_neg(x)
    return loss if w is None else w * loss


def _bce_logits_grad(x, y, w, pw):
    log_weight = 1 if pw is None else 1 + (pw - 1) * y
    g = (1 - y) - log_weight * jax.lax.logistic(-x)
    return g if w is None else w * g


# Custom JVP for speed: σ(-x) is the whole derivative, with no softplus chain rule to unwind.
def _bce_logits_loss_and_grad(static, x, data):
    return _bce_logits_loss(static, x, data), _bce_logits_grad(x, *data)


_bce_logits = _autodiff.fused_jvp(
    _bce_logits_loss, _bce_logits_loss_and_grad, _autodiff.contract_elementwise
)


@functools.partial(_validation.jit, static_argnames=("reduction",))
def bce_with_logits(
    logits: Float[ArrayLike, "*shape"],
    targets: Float[ArrayLike, "*shape"],
    *,
    weight: Real[ArrayLike, "*#shape"] | None = None,
    pos_weight: Real[ArrayLike, "*#shape"] | None = None,
    reduction: str = "mean",
) -> Float[Array, "*shape"] | Float[Array, ""]:
    r"""Binary cross-entropy on logits, as ``torch.nn.functional.binary_cross_entropy_with_logits``.

    $$
    \ell = w \left[ (1 - y)\, x + (1 + (p_w - 1) y) \log(1 + e^{-x}) \right]
    $$

    exact and finite for logits of any magnitude.

    Args:
      logits: floating logits ``x``.
      targets: targets ``y`` with the shape of ``logits`` (soft targets allowed).
      weight: optional weight broadcast against ``logits``.
      pos_weight: optional weight of the positive term broadcast against ``logits``; usually one
        entry per label, shape ``(labels,)``.
      reduction: ``"none"``, ``"sum"`` or ``"mean"`` (over all elements).

    Returns:
      Elementwise losses or a scalar, in the dtype of ``logits``.

    Examples:
      >>> import jax.numpy as jnp, jaxloss
      >>> jaxloss.bce_with_logits(jnp.array([1e4, -1e4]), jnp.array([1.0, 1.0]), reduction="none")
      Array([    0., 10000.], dtype=float32)

    References:
      PyTorch ``torch.nn.functional.binary_cross_entropy_with_logits``.
    """
    fn = "bce_with_logits"
    logits, targets, weight = _binary_inputs(fn, logits, targets, weight, reduction, "logits")
    pos_weight = _validation.broadcast_like(fn, "pos_weight", pos_weight, logits.shape)
    up = _dtypes.upcast
    data = (up(targets), _upcast_or_none(weight), _upcast_or_none(pos_weight))
    loss = _bce_logits(None, up(logits), data)
    return _reductions.reduce_loss(loss, reduction).astype(logits.dtype)
