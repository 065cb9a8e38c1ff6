"""The per-token logit statistics of ``linear_cross_entropy`` as two Pallas TPU kernels: four
``N·D·V`` matmuls, every accumulator in VMEM, the logits never in HBM.

The kernels compute what the XLA blocks compute (``chunked.token_stats``), for the columns a
device holds (all of them on one device): per token the max ``m`` of the (soft-capped) logits
``z``, ``s = Σ_c e^(z_c − m)``, the target logit and the smoothing gap ``Σ_c w_c (m − z_c)``;
the loss is assembled from them in jnp (``_linear.assembly``: options written once), and
combined over vocabulary shards as the XLA blocks' are. ``jaxloss._linear.kernel_stats`` holds
their custom VJP.

- **Forward** (grid: token blocks ``i``, vocabulary blocks ``j``, ``j`` innermost). Per block
  ``z = cap(h_i k_j)``, an online max and rescaled exp-sum (Milakov & Gimelshein 2018), the
  target logit, the gap, and — when differentiated — flash-attention style ``r_i ← r_i ·
  e^(m_old − m_new) + (e^(z − m_new) · cap') k_jᵀ``, held in the output block itself (its index
  does not change with ``j``: written once), divided by ``s`` at the last ``j``: the log-sum's
  gradient ``Σ_c p_c cap'_c k_c``. Two matmuls; the kernel is re-fetched once per token block.
  With ``soft_cap`` and smoothing a second accumulator ``Σ_c w_c cap'_c k_c`` (the gap's).
- **Backward** (grid: vocabulary blocks ``j``, token blocks ``i``, ``i`` innermost). Recompute
  ``z``, form ``G = (g_s p − g_t [c = y] − g_w w) ⊙ cap'`` from the per-token cotangents of the
  log-sum, target logit and gap, and accumulate ``∂K_j += h_iᵀ G`` in a VMEM scratch, written
  once per ``j``. Two matmuls; ``h`` re-fetched once per vocabulary block.

Three matmuls would need the ``N×V`` logits stored, or a ``D×V`` float32 accumulator read and
written per token block (1 GiB at D=2048, V=131072): over the 512 MiB budget either way.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxloss import _implementations
from jaxloss._blockwise.blocks import struct_varying_like

# Scoped VMEM asked of Mosaic: within v5e's and v6e's 128 MiB and v5p's 95 MiB; the blocks are
# sized to VMEM_BLOCK_BUDGET by :func:`vmem_bytes`' estimate.
# Tests set this to True (or a ``pltpu.InterpretParams``) to run the kernels on CPU through the
# public API (``linear_cross_entropy(..., implementation="pallas")``); clear JAX's caches around.
INTERPRET: bool | object = False
VMEM_LIMIT = 96 * 2**20 * 2 // 3
VMEM_BLOCK_BUDGET = 48 * 2**20
# Token × vocabulary blocks, the largest first. The forward re-fetches the kernel once per token
# block, the backward ``hidden`` once per vocabulary block: at N=8192, D=2048, V=131072 in bf16
# 1024-token blocks re-read K 8 times (4 GiB, 1.6 ms at v5p's 2.765 TB/s), 1024-class blocks
# re-read h 128 times (4 GiB): under the 19 ms of each kernel's two matmuls. Modelled
# value_and_grad of the mean there (benchmarks/hlo.py, kernels priced from their grids): v5p
# 38.55 ms bf16 / 38.64 ms f32 (19.16 ms per kernel, compute-bound; 1.24x / 1.27x the
# materialised 31.1 / 30.3 ms), v5e 90.0 / 90.2 ms; temporaries 104 / 136 MiB (v5p). With
# soft_cap and label smoothing (a second sum, five matmuls): 48.15 / 48.25 ms, 168 / 200 MiB.
FORWARD_BLOCKS = ((1024, 512), (512, 512), (256, 512), (128, 256))
BACKWARD_BLOCKS = ((512, 1024), (256, 1024), (256, 512), (128, 256))
# Per-row inputs of the backward kernel: lse, the cotangents of the log-sum, of the target logit
# (negated) and of the gap, live. Per-row outputs of the forward: max, exp-sum, target logit, gap.
BACKWARD_ROWS = 5
STATS = 4


class Options(NamedTuple):
    """Static options of one kernel (hashable)."""

    smoothing: bool  # the gap is needed
    soft_cap: bool
    class_weight: bool  # per-class weights needed in the kernel (with smoothing)
    with_grad: bool = False
    # The columns before the SMEM scalar ``first`` are another device's (the last shard of an
    # uneven vocabulary split, slid back over its neighbour's columns).
    from_column: bool = False


@dataclasses.dataclass(frozen=True)
class Blocks:
    """``(token, vocabulary)`` block sizes of the forward and the backward kernel."""

    forward: tuple[int, int]
    backward: tuple[int, int]


def _clip(size: int, block: int) -> int:
    # A block larger than its array becomes the whole array (a legal block of any size).
    return size if size <= block else block


def vmem_bytes(rows: int, cols: int, features: int, dtype, forward: bool, sums: int = 1) -> int:
    """Estimated VMEM of one kernel's step: double-buffered blocks, f32 accumulators and ~6
    ``rows × cols`` float32 temporaries (logits, exponentials, masks); ``sums``: the forward's
    float32 ``rows × D`` outputs (2 with ``soft_cap`` and smoothing)."""
    item = jnp.dtype(dtype).itemsize
    h, k = rows * features, features * cols
    if forward:  # h in, K in, the f32 sums out (each its own accumulator)
        blocks = 2 * h * item + 2 * k * item + 2 * sums * h * 4
    else:  # h in, K in, dK out, f32 accumulator
        blocks = 2 * h * item + 2 * k * item + 2 * k * item + k * 4
    return blocks + 6 * rows * cols * 4


def choose_blocks(tokens: int, features: int, classes: int, dtype, sums: int = 2) -> Blocks | None:
    """The largest blocks within the VMEM budget (None when none fits: a huge ``D``; the
    backward kernel's bound, D ≈ 13,800, is the forward's with two sums)."""

    def pick(candidates, forward):
        for rows, cols in candidates:
            rows, cols = _clip(tokens, rows), _clip(classes, cols)
            if vmem_bytes(rows, cols, features, dtype, forward, sums) <= VMEM_BLOCK_BUDGET:
                return rows, cols
        return None

    fwd, bwd = pick(FORWARD_BLOCKS, True), pick(BACKWARD_BLOCKS, False)
    return None if fwd is None or bwd is None else Blocks(fwd, bwd)


def supported(
    hidden_shape,
    kernel_shape,
    dtype,
    kernel_dtype=None,
    *,
    bias: bool = False,
    probabilities: bool = False,
    return_stats: bool = False,
) -> bool:
    """Whether the kernels take ``hidden (N, D)``, ``kernel (D, V)`` of ``dtype`` (float32 or
    bfloat16, both the same): index targets, no bias, no argmax/entropy statistics; every other
    option (class weights, ignore_index, label smoothing, z-loss, soft-cap). Else: the XLA form.
    """
    kernel_dtype = dtype if kernel_dtype is None else kernel_dtype
    if bias or probabilities or return_stats or len(hidden_shape) != 2 or len(kernel_shape) != 2:
        return False
    (n, d), (d2, v) = hidden_shape, kernel_shape
    dtypes = jnp.dtype(dtype) == jnp.dtype(kernel_dtype)
    dtypes = dtypes and jnp.dtype(dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
    sizes = n > 0 and d > 0 and v > 0 and d == d2
    return dtypes and sizes and choose_blocks(n, d, v, dtype) is not None


# ----------------------------------------------------------------------------------------------
# In-kernel pieces
# ----------------------------------------------------------------------------------------------


def _finite_or_zero(m):
    return jnp.where(jnp.isfinite(m), m, 0.0)


def _column_ids(j, cols: int):
    return j * cols + jax.lax.broadcasted_iota(jnp.int32, (1, cols), 1)


def _live_columns(ids, sc, classes: int, opts: Options):
    """Which columns of the block are the device's classes (``None``: all of them)."""
    live = None if classes % ids.shape[1] == 0 else ids < classes
    if opts.from_column:
        mine = ids.astype(jnp.float32) >= sc[1]
        live = mine if live is None else live & mine
    return live


