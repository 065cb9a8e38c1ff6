"""``linear_cross_entropy`` of index targets as two Pallas TPU kernels: four ``N·D·V`` matmuls,
every accumulator in VMEM, the logits never in HBM.

The loss of token ``n`` needs its log-sum-exp ``lse_n``, known only once all ``V`` classes are
seen; its gradient ``∂ℓ_n/∂z_{n,c} = a_n p_{n,c} − b_{n,c}`` (``p = softmax``, ``a``, ``b`` below)
needs it for every class. So:

- **Forward** (grid: token blocks ``i``, vocabulary blocks ``j``, ``j`` innermost). Per block
  ``z = cap(h_i k_j)``, an online max and rescaled exp-sum (Milakov & Gimelshein 2018), the
  target logit, the smoothing gap ``Σ_c w_c (m − z_c)``, and — when differentiated — the hidden
  gradient flash-attention style: ``acc_i ← acc_i·e^(m_old − m_new) + (e^(z − m_new)·cap') k_jᵀ``,
  held in the output block itself (its index does not change with ``j``: written once). At the
  last ``j``: ``∂ℓ_n/∂h_n = (a_n / s_n) acc_n − (the terms of b that need no softmax)``. Two
  matmuls; the kernel is re-fetched once per token block, ``h`` once.
- **Backward** (grid: vocabulary blocks ``j``, token blocks ``i``, ``i`` innermost). Recompute
  ``z``, form ``G = g ⊙ (a p − b) ⊙ cap'`` with the per-token cotangents ``g`` and accumulate
  ``∂K_j += h_iᵀ G`` in a VMEM scratch, written once per ``j``. Two matmuls; ``h`` re-fetched
  once per vocabulary block, the kernel once.

Three matmuls would need the ``N×V`` logits stored, or a ``D×V`` float32 accumulator read and
written per token block (1 GiB at D=2048, V=131072): over the 512 MiB budget either way.

With ``W = Σ_c w_c`` (``V`` without class weights), smoothing ε, z-loss λ, ``cap(x) = c tanh(x/c)``
(the identity without ``soft_cap``), PyTorch's ``cross_entropy`` per token (valid targets)::

    ℓ = (1−ε) w_y (log s − (z_y − m)) + ε/V (Σ_c w_c (m − z_c) + W log s) + λ lse²
    a = (1−ε) w_y + ε W / V + 2 λ lse,     b_c = (1−ε) w_y [c = y] + ε w_c / V

The ``b`` terms that need no softmax are applied outside the kernels, in the backward pass with
the cotangent: the target column ``(1−ε) w_y cap'_y k_y`` (a gather of ``N`` columns) and, without
``soft_cap``, ``ε/V · K w`` (one matrix-vector product); with ``soft_cap`` the latter depends on
the token (through ``cap'``) and takes a second accumulator in the forward kernel (five matmuls).

The cotangents of everything but ``hidden`` and ``kernel`` (class weights, ε, λ, the cap) come
from autodiff of the XLA form (:func:`xla_rows`); XLA removes that computation where they are
not used (the public API stops the hyperparameters' gradients anyway).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxloss import _implementations, _targets
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
# 38.55 ms bf16 / 38.59 ms f32 (19.16 ms per kernel, compute-bound; 1.24x / 1.27x the
# materialised 31.1 / 30.3 ms), v5e 90.0 / 90.2 ms; temporaries 192 / 212 MiB (v5p).
FORWARD_BLOCKS = ((1024, 512), (512, 512), (256, 512), (128, 256))
BACKWARD_BLOCKS = ((512, 1024), (256, 1024), (256, 512), (128, 256))
# Per-row inputs: forward (target weight w_y, valid, bad); backward (lse, g·a, g·(1−ε)·w_y,
# g·ε/V, live). Per-row outputs of the forward: loss, lse, a, target logit.
FORWARD_ROWS = 3
BACKWARD_ROWS = 5
STATS = 4
# Scalars (SMEM): ε, λ, cap, Σ_c w_c.
SCALARS = 4


class Options(NamedTuple):
    """Static options of one kernel (hashable)."""

    smoothing: bool
    z_loss: bool
    soft_cap: bool
    class_weight: bool  # per-class weights needed in the kernel (with smoothing)
    with_grad: bool = False
    # The forward kernel's raw statistics of its columns (max, exp-sum, target logit, gap) and
    # ``Σ_c p_c cap'_c k_c`` (and ``Σ_c w_c cap'_c k_c``) for a vocabulary shard
    # (jaxloss._linear.kernel_stats), instead of the losses and ``∂ℓ/∂h`` of the whole row.
    raw: bool = False


@dataclasses.dataclass(frozen=True)
class Blocks:
    """``(token, vocabulary)`` block sizes of the forward and the backward kernel."""

    forward: tuple[int, int]
    backward: tuple[int, int]


def _clip(size: int, block: int) -> int:
    # A block larger than its array becomes the whole array (a legal block of any size).
    return size if size <= block else block


def vmem_bytes(rows: int, cols: int, features: int, dtype, forward: bool) -> int:
    """Estimated VMEM of one kernel's step: double-buffered blocks, f32 accumulators and ~6
    ``rows × cols`` float32 temporaries (logits, exponentials, masks)."""
    item = jnp.dtype(dtype).itemsize
    h, k = rows * features, features * cols
    if forward:  # h in, K in, f32 gradient out (the accumulator), a second accumulator
        blocks = 2 * h * item + 2 * k * item + 3 * h * 4
    else:  # h in, K in, dK out, f32 accumulator
        blocks = 2 * h * item + 2 * k * item + 2 * k * item + k * 4
    return blocks + 6 * rows * cols * 4


def choose_blocks(tokens: int, features: int, classes: int, dtype) -> Blocks | None:
    """The largest blocks within the VMEM budget (None when none fits: a huge ``D``)."""

    def pick(candidates, forward):
        for rows, cols in candidates:
            rows, cols = _clip(tokens, rows), _clip(classes, cols)
            if vmem_bytes(rows, cols, features, dtype, forward) <= VMEM_BLOCK_BUDGET:
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
    bacc = None
    if opts.with_grad and opts.soft_cap and opts.smoothing:  # an output when raw, else scratch
        bacc = refs.pop(0) if opts.raw else refs.pop()
    return stats, dh, bacc, refs  # refs: m, s, target logit, gap, mass


def _forward_kernel(sc, h_ref, k_ref, y_ref, row_ref, cw_ref, *refs, opts, classes):
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
    live = ids < classes
    k = _live_kernel(k_ref[...], ids, classes)
    z, slope = logits(h_ref[...], k, sc[2], opts)
    if classes % cols:
        z = jnp.where(live, z, -jnp.inf)
    m_old = m_ref[...]
    m_new = jnp.maximum(m_old, jnp.max(z, axis=1, keepdims=True))
    shift_old, shift_new = _finite_or_zero(m_old), _finite_or_zero(m_new)
    alpha = jnp.where(m_old == -jnp.inf, 0.0, jnp.exp(shift_old - shift_new))
    e = jnp.exp(z - shift_new)
    s_ref[...] = alpha * s_ref[...] + jnp.sum(e, axis=1, keepdims=True)
    t_ref[...] += jnp.sum(jnp.where(ids == y_ref[...], z, 0.0), axis=1, keepdims=True)
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
        _forward_finish(sc, row_ref, stats_ref, dh_ref, bacc_ref, accs, opts, classes)


def _forward_finish(sc, row_ref, stats_ref, dh_ref, bacc_ref, acc_refs, opts, classes):
    """Per-token loss, lse, gradient factor ``a``, target logit; ``∂ℓ/∂h`` up to the terms
    applied outside (module doc)."""
    m_ref, s_ref, t_ref, gap_ref, _ = acc_refs
    if opts.raw:
        stats_ref[...] = jnp.concatenate([m_ref[...], s_ref[...], t_ref[...], gap_ref[...]], 1)
        if dh_ref is not None:
            dh_ref[...] = dh_ref[...] / s_ref[...]
        return
    row = row_ref[...]
    valid = row[:, 1:2] > 0
    s, tgt = s_ref[...], t_ref[...]
    stats = (m_ref[...], s, tgt, gap_ref[...])
    loss, lse, a = row_terms(stats, (row[:, 0:1], valid, row[:, 2:3] > 0), sc, opts, classes)
    stats_ref[...] = jnp.concatenate([loss, lse, a, tgt], axis=1)
    if dh_ref is not None:
        dh = (a / s) * dh_ref[...]
        if bacc_ref is not None:
            dh -= sc[0] / classes * bacc_ref[...]
        dh_ref[...] = jnp.where(valid, dh, 0.0)


def row_terms(stats, row, sc, opts: Options, classes: int):
    """``(loss, lse, a)`` per token from its max ``m``, exp-sum ``s`` (relative to the finite
    part of ``m``), target logit and smoothing gap; ``row``: target weight, valid, bad (bool).
    ``a`` is NaN at a bad target and 0 where the target is ignored. The kernel and
    :func:`xla_rows` share it."""
    m, s, tgt, gap = stats
    w, valid, bad = row
    eps, lam, total = sc[0], sc[1], sc[3]
    shift = _finite_or_zero(m)
    log_s = jnp.log(s)
    lse = shift + log_s
    # The loss reads log s as NaN where the max is not finite (cross_entropy's +inf − +inf).
    log_s_loss = jnp.where(valid, jnp.where(jnp.isfinite(m), log_s, jnp.nan), 0.0)
    target = jnp.where(valid, tgt - shift, 0.0)
    keep = 1 - eps if opts.smoothing else 1.0
    loss = keep * w * (log_s_loss - target)
    a = keep * w
    if opts.smoothing:
        loss += eps / classes * (jnp.where(valid, gap, 0.0) + total * log_s_loss)
        a += eps * total / classes
    if opts.z_loss:
        loss += lam * jnp.where(valid, shift + log_s_loss, 0.0) ** 2
        a += 2 * lam * lse
    loss = jnp.where(bad, jnp.nan, jnp.where(valid, loss, 0.0))
    a = jnp.where(bad, jnp.nan, jnp.where(valid, a, 0.0))
    return loss, lse, a


def forward(hidden, kernel, y, rows, scalars, class_weight, *, opts: Options, blocks, interpret):
    """``(stats (N, 4) float32, ∂ℓ/∂h partial (N, D) float32 or None)`` (module doc).

    ``y``: ``(N,)`` int32; ``rows``: ``(N, 3)`` float32 (w_y, valid, bad); ``scalars``: ``(4,)``
    float32 (ε, λ, cap, Σ w); ``class_weight``: ``(1, V)`` float32 when ``opts.class_weight``.
    ``opts.raw``: ``(stats (N, 4): max, exp-sum, target logit, gap)``, with ``opts.with_grad``
    also ``Σ_c p_c cap'_c k_c`` and, with ``soft_cap`` and smoothing, ``Σ_c w_c cap'_c k_c``
    (each (N, D) float32, ``p`` the softmax over these columns).
    """
    (n, d), v = hidden.shape, kernel.shape[1]
    bn, bv = _clip(n, blocks[0]), _clip(v, blocks[1])
    grid = (pl.cdiv(n, bn), pl.cdiv(v, bv))
    rows_of = lambda width: pl.BlockSpec((bn, width), lambda i, j: (i, 0))
    cw_spec = _class_weight_spec(class_weight, bv, lambda i, j: (0, j))
    out_shape = [struct_varying_like((n, STATS), jnp.float32, hidden)]
    out_specs = [rows_of(STATS)]
    two_accs = opts.with_grad and opts.soft_cap and opts.smoothing
    for _ in range(opts.with_grad + (two_accs and opts.raw)):
        out_shape.append(struct_varying_like((n, d), jnp.float32, hidden))
        out_specs.append(rows_of(d))
    scratch = [pltpu.VMEM((bn, 1), jnp.float32) for _ in range(5)]
    if two_accs and not opts.raw:
        scratch.append(pltpu.VMEM((bn, d), jnp.float32))
    outs = pl.pallas_call(
        functools.partial(_forward_kernel, opts=opts, classes=v),
        out_shape=out_shape,
        grid=grid,
        in_specs=[
            pl.BlockSpec(memory_space=pltpu.SMEM),
            rows_of(d),
            pl.BlockSpec((d, bv), lambda i, j: (0, j)),
            rows_of(1),
            rows_of(FORWARD_ROWS),
            cw_spec,
        ],
        out_specs=out_specs,
        scratch_shapes=scratch,
        compiler_params=_params(),
        interpret=interpret,
        name="jaxloss_linear_forward",
    )(scalars, hidden, kernel, y[:, None], rows, _class_weight_array(class_weight))
    return tuple(outs) if opts.raw else (outs[0], (outs[1] if opts.with_grad else None))


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
    z, slope = logits(h, k, sc[2], opts)
    g = ga * jnp.exp(z - lse) - jnp.where(ids == y_ref[...], gy, 0.0)
    if opts.smoothing:
        g -= ge * (cw_ref[...] if opts.class_weight else 1.0)
    if slope is not None:
        g *= slope
    keep = keep_rows & (ids < classes) if classes % cols else keep_rows
    g = jnp.where(keep, g, 0.0)
    acc_ref[...] += _dot_tn(h, g.astype(h.dtype))

    @pl.when(i == pl.num_programs(1) - 1)
    def _write():
        dk_ref[...] = acc_ref[...].astype(dk_ref.dtype)


def backward(hidden, kernel, y, rows, scalars, class_weight, *, opts: Options, blocks, interpret):
    """``∂K`` (D, V) in the kernel's dtype. ``rows``: ``(N, 5)`` float32 (lse, g·a, g·(1−ε)·w_y,
    g·ε/V, live); the rest as :func:`forward`'s."""
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


