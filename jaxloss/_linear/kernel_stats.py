"""``chunked.token_stats`` through the Pallas TPU kernels: the vocabulary-sharded form's share.

Each device of ``vocab_axis`` holds the kernel's columns of its classes. The forward kernel in
its raw mode (``pallas_tpu.Options.raw``) gives per token the statistics of those columns that
``sharded`` combines over the shards — max, exp-sum, target logit, smoothing gap — and, when
differentiated, ``r = Σ_c p_c cap'_c k_c`` (``p`` the softmax over the device's columns) in the
same two matmuls. With the shift held constant (the statistics are relative to it, the loss is
not), the cotangents ``g_s`` of ``log_sum``, ``g_t`` of the target logit and ``g_w`` of the gap
``Σ_c w_c (shift − z_c)`` give

    ∂/∂h = g_s r + g_t cap'_y k_y − g_w Σ_c w_c cap'_c k_c
    ∂/∂z_c = (g_s p_c + g_t [c = y] − g_w w_c) cap'_c     (the backward kernel's ``∂K``)

— four ``N·D·V_shard`` matmuls per device, as on one device; the hidden gradient's sum over the
vocabulary shards is the transpose of ``hidden``'s ``pvary`` (``sharded``). The class weights'
cotangent ``Σ_n g_w (shift − z_{n,c})`` comes from plain jnp, which XLA removes where unused.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxloss import _targets
from jaxloss._blockwise import vjp
from jaxloss._linear import assembly, chunked, pallas_tpu


def token_stats(
    p: chunked.Problem, chunks: Any = None, *, blocks=None, interpret=None
) -> chunked.Stats:
    """:func:`chunked.token_stats` of ``p`` (``pallas_tpu.takes(p)``), through the kernels
    (``chunks``: the XLA blocks', unused; ``blocks``: the kernels', default
    ``choose_blocks``'; ``interpret``: default ``pallas_tpu.INTERPRET``)."""
    del chunks
    kernel, cw, labels, first = _device_columns(p)
    n, d = p.hidden.shape
    if blocks is None:
        sums = 1 + (p.soft_cap is not None and p.weighted_sum)
        blocks = pallas_tpu.choose_blocks(n, d, kernel.shape[1], p.hidden.dtype, sums)
    interpret = pallas_tpu.INTERPRET if interpret is None else interpret
    op = _KernelStats(p.weighted_sum, blocks, interpret)
    return vjp.apply(op, (p.hidden, kernel, cw), (labels, _cap(p.soft_cap), first))


def _device_columns(p: chunked.Problem):
    """``(kernel, float32 class weights, int32 labels, first)`` of the columns ``p`` covers:
    with an uneven vocabulary split (``p.col_start``), the device's ``width`` columns sliced
    from the replicated arrays (autodiff puts their gradients back in place), labels relative
    to them, and ``first`` (a float32 scalar) the first of them that is the device's own."""
    cw = None if p.class_weight is None else p.class_weight.astype(jnp.float32)
    labels = p.labels.astype(jnp.int32)
    if p.col_start is None:
        return p.kernel, cw, labels, None
    start, width = p.col_start, p.columns.size
    take = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, start, width, axis)
    first = (p.owned_from - start).astype(jnp.float32)
    return take(p.kernel, 1), (None if cw is None else take(cw, 0)), labels - start, first


def losses(
    p: chunked.Problem, options: assembly.Options, hyper, **kernels: Any
) -> tuple[jax.Array, jax.Array]:
    """``(per-token losses, per-token target weights)`` of ``p`` (``pallas_tpu.takes(p)``) on
    one device, float32: the weights sum to the ``"mean"`` divisor. ``kernels``:
    :func:`token_stats`' ``blocks`` and ``interpret``."""
    s = token_stats(p, **kernels)
    block = chunked.whole_block(p)
    idx = _targets.index_targets(
        p.labels, p.kernel.shape[1], options.ignore_index, p.class_weight, s.log_sum.dtype
    )
    return assembly.RowLoss(options)(s, block, p.class_weight, hyper), idx.weight