def _live_kernel(k, ids, classes: int):
    """The kernel block with the columns past ``V`` zeroed (they hold whatever HBM held)."""
    return k if classes % k.shape[1] == 0 else jnp.where(ids < classes, k, 0)


def logits(h, k, cap, opts: Options):
    """``(z, cap')``: the (soft-capped) logits of a block in float32 and the cap's slope."""
    u = jnp.dot(h, k, preferred_element_type=jnp.float32)
    if not opts.soft_cap:
        return u, None
    t = jnp.tanh(u / cap)
    return cap * t, 1 - t * t


def _dot_nt(a, b):
    """``a bᵀ`` contracting both operands' last axes, accumulated in float32."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):
    """``aᵀ b`` contracting both operands' first axes, accumulated in float32."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------------------------
# Forward kernel: statistics per token and (when differentiated) ∂ℓ/∂h
# ----------------------------------------------------------------------------------------------


def _split_forward_refs(refs, opts: Options):
    refs = list(refs)
    stats = refs.pop(0)
    dh = refs.pop(0) if opts.with_grad else None
    bacc = refs.pop(0) if _two_sums(opts) else None
    return stats, dh, bacc, refs  # refs: m, s, target logit, gap, mass


def _two_sums(opts: Options) -> bool:
    return opts.with_grad and opts.soft_cap and opts.smoothing


