"""Index targets, written once: ignore mask, out-of-range mask, per-position weight, reduction.

``nll``, ``cross_entropy``, every form of ``linear_cross_entropy`` (materialised, chunked,
sharded) and ``check_targets`` build their bookkeeping here, so PyTorch's rules (the weighted
mean over the non-ignored targets, NaN where everything is ignored, NaN at an out-of-range
target) cannot drift apart between them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify
from jaxtyping import ArrayLike, Integer

from jaxloss import _reductions, _validation


class IndexTargets(NamedTuple):
    """Per-position quantities of index targets (each of the targets' shape).

    Attributes:
      valid: not ``ignore_index``.
      bad: valid and outside ``[0, C)``: PyTorch raises, under ``jit`` the loss there is NaN.
      weight: ``weight[target]`` at valid positions (1 without class weights), 0 elsewhere: the
        terms of PyTorch's ``"mean"`` denominator.
    """

    valid: jax.Array
    bad: jax.Array
    weight: jax.Array


def widen(targets: jax.Array) -> jax.Array:
    """Integer targets of fewer than 32 bits as int32; wider ones as they are.

    Comparisons with the class count and the clip to ``C - 1`` run in the targets' dtype, where
    ``C`` may not exist: 256 classes wrap to 0 in uint8 (every target would read as out of
    range), and an int8 weight lookup overflows. Byte-level models and uint16 token ids are real.
    """
    if np.iinfo(targets.dtype).bits < 32:
        return targets.astype(jnp.int32)
    return targets


def ignored(targets: jax.Array, ignore_index: int) -> jax.Array:
    """Boolean mask of ignored positions; none when ``ignore_index`` cannot occur in the dtype."""
    info = np.iinfo(targets.dtype)
    if not info.min <= ignore_index <= info.max:
        return jnp.zeros(targets.shape, jnp.bool_)
    return targets == ignore_index


def index_targets(
    targets: jax.Array,
    num_classes: int,
    ignore_index: int,
    class_weight: jax.Array | None,
    dtype: Any,
) -> IndexTargets:
    """The ``IndexTargets`` of integer ``targets`` over ``num_classes``, weights in ``dtype``."""
    targets = widen(targets)
    valid = ~ignored(targets, ignore_index)
    bad = valid & ((targets < 0) | (targets >= num_classes))
    if class_weight is None or num_classes == 0:
        # No classes, no weight to gather: every target is ignored or out of range (NaN).
        return IndexTargets(valid, bad, valid.astype(dtype))
    safe = jnp.clip(targets, 0, num_classes - 1)
    picked = _take(class_weight.astype(dtype), safe)
    return IndexTargets(valid, bad, jnp.where(valid, picked, 0))


def reduce(loss: jax.Array, reduction: str, idx: IndexTargets) -> jax.Array:
    """PyTorch's reduction of index-target losses: ``"mean"`` divides by ``Σ idx.weight``.

    A bad target makes its position NaN (and so any reduction); every target ignored makes the
    mean NaN with zero gradients.
    """
    loss = _reductions.nan_where(idx.bad, loss)
    return _reductions.reduce_loss(loss, reduction, weights=idx.weight)


def check_ignore_index(fn: str, ignore_index: Any) -> int:
    """``ignore_index`` as an int; ``TypeError`` for anything else (a float, a bool, a string)."""
    if not isinstance(ignore_index, (int, np.integer)) or isinstance(ignore_index, bool):
        raise TypeError(f"{fn}: `ignore_index` must be an int, got {ignore_index!r}")
    return int(ignore_index)


# ----------------------------------------------------------------------------------------------
# Explicit sharding: a gather must name its output's sharding
# ----------------------------------------------------------------------------------------------


def explicit_spec(x: jax.Array) -> tuple:
    """The mesh axes ``x``'s type says it is split over, per dimension (explicit sharding)."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    return tuple(spec or ())


def _take(weight: jax.Array, index: jax.Array) -> jax.Array:
    """``weight[index]``; under explicit sharding a gather must name its output's sharding."""
    if any(explicit_spec(weight)) or any(explicit_spec(index)):
        return weight.at[index].get(out_sharding=jax.typeof(index).sharding)
    return weight[index]


# ----------------------------------------------------------------------------------------------
# Errors on data: eagerly (PyTorch's), or under checkify
# ----------------------------------------------------------------------------------------------


def raise_if_out_of_range(
    fn: str, input_name: str, shape: tuple[int, ...], targets: Any, ignore_index: Any, axis: Any
) -> None:
    """PyTorch's out-of-bounds error for concrete index targets; nothing for traced ones.

    Runs before the compiled function (``_validation.jit``'s ``prepare``), so it costs nothing under
    an outer ``jit``. Arguments that are wrong in type or shape are left to the compiled
    function's own checks, which name them.
    """
    if not _validation.is_concrete(targets) or not isinstance(ignore_index, (int, np.integer)):
        return
    t = np.asarray(targets)
    if not np.issubdtype(t.dtype, np.integer) or not isinstance(axis, (int, np.integer)):
        return
    if not -len(shape) <= axis < len(shape):
        return
    axis = int(axis) % len(shape)
    if t.shape != _validation.without_axis(shape, axis):
        return
    num_classes = shape[axis]
    bad = (t != ignore_index) & ((t < 0) | (t >= num_classes))
    if not bad.any():
        return
    position = tuple(int(i) for i in np.argwhere(bad)[0])
    hint = ""
    if num_classes == 1 and input_name == "logits":
        hint = (
            ". `logits` have a single class: for a binary task with 0/1 targets use "
            "`jaxloss.bce_with_logits(jnp.squeeze(logits, axis), targets.astype(logits.dtype))`"
        )
    raise ValueError(
        f"{fn}: `targets` holds class index {t[position]} at position {position}, out of "
        f"bounds for `{input_name}` of shape {shape} with {num_classes} "
        f"class{'es' if num_classes != 1 else ''} along axis {axis}: valid targets lie in "
        f"[0, {num_classes}) or equal ignore_index={ignore_index}{hint}. (Under jit such a "
        "target gives NaN; see check_targets.)"
    )


def check_targets(
    targets: Integer[ArrayLike, "*batch"], num_classes: int, *, ignore_index: int = -100
) -> None:
    """Asserts, inside ``jax.experimental.checkify``, that every index target is in range.

    The losses cannot raise on data under ``jit``; they return NaN at a bad position instead.
    Call this in a train step wrapped by ``checkify.checkify`` to get a clear error.

    Args:
      targets: integer class indices.
      num_classes: the number of classes ``C``; valid targets lie in ``[0, C)``.
      ignore_index: the target value that is exempt from the check.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxloss
      >>> from jax.experimental import checkify
      >>> def step(z, y):
      ...     jaxloss.check_targets(y, z.shape[-1])
      ...     return jaxloss.cross_entropy(z, y)
      >>> err, _ = jax.jit(checkify.checkify(step))(jnp.zeros((2, 3)), jnp.array([0, 7]))
      >>> print(err.get())  # doctest: +ELLIPSIS
      cross_entropy targets out of range [0, 3): 7 ...
    """
    targets = widen(_validation.check_integer("check_targets", "targets", targets))
    ignore_index = check_ignore_index("check_targets", ignore_index)
    bad = index_targets(targets, num_classes, ignore_index, None, jnp.float32).bad
    first = jnp.zeros((), targets.dtype)
    if targets.size:
        first = jnp.where(bad, targets, 0).ravel()[jnp.argmax(bad.ravel())]
    if _staged_outside_checkify():
        raise ValueError(
            "check_targets: under jit (or scan, shard_map, ...) it must run inside a function "
            "transformed by `jax.experimental.checkify.checkify`, which turns the check into an "
            "error value:\n"
            "    err, loss = jax.jit(checkify.checkify(step))(logits, targets)\n"
            "    err.throw()  # raises if a target was out of range"
        )
    checkify.check(
        ~jnp.any(bad),
        f"cross_entropy targets out of range [0, {num_classes}): {{t}} (and not ignore_index)",
        t=first,
    )


def _staged_outside_checkify() -> bool:
    """Whether the check is being staged (jit, scan, ...) with no ``checkify`` around it.

    JAX itself reports that case only when lowering, with a message that names neither the
    function nor the fix. This reads JAX's trace stack; where that internal API differs, it says
    False and JAX's own error stands.
    """
    try:
        from jax._src import core
        from jax._src.interpreters import partial_eval

        trace, staged = core.trace_ctx.trace, False
        while trace is not None:
            debug_info = getattr(getattr(trace, "frame", None), "debug_info", None)
            if getattr(debug_info, "traced_for", None) == "checkify":
                return False
            staged = staged or isinstance(trace, partial_eval.DynamicJaxprTrace)
            trace = getattr(trace, "parent_trace", None)
        return staged
    except (AttributeError, ImportError):
        return False


def check_hyperparameters(
    *,
    label_smoothing: Any = None,
    z_loss: Any = None,
    temperature: Any = None,
    beta: Any = None,
) -> None:
    """Asserts, inside ``checkify``, that traced hyperparameters are in range.

    ``label_smoothing`` and ``beta`` in ``[0, 1]``, ``z_loss`` finite and ``>= 0``,
    ``temperature`` finite and ``> 0`` (``linear_distillation``'s τ).

    Concrete values are checked by the losses themselves; a value computed inside ``jit`` (a
    schedule) can only be checked this way, as with :func:`check_targets`.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxloss
      >>> from jax.experimental import checkify
      >>> def step(z, y, eps):
      ...     jaxloss.check_hyperparameters(label_smoothing=eps)
      ...     return jaxloss.cross_entropy(z, y, label_smoothing=eps)
      >>> err, _ = jax.jit(checkify.checkify(step))(jnp.zeros((2, 3)), jnp.array([0, 1]), 1.5)
      >>> print(err.get())  # doctest: +ELLIPSIS
      label_smoothing must lie in [0, 1], got 1.5 ...
    """
    if _staged_outside_checkify():
        raise ValueError(
            "check_hyperparameters: under jit it must run inside a function transformed by "
            "`jax.experimental.checkify.checkify` (see check_targets)"
        )
    if label_smoothing is not None:
        eps = jnp.asarray(label_smoothing)
        ok = (eps >= 0) & (eps <= 1)
        checkify.check(ok, "label_smoothing must lie in [0, 1], got {v}", v=eps)
    if z_loss is not None:
        lam = jnp.asarray(z_loss)
        ok = (lam >= 0) & jnp.isfinite(lam)
        checkify.check(ok, "z_loss must be finite and >= 0, got {v}", v=lam)
    if temperature is not None:
        tau = jnp.asarray(temperature)
        ok = (tau > 0) & jnp.isfinite(tau)
        checkify.check(ok, "temperature must be finite and > 0, got {v}", v=tau)
    if beta is not None:
        b = jnp.asarray(beta)
        checkify.check((b >= 0) & (b <= 1), "beta must lie in [0, 1], got {v}", v=b)