# ----------------------------------------------------------------------------------------------
# The entry point: per-token losses, differentiable in reverse mode
# ----------------------------------------------------------------------------------------------


class Static(NamedTuple):
    opts: Options
    blocks: Blocks
    interpret: Any  # False, True or a pltpu.InterpretParams (hashable)


def per_token_loss(
    hidden: jax.Array,
    kernel: jax.Array,
    targets: jax.Array,
    *,
    class_weight: jax.Array | None = None,
    ignore_index: int = -100,
    label_smoothing: Any = None,
    z_loss: Any = None,
    soft_cap: Any = None,
    interpret: Any = False,
    blocks: Blocks | None = None,
) -> jax.Array:
    """``cross_entropy(cap(hidden @ kernel), targets, reduction="none", ...)`` per token, float32.

    ``hidden (N, D)`` and ``kernel (D, V)`` of one dtype (float32 or bfloat16), ``targets (N,)``
    integers (``ignore_index``: loss 0, no gradient; out of ``[0, V)``: NaN, as in the XLA form),
    ``class_weight (V,)``; ``label_smoothing``, ``z_loss``, ``soft_cap``: None (absent) or a
    scalar. Reduce outside (``"mean"`` divides by the target weights, ``_targets.reduce``).
    Gradients of ``hidden`` and ``kernel`` come in their dtypes from the kernels; those of
    ``class_weight`` and the scalars from the XLA form. Check :func:`supported` first.
    ``blocks``: the block sizes (default :func:`choose_blocks`'), e.g. small ones in tests.
    """
    (n, d), v = hidden.shape, kernel.shape[1]
    if blocks is None:
        blocks = choose_blocks(n, d, v, hidden.dtype)
    assert blocks is not None, (hidden.shape, kernel.shape)  # callers check supported()
    smoothing = label_smoothing is not None
    if class_weight is not None:
        class_weight = class_weight.astype(jnp.float32)
    opts = Options(smoothing, z_loss is not None, soft_cap is not None,
                   class_weight is not None and smoothing)  # fmt: skip
    idx = _targets.index_targets(targets, v, ignore_index, class_weight, jnp.float32)
    flags = jnp.stack([idx.valid, idx.bad], axis=1).astype(jnp.float32)
    total = v if class_weight is None else jnp.sum(class_weight)
    values = (label_smoothing, z_loss, 1.0 if soft_cap is None else soft_cap, total)
    scalars = jnp.stack([jnp.asarray(0.0 if x is None else x, jnp.float32) for x in values])
    weights = class_weight[None] if opts.class_weight else None  # pyright: ignore[reportOptionalSubscript]
    y = jnp.asarray(targets, jnp.int32)
    return _per_token(Static(opts, blocks, interpret), hidden, kernel, y, idx.weight, flags,
                      weights, scalars)  # fmt: skip


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _per_token(static: Static, hidden, kernel, y, w, flags, class_weight, scalars):
    return _forward_rows(static, hidden, kernel, y, w, flags, class_weight, scalars, False)[0]