def _forward_kernel(sc, h_ref, k_ref, y_ref, cw_ref, *refs, opts, classes):
    stats_ref, dh_ref, bacc_ref, accs = _split_forward_refs(refs, opts)
    m_ref, s_ref, t_ref, gap_ref, mass_ref = accs
    j = pl.program_id(1)
    cols = k_ref.shape[1]

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        for ref in (s_ref, t_ref, gap_ref, mass_ref, dh_ref, bacc_ref):
            if ref is not None:
                ref[...] = jnp.zeros(ref.shape, ref.dtype)

    ids = _column_ids(j, cols)
    live = _live_columns(ids, sc, classes, opts)
    k = _live_kernel(k_ref[...], ids, classes)
    z, slope = logits(h_ref[...], k, sc[0], opts)
    if live is not None:
        z = jnp.where(live, z, -jnp.inf)
    else:
        live = jnp.ones(ids.shape, jnp.bool_)
    m_old = m_ref[...]
    m_new = jnp.maximum(m_old, jnp.max(z, axis=1, keepdims=True))
    shift_old, shift_new = _finite_or_zero(m_old), _finite_or_zero(m_new)
    alpha = jnp.where(m_old == -jnp.inf, 0.0, jnp.exp(shift_old - shift_new))
    e = jnp.exp(z - shift_new)
    s_ref[...] = alpha * s_ref[...] + jnp.sum(e, axis=1, keepdims=True)
    # (A class past V may name a padding column: another shard's target, or a bad one.)
    hit = (ids == y_ref[...]) & live
    t_ref[...] += jnp.sum(jnp.where(hit, z, 0.0), axis=1, keepdims=True)
    m_ref[...] = m_new
    w = cw_ref[...] if opts.class_weight else 1.0
    if opts.smoothing:
        gap = jnp.where(live, w * (shift_new - z), 0.0)
        mass = mass_ref[...]
        gap_ref[...] += mass * (shift_new - shift_old) + jnp.sum(gap, axis=1, keepdims=True)
        mass_ref[...] = mass + jnp.sum(jnp.where(live, w, 0.0), axis=1, keepdims=True)
    if dh_ref is not None:
        p = e if slope is None else e * slope
        dh_ref[...] = alpha * dh_ref[...] + _dot_nt(p.astype(k.dtype), k)
        if bacc_ref is not None and slope is not None:
            b = jnp.where(live, w * slope, 0.0)
            bacc_ref[...] += _dot_nt(b.astype(k.dtype), k)

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        stats_ref[...] = jnp.concatenate([m_ref[...], s_ref[...], t_ref[...], gap_ref[...]], 1)
        if dh_ref is not None:
            dh_ref[...] = dh_ref[...] / s_ref[...]


