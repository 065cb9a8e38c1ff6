"""Cross-entropy of a linear layer's logits without materialising them (large vocabularies).

The logits ``z = hidden @ kernel + bias`` of a language-model head are ``N × V`` numbers — 4 GiB
in float32 at ``N = 8192`` tokens and ``V = 131072`` classes — yet the loss needs only three
numbers per token: ``logsumexp(z_n)``, the target logit ``z_{n, y_n}`` and, for label smoothing,
``Σ_c w_c z_{n,c}``. ``linear_cross_entropy`` computes these block by block (an online
logsumexp over vocabulary chunks, for each chunk of tokens), and its ``custom_vjp`` recomputes
each logit block in the backward pass instead of storing it, so that nothing of size ``N × V``
ever exists. Everything per token (ignore mask, class weights, smoothing, z-loss, reduction) is
assembled from those ``O(N)`` statistics with ordinary JAX, so it follows
``jaxloss.cross_entropy`` exactly and is differentiated by ordinary autodiff.

Blocks that do not divide evenly are handled without padding (which would copy the kernel): the
last chunk is slid back to end at the array's edge and the rows or columns it shares with the
previous chunk are masked out.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec
from jaxtyping import Array, ArrayLike, Float, Int

from jaxloss import _common
from jaxloss._classification import _ignored

_FN = "linear_cross_entropy"

# Tuned on a 2-core x86 CPU at N=2048, D=512, V=32768: every block matmul already runs at the
# speed of one big matmul there, and the temporaries stay ~44 MiB at N=8192, D=2048, V=131072
# (f32); larger blocks only cost memory. GPUs and TPUs may prefer larger chunks.
DEFAULT_TOKEN_CHUNK = 1024
DEFAULT_VOCAB_CHUNK = 1024


# ----------------------------------------------------------------------------------------------
# Blockwise kernels
# ----------------------------------------------------------------------------------------------


class _Chunk(NamedTuple):
    """One chunk along an axis of static length ``size``, cut into chunks of static ``width``.

    ``start`` is where the chunk is read from: ``index * width``, except for a short last chunk,
    which is slid back to ``size - width`` so that every read has the static width. ``fresh``
    (``None`` when ``width`` divides ``size``) marks the entries not already covered by the
    previous chunk; the others must be masked out.
    """

    start: jax.Array
    ids: jax.Array
    fresh: jax.Array | None


def _chunk(index: jax.Array, width: int, size: int) -> _Chunk:
    nominal = index * width
    start = jnp.minimum(nominal, size - width)
    ids = start + jax.lax.iota(jnp.int32, width)
    return _Chunk(start, ids, None if size % width == 0 else ids >= nominal)


def _vma(x: Any) -> frozenset:
    """The manual mesh axes ``x`` varies over inside ``shard_map`` (empty elsewhere)."""
    manual = getattr(jax.typeof(x), "manual_axis_type", None)
    return frozenset(getattr(manual, "varying", None) or ())


def _vary(x: jax.Array, *like: Any) -> jax.Array:
    """``x`` marked as varying over every manual axis any of ``like`` varies over.

    Loop carries start as constants; under ``shard_map`` they must already carry the per-device
    type their loop body gives them. Outside ``shard_map`` this is the identity.
    """
    missing = frozenset().union(*(_vma(a) for a in like if a is not None)) - _vma(x)
    return jax.lax.pcast(x, tuple(sorted(missing)), to="varying") if missing else x


def _num_chunks(size: int, width: int) -> int:
    return -(-size // width)


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int], out_dtype: Any) -> jax.Array:
    """A 2-D matmul contracting ``a``'s axis ``contract[0]`` with ``b``'s ``contract[1]``.

    Operands keep their (possibly half-precision) dtype and accumulate in ``out_dtype``; the
    transposed forms used by the backward pass are expressed as contractions, not copies. (On
    CPU, XLA widens half-precision operands to float32 and hoists that conversion of the whole
    kernel out of the loops: one float32 copy of the kernel. GPUs and TPUs slice half precision
    natively.)
    """
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=out_dtype)


def _logits_block(h_i, k_j, b_j, cdt):
    z = _dot(h_i, k_j, (1, 0), cdt)
    return z if b_j is None else z + b_j.astype(cdt)[None, :]


def _finite_or_zero(m: jax.Array) -> jax.Array:
    # A row whose logits are all -inf (or that has a +inf) keeps a finite shift, so the result is
    # the NaN/inf cross_entropy gives rather than an inf - inf produced here.
    return jnp.where(jnp.isfinite(m), m, 0)


def _row_stats(hidden, kernel, bias, targets, chunks):
    """Per-row ``logsumexp(z)`` and ``z[target]`` of ``z = hidden @ kernel + bias``, blockwise.

    ``targets`` outside ``[0, V)`` (e.g. owned by another vocabulary shard) hit no column and
    leave a target logit of 0. Loops run over vocabulary chunks outside, token chunks inside.
    """
    n, _ = hidden.shape
    v = kernel.shape[1]
    nc, vc = chunks
    cdt = _common.compute_dtype(jnp.result_type(hidden.dtype, kernel.dtype))

    def vocab_step(j, carry):
        col = _chunk(j, vc, v)
        k_j = jax.lax.dynamic_slice_in_dim(kernel, col.start, vc, axis=1)
        b_j = None if bias is None else jax.lax.dynamic_slice_in_dim(bias, col.start, vc)

        def token_step(i, carry):
            row = _chunk(i, nc, n)
            m, s, tgt = (jax.lax.dynamic_slice_in_dim(c, row.start, nc) for c in carry)
            h_i = jax.lax.dynamic_slice_in_dim(hidden, row.start, nc)
            y_i = jax.lax.dynamic_slice_in_dim(targets, row.start, nc)
            z = _logits_block(h_i, k_j, b_j, cdt)
            if col.fresh is not None:
                z = jnp.where(col.fresh[None, :], z, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(z, 1))
            shift = _finite_or_zero(m_new)
            s_new = s * jnp.exp(m - shift) + jnp.sum(jnp.exp(z - shift[:, None]), 1)
            local = y_i - col.start
            hit = (local >= 0) & (local < vc)
            if col.fresh is not None:
                hit = hit & (y_i >= j * vc)
            picked = jnp.take_along_axis(z, jnp.clip(local, 0, vc - 1)[:, None], 1)[:, 0]
            tgt_new = tgt + jnp.where(hit, picked, 0)
            new = (m_new, s_new, tgt_new)
            if row.fresh is not None:
                new = tuple(
                    jnp.where(row.fresh, a, b) for a, b in zip(new, (m, s, tgt), strict=True)
                )
            return tuple(
                jax.lax.dynamic_update_slice_in_dim(c, x, row.start, 0)
                for c, x in zip(carry, new, strict=True)
            )

        return jax.lax.fori_loop(0, _num_chunks(n, nc), token_step, carry)

    init = (jnp.full((n,), -jnp.inf, cdt), jnp.zeros((n,), cdt), jnp.zeros((n,), cdt))
    init = tuple(_vary(a, hidden, kernel, bias, targets) for a in init)
    m, s, tgt = jax.lax.fori_loop(0, _num_chunks(v, vc), vocab_step, init)
    return _finite_or_zero(m) + jnp.log(s), tgt


def _weighted_logit_sum(hidden, kernel, bias, class_weight, cdt):
    """``Σ_c w_c z_{n,c}`` (``w = 1`` when unweighted) as ``hidden @ (kernel @ w) + bias · w``."""
    w = jnp.ones((kernel.shape[1],), cdt) if class_weight is None else class_weight
    kw = _dot(kernel, w.astype(kernel.dtype), (1, 0), cdt)
    out = _dot(hidden, kw.astype(hidden.dtype), (1, 0), cdt)
    if bias is not None:
        out = out + jnp.sum(bias.astype(cdt) * w)
    return out


def _grads(hidden, kernel, bias, targets, class_weight, lse, g_lse, g_tgt, g_wsum, chunks):
    """Gradients for hidden, kernel and bias, recomputing each logit block.

    ``∂/∂z_{n,c} = g_lse_n softmax(z_n)_c + g_tgt_n [c = y_n] + g_wsum_n w_c``. Loops run over
    vocabulary chunks outside (each kernel-gradient chunk is finished and written once) and token
    chunks inside (the hidden gradient is accumulated in place).
    """
    n, d = hidden.shape
    v = kernel.shape[1]
    nc, vc = chunks
    mm = jnp.result_type(hidden.dtype, kernel.dtype)
    cdt = _common.compute_dtype(mm)
    lse = _finite_or_zero(lse)
    inputs = (hidden, kernel, bias, targets, class_weight, lse, g_lse, g_tgt, g_wsum)

    def vocab_step(j, carry):
        dh, dk, db = carry
        col = _chunk(j, vc, v)
        k_j = jax.lax.dynamic_slice_in_dim(kernel, col.start, vc, axis=1)
        b_j = None if bias is None else jax.lax.dynamic_slice_in_dim(bias, col.start, vc)
        w_j = None
        if g_wsum is not None and class_weight is not None:
            w_j = jax.lax.dynamic_slice_in_dim(class_weight, col.start, vc).astype(cdt)

        def token_step(i, inner):
            dh, dk_j, db_j = inner
            row = _chunk(i, nc, n)
            h_i = jax.lax.dynamic_slice_in_dim(hidden, row.start, nc)
            y_i = jax.lax.dynamic_slice_in_dim(targets, row.start, nc)
            lse_i, gl_i, gt_i = (
                jax.lax.dynamic_slice_in_dim(a, row.start, nc)[:, None] for a in (lse, g_lse, g_tgt)
            )
            z = _logits_block(h_i, k_j, b_j, cdt)
            # Rows with no logsumexp cotangent (ignored targets) contribute exactly nothing, even
            # where their logits overflow.
            dz = jnp.where(gl_i != 0, gl_i * jnp.exp(z - lse_i), 0)
            hit = jax.lax.iota(jnp.int32, vc)[None, :] == (y_i - col.start)[:, None]
            dz = dz + jnp.where(hit, gt_i, 0)
            if g_wsum is not None:
                gw_i = jax.lax.dynamic_slice_in_dim(g_wsum, row.start, nc)[:, None]
                dz = dz + (gw_i if w_j is None else gw_i * w_j[None, :])
            if col.fresh is not None:
                dz = jnp.where(col.fresh[None, :], dz, 0)
            if row.fresh is not None:
                dz = jnp.where(row.fresh[:, None], dz, 0)
            dz_mm = dz.astype(mm)
            dh_i = jax.lax.dynamic_slice_in_dim(dh, row.start, nc)
            dh_i = dh_i + _dot(dz_mm, k_j.astype(mm), (1, 1), cdt)
            dh = jax.lax.dynamic_update_slice_in_dim(dh, dh_i, row.start, 0)
            dk_j = dk_j + _dot(h_i.astype(mm), dz_mm, (0, 0), cdt)
            return dh, dk_j, db_j + jnp.sum(dz, 0)

        inner = (dh, _vary(jnp.zeros((d, vc), cdt), *inputs), _vary(jnp.zeros((vc,), cdt), *inputs))
        dh, dk_j, db_j = jax.lax.fori_loop(0, _num_chunks(n, nc), token_step, inner)
        dk_j = dk_j.astype(dk.dtype)
        if col.fresh is not None:
            # The slid-back last chunk shares columns with the previous one: keep those.
            old = jax.lax.dynamic_slice_in_dim(dk, col.start, vc, axis=1)
            dk_j = jnp.where(col.fresh[None, :], dk_j, old)
            db_j = jnp.where(col.fresh, db_j, jax.lax.dynamic_slice_in_dim(db, col.start, vc))
        dk = jax.lax.dynamic_update_slice_in_dim(dk, dk_j, col.start, 1)
        db = jax.lax.dynamic_update_slice_in_dim(db, db_j, col.start, 0)
        return dh, dk, db

    init = (jnp.zeros((n, d), cdt), jnp.zeros((d, v), kernel.dtype), jnp.zeros((v,), cdt))
    init = tuple(_vary(a, *inputs) for a in init)
    dh, dk, db = jax.lax.fori_loop(0, _num_chunks(v, vc), vocab_step, init)
    return dh.astype(hidden.dtype), dk, (None if bias is None else db.astype(bias.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _linear_stats(hidden, kernel, bias, targets, class_weight, chunks, smoothing):
    """``(logsumexp(z), z[target], Σ_c w_c z_c or None)`` per row, with a recomputing VJP."""
    (lse, tgt, wsum), _ = _linear_stats_fwd(
        hidden, kernel, bias, targets, class_weight, chunks, smoothing
    )
    return lse, tgt, wsum


def _linear_stats_fwd(hidden, kernel, bias, targets, class_weight, chunks, smoothing):
    lse, tgt = _row_stats(hidden, kernel, bias, targets, chunks)
    wsum = None
    if smoothing:
        wsum = _weighted_logit_sum(hidden, kernel, bias, class_weight, lse.dtype)
    return (lse, tgt, wsum), (hidden, kernel, bias, targets, class_weight, lse)


def _linear_stats_bwd(chunks, smoothing, residuals, cotangents):
    hidden, kernel, bias, targets, class_weight, lse = residuals
    g_lse, g_tgt, g_wsum = cotangents
    dh, dk, db = _grads(
        hidden, kernel, bias, targets, class_weight, lse, g_lse, g_tgt, g_wsum, chunks
    )
    dw = None
    if class_weight is not None:
        dw = _vary(jnp.zeros_like(class_weight), class_weight)
        if smoothing:
            # ∂(Σ_n g_n Σ_c w_c z_nc)/∂w_c = Σ_n g_n z_nc = ((g @ hidden) @ kernel)_c + Σ g · b_c.
            cdt = lse.dtype
            gh = _dot(g_wsum.astype(hidden.dtype), hidden, (0, 0), cdt)
            dw = _dot(gh.astype(kernel.dtype), kernel, (0, 0), cdt)
            if bias is not None:
                dw = dw + jnp.sum(g_wsum) * bias.astype(cdt)
            dw = dw.astype(class_weight.dtype)
    return dh, dk, db, None, dw


_linear_stats.defvjp(_linear_stats_fwd, _linear_stats_bwd)


def _stats(
    hidden, kernel, bias, targets, class_weight, chunks, smoothing
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """``_linear_stats`` with its result type spelt out for type checkers."""
    out = _linear_stats(hidden, kernel, bias, targets, class_weight, chunks, bool(smoothing))
    return cast("tuple[jax.Array, jax.Array, jax.Array | None]", out)


# ----------------------------------------------------------------------------------------------
# Loss assembly from per-row statistics
# ----------------------------------------------------------------------------------------------


def _row_losses(lse, tgt, wsum, valid, bad, pos_weight, sum_weight, num_classes, smoothing, z_loss):
    """cross_entropy's per-position formula in terms of ``lse``, ``z[y]`` and ``Σ_c w_c z_c``.

    ``-log p_y = lse - z_y`` and ``-Σ_c w_c log p_c = lse Σ_c w_c - Σ_c w_c z_c``.
    """
    # Ignored rows are zeroed before any arithmetic so that not even an inf there leaks a NaN
    # into the gradient.
    lse, tgt = jnp.where(valid, lse, 0), jnp.where(valid, tgt, 0)
    loss = (1 - smoothing) * pos_weight * (lse - tgt)
    if smoothing:
        loss = loss + smoothing / num_classes * (sum_weight * lse - jnp.where(valid, wsum, 0))
    if z_loss:
        loss = loss + z_loss * lse**2
    loss = jnp.where(valid, loss, 0)
    # A bad target (out of range, not ignored) is NaN, in value and — as in cross_entropy — in
    # the gradient of every logit of its row; the factor is exactly 0 (and so is its gradient)
    # at every other row.
    return loss + jnp.where(bad, jnp.nan, 0) * lse


def _reduce(loss, pos_weight, reduction, sum_over=None):
    """PyTorch's reduction; ``sum_over`` names the mesh axes to sum partial results over."""
    if reduction == "none":
        return loss
    total, denominator = jnp.sum(loss), jnp.sum(pos_weight)
    if sum_over:
        total = jax.lax.psum(total, sum_over)
        denominator = jax.lax.psum(denominator, sum_over)
    if reduction == "sum":
        return total
    return _common.safe_divide(total, denominator)