@dataclasses.dataclass(frozen=True)
class _KernelStats:
    """The op (``_blockwise.vjp``): statistics forward, the backward kernel and ``r`` back.
    ``diff``: hidden, kernel, class weights (float32) or None; ``data``: int32 labels in the
    kernel's columns, the cap (a float32 scalar) or None, the first column that is the device's
    own (a float32 scalar; None: all are)."""

    weighted_sum: bool
    blocks: Any
    interpret: Any

    def _static(self, diff, data, with_grad: bool) -> pallas_tpu.Static:
        weights = diff[2] is not None and self.weighted_sum
        opts = pallas_tpu.Options(
            self.weighted_sum, data[1] is not None, weights, with_grad, data[2] is not None
        )
        return pallas_tpu.Static(opts, self.blocks, self.interpret)

    def _run(self, diff, data, with_grad: bool):
        hidden, kernel, cw = diff
        static = self._static(diff, data, with_grad)
        scalars = _scalars(data[1], data[2])
        stats, *sums = pallas_tpu.run_kernel(
            static, "forward", hidden, kernel, data[0], scalars, weights=_weights(static, cw)
        )
        m, s, tgt, gap = (stats[:, f] for f in range(pallas_tpu.STATS))
        gap = gap if self.weighted_sum else None
        return chunked.Stats(m, jnp.log(s), tgt, None, gap, None, None), sums

    def primal(self, diff, data):
        return self._run(diff, data, False)[0]

    def forward(self, diff, data):
        stats, sums = self._run(diff, data, True)
        return stats, (stats.shift, stats.log_sum, stats.tgt, *sums)

    def backward(self, diff, data, saved, cotangents: chunked.Stats):
        hidden, kernel, cw = diff
        y, cap, first = data
        shift, log_sum, tgt, r, *capped_weights = saved
        zero = jnp.zeros_like(log_sum)
        g_s, g_t, g_w = (zero if g is None else g for g in
                         (cotangents.log_sum, cotangents.tgt, cotangents.wgap))  # fmt: skip
        live = (g_s != 0) | (g_t != 0) | (g_w != 0)
        static = self._static(diff, data, False)
        rows = jnp.stack([shift + log_sum, g_s, -g_t, g_w, live.astype(jnp.float32)], axis=1)
        (dk,) = pallas_tpu.run_kernel(
            static, "backward", hidden, kernel, y, rows, _scalars(cap, first),
            weights=_weights(static, cw),
        )  # fmt: skip
        v = kernel.shape[1]
        # The device's own columns (None: all of them; else those from ``first`` on).
        mine = None if first is None else jnp.arange(v) >= first
        slope_y = 1.0 if cap is None else 1 - (tgt / cap) ** 2
        k_y = pallas_tpu.target_columns(kernel, jnp.clip(y, 0, v - 1)).astype(jnp.float32)
        owned = (y >= (0 if first is None else first)) & (y < v)
        dh = g_s[:, None] * r + jnp.where(owned, g_t * slope_y, 0)[:, None] * k_y
        if self.weighted_sum:
            if capped_weights:
                spread = capped_weights[0]
            else:
                own = _own(_weights(static, cw), mine)
                spread = pallas_tpu.kernel_times_weights(kernel, own)[None]
            dh -= g_w[:, None] * spread
        dh = jnp.where(live[:, None], dh, 0).astype(hidden.dtype)
        dcw = None
        if cw is not None and self.weighted_sum:
            dcw = _weight_cotangent(hidden, kernel, (shift, g_w, live), cap, mine, static.opts)
        return (dh, dk, dcw)


def _cap(cap) -> jax.Array | None:
    return None if cap is None else jnp.asarray(cap, jnp.float32)


def _scalars(cap, first) -> jax.Array:
    """The kernels' SMEM scalars: the cap (1 without one), the first column of the device's."""
    values = (jnp.float32(1.0) if cap is None else cap, jnp.float32(0) if first is None else first)
    return jnp.stack(values)


def _weights(static: pallas_tpu.Static, cw):
    return cw[None] if static.opts.class_weight else None


def _own(weights, mine):
    """The ``(1, V)`` class weights (None: ones) at 0 outside the device's columns ``mine``."""
    if mine is None:
        return weights
    return jnp.where(mine[None], 1.0 if weights is None else weights, 0.0)


def _weight_cotangent(hidden, kernel, rows, cap, mine, opts: pallas_tpu.Options):
    """``Σ_n g_w (shift_n − z_{n,c})`` per class (0 outside the device's columns ``mine``), a
    few classes at a time in jnp; ``rows``: per token the shift, ``g_w`` and whether it is
    live."""
    shift, g_w, live = rows
    h = jnp.where(live[:, None], hidden, 0)
    v = kernel.shape[1]
    step = max(1, min(v, pallas_tpu.XLA_LOGITS_PER_STEP // max(h.shape[0], 1)))
    (columns,) = pallas_tpu.in_blocks(step, kernel.T)

    def block(k_t):
        z, _ = pallas_tpu.logits(h, k_t.T, cap, opts)
        return jnp.sum(jnp.where(live[:, None], g_w[:, None] * (shift[:, None] - z), 0), 0)

    dw = jax.lax.map(block, columns).reshape(-1)[:v]
    return dw if mine is None else jnp.where(mine, dw, 0)