def forward(hidden, kernel, y, scalars, class_weight, *, opts: Options, blocks, interpret):
    """``(stats (N, 4) float32: max, exp-sum, target logit, gap)``, with ``opts.with_grad`` also
    ``Σ_c p_c cap'_c k_c`` and, with ``soft_cap`` and smoothing, ``Σ_c w_c cap'_c k_c`` (each
    (N, D) float32, ``p`` the softmax over these columns); module doc.

    ``y``: ``(N,)`` int32 (a class outside ``[0, V)`` hits no column); ``scalars``: ``(2,)``
    float32 (the cap, 1 without; the first column of the device's own, ``opts.from_column``);
    ``class_weight``: ``(1, V)`` float32 when ``opts.class_weight``.
    """
    (n, d), v = hidden.shape, kernel.shape[1]
    bn, bv = _clip(n, blocks[0]), _clip(v, blocks[1])
    grid = (pl.cdiv(n, bn), pl.cdiv(v, bv))
    rows_of = lambda width: pl.BlockSpec((bn, width), lambda i, j: (i, 0))
    cw_spec = _class_weight_spec(class_weight, bv, lambda i, j: (0, j))
    out_shape = [struct_varying_like((n, STATS), jnp.float32, hidden)]
    out_specs = [rows_of(STATS)]
    for _ in range(opts.with_grad + _two_sums(opts)):
        out_shape.append(struct_varying_like((n, d), jnp.float32, hidden))
        out_specs.append(rows_of(d))
    scratch = [pltpu.VMEM((bn, 1), jnp.float32) for _ in range(5)]
    outs = pl.pallas_call(
        functools.partial(_forward_kernel, opts=opts, classes=v),
        out_shape=out_shape,
        grid=grid,
        in_specs=[
            pl.BlockSpec(memory_space=pltpu.SMEM),
            rows_of(d),
            pl.BlockSpec((d, bv), lambda i, j: (0, j)),
            rows_of(1),
            cw_spec,
        ],
        out_specs=out_specs,
        scratch_shapes=scratch,
        compiler_params=_params(),
        interpret=interpret,
        name="jaxloss_linear_forward",
    )(scalars, hidden, kernel, y[:, None], _class_weight_array(class_weight))
    return tuple(outs)


def _class_weight_spec(class_weight, bv: int, index_map):
    # Without per-class weights in the kernel a one-tile placeholder is fetched once.
    if class_weight is None:
        return pl.BlockSpec((1, 128), lambda *_: (0, 0))
    return pl.BlockSpec((1, bv), index_map)


def _class_weight_array(class_weight):
    return jnp.zeros((1, 128), jnp.float32) if class_weight is None else class_weight


def _params():
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "arbitrary"), vmem_limit_bytes=VMEM_LIMIT
    )


# ----------------------------------------------------------------------------------------------
# Backward kernel: ∂K
# ----------------------------------------------------------------------------------------------


def _backward_kernel(sc, h_ref, k_ref, y_ref, row_ref, cw_ref, dk_ref, acc_ref, *, opts, sizes):
    tokens, classes = sizes
    i = pl.program_id(1)
    rows, cols = h_ref.shape[0], k_ref.shape[1]

    @pl.when(i == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)

    ids = _column_ids(pl.program_id(0), cols)
    row = row_ref[...]
    lse, ga, gy, ge = (row[:, f : f + 1] for f in range(4))
    # Ignored tokens, and rows and columns past the arrays' ends, are zeroed by a select (their
    # contents may be NaN) before they reach the matmuls.
    keep_rows = row[:, 4:5] > 0
    if tokens % rows:
        keep_rows &= i * rows + jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0) < tokens
    h = jnp.where(keep_rows, h_ref[...], 0)
    k = _live_kernel(k_ref[...], ids, classes)
    z, slope = logits(h, k, sc[0], opts)
    g = ga * jnp.exp(z - lse) - jnp.where(ids == y_ref[...], gy, 0.0)
    if opts.smoothing:
        g -= ge * (cw_ref[...] if opts.class_weight else 1.0)
    if slope is not None:
        g *= slope
    live = _live_columns(ids, sc, classes, opts)
    g = jnp.where(keep_rows if live is None else keep_rows & live, g, 0.0)
    acc_ref[...] += _dot_tn(h, g.astype(h.dtype))

    @pl.when(i == pl.num_programs(1) - 1)
    def _write():
        dk_ref[...] = acc_ref[...].astype(dk_ref.dtype)


