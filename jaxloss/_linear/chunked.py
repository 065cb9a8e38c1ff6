"""The blocked kernel: per-token statistics of ``hidden @ kernel + bias`` without the logits.

The loss needs only a few numbers per token — ``logsumexp(z_n)``, the target logit ``z_{n,y_n}``
and, for label smoothing, ``Σ_c w_c z_{n,c}`` — so they are computed one ``token_chunk ×
vocab_chunk`` block of logits at a time (an online logsumexp over vocabulary chunks), and the
``custom_vjp`` recomputes each block in the backward pass instead of storing it.

Blocks that do not divide evenly are handled without padding (which would copy the kernel): the
last chunk is slid back to end at the array's edge and the rows or columns it shares with the
previous chunk are masked out.

Small helpers other blockwise losses may reuse: :class:`ChunkConfig`, :func:`chunk`,
:func:`num_chunks`, :func:`dot` (a matmul with float32 accumulation), :func:`vary`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np

from jaxloss import _common

# Tuned on a 2-core x86 CPU at N=2048, D=512, V=32768: every block matmul already runs at the
# speed of one big matmul there, and the temporaries stay ~44 MiB at N=8192, D=2048, V=131072
# (f32); larger blocks only cost memory. GPUs and TPUs may prefer larger chunks.
DEFAULT_TOKEN_CHUNK = 1024
DEFAULT_VOCAB_CHUNK = 1024


def _positive_int(fn: str, name: str, value: Any) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"{fn}: `{name}` must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{fn}: `{name}` must be a positive int, got {value}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class ChunkConfig:
    """Block sizes of the blocked kernel, validated on construction.

    Attributes:
      token_chunk: rows of ``hidden`` per block (clipped to the number of tokens).
      vocab_chunk: columns of ``kernel`` per block (clipped to the number of classes).
    """

    token_chunk: int = DEFAULT_TOKEN_CHUNK
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK
    fn: dataclasses.InitVar[str] = "linear_cross_entropy"

    def __post_init__(self, fn: str) -> None:
        for field in ("token_chunk", "vocab_chunk"):
            object.__setattr__(self, field, _positive_int(fn, field, getattr(self, field)))

    def clipped(self, tokens: int, classes: int) -> tuple[int, int]:
        """``(token_chunk, vocab_chunk)`` no larger than the array they cut."""
        return min(self.token_chunk, tokens), min(self.vocab_chunk, classes)


class Chunk(NamedTuple):
    """One chunk along an axis of static length ``size``, cut into chunks of static ``width``.

    ``start`` is where the chunk is read from: ``index * width``, except for a short last chunk,
    which is slid back to ``size - width`` so that every read has the static width. ``fresh``
    (``None`` when ``width`` divides ``size``) marks the entries not already covered by the
    previous chunk; the others must be masked out.
    """

    start: jax.Array
    ids: jax.Array
    fresh: jax.Array | None


def chunk(index: jax.Array, width: int, size: int) -> Chunk:
    nominal = index * width
    start = jnp.minimum(nominal, size - width)
    ids = start + jax.lax.iota(jnp.int32, width)
    return Chunk(start, ids, None if size % width == 0 else ids >= nominal)


def num_chunks(size: int, width: int) -> int:
    return -(-size // width)


def _vma(x: Any) -> frozenset:
    """The manual mesh axes ``x`` varies over inside ``shard_map`` (empty elsewhere)."""
    manual = getattr(jax.typeof(x), "manual_axis_type", None)
    return frozenset(getattr(manual, "varying", None) or ())


def vary(x: jax.Array, *like: Any) -> jax.Array:
    """``x`` marked as varying over every manual axis any of ``like`` varies over.

    Loop carries start as constants; under ``shard_map`` they must already carry the per-device
    type their loop body gives them. Outside ``shard_map`` this is the identity.
    """
    missing = frozenset().union(*(_vma(a) for a in like if a is not None)) - _vma(x)
    return jax.lax.pcast(x, tuple(sorted(missing)), to="varying") if missing else x


def dot(a: jax.Array, b: jax.Array, contract: tuple[int, int], out_dtype: Any) -> jax.Array:
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
    z = dot(h_i, k_j, (1, 0), cdt)
    return z if b_j is None else z + b_j.astype(cdt)[None, :]


def finite_or_zero(m: jax.Array) -> jax.Array:
    # A row whose logits are all -inf (or that has a +inf) keeps a finite shift, so the result is
    # the NaN/inf cross_entropy gives rather than an inf - inf produced here.
    return jnp.where(jnp.isfinite(m), m, 0)


def _slice(x: jax.Array, start, width: int, axis: int = 0) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x, start, width, axis=axis)


def _maybe_slice(x: jax.Array | None, start, width: int) -> jax.Array | None:
    return None if x is None else _slice(x, start, width)


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
        col = chunk(j, vc, v)
        k_j, b_j = _slice(kernel, col.start, vc, 1), _maybe_slice(bias, col.start, vc)

        def token_step(i, carry):
            row = chunk(i, nc, n)
            m, s, tgt = (_slice(c, row.start, nc) for c in carry)
            y_i = _slice(targets, row.start, nc)
            z = _logits_block(_slice(hidden, row.start, nc), k_j, b_j, cdt)
            if col.fresh is not None:
                z = jnp.where(col.fresh[None, :], z, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(z, 1))
            shift = finite_or_zero(m_new)
            s_new = s * jnp.exp(m - shift) + jnp.sum(jnp.exp(z - shift[:, None]), 1)
            local = y_i - col.start
            hit = (local >= 0) & (local < vc)
            if col.fresh is not None:
                hit = hit & (y_i >= j * vc)
            picked = jnp.take_along_axis(z, jnp.clip(local, 0, vc - 1)[:, None], 1)[:, 0]
            new = (m_new, s_new, tgt + jnp.where(hit, picked, 0))
            if row.fresh is not None:
                new = tuple(
                    jnp.where(row.fresh, a, b) for a, b in zip(new, (m, s, tgt), strict=True)
                )
            return tuple(
                jax.lax.dynamic_update_slice_in_dim(c, x, row.start, 0)
                for c, x in zip(carry, new, strict=True)
            )

        return jax.lax.fori_loop(0, num_chunks(n, nc), token_step, carry)

    init = (jnp.full((n,), -jnp.inf, cdt), jnp.zeros((n,), cdt), jnp.zeros((n,), cdt))
    init = tuple(vary(a, hidden, kernel, bias, targets) for a in init)
    m, s, tgt = jax.lax.fori_loop(0, num_chunks(v, vc), vocab_step, init)
    return finite_or_zero(m) + jnp.log(s), tgt


def _weighted_logit_sum(hidden, kernel, bias, class_weight, cdt):
    """``Σ_c w_c z_{n,c}`` (``w = 1`` when unweighted) as ``hidden @ (kernel @ w) + bias · w``."""
    w = jnp.ones((kernel.shape[1],), cdt) if class_weight is None else class_weight
    kw = dot(kernel, w.astype(kernel.dtype), (1, 0), cdt)
    out = dot(hidden, kw.astype(hidden.dtype), (1, 0), cdt)
    if bias is not None:
        out = out + jnp.sum(bias.astype(cdt) * w)
    return out


def _logit_cotangent(z, lse_i, gl_i, gt_i, gw_i, y_i, col, row, w_j):
    """``∂/∂z = g_lse softmax(z) + g_tgt [c = y] + g_wsum w_c`` on one block, overlap masked."""
    # Rows with no logsumexp cotangent (ignored targets) contribute exactly nothing, even where
    # their logits overflow.
    dz = jnp.where(gl_i != 0, gl_i * jnp.exp(z - lse_i), 0)
    hit = jax.lax.iota(jnp.int32, z.shape[1])[None, :] == (y_i - col.start)[:, None]
    dz = dz + jnp.where(hit, gt_i, 0)
    if gw_i is not None:
        dz = dz + (gw_i if w_j is None else gw_i * w_j[None, :])
    if col.fresh is not None:
        dz = jnp.where(col.fresh[None, :], dz, 0)
    if row.fresh is not None:
        dz = jnp.where(row.fresh[:, None], dz, 0)
    return dz


def _grads(hidden, kernel, bias, targets, class_weight, lse, g_lse, g_tgt, g_wsum, chunks):
    """Gradients for hidden, kernel and bias, recomputing each logit block.

    Loops run over vocabulary chunks outside (each kernel-gradient chunk is finished and written
    once) and token chunks inside (the hidden gradient is accumulated in place).
    """
    n, d = hidden.shape
    v = kernel.shape[1]
    nc, vc = chunks
    mm = jnp.result_type(hidden.dtype, kernel.dtype)
    cdt = _common.compute_dtype(mm)
    lse = finite_or_zero(lse)
    inputs = (hidden, kernel, bias, targets, class_weight, lse, g_lse, g_tgt, g_wsum)

    def vocab_step(j, carry):
        dh, dk, db = carry
        col = chunk(j, vc, v)
        k_j, b_j = _slice(kernel, col.start, vc, 1), _maybe_slice(bias, col.start, vc)
        w_j = None
        if g_wsum is not None and class_weight is not None:
            w_j = _slice(class_weight, col.start, vc).astype(cdt)

        def token_step(i, inner):
            dh, dk_j, db_j = inner
            row = chunk(i, nc, n)
            h_i, y_i = _slice(hidden, row.start, nc), _slice(targets, row.start, nc)
            lse_i, gl_i, gt_i = (_slice(a, row.start, nc)[:, None] for a in (lse, g_lse, g_tgt))
            gw_i = None if g_wsum is None else _slice(g_wsum, row.start, nc)[:, None]
            z = _logits_block(h_i, k_j, b_j, cdt)
            dz = _logit_cotangent(z, lse_i, gl_i, gt_i, gw_i, y_i, col, row, w_j).astype(mm)
            dh_i = _slice(dh, row.start, nc) + dot(dz, k_j.astype(mm), (1, 1), cdt)
            dh = jax.lax.dynamic_update_slice_in_dim(dh, dh_i, row.start, 0)
            dk_j = dk_j + dot(h_i.astype(mm), dz, (0, 0), cdt)
            return dh, dk_j, db_j + jnp.sum(dz.astype(cdt), 0)

        inner = (dh, vary(jnp.zeros((d, vc), cdt), *inputs), vary(jnp.zeros((vc,), cdt), *inputs))
        dh, dk_j, db_j = jax.lax.fori_loop(0, num_chunks(n, nc), token_step, inner)
        dk_j = dk_j.astype(dk.dtype)
        if col.fresh is not None:
            # The slid-back last chunk shares columns with the previous one: keep those.
            dk_j = jnp.where(col.fresh[None, :], dk_j, _slice(dk, col.start, vc, 1))
            db_j = jnp.where(col.fresh, db_j, _slice(db, col.start, vc))
        dk = jax.lax.dynamic_update_slice_in_dim(dk, dk_j, col.start, 1)
        db = jax.lax.dynamic_update_slice_in_dim(db, db_j, col.start, 0)
        return dh, dk, db

    init = (jnp.zeros((n, d), cdt), jnp.zeros((d, v), kernel.dtype), jnp.zeros((v,), cdt))
    init = tuple(vary(a, *inputs) for a in init)
    dh, dk, db = jax.lax.fori_loop(0, num_chunks(v, vc), vocab_step, init)
    return dh.astype(hidden.dtype), dk, (None if bias is None else db.astype(bias.dtype))


# What the custom_vjp buys: the backward pass recomputes each logit block instead of storing
# the [N, V] logits (O(blocks) memory instead of O(N·V)).
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
        dw = vary(jnp.zeros_like(class_weight), class_weight)
        if smoothing:
            # ∂(Σ_n g_n Σ_c w_c z_nc)/∂w_c = Σ_n g_n z_nc = ((g @ hidden) @ kernel)_c + Σ g · b_c.
            cdt = lse.dtype
            gh = dot(g_wsum.astype(hidden.dtype), hidden, (0, 0), cdt)
            dw = dot(gh.astype(kernel.dtype), kernel, (0, 0), cdt)
            if bias is not None:
                dw = dw + jnp.sum(g_wsum) * bias.astype(cdt)
            dw = dw.astype(class_weight.dtype)
    return dh, dk, db, None, dw


_linear_stats.defvjp(_linear_stats_fwd, _linear_stats_bwd)


def linear_stats(
    hidden, kernel, bias, targets, class_weight, chunks: tuple[int, int], smoothing
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Per-row ``(logsumexp(z), z[target], Σ_c w_c z_c or None)`` of ``z = hidden @ kernel + b``.

    ``chunks`` is ``(token_chunk, vocab_chunk)``, already clipped to the sizes. Differentiable
    (reverse mode) in ``hidden``, ``kernel``, ``bias`` and ``class_weight``.
    """
    out = _linear_stats(hidden, kernel, bias, targets, class_weight, chunks, bool(smoothing))
    return cast("tuple[jax.Array, jax.Array, jax.Array | None]", out)
