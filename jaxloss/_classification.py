"""Multi-class losses: negative log-likelihood and cross-entropy, PyTorch semantics."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal, NamedTuple, overload

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Integer, Real

from jaxloss import (
    _autodiff,
    _dtypes,
    _implementations,
    _reductions,
    _targets,
    _validation,
    _xla_cpu,
)
from jaxloss._stats import LogitStats

# ----------------------------------------------------------------------------------------------
# Index targets: validation (the bookkeeping itself lives in _targets)
# ----------------------------------------------------------------------------------------------


def _axis_hint(shape: tuple[int, ...], target_shape: tuple[int, ...], axis: int) -> str:
    """Names the class axis that would fit, e.g. ``axis=1`` for PyTorch's ``(N, C, d1)``."""
    fits = [a for a in range(len(shape)) if _validation.without_axis(shape, a) == target_shape]
    if not fits or axis in fits:
        return ""
    return (
        f". With the classes along axis {fits[0]} (PyTorch's (N, C, d1, ...) layout is axis=1), "
        f"pass `axis={fits[0]}`"
    )


class _Index(NamedTuple):
    """What the index kernels read besides the logits (a pytree: custom_jvp data)."""

    targets: jax.Array
    idx: _targets.IndexTargets
    class_weight: jax.Array | None
    smoothing: jax.Array | None
    z_loss: jax.Array | None


def _index_inputs(fn, inputs, targets, weight, ignore_index, axis, input_name):
    """Validated index targets: ``(axis, targets at least int32, IndexTargets, class weight)``."""
    ignore_index = _targets.check_ignore_index(fn, ignore_index)
    axis = _validation.class_axis(fn, axis, inputs.ndim)
    expected = _validation.without_axis(inputs.shape, axis)
    message = (
        f"{fn}: index `targets` must have the shape of `{input_name}` without its class axis "
        f"{axis}, i.e. {expected}; got `targets` with {_validation.describe(targets)} for "
        f"`{input_name}` with {_validation.describe(inputs)}"
        + _axis_hint(inputs.shape, targets.shape, axis)
    )
    _validation.expect(chex.assert_shape, targets, expected, message=message, error=ValueError)
    num_classes = inputs.shape[axis]
    class_weight = _validation.check_class_weight(fn, weight, num_classes)
    dtype = _dtypes.compute_dtype(inputs.dtype)
    if class_weight is not None:
        class_weight = class_weight.astype(dtype)
    targets = _targets.widen(targets)
    idx = _targets.index_targets(targets, num_classes, ignore_index, class_weight, dtype)
    return axis, targets, idx, class_weight


def _prepare(fn: str, input_name: str):
    """``_validation.jit``'s ``prepare``: PyTorch's error on concrete targets, 0 options dropped."""

    def prepare(arguments: dict) -> None:
        shape = np.shape(arguments[input_name])
        _targets.raise_if_out_of_range(
            fn,
            input_name,
            shape,
            arguments["targets"],
            arguments["ignore_index"],
            arguments["axis"],
        )
        for name, high in (("label_smoothing", 1.0), ("z_loss", np.inf)):
            if name in arguments:
                arguments[name] = _validation.hyperparameter(fn, name, arguments[name], high=high)
        if "soft_cap" in arguments:
            cap = arguments["soft_cap"]
            arguments["soft_cap"] = _validation.hyperparameter(fn, "soft_cap", cap, positive=True)

    return prepare


# ----------------------------------------------------------------------------------------------
# nll
# ----------------------------------------------------------------------------------------------


@functools.partial(
    _validation.jit,
    static_argnames=("ignore_index", "reduction", "axis"),
    prepare=_prepare("nll", "log_probs"),
)
def nll(
    log_probs: Float[ArrayLike, "*input_shape"],
    targets: Integer[ArrayLike, "*target_shape"],
    *,
    weight: Real[ArrayLike, " classes"] | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    axis: int = -1,
) -> Float[Array, "*positions"]:
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
    log_probs = _validation.check_floating(fn, "log_probs", log_probs)
    targets = _validation.check_integer(fn, "targets", targets)
    _validation.check_reduction(fn, reduction)
    ax, targets, idx, _ = _index_inputs(
        fn, log_probs, targets, weight, ignore_index, axis, "log_probs"
    )
    loss = _nll(ax, log_probs, (targets, idx))
    return _targets.reduce(loss, reduction, idx).astype(log_probs.dtype)


