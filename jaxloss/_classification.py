"""Multi-class losses: negative log-likelihood and cross-entropy, PyTorch semantics."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify
from jaxtyping import Array, ArrayLike, Float, Int

from jaxloss import _common

# ----------------------------------------------------------------------------------------------
# Index targets: shared setup
# ----------------------------------------------------------------------------------------------


def _ignored(targets: jax.Array, ignore_index: int) -> jax.Array:
    """Boolean mask of ignored positions; none when ``ignore_index`` cannot occur in the dtype."""
    info = np.iinfo(targets.dtype)
    if not info.min <= ignore_index <= info.max:
        return jnp.zeros(targets.shape, jnp.bool_)
    return targets == ignore_index


def _axis_hint(shape: tuple[int, ...], target_shape: tuple[int, ...], axis: int) -> str:
    """Names the class axis that would fit, e.g. ``axis=1`` for PyTorch's ``(N, C, d1)``."""
    fits = [a for a in range(len(shape)) if _common.without_axis(shape, a) == target_shape]
    if not fits or axis in fits:
        return ""
    return (
        f". With the classes along axis {fits[0]} (PyTorch's (N, C, d1, ...) layout is axis=1), "
        f"pass `axis={fits[0]}`"
    )


class _IndexTargets:
    """Validated index targets and the per-position quantities every index loss needs."""

    def __init__(self, fn, inputs, targets, weight, ignore_index, axis, input_name):
        if not isinstance(ignore_index, (int, np.integer)) or isinstance(ignore_index, bool):
            raise TypeError(f"{fn}: `ignore_index` must be an int, got {ignore_index!r}")
        self.axis = _common.class_axis(fn, axis, inputs.ndim)
        expected = _common.without_axis(inputs.shape, self.axis)
        if targets.shape != expected:
            raise ValueError(
                f"{fn}: index `targets` must have the shape of `{input_name}` without its class "
                f"axis {self.axis}, i.e. {expected}; got `targets` with shape "
                f"{tuple(targets.shape)} (dtype {targets.dtype}) for `{input_name}` with shape "
                f"{tuple(inputs.shape)} (dtype {inputs.dtype})"
                + _axis_hint(inputs.shape, targets.shape, self.axis)
            )
        self.num_classes = inputs.shape[self.axis]
        self.targets = targets
        self.valid = ~_ignored(targets, int(ignore_index))
        # Out of range and not ignored: PyTorch raises; under jit we cannot, so the loss is NaN.
        self.bad = self.valid & ((targets < 0) | (targets >= self.num_classes))
        self.class_weight = _common.check_class_weight(fn, weight, self.num_classes)
        dtype = _common.compute_dtype(inputs.dtype)
        if self.class_weight is None:
            self.pos_weight = self.valid.astype(dtype)
        else:
            self.class_weight = self.class_weight.astype(dtype)
            safe = jnp.clip(targets, 0, self.num_classes - 1)
            self.pos_weight = jnp.where(self.valid, _take(self.class_weight, safe), 0)

    def reduce(self, loss: jax.Array, reduction: str) -> jax.Array:
        """PyTorch's reduction: "mean" divides by the total weight of the non-ignored targets."""
        loss = jnp.where(self.bad, jnp.nan, loss)
        return _common.reduce_loss(loss, reduction, weights=self.pos_weight)


def _concrete_target_check(fn: str, input_name: str):
    """An ``eager_check`` raising PyTorch's out-of-bounds error on concrete index targets."""

    def check(inputs, targets, *, ignore_index=-100, axis=-1, **_) -> None:
        if not _common.is_concrete(targets) or not isinstance(ignore_index, (int, np.integer)):
            return
        t, shape = np.asarray(targets), np.shape(inputs)
        if not np.issubdtype(t.dtype, np.integer) or not isinstance(axis, (int, np.integer)):
            return  # the compiled function names what is wrong with these
        if not -len(shape) <= axis < len(shape):
            return
        axis = int(axis) % len(shape)
        if t.shape != _common.without_axis(shape, axis):
            return
        num_classes = shape[axis]
        bad = (t != ignore_index) & ((t < 0) | (t >= num_classes))
        if not bad.any():
            return
        position = tuple(int(i) for i in np.argwhere(bad)[0])
        hint = ""
        if num_classes == 1 and fn == "cross_entropy":
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

    return check


