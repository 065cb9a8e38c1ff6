"""The loops over blocks: a forward sweep that folds per-row statistics, and the recomputing
backward pass that contracts each block's logit gradient into the head's gradients.

Both walk vocabulary chunks outside and token chunks inside, so each column block of the
kernel is sliced once per vocabulary chunk and each kernel-gradient column block is finished
in float32 and written once in the kernel's dtype. An op supplies only its block rules: what a
block of logits adds to its per-row statistics (:func:`sweep`), and a block's logit gradient
(:class:`BlockGradient`). The engine applies the rules every op needs: stale rows and columns
(a slid-back chunk's overlap, another device's columns) contribute nothing; rows without a
cotangent (ignored targets, masked tokens) enter no matmul (``0 · NaN`` would reach every
kernel-gradient entry), nor do stale kernel columns (``0 · inf``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from jaxloss._blockwise.blocks import (
    Chunk,
    Span,
    dot,
    live_columns,
    put,
    put_fresh,
    take,
    vary,
    zero_rows,
)


def sweep(spans: tuple[Span, Span], chunks, carries, columns: Callable, absorb: Callable, varying):
    """Per-row ``carries`` (a pytree of ``(N, ...)`` arrays) folded over every block.

    ``columns(cols)`` reads what a vocabulary chunk needs (kernel and bias columns), once per
    chunk; ``absorb(rows, cols, column_data, old)`` returns the row chunk's new carries from its
    ``old`` ones. A slid-back chunk's stale rows keep their old carries. ``varying``: what the
    carries vary like under ``shard_map``.
    """
    row_span, col_span = spans
    nc, vc = chunks

    def vocab_step(j, carry):
        cols = col_span.chunk(j, vc)
        column_data = columns(cols)

        def token_step(i, carry):
            rows = row_span.chunk(i, nc)
            old = jax.tree.map(lambda a: take(a, rows.start, nc), carry)
            new = absorb(rows, cols, column_data, old)
            fresh = rows.fresh
            if fresh is not None:
                new = jax.tree.map(lambda a, b: jnp.where(fresh, a, b), new, old)
            return jax.tree.map(lambda a, b: put(a, b, rows.start), carry, new)

        return jax.lax.fori_loop(0, row_span.count(nc), token_step, carry)

    init = jax.tree.map(lambda a: vary(a, *varying), carries)
    return jax.lax.fori_loop(0, col_span.count(vc), vocab_step, init)


@runtime_checkable
class BlockGradient(Protocol):
    """An op's gradient rule for one block of logits.

    ``target_entries``: ``None``, or ``(rows, cols) -> (column, value)``: per row, one entry
    of the block (its column; the block's width where the row has none there) and ``∂ℓ/∂z``
    there, which ``__call__(..., hit=False)`` leaves out (a cross-entropy's target column).
    """

    @property
    def target_entries(self) -> Callable[[Chunk, Chunk], tuple[jax.Array, jax.Array]] | None: ...

    def live(self, rows: Chunk) -> jax.Array:
        """``(rows,)``: the rows with a cotangent (any other row's logit gradient is 0)."""
        ...

    def __call__(
        self, rows: Chunk, cols: Chunk, h_i: jax.Array, k_j: jax.Array, hit: bool = True
    ) -> tuple:
        """``(∂ℓ/∂z, sums)`` of the block ``h_i @ k_j`` (``h_i`` zero at rows without a
        cotangent, ``k_j`` zero at stale columns): ``∂ℓ/∂z`` in the compute dtype (its stale
        and cotangent-free entries are zeroed by the engine), ``sums`` a tuple of ``(cols,)``
        per-column gradients (or ``None``) summed over the rows; ``hit=False``: without the
        ``target_entries``."""
        ...


# Platforms whose recomputing pass sets each row's target entry of a block's logit gradient
# after the cast to the matmul dtype (an in-place scatter of one entry per row) instead of
# adding it by an indicator of the target column: XLA:GPU then computes the rest of the
# gradient in the epilogue of the gemm that recomputes the logits (the float32 block is never
# written), but takes no compare of a row against a column broadcast into an epilogue, nor a
# select on a flag it can sink into the loop (:func:`row_flags`). Modelled value_and_grad of
# the mean (benchmarks/hlo.py, an in-place scatter moving its entries), linear_cross_entropy
# H100 bf16 8192×4096×131072: 41.17 -> 39.25 ms (label smoothing 42.46 -> 40.54), temporaries
# 240 -> 192 MiB. XLA:TPU fuses the indicator into its matmuls already; XLA:CPU has no such
# epilogue.
EPILOGUE_PLATFORMS: tuple[str, ...] = ("cuda",)


def row_flags(*flags: jax.Array) -> tuple[jax.Array, ...]:
    """Per-row flags (``(N,)`` booleans) computed once, outside the loops over blocks: behind an
    optimization barrier, which XLA:GPU cannot sink into the loop body (it sinks a compare
    there, and a select on it then stays out of the gemm's epilogue: :data:`EPILOGUE_PLATFORMS`)."""
    return jax.lax.optimization_barrier(flags)


def quiet(dz: jax.Array, live: jax.Array, rows: Chunk, cols: Chunk) -> jax.Array:
    """``dz`` with rows without a cotangent and stale rows and columns at exactly 0 (a select:
    their NaN logits stay out)."""
    keep = live.reshape(-1) if rows.fresh is None else live.reshape(-1) & rows.fresh
    keep = keep[:, None]
    if cols.fresh is not None:
        keep = keep & cols.fresh[None, :]
    return jnp.where(keep, dz, 0)


def operands(hidden, kernel, rows: Chunk, cols: Chunk, live: jax.Array, chunks):
    """The block's hidden rows (zero at rows without a cotangent or stale) and kernel columns
    (zero at stale columns), as the gradient matmuls read them."""
    nc, vc = chunks
    keep = live.reshape(-1) if rows.fresh is None else live.reshape(-1) & rows.fresh
    h_i = zero_rows(take(hidden, rows.start, nc), keep)
    return h_i, live_columns(take(kernel, cols.start, vc, 1), cols)


def _block(hidden, kernel, block: BlockGradient, rows: Chunk, cols: Chunk, chunks, epilogue: bool,
           h_i=None):  # fmt: skip
    """``(h_i, k_j, ∂ℓ/∂z in the matmul dtype, ∂ℓ/∂z in the compute dtype, sums)``;
    ``h_i``: the block's hidden rows as :func:`operands` gives them, where already in hand;
    ``epilogue``: the target entries set after the cast (:data:`EPILOGUE_PLATFORMS`)."""
    live = block.live(rows)
    h_rows, k_j = operands(hidden, kernel, rows, cols, live, chunks)
    h_i = h_rows if h_i is None else h_i
    entries = block.target_entries(rows, cols) if epilogue and block.target_entries else None
    dz, sums = block(rows, cols, h_i, k_j, hit=entries is None)
    dz = quiet(dz, live, rows, cols)
    mm = jnp.result_type(hidden.dtype, kernel.dtype)
    dz_mm = dz.astype(mm)
    if entries is not None:
        at, value = (jnp.arange(dz.shape[0]), entries[0]), entries[1]
        dz_mm = dz_mm.at[at].set(value.astype(mm), mode="drop")
        dz = dz.at[at].set(value, mode="drop")
    return h_i.astype(mm), k_j.astype(mm), dz_mm, dz, sums


def _column_pass(hidden, kernel, spans, chunks, block: BlockGradient, dh, sums_like, cdt, varying,
                 epilogue: bool):  # fmt: skip
    """``(dh, dk, column sums)``: vocabulary chunks outside, each column block of ``dk`` and of
    the sums finished and written once; ``dh`` (``None``: not computed here) in place."""
    row_span, col_span = spans
    nc, vc = chunks
    whole_rows = None
    if row_span.count(nc) == 1:
        # One token chunk: its hidden rows, zeroed where there is no cotangent, are the same
        # for every vocabulary chunk; selected once here, not once per chunk (a read and a
        # write of hidden's size each: 2.6 ms of an H100's 45 at N=8192, D=4096, V=131072).
        rows = row_span.chunk(0, nc)
        whole_rows = operands(
            hidden, kernel, rows, col_span.chunk(0, vc), block.live(rows), chunks
        )[0]

    def vocab_step(j, carry):
        dh, dk, sums = carry
        cols = col_span.chunk(j, vc)

        def token_step(i, inner):
            dh, dk_j, sums_j = inner
            rows = row_span.chunk(i, nc)
            h_i, k_j, dz_mm, dz, block_sums = _block(
                hidden, kernel, block, rows, cols, chunks, epilogue, whole_rows
            )
            if dh is not None:
                # Stale rows were finished by the previous chunk: 0 · inf (an infinite kernel
                # entry times their quieted logit gradient) must not reach them.
                dh_i = take(dh, rows.start, nc) + dot(dz_mm, k_j, (1, 1), cdt)
                dh = put_fresh(dh, dh_i, rows)
            dk_j = dk_j + dot(h_i, dz_mm, (0, 0), cdt)
            parts = (jnp.sum(dz, 0), *block_sums)
            sums_j = tuple(s if p is None else s + p for s, p in zip(sums_j, parts, strict=True))
            return dh, dk_j, sums_j

        zeros = (jnp.zeros((kernel.shape[0], vc), cdt), (jnp.zeros((vc,), cdt),) * len(sums))
        zeros = jax.tree.map(lambda a: vary(a, *varying), zeros)
        dh, dk_j, sums_j = jax.lax.fori_loop(0, row_span.count(nc), token_step, (dh, *zeros))
        dk = put_fresh(dk, dk_j, cols, 1)
        sums = tuple(put_fresh(f, s, cols) for f, s in zip(sums, sums_j, strict=True))
        return dh, dk, sums

    dk = vary(jnp.zeros(kernel.shape, kernel.dtype), *varying)
    sums = tuple(vary(jnp.zeros_like(s), *varying) for s in sums_like)
    return jax.lax.fori_loop(0, col_span.count(vc), vocab_step, (dh, dk, sums))


def _row_pass(hidden, kernel, spans, chunks, block: BlockGradient, cdt, varying, epilogue: bool):
    """``dh``, one row block at a time: token chunks outside, each ``[token_chunk, D]`` block
    accumulated in ``cdt`` and written once in ``hidden``'s dtype (no full-size accumulator)."""
    row_span, col_span = spans
    nc, vc = chunks

    def token_step(i, out):
        rows = row_span.chunk(i, nc)

        def vocab_step(j, acc):
            cols = col_span.chunk(j, vc)
            _, k_j, dz_mm, _, _ = _block(hidden, kernel, block, rows, cols, chunks, epilogue)
            return acc + dot(dz_mm, k_j, (1, 1), cdt)

        acc = vary(jnp.zeros((nc, hidden.shape[1]), cdt), *varying)
        return put_fresh(out, jax.lax.fori_loop(0, col_span.count(vc), vocab_step, acc), rows)

    init = vary(jnp.zeros_like(hidden), *varying)
    return jax.lax.fori_loop(0, row_span.count(nc), token_step, init)


# Platforms whose recomputing pass carries a half-precision ``hidden``'s gradient in float32
# through the kernel pass (one backward sweep, four N·D·V matmuls with the forward's) instead of
# giving it a pass of its own (five). The carry is ``N·D`` float32 (128 MiB at N=8192, D=4096),
# read and written once per vocabulary chunk. Modelled value_and_grad (mean, bf16;
# benchmarks/hlo.py): H100 at N=8192, D=4096, V=131072 66.4 -> 42.5 ms (with its blocks,
# see jaxloss._blockwise.blocks.ACCELERATOR_BLOCK), TPU v5p at D=2048 51.6 -> 48.2 ms at 1024²
# blocks.
# On CPU the separate pass keeps the temporaries at a few blocks. A carry over CARRY_MAX_BYTES
# (N·D beyond 16384×4096) is not taken anywhere: the pass of its own keeps memory bounded.
CARRY_PLATFORMS: tuple[str, ...] = ("cuda", "tpu")
CARRY_MAX_BYTES = 2**28


def head_gradients(
    hidden, kernel, spans: tuple[Span, Span], chunks, block: BlockGradient, cdt, sum_dtypes, varying
) -> tuple[jax.Array, jax.Array, tuple[Any, ...]]:
    """``(dh, dk, (db, *sums))`` of a linear head, recomputing each logit block.

    ``db`` is ``Σ_rows ∂ℓ/∂z``, the other sums ``block``'s own; ``sum_dtypes`` their dtypes;
    every accumulator is in the compute dtype ``cdt``. A ``hidden`` in ``cdt`` gets its
    gradient accumulated in place over the kernel pass (four ``N·D·V`` matmuls with the
    forward's). A half-precision one needs a ``cdt`` carry of its size for that (128 MiB at
    N=8192, D=4096): on :data:`CARRY_PLATFORMS` it gets one up to :data:`CARRY_MAX_BYTES`
    (four matmuls, each block's logit gradient feeding both gradients); otherwise its own
    pass (five matmuls, no temporary larger than a few blocks).
    """
    sums_like = tuple(jnp.zeros((kernel.shape[1],), t) for t in sum_dtypes)

    def one_pass(epilogue: bool):
        dh = vary(jnp.zeros(hidden.shape, cdt), *varying)
        dh, dk, sums = _column_pass(
            hidden, kernel, spans, chunks, block, dh, sums_like, cdt, varying, epilogue
        )
        return dh.astype(hidden.dtype), dk, sums

    def two_passes(epilogue: bool):
        _, dk, sums = _column_pass(
            hidden, kernel, spans, chunks, block, None, sums_like, cdt, varying, epilogue
        )
        dh = _row_pass(hidden, kernel, spans, chunks, block, cdt, varying, epilogue)
        return dh.astype(hidden.dtype), dk, sums

    in_place = jnp.dtype(hidden.dtype) == jnp.dtype(cdt)
    fits = hidden.size * jnp.dtype(cdt).itemsize <= CARRY_MAX_BYTES
    forms: dict[tuple[bool, bool], Callable] = {}  # one callable per form: each traced once

    def form(platform: str) -> Callable:
        carried = in_place or (platform in CARRY_PLATFORMS and fits)
        epilogue = platform in EPILOGUE_PLATFORMS and block.target_entries is not None
        key = (carried, epilogue)
        return forms.setdefault(
            key, functools.partial(one_pass if carried else two_passes, epilogue)
        )

    chosen = {p: form(p) for p in ("cpu", "cuda", "tpu", *CARRY_PLATFORMS, *EPILOGUE_PLATFORMS)}
    if len(forms) == 1:
        return chosen["cpu"]()
    default = chosen.pop("cpu")
    return jax.lax.platform_dependent(**chosen, default=default)