def _forward_rows(static, hidden, kernel, y, w, flags, class_weight, scalars, with_grad):
    static = static._replace(opts=static.opts._replace(with_grad=with_grad))
    rows = jnp.concatenate([w[:, None], flags], axis=1)
    stats, *dh = run_kernel(static, "forward", hidden, kernel, y, rows, scalars, class_weight)
    return stats[:, 0], stats, (dh[0] if dh else None)


def _per_token_fwd(static, hidden, kernel, y, w, flags, class_weight, scalars):
    args = (hidden, kernel, y, w, flags, class_weight, scalars)
    loss, stats, dh = _forward_rows(static, *args, True)
    return loss, (args, stats, dh)


def _per_token_bwd(static, residuals, g):
    args, stats, dh_part = residuals
    hidden, kernel, y, w, flags, class_weight, scalars = args
    opts, v = static.opts, kernel.shape[1]
    eps, cap = scalars[0], scalars[2]
    valid = flags[:, 0] > 0
    keep = 1 - eps if opts.smoothing else 1.0
    lse, a, tgt = stats[:, 1], stats[:, 2], stats[:, 3]
    ge = g * eps / v if opts.smoothing else jnp.zeros_like(g)
    rows = jnp.stack([lse, g * a, g * keep * w, jnp.where(valid, ge, 0), flags[:, 0]], axis=1)
    (dk,) = run_kernel(static, "backward", hidden, kernel, y, rows, scalars, class_weight)
    # ∂ℓ/∂h: the kernel's part, less the target column and (without a cap) the smoothing term.
    slope = 1 - (tgt / cap) ** 2 if opts.soft_cap else 1.0
    k_y = target_columns(kernel, jnp.clip(y, 0, v - 1)).astype(jnp.float32)
    dh = dh_part - (keep * w * slope)[:, None] * k_y
    if opts.smoothing and not opts.soft_cap:
        dh -= eps / v * kernel_times_weights(kernel, class_weight)[None]
    dh = jnp.where(valid[:, None], g[:, None] * dh, 0).astype(hidden.dtype)
    # Everything else from the XLA form (removed by XLA where those cotangents are unused).
    _, data_vjp = jax.vjp(
        lambda w, cw, sc: xla_rows(hidden, kernel, y, w, flags, cw, sc, opts), w, class_weight,
        scalars,
    )  # fmt: skip
    dw, dcw, dsc = data_vjp(g)
    return dh, dk, None, dw, jnp.zeros_like(flags), dcw, dsc