# ----------------------------------------------------------------------------------------------
# nll
# ----------------------------------------------------------------------------------------------


@functools.partial(
    _common.jit,
    static_argnames=("ignore_index", "reduction", "axis"),
    eager_check=_concrete_target_check("nll", "log_probs"),
)
def nll(
    log_probs: Float[ArrayLike, "*batch classes *rest"],
    targets: Int[ArrayLike, "*batch *rest"],
    *,
    weight: Float[ArrayLike, " classes"] | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    axis: int = -1,
) -> Float[Array, "*batch *rest"] | Float[Array, ""]:
    r"""Negative log-likelihood of index targets, as ``torch.nn.functional.nll_loss``.

    $$
    \ell_n = -w_{y_n} \, x_{n, y_n}, \qquad
    \mathrm{mean} = \frac{\sum_n \ell_n}{\sum_{n: y_n \ne \mathrm{ignore}} w_{y_n}}
    $$

    Args:
      log_probs: floating scores ``x`` (usually log-probabilities), classes along ``axis``.
      targets: integer class indices with the shape of ``log_probs`` without ``axis``.
      weight: optional per-class weight, shape ``(classes,)``.
      ignore_index: target value that contributes neither loss, weight nor gradient.
      reduction: ``"none"`` (per position), ``"sum"`` or ``"mean"`` (weighted mean).
      axis: the class axis (``-1``; ``1`` for PyTorch's ``(N, C, d1, ...)`` layout, which is
        ambiguous without it when ``C`` equals the last size).

    Returns:
      Per-position losses (``"none"``) or a scalar, in the dtype of ``log_probs``. A target out
      of range that is not ``ignore_index`` gives NaN at its position.

    Examples:
      >>> import jax.numpy as jnp, jaxloss
      >>> x = jnp.array([[1.0, 2.0], [1.0, 3.0], [1.0, 3.0]])
      >>> jaxloss.nll(x, jnp.array([0, 1, 1]), reduction="none")
      Array([-1., -3., -3.], dtype=float32)

    References:
      PyTorch ``torch.nn.functional.nll_loss``.
    """
    fn = "nll"
    log_probs = _common.check_floating("log_probs", fn, log_probs)
    targets = _common.check_integer("targets", fn, targets)
    _common.check_reduction(fn, reduction)
    idx = _IndexTargets(fn, log_probs, targets, weight, ignore_index, axis, "log_probs")
    loss = _nll(log_probs, targets, idx.valid, idx.pos_weight, idx.axis)
    return idx.reduce(loss, reduction).astype(log_probs.dtype)


def _nll_loss(x, targets, valid, pos_weight, axis):
    picked = jnp.squeeze(_pick(_common.upcast(x), targets, axis), axis)
    return jnp.where(valid, -pos_weight * picked, 0)


def _nll_loss_and_grad(x, targets, valid, pos_weight, axis):
    hit = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis) == jnp.expand_dims(targets, axis)
    hit = hit & jnp.expand_dims(valid, axis)
    grad = jnp.where(hit, -jnp.expand_dims(pos_weight, axis), 0)
    return _nll_loss(x, targets, valid, pos_weight, axis), grad


# Custom JVP for speed: the gradient is a one-hot built from an iota comparison, fused into the
# backward pass, instead of the scatter-add that autodiff of the gather would produce.
_nll = _common.fused_jvp(_nll_loss, _nll_loss_and_grad, 1, _common.contract_axis)


# ----------------------------------------------------------------------------------------------
# cross_entropy kernels
# ----------------------------------------------------------------------------------------------