def _nll_loss(axis, x, data):
    targets, idx = data
    picked = jnp.squeeze(_dtypes.upcast(_pick(x, targets, axis)), axis)
    return jnp.where(idx.valid, -idx.weight * picked, 0)


def _nll_loss_and_grad(axis, x, data):
    targets, idx = data
    hit = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis) == jnp.expand_dims(targets, axis)
    hit = hit & jnp.expand_dims(idx.valid, axis)
    grad = jnp.where(hit, -jnp.expand_dims(idx.weight, axis), 0)
    return _nll_loss(axis, x, data), grad


# Custom JVP for speed: the gradient is a one-hot built from an iota comparison, fused into the
# backward pass, instead of the scatter-add that autodiff of the gather would produce.
_nll = _autodiff.fused_jvp(_nll_loss, _nll_loss_and_grad, _autodiff.contract_axis)


# ----------------------------------------------------------------------------------------------
# cross_entropy kernels
# ----------------------------------------------------------------------------------------------


def _max_then_sum(z, zc, *, axis, e_dtype, finite_shift):
    """The row's shift (its maximum) and ``Σ exp(z - shift)``: two reductions, as the math reads."""
    # The max is exact in any dtype; taking it before the upcast keeps XLA from materialising
    # a float32 copy of half-precision logits.
    m = _shift(jnp.max(z, axis, keepdims=True).astype(zc.dtype), finite_shift)
    return m, jnp.sum(jnp.exp(zc - m).astype(e_dtype).astype(zc.dtype), axis, keepdims=True)


def _shift(m, finite_shift):
    # A row of all -inf keeps a finite shift, so that its gradient (PyTorch's NaN) does not come
    # from inf - inf in the shift's own arithmetic. The loss alone is NaN for such a row either
    # way, and skipping the select lets XLA:CPU fuse the whole forward.
    return jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0) if finite_shift else m)


def _rescaled_sum(a, b):
    """Combines two partial ``(max, Σ exp(z - max))`` pairs of one row (online softmax)."""
    (m1, s1), (m2, s2) = a, b
    m = jnp.maximum(m1, m2)
    # -inf is the empty partial (s = 0), not a shift: exp(-inf - -inf) would be NaN. +inf stays
    # a shift, so that a row holding +inf gets NaN, as PyTorch's softmax does.
    shift = jnp.where(m == -jnp.inf, 0, m)
    return m, s1 * jnp.exp(m1 - shift) + s2 * jnp.exp(m2 - shift)


def _online_max_sum(z, zc, *, axis, e_dtype, finite_shift, pieces=1):
    """:func:`_max_then_sum` in one pass over the logits: a (max, rescaled sum) reduction."""
    del z, e_dtype
    m, s = _online_reduce(zc, axis, pieces)
    # The sum is relative to the raw maximum; the finite shift differs from it only where the
    # sum is 0 (all -inf) or NaN (+inf, NaN), which no shift changes.
    return _shift(m, finite_shift), s


