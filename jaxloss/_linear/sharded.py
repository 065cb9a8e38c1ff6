"""The vocabulary- and token-parallel form of ``linear_cross_entropy`` (``jax.shard_map``).

Taken when the caller names ``batch_axis`` and/or ``vocab_axis``: every device runs the blocked
kernel on its own token rows and kernel columns; the global logsumexp is the logsumexp of the
per-shard ones, and the target logit, ``Σ_c w_c z_c`` and the target's class weight are sums
over the vocabulary shards (a target is owned by exactly one shard). The collectives move
``O(N)`` numbers; neither the logits nor the kernel are ever gathered (Megatron-style
vocabulary-parallel cross-entropy). Nothing switches to this form by itself. Each device's
share takes the implementation the head's table gives: on TPU the Pallas kernels
(:func:`_kernel_local_loss`), else the XLA blocks.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxloss import _implementations, _targets
from jaxloss._blockwise import sharding
from jaxloss._blockwise.blocks import finite_or_zero, vary
from jaxloss._blockwise.online import combine_shards
from jaxloss._linear import assembly, chunked, kernel_stats, pallas_tpu

_FN = "linear_cross_entropy"


def _combine_over_vocabulary(s: chunked.Stats, vocab_axis, wmass, tmass) -> chunked.Stats:
    """One device's loss statistics of its columns combined into those of the whole vocabulary.

    Each shard's sums are relative to its own maximum; moved to the global one (``step`` ≥ 0
    further), a gap ``Σ_c u_c (shift - z_c)`` grows by ``step`` times its mass ``Σ_c u_c``
    (``wmass``, ``tmass``: the shard's).
    """
    top, log_sum, step = combine_shards(s.max, s.log_sum, vocab_axis)
    psum = lambda x: None if x is None else jax.lax.psum(x, vocab_axis)
    moved = lambda gap, mass: None if gap is None else psum(gap + mass * step)
    return chunked.Stats(
        top, log_sum, psum(s.tgt), moved(s.tgap, tmass), moved(s.wgap, wmass), None, None
    )


def _combined_diagnostics(s: chunked.Stats, offset, vocab_axis):
    """``(lse, argmax, entropy)`` of the whole vocabulary from one device's (not differentiated:
    pmax has no derivative either)."""
    s = jax.tree.map(jax.lax.stop_gradient, s)
    top, log_sum, step = combine_shards(s.max, s.log_sum, vocab_axis)
    mine = jnp.where(s.max == top, s.arg + offset, jnp.iinfo(jnp.int32).max)
    arg = jax.lax.pmin(mine, vocab_axis)  # ties: the lowest class index of all shards
    # H = Σ_k π_k (H_k - log π_k), π_k the shard's share of the probability.
    log_share = (s.log_sum - step) - log_sum
    share = jnp.exp(log_share)
    entropy = jax.lax.psum(jnp.where(share > 0, share * (s.entropy - log_share), 0), vocab_axis)
    return finite_or_zero(top) + log_sum, arg, entropy


def _without_ignored(s: chunked.Stats, valid) -> chunked.Stats:
    """The loss statistics with an ignored token's at 0, before any arithmetic of the
    combination (as in ``assembly.index_losses``): its NaN statistics (a NaN hidden row)
    would otherwise reach every gradient through the collectives' VJPs as ``0 · NaN``."""
    quiet = lambda x: None if x is None else jnp.where(valid, x, 0)
    return s._replace(max=quiet(s.max), log_sum=quiet(s.log_sum), tgt=quiet(s.tgt),
                      wgap=quiet(s.wgap))  # fmt: skip


class _DeviceColumns(NamedTuple):
    """This device's classes ``[lo, hi)`` in the coordinates of the kernel it holds; ``offset``
    of that kernel's first column among all classes; ``owned`` a mask over the kernel's columns
    where it holds every class (uneven vocabulary shards), else ``None``."""

    lo: Any
    hi: Any
    offset: Any
    owned: Any