_per_token.defvjp(_per_token_fwd, _per_token_bwd)


def target_columns(kernel, y):
    """``kernel[:, y].T`` (N, D) as a gather of single elements: XLA:TPU gathers whole columns
    on its SparseCores from a column-major copy of the kernel (512 MiB and 0.39 ms on a v5p at
    D=2048, V=131072 in bf16); element by element it reads what it gathers (0.15 ms modelled,
    the N×D index arrays as temporaries)."""
    features = jax.lax.broadcasted_iota(jnp.int32, (y.shape[0], kernel.shape[0]), 1)
    return kernel[features, y[:, None]]


def kernel_times_weights(kernel, class_weight):
    """``K w`` (``Σ_c k_c`` without class weights) in float32."""
    hi = jax.lax.Precision.HIGHEST
    if class_weight is None:
        return jnp.sum(kernel, axis=1, dtype=jnp.float32)
    return jnp.dot(kernel.astype(jnp.float32), class_weight[0], precision=hi)


def run_kernel(static: Static, which: str, hidden, kernel_matrix, y, rows, scalars, weights):
    """The outputs (a list, ``None`` dropped) of the ``"forward"`` or ``"backward"`` kernel of
    ``static.opts`` where Mosaic may lower it, else of its reference in jnp
    (``_implementations.guarded``): a program that XLA partitions over several devices, or one
    for another backend, runs the kernels' formulas, not Mosaic's error. Interpret mode (tests)
    runs the kernel."""
    fn, reference = (
        (forward, forward_reference) if which == "forward" else (backward, backward_reference)
    )
    blocks = static.blocks.forward if which == "forward" else static.blocks.backward
    kernel = functools.partial(fn, opts=static.opts, blocks=blocks, interpret=static.interpret)
    reference = functools.partial(reference, opts=static.opts)
    absent = weights is None
    if static.interpret:
        out = kernel(hidden, kernel_matrix, y, rows, scalars, weights)
        return [x for x in (out if isinstance(out, tuple) else (out,)) if x is not None]

    def call(fn):
        def run(*args):
            *arrays, cw = args
            out = fn(*arrays, None if absent else cw)
            return [x for x in (out if isinstance(out, tuple) else (out,)) if x is not None]

        return run

    args = (hidden, kernel_matrix, y, rows, scalars, _class_weight_array(weights))
    return _implementations.guarded(call(kernel), call(reference), *args)


