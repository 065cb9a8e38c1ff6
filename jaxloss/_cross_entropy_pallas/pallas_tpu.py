"""Index-target cross-entropy as one Pallas TPU kernel: loss terms and gradient in one pass.

Grid: one step per block of ``block_rows`` rows, each holding whole rows of ``C`` classes in
VMEM. Per block the kernel reads the logits once from HBM and, in VMEM, makes three sweeps over
them in column chunks (the row maximum; ``Σ exp(z - max)`` and the smoothing sum; the gradient),
so its temporaries are one chunk wide, not a row. The gradient ``r·(a·softmax(z) − b)`` (``r``
the per-row factor of the reduction, see ``_cross_entropy_pallas``) is written in the logits'
dtype: the whole of ``value_and_grad`` is one read of the logits and one write of the gradient.

The formulas are those of ``jaxloss._classification._index_terms`` and
``index_loss_and_grad`` (PyTorch's smoothing, PaLM's z-loss); the per-row target weights, the
ignore and out-of-range masks come from ``jaxloss._targets.index_targets``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax._src import sharding_impls
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from jaxloss._blockwise.blocks import struct_varying_like, vary

# Rows of per-row data beside the logits: target weight, valid (0/1), bad (0/1), reduction factor.
ROW_FIELDS = 4
# Scoped VMEM the kernel asks Mosaic for: under v5e's, v5p's and v6e's 128/95/128 MiB of VMEM,
# above v5e's 16 MiB default. The blocks themselves are sized to VMEM_BLOCK_BUDGET.
VMEM_LIMIT = 48 * 2**20
VMEM_BLOCK_BUDGET = 24 * 2**20
CHUNK = 2048  # columns per in-VMEM sweep step: chunk temporaries of block_rows × 2048 float32
MAX_BLOCK_ROWS = 256


class Options(NamedTuple):
    """Static options of one kernel (hashable)."""

    smoothing: bool
    z_loss: bool
    class_weight: bool
    with_grad: bool


def sublanes(dtype) -> int:
    """Rows of one (sublane, 128) tile: 8 for 32-bit, 16 for 16-bit data."""
    return 8 * 4 // jnp.dtype(dtype).itemsize


def chunk_width(classes: int) -> int | None:
    """Columns per sweep step: a multiple of 128 dividing ``C``, or ``C`` itself when small."""
    if classes % 128:
        return classes if classes <= CHUNK else None
    width = min(CHUNK, classes)
    while classes % width:
        width -= 128
    return width


def block_rows(rows: int, classes: int, dtype) -> int | None:
    """Rows per grid step: the most whose double-buffered logits and gradient blocks fit the
    budget (a multiple of the dtype's sublane tile); None when not even one tile of rows fits."""
    tile = sublanes(dtype)
    per_row = 4 * classes * jnp.dtype(dtype).itemsize  # 2 buffers × (logits in, gradient out)
    fit = VMEM_BLOCK_BUDGET // per_row // tile * tile
    if fit < tile or chunk_width(classes) is None:
        return None
    padded_rows = -(-rows // tile) * tile
    return min(fit, MAX_BLOCK_ROWS, padded_rows)


def supported(rows: int, classes: int, dtype) -> bool:
    """Whether the kernel takes ``(rows, classes)`` logits of ``dtype`` (else: the XLA form)."""
    floating = jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize <= 4
    return floating and classes > 0 and block_rows(rows, classes, dtype) is not None


def _sweep(width: int, classes: int, body, init):
    """``body(columns_slice, carry)`` over the column chunks of the block."""
    steps = classes // width
    if steps == 1:
        return body(slice(None), init)
    return jax.lax.fori_loop(
        0, steps, lambda j, c: body(pl.ds(pl.multiple_of(j * width, width), width), c), init
    )


def _kernel(scalars, z_ref, y_ref, row_ref, cw_ref, loss_ref, grad_ref, *, opts, width):
    rows, classes = z_ref.shape
    eps, lam, total_weight = scalars[0], scalars[1], scalars[2]
    y, row = y_ref[...], row_ref[...]
    w, valid, bad, r = (row[:, k : k + 1] for k in range(ROW_FIELDS))
    valid = valid > 0

    def chunk(cols):
        return z_ref[:, cols].astype(jnp.float32)

    def columns(cols, start):
        return start + jax.lax.broadcasted_iota(jnp.int32, (rows, width), 1)

    def start_of(j_cols):
        return 0 if isinstance(j_cols, slice) else j_cols.start

    def max_and_pick(cols, carry):
        m, picked = carry
        z = chunk(cols)
        hit = columns(cols, start_of(cols)) == y
        m = jnp.maximum(m, jnp.max(z, axis=1, keepdims=True))
        return m, picked + jnp.sum(jnp.where(hit, z, 0), axis=1, keepdims=True)

    zeros = jnp.zeros((rows, 1), jnp.float32)
    m, picked = _sweep(width, classes, max_and_pick, (zeros - jnp.inf, zeros))

    def sums(cols, carry):
        s, gap = carry
        z = chunk(cols)
        s = s + jnp.sum(jnp.exp(z - m), axis=1, keepdims=True)
        if opts.smoothing:
            d = m - z
            if opts.class_weight:
                d = cw_ref[:, cols] * d
            gap = gap + jnp.sum(d, axis=1, keepdims=True)
        return s, gap

    s, gap = _sweep(width, classes, sums, (zeros, zeros))
    row = (m, s, picked, gap, w, valid, bad)
    loss, a, keep = _row_terms(row, (eps, lam, total_weight), classes, opts)
    loss_ref[...] = loss
    if not opts.with_grad:
        return
    scale = a / s

    def gradient(cols, carry):
        z = chunk(cols)
        b = jnp.where(columns(cols, start_of(cols)) == y, keep * w, 0)
        if opts.smoothing:
            b = b + eps / classes * (cw_ref[:, cols] if opts.class_weight else 1)
        g = jnp.where(valid, scale * jnp.exp(z - m) - b, 0) * r
        grad_ref[:, cols] = g.astype(grad_ref.dtype)
        return carry

    _sweep(width, classes, gradient, 0)


def loss_rows(z, y, row_data, scalars, class_weight, *, opts: Options, interpret=False):
    """Per-row loss terms ``(N,)`` float32 and, with ``opts.with_grad``, the gradient ``(N, C)``
    in ``z``'s dtype (already times each row's factor ``row_data[:, 3]``).

    ``y``: ``(N,)`` int32 targets; ``row_data``: ``(N, 4)`` float32 (weight, valid, bad, factor);
    ``scalars``: ``(3,)`` float32 (ε, λ_z, Σ class weight); ``class_weight``: ``(1, C)`` float32
    with ``opts.class_weight`` (else None: a one-tile placeholder is fetched once).
    """
    if class_weight is None:
        class_weight = jnp.zeros((1, 128), jnp.float32)
    rows, classes = z.shape
    bn = block_rows(rows, classes, z.dtype)
    assert bn is not None, (rows, classes, z.dtype)  # callers check supported() first
    width = chunk_width(classes)
    grid = (pl.cdiv(rows, bn),)
    row_spec = lambda cols: pl.BlockSpec((bn, cols), lambda i: (i, 0))
    # Inside shard_map the outputs vary as the logits (rows() makes every input vary alike).
    out_shape = [struct_varying_like((rows, 1), jnp.float32, z)]
    out_specs = [row_spec(1)]
    if opts.with_grad:
        out_shape.append(struct_varying_like((rows, classes), z.dtype, z))
        out_specs.append(row_spec(classes))
    kernel = functools.partial(_kernel, opts=opts, width=width)
    if not opts.with_grad:
        kernel = functools.partial(_no_grad_ref, kernel)
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=[
            pl.BlockSpec(memory_space=pltpu.SMEM),
            row_spec(classes),
            row_spec(1),
            row_spec(ROW_FIELDS),
            pl.BlockSpec(class_weight.shape, lambda i: (0, 0)),
        ],
        out_specs=out_specs,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel",), vmem_limit_bytes=VMEM_LIMIT
        ),
        interpret=interpret,
        name="jaxloss_cross_entropy",
    )(scalars, z, y[:, None], row_data, class_weight)
    loss = outs[0][:, 0]
    return (loss, outs[1]) if opts.with_grad else (loss, None)