def _device_columns(p: chunked.Problem, vocab_axis) -> tuple[chunked.Problem, _DeviceColumns]:
    """The problem with labels in the kernel's coordinates, and this device's classes."""
    width = p.columns.size
    if vocab_axis is None:
        return p, _DeviceColumns(0, width, 0, None)
    if p.owned_from is None:
        offset = jax.lax.axis_index(vocab_axis) * width
        labels = None if p.labels is None else (p.labels - offset).astype(p.labels.dtype)
        return p._replace(labels=labels), _DeviceColumns(0, width, offset, None)
    v = p.kernel.shape[1]
    lo, hi = p.owned_from, jnp.minimum(p.owned_from + width, v)
    ids = jax.lax.iota(jnp.int32, v)
    return p, _DeviceColumns(lo, hi, 0, (ids >= lo) & (ids < hi))


def _owned_weight_sum(local: chunked.Problem, cols: _DeviceColumns):
    """``Σ_c w_c`` over this device's classes (their count without class weights)."""
    w = local.class_weight
    if cols.owned is None:
        return local.columns.size if w is None else jnp.sum(w)
    if w is None:
        return jnp.maximum(cols.hi - cols.lo, 0)
    return jnp.sum(jnp.where(cols.owned, w, 0))


def _local_loss(p: chunked.Problem, options: assembly.Options, hyper, chunks, axes,
                token_stats=chunked.token_stats):  # fmt: skip
    """One device's share: blocked statistics (``token_stats``: the XLA blocks, or the Pallas
    kernels' :func:`kernel_stats.token_stats`), combined over the vocabulary shards."""
    batch_axis, vocab_axis = axes
    targets = p.labels  # among all classes
    p, cols = _device_columns(p, vocab_axis)
    # Every array marked as varying over all the axes any of them varies over (see sharded_loss).
    names = ("hidden", "kernel", "bias", "labels", "probs", "class_weight")
    arrays = dict(zip(names, p.arrays, strict=True))
    # (With uneven vocabulary shards the column range too: it varies over the vocabulary axis.)
    everywhere = [a for a in (*arrays.values(), p.col_start) if a is not None]
    local = p._replace(
        **{k: None if a is None else vary(a, *everywhere) for k, a in arrays.items()}
    )
    s = token_stats(local, chunks)
    diagnostics = (s.lse, s.arg, s.entropy)
    w, labels = local.class_weight, local.labels
    sum_weight = _owned_weight_sum(local, cols)
    mass = None
    if labels is not None:
        valid = ~_targets.ignored(targets, options.ignore_index)
        bad = valid & ((targets < 0) | (targets >= options.num_classes))
        owned = (labels >= cols.lo) & (labels < cols.hi)
        pos_weight = valid.astype(s.log_sum.dtype)
        if w is not None:
            pos_weight = jnp.where(valid & owned, w[jnp.clip(labels, 0, w.shape[0] - 1)], 0)
    else:
        probs = local.probs if cols.owned is None else jnp.where(cols.owned, local.probs, 0)
        mass = assembly.target_mass(probs, w)
    if vocab_axis is not None:
        if p.with_stats:
            diagnostics = _combined_diagnostics(s, cols.offset, vocab_axis)
        quiet = s if labels is None else _without_ignored(s, valid)
        s = _combine_over_vocabulary(quiet, vocab_axis, sum_weight, mass)
        diagnostics = diagnostics if p.with_stats else (s.lse, None, None)
        sum_weight = jax.lax.psum(sum_weight, vocab_axis)
        if labels is not None and w is not None:
            pos_weight = jax.lax.psum(pos_weight, vocab_axis)
        if labels is None:
            mass = jax.lax.psum(mass, vocab_axis)
    if labels is not None:
        loss = assembly.index_losses(options, s, valid, bad, pos_weight, sum_weight, hyper)
    else:
        loss = assembly.prob_losses(options, s, mass, sum_weight, hyper)
        pos_weight = jnp.ones_like(loss)
    return assembly.reduce(loss, pos_weight, options.reduction, batch_axis), diagnostics


