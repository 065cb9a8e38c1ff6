"""The linear head's block rules: per-token statistics of ``hidden @ kernel + bias`` without the
logits, and their gradients, on the shared blockwise engine (:mod:`jaxloss._blockwise`).

The loss needs only a few numbers per token — the maximum logit ``m_n`` and
``log Σ_c e^(z_{n,c} - m_n)``, the target logit ``z_{n,y_n}``, ``Σ_c w_c (m_n - z_{n,c})`` for
label smoothing, ``Σ_c w_c t_{n,c} (m_n - z_{n,c})`` for probability targets — and the
per-token statistics (argmax, entropy) need two more, so all of them are accumulated one
``token_chunk × vocab_chunk`` block of (soft-capped) logits at a time: an online logsumexp over
vocabulary chunks, the sums moved along with the running maximum. Every term stays relative to
the maximum, as in ``cross_entropy``: ``logsumexp(z) - z_y`` would cancel at large logits (1e8
in float32).

Two differentiable forms share those block rules:

- :func:`token_stats` returns the statistics per token; the engine's recomputing backward pass
  recomputes each logit block (four ``N·D·V`` matmuls in a ``value_and_grad``; on CPU five
  for a half-precision ``hidden``, see ``jaxloss._blockwise.passes.CARRY_PLATFORMS``). For
  ``reduction="none"``, the ``shard_map`` form, where the per-token cotangents are only known
  in the backward pass, and for every reduction on GPUs and TPUs, where no float32 gradient
  of the whole kernel may be held.
- :func:`fused_total` returns the summed loss; when differentiated, its forward rule already
  computes the gradient (Liger Kernel's method: per token chunk, the logits over the whole
  vocabulary, their logsumexp, then ``softmax − onehot`` contracted into the gradients): three
  matmuls, and the backward pass only scales. Its primal (forward-only calls) is the cheap
  blocked pass.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxloss import _dtypes
from jaxloss._blockwise import passes, vjp
from jaxloss._blockwise.blocks import (
    Chunk,
    Span,
    chunk,
    default_chunks,
    dot,
    finite_or_zero,
    live_columns,
    maybe_take,
    num_chunks,
    positive_int,
    put,
    put_fresh,
    take,
    vary,
    whole,
    zero_rows,
)
from jaxloss._blockwise.online import Normaliser, fold_block, online_step

# The fused gradient pass holds [rows, V] logits: 2^24 of them (64 MiB in float32) per block
# keeps value_and_grad at N=8192, D=2048, V=131072 at ~84 MiB of temporaries, with 512 rows at
# V=32768, where on a 2-core x86 CPU it measured 0.65x the materialised path's time (128 rows:
# 0.97x; the kernel gradient is read and written once per block of rows).
DEFAULT_FUSED_BLOCK = 2**24


@dataclasses.dataclass(frozen=True)
class ChunkConfig:
    """Block sizes of the blocked kernel, validated on construction.

    Attributes:
      token_chunk: rows of ``hidden`` per block (clipped to the number of tokens); ``None``:
        the backend's default (on GPUs and TPUs every token up to
        :data:`ACCELERATOR_TOKEN_CHUNK`, beyond that :data:`ACCELERATOR_CHUNK`;
        :data:`DEFAULT_TOKEN_CHUNK` on CPUs).
      vocab_chunk: columns of ``kernel`` per block (clipped to the number of classes); ``None``:
        the backend's default (on GPUs and TPUs :data:`ACCELERATOR_BLOCK` logits per block, or
        :data:`ACCELERATOR_CHUNK` beyond :data:`ACCELERATOR_TOKEN_CHUNK` tokens;
        :data:`DEFAULT_VOCAB_CHUNK` on CPUs).
      grad_token_chunk: rows per block of the fused gradient pass, which holds
        ``[grad_token_chunk, V]`` logits; ``None``: ``2**24 // V`` (at least 1).
    """

    token_chunk: int | None = None
    vocab_chunk: int | None = None
    grad_token_chunk: int | None = None
    fn: dataclasses.InitVar[str] = "linear_cross_entropy"

    def __post_init__(self, fn: str) -> None:
        for field in ("token_chunk", "vocab_chunk", "grad_token_chunk"):
            value = getattr(self, field)
            if value is not None:
                object.__setattr__(self, field, positive_int(fn, field, value))

    def clipped(self, tokens: int, classes: int, accelerator: bool = False) -> tuple[int, int, int]:
        """``(token_chunk, vocab_chunk, grad_token_chunk)`` no larger than the array they cut,
        the defaults of GPUs and TPUs where ``accelerator``."""
        rows, cols = default_chunks(
            tokens, classes, self.token_chunk, self.vocab_chunk, accelerator
        )
        fused = self.grad_token_chunk or max(1, DEFAULT_FUSED_BLOCK // classes)
        return rows, cols, min(fused, tokens)


def _absorbing(u: jax.Array, z: jax.Array) -> jax.Array:
    """``u · z`` with ``0 · z = 0`` for every ``z`` (a masked ``-inf`` logit without mass)."""
    return jnp.where(u == 0, 0, u * z)


# ----------------------------------------------------------------------------------------------
# The problem, and one block of it
# ----------------------------------------------------------------------------------------------


class Problem(NamedTuple):
    """Everything the kernel reads; ``labels`` xor ``probs`` are the targets.

    ``hidden (N, D)``, ``kernel (D, V)``, ``bias (V,)`` or None, ``labels (N,)`` int32 class
    indices (any value outside ``[0, V)`` hits no column), ``probs (N, V)`` probability targets,
    ``class_weight (V,)`` or None, ``soft_cap`` a scalar or None. ``weighted_sum`` (static):
    whether ``Σ_c w_c z_c`` is needed (label smoothing may be nonzero); ``with_stats`` (static):
    whether argmax and entropy are accumulated.
    """

    hidden: jax.Array
    kernel: jax.Array
    bias: Any  # None when absent
    labels: Any  # None when absent
    probs: Any  # None when absent
    class_weight: Any  # None when absent
    soft_cap: Any  # None when absent
    weighted_sum: bool
    with_stats: bool
    # The columns this device covers (uneven vocabulary shards): from ``col_start`` (``None``:
    # 0), ``width`` of them (``None``: every column), those before ``owned_from`` stale.
    col_start: Any = None
    width: int | None = None
    owned_from: Any = None

    @property
    def columns(self) -> Span:
        width = self.kernel.shape[1] if self.width is None else self.width
        return Span(0 if self.col_start is None else self.col_start, width, self.owned_from)

    @property
    def cdt(self) -> Any:
        return _dtypes.compute_dtype(jnp.result_type(self.hidden.dtype, self.kernel.dtype))

    @property
    def arrays(self) -> tuple[Any, ...]:
        return (self.hidden, self.kernel, self.bias, self.labels, self.probs, self.class_weight)


# Accumulator names: running max and the exp-sum relative to it; target logit; Σ w t (m - z) and
# Σ w t; Σ w (m - z) and Σ w; argmax; Σ e^(z - m) (m - z) (entropy). The sums are kept relative
# to the running max m (and moved with it): no large logit cancels against another.
_ALL = ("m", "s", "tgt", "tgap", "tmass", "wgap", "wmass", "arg", "ent")


def _names(p: Problem) -> tuple[str, ...]:
    keep = {"m", "s"}
    keep |= {"tgt"} if p.labels is not None else {"tgap", "tmass"}
    keep |= {"wgap", "wmass"} if p.weighted_sum else set()
    keep |= {"arg", "ent"} if p.with_stats else set()
    return tuple(name for name in _ALL if name in keep)


def _init(p: Problem, n: int) -> dict[str, jax.Array]:
    cdt = p.cdt
    acc = {name: jnp.zeros((n,), cdt) for name in _names(p)}
    acc["m"] = jnp.full((n,), -jnp.inf, cdt)
    if "arg" in acc:
        acc["arg"] = jnp.zeros((n,), jnp.int32)
    return {k: vary(v, *p.arrays) for k, v in acc.items()}


class Block(NamedTuple):
    """One block: its rows and columns, and the slices of the problem they read."""

    rows: Chunk
    cols: Chunk
    labels: Any  # None when absent; (rows,)
    probs: Any  # None when absent; (rows, cols)
    weight: Any  # None when absent; (cols,)


def _block(p: Problem, rows: Chunk, cols: Chunk, nc: int, vc: int) -> Block:
    probs = None
    if p.probs is not None:
        probs = take(take(p.probs, rows.start, nc), cols.start, vc, 1).astype(p.cdt)
    return Block(
        rows, cols, maybe_take(p.labels, rows.start, nc), probs,
        maybe_take(p.class_weight, cols.start, vc),
    )  # fmt: skip


def _capped_logits(p: Problem, h_i, k_j, b_j, cols: Chunk) -> jax.Array:
    """``c · tanh((h K + b) / c)`` of one block (no cap: ``h K + b``), stale columns ``-inf``."""
    z = dot(h_i, k_j, (1, 0), p.cdt)
    if b_j is not None:
        z = z + b_j.astype(p.cdt)[None, :]
    if p.soft_cap is not None:
        cap = p.soft_cap.astype(p.cdt)
        z = cap * jnp.tanh(z / cap)
    return z if cols.fresh is None else jnp.where(cols.fresh[None, :], z, -jnp.inf)


def _live(z: jax.Array, cols: Chunk) -> jax.Array:
    """``z`` with stale columns at 0, for the linear sums."""
    return z if cols.fresh is None else jnp.where(cols.fresh[None, :], z, 0)


def _moved(gap, mass, block_sum, step):
    """``Σ_c u_c (m - z_c)`` of the columns so far, its shift moved up by ``step`` (``mass``:
    ``Σ_c u_c`` of the columns before this block, whose gaps each grow by ``step``)."""
    return gap + mass * step + block_sum


def _target_column(labels: jax.Array, cols: Chunk, width: int) -> tuple[jax.Array, jax.Array]:
    """Each row's target column in a block of ``width`` columns (clipped into it) and whether
    it is there: inside the block and fresh (not a stale column of a slid-back chunk, nor
    another device's)."""
    local = labels - cols.start
    inside = (local >= 0) & (local < width)
    local = jnp.clip(local, 0, width - 1)
    if cols.fresh is not None:
        inside = inside & jnp.take(cols.fresh, local)
    return local, inside


def _absorb(acc: dict, z: jax.Array, blk: Block) -> dict:
    """The accumulators after one more block of logits ``z`` (rows × cols) of the same rows."""
    if set(acc) <= {"m", "s", "tgt"}:  # no other sum over the block: one fold of max and sum
        top, total = fold_block(acc["m"], acc["s"], z)
        new: dict[str, jax.Array] = {"m": top, "s": total}
    else:
        new = _absorb_sums(acc, z, blk)
    if "tgt" in acc:
        local, hit = _target_column(blk.labels, blk.cols, z.shape[1])
        picked = jnp.take_along_axis(z, local[:, None], 1)[:, 0]
        new["tgt"] = acc["tgt"] + jnp.where(hit, picked, 0)
    return new


def _absorb_sums(acc: dict, z: jax.Array, blk: Block) -> dict:
    """:func:`_absorb`'s max, exp-sum and the sums relative to the shift (gaps, entropy)."""
    cols = blk.cols
    online = online_step(acc["m"], z)
    step, rescale, gap, e = online.step, online.rescale, online.gap, online.exp
    new = {"m": online.max, "s": online.sum_after(acc["s"])}
    if "tgap" in acc:
        u = _live(blk.probs if blk.weight is None else blk.probs * blk.weight[None, :], cols)
        new["tgap"] = _moved(acc["tgap"], acc["tmass"], jnp.sum(_absorbing(u, gap), 1), step)
        new["tmass"] = acc["tmass"] + jnp.sum(u, 1)
    if "wgap" in acc:
        w = jnp.ones_like(z[:1]) if blk.weight is None else blk.weight[None, :]
        block_sum = jnp.sum(_live(gap if blk.weight is None else gap * w, cols), 1)
        new["wgap"] = _moved(acc["wgap"], acc["wmass"], block_sum, step)
        new["wmass"] = acc["wmass"] + jnp.sum(_live(w, cols), 1)
    if "arg" in acc:
        # Strictly greater: a tie keeps the earlier (lower) class index, as jnp.argmax.
        better = jnp.max(z, 1) > acc["m"]
        new["arg"] = jnp.where(better, cols.start + jnp.argmax(z, 1).astype(jnp.int32), acc["arg"])
        moved = rescale * (acc["ent"] + acc["s"] * step)
        new["ent"] = moved + jnp.sum(_absorbing(e, gap), 1)
    return new


class Stats(NamedTuple):
    """Per-token results of the blocked pass (``None`` where not asked for), relative to the
    row's maximum logit ``max`` — its finite part :attr:`shift` is a constant to the gradients
    (the loss does not depend on it):

    ``log_sum = log Σ_c e^(z_c - shift)``, ``tgt`` the target logit itself, ``tgap = Σ_c w_c
    t_c (shift - z_c)``, ``wgap = Σ_c w_c (shift - z_c)``. The loss reads ``tgt - shift`` and
    the gaps, never ``lse - z``: at large logits (1e8 in float32) ``lse`` rounds to the max and
    ``lse - z_y`` would lose every digit of ``-log p_y``.
    """

    max: jax.Array
    log_sum: jax.Array
    tgt: Any  # None when absent
    tgap: Any  # None when absent
    wgap: Any  # None when absent
    arg: Any  # None when absent
    entropy: Any  # None when absent

    @property
    def shift(self) -> jax.Array:
        return jax.lax.stop_gradient(finite_or_zero(self.max))

    @property
    def lse(self) -> jax.Array:
        return self.shift + self.log_sum


def _finish(acc: dict) -> Stats:
    log_sum = jnp.log(acc["s"])
    entropy = None if "ent" not in acc else log_sum + acc["ent"] / acc["s"]
    get = acc.get
    return Stats(acc["m"], log_sum, get("tgt"), get("tgap"), get("wgap"), get("arg"), entropy)


# ----------------------------------------------------------------------------------------------
# The forward pass (vocabulary chunks outside, token chunks inside)
# ----------------------------------------------------------------------------------------------


def blocked_stats(p: Problem, chunks: tuple[int, ...]) -> Stats:
    """Per-token statistics, one ``token_chunk × vocab_chunk`` block of logits at a time."""
    nc, vc = chunks

    def columns(cols: Chunk):
        return take(p.kernel, cols.start, vc, 1), maybe_take(p.bias, cols.start, vc)

    def absorb(rows: Chunk, cols: Chunk, column_data, old):
        k_j, b_j = column_data
        z = _capped_logits(p, take(p.hidden, rows.start, nc), k_j, b_j, cols)
        return _absorb(old, z, _block(p, rows, cols, nc, vc))

    spans = (Span.whole(p.hidden.shape[0]), p.columns)
    init = _init(p, p.hidden.shape[0])
    return _finish(passes.sweep(spans, chunks, init, columns, absorb, ()))


# ----------------------------------------------------------------------------------------------
# Gradients of one block
# ----------------------------------------------------------------------------------------------


class Cotangents(NamedTuple):
    """Per-token cotangents of ``log_sum``, ``tgt``, ``tgap`` and ``wgap`` (``None``: not used)."""

    log_sum: Any
    tgt: Any  # None when absent
    tgap: Any  # None when absent
    wgap: Any  # None when absent

    def rows(self, start, width: int) -> Cotangents:
        return Cotangents(*(None if g is None else take(g, start, width)[:, None] for g in self))

    def counted(self) -> jax.Array:
        """Whether each row has any nonzero (or NaN) cotangent; the others contribute nothing."""
        return functools.reduce(jnp.logical_or, (g != 0 for g in self if g is not None))


class RowFlags(NamedTuple):
    """Per-row flags: ``live``, any cotangent (:meth:`Cotangents.counted`); ``has_log_sum``, a
    log-sum cotangent."""

    live: jax.Array
    has_log_sum: jax.Array

    @classmethod
    def of(cls, g: Cotangents) -> RowFlags:
        return cls(g.counted(), g.log_sum != 0)

    def rows(self, start, width: int) -> RowFlags:
        return RowFlags(*(take(f, start, width)[:, None] for f in self))


def _logit_gradient(p: Problem, z, norm: Normaliser, g: Cotangents, flags: RowFlags, hit, probs,
                    weight) -> tuple[jax.Array, Any]:  # fmt: skip
    """``(∂/∂(hK + b), mass)`` at the logits ``z``, stale entries not yet zeroed.

    With the shift held constant, ``∂/∂z = g_log_sum softmax(z) + g_tgt [c = y] − (g_tgap t +
    g_wgap) w`` (``mass = g_tgap t + g_wgap``), then through the cap: ``∂z/∂x = 1 − (z / c)²``.
    ``hit``: where ``c = y`` (``None``: no target term); ``probs`` (``t``) and ``weight``
    (``w``, ``None``: 1) broadcast like ``z``. Rows without a log-sum cotangent (ignored
    targets) get exactly nothing from it, even where their logits are NaN.
    """
    dz = jnp.where(flags.has_log_sum, g.log_sum * norm.softmax(z), 0)
    if g.tgt is not None and hit is not None:
        dz = dz + jnp.where(hit, g.tgt, 0)
    mass = 0
    if g.tgap is not None:
        mass = g.tgap * probs
    if g.wgap is not None:
        mass = mass + g.wgap
    if g.tgap is not None or g.wgap is not None:
        dz = dz - (mass if weight is None else mass * weight)
    if p.soft_cap is not None:
        dz = dz * (1 - jnp.square(z / p.soft_cap.astype(z.dtype)))
    return dz, mass


def _block_grads(p: Problem, z, norm: Normaliser, g: Cotangents, blk: Block,
                 flags: RowFlags | None = None, hit: bool = True):  # fmt: skip
    """``(∂/∂(hK + b), ∂/∂w)`` of one block; stale rows and columns contribute nothing.
    ``flags``: the block rows' :class:`RowFlags` (``None``: read off ``g``); ``hit=False``
    leaves each row's target entry without its ``g_tgt`` term (:meth:`_BlockGradient.target_entries`
    sets those entries)."""
    flags = RowFlags.of(g) if flags is None else flags
    target = None
    if hit and g.tgt is not None:
        target = (
            jax.lax.iota(jnp.int32, z.shape[1])[None, :] == (blk.labels - blk.cols.start)[:, None]
        )
    weight = None if blk.weight is None else blk.weight[None, :]
    dz, mass = _logit_gradient(p, z, norm, g, flags, target, blk.probs, weight)
    dw = None
    if blk.weight is not None and (g.tgap is not None or g.wgap is not None):
        gap = _live(norm.shift - z, blk.cols)
        if blk.rows.fresh is not None:
            gap = jnp.where(blk.rows.fresh[:, None], gap, 0)
        dw = jnp.sum(_absorbing(jnp.broadcast_to(mass, z.shape), gap), 0)
    return passes.quiet(dz, flags.live, blk.rows, blk.cols), dw


# ----------------------------------------------------------------------------------------------
# Per-token statistics, with the engine's recomputing backward pass
# ----------------------------------------------------------------------------------------------


class _Differentiated(NamedTuple):
    hidden: Any  # an array; None as a cotangent that is zero
    kernel: Any
    bias: Any
    class_weight: Any


class _Data(NamedTuple):
    labels: Any
    probs: Any
    soft_cap: Any
    col_start: Any
    owned_from: Any


def _split(p: Problem) -> tuple[_Differentiated, _Data]:
    diff = _Differentiated(p.hidden, p.kernel, p.bias, p.class_weight)
    return diff, _Data(p.labels, p.probs, p.soft_cap, p.col_start, p.owned_from)


@dataclasses.dataclass(frozen=True)
class _Static:
    chunks: tuple[int, ...]
    weighted_sum: bool
    with_stats: bool
    width: int | None

    def problem(self, diff: _Differentiated, data: _Data) -> Problem:
        return Problem(
            diff.hidden, diff.kernel, diff.bias, data.labels, data.probs, diff.class_weight,
            data.soft_cap, self.weighted_sum, self.with_stats, data.col_start, self.width,
            data.owned_from,
        )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class _BlockGradient:
    """The recomputing pass's rule for one block (:class:`passes.BlockGradient`). ``flags``:
    every row's :class:`RowFlags`, computed once, outside the loops (``passes.row_flags``);
    ``tgt``: each row's (capped) target logit, from the forward pass."""

    p: Problem
    chunks: tuple[int, ...]
    norm: Normaliser
    g: Cotangents
    flags: RowFlags
    tgt: Any

    def live(self, rows: Chunk) -> jax.Array:
        return self.flags.rows(rows.start, self.chunks[0]).live

    def __call__(self, rows: Chunk, cols: Chunk, h_i, k_j, hit: bool = True):
        p, (nc, vc) = self.p, self.chunks
        z = _capped_logits(p, h_i, k_j, maybe_take(p.bias, cols.start, vc), cols)
        g_i, flags = self.g.rows(rows.start, nc), self.flags.rows(rows.start, nc)
        blk = _block(p, rows, cols, nc, vc)
        dz, dw = _block_grads(p, z, self.norm.rows(rows.start, nc), g_i, blk, flags, hit)
        return dz, (dw,)

    @property
    def target_entries(self) -> Callable | None:
        # XLA:GPU takes no logits with two uses into the gemm's epilogue: a soft cap's (the
        # capped logits in the softmax and in its slope), a bias's (its gradient sums the block
        # in float32), class weights' with smoothing (their gradient sums the gaps). There the
        # entries set apart only add a scatter (H100, the head above: with a bias 42.48 ->
        # 45.04 ms).
        p, g = self.p, self.g
        one_use = p.soft_cap is None and p.bias is None
        one_use = one_use and (p.class_weight is None or g.wgap is None)
        return self._targets if one_use and g.tgt is not None else None

    def _targets(self, rows: Chunk, cols: Chunk) -> tuple[jax.Array, jax.Array]:
        """Each row's target column in the block (``vc`` where it is not there, a stale
        column's included) and ``∂ℓ/∂z`` at it, from the forward pass's target logit."""
        p, (nc, vc) = self.p, self.chunks
        labels = take(p.labels, rows.start, nc)
        local, inside = _target_column(labels, cols, vc)
        weight = None
        if p.class_weight is not None:
            at = jnp.clip(labels, 0, p.class_weight.shape[0] - 1)
            weight = jnp.take(p.class_weight, at).astype(p.cdt)[:, None]
        flags = self.flags.rows(rows.start, nc)
        dz, _ = _logit_gradient(
            p, take(self.tgt, rows.start, nc)[:, None], self.norm.rows(rows.start, nc),
            self.g.rows(rows.start, nc), flags, True, None, weight,
        )  # fmt: skip
        live = flags.live if rows.fresh is None else flags.live & rows.fresh[:, None]
        return jnp.where(inside, local, vc), jnp.where(live, dz, 0)[:, 0]


@dataclasses.dataclass(frozen=True)
class _TokenStats(_Static):
    """:func:`token_stats` as an engine op: statistics forward, recomputing backward."""

    def forward(self, diff, data):
        stats = blocked_stats(self.problem(diff, data), self.chunks[:2])
        return stats, (Normaliser(stats.shift, stats.log_sum), stats.tgt)

    def backward(self, diff, data, saved, cotangents: Stats):
        p, (norm, tgt) = self.problem(diff, data), saved
        # The max's cotangent is dropped: the statistics are relative to it, the loss is not.
        g = Cotangents(cotangents.log_sum, cotangents.tgt, cotangents.tgap, cotangents.wgap)
        flags = RowFlags(*passes.row_flags(*RowFlags.of(g)))
        block = _BlockGradient(p, self.chunks[:2], norm, g, flags, tgt)
        spans = (Span.whole(p.hidden.shape[0]), p.columns)
        dtypes = (_dtype(p.bias, p.cdt), _dtype(p.class_weight, p.cdt))
        varying = (*p.arrays, *g)
        dh, dk, (db, dw) = passes.head_gradients(
            p.hidden, p.kernel, spans, self.chunks[:2], block, p.cdt, dtypes, varying
        )
        return _Differentiated(*_cast_grads(p, dh, dk, db, dw))


def _dtype(x, default):
    return default if x is None else x.dtype


def token_stats(p: Problem, chunks: tuple[int, int]) -> Stats:
    """Per-token :class:`Stats` of ``p``, differentiable (reverse mode) in ``hidden``,
    ``kernel``, ``bias`` and ``class_weight`` through ``log_sum``, ``tgt``, ``tgap`` and
    ``wgap`` (``max`` is a constant to them: its cotangent is ignored)."""
    op = _TokenStats(tuple(chunks), p.weighted_sum, p.with_stats, p.width)
    return vjp.apply(op, *_split(p))


# ----------------------------------------------------------------------------------------------
# The summed loss, with its gradient computed in the forward pass
# ----------------------------------------------------------------------------------------------

RowLoss = Callable[..., jax.Array]


def _stats_out(p: Problem, stats: Stats) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    return stats.lse, stats.arg, stats.entropy


def _fused_chunk(p: Problem, hyper, row_loss: RowLoss, rows: Chunk, chunks, grads):
    """One token chunk of the fused pass: its losses and statistics; the gradients updated.

    Pass 1 reduces the chunk's logits over the whole vocabulary to the statistics and
    ``row_loss``'s VJP gives the per-token cotangents; pass 2 walks over vocabulary chunks of
    those same logits, contracting ``∂ℓ/∂z`` into the gradients (the kernel's gradient is
    updated in place, one column block at a time).
    """
    nc, vc = chunks
    v = p.kernel.shape[1]
    mm = jnp.result_type(p.hidden.dtype, p.kernel.dtype)
    h_i = take(p.hidden, rows.start, nc)
    blk = _block(p, rows, whole(v), nc, v)
    z = _capped_logits(p, h_i, p.kernel, p.bias, blk.cols)
    stats = _finish(_absorb(_init(p, nc), z, blk))

    def chunk_loss(log_sum, tgt, tgap, wgap, class_weight):
        moved = stats._replace(log_sum=log_sum, tgt=tgt, tgap=tgap, wgap=wgap)
        return row_loss(moved, blk, class_weight, hyper)

    differentiated = (stats.log_sum, stats.tgt, stats.tgap, stats.wgap, p.class_weight)
    losses, vjp_fn = jax.vjp(chunk_loss, *differentiated)
    fresh = jnp.ones((nc,), losses.dtype)
    if rows.fresh is not None:
        fresh = rows.fresh.astype(losses.dtype)
    *g, dw_outer = vjp_fn(fresh)
    g = Cotangents(*(None if a is None else a[:, None] for a in g))
    norm = Normaliser(stats.shift[:, None], stats.log_sum[:, None])
    # The logits above are the statistics' (defined at every token); the gradient's matmuls
    # read no hidden row of a token without a cotangent.
    live = g.counted() if rows.fresh is None else g.counted() & rows.fresh[:, None]
    h_live = zero_rows(h_i, live).astype(mm)

    def vocab_step(j, carry):
        dh_i, dk, db, dw = carry
        cols = chunk(j, vc, v)
        k_j = live_columns(take(p.kernel, cols.start, vc, 1), cols)
        # Stale columns and rows get a zero logit gradient and zeroed operands (no 0 · inf).
        dz, dw_j = _block_grads(
            p, take(z, cols.start, vc, 1), norm, g, _block(p, rows, cols, nc, vc)
        )
        dz = dz.astype(mm)
        dh_i = dh_i + dot(dz, k_j.astype(mm), (1, 1), p.cdt)
        dk_j = take(dk, cols.start, vc, 1) + dot(h_live, dz, (0, 0), p.cdt)
        dk = put_fresh(dk, dk_j, cols, 1)
        db = put(db, take(db, cols.start, vc) + jnp.sum(dz.astype(p.cdt), 0), cols.start)
        if dw_j is not None:
            dw = put(dw, take(dw, cols.start, vc) + dw_j, cols.start)
        return dh_i, dk, db, dw

    dh, dk, db, dw = grads
    dh_i = vary(jnp.zeros((nc, dh.shape[1]), p.cdt), *p.arrays)
    dh_i, dk, db, dw = jax.lax.fori_loop(0, num_chunks(v, vc), vocab_step, (dh_i, dk, db, dw))
    if dw_outer is not None:
        dw = dw + dw_outer.astype(p.cdt)
    grads = (put_fresh(dh, dh_i, rows), dk, db, dw)
    return jnp.sum(losses * fresh), _stats_out(p, stats), grads


def _grad_zeros(p: Problem):
    n, d = p.hidden.shape
    v = p.kernel.shape[1]
    cdt = p.cdt
    zeros = (jnp.zeros((n, d), cdt), jnp.zeros((d, v), cdt), jnp.zeros((v,), cdt))
    return tuple(vary(a, *p.arrays) for a in (*zeros, jnp.zeros((v,), cdt)))


def _cast_grads(p: Problem, dh, dk, db, dw):
    return (
        dh.astype(p.hidden.dtype),
        dk.astype(p.kernel.dtype),
        None if p.bias is None else db.astype(p.bias.dtype),
        None if p.class_weight is None else dw.astype(p.class_weight.dtype),
    )


def fused_forward_and_grads(p: Problem, hyper, row_loss: RowLoss, chunks: tuple[int, int]):
    """``(Σ_n ℓ_n, (lse, argmax, entropy), grads)`` with per token chunk the whole vocabulary.

    Pass 1 reduces a chunk's logits to the statistics, ``row_loss``'s VJP gives the per-token
    cotangents, pass 2 forms ``∂ℓ/∂z`` and contracts it into the gradients: three ``N·D·V``
    matmuls, ``[nc, V]`` logits at a time.
    """
    n = p.hidden.shape[0]
    nc = chunks[0]

    def token_step(i, carry):
        total, stats, grads = carry
        rows = chunk(i, nc, n)
        loss_i, stats_i, grads = _fused_chunk(p, hyper, row_loss, rows, chunks, grads)
        new = tuple(
            None if full is None or part is None else put_fresh(full, part, rows)
            for full, part in zip(stats, stats_i, strict=True)
        )
        return total + loss_i, new, grads

    cdt = p.cdt
    stats = (jnp.zeros((n,), cdt), None, None)
    if p.with_stats:
        stats = (stats[0], jnp.zeros((n,), jnp.int32), jnp.zeros((n,), cdt))
    stats = tuple(None if a is None else vary(a, *p.arrays) for a in stats)
    init = (vary(jnp.zeros((), cdt), *p.arrays), stats, _grad_zeros(p))
    total, stats, grads = jax.lax.fori_loop(0, num_chunks(n, nc), token_step, init)
    return total, stats, _cast_grads(p, *grads)


def whole_block(p: Problem) -> Block:
    """All rows and columns of ``p`` as one block (what the assembly reads)."""
    n, v = p.hidden.shape[0], p.kernel.shape[1]
    probs = None if p.probs is None else p.probs.astype(p.cdt)
    return Block(whole(n), whole(v), p.labels, probs, p.class_weight)


@dataclasses.dataclass(frozen=True)
class _FusedTotal(_Static):
    """:func:`fused_total` as an engine op: the gradient formed in the forward rule from
    logits already in hand (three ``N·D·V`` matmuls instead of four); forward-only calls keep
    the cheap blocked pass (the primal). Measured: see docs/linear.md."""

    row_loss: RowLoss = dataclasses.field(default=None)  # pyright: ignore[reportAssignmentType]

    def primal(self, diff, data_and_hyper):
        data, hyper = data_and_hyper
        p = self.problem(diff, data)
        stats = blocked_stats(p, self.chunks[:2])
        losses = self.row_loss(stats, whole_block(p), p.class_weight, hyper)
        return jnp.sum(losses), _stats_out(p, stats)

    def forward(self, diff, data_and_hyper):
        data, hyper = data_and_hyper
        p = self.problem(diff, data)
        chunks = (self.chunks[2], self.chunks[1])
        total, stats, grads = fused_forward_and_grads(p, hyper, self.row_loss, chunks)
        return (total, stats), grads

    def backward(self, diff, data, grads, cotangents):
        g = cotangents[0]
        return _Differentiated(*(None if x is None else (g * x).astype(x.dtype) for x in grads))


def fused_total(
    p: Problem, hyper, row_loss: RowLoss, chunks: tuple[int, int, int]
) -> tuple[jax.Array, Any]:
    """``(Σ_n row_loss_n, (lse, argmax, entropy))``, differentiable (reverse mode) in
    ``hidden``, ``kernel``, ``bias`` and ``class_weight``; ``hyper`` is not differentiated.

    ``row_loss(stats, block, class_weight, hyper)`` maps a :class:`Stats` of some rows (and the
    :class:`Block` holding their targets) to their losses; it must be a hashable callable.
    """
    op = _FusedTotal(tuple(chunks), p.weighted_sum, p.with_stats, p.width, row_loss)
    diff, data = _split(p)
    return vjp.apply(op, diff, (data, hyper))