def _row_terms(row, scalars, classes: int, opts: Options):
    """Per-row loss (0 where not counted) and the gradient's softmax factor ``a`` (NaN at a bad
    target), from the row's max ``m``, exp-sum ``s``, target logit and smoothing gap: the one
    formula the kernel and :func:`reference_rows` share. Also ``keep = 1 - ε``."""
    m, s, picked, gap, w, valid, bad = row
    eps, lam, total_weight = scalars
    log_s = jnp.log(s)
    lse = m + log_s
    keep = 1 - eps if opts.smoothing else 1.0
    loss = -keep * w * ((picked - m) - log_s)
    a = keep * w
    if opts.smoothing:
        loss = loss + eps / classes * (gap + total_weight * log_s)
        a = a + (eps / classes * total_weight if opts.class_weight else eps)
    if opts.z_loss:
        loss = loss + lam * lse**2
        a = a + 2 * lam * lse
    return jnp.where(valid, loss, 0), jnp.where(bad > 0, jnp.nan, a), keep


def _no_grad_ref(kernel, *refs):
    return kernel(*refs, None)


def reference_rows(z, y, row_data, scalars, class_weight, *, opts: Options, interpret=False):
    """:func:`loss_rows` in plain jnp, the same formulas: what a program partitioned over
    several devices (where a Mosaic kernel cannot be partitioned) and vmap over scalars run."""
    del interpret
    classes = z.shape[1]
    zf = z.astype(jnp.float32)
    eps, lam, total_weight = scalars[0], scalars[1], scalars[2]
    w, valid, bad, r = (row_data[:, k : k + 1] for k in range(ROW_FIELDS))
    valid = valid > 0
    m = jnp.max(zf, axis=1, keepdims=True)
    hit = jax.lax.broadcasted_iota(jnp.int32, z.shape, 1) == y[:, None]
    picked = jnp.sum(jnp.where(hit, zf, 0), axis=1, keepdims=True)
    e = jnp.exp(zf - m)
    s = jnp.sum(e, axis=1, keepdims=True)
    gap = None
    if opts.smoothing:
        gap = (class_weight * (m - zf)) if opts.class_weight else (m - zf)
        gap = jnp.sum(gap, axis=1, keepdims=True)
    row = (m, s, picked, gap, w, valid, bad)
    loss, a, keep = _row_terms(row, (eps, lam, total_weight), classes, opts)
    loss = loss[:, 0]
    if not opts.with_grad:
        return loss, None
    b = jnp.where(hit, keep * w, 0)
    if opts.smoothing:
        b = b + eps / classes * (class_weight if opts.class_weight else 1)
    g = jnp.where(valid, (a / s) * e - b, 0) * r
    return loss, g.astype(z.dtype)