class _Normalizer:
    """Per-row softmax pieces shared by the loss and its gradient.

    ``e = exp(z - max)`` is stored in ``e_dtype``: float32 when only the loss is needed (XLA then
    fuses the exp into the sum and never materialises it), the logits' own dtype when the
    gradient is needed, so that the one N×C buffer that must exist is the gradient's own (XLA
    writes the gradient in place of ``e``: one exp per logit and no temporaries, even for bf16).
    """

    def __init__(self, z: jax.Array, axis: int, e_dtype, finite_shift: bool = True):
        self.logits, self.axis = z, axis
        zc = _common.upcast(z)
        # The max is exact in any dtype; taking it before the upcast keeps XLA from materialising
        # a float32 copy of half-precision logits.
        m = jnp.max(z, axis, keepdims=True).astype(zc.dtype)
        if finite_shift:
            # A row of all -inf keeps a finite shift, so that its gradient (PyTorch's NaN) does
            # not come from inf - inf in the shift's own arithmetic. The loss alone is NaN for
            # such a row either way, and skipping the select lets XLA:CPU fuse the whole forward.
            m = jnp.where(jnp.isfinite(m), m, 0)
        self.max = jax.lax.stop_gradient(m)
        self.shifted = zc - self.max
        self.e = jnp.exp(self.shifted).astype(e_dtype)
        self.sum = jnp.sum(self.e.astype(zc.dtype), axis, keepdims=True)
        self.log_sum = jnp.log(self.sum)
        self.lse = self.max + self.log_sum

    def max_again(self) -> jax.Array:
        """The same row maximum, computed by a second reduction (as ``-min(-z)``).

        A second consumer of the broadcast ``max`` would make XLA:CPU materialise it as an N×C
        buffer, whose first touch costs more than this extra read of the logits.
        """
        m = -jnp.min(-self.logits, self.axis, keepdims=True).astype(self.max.dtype)
        return jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0))

    def e_wide(self) -> jax.Array:
        """``e`` in float32 for the gradient's arithmetic, apart from the sum's own upcast."""
        return _common.upcast_apart(self.e).astype(self.sum.dtype)


def _explicit_spec(x: jax.Array) -> tuple:
    """The mesh axes ``x``'s type says it is split over, per dimension (explicit sharding)."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    return tuple(spec or ())


def _sharded_along(x: jax.Array, axis: int) -> bool:
    spec = _explicit_spec(x)
    return axis < len(spec) and spec[axis] is not None


def _take(weight: jax.Array, index: jax.Array) -> jax.Array:
    """``weight[index]``; under explicit sharding a gather must name its output's sharding."""
    if any(_explicit_spec(weight)) or any(_explicit_spec(index)):
        return weight.at[index].get(out_sharding=jax.typeof(index).sharding)
    return weight[index]


def _pick(x: jax.Array, targets: jax.Array, axis: int) -> jax.Array:
    """``x`` at the target class, keeping the class axis (size 1).

    A gather reads N elements; the one-hot ``where``-sum alternative is an extra N×C pass and, on
    CPU, an N×C temporary, since XLA does not fuse a reduction into its producer there. Bad
    targets are clipped here and turned into NaN by the caller.
    """
    if _sharded_along(x, axis):
        # Classes split over devices (explicit sharding): a gather along them cannot be typed
        # without gathering the logits; the one-hot sum reduces locally, then all-reduces [N].
        hit = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis) == jnp.expand_dims(targets, axis)
        return jnp.sum(jnp.where(hit, x, 0), axis, keepdims=True)
    safe = jnp.clip(jnp.expand_dims(targets, axis), 0, x.shape[axis] - 1)
    return jnp.take_along_axis(x, safe.astype(jnp.int32), axis)