def _index_setup(targets, class_weight, num_classes, ignore_index, cdt):
    valid = ~_ignored(targets, ignore_index)
    bad = valid & ((targets < 0) | (targets >= num_classes))
    if class_weight is None:
        return valid, bad, valid.astype(cdt)
    safe = jnp.clip(targets, 0, num_classes - 1)
    return valid, bad, jnp.where(valid, class_weight[safe], 0)


def _dense(h, kernel, bias, y, class_weight, *, ignore_index, reduction, smoothing, z_loss, chunks):
    """The single-device (or automatically partitioned) path."""
    v = kernel.shape[1]
    lse, tgt, wsum = _stats(h, kernel, bias, y, class_weight, chunks, smoothing)
    valid, bad, pos_weight = _index_setup(y, class_weight, v, ignore_index, lse.dtype)
    sum_weight = v if class_weight is None else jnp.sum(class_weight)
    loss = _row_losses(
        lse, tgt, wsum, valid, bad, pos_weight, sum_weight, v, smoothing, z_loss
    )  # fmt: skip
    return _reduce(loss, pos_weight, reduction)


# ----------------------------------------------------------------------------------------------
# Explicitly sharded path (shard_map)
# ----------------------------------------------------------------------------------------------


def _axis_size(mesh, axes) -> int:
    names = axes if isinstance(axes, tuple) else (axes,)
    return int(np.prod([mesh.shape[a] for a in names]))