def in_blocks(step: int, *arrays):
    """``arrays`` (of one length) padded with zeros to a multiple of ``step`` and split into
    ``[blocks, step, ...]``."""
    pad = -arrays[0].shape[0] % step
    padded = [jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) for x in arrays]
    return [x.reshape(-1, step, *x.shape[1:]) for x in padded]


def forward_reference(hidden, kernel, y, rows, scalars, class_weight, *, opts: Options):
    """:func:`forward`'s outputs in jnp, a few tokens at a time over the whole vocabulary."""
    n, v = hidden.shape[0], kernel.shape[1]
    w = class_weight if opts.class_weight else 1.0

    def block(args):
        h, y_b, r_b = args
        z, slope = logits(h, kernel, scalars[2], opts)
        m = jnp.max(z, axis=1, keepdims=True)
        shift = _finite_or_zero(m)
        e = jnp.exp(z - shift)
        s = jnp.sum(e, axis=1, keepdims=True)
        hit = jax.lax.broadcasted_iota(jnp.int32, z.shape, 1) == y_b
        tgt = jnp.sum(jnp.where(hit, z, 0.0), axis=1, keepdims=True)
        gap = jnp.sum(w * (shift - z), axis=1, keepdims=True) if opts.smoothing else None
        if opts.raw:
            return _raw_reference(kernel, (m, s, tgt, gap), e, slope, w, opts)
        valid = r_b[:, 1:2] > 0
        row = (r_b[:, 0:1], valid, r_b[:, 2:3] > 0)
        loss, lse, a = row_terms((m, s, tgt, gap), row, scalars, opts, v)
        stats = jnp.concatenate([loss, lse, a, tgt], axis=1)
        if not opts.with_grad:
            return stats, None
        dh = (a / s) * _dot_nt((e if slope is None else e * slope).astype(kernel.dtype), kernel)
        if slope is not None and opts.smoothing:
            b = jnp.broadcast_to(w * slope, z.shape).astype(kernel.dtype)
            dh -= scalars[0] / v * _dot_nt(b, kernel)
        return stats, jnp.where(valid, dh, 0.0)

    step = max(1, min(n, XLA_LOGITS_PER_STEP // v))
    outs = jax.lax.map(block, tuple(in_blocks(step, hidden, y[:, None], rows)))
    flat = lambda x: None if x is None else x.reshape(-1, x.shape[-1])[:n]
    return tuple(flat(x) for x in outs) if opts.raw else (flat(outs[0]), flat(outs[1]))


def _raw_reference(kernel, stats, e, slope, w, opts: Options):
    """:func:`forward_reference`'s outputs of a block of tokens with ``opts.raw``."""
    m, s, tgt, gap = stats
    out = [jnp.concatenate([m, s, tgt, jnp.zeros_like(m) if gap is None else gap], axis=1)]
    if opts.with_grad:
        p = e if slope is None else e * slope
        out.append(_dot_nt(p.astype(kernel.dtype), kernel) / s)
    if opts.with_grad and opts.soft_cap and opts.smoothing:
        b = jnp.broadcast_to(w * slope, e.shape).astype(kernel.dtype)
        out.append(_dot_nt(b, kernel))
    return tuple(out)


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
        z, slope = logits(h, k_t.T, scalars[2], opts)
        g = ga * jnp.exp(z - lse) - jnp.where(ids == y[:, None], gy, 0.0)
        if opts.smoothing:
            g -= ge * (cw[0][None] if cw else 1.0)
        if slope is not None:
            g *= slope
        g = jnp.where(keep_rows & (ids < v), g, 0.0)
        return _dot_tn(h, g.astype(h.dtype))

    dk = jax.lax.map(block, (jnp.arange(columns[0].shape[0]), *columns))
    return jnp.moveaxis(dk, 0, 1).reshape(d, -1)[:, :v].astype(kernel.dtype)


# Rows of logits per step of the XLA form: 2^24 logits (64 MiB of float32) at a time.
XLA_LOGITS_PER_STEP = 2**24


def xla_rows(hidden, kernel, y, w, flags, class_weight, scalars, opts: Options):
    """:func:`per_token_loss`'s losses in plain jnp, a few thousand tokens at a time (each
    block rematerialised in the backward pass): the formulas of the kernels, for the cotangents
    they do not give."""
    n, v = hidden.shape[0], kernel.shape[1]
    rows = max(1, min(n, XLA_LOGITS_PER_STEP // v))
    pad = -n % rows
    blocks = [jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) for x in (hidden, y, w, flags)]
    blocks = [x.reshape(-1, rows, *x.shape[1:]) for x in blocks]

    @jax.checkpoint
    def block(args):
        h, y_b, w_b, f_b = args
        z = jnp.dot(h, kernel, preferred_element_type=jnp.float32)
        if opts.soft_cap:
            z = scalars[2] * jnp.tanh(z / scalars[2])
        m = jax.lax.stop_gradient(jnp.max(z, axis=1, keepdims=True))
        shift = _finite_or_zero(m)
        s = jnp.sum(jnp.exp(z - shift), axis=1, keepdims=True)
        tgt = jnp.sum(
            jnp.where(jnp.arange(v)[None, :] == y_b[:, None], z, 0), axis=1, keepdims=True
        )
        cw = 1.0 if class_weight is None else class_weight
        gap = jnp.sum(cw * (shift - z), axis=1, keepdims=True) if opts.smoothing else None
        row = (w_b[:, None], f_b[:, :1] > 0, f_b[:, 1:2] > 0)
        return row_terms((m, s, tgt, gap), row, scalars, opts, v)[0][:, 0]

    return jax.lax.map(block, tuple(blocks)).reshape(-1)[:n]


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


def problem_losses(p, options, hyper) -> tuple[jax.Array, jax.Array]:
    """``(per-token losses, per-token target weights)`` of ``p`` (``takes(p)``), float32: the
    weights sum to the ``"mean"`` divisor."""
    present = (options.smoothing, options.z_loss)
    smoothing, z_loss = (x if on else None for x, on in zip(hyper, present, strict=True))
    losses = per_token_loss(
        p.hidden, p.kernel, p.labels, class_weight=p.class_weight,
        ignore_index=options.ignore_index, label_smoothing=smoothing, z_loss=z_loss,
        soft_cap=p.soft_cap, interpret=INTERPRET,
    )  # fmt: skip
    v = p.kernel.shape[1]
    idx = _targets.index_targets(p.labels, v, options.ignore_index, p.class_weight, jnp.float32)
    return losses, idx.weight