def _index_terms(norm, z, targets, valid, pos_weight, class_weight, axis, smoothing, z_loss):
    """Per-position cross-entropy of index targets; PyTorch's smoothing formula; PaLM's z-loss."""
    # Picked from the raw logits (N reads), so that the N×C shifted logits feed only reductions
    # and XLA never materialises them.
    target_logp = (_common.upcast(_pick(z, targets, axis)) - norm.max) - norm.log_sum
    valid_k = jnp.expand_dims(valid, axis)
    w = jnp.expand_dims(pos_weight, axis)
    loss = jnp.where(valid_k, -(1 - smoothing) * w * target_logp, 0)
    if smoothing:
        # -Σ_c w_c log p_c = Σ_c w_c (max - z_c) + (Σ_c w_c) log s: two sums of non-negative
        # terms (no cancellation), each a single reduction over the logits.
        gap = norm.max_again() - _common.upcast(z)
        if class_weight is None:
            total_weight = z.shape[axis]
        else:
            gap = _common.expand_at(class_weight, axis, z.ndim) * gap
            total_weight = jnp.sum(class_weight)
        smooth = jnp.sum(gap, axis, keepdims=True) + total_weight * norm.log_sum
        loss = loss + jnp.where(valid_k, smoothing / z.shape[axis] * smooth, 0)
    if z_loss:
        loss = loss + jnp.where(valid_k, z_loss * norm.lse**2, 0)
    return jnp.squeeze(loss, axis)


def _index_loss(z, targets, valid, bad, pos_weight, class_weight, axis, smoothing, z_loss):
    norm = _Normalizer(z, axis, _common.compute_dtype(z.dtype), finite_shift=False)
    args = (targets, valid, pos_weight, class_weight, axis, smoothing, z_loss)
    return _index_terms(norm, z, *args)


def _index_loss_and_grad(z, targets, valid, bad, pos_weight, class_weight, axis, smoothing, z_loss):
    """The loss and ∂loss/∂z = a·softmax(z) − b, one elementwise expression (no scatter)."""
    norm = _Normalizer(z, axis, z.dtype)
    loss = _index_terms(norm, z, targets, valid, pos_weight, class_weight, axis, smoothing, z_loss)
    valid_k = jnp.expand_dims(valid, axis)
    w = jnp.expand_dims(pos_weight, axis)
    hit = jax.lax.broadcasted_iota(jnp.int32, z.shape, axis) == jnp.expand_dims(targets, axis)
    a = (1 - smoothing) * w
    b = jnp.where(hit, (1 - smoothing) * w, 0)
    if smoothing:
        eps_c = smoothing / z.shape[axis]
        if class_weight is None:
            a, b = a + smoothing, b + eps_c
        else:
            cw = _common.expand_at(class_weight, axis, z.ndim)
            a, b = a + eps_c * jnp.sum(class_weight), b + eps_c * cw
    if z_loss:
        a = a + 2 * z_loss * norm.lse
    a = jnp.where(jnp.expand_dims(bad, axis), jnp.nan, a)
    grad = jnp.where(valid_k, (a / norm.sum) * norm.e_wide() - b, 0)
    return loss, grad


_index_ce = _common.fused_jvp(_index_loss, _index_loss_and_grad, 3, _common.contract_axis)


def _prob_terms(norm, shift, targets, class_weight, axis, smoothing, z_loss):
    """Per-position cross-entropy of probability targets (PyTorch's soft-label formula).

    ``shift`` is the row maximum: ``norm.max`` itself, or when the gradient also reads it (and
    would make XLA:CPU materialise its broadcast) ``norm.max_again()``.
    """
    wt = _smoothed_weighted_targets(targets, class_weight, axis, smoothing)
    # -Σ_c t_c log p_c: terms of one sign (no cancellation), written as one expression so that
    # XLA:CPU fuses max, exp-sum and this sum into a single pass (the N×C log-probabilities are
    # never materialised). 0 · log 0 = 0: a class with no target mass at a -inf (masked) logit
    # contributes nothing; elsewhere the loss stays linear in the targets, so their gradient is
    # -w·log p even where a target is exactly 0 (as in PyTorch).
    log_p = (_common.upcast(norm.logits) - shift) - norm.log_sum
    loss = -jnp.sum(_common.absorbing_product(wt, log_p), axis)
    if z_loss:
        loss = loss + z_loss * jnp.squeeze(norm.lse, axis) ** 2
    return loss, wt


