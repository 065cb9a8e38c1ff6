"""The materialised form of ``linear_distillation``: both heads' ``[N, V]`` logits in plain ``jnp``.

The definition the blockwise passes (:mod:`jaxloss._distillation` on :mod:`jaxloss._blockwise`)
are an optimisation of, written for reading and testing; every implementation is tested
against it, values and gradients (autodiff of this formula), non-finite entries included.
``0 log 0 = 0`` by double selects (NaN-free gradients there); a NaN probability stays NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def kl_rows(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """``Σ_c p_c (log p_c - log q_c)`` per row, ``0 log 0 = 0``.

    ``p_c = 0`` also where it underflows (saturated logits), where ``log q_c`` may be ``-inf``.
    """
    present = jnp.exp(log_p) != 0  # a NaN probability stays NaN
    safe_p = jnp.where(present, log_p, 0)
    return jnp.sum(jnp.where(present, jnp.exp(safe_p) * (safe_p - log_q), 0), -1)


def reference_loss(
    h, k, b, th, tk, tb, *, divergence="kl", beta=0.5, temperature=1.0, mask=None, reduction="mean"
) -> jax.Array:
    """``linear_distillation`` of 2-D heads ``(h, k, b)`` (student) and ``(th, tk, tb)``
    (teacher; a bias may be ``None``) from the materialised logits."""
    z_s = h @ k + (0 if b is None else b[None, :])
    z_t = th @ tk + (0 if tb is None else tb[None, :])
    log_s = jax.nn.log_softmax(z_s / temperature)
    log_t = jax.nn.log_softmax(z_t / temperature)
    if divergence == "kl":
        per_token = kl_rows(log_t, log_s)
    elif divergence == "reverse_kl":
        per_token = kl_rows(log_s, log_t)
    else:
        m = beta * jnp.exp(log_t) + (1 - beta) * jnp.exp(log_s)
        # log 0 = -inf with a NaN-free gradient (a class both distributions rule out); a NaN
        # mixture stays NaN.
        log_m = jnp.where(m == 0, -jnp.inf, jnp.log(jnp.where(m == 0, 1, m)))
        per_token = beta * kl_rows(log_t, log_m) + (1 - beta) * kl_rows(log_s, log_m)
    loss = temperature**2 * per_token
    if mask is not None:
        loss = jnp.where(mask, loss, 0)
    if reduction == "none":
        return loss
    count = loss.shape[0] if mask is None else jnp.sum(mask)
    return jnp.sum(loss) if reduction == "sum" else jnp.sum(loss) / count
