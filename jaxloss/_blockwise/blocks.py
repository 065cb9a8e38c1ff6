"""Cutting ``[N, V]`` logits of ``hidden @ kernel`` into blocks, without padding or copies.

An axis of static length is cut into chunks of a static width; a short last chunk is slid back
to end at the array's edge (every read keeps the static width) and the entries it shares with
the previous chunk are masked out. A :class:`Span` is the part of an axis one device works on:
all of it, or (uneven vocabulary shards) a slid-back range of a wider array whose first columns
belong to the previous device.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Default blocks of both fused heads (linear_cross_entropy and linear_distillation).
# Tuned on a 2-core x86 CPU at N=2048, D=512, V=32768: every block matmul already runs at the
# speed of one big matmul there, and the temporaries stay ~44 MiB at N=8192, D=2048, V=131072
# (f32); larger blocks only cost memory. GPUs and TPUs may prefer larger chunks.
DEFAULT_TOKEN_CHUNK = 1024
DEFAULT_VOCAB_CHUNK = 1024
# XLA:GPU pays per block: float32 gradient accumulators read and written around each block's
# gemm, copies of the block's slices of K. On GPUs and TPUs the recomputing pass carries the
# hidden gradient in float32 (jaxloss._blockwise.passes.CARRY_PLATFORMS: four N·D·V
# matmuls), so every token is one block row — up to ACCELERATOR_TOKEN_CHUNK of them — and each
# vocabulary chunk's kernel gradient is finished by one gemm; vocabulary chunks hold
# ACCELERATOR_BLOCK logits (64 MiB in float32), as the hidden gradient's carry is read and
# written once per vocabulary chunk.
# Modelled value_and_grad (mean, bf16) on an H100 at N=8192, D=4096, V=131072
# (benchmarks/hlo.py, temporaries from memory_analysis): 8192×2048 blocks 42.5 ms /
# 240 MiB (four 8.9 ms matmuls and 6.9 ms of traffic; 41.2 ms since the forward's one-pass
# fold, jaxloss._blockwise.online.fold_block; 39.25 ms / 192 MiB since the logit gradient's
# epilogue, jaxloss._blockwise.passes.EPILOGUE_PLATFORMS); 8192×4096 the same at 352 MiB;
# 4096² 50.4 ms / 288 MiB; 2048² 58.1 ms / 184 MiB (five matmuls at 2048² before the carry:
# 66.4 ms / 80 MiB; the materialised path 28.6 ms / 2 GiB). Beyond ACCELERATOR_TOKEN_CHUNK tokens
# (where a carry of N·D may pass jaxloss._blockwise.passes.CARRY_MAX_BYTES) GPUs keep 2048²
# blocks: at N=32768 they model 257.9 ms against 267.1 (16384×1024, carried) and 279.4 (same
# blocks, five matmuls). TPUs take the same blocks: on a v5p at N=8192, D=2048, V=131072 bf16,
# value_and_grad of the mean, linear_distillation (whose TPU default is this XLA form) 66.57 ->
# 58.13 ms (80 -> 161 MiB; six N·D·V matmuls at peak 57.5 ms), JSD 86.53 -> 77.29 ms; the
# linear head's XLA form 48.18 -> 40.55 ms (its TPU default, the Pallas kernels, 38.55 ms).
ACCELERATOR_TOKEN_CHUNK = 16384
ACCELERATOR_BLOCK = 2**24
ACCELERATOR_CHUNK = 2048


def default_chunks(
    tokens: int,
    classes: int,
    token_chunk: int | None,
    vocab_chunk: int | None,
    accelerator: bool,
) -> tuple[int, int]:
    """``(token_chunk, vocab_chunk)``: the ones given, else the backend's defaults above (GPUs'
    and TPUs' where ``accelerator``), no larger than the array they cut."""
    rows, cols = DEFAULT_TOKEN_CHUNK, DEFAULT_VOCAB_CHUNK
    if accelerator and tokens <= ACCELERATOR_TOKEN_CHUNK:
        rows = tokens
        cols = max(1, ACCELERATOR_BLOCK // min(token_chunk or tokens, tokens))
    elif accelerator:
        rows, cols = ACCELERATOR_CHUNK, ACCELERATOR_CHUNK
    return min(token_chunk or rows, tokens), min(vocab_chunk or cols, classes)


def on_backend_blocks(run: Any, cpu: tuple[int, ...], accelerator: tuple[int, ...]) -> Any:
    """``run(blocks)()`` with each backend's blocks (``accelerator``: GPUs' and TPUs'), chosen
    when the program is lowered; one program where the two agree."""
    if cpu == accelerator:
        return run(cpu)()
    accelerators = run(accelerator)  # one callable: platform_dependent traces it once for both
    return jax.lax.platform_dependent(default=run(cpu), cuda=accelerators, tpu=accelerators)


def positive_int(fn: str, name: str, value: Any) -> int:
    """``value`` as an ``int`` ≥ 1, or the ``TypeError``/``ValueError`` naming ``fn`` and
    ``name``."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"{fn}: `{name}` must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{fn}: `{name}` must be a positive int, got {value}")
    return int(value)


class Chunk(NamedTuple):
    """One chunk: where it is read from (``start``), the indices it covers (``ids``) and which
    of them are ``fresh`` — not covered by the previous chunk (or owned by another device);
    ``None`` when all are."""

    start: jax.Array
    ids: jax.Array
    fresh: jax.Array | None


class Span(NamedTuple):
    """The entries ``[start, start + size)`` of an axis (``size`` static); those before
    ``owned_from`` (``None``: none) belong to another device and count as stale."""

    start: Any
    size: int
    owned_from: Any = None

    @classmethod
    def whole(cls, size: int) -> Span:
        return cls(0, size)

    def chunk(self, index: jax.Array | int, width: int) -> Chunk:
        """Chunk ``index`` of this span cut into chunks of ``width`` (≤ ``size``)."""
        inner = chunk(index, width, self.size)
        if isinstance(self.start, int) and self.start == 0 and self.owned_from is None:
            return inner
        ids = inner.ids + self.start
        fresh = inner.fresh
        if self.owned_from is not None:
            owned = ids >= self.owned_from
            fresh = owned if fresh is None else fresh & owned
        return Chunk(inner.start + self.start, ids, fresh)

    def count(self, width: int) -> int:
        return num_chunks(self.size, width)


def chunk(index: jax.Array | int, width: int, size: int) -> Chunk:
    """Chunk ``index`` of an axis of ``size`` cut into chunks of ``width``, a short last one
    slid back to ``size - width``. (An int index where loops run unrolled: jax.disable_jit.)"""
    nominal = index * width
    start = jnp.minimum(nominal, size - width)
    ids = start + jax.lax.iota(jnp.int32, width)
    return Chunk(start, ids, None if size % width == 0 else ids >= nominal)


def whole(size: int) -> Chunk:
    """The whole axis as one chunk."""
    return Chunk(jnp.zeros((), jnp.int32), jax.lax.iota(jnp.int32, size), None)


def num_chunks(size: int, width: int) -> int:
    return -(-size // width)


def take(x: jax.Array, start, width: int, axis: int = 0) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x, start, width, axis=axis)


def maybe_take(x: jax.Array | None, start, width: int, axis: int = 0) -> jax.Array | None:
    return None if x is None else take(x, start, width, axis)


def put(x: jax.Array, update: jax.Array, start, axis: int = 0) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(x, update, start, axis)


def put_fresh(full: jax.Array, part: jax.Array, at: Chunk, axis: int = 0) -> jax.Array:
    """``full`` with ``part`` (cast to ``full``'s dtype) written at chunk ``at`` along ``axis``;
    where the chunk is stale (shared with the previous chunk), ``full`` keeps what it has."""
    part = part.astype(full.dtype)
    if at.fresh is not None:
        fresh = jnp.expand_dims(at.fresh, [d for d in range(part.ndim) if d != axis])
        part = jnp.where(fresh, part, take(full, at.start, part.shape[axis], axis))
    return put(full, part, at.start, axis)


def _vma(x: Any) -> frozenset:
    """The manual mesh axes ``x`` varies over inside ``shard_map`` (empty elsewhere)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    if manual is None:  # jax < 0.10 names them ``vma``
        return frozenset(getattr(aval, "vma", None) or ())
    return frozenset(getattr(manual, "varying", None) or ())


def struct_varying_like(shape: tuple[int, ...], dtype: Any, like: Any) -> jax.ShapeDtypeStruct:
    """An output type varying over the manual mesh axes ``like`` varies over (a Pallas call's
    outputs inside ``shard_map``)."""
    aval = jax.typeof(like)
    if hasattr(aval, "manual_axis_type"):
        return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=aval.manual_axis_type)
    return jax.ShapeDtypeStruct(shape, dtype, **{"vma": aval.vma})  # jax < 0.10


def vary(x: jax.Array, *like: Any) -> jax.Array:
    """``x`` marked as varying over every manual axis any of ``like`` varies over.

    Loop carries start as constants; under ``shard_map`` they must already carry the per-device
    type their loop body gives them. Outside ``shard_map`` this is the identity.
    """
    leaves = [a for a in jax.tree.leaves(like) if a is not None]
    missing = frozenset().union(*(_vma(a) for a in leaves)) - _vma(x)
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
    # the NaN/inf the materialised formula gives rather than an inf - inf produced here.
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


def live_columns(k_j: jax.Array, cols: Chunk) -> jax.Array:
    """``k_j`` with the stale columns at 0: their logit gradients are 0 there, and ``0 · inf``
    (an infinite kernel entry) would be NaN."""
    return k_j if cols.fresh is None else jnp.where(cols.fresh[None, :], k_j, 0)


def rows_with_a_feature(hidden: jax.Array, kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``hidden`` as ``(N, D)`` rows, and with no features (``D = 0``) one zero feature instead.

    Every logit is then its bias (or 0), computed by the same blocks; the empty inputs'
    gradients are empty either way. (``reshape(-1, 0)`` cannot infer ``N``.)
    """
    n, d = int(np.prod(hidden.shape[:-1])), hidden.shape[-1]
    if d:
        return hidden.reshape(n, d), kernel
    return jnp.zeros((n, 1), hidden.dtype), jnp.zeros((1, kernel.shape[1]), kernel.dtype)