def _prob_loss(z, targets, class_weight, axis, smoothing, z_loss):
    norm = _Normalizer(z, axis, _common.compute_dtype(z.dtype), finite_shift=False)
    return _prob_terms(norm, norm.max, targets, class_weight, axis, smoothing, z_loss)[0]


def _prob_loss_and_grad(z, targets, class_weight, axis, smoothing, z_loss):
    norm = _Normalizer(z, axis, z.dtype)
    loss, wt = _prob_terms(norm, norm.max_again(), targets, class_weight, axis, smoothing, z_loss)
    a = jnp.sum(wt, axis, keepdims=True)
    if z_loss:
        a = a + 2 * z_loss * norm.lse
    return loss, (a / norm.sum) * norm.e_wide() - wt


def _smoothed_weighted_targets(targets, class_weight, axis, smoothing):
    t = _common.upcast(targets)
    if smoothing:
        t = t * (1 - smoothing) + smoothing / t.shape[axis]
    if class_weight is not None:
        t = t * _common.expand_at(class_weight, axis, t.ndim)
    return t


_prob_ce = _common.fused_jvp(_prob_loss, _prob_loss_and_grad, 3, _common.contract_axis)


# ----------------------------------------------------------------------------------------------
# cross_entropy
# ----------------------------------------------------------------------------------------------


def _check_probability_targets(logits, targets, axis: int, ignore_index: int) -> None:
    fn = "cross_entropy"
    if targets.shape == _common.without_axis(logits.shape, axis) and targets.ndim < logits.ndim:
        raise TypeError(
            f"{fn}: floating `targets` are read as class probabilities of the logits' shape "
            f"{tuple(logits.shape)}; got {_common.describe(targets)}, the shape of class "
            "indices: class indices need an integer dtype (e.g. `targets.astype(jnp.int32)`)"
        )
    _common.check_same_shape(fn, ("logits", "targets"), logits, targets)
    if isinstance(ignore_index, (int, np.integer)) and ignore_index >= 0:
        raise ValueError(
            f"{fn}: `ignore_index`={ignore_index} is not supported for floating point (class "
            "probability) targets, as in PyTorch: only index targets can be ignored. Leave it at "
            "its default; to drop positions, use reduction='none' and average the kept ones"
        )