def _sharded(
    h, kernel, bias, y, class_weight, *, ignore_index, reduction, smoothing, z_loss, chunks,
    mesh, batch_axis, vocab_axis,
):  # fmt: skip
    """Vocabulary- and/or token-parallel loss: each device sees its own block of ``z`` only.

    Every device runs the blockwise statistics on its kernel columns and token rows; the global
    logsumexp is the logsumexp of the per-shard ones, and the target logit, ``Σ_c w_c z_c`` and
    the target's class weight are sums over the vocabulary shards (a target is owned by exactly
    one shard). The collectives move ``O(N)`` numbers; neither the logits nor the kernel are
    ever gathered. The differentiable inputs are marked as varying over every mesh axis in use,
    so that autodiff sums their per-device gradients over the axes they are replicated on
    (``hidden`` over the vocabulary axis, ``kernel``, ``bias`` and ``weight`` over the batch axis).
    """
    v_local = kernel.shape[1] // (1 if vocab_axis is None else _axis_size(mesh, vocab_axis))
    v = kernel.shape[1]
    weighted = class_weight is not None
    has_bias = bias is not None

    def local(h, kernel, bias, y, class_weight):
        cdt = _common.compute_dtype(jnp.result_type(h.dtype, kernel.dtype))
        offset = 0 if vocab_axis is None else jax.lax.axis_index(vocab_axis) * v_local
        y_local = (y - offset).astype(jnp.int32)
        if not weighted:
            class_weight = None
        everywhere = [a for a in (h, kernel, bias, y_local, class_weight) if a is not None]
        lse, tgt, wsum = _stats(
            _vary(h, *everywhere), _vary(kernel, *everywhere),
            _vary(bias, *everywhere) if has_bias else None, _vary(y_local, *everywhere),
            None if class_weight is None else _vary(class_weight, *everywhere), chunks, smoothing,
        )  # fmt: skip
        valid = ~_ignored(y, ignore_index)
        bad = valid & ((y < 0) | (y >= v))
        owned = (y_local >= 0) & (y_local < v_local)
        if class_weight is not None:
            pos_weight = jnp.where(
                valid & owned, class_weight[jnp.clip(y_local, 0, v_local - 1)], 0
            )
            sum_weight = jnp.sum(class_weight)
        else:
            pos_weight = valid.astype(cdt)
            sum_weight = v
        if vocab_axis is not None:
            shift = _finite_or_zero(jax.lax.pmax(jax.lax.stop_gradient(lse), vocab_axis))
            lse = shift + jnp.log(jax.lax.psum(jnp.exp(lse - shift), vocab_axis))
            tgt = jax.lax.psum(tgt, vocab_axis)
            if smoothing:
                wsum = jax.lax.psum(wsum, vocab_axis)
            if class_weight is not None:
                pos_weight = jax.lax.psum(pos_weight, vocab_axis)
                sum_weight = jax.lax.psum(sum_weight, vocab_axis)
        loss = _row_losses(
            lse, tgt, wsum, valid, bad, pos_weight, sum_weight, v, smoothing, z_loss
        )  # fmt: skip
        return _reduce(loss, pos_weight, reduction, batch_axis)

    rows, cols = PartitionSpec(batch_axis), PartitionSpec(vocab_axis)
    in_specs = (
        PartitionSpec(batch_axis, None), PartitionSpec(None, vocab_axis), cols, rows, cols
    )  # fmt: skip
    out_specs = rows if reduction == "none" else PartitionSpec()
    placeholder = jnp.zeros((v,), jnp.float32)
    args = (h, kernel, bias if has_bias else placeholder, y, placeholder)
    if weighted:
        args = (*args[:4], class_weight)
    if any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
        # With explicit sharding (jax.make_mesh's default) shard_map takes inputs only in the
        # layout of its in_specs; with automatic sharding XLA reshards them itself.
        target = in_specs
        if isinstance(mesh, Mesh):
            target = tuple(jax.sharding.NamedSharding(mesh, spec) for spec in in_specs)
        args = jax.reshard(args, target)
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs)(*args)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def _check_chunk(name: str, value: Any) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"{_FN}: `{name}` must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{_FN}: `{name}` must be a positive int, got {value}")
    return int(value)


