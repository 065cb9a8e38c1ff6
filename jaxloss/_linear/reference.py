"""The materialised form of ``linear_cross_entropy``: the ``[N, V]`` logits in plain ``jnp``.

The definition the blocked kernel is an optimisation of, written for reading and testing: the
same per-token statistics, taken from the whole logit matrix, assembled by the same code.
Differentiable in every mode (forward mode and Hessians included), at ``O(N·V)`` memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxloss import _common
from jaxloss._linear import assembly


def reference_loss(h, kernel, bias, y, class_weight, *, options):
    """``linear_cross_entropy`` of 2-D ``h`` and 1-D ``y`` by way of the materialised logits."""
    v = kernel.shape[1]
    cdt = _common.compute_dtype(jnp.result_type(h.dtype, kernel.dtype))
    z = jnp.matmul(h, kernel, preferred_element_type=cdt)
    if bias is not None:
        z = z + bias.astype(cdt)[None, :]
    lse = jax.nn.logsumexp(z, axis=1)
    tgt = jnp.take_along_axis(z, jnp.clip(y, 0, v - 1)[:, None], 1)[:, 0]
    smoothing = options["smoothing"]
    wsum = None
    if smoothing:
        wsum = jnp.sum(z, 1) if class_weight is None else z @ class_weight.astype(cdt)
    valid, bad, pos_weight = assembly.index_setup(y, class_weight, v, options["ignore_index"], cdt)
    sum_weight = v if class_weight is None else jnp.sum(class_weight)
    loss = assembly.row_losses(
        lse, tgt, wsum, valid, bad, pos_weight, sum_weight, v, smoothing, options["z_loss"]
    )
    return assembly.reduce(loss, pos_weight, options["reduction"])