@functools.partial(
    _common.jit,
    static_argnames=("ignore_index", "reduction", "label_smoothing", "axis", "z_loss"),
    eager_check=_concrete_target_check("cross_entropy", "logits"),
)
def cross_entropy(
    logits: Float[ArrayLike, "*batch classes *rest"],
    targets: Int[ArrayLike, "*batch *rest"] | Float[ArrayLike, "*batch classes *rest"],
    *,
    weight: Float[ArrayLike, " classes"] | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    axis: int = -1,
    z_loss: float = 0.0,
) -> Float[Array, "*batch *rest"] | Float[Array, ""]:
    r"""Cross-entropy between logits and targets, as ``torch.nn.functional.cross_entropy``.

    With index targets ``y`` and label smoothing ε over ``C`` classes:

    $$
    \ell_n = -(1-\varepsilon)\, w_{y_n} \log p_{n,y_n}
             - \frac{\varepsilon}{C} \sum_c w_c \log p_{n,c}
             + \lambda_z \log^2\!\sum_c e^{z_{n,c}},
    \qquad p = \mathrm{softmax}(z)
    $$

    ``"mean"`` divides the sum by \(\sum_{n \notin \mathrm{ignored}} w_{y_n}\). With
    probability targets ``t`` the loss is \(-\sum_c w_c t'_{n,c} \log p_{n,c}\) with
    \(t' = (1-\varepsilon) t + \varepsilon / C\), and ``"mean"`` divides by the number of
    positions.

    Args:
      logits: floating scores, classes along ``axis``: ``(..., C)`` or PyTorch's
        ``(N, C, d1, ...)`` with ``axis=1``. That layout needs ``axis=1`` explicitly: where
        ``C`` equals the last size the call is ambiguous (both readings fit the targets' shape)
        and the default ``axis=-1`` reads the last axis as the classes.
      targets: integer class indices with the logits' shape without ``axis``, or floating class
        probabilities with the logits' shape.
      weight: optional per-class weight, shape ``(C,)``.
      ignore_index: index target that contributes no loss, weight or gradient.
      reduction: ``"none"``, ``"sum"`` or ``"mean"``.
      label_smoothing: ε in ``[0, 1]``.
      axis: the class axis.
      z_loss: PaLM's auxiliary coefficient λ_z on ``logsumexp(z)²`` at non-ignored positions,
        reduced like the main loss (0 disables it; PyTorch has no such term).

    Returns:
      Per-position losses (``"none"``) or a scalar, in the dtype of ``logits`` (half precision
      is accumulated in float32). An index target out of range that is not ``ignore_index``
      gives NaN at its position; see ``jaxloss.check_targets`` for a hard error.

    Examples:
      >>> import jax.numpy as jnp, jaxloss
      >>> z = jnp.array([[1.0, 2.0], [1.0, 3.0], [1.0, 3.0]])
      >>> y = jnp.array([0, 1, 1])
      >>> jaxloss.cross_entropy(z, y, reduction="none").round(4)
      Array([1.3133, 0.1269, 0.1269], dtype=float32)
      >>> round(float(jaxloss.cross_entropy(z, y, weight=jnp.array([1.0, 2.0]))), 4)
      0.3642

    References:
      PyTorch ``torch.nn.functional.cross_entropy``; Müller et al., "When does label smoothing
      help?" (2019); Chowdhery et al., "PaLM" (2022) for the z-loss.
    """
    fn = "cross_entropy"
    logits = _common.check_floating("logits", fn, logits)
    targets = _common.as_array("targets", fn, targets)
    _common.check_reduction(fn, reduction)
    smoothing = _common.check_unit_interval("label_smoothing", fn, label_smoothing)
    z_loss = _common.check_nonnegative("z_loss", fn, z_loss)
    z = logits
    if jnp.issubdtype(targets.dtype, jnp.integer):
        idx = _IndexTargets(fn, logits, targets, weight, ignore_index, axis, "logits")
        loss = _index_ce(
            z, targets, idx.valid, idx.bad, idx.pos_weight, idx.class_weight,
            idx.axis, smoothing, z_loss,
        )  # fmt: skip
        return idx.reduce(loss, reduction).astype(logits.dtype)
    if not jnp.issubdtype(targets.dtype, jnp.floating):
        raise TypeError(
            f"{fn}: `targets` must be integer class indices or floating probabilities, got "
            f"shape {tuple(targets.shape)} and dtype {targets.dtype}"
        )
    ax = _common.class_axis(fn, axis, logits.ndim)
    _check_probability_targets(logits, targets, ax, ignore_index)
    class_weight = _common.check_class_weight(fn, weight, logits.shape[ax])
    if class_weight is not None:
        class_weight = class_weight.astype(_common.compute_dtype(z.dtype))
    loss = _prob_ce(z, targets, class_weight, ax, smoothing, z_loss)
    num_positions = loss.size
    return _common.reduce_loss(loss, reduction, num_positions).astype(logits.dtype)


# ----------------------------------------------------------------------------------------------
# Opt-in hard error for bad targets
# ----------------------------------------------------------------------------------------------


def check_targets(
    targets: Int[ArrayLike, "*batch"], num_classes: int, *, ignore_index: int = -100
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
    targets = _common.check_integer("targets", "check_targets", targets)
    valid = ~_ignored(targets, int(ignore_index))
    bad = valid & ((targets < 0) | (targets >= num_classes))
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