def _explicit_layout(h, y, kernel, bias, weight):
    """``(mesh, batch_axis, vocab_axis)`` read from explicitly sharded inputs, else Nones.

    With explicit sharding (``jax.make_mesh``'s default axis type) the arrays' types say how the
    tokens (rows of ``hidden``, ``targets``) and the classes (columns of ``kernel``, ``bias``,
    ``weight``) are split; the blockwise loops cannot slice such arrays, so the loss takes the
    ``shard_map`` form over those axes (the first input that is split decides).
    """
    mesh, axes = None, []
    for candidates in (((h, 0), (y, 0)), ((kernel, 1), (bias, 0), (weight, 0))):
        found = None
        for x, dim in candidates:
            sharding = getattr(jax.typeof(x), "sharding", None) if x is not None else None
            spec = tuple(getattr(sharding, "spec", None) or ())
            if dim < len(spec) and spec[dim] is not None:
                found, mesh = spec[dim], sharding.mesh  # pyright: ignore[reportOptionalMemberAccess]
                break
        axes.append(found)
    return mesh, axes[0], axes[1]


def _check_mesh_axes(mesh, batch_axis, vocab_axis, n: int, v: int):
    if batch_axis is None and vocab_axis is None:
        return None
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            raise ValueError(
                f"{_FN}: `batch_axis`/`vocab_axis` need a `mesh` (or a context mesh set with "
                "jax.set_mesh)"
            )
    elif not isinstance(mesh, (Mesh, jax.sharding.AbstractMesh)):
        raise TypeError(f"{_FN}: `mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    for name, axes, size, what in (
        ("batch_axis", batch_axis, n, "tokens"), ("vocab_axis", vocab_axis, v, "classes")
    ):  # fmt: skip
        if axes is None:
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        missing = [a for a in names if a not in mesh.shape]
        if missing:
            raise ValueError(
                f"{_FN}: `{name}`={axes!r} names axes {missing} that are not in the mesh's axes "
                f"{tuple(mesh.shape)}"
            )
        parts = _axis_size(mesh, axes)
        if size % parts:
            raise ValueError(
                f"{_FN}: the {size} {what} do not split evenly over `{name}`={axes!r} of size "
                f"{parts}"
            )
    if batch_axis is not None and vocab_axis is not None:
        b = set(batch_axis if isinstance(batch_axis, tuple) else (batch_axis,))
        if b & set(vocab_axis if isinstance(vocab_axis, tuple) else (vocab_axis,)):
            raise ValueError(f"{_FN}: `batch_axis` and `vocab_axis` must name different mesh axes")
    return mesh