def backward(hidden, kernel, y, rows, scalars, class_weight, *, opts: Options, blocks, interpret):
    """``∂K`` (D, V) in the kernel's dtype. ``rows``: ``(N, 5)`` float32 (the lse of these
    columns, the cotangents of the log-sum ``g_s``, of the target logit negated ``−g_t`` and of
    the gap ``g_w``, live); the rest as :func:`forward`'s."""
    (n, d), v = hidden.shape, kernel.shape[1]
    bn, bv = _clip(n, blocks[0]), _clip(v, blocks[1])
    rows_of = lambda width: pl.BlockSpec((bn, width), lambda j, i: (i, 0))
    k_spec = pl.BlockSpec((d, bv), lambda j, i: (0, j))
    return pl.pallas_call(
        functools.partial(_backward_kernel, opts=opts, sizes=(n, v)),
        out_shape=struct_varying_like((d, v), kernel.dtype, hidden),
        grid=(pl.cdiv(v, bv), pl.cdiv(n, bn)),
        in_specs=[
            pl.BlockSpec(memory_space=pltpu.SMEM),
            rows_of(d),
            k_spec,
            rows_of(1),
            rows_of(BACKWARD_ROWS),
            _class_weight_spec(class_weight, bv, lambda j, i: (0, j)),
        ],
        out_specs=k_spec,
        scratch_shapes=[pltpu.VMEM((d, bv), jnp.float32)],
        compiler_params=_params(),
        interpret=interpret,
        name="jaxloss_linear_backward",
    )(scalars, hidden, kernel, y[:, None], rows, _class_weight_array(class_weight))


class Static(NamedTuple):
    opts: Options
    blocks: Blocks
    interpret: Any  # False, True or a pltpu.InterpretParams (hashable)


