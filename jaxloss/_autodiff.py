"""Autodiff helpers: hand-written tangents that share the loss's intermediates, and conventions.

``fused_jvp`` gives a loss the tangent that its own pass computes beside the value (optax keeps
one custom derivative per module; this is the one ours share), with the contractions it applies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from jaxloss._dtypes import compute_dtype


def is_zero(tangent: Any) -> bool:
    """Whether a ``custom_jvp`` tangent is a symbolic zero (that input is not differentiated)."""
    return tangent is None or isinstance(tangent, SymbolicZero)


def fused_jvp(
    loss_fn: Callable[[Any, jax.Array, Any], jax.Array],
    loss_and_grad_fn: Callable[[Any, jax.Array, Any], tuple[jax.Array, jax.Array]],
    contract: Callable[[Any, jax.Array, jax.Array], jax.Array],
) -> Callable[[Any, jax.Array, Any], jax.Array]:
    """A ``custom_jvp`` of ``loss_fn(static, x, data)`` whose tangent in ``x`` is hand-written.

    ``static`` is a hashable description of the options (a frozen dataclass, or None), ``x``
    the array whose derivative ``loss_and_grad_fn`` returns beside the loss (sharing their
    intermediates), and ``data`` a pytree of every other array (targets, weights,
    hyperparameters); ``contract(static, g, dx)`` applies that derivative to a tangent. Written
    as a JVP (not a VJP) so that forward mode and Hessians keep working; under reverse mode the
    transposed tangent is one fused elementwise expression. The tangents in ``data`` come from
    ordinary autodiff of ``loss_fn`` and are computed only when some leaf of ``data`` is actually
    differentiated (symbolic zeros otherwise).
    """
    f = jax.custom_jvp(loss_fn, nondiff_argnums=(0,))

    def jvp(static, primals, tangents):
        (x, data), (dx, d_data) = primals, tangents
        if is_zero(dx):
            out = loss_fn(static, x, data)
            tangent = jnp.zeros_like(out)
        else:
            out, g = loss_and_grad_fn(static, x, data)
            wide = compute_dtype(jnp.promote_types(g.dtype, dx.dtype))
            tangent = contract(static, g.astype(wide), dx.astype(wide)).astype(out.dtype)
        if not all(is_zero(t) for t in jax.tree.leaves(d_data, is_leaf=is_zero)):
            d_data = jax.tree.map(instantiate, d_data, data, is_leaf=is_zero)
            _, t_data = jax.jvp(lambda d: loss_fn(static, x, d), (data,), (d_data,))
            tangent = tangent + t_data
        return out, tangent

    f.defjvp(jvp, symbolic_zeros=True)
    return f


def instantiate(tangent: Any, primal: Any) -> Any:
    """A symbolic zero tangent as an array like ``primal`` (its sharding too), others as they are.

    Integer primals take ``float0`` zeros, as ``jax.jvp`` requires.
    """
    if not isinstance(tangent, SymbolicZero):
        return tangent
    if jnp.issubdtype(jnp.result_type(primal), jnp.floating):
        return jnp.zeros_like(primal)
    return np.zeros(np.shape(primal), jax.dtypes.float0)


def contract_axis(axis: int, g: jax.Array, dx: jax.Array) -> jax.Array:
    """Tangent of a per-position loss over the class ``axis`` (the kernels' static): ``Σ g·dx``."""
    return jnp.sum(g * dx, axis)


def contract_elementwise(static: Any, g: jax.Array, dx: jax.Array) -> jax.Array:
    """Tangent of an elementwise loss: ``g · dx``."""
    del static
    return g * dx