@functools.partial(
    _common.jit,
    static_argnames=(
        "ignore_index", "reduction", "label_smoothing", "z_loss", "token_chunk", "vocab_chunk",
        "mesh", "batch_axis", "vocab_axis",
    ),
)  # fmt: skip
def linear_cross_entropy(
    hidden: Float[ArrayLike, "*batch dim"],
    kernel: Float[ArrayLike, "dim classes"],
    targets: Int[ArrayLike, "*batch"],
    *,
    bias: Float[ArrayLike, " classes"] | None = None,
    weight: Float[ArrayLike, " classes"] | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    mesh: Mesh | None = None,
    batch_axis: str | tuple[str, ...] | None = None,
    vocab_axis: str | tuple[str, ...] | None = None,
) -> Float[Array, "*batch"] | Float[Array, ""]:
    r"""Cross-entropy of the logits ``hidden @ kernel + bias``, never materialising them.

    Equal to ``cross_entropy(hidden @ kernel + bias, targets, weight=..., ignore_index=...,
    reduction=..., label_smoothing=..., z_loss=...)`` — same semantics in every corner — but the
    ``[N, V]`` logits are produced one ``token_chunk × vocab_chunk`` block at a time. With
    \(z_n = h_n K + b\), over ``V`` classes with class weights ``w``:

    $$
    \ell_n = (1-\varepsilon)\, w_{y_n} (L_n - z_{n,y_n})
             + \frac{\varepsilon}{V} \Big(L_n \sum_c w_c - \sum_c w_c z_{n,c}\Big)
             + \lambda_z L_n^2,
    \qquad L_n = \log \sum_c e^{z_{n,c}}
    $$

    \(L_n\) is accumulated by an online logsumexp over vocabulary chunks; the backward pass
    (a ``jax.custom_vjp``) keeps only \(L\) and recomputes each logit block to form
    \(\partial \ell / \partial z = a_n\, \mathrm{softmax}(z_n) - b_{n,c}\) and its
    contractions with ``hidden`` and ``kernel``. Temporaries are ``O(token_chunk · vocab_chunk +
    (token_chunk + vocab_chunk) · D)`` besides the gradients themselves; the price is one more
    ``N × D × V`` matmul than the materialised path (four instead of three). Half-precision
    inputs are multiplied with float32 accumulation and never rounded to half precision as
    logits. Reverse-mode differentiation only (no ``jax.jvp``/``jax.hessian``), in ``hidden``,
    ``kernel``, ``bias`` and ``weight``.

    Sharding: naming the mesh axes — ``vocab_axis`` (kernel columns, ``bias`` and ``weight``)
    and/or ``batch_axis`` (tokens) — runs the loss under ``jax.shard_map``, each device working
    on its own block of logits and exchanging only ``O(N)`` statistics (Megatron-style
    vocabulary-parallel cross-entropy); neither logits nor kernel are ever gathered. With
    explicit sharding (``jax.make_mesh``'s default axis type) the axes are read from the inputs'
    types, so this happens by itself. Otherwise (automatic sharding, no axes named) XLA
    partitions the computation: correct for any ``NamedSharding``, but a vocabulary-sharded
    kernel gets all-gathered (the logits never are).

    Args:
      hidden: floating features ``(N, D)`` or ``(*batch, D)`` (flattened to tokens).
      kernel: floating weights ``(D, V)``, laid out like a Flax ``Dense`` kernel.
      targets: integer class indices of shape ``hidden.shape[:-1]``.
      bias: optional floating bias ``(V,)``.
      weight: optional per-class weight ``(V,)``.
      ignore_index: index target that contributes no loss, weight or gradient.
      reduction: ``"none"`` (per token, shape ``hidden.shape[:-1]``), ``"sum"`` or ``"mean"``
        (weighted mean: divided by the total class weight of the non-ignored targets).
      label_smoothing: ε in ``[0, 1]`` (PyTorch's formula, class weights included).
      z_loss: coefficient λ_z on ``logsumexp(z)²`` at non-ignored positions, reduced like the
        main loss.
      token_chunk: rows of ``hidden`` per block (clipped to ``N``; any value works, the last
        chunk may overlap the previous one).
      vocab_chunk: columns of ``kernel`` per block (clipped to ``V``).
      mesh: the ``jax.sharding.Mesh`` for ``batch_axis``/``vocab_axis`` (default: the context
        mesh).
      batch_axis: mesh axis name(s) the tokens are split over, or ``None``. Tokens must split
        evenly; ``token_chunk`` then applies to each device's share.
      vocab_axis: mesh axis name(s) the classes are split over, or ``None``. Classes must split
        evenly; ``vocab_chunk`` then applies to each device's share.

    Returns:
      Per-token losses (``"none"``) or a scalar, in the dtype ``hidden @ kernel + bias`` would
      have. A target outside ``[0, V)`` that is not ``ignore_index`` gives NaN at its position
      (and NaN gradients), as in ``jaxloss.cross_entropy``.

    Raises:
      ValueError: for inconsistent shapes, bad options or mesh axes.
      TypeError: for non-floating inputs, non-integer targets or non-int options.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxloss
      >>> h = jax.random.normal(jax.random.key(0), (6, 4))
      >>> k = jax.random.normal(jax.random.key(1), (4, 10))
      >>> y = jnp.array([0, 3, 9, 1, -100, 5])
      >>> fused = jaxloss.linear_cross_entropy(h, k, y, vocab_chunk=4, label_smoothing=0.1)
      >>> dense = jaxloss.cross_entropy(h @ k, y, label_smoothing=0.1)
      >>> bool(jnp.allclose(fused, dense, rtol=1e-5))
      True

    References:
      Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models" (2024); Milakov &
      Gimelshein, "Online normalizer calculation for softmax" (2018); Shoeybi et al.,
      "Megatron-LM" (2019) for the vocabulary-parallel form.
    """
    fn = _FN
    hidden = _common.check_floating("hidden", fn, hidden)
    kernel = _common.check_floating("kernel", fn, kernel)
    targets = _common.check_integer("targets", fn, targets)
    _common.check_reduction(fn, reduction)
    smoothing = _common.check_unit_interval("label_smoothing", fn, label_smoothing)
    z_loss = _common.check_nonnegative("z_loss", fn, z_loss)
    if not isinstance(ignore_index, (int, np.integer)) or isinstance(ignore_index, bool):
        raise TypeError(f"{fn}: `ignore_index` must be an int, got {ignore_index!r}")
    token_chunk = _check_chunk("token_chunk", token_chunk)
    vocab_chunk = _check_chunk("vocab_chunk", vocab_chunk)
    if hidden.ndim < 1:
        raise ValueError(f"{fn}: `hidden` must have a feature axis (..., D), got a scalar")
    if kernel.ndim != 2 or kernel.shape[0] != hidden.shape[-1] or kernel.shape[1] == 0:
        raise ValueError(
            f"{fn}: `kernel` must have shape (D, V) = ({hidden.shape[-1]}, V) with V >= 1 for "
            f"`hidden` with shape {tuple(hidden.shape)}; got `kernel` with shape "
            f"{tuple(kernel.shape)} and dtype {kernel.dtype}"
        )
    d, v = kernel.shape
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"{fn}: `targets` must have the shape of `hidden` without its feature axis, i.e. "
            f"{tuple(hidden.shape[:-1])}; got `targets` with shape {tuple(targets.shape)} (dtype "
            f"{targets.dtype}) for `hidden` with shape {tuple(hidden.shape)}"
        )
    if bias is not None:
        bias = _common.check_floating("bias", fn, bias)
        if bias.shape != (v,):
            raise ValueError(
                f"{fn}: `bias` must have shape ({v},), one entry per class (column of `kernel`), "
                f"got shape {tuple(bias.shape)} and dtype {bias.dtype}"
            )
    out_dtype = jnp.result_type(hidden.dtype, kernel.dtype, *([] if bias is None else [bias]))
    cdt = _common.compute_dtype(out_dtype)
    class_weight = _common.check_class_weight(fn, weight, v)
    if class_weight is not None:
        class_weight = class_weight.astype(cdt)

    batch_shape = hidden.shape[:-1]
    h = hidden.reshape(-1, d)
    y = targets.reshape(-1)
    n = h.shape[0]
    if mesh is None and batch_axis is None and vocab_axis is None:
        mesh, batch_axis, vocab_axis = _explicit_layout(h, y, kernel, bias, class_weight)
    resolved_mesh = _check_mesh_axes(mesh, batch_axis, vocab_axis, n, v)
    options = dict(
        ignore_index=int(ignore_index), reduction=reduction, smoothing=smoothing, z_loss=z_loss
    )
    if n == 0:
        # Nothing to loop over: the loss of an empty batch, as cross_entropy gives it.
        empty = jnp.zeros((0,), cdt)
        loss = _reduce(empty, empty, reduction)
    elif resolved_mesh is None:
        chunks = (min(token_chunk, n), min(vocab_chunk, v))
        loss = _dense(h, kernel, bias, y, class_weight, chunks=chunks, **options)
    else:
        n_local = n // (1 if batch_axis is None else _axis_size(resolved_mesh, batch_axis))
        v_local = v // (1 if vocab_axis is None else _axis_size(resolved_mesh, vocab_axis))
        chunks = (min(token_chunk, n_local), min(vocab_chunk, v_local))
        loss = _sharded(
            h, kernel, bias, y, class_weight, chunks=chunks, mesh=resolved_mesh,
            batch_axis=batch_axis, vocab_axis=vocab_axis, **options,
        )  # fmt: skip
    if reduction == "none":
        loss = loss.reshape(batch_shape)
    return loss.astype(out_dtype)
