"""cross_entropy of index targets through the Pallas TPU kernel (``pallas_tpu``).

The kernel computes per-row loss terms and, in the same pass, the gradient times each row's
factor of the reduction. Everything else is the XLA form's own machinery: the target weights and
masks (``_targets.index_targets``), the reduction (``_targets.reduce``), whose derivative in
each row's loss *is* that factor (1 for ``"sum"``, ``1/Σw`` for ``"mean"``, 0 where the mean is
empty or a target is bad). Under ``value_and_grad`` the cotangent of the reduced loss is the
constant 1, which XLA folds: the gradient is the kernel's output, one read of the logits and one
write of the gradient in all.

Derivatives are a ``custom_jvp`` (forward mode and Hessians keep working): the logits' tangent
contracts the kernel's gradient; tangents of the class weights or hyperparameters, and any second
derivative, come from autodiff of the XLA form.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp

from jaxloss import _autodiff, _targets
from jaxloss._cross_entropy_pallas import pallas_tpu
from jaxloss._cross_entropy_pallas.pallas_tpu import supported

# Tests set this to True (or a ``pltpu.InterpretParams``) to run the kernel on CPU.
INTERPRET: bool | object = False

__all__ = ["INTERPRET", "index_cross_entropy", "interpret_mode", "supported"]


def index_cross_entropy(z: jax.Array, data, reduction: str) -> jax.Array:
    """``_targets.reduce`` of the per-row index cross-entropy of ``(N, C)`` logits ``z``.

    ``data`` is ``_classification._Index`` (targets ``(N,)``, ``IndexTargets``, class weight,
    ε, λ_z); the result is float32 (the caller casts), per row for ``"none"``. Where XLA
    partitions the program over devices, the kernel's formulas run in jnp.
    """
    return _reduced((reduction, _interpret_key()), z, data)


def _interpret_key():
    # InterpretParams is a hashable dataclass; True/False as they are.
    return INTERPRET


def _kernel_inputs(z, d, factor):
    classes = z.shape[1]
    idx = d.idx
    row_data = jnp.stack([idx.weight, idx.valid, idx.bad, factor], axis=1, dtype=jnp.float32)
    total_weight = classes if d.class_weight is None else jnp.sum(d.class_weight)
    scalars = jnp.stack(
        [
            jnp.asarray(0 if d.smoothing is None else d.smoothing, jnp.float32),
            jnp.asarray(0 if d.z_loss is None else d.z_loss, jnp.float32),
            jnp.asarray(total_weight, jnp.float32),
        ]
    )
    smoothing_weights = d.smoothing is not None and d.class_weight is not None
    class_weight = (
        d.class_weight.astype(jnp.float32)[None]  # pyright: ignore[reportOptionalMemberAccess]
        if smoothing_weights
        else None
    )
    opts = dict(
        smoothing=d.smoothing is not None,
        z_loss=d.z_loss is not None,
        class_weight=smoothing_weights,
    )
    return (z, d.targets.astype(jnp.int32), row_data, scalars, class_weight), opts


def _rows(interpret, z, d, factor, with_grad: bool):
    args, opts = _kernel_inputs(z, d, factor)
    options = pallas_tpu.Options(with_grad=with_grad, **opts)
    return pallas_tpu.rows(*args, opts=options, interpret=interpret)


def reduction_factors(reduction: str, idx: _targets.IndexTargets) -> jax.Array:
    """∂ reduce(loss) / ∂ loss_n: the reduction's weight on each row (linear, so taken at 0)."""
    if reduction == "none":
        return jnp.ones(idx.weight.shape, jnp.float32)
    zeros = jnp.zeros(idx.weight.shape, jnp.float32)
    return jax.grad(lambda loss: _targets.reduce(loss, reduction, idx))(zeros)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _reduced(static, z, d):
    reduction, interpret = static
    loss, _ = _rows(interpret, z, d, jnp.ones(z.shape[:1], jnp.float32), with_grad=False)
    return _targets.reduce(loss, reduction, d.idx)


def _reduced_jvp(static, primals, tangents):
    reduction, interpret = static
    (z, d), (dz, dd) = primals, tangents
    if _autodiff.is_zero(dz):
        out = _reduced(static, z, d)
        tangent = jnp.zeros_like(out)
    else:
        factor = reduction_factors(reduction, d.idx)
        loss, grad = _rows_with_grad(interpret, z, d, factor)
        out = _targets.reduce(loss, reduction, d.idx)
        # Under reverse mode this transposes to cotangent × grad: nothing at all for the unit
        # cotangent of value_and_grad (XLA folds × 1 and the f32 round trip of bf16).
        product = grad.astype(jnp.float32) * dz.astype(jnp.float32)
        tangent = jnp.sum(product, axis=1) if reduction == "none" else jnp.sum(product)
    if not all(_autodiff.is_zero(t) for t in jax.tree.leaves(dd, is_leaf=_autodiff.is_zero)):
        dd = jax.tree.map(_autodiff.instantiate, dd, d, is_leaf=_autodiff.is_zero)
        _, t_data = jax.jvp(lambda data: _xla_reduced(reduction, z, data), (d,), (dd,))
        tangent = tangent + t_data
    return out, tangent


_reduced.defjvp(_reduced_jvp, symbolic_zeros=True)


def _xla_reduced(reduction, z, d):
    from jaxloss import _classification  # the XLA form (imports this package)

    return _targets.reduce(_classification.index_ce(1, z, d), reduction, d.idx)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _rows_with_grad(interpret, z, d, factor):
    return _rows(interpret, z, d, factor, with_grad=True)


@_rows_with_grad.defjvp
def _rows_with_grad_jvp(interpret, primals, tangents):
    # Second derivatives (Hessians, jvp of grad) differentiate the XLA form's loss and gradient.
    from jaxloss import _classification

    def xla(z, d, factor):
        loss, grad = _classification.index_loss_and_grad(1, z, d)
        return loss, (factor[:, None] * grad).astype(z.dtype)

    out = _rows_with_grad(interpret, *primals)
    return out, jax.jvp(xla, primals, tangents)[1]


@contextlib.contextmanager
def interpret_mode(mode: bool | object = True):
    """Runs ``implementation="pallas"`` in Pallas's interpret mode (on CPU, for tests).

    Traces are cached per static arguments, not per this flag: caches are cleared on the way in
    and out, so no program traced in one mode is reused in the other.
    """
    global INTERPRET
    previous, INTERPRET = INTERPRET, mode
    jax.clear_caches()
    try:
        yield
    finally:
        INTERPRET = previous
        jax.clear_caches()
