"""``torch_linear_cross_entropy``: PyTorch 2.13's ``F.linear_cross_entropy``, signature and layout.

PyTorch's ``linear_weight`` is ``(C, d_1, …, d_K, in_features)`` — an ``nn.Linear.weight``
``(C, in_features)`` when ``K = 0`` — and its logits ``linear(input, linear_weight)`` are
``(N, C, d_1, …, d_K)``, classes on axis 1. ``jaxloss.linear_cross_entropy`` takes a Flax-style
``(D, V)`` kernel with classes last. The mapping: for ``K = 0``, ``kernel = linear_weight.T``;
for ``K ≥ 1`` every output position ``(d_1, …, d_K)`` is its own ``(D, C)`` head
``linear_weight[:, d_1, …, d_K, :].T`` over the same ``input`` rows, so the loss is
``linear_cross_entropy`` mapped (``jax.vmap``) over those positions and reduced once.
"""

from __future__ import annotations

import math
from typing import Any, Literal, cast

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Integer

from jaxloss import _implementations, _reductions, _validation
from jaxloss._linear import assembly
from jaxloss._linear.api import linear_cross_entropy

_FN = "torch_linear_cross_entropy"


def _check_layout(x, w, bias):
    """``(num_classes, out_features)`` of PyTorch's layout, once ``x``, ``w``, ``bias`` agree."""
    if x.ndim not in (1, 2):
        raise ValueError(
            f"{_FN}: `input` must be (in_features,) or (N, in_features), as in PyTorch; got "
            f"shape {tuple(x.shape)} (flatten the batch axes first)"
        )
    if w.ndim < 2 or w.shape[-1] != x.shape[-1]:
        raise ValueError(
            f"{_FN}: `linear_weight` must be (C, d_1, ..., d_K, in_features) with in_features = "
            f"{x.shape[-1]} (the last axis of `input`); got shape {tuple(w.shape)}"
        )
    c, out = w.shape[0], tuple(w.shape[1:-1])
    if bias is not None and bias.shape != (c, *out):
        raise ValueError(
            f"{_FN}: `linear_bias` must have shape {(c, *out)}, matching `linear_weight` "
            f"{tuple(w.shape)}; got {tuple(bias.shape)}"
        )
    if out and x.ndim == 1:
        raise ValueError(
            f"{_FN}: K-dimensional `linear_weight` {tuple(w.shape)} needs batched input "
            f"(N, {x.shape[-1]}); got shape {tuple(x.shape)}"
        )
    return c, out