# XLA:GPU runs a reduction over more than 16384 elements as a tree whose float32 partials
# (N × 256 pairs at 131072 classes) are 0.4 % (float32) to 0.8 % (bfloat16) of value_and_grad's
# traffic; rows cut into pieces of at most 16384 keep the tree on chip. On TPU the reshape would
# change the tiled layout (a copy of the logits), so only XLA:GPU gets pieces.
@functools.cache
def _gpu_row_pieces(classes: int) -> int:
    """The fewest equal pieces of at most 16384 classes (1 where they would be under 1024)."""
    # Only piece counts that leave >= 1024 classes a piece qualify: O(C / 1024) candidates, not
    # O(C) (a prime vocabulary of 10^7 took 1.7 s a trace), and each shape is searched once.
    for pieces in range(max(1, -(-classes // 16384)), classes // 1024 + 1):
        if classes % pieces == 0:
            return pieces
    return 1


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _online_reduce(zc, axis, pieces):
    init = (jnp.array(-jnp.inf, zc.dtype), jnp.array(0, zc.dtype))
    rows = zc.reshape((*zc.shape[:axis], pieces, zc.shape[axis] // pieces, *zc.shape[axis + 1 :]))
    m, s = jax.lax.reduce((rows, jnp.ones_like(rows)), init, _rescaled_sum, (axis + 1,))
    m, s = jax.lax.reduce((m, s), init, _rescaled_sum, (axis,))
    return jnp.expand_dims(m, axis), jnp.expand_dims(s, axis)


@_online_reduce.defjvp
def _online_reduce_jvp(axis, pieces, primals, tangents):
    # A reduction with this combiner has no autodiff rule; these are the tangents of
    # _max_then_sum: the max a constant shift, d Σ exp(z - max) = Σ exp(z - max) dz.
    (zc,), (dzc,) = primals, tangents
    m, s = _online_reduce(zc, axis, pieces)
    ds = jnp.sum(jnp.exp(zc - _shift(m, True)) * dzc, axis, keepdims=True)
    return (m, s), (jnp.zeros_like(m), ds)


class _Normalizer:
    """Per-row softmax pieces shared by the loss and its gradient.

    ``e = exp(z - max)`` is stored in ``e_dtype``: float32 when only the loss is needed (XLA then
    fuses the exp into the sum and never materialises it), the logits' own dtype when the
    gradient is needed, so that the one N×C buffer that must exist is the gradient's own (XLA
    writes the gradient in place of ``e``: one exp per logit and no temporaries, even for bf16).
    """

    def __init__(self, z: jax.Array, axis: int, e_dtype, finite_shift: bool = True):
        self.logits, self.axis = z, axis
        zc = _dtypes.upcast(z)
        # XLA:GPU and XLA:TPU run each reduction as its own pass over the logits: the one-pass
        # form reads them once where max-then-sum reads them twice (modelled HBM traffic: forward
        # 2.0x -> 1.0x the logits, value_and_grad 2.0x -> 1.5x the copy floor; see
        # benchmarks/RESULTS.md). XLA:CPU vectorises neither the variadic reduction nor its exp
        # (2.6x slower there), so the plain form stays the default.
        kw = dict(axis=axis, e_dtype=e_dtype, finite_shift=finite_shift)
        m, self.sum = jax.lax.platform_dependent(
            z, zc, default=functools.partial(_max_then_sum, **kw),
            cuda=functools.partial(_online_max_sum, pieces=_gpu_row_pieces(z.shape[axis]), **kw),
            tpu=functools.partial(_online_max_sum, **kw),
        )  # fmt: skip
        self.max = jax.lax.stop_gradient(m)
        self.shifted = zc - self.max
        self.e = jnp.exp(self.shifted).astype(e_dtype)
        self.log_sum = jnp.log(self.sum)
        self.lse = self.max + self.log_sum

    def reduce_again(self, reduce: Callable[[jax.Array], jax.Array]) -> jax.Array:
        """``reduce(z - max)`` (float32) for a second reduction over the logits.

        On XLA:CPU a second consumer of the first reading (the broadcast ``max``, or the float32
        convert of half-precision logits) is materialised as an N×C buffer: 512 MiB at
        4096×32768 bf16 with label smoothing. Behind an optimization barrier this reading (its
        own max, its own convert) is fused into its reduction: 0.08 MiB. XLA:GPU and XLA:TPU
        broadcast inside each kernel, where a second max would be a pass of its own.
        """

        def apart(z, m):
            z = jax.lax.optimization_barrier(z)
            m = jnp.max(z, self.axis, keepdims=True).astype(m.dtype)
            return reduce(_dtypes.upcast(z) - _shift(m, True))

        def same(z, m):
            return reduce(_dtypes.upcast(z) - _shift(m, True))

        return jax.lax.platform_dependent(self.logits, self.max, default=apart, cuda=same, tpu=same)

    def e_wide(self) -> jax.Array:
        """``e`` in float32 for the gradient's arithmetic, apart from the sum's own upcast."""
        return _xla_cpu.upcast_apart(self.e).astype(self.sum.dtype)


def _sharded_along(x: jax.Array, axis: int) -> bool:
    spec = _targets.explicit_spec(x)
    return axis < len(spec) and spec[axis] is not None


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
    safe = jnp.clip(jnp.expand_dims(targets, axis), 0, x.shape[axis] - 1).astype(jnp.int32)
    if jnp.finfo(x.dtype).bits == 16:
        # XLA:CPU materialises a float32 copy of half-precision logits (twice their size: 512
        # MiB at 4096x32768 bf16) when a gather reads them beside the exp-sum's upcast; a
        # gather of their bits leaves the upcast fused into its reduction (0 MiB).
        bits = jnp.take_along_axis(jax.lax.bitcast_convert_type(x, jnp.uint16), safe, axis)
        return jax.lax.bitcast_convert_type(bits, x.dtype)
    return jnp.take_along_axis(x, safe, axis)


def _index_terms(norm: _Normalizer, z, d: _Index):
    """Per-position cross-entropy of index targets; PyTorch's smoothing formula; PaLM's z-loss."""
    axis, eps = norm.axis, d.smoothing
    # Picked from the raw logits (N reads), so that the N×C shifted logits feed only reductions
    # and XLA never materialises them.
    target_logp = (_dtypes.upcast(_pick(z, d.targets, axis)) - norm.max) - norm.log_sum
    valid_k = jnp.expand_dims(d.idx.valid, axis)
    w = jnp.expand_dims(d.idx.weight, axis)
    keep = 1 if eps is None else 1 - eps
    loss = jnp.where(valid_k, -keep * w * target_logp, 0)
    if eps is not None:
        # -Σ_c w_c log p_c = Σ_c w_c (max - z_c) + (Σ_c w_c) log s: two sums of non-negative
        # terms (no cancellation), each a single reduction over the logits.
        cw = 1 if d.class_weight is None else expand_at(d.class_weight, axis, z.ndim)
        gap = norm.reduce_again(lambda shifted: -jnp.sum(cw * shifted, axis, keepdims=True))
        total_weight = z.shape[axis] if d.class_weight is None else jnp.sum(d.class_weight)
        smooth = gap + total_weight * norm.log_sum
        loss = loss + jnp.where(valid_k, eps / z.shape[axis] * smooth, 0)
    if d.z_loss is not None:
        loss = loss + jnp.where(valid_k, d.z_loss * norm.lse**2, 0)
    return jnp.squeeze(loss, axis)


def _index_loss(axis: int, z, d: _Index):
    norm = _Normalizer(z, axis, _dtypes.compute_dtype(z.dtype), finite_shift=False)
    return _index_terms(norm, z, d)


def index_loss_and_grad(axis: int, z, d: _Index):
    """The loss and ∂loss/∂z = a·softmax(z) − b, one elementwise expression (no scatter)."""
    norm = _Normalizer(z, axis, z.dtype)
    loss = _index_terms(norm, z, d)
    w = jnp.expand_dims(d.idx.weight, axis)
    hit = jax.lax.broadcasted_iota(jnp.int32, z.shape, axis) == jnp.expand_dims(d.targets, axis)
    keep = 1 if d.smoothing is None else 1 - d.smoothing
    a, b = keep * w, jnp.where(hit, keep * w, 0)
    if d.smoothing is not None:
        eps_c = d.smoothing / z.shape[axis]
        if d.class_weight is None:
            a, b = a + d.smoothing, b + eps_c
        else:
            cw = expand_at(d.class_weight, axis, z.ndim)
            a, b = a + eps_c * jnp.sum(d.class_weight), b + eps_c * cw
    if d.z_loss is not None:
        a = a + 2 * d.z_loss * norm.lse
    a = _reductions.nan_where(jnp.expand_dims(d.idx.bad, axis), a)
    grad = jnp.where(jnp.expand_dims(d.idx.valid, axis), (a / norm.sum) * norm.e_wide() - b, 0)
    return loss, grad


# Custom JVP for speed and memory: softmax − one-hot as one fused expression written in place of
# exp (no N×C temporaries, no scatter), and PyTorch's NaN gradient on a bad target's row.
index_ce = _autodiff.fused_jvp(_index_loss, index_loss_and_grad, _autodiff.contract_axis)


class _Probs(NamedTuple):
    """What the probability-target kernels read besides the logits (custom_jvp data)."""

    targets: jax.Array
    class_weight: jax.Array | None
    smoothing: jax.Array | None
    z_loss: jax.Array | None


def _prob_terms(norm: _Normalizer, d: _Probs, again: bool):
    """Per-position cross-entropy of probability targets (PyTorch's soft-label formula).

    ``again``: the gradient also reads the row maximum, so the loss takes its own reading of the
    logits (``norm.reduce_again``) rather than a second consumer of the first.
    """
    wt = _smoothed_weighted_targets(d, norm.axis)

    # -Σ_c t_c log p_c: terms of one sign (no cancellation), written as one expression so that
    # XLA:CPU fuses max, exp-sum and this sum into a single pass (the N×C log-probabilities are
    # never materialised). 0 · log 0 = 0: a class with no target mass at a -inf (masked) logit
    # contributes nothing; elsewhere the loss stays linear in the targets, so their gradient is
    # -w·log p even where a target is exactly 0 (as in PyTorch).
    def cross(shifted):
        return -jnp.sum(_xla_cpu.absorbing_product(wt, shifted - norm.log_sum), norm.axis)

    loss = norm.reduce_again(cross) if again else cross(_dtypes.upcast(norm.logits) - norm.max)
    if d.z_loss is not None:
        loss = loss + d.z_loss * jnp.squeeze(norm.lse, norm.axis) ** 2
    return loss, wt


def _prob_loss(axis: int, z, d: _Probs):
    norm = _Normalizer(z, axis, _dtypes.compute_dtype(z.dtype), finite_shift=False)
    return _prob_terms(norm, d, again=False)[0]


def _prob_loss_and_grad(axis: int, z, d: _Probs):
    norm = _Normalizer(z, axis, z.dtype)
    loss, wt = _prob_terms(norm, d, again=True)
    a = jnp.sum(wt, axis, keepdims=True)
    if d.z_loss is not None:
        a = a + 2 * d.z_loss * norm.lse
    return loss, (a / norm.sum) * norm.e_wide() - wt


def _smoothed_weighted_targets(d: _Probs, axis: int):
    t = _dtypes.upcast(d.targets)
    if d.smoothing is not None:
        t = t * (1 - d.smoothing) + d.smoothing / t.shape[axis]
    if d.class_weight is not None:
        t = t * expand_at(d.class_weight, axis, t.ndim)
    return t


# Custom JVP for speed and memory: a·softmax − w·t in one pass (autodiff would keep log p).
_prob_ce = _autodiff.fused_jvp(_prob_loss, _prob_loss_and_grad, _autodiff.contract_axis)


# ----------------------------------------------------------------------------------------------
# cross_entropy
# ----------------------------------------------------------------------------------------------


def _check_probability_targets(logits, targets, axis: int, ignore_index: int) -> None:
    fn = "cross_entropy"
    if targets.shape == _validation.without_axis(logits.shape, axis) and targets.ndim < logits.ndim:
        raise TypeError(
            f"{fn}: floating `targets` are read as class probabilities of the logits' shape "
            f"{tuple(logits.shape)}; got {_validation.describe(targets)}, the shape of class "
            "indices: class indices need an integer dtype (e.g. `targets.astype(jnp.int32)`)"
        )
    _validation.check_same_shape(fn, ("logits", "targets"), logits, targets)
    if isinstance(ignore_index, (int, np.integer)) and ignore_index >= 0:
        raise ValueError(
            f"{fn}: `ignore_index`={ignore_index} is not supported for floating point (class "
            "probability) targets, as in PyTorch: only index targets can be ignored. Leave it at "
            "its default; to drop positions, use reduction='none' and average the kept ones"
        )


# Type checkers see the return type from ``return_stats`` (one signature, two results).
@overload
def cross_entropy(
    logits: Float[ArrayLike, "*input_shape"],
    targets: Integer[ArrayLike, "*target_shape"] | Float[ArrayLike, "*input_shape"],
    *,
    weight: Real[ArrayLike, " classes"] | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float | Float[ArrayLike, ""] | None = 0.0,
    axis: int = -1,
    z_loss: float | Float[ArrayLike, ""] | None = 0.0,
    soft_cap: float | Float[ArrayLike, ""] | None = None,
    return_stats: Literal[False] = False,
    implementation: Literal["xla", "pallas"] | None = None,
) -> Float[Array, "*positions"]: ...


@overload
def cross_entropy(
    logits: Float[ArrayLike, "*input_shape"],
    targets: Integer[ArrayLike, "*target_shape"] | Float[ArrayLike, "*input_shape"],
    *,
    weight: Real[ArrayLike, " classes"] | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float | Float[ArrayLike, ""] | None = 0.0,
    axis: int = -1,
    z_loss: float | Float[ArrayLike, ""] | None = 0.0,
    soft_cap: float | Float[ArrayLike, ""] | None = None,
    return_stats: Literal[True],
    implementation: Literal["xla", "pallas"] | None = None,
) -> tuple[Float[Array, "*positions"], LogitStats]: ...


@functools.partial(
    _validation.jit,
    static_argnames=("ignore_index", "reduction", "axis", "return_stats", "implementation"),
    prepare=_prepare("cross_entropy", "logits"),
)
def cross_entropy(
    logits: Float[ArrayLike, "*input_shape"],
    targets: Integer[ArrayLike, "*target_shape"] | Float[ArrayLike, "*input_shape"],
    *,
    weight: Real[ArrayLike, " classes"] | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float | Float[ArrayLike, ""] | None = 0.0,
    axis: int = -1,
    z_loss: float | Float[ArrayLike, ""] | None = 0.0,
    soft_cap: float | Float[ArrayLike, ""] | None = None,
    return_stats: bool = False,
    implementation: Literal["xla", "pallas"] | None = None,
) -> Float[Array, "*positions"] | tuple[Float[Array, "*positions"], LogitStats]:
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
    positions; a zero target at a ``-inf`` (masked) logit contributes 0 (PyTorch: NaN).

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
      label_smoothing: ε in ``[0, 1]``: a Python float or a scalar array, traced or not (a
        schedule inside ``jit`` compiles once; a concrete value is range-checked, a traced one
        can be checked with ``checkify``).
      axis: the class axis.
      z_loss: PaLM's auxiliary coefficient λ_z ≥ 0 on ``logsumexp(z)²`` at non-ignored
        positions, reduced like the main loss (0 or None disables it; PyTorch has no such term);
        traced like ``label_smoothing``.
      soft_cap: ``c > 0`` for Gemma-2 style logit soft-capping ``z → c·tanh(z/c)`` before the
        softmax (None disables it; a traced scalar is allowed, and is not differentiated): the
        loss, every option, the z-loss and the statistics apply to the capped logits. A
        ``-inf`` logit becomes ``-c`` (``tanh(-inf) = -1``): mask after capping.
      return_stats: also return a :class:`jaxloss.LogitStats` of per-position ``lse``,
        ``correct`` (argmax equals the target; for probability targets, the target's argmax),
        ``entropy`` and the predicted class ``argmax`` of the (capped) logits, not
        differentiated.
      implementation: ``None`` (each backend's best, chosen when the program is lowered: the
        Pallas kernel on TPU for index targets with the classes last, the XLA form elsewhere),
        ``"xla"`` (the portable XLA form everywhere) or ``"pallas"`` (the TPU kernel; an error
        on other backends and for cases it does not take). See docs/classification.md.

    Returns:
      Per-position losses (``"none"``) or a scalar, in the dtype of ``logits`` (half precision
      is accumulated in float32, then rounded as PyTorch does: an f16 ``"sum"`` past 65504 is
      ``inf``; sum ``"none"`` in float32 instead); with ``return_stats``, ``(loss, stats)``.
      An index target out of range that is not ``ignore_index`` gives NaN at its position under
      ``jit`` (outside it, concrete targets raise PyTorch's error); see
      ``jaxloss.check_targets``.

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
    logits = _validation.check_floating(fn, "logits", logits)
    targets = _validation.as_array(fn, "targets", targets)
    _validation.check_reduction(fn, reduction)
    return_stats = _validation.check_flag(fn, "return_stats", return_stats)
    hyper = _traced_hyperparameters(fn, label_smoothing, z_loss)
    soft_cap = _validation.hyperparameter(fn, "soft_cap", soft_cap, positive=True)
    _implementations.check(fn, implementation)
    z = logits if soft_cap is None else _soft_capped(fn, logits, soft_cap)
    if jnp.issubdtype(targets.dtype, jnp.integer):
        args = (fn, logits, targets, weight, ignore_index, axis, "logits")
        ax, targets, idx, class_weight = _index_inputs(*args)
        data = _Index(targets, idx, class_weight, *hyper)
        loss = _implementations.index_cross_entropy(
            implementation, _index_ce_xla, ax, z, data, reduction
        ).astype(logits.dtype)
        hit = (targets, idx.valid & ~idx.bad)
    else:
        if not jnp.issubdtype(targets.dtype, jnp.floating):
            raise TypeError(
                f"{fn}: `targets` must be integer class indices or floating probabilities, got "
                f"{_validation.describe(targets)}"
            )
        ax = _validation.class_axis(fn, axis, logits.ndim)
        _check_probability_targets(logits, targets, ax, ignore_index)
        class_weight = _validation.check_class_weight(fn, weight, logits.shape[ax])
        if class_weight is not None:
            class_weight = class_weight.astype(_dtypes.compute_dtype(logits.dtype))
        _implementations.refuse_pallas(fn, implementation, "probability (floating) targets")
        loss = _per_position(_prob_ce, ax, z, _Probs(targets, class_weight, *hyper))
        # PyTorch's mean divides by logits.numel() / C: NaN when there are no classes.
        positions = loss.size if logits.shape[ax] else 0
        loss = _reductions.reduce_loss(loss, reduction, positions).astype(logits.dtype)
        hit = (jnp.argmax(targets, ax) if targets.shape[ax] else None, True)
    return (loss, _logit_stats(z, ax, *hit)) if return_stats else loss


def _index_ce_xla(axis: int, z: jax.Array, d: _Index, reduction: str) -> jax.Array:
    """The XLA form of index cross-entropy, reduced: the CPU/GPU default, the TPU fallback."""
    return _targets.reduce(_per_position(index_ce, axis, z, d), reduction, d.idx)


def _soft_capped(fn: str, z: jax.Array, cap) -> jax.Array:
    """``c·tanh(z/c)``, computed in float32 for half precision, returned in ``z``'s dtype."""
    cap = jax.lax.stop_gradient(_validation.check_real(fn, "soft_cap", cap))
    if cap.shape != ():
        raise ValueError(f"{fn}: `soft_cap` must be a scalar, got {_validation.describe(cap)}")
    wide = _dtypes.upcast(z)
    cap = cap.astype(wide.dtype)
    return (cap * jnp.tanh(wide / cap)).astype(z.dtype)


def _logit_stats(z: jax.Array, axis: int, target: jax.Array | None, counted) -> LogitStats:
    """``LogitStats`` per position: lse, argmax hit, entropy, argmax (not differentiated)."""
    dtype, shape = z.dtype, _validation.without_axis(z.shape, axis)
    if z.shape[axis] == 0:
        # An empty sum: lse = log 0, entropy 0; no class to predict or hit.
        zeros = jnp.zeros(shape, dtype)
        return LogitStats(zeros - jnp.inf, jnp.zeros(shape, bool), zeros, zeros.astype(jnp.int32))
    zc = jax.lax.stop_gradient(_dtypes.upcast(z))
    lse = jax.nn.logsumexp(zc, axis)
    p = jnp.exp(zc - jnp.expand_dims(lse, axis))
    # Σ p z with 0 · (-inf) = 0: a masked class has no probability and contributes nothing.
    mean_logit = jnp.sum(jnp.where(p > 0, p * zc, 0), axis)
    argmax = jnp.argmax(zc, axis).astype(jnp.int32)
    correct = (argmax == target) & counted
    return LogitStats(lse.astype(dtype), correct, (lse - mean_logit).astype(dtype), argmax)


def _per_position(loss_fn, axis: int, z: jax.Array, data) -> jax.Array:
    """``loss_fn(axis, z, data)``; with no classes, 0 (the reduction makes a counted target NaN)."""
    if z.shape[axis] == 0:
        return jnp.zeros(_validation.without_axis(z.shape, axis), _dtypes.compute_dtype(z.dtype))
    return loss_fn(axis, z, data)


def _traced_hyperparameters(fn: str, label_smoothing, z_loss) -> tuple:
    """``(ε, λ_z)`` as scalars in the compute dtype, None for an absent term.

    ``prepare`` has already range-checked concrete values and dropped zeros, except where it
    never ran: ``.lower``/``.trace``, and ``jax.jit(jaxloss.cross_entropy)``, which traces the
    function itself with its Python defaults (a 0.0 left in would compute the smoothing terms).
    """
    values = []
    for name, value in (("label_smoothing", label_smoothing), ("z_loss", z_loss)):
        high = 1.0 if name == "label_smoothing" else np.inf
        value = _validation.hyperparameter(fn, name, value, high=high)
        if value is not None:
            value = _validation.check_real(fn, name, value)
            if value.shape != ():
                raise ValueError(
                    f"{fn}: `{name}` must be a scalar, got {_validation.describe(value)}"
                )
        values.append(value)
    return tuple(values)


def expand_at(v: jax.Array, axis: int, ndim: int) -> jax.Array:
    """Reshapes a per-class vector so that it lies along ``axis`` of a rank-``ndim`` array."""
    shape = [1] * ndim
    shape[axis] = v.shape[0]
    return v.reshape(shape)