# The kernel as a primitive whose lowering chooses: Mosaic where a kernel may run (one device, or
# inside a shard_map), the jnp reference where XLA partitions the program over several devices
# (Mosaic kernels cannot be partitioned automatically; implementation="pallas" is refused there
# by _implementations, with its own error).
rows_p = Primitive("jaxloss_cross_entropy_rows")
rows_p.multiple_results = True


def kernel_may_lower(ctx) -> bool:
    """Whether Mosaic accepts a kernel in this lowering context (its own rule, tpu_custom_call)."""
    axis_context = ctx.module_context.axis_context
    if isinstance(axis_context, sharding_impls.SPMDAxisContext):
        manual = axis_context.manual_axes | set(axis_context.mesh.manual_axes)
        return not axis_context.manual_axes or manual == frozenset(axis_context.mesh.axis_names)
    if isinstance(axis_context, sharding_impls.ShardingContext):
        return axis_context.num_devices == 1
    return True


@rows_p.def_abstract_eval
def _rows_abstract(z, y, row_data, scalars, class_weight, *, opts, interpret):
    # Typed as the row inputs (rows() makes them vary alike inside shard_map): the loss as the
    # targets, the gradient as the logits.
    loss = y.update(dtype=jnp.float32, weak_type=False)
    return [loss, z] if opts.with_grad else [loss]


def _rows_lowering(ctx, *args, opts, interpret):
    kernel = interpret or kernel_may_lower(ctx)
    fn = loss_rows if kernel else reference_rows

    def flat(*a):
        loss, grad = fn(*a, opts=opts, interpret=interpret)
        return [loss] if grad is None else [loss, grad]

    return mlir.lower_fun(flat, multiple_results=True)(ctx, *args)


mlir.register_lowering(rows_p, _rows_lowering)


def _rows_batched(args, dims, *, opts, interpret):
    *_, scalars, class_weight = args
    rowwise = dims[3] is None and dims[4] is None
    size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)
    moved = [_front(a, d, size) for a, d in zip(args, dims, strict=True)]
    if rowwise:  # rows are independent: a batch of (N, C) problems is one (B·N, C) problem
        batch, rows = moved[0].shape[:2]
        flat = [a.reshape(batch * rows, *a.shape[2:]) for a in moved[:3]]
        outs = rows_p.bind(*flat, scalars, class_weight, opts=opts, interpret=interpret)
        return [o.reshape(batch, rows, *o.shape[1:]) for o in outs], [0] * len(outs)
    ref = functools.partial(reference_rows, opts=opts)
    loss, grad = jax.vmap(ref)(*moved)
    outs = [loss] if grad is None else [loss, grad]
    return outs, [0] * len(outs)


def _front(a, dim, size):
    """``a`` with its batch dimension first (an unbatched one broadcast)."""
    return jnp.broadcast_to(a, (size, *a.shape)) if dim is None else jnp.moveaxis(a, dim, 0)


batching.primitive_batchers[rows_p] = _rows_batched


def rows(z, y, row_data, scalars, class_weight, *, opts, interpret=False):
    """:func:`loss_rows` (or, where Mosaic cannot lower it, :func:`reference_rows`)."""
    if class_weight is None:
        class_weight = jnp.zeros((1, 128), jnp.float32)
    # Inside shard_map the outputs vary over the mesh axes any input varies over.
    z, y = (vary(a, z, y, row_data, scalars, class_weight) for a in (z, y))
    outs = rows_p.bind(z, y, row_data, scalars, class_weight, opts=opts, interpret=interpret)
    return (outs[0], outs[1]) if opts.with_grad else (outs[0], None)