@_validation.checked_call
def torch_linear_cross_entropy(
    input: Float[ArrayLike, "*input_shape"],
    linear_weight: Float[ArrayLike, "*weight_shape"],
    target: Integer[ArrayLike, "*target_shape"] | Float[ArrayLike, "*target_shape"],
    *,
    linear_bias: Float[ArrayLike, "*bias_shape"] | None = None,
    weight: Float[ArrayLike, "*class_weight_shape"] | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    implementation: Literal["xla", "pallas"] | None = None,
) -> Float[Array, "*loss_shape"]:
    r"""``torch.nn.functional.linear_cross_entropy`` (PyTorch 2.13) in JAX, fused.

    Equal to ``cross_entropy(linear(input, linear_weight, linear_bias), target, ...)`` with
    PyTorch's layouts, computed by :func:`jaxloss.linear_cross_entropy` without the logits:

    $$
    z_{n,c,d} = \sum_i x_{n,i} W_{c,d,i} + b_{c,d}, \qquad
    \ell_{n,d} = \mathrm{cross\_entropy}(z_{n,\cdot,d}, y_{n,d})
    $$

    over output positions ``d`` (none when ``linear_weight`` is ``(C, in_features)``).

    Args:
      input: ``(in_features,)`` or ``(N, in_features)``.
      linear_weight: ``(C, in_features)`` or ``(C, d_1, ..., d_K, in_features)``.
      target: class indices ``()``, ``(N,)`` or ``(N, d_1, ..., d_K)``; or class probabilities
        of the logits' shape ``(C,)``, ``(N, C)`` or ``(N, C, d_1, ..., d_K)``.
      linear_bias: optional ``(C,)`` or ``(C, d_1, ..., d_K)``.
      weight: optional per-class weight ``(C,)``.
      reduction: ``"none"``, ``"mean"`` or ``"sum"``, PyTorch's rules.
      ignore_index: ignored class index for index targets (``None``: -100); must stay ``None``
        for probability targets, as in PyTorch.
      label_smoothing: ε in ``[0, 1]``.
      implementation: as for :func:`jaxloss.linear_cross_entropy` (``None``, ``"xla"``;
        ``"pallas"`` has no kernel yet: a ``ValueError``).

    Returns:
      The loss: ``target``'s index shape for ``"none"``, else a scalar. Differentiable in
      ``input``, ``linear_weight``, ``linear_bias`` and ``weight`` (reverse mode).

    Examples:
      >>> import jax, jax.numpy as jnp, jaxloss
      >>> x = jax.random.normal(jax.random.key(0), (4, 3))
      >>> w = jax.random.normal(jax.random.key(1), (7, 2, 3))  # C=7 classes, K=1 (d_1=2)
      >>> y = jnp.array([[0, 6], [1, 2], [3, 3], [5, 4]])
      >>> loss = jaxloss.torch_linear_cross_entropy(x, w, y)
      >>> logits = jnp.einsum("ni,cdi->ncd", x, w)
      >>> bool(jnp.allclose(loss, jaxloss.cross_entropy(logits, y, axis=1), rtol=1e-5))
      True
    """
    _implementations.check_linear(_FN, implementation)
    x = _validation.check_floating(_FN, "input", input)
    w = _validation.check_floating(_FN, "linear_weight", linear_weight)
    bias = (
        None if linear_bias is None else _validation.check_floating(_FN, "linear_bias", linear_bias)
    )
    t = _validation.check_real(_FN, "target", target)
    c, out = _check_layout(x, w, bias)
    probabilities = t.shape == (*x.shape[:-1], c, *out) and jnp.issubdtype(t.dtype, jnp.floating)
    if probabilities and ignore_index is not None:
        raise ValueError(f"{_FN}: `ignore_index` cannot be given when `target` holds probabilities")
    index = -100 if ignore_index is None else ignore_index
    options: dict[str, Any] = dict(
        weight=weight,
        ignore_index=index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        implementation=implementation,
    )
    unbatched = x.ndim == 1
    if unbatched:
        x, t = x[None], t[None]
    if not out:
        loss = cast(jax.Array, linear_cross_entropy(x, w.T, t, bias=bias, **options))
    else:
        loss = _k_dimensional(x, w, t, bias, probabilities, options)
    return loss[0] if unbatched and reduction == "none" else loss


def _k_dimensional(x, w, t, bias, probabilities: bool, options: dict[str, Any]) -> jax.Array:
    """The loss of ``(C, d_1, ..., d_K, D)`` weights: one ``(D, C)`` head per output position."""
    n, (c, *out, d) = x.shape[0], w.shape
    positions = math.prod(out)
    kernels = jnp.transpose(w.reshape(c, positions, d), (1, 2, 0))  # (P, D, C)
    biases = None if bias is None else bias.reshape(c, positions).T  # (P, C)
    if probabilities:
        targets = jnp.transpose(t.reshape(n, c, positions), (2, 0, 1))  # (P, N, C)
    else:
        targets = t.reshape(n, positions).T  # (P, N)
    reduction = options["reduction"]
    per_head = dict(options, reduction="none" if reduction == "none" else "sum")

    def head(kernel, targets, bias):
        return cast(jax.Array, linear_cross_entropy(x, kernel, targets, bias=bias, **per_head))

    losses = jax.vmap(head)(kernels, targets, biases)
    if reduction == "none":
        return losses.T.reshape(n, *out)
    total = jnp.sum(losses)
    if reduction == "sum":
        return total
    if probabilities:
        return total / (n * positions)
    class_weight = options["weight"]
    class_weight = None if class_weight is None else jnp.asarray(class_weight, total.dtype)
    _, _, pos_weight = assembly.index_setup(
        targets, class_weight, c, options["ignore_index"], total.dtype
    )
    return _reductions.safe_divide(total, jnp.sum(pos_weight))