def _kernel_local_loss(p: chunked.Problem, options, hyper, chunks, axes):
    """:func:`_local_loss` through the Pallas TPU kernels: each device's statistics of its
    tokens and columns from the kernels (:mod:`kernel_stats`), combined over the vocabulary
    shards and reduced over the batch axis as the XLA blocks' are."""
    return _local_loss(p, options, hyper, chunks, axes, token_stats=kernel_stats.token_stats)


# Over an uneven vocabulary split too (the arrays replicated, each device's columns sliced from
# them): 8 v5p chips, tokens over 2, 128003 classes over 4, bf16, 8192x2048 per chip: 13.07 ->
# 10.70 ms, temporaries 1066 -> 759 MiB.
_kernel_local_loss.takes = lambda p, *_: pallas_tpu.takes(p)  # pyright: ignore[reportFunctionMemberAccess]


def sharded_loss(
    p: chunked.Problem, options, hyper, config, *, mesh, batch_axis, vocab_axis,
    implementation=None,
):  # fmt: skip
    """``linear_cross_entropy`` of the 2-D problem ``p`` under ``jax.shard_map`` on ``mesh``.

    Returns the loss and ``(lse, argmax, entropy)`` per token. The differentiable inputs are
    marked as varying over every mesh axis in use, so that autodiff sums their per-device
    gradients over the axes they are replicated on (``hidden`` over the vocabulary axis,
    ``kernel``, ``bias`` and ``weight`` over the batch axis). Each device's share runs through
    the kernels ``implementation`` chooses (the linear head's table in ``_implementations``: on
    TPU the Pallas kernels where they take the share).
    """
    n, v = p.hidden.shape[0], p.kernel.shape[1]
    n_local = n // sharding.axis_size(mesh, batch_axis)
    split = sharding.VocabularySplit.of(mesh, vocab_axis, v)
    if implementation == "pallas":
        pallas_tpu.check_takes(_FN, p)  # (else the XLA blocks would run it silently)
    chunks = config.clipped(n_local, split.width)[:2]
    vocab = split.axis(vocab_axis)
    rows, cols = PartitionSpec(batch_axis), PartitionSpec(vocab)
    specs = dict(
        hidden=PartitionSpec(batch_axis, None), kernel=PartitionSpec(None, vocab),
        bias=cols, labels=rows, probs=PartitionSpec(batch_axis, vocab), class_weight=cols,
        soft_cap=PartitionSpec(), smoothing=PartitionSpec(), z_loss=PartitionSpec(),
    )  # fmt: skip
    arrays = dict(p._asdict(), smoothing=hyper[0], z_loss=hyper[1])
    arguments = {k: (arrays[k], spec) for k, spec in specs.items()}
    platform = sharding.platform_of(mesh)

    def local(smoothing, z_loss, **given):
        local_p = p._replace(**given)
        if split.uneven:
            start, owned_from = sharding.device_columns(vocab_axis, v, split.width)
            local_p = local_p._replace(col_start=start, width=split.width, owned_from=owned_from)
        args = (local_p, options, (smoothing, z_loss), chunks, (batch_axis, vocab_axis))
        kernels = dict.fromkeys(_implementations.LINEAR_KERNELS[_FN], _kernel_local_loss)
        return _implementations.linear_head(
            _FN, implementation, _local_loss, *args, kernels=kernels, platform=platform
        )

    out_specs = (rows if options.reduction == "none" else PartitionSpec(), (rows,) * 3)
    if not p.with_stats:
        out_specs = (out_specs[0], (rows, None, None))
    return sharding.run(local, mesh, arguments, out_specs)