def target_columns(kernel, y):
    """``kernel[:, y].T`` (N, D) as a gather of single elements: XLA:TPU gathers whole columns
    on its SparseCores from a column-major copy of the kernel (512 MiB and 0.39 ms on a v5p at
    D=2048, V=131072 in bf16); element by element it reads what it gathers (0.15 ms modelled),
    a few tokens at a time: the index arrays are temporaries (at N=8192, D=2048 all at once
    they were 88 MiB of the 192 MiB of value_and_grad's on a v5p, now 104 MiB in all)."""
    n, d = y.shape[0], kernel.shape[0]
    step = max(1, min(n, TARGET_INDICES_PER_STEP // max(d, 1)))
    features = jax.lax.broadcasted_iota(jnp.int32, (step, d), 1)
    (ys,) = in_blocks(step, y)
    columns = jax.lax.map(lambda y_b: kernel[features, y_b[:, None]], ys)
    return columns.reshape(-1, d)[:n]


# Elements of the target columns gathered per step (their index arrays are the temporaries).
TARGET_INDICES_PER_STEP = 2**21


def kernel_times_weights(kernel, class_weight):
    """``K w`` (``Σ_c k_c`` without class weights) in float32."""
    hi = jax.lax.Precision.HIGHEST
    if class_weight is None:
        return jnp.sum(kernel, axis=1, dtype=jnp.float32)
    return jnp.dot(kernel.astype(jnp.float32), class_weight[0], precision=hi)


def run_kernel(static: Static, which: str, *arrays, weights):
    """The outputs (a list, ``None`` dropped) of the ``"forward"`` or ``"backward"`` kernel of
    ``static.opts`` where Mosaic may lower it, else of its reference in jnp
    (``_implementations.guarded``): a program that XLA partitions over several devices, or one
    for another backend, runs the kernels' formulas, not Mosaic's error. Interpret mode (tests)
    runs the kernel. ``arrays``: the kernel's before the class weights."""
    fn, reference = (
        (forward, forward_reference) if which == "forward" else (backward, backward_reference)
    )
    blocks = static.blocks.forward if which == "forward" else static.blocks.backward
    kernel = functools.partial(fn, opts=static.opts, blocks=blocks, interpret=static.interpret)
    reference = functools.partial(reference, opts=static.opts)
    absent = weights is None
    if static.interpret:
        out = kernel(*arrays, weights)
        return [x for x in (out if isinstance(out, tuple) else (out,)) if x is not None]

    def call(fn):
        def run(*args):
            *arrays, cw = args
            out = fn(*arrays, None if absent else cw)
            return [x for x in (out if isinstance(out, tuple) else (out,)) if x is not None]

        return run

    args = (*arrays, _class_weight_array(weights))
    return _implementations.guarded(call(kernel), call(reference), *args)


def in_blocks(step: int, *arrays):
    """``arrays`` (of one length) padded with zeros to a multiple of ``step`` and split into
    ``[blocks, step, ...]``."""
    pad = -arrays[0].shape[0] % step
    padded = [jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) for x in arrays]
    return [x.reshape(-1, step, *x.shape[1:]) for x in padded]


def forward_reference(hidden, kernel, y, scalars, class_weight, *, opts: Options):
    """:func:`forward`'s outputs in jnp, a few tokens at a time over the whole vocabulary."""
    n, v = hidden.shape[0], kernel.shape[1]
    w = class_weight if opts.class_weight else 1.0

    ids = jax.lax.broadcasted_iota(jnp.int32, (1, v), 1)
    live = _live_columns(ids, scalars, v, opts)

    def block(args):
        h, y_b = args
        z, slope = logits(h, kernel, scalars[0], opts)
        if live is not None:
            z = jnp.where(live, z, -jnp.inf)
        m = jnp.max(z, axis=1, keepdims=True)
        e = jnp.exp(z - _finite_or_zero(m))
        s = jnp.sum(e, axis=1, keepdims=True)
        mine = True if live is None else live
        tgt = jnp.sum(jnp.where((ids == y_b) & mine, z, 0.0), axis=1, keepdims=True)
        gap = jnp.zeros_like(m)
        if opts.smoothing:
            gap = jnp.sum(jnp.where(mine, w * (_finite_or_zero(m) - z), 0.0), 1, keepdims=True)
        out = [jnp.concatenate([m, s, tgt, gap], axis=1)]
        if opts.with_grad:
            p = e if slope is None else e * slope
            out.append(_dot_nt(p.astype(kernel.dtype), kernel) / s)
        if _two_sums(opts) and slope is not None:
            b = jnp.where(mine, jnp.broadcast_to(w * slope, z.shape), 0.0)
            out.append(_dot_nt(b.astype(kernel.dtype), kernel))
        return tuple(out)

    step = max(1, min(n, XLA_LOGITS_PER_STEP // v))
    outs = jax.lax.map(block, tuple(in_blocks(step, hidden, y[:, None])))
    return tuple(x.reshape(-1, x.shape[-1])[:n] for x in outs)


def backward_reference(hidden, kernel, y, rows, scalars, class_weight, *, opts: Options):
    """:func:`backward`'s ``∂K`` in jnp, a few classes at a time over all tokens."""
    (n, d), v = hidden.shape, kernel.shape[1]
    lse, ga, gy, ge = (rows[:, f : f + 1] for f in range(4))
    keep_rows = rows[:, 4:5] > 0
    h = jnp.where(keep_rows, hidden, 0)
    step = max(1, min(v, XLA_LOGITS_PER_STEP // max(n, 1)))
    columns = [kernel.T] + ([class_weight[0]] if opts.class_weight else [])
    columns = in_blocks(step, *columns)

    def block(args):
        j, k_t, *cw = args
        ids = j * step + jax.lax.broadcasted_iota(jnp.int32, (1, step), 1)
        z, slope = logits(h, k_t.T, scalars[0], opts)
        g = ga * jnp.exp(z - lse) - jnp.where(ids == y[:, None], gy, 0.0)
        if opts.smoothing:
            g -= ge * (cw[0][None] if cw else 1.0)
        if slope is not None:
            g *= slope
        live = _live_columns(ids, scalars, v, opts)
        g = jnp.where(keep_rows & (ids < v) & (True if live is None else live), g, 0.0)
        return _dot_tn(h, g.astype(h.dtype))

    dk = jax.lax.map(block, (jnp.arange(columns[0].shape[0]), *columns))
    return jnp.moveaxis(dk, 0, 1).reshape(d, -1)[:, :v].astype(kernel.dtype)


# Rows of logits per step of the references: 2^24 logits (64 MiB of float32) at a time.
XLA_LOGITS_PER_STEP = 2**24


# ----------------------------------------------------------------------------------------------
# The linear head's problems (``chunked.Problem``, ``assembly.Options``) through the kernels
# ----------------------------------------------------------------------------------------------


def takes(p) -> bool:
    """Whether the kernels take the linear head's problem ``p`` (a ``chunked.Problem``)."""
    return supported(
        p.hidden.shape, p.kernel.shape, p.hidden.dtype, p.kernel.dtype, bias=p.bias is not None,
        probabilities=p.labels is None, return_stats=p.with_stats,
    )  # fmt: skip


def check_takes(fn: str, p) -> None:
    """``implementation="pallas"``: a ``ValueError`` where the kernels do not take ``p``."""
    if not takes(p):
        raise ValueError(
            f"{fn}: implementation='pallas': the Pallas TPU kernels take index targets, no bias, "
            "no return_stats, hidden and kernel both float32 or both bfloat16; got hidden "
            f"{p.hidden.dtype}, kernel {p.kernel.dtype}, bias={p.bias is not None}, probability "
            f"targets={p.labels is None}, return_stats={p.with_stats}. Use implementation=None "
            "or 'xla' (the XLA form)"
        )
