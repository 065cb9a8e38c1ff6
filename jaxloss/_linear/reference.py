"""The materialised form of ``linear_cross_entropy``: the ``[N, V]`` logits in plain ``jnp``.

The definition the blocked kernel is an optimisation of, written for reading and testing: the
same per-token statistics, taken from the whole logit matrix, assembled by the same code.
Differentiable in every mode (forward mode and Hessians included), at ``O(N·V)`` memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxloss._linear import assembly, chunked


def reference_stats(p: chunked.Problem) -> chunked.Stats:
    """:class:`chunked.Stats` of ``p`` from its materialised (soft-capped) logits."""
    z = jnp.matmul(p.hidden, p.kernel, preferred_element_type=p.cdt)
    if p.bias is not None:
        z = z + p.bias.astype(p.cdt)[None, :]
    if p.soft_cap is not None:
        z = p.soft_cap * jnp.tanh(z / p.soft_cap)
    w = jnp.ones((z.shape[1],), p.cdt) if p.class_weight is None else p.class_weight
    top = jnp.max(z, 1)
    gap = jax.lax.stop_gradient(chunked.finite_or_zero(top))[:, None] - z
    log_sum = jnp.log(jnp.sum(jnp.exp(-gap), 1))
    tgt = tgap = None
    if p.labels is not None:
        safe = jnp.clip(p.labels, 0, z.shape[1] - 1)
        tgt = jnp.take_along_axis(z, safe[:, None], 1)[:, 0]
    else:
        u = p.probs * w[None, :]
        tgap = jnp.sum(jnp.where(u == 0, 0, u * gap), 1)
    wgap = gap @ w if p.weighted_sum else None
    probs = jax.nn.softmax(z, axis=1)
    entropy = log_sum + jnp.sum(jnp.where(probs == 0, 0, probs * gap), 1)
    arg = jnp.argmax(z, axis=1).astype(jnp.int32)
    return chunked.Stats(top, log_sum, tgt, tgap, wgap, arg, entropy)


def reference_loss(p: chunked.Problem, options: assembly.Options, hyper) -> jax.Array:
    """``linear_cross_entropy`` of the 2-D problem ``p``, reduced as ``options`` say."""
    stats = reference_stats(p)
    losses = assembly.RowLoss(options)(stats, chunked.whole_block(p), p.class_weight, hyper)
    n = p.hidden.shape[0]
    den = assembly.denominator(options, p.labels, p.class_weight, n, losses.dtype)
    return assembly.reduce(losses, den, options.reduction)
