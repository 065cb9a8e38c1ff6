"""The blocked kernel: per-token statistics of ``hidden @ kernel + bias`` without the logits.

The loss needs only a few numbers per token — the maximum logit ``m_n`` and
``log Σ_c e^(z_{n,c} - m_n)``, the target logit ``z_{n,y_n}``, ``Σ_c w_c (m_n - z_{n,c})`` for
label smoothing, ``Σ_c w_c t_{n,c} (m_n - z_{n,c})`` for probability targets — and the
per-token statistics (argmax, entropy) need two more, so all of them are accumulated one
``token_chunk × vocab_chunk`` block of (soft-capped) logits at a time: an online logsumexp over
vocabulary chunks (a running maximum and a rescaled running sum, Milakov & Gimelshein 2018),
the sums moved along with the running maximum. Every term stays relative to the maximum, as in
``cross_entropy``: ``logsumexp(z) - z_y`` would cancel at large logits (1e8 in float32).

Two differentiable forms share those block rules:

- :func:`token_stats` returns the statistics per token; its ``custom_vjp`` recomputes each
  logit block in the backward pass (four ``N·D·V`` matmuls in a ``value_and_grad``; five for a
  half-precision ``hidden``, whose gradient gets a pass of its own rather than a float32
  accumulator of its full size). For ``reduction="none"``, the ``shard_map`` form, where the
  per-token cotangents are only known in the backward pass, and for every reduction on GPUs
  and TPUs, where nothing larger than a few blocks may be held.
- :func:`fused_total` returns the summed loss; when differentiated, its forward rule already
  computes the gradient (Liger Kernel's method: per token chunk, the logits over the whole
  vocabulary, their logsumexp, then ``softmax − onehot`` contracted into the gradients): three
  matmuls, and the backward pass only scales. Its primal (forward-only calls) is the cheap
  blocked pass.

Blocks that do not divide evenly are handled without padding (which would copy the kernel): the
last chunk is slid back to end at the array's edge and the rows or columns it shares with the
previous chunk are masked out.

Small helpers other blockwise losses may reuse: :class:`ChunkConfig`, :func:`chunk`,
:func:`num_chunks`, :func:`put_fresh`, :func:`sum_over_columns`, :func:`dot` (a matmul with
float32 accumulation), :func:`vary`, :func:`finite_or_zero`, :func:`zero_rows`,
:class:`Normaliser`, :func:`combine_shards`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxloss import _dtypes

# Tuned on a 2-core x86 CPU at N=2048, D=512, V=32768: every block matmul already runs at the
# speed of one big matmul there, and the temporaries stay ~44 MiB at N=8192, D=2048, V=131072
# (f32); larger blocks only cost memory. GPUs and TPUs may prefer larger chunks.
DEFAULT_TOKEN_CHUNK = 1024
DEFAULT_VOCAB_CHUNK = 1024
# XLA:GPU pays per block: each block's gemm reads and writes float32 gradient accumulators and
# copies its slices of h and K. Modelled value_and_grad (mean, bf16) on an H100 at N=8192,
# D=4096, V=131072 (benchmarks/roofline.py): 91.5 ms with 40 MiB of temporaries at 1024²
# blocks, 64.5 ms / 80 MiB at 2048², 59.3 ms / 192 MiB at 4096². 2048² keeps the head within
# 128 MiB (its memory is what it is for) for 1.4x of the 1.5x that larger blocks give. A TPU v5p
# (D=2048) models 51.6 ms at each size (its five matmuls bound it): TPUs keep the CPU's blocks.
GPU_CHUNK = 2048
# The fused gradient pass holds [rows, V] logits: 2^24 of them (64 MiB in float32) per block
# keeps value_and_grad at N=8192, D=2048, V=131072 at ~84 MiB of temporaries, with 512 rows at
# V=32768, where on a 2-core x86 CPU it measured 0.65x the materialised path's time (128 rows:
# 0.97x; the kernel gradient is read and written once per block of rows).
DEFAULT_FUSED_BLOCK = 2**24


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
      token_chunk: rows of ``hidden`` per block (clipped to the number of tokens); ``None``:
        the backend's default (:data:`GPU_CHUNK` on GPUs, :data:`DEFAULT_TOKEN_CHUNK` elsewhere).
      vocab_chunk: columns of ``kernel`` per block (clipped to the number of classes); ``None``
        as for ``token_chunk``.
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
                object.__setattr__(self, field, _positive_int(fn, field, value))

    def clipped(self, tokens: int, classes: int, gpu: bool = False) -> tuple[int, int, int]:
        """``(token_chunk, vocab_chunk, grad_token_chunk)`` no larger than the array they cut,
        the defaults of a GPU where ``gpu``."""
        default = GPU_CHUNK if gpu else DEFAULT_TOKEN_CHUNK
        rows = self.token_chunk or default
        cols = self.vocab_chunk or (GPU_CHUNK if gpu else DEFAULT_VOCAB_CHUNK)
        fused = self.grad_token_chunk or max(1, DEFAULT_FUSED_BLOCK // classes)
        return min(rows, tokens), min(cols, classes), min(fused, tokens)


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


def chunk(index: jax.Array | int, width: int, size: int) -> Chunk:
    # An int index where loops run unrolled (jax.disable_jit).
    nominal = index * width
    start = jnp.minimum(nominal, size - width)
    ids = start + jax.lax.iota(jnp.int32, width)
    return Chunk(start, ids, None if size % width == 0 else ids >= nominal)


def num_chunks(size: int, width: int) -> int:
    return -(-size // width)


def _vma(x: Any) -> frozenset:
    """The manual mesh axes ``x`` varies over inside ``shard_map`` (empty elsewhere)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    if manual is None:  # jax < 0.10 names them ``vma``
        return frozenset(getattr(aval, "vma", None) or ())
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

    One exception, on CPU only: contracting ``a``'s leading axis (``hidden^T · ∂ℓ/∂z``), the
    operands are widened here first. Under ``jax.vmap`` with ``a`` unbatched, XLA:CPU can get
    that dot on its own (an eager ``jax.grad``, ``jax.disable_jit``), which its runtime has no
    half-precision kernel for ("Unsupported element type for DotThunk::Execute: BF16 x BF16 =
    F32"). The compiled programs' temporaries are the same either way.
    """
    dims = (((contract[0],), (contract[1],)), ((), ()))

    def native(a, b):
        return jax.lax.dot_general(a, b, dims, preferred_element_type=out_dtype)

    if jnp.result_type(a, b) == jnp.dtype(out_dtype) or contract[0] != 0:
        return native(a, b)
    widened = lambda a, b: native(a.astype(out_dtype), b.astype(out_dtype))
    return jax.lax.platform_dependent(a, b, cpu=widened, default=native)


def finite_or_zero(m: jax.Array) -> jax.Array:
    # A row whose logits are all -inf (or that has a +inf) keeps a finite shift, so the result is
    # the NaN/inf cross_entropy gives rather than an inf - inf produced here.
    return jnp.where(jnp.isfinite(m), m, 0)


def zero_rows(x: jax.Array, keep: jax.Array) -> jax.Array:
    """``x`` (``[rows, D]``) with the rows where ``keep`` (``(rows,)`` or ``(rows, 1)``) is
    False set to 0, by a select (a multiply would keep ``0 · NaN = NaN``).

    The gradient passes apply it to the hidden rows of tokens without a cotangent — ignored
    targets, masked tokens — before their matmuls: a NaN or inf there (a padded position)
    would otherwise reach every kernel-gradient entry as ``0 · NaN``. Only the block in hand
    is selected: no copy of ``hidden``.
    """
    return jnp.where(keep.reshape(-1, 1), x, 0)


def _slice(x: jax.Array, start, width: int, axis: int = 0) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x, start, width, axis=axis)


def _maybe_slice(x: jax.Array | None, start, width: int, axis: int = 0) -> jax.Array | None:
    return None if x is None else _slice(x, start, width, axis)


def _put(x: jax.Array, update: jax.Array, start, axis: int = 0) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(x, update, start, axis)


def put_fresh(full: jax.Array, part: jax.Array, at: Chunk, axis: int = 0) -> jax.Array:
    """``full`` with ``part`` (cast to ``full``'s dtype) written at chunk ``at`` along ``axis``;
    where a slid-back last chunk overlaps the previous one, ``full`` keeps what it has."""
    part = part.astype(full.dtype)
    if at.fresh is not None:
        fresh = jnp.expand_dims(at.fresh, [d for d in range(part.ndim) if d != axis])
        part = jnp.where(fresh, part, _slice(full, at.start, part.shape[axis], axis))
    return _put(full, part, at.start, axis)


def sum_over_columns(like: jax.Array, chunks, num_cols: int, block, acc_dtype, *varying):
    """An array like ``like`` (``[N, D]``) whose rows ``i`` are ``Σ_j block(rows_i, cols_j)``.

    Token chunks outside, vocabulary chunks inside: each row block is accumulated in
    ``acc_dtype`` (a ``[token_chunk, D]`` buffer) and written once in ``like``'s dtype, so no
    accumulator of the full size exists. ``block(rows, cols)`` returns the ``[token_chunk, D]``
    contribution of one block; ``varying``: what the loop carries vary like (``shard_map``).
    """
    n, d = like.shape
    nc, vc = chunks

    def token_step(i, out):
        rows = chunk(i, nc, n)
        acc = vary(jnp.zeros((nc, d), acc_dtype), *varying)

        def vocab_step(j, acc):
            return acc + block(rows, chunk(j, vc, num_cols))

        return put_fresh(out, jax.lax.fori_loop(0, num_chunks(num_cols, vc), vocab_step, acc), rows)

    init = vary(jnp.zeros_like(like), *varying)
    return jax.lax.fori_loop(0, num_chunks(n, nc), token_step, init)


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
        probs = _slice(_slice(p.probs, rows.start, nc), cols.start, vc, 1).astype(p.cdt)
    return Block(
        rows, cols, _maybe_slice(p.labels, rows.start, nc), probs,
        _maybe_slice(p.class_weight, cols.start, vc),
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


def _absorb(acc: dict, z: jax.Array, blk: Block) -> dict:
    """The accumulators after one more block of logits ``z`` (rows × cols) of the same rows."""
    cols = blk.cols
    block_max = jnp.max(z, 1)
    m = jnp.maximum(acc["m"], block_max)
    old_shift, shift = finite_or_zero(acc["m"]), finite_or_zero(m)
    step = shift - old_shift
    rescale = jnp.exp(acc["m"] - shift)
    gap = shift[:, None] - z  # ≥ 0 at every live column of a finite row
    e = jnp.exp(-gap)
    new = {"m": m, "s": acc["s"] * rescale + jnp.sum(e, 1)}
    if "tgt" in acc:
        local = blk.labels - cols.start
        hit = (local >= 0) & (local < z.shape[1])
        if cols.fresh is not None:
            hit = hit & jnp.take(cols.fresh, jnp.clip(local, 0, z.shape[1] - 1))
        picked = jnp.take_along_axis(z, jnp.clip(local, 0, z.shape[1] - 1)[:, None], 1)[:, 0]
        new["tgt"] = acc["tgt"] + jnp.where(hit, picked, 0)
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
        better = block_max > acc["m"]
        new["arg"] = jnp.where(better, cols.start + jnp.argmax(z, 1).astype(jnp.int32), acc["arg"])
        moved = rescale * (acc["ent"] + acc["s"] * step)
        new["ent"] = moved + jnp.sum(_absorbing(e, gap), 1)
    return new


def _keep_fresh_rows(new: dict, old: dict, rows: Chunk) -> dict:
    if rows.fresh is None:
        return new
    return {k: jnp.where(rows.fresh, new[k], old[k]) for k in new}


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


def blocked_stats(p: Problem, chunks: tuple[int, int]) -> Stats:
    """Per-token statistics, one ``token_chunk × vocab_chunk`` block of logits at a time."""
    n, v = p.hidden.shape[0], p.kernel.shape[1]
    nc, vc = chunks

    def vocab_step(j, acc):
        cols = chunk(j, vc, v)
        k_j, b_j = _slice(p.kernel, cols.start, vc, 1), _maybe_slice(p.bias, cols.start, vc)

        def token_step(i, acc):
            rows = chunk(i, nc, n)
            old = {k: _slice(a, rows.start, nc) for k, a in acc.items()}
            z = _capped_logits(p, _slice(p.hidden, rows.start, nc), k_j, b_j, cols)
            new = _keep_fresh_rows(_absorb(old, z, _block(p, rows, cols, nc, vc)), old, rows)
            return {k: _put(acc[k], new[k], rows.start) for k in acc}

        return jax.lax.fori_loop(0, num_chunks(n, nc), token_step, acc)

    return _finish(jax.lax.fori_loop(0, num_chunks(v, vc), vocab_step, _init(p, n)))


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
        return Cotangents(*(None if g is None else _slice(g, start, width)[:, None] for g in self))

    def counted(self) -> jax.Array:
        """Whether each row has any nonzero (or NaN) cotangent; the others contribute nothing."""
        return functools.reduce(jnp.logical_or, (g != 0 for g in self if g is not None))


class Normaliser(NamedTuple):
    """Per-token ``shift`` (the finite max) and ``log_sum = log Σ_c e^(z_c - shift)``."""

    shift: jax.Array
    log_sum: jax.Array

    def rows(self, start, width: int) -> Normaliser:
        return Normaliser(*(_slice(a, start, width)[:, None] for a in self))

    def log_softmax(self, z: jax.Array) -> jax.Array:
        # (z - shift) first: at large logits shift + log_sum rounds to the max.
        return (z - self.shift) - self.log_sum

    def softmax(self, z: jax.Array) -> jax.Array:
        return jnp.exp(self.log_softmax(z))


def combine_shards(top: jax.Array, log_sum: jax.Array, axis) -> tuple[jax.Array, ...]:
    """``(max, log_sum, step)`` over every shard of ``axis`` from each shard's own ``max`` and
    ``log_sum`` (relative to its own finite max); ``step`` ≥ 0 is how far each shard's shift
    moves to the global one. A shard whose logits of a row are all ``-inf`` (``log_sum = -inf``)
    adds exactly nothing, with a zero cotangent."""
    top_all = jax.lax.pmax(jax.lax.stop_gradient(top), axis)
    step = finite_or_zero(top_all) - jax.lax.stop_gradient(finite_or_zero(top))
    return top_all, _log_sum_over(log_sum - step, axis), step


# Custom VJP for a convention: the gradient of the unsharded log-sum at a row holding +inf
# (softmax with a finite shift: NaN at the +inf logits, 0 elsewhere). Autodiff would give every
# shard the share inf/inf = NaN, a NaN at every logit of the row.
@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _log_sum_over(local: jax.Array, axis) -> jax.Array:
    """``log Σ_shards e^local``: the log-sum of the whole vocabulary from the shards' own, each
    relative to the global shift."""
    return jnp.log(jax.lax.psum(jnp.exp(local), axis))


def _log_sum_over_fwd(local, axis):
    total = _log_sum_over(local, axis)
    return total, (local, total)


def _log_sum_over_bwd(axis, residuals, g):
    local, total = residuals
    # Each shard's share of the probability; at +inf, the shards holding +inf take it all.
    share = jnp.where(
        jnp.isposinf(total), jnp.isposinf(local).astype(local.dtype), jnp.exp(local - total)
    )
    return (g * share,)


_log_sum_over.defvjp(_log_sum_over_fwd, _log_sum_over_bwd)


def _block_grads(p: Problem, z, norm: Normaliser, g: Cotangents, blk: Block):
    """``(∂/∂(hK + b), ∂/∂w)`` of one block; stale rows and columns contribute nothing.

    With the shift held constant, ``∂/∂z = g_log_sum softmax(z) + g_tgt [c = y] − (g_tgap t +
    g_wgap) w``, then through the cap: ``∂z/∂x = 1 − (z / c)²``. Rows without a log-sum
    cotangent (ignored targets) contribute exactly nothing, even where their logits are NaN.
    """
    dz = jnp.where(g.log_sum != 0, g.log_sum * norm.softmax(z), 0)
    if g.tgt is not None:
        hit = jax.lax.iota(jnp.int32, z.shape[1])[None, :] == (blk.labels - blk.cols.start)[:, None]
        dz = dz + jnp.where(hit, g.tgt, 0)
    mass = 0  # ∂/∂(w_c (shift − z_c)) per row and class: g_tgap t + g_wgap
    if g.tgap is not None:
        mass = g.tgap * blk.probs
    if g.wgap is not None:
        mass = mass + g.wgap
    if g.tgap is not None or g.wgap is not None:
        dz = dz - (mass if blk.weight is None else mass * blk.weight[None, :])
    dw = None
    if blk.weight is not None and (g.tgap is not None or g.wgap is not None):
        gap = _live(norm.shift - z, blk.cols)
        if blk.rows.fresh is not None:
            gap = jnp.where(blk.rows.fresh[:, None], gap, 0)
        dw = jnp.sum(_absorbing(jnp.broadcast_to(mass, z.shape), gap), 0)
    if p.soft_cap is not None:
        dz = dz * (1 - jnp.square(z / p.soft_cap.astype(z.dtype)))
    if blk.cols.fresh is not None:
        dz = jnp.where(blk.cols.fresh[None, :], dz, 0)
    live = g.counted()
    if blk.rows.fresh is not None:
        live = live & blk.rows.fresh[:, None]
    return jnp.where(live, dz, 0), dw


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


# ----------------------------------------------------------------------------------------------
# Per-token statistics, with a recomputing backward pass
# ----------------------------------------------------------------------------------------------


def _counted(g_i: Cotangents, rows: Chunk) -> jax.Array:
    """``(rows, 1)``: the rows of a block whose logit gradients may be nonzero (a cotangent,
    and not already covered by the previous chunk)."""
    live = g_i.counted()
    return live if rows.fresh is None else live & rows.fresh[:, None]


def _counted_rows(p: Problem, g: Cotangents, rows: Chunk, nc: int):
    """A row block's cotangents and its hidden rows, zeroed where the logit gradients are 0
    (those rows enter no matmul of the gradient passes: 0 · NaN would be NaN)."""
    g_i = g.rows(rows.start, nc)
    return g_i, zero_rows(_slice(p.hidden, rows.start, nc), _counted(g_i, rows))


def _live_columns(k_j: jax.Array, cols: Chunk) -> jax.Array:
    """``k_j`` with the columns a slid-back chunk shares with the previous one at 0: their logit
    gradients are 0 here, and 0 · inf (an infinite kernel entry) would be NaN."""
    return k_j if cols.fresh is None else jnp.where(cols.fresh[None, :], k_j, 0)


def _recomputed_block(
    p: Problem, chunks, norm: Normaliser, g_i: Cotangents, rows: Chunk, cols: Chunk, h_i, k_j
):
    """``(∂ℓ/∂(hK + b) as the matmul dtype, ∂ℓ/∂w)`` of one recomputed block of logits."""
    nc, vc = chunks
    z = _capped_logits(p, h_i, k_j, _maybe_slice(p.bias, cols.start, vc), cols)
    blk = _block(p, rows, cols, nc, vc)
    dz, dw = _block_grads(p, z, norm.rows(rows.start, nc), g_i, blk)
    return dz.astype(jnp.result_type(p.hidden.dtype, p.kernel.dtype)), dw


def _kernel_pass(p: Problem, chunks, norm: Normaliser, g: Cotangents, dh):
    """Gradients for kernel, bias and weight (and, if ``dh`` is an array, hidden), recomputing
    each logit block: vocabulary chunks outside, so each column block of the kernel's gradient
    is finished in float32 and written once in its own dtype; ``dh`` accumulates in place."""
    n, v = p.hidden.shape[0], p.kernel.shape[1]
    nc, vc = chunks
    cdt = p.cdt

    def vocab_step(j, carry):
        dh, dk, db, dw = carry
        cols = chunk(j, vc, v)
        k_j = _live_columns(_slice(p.kernel, cols.start, vc, 1), cols)

        def token_step(i, inner):
            dh, dk_j, db_j, dw_j = inner
            rows = chunk(i, nc, n)
            g_i, h_i = _counted_rows(p, g, rows, nc)
            dz, dw_i = _recomputed_block(p, chunks, norm, g_i, rows, cols, h_i, k_j)
            if dh is not None:
                dh_i = _slice(dh, rows.start, nc) + dot(dz, k_j.astype(dz.dtype), (1, 1), cdt)
                dh = _put(dh, dh_i, rows.start)
            dk_j = dk_j + dot(h_i.astype(dz.dtype), dz, (0, 0), cdt)
            dw_j = dw_j if dw_i is None else dw_j + dw_i
            return dh, dk_j, db_j + jnp.sum(dz.astype(cdt), 0), dw_j

        zeros = tuple(
            vary(jnp.zeros(s, cdt), *p.arrays, *g) for s in ((dk.shape[0], vc), (vc,), (vc,))
        )
        dh, dk_j, db_j, dw_j = jax.lax.fori_loop(0, num_chunks(n, nc), token_step, (dh, *zeros))
        dk, db, dw = (
            put_fresh(f, part, cols, a)
            for f, part, a in ((dk, dk_j, 1), (db, db_j, 0), (dw, dw_j, 0))
        )
        return dh, dk, db, dw

    d = p.hidden.shape[1]
    dtypes = (p.kernel.dtype, _dtype(p.bias, cdt), _dtype(p.class_weight, cdt))
    init = [
        vary(jnp.zeros(s, t), *p.arrays, *g)
        for s, t in zip(((d, v), (v,), (v,)), dtypes, strict=True)
    ]
    return jax.lax.fori_loop(0, num_chunks(v, vc), vocab_step, (dh, *init))


def _hidden_pass(p: Problem, chunks, norm: Normaliser, g: Cotangents):
    """The gradient for hidden, recomputing each logit block, one row block at a time."""
    nc, vc = chunks

    def block(rows: Chunk, cols: Chunk) -> jax.Array:
        g_i, h_i = _counted_rows(p, g, rows, nc)
        k_j = _live_columns(_slice(p.kernel, cols.start, vc, 1), cols)
        dz, _ = _recomputed_block(p, chunks, norm, g_i, rows, cols, h_i, k_j)
        return dot(dz, k_j.astype(dz.dtype), (1, 1), p.cdt)

    v = p.kernel.shape[1]
    return sum_over_columns(p.hidden, chunks, v, block, p.cdt, *p.arrays, *g)


def _dtype(x, default):
    return default if x is None else x.dtype


def _recomputed_grads(p: Problem, chunks, norm: Normaliser, g: Cotangents):
    """Gradients for hidden, kernel, bias and weight, recomputing each logit block.

    A float32 ``hidden``'s gradient accumulates in place over the kernel pass (four ``N·D·V``
    matmuls in all). A half-precision one would need a float32 copy of it as accumulator
    (128 MiB at N=8192, D=4096), so it gets a pass of its own instead: five matmuls, and no
    temporary larger than a few blocks.
    """
    one_pass = jnp.dtype(p.hidden.dtype) == jnp.dtype(p.cdt)
    dh = vary(jnp.zeros(p.hidden.shape, p.cdt), *p.arrays, *g) if one_pass else None
    dh, dk, db, dw = _kernel_pass(p, chunks, norm, g, dh)
    if not one_pass:
        dh = _hidden_pass(p, chunks, norm, g)
    return _cast_grads(p, dh, dk, db, dw)


# What the custom_vjp buys: the backward pass recomputes each logit block instead of storing
# the [N, V] logits (O(blocks) memory instead of O(N·V)).
@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _token_stats(hidden, kernel, bias, labels, probs, class_weight, soft_cap, chunks, ws, st):
    p = Problem(hidden, kernel, bias, labels, probs, class_weight, soft_cap, ws, st)
    return blocked_stats(p, chunks)


def _token_stats_fwd(hidden, kernel, bias, labels, probs, class_weight, soft_cap, chunks, ws, st):
    p = Problem(hidden, kernel, bias, labels, probs, class_weight, soft_cap, ws, st)
    stats = blocked_stats(p, chunks)
    return stats, (p.arrays, soft_cap, Normaliser(stats.shift, stats.log_sum))


def _token_stats_bwd(chunks, ws, st, residuals, cotangents: Stats):
    arrays, soft_cap, norm = residuals
    p = Problem(*arrays, soft_cap, ws, st)  # pyright: ignore[reportCallIssue]
    # The max's cotangent is dropped: the statistics are relative to it, the loss is not.
    g = Cotangents(cotangents.log_sum, cotangents.tgt, cotangents.tgap, cotangents.wgap)
    dh, dk, db, dw = _recomputed_grads(p, chunks, norm, g)
    return dh, dk, db, None, None, dw, None


_token_stats.defvjp(_token_stats_fwd, _token_stats_bwd)


def token_stats(p: Problem, chunks: tuple[int, int]) -> Stats:
    """Per-token :class:`Stats` of ``p``, differentiable (reverse mode) in ``hidden``,
    ``kernel``, ``bias`` and ``class_weight`` through ``log_sum``, ``tgt``, ``tgap`` and
    ``wgap`` (``max`` is a constant to them: its cotangent is ignored)."""
    return _token_stats(*p.arrays, p.soft_cap, chunks, p.weighted_sum, p.with_stats)


# ----------------------------------------------------------------------------------------------
# The summed loss, with its gradient computed in the forward pass
# ----------------------------------------------------------------------------------------------

RowLoss = Callable[..., jax.Array]


def _whole_vocabulary(v: int) -> Chunk:
    return Chunk(jnp.zeros((), jnp.int32), jax.lax.iota(jnp.int32, v), None)


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
    h_i = _slice(p.hidden, rows.start, nc)
    blk = _block(p, rows, _whole_vocabulary(v), nc, v)
    z = _capped_logits(p, h_i, p.kernel, p.bias, blk.cols)
    stats = _finish(_absorb(_init(p, nc), z, blk))

    def chunk_loss(log_sum, tgt, tgap, wgap, class_weight):
        moved = stats._replace(log_sum=log_sum, tgt=tgt, tgap=tgap, wgap=wgap)
        return row_loss(moved, blk, class_weight, hyper)

    differentiated = (stats.log_sum, stats.tgt, stats.tgap, stats.wgap, p.class_weight)
    losses, vjp = jax.vjp(chunk_loss, *differentiated)
    fresh = jnp.ones((nc,), losses.dtype)
    if rows.fresh is not None:
        fresh = rows.fresh.astype(losses.dtype)
    *g, dw_outer = vjp(fresh)
    g = Cotangents(*(None if a is None else a[:, None] for a in g))
    norm = Normaliser(stats.shift[:, None], stats.log_sum[:, None])
    # The logits above are the statistics' (defined at every token); the gradient's matmuls
    # read no hidden row of a token without a cotangent.
    h_live = zero_rows(h_i, _counted(g, rows)).astype(mm)

    def vocab_step(j, carry):
        dh_i, dk, db, dw = carry
        cols = chunk(j, vc, v)
        k_j = _live_columns(_slice(p.kernel, cols.start, vc, 1), cols)
        # Stale columns and rows get a zero logit gradient and zeroed operands (no 0 · inf).
        dz, dw_j = _block_grads(
            p, _slice(z, cols.start, vc, 1), norm, g, _block(p, rows, cols, nc, vc)
        )
        dz = dz.astype(mm)
        dh_i = dh_i + dot(dz, k_j.astype(mm), (1, 1), p.cdt)
        dk_j = _slice(dk, cols.start, vc, 1) + dot(h_live, dz, (0, 0), p.cdt)
        dk = put_fresh(dk, dk_j, cols, 1)
        db = _put(db, _slice(db, cols.start, vc) + jnp.sum(dz.astype(p.cdt), 0), cols.start)
        if dw_j is not None:
            dw = _put(dw, _slice(dw, cols.start, vc) + dw_j, cols.start)
        return dh_i, dk, db, dw

    dh, dk, db, dw = grads
    dh_i = vary(jnp.zeros((nc, dh.shape[1]), p.cdt), *p.arrays)
    dh_i, dk, db, dw = jax.lax.fori_loop(0, num_chunks(v, vc), vocab_step, (dh_i, dk, db, dw))
    if dw_outer is not None:
        dw = dw + dw_outer.astype(p.cdt)
    grads = (put_fresh(dh, dh_i, rows), dk, db, dw)
    return jnp.sum(losses * fresh), _stats_out(p, stats), grads


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
    return Block(_whole_vocabulary(n), _whole_vocabulary(v), p.labels, probs, p.class_weight)


# What the custom_vjp buys: when differentiated, the gradient is formed in the forward pass from
# logits already in hand (three N·D·V matmuls instead of four); forward-only calls keep the
# cheap blocked pass. Measured: see docs/linear.md.
@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def _fused_total(
    hidden, kernel, bias, labels, probs, class_weight, soft_cap, hyper, chunks, ws, st, row_loss
):
    p = Problem(hidden, kernel, bias, labels, probs, class_weight, soft_cap, ws, st)
    stats = blocked_stats(p, chunks[:2])
    losses = row_loss(stats, whole_block(p), class_weight, hyper)
    return jnp.sum(losses), _stats_out(p, stats)


def _fused_total_fwd(
    hidden, kernel, bias, labels, probs, class_weight, soft_cap, hyper, chunks, ws, st, row_loss
):
    p = Problem(hidden, kernel, bias, labels, probs, class_weight, soft_cap, ws, st)
    total, stats, grads = fused_forward_and_grads(p, hyper, row_loss, (chunks[2], chunks[1]))
    return (total, stats), (grads, jax.tree.map(jnp.zeros_like, hyper))


def _fused_total_bwd(chunks, ws, st, row_loss, residuals, cotangents):
    (dh, dk, db, dw), hyper_zeros = residuals
    g = cotangents[0]
    scale = lambda x: None if x is None else (g * x).astype(x.dtype)
    return scale(dh), scale(dk), scale(db), None, None, scale(dw), None, hyper_zeros


_fused_total.defvjp(_fused_total_fwd, _fused_total_bwd)


def fused_total(
    p: Problem, hyper, row_loss: RowLoss, chunks: tuple[int, int, int]
) -> tuple[jax.Array, Any]:
    """``(Σ_n row_loss_n, (lse, argmax, entropy))``, differentiable (reverse mode) in
    ``hidden``, ``kernel``, ``bias`` and ``class_weight``; ``hyper`` is not differentiated.

    ``row_loss(stats, block, class_weight, hyper)`` maps a :class:`Stats` of some rows (and the
    :class:`Block` holding their targets) to their losses; it must be a hashable callable.
    """
    return _fused_total(
        *p.arrays, p.soft_cap, hyper, chunks, p.weighted_sum, p.with_stats, row_loss
    )


def rows_with_a_feature(hidden: jax.Array, kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``hidden`` as ``(N, D)`` rows, and with no features (``D = 0``) one zero feature instead.

    Every logit is then its bias (or 0), computed by the same blocks; the empty inputs'
    gradients are empty either way. (``reshape(-1, 0)`` cannot infer ``N``.)
    """
    n, d = int(np.prod(hidden.shape[:-1])), hidden.shape[-1]
    if d:
        return hidden.reshape(n, d), kernel
    return jnp.zeros((n, 1), hidden.dtype), jnp.zeros((1, kernel.shape[1]), kernel.dtype)
