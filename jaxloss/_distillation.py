"""Distillation divergences between two linear heads' distributions, without their logits.

Distilling a teacher language model into a student compares, at every token, the teacher's and
the student's softmax distributions over the vocabulary: ``N × V`` numbers each (4 GiB apiece in
float32 at ``N = 8192`` tokens, ``V = 131072`` classes). ``linear_distillation`` produces both
heads' logits one ``token_chunk × vocab_chunk`` block at a time and keeps only a few numbers per
token:

* ``"kl"`` and ``"reverse_kl"``: each head's log-sum-exp and the reference distribution's mean
  log-ratio ``Σ_c p_c (a_c - b_c)``, all three accumulated in one pass with online rescaling
  (the running sums are rescaled whenever a token's running maximum grows);
* ``"jsd"``: the mixture ``m = β p_t + (1 - β) p_s`` needs both normalised distributions, so a
  first pass finds the two log-sum-exps and a second accumulates ``Σ p_t log(p_t / m)`` and
  ``Σ p_s log(p_s / m)``.

A ``jax.custom_vjp`` saves those ``O(N)`` statistics and recomputes each block in the backward
pass to form ``∂ℓ/∂z_s`` blockwise, contracting it straight into the student's gradients. The
teacher is a constant: its inputs get no gradient.

Under ``jax.shard_map`` (named mesh axes) each device works on its own tokens and vocabulary
columns; only per-token statistics cross devices (a ``pmax``/``psum`` log-sum-exp of the shards'
ones, ``psum`` of their shares of the sums).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal, NamedTuple, cast

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec
from jaxtyping import Array, ArrayLike, Bool, Float

from jaxloss import _dtypes, _implementations, _reductions, _validation
from jaxloss._blockwise import online, passes, sharding, vjp
from jaxloss._blockwise.blocks import (
    Chunk,
    Span,
    default_chunks,
    dot,
    finite_or_zero,
    maybe_take,
    on_backend_blocks,
    positive_int,
    rows_with_a_feature,
    take,
    vary,
)
from jaxloss._blockwise.online import Normaliser, combine_normaliser

_FN = "linear_distillation"
DIVERGENCES = ("kl", "reverse_kl", "jsd")
_ARRAY_NAMES = (
    "hidden",
    "kernel",
    "bias",
    "teacher_hidden",
    "teacher_kernel",
    "teacher_bias",
    "mask",
)


class _Config(NamedTuple):
    """The options the blockwise passes read: ``divergence``, ``chunks``, ``vocab_axis`` and
    ``width`` are static (:attr:`static`, the engine op's hashable part); ``beta`` and
    ``temperature`` are scalars, data like ``label_smoothing`` (a schedule under ``jit``
    compiles once). ``col_start``, ``width`` and ``owned_from`` are the columns this device
    covers (:class:`jaxloss._blockwise.blocks.Span`; ``None``: every column)."""

    divergence: str
    beta: Any
    temperature: Any
    chunks: tuple[int, int]
    vocab_axis: Any
    width: int | None = None
    col_start: Any = None
    owned_from: Any = None

    @property
    def static(self) -> tuple[str, tuple[int, int], Any, int | None]:
        return self.divergence, self.chunks, self.vocab_axis, self.width

    @property
    def data(self) -> tuple[Any, Any, Any, Any]:
        return self.beta, self.temperature, self.col_start, self.owned_from

    @classmethod
    def of(cls, static, data) -> _Config:
        divergence, chunks, vocab_axis, width = static
        beta, temperature, col_start, owned_from = data
        return cls(divergence, beta, temperature, chunks, vocab_axis, width, col_start, owned_from)

    def spans(self, student) -> tuple[Span, Span]:
        width = student[1].shape[1] if self.width is None else self.width
        start = 0 if self.col_start is None else self.col_start
        return Span.whole(student[0].shape[0]), Span(start, width, self.owned_from)


# ----------------------------------------------------------------------------------------------
# Blocks of both heads (the loops are the shared engine's, jaxloss._blockwise)
# ----------------------------------------------------------------------------------------------


def _columns(head, cols: Chunk, width: int):
    """A head's kernel (and bias) columns of the chunk ``cols``."""
    _, kernel, bias = head
    return take(kernel, cols.start, width, 1), maybe_take(bias, cols.start, width)


def _scaled_logits(h_i, k_j, b_j, col: Chunk, cfg: _Config, cdt):
    """``(h_i @ k_j + b_j) / τ``, with the stale columns (already seen in the previous chunk, or
    another device's) at -inf.

    A -inf column is no class at all to every statistic below (zero probability, zero term), so
    the overlap of a slid-back last chunk needs no other masking.
    """
    z = dot(h_i, k_j, (1, 0), cdt)
    if b_j is not None:
        z = z + b_j.astype(cdt)[None, :]
    z = z * (1 / cfg.temperature)  # τ is data; at τ = 1 the product is z itself
    return z if col.fresh is None else jnp.where(col.fresh[None, :], z, -jnp.inf)


def _rows(arrays, start, width):
    return tuple(take(a, start, width) for a in arrays)


def _sweep(student, teacher, stats, init, update, cfg: _Config, cdt):
    """Folds ``update`` over every block of both heads' scaled logits; returns per-token carries.

    ``update(a, b, carry_i, stats_i)`` gets the teacher's and the student's block ``(nc, vc)``
    and the row chunk's slices of the carries and of the read-only per-token ``stats``.
    """
    nc, vc = cfg.chunks

    def columns(cols: Chunk):
        return _columns(teacher, cols, vc), _columns(student, cols, vc)

    def absorb(rows: Chunk, cols: Chunk, column_data, old):
        cols_t, cols_s = column_data
        (th_i,), (h_i,) = _rows(teacher[:1], rows.start, nc), _rows(student[:1], rows.start, nc)
        a = _scaled_logits(th_i, cols_t[0], cols_t[1], cols, cfg, cdt)
        b = _scaled_logits(h_i, cols_s[0], cols_s[1], cols, cfg, cdt)
        return update(a, b, old, _rows(stats, rows.start, nc))

    varying = (*student, *teacher, *stats)
    return passes.sweep(cfg.spans(student), cfg.chunks, tuple(init), columns, absorb, varying)


# ----------------------------------------------------------------------------------------------
# Forward statistics
# ----------------------------------------------------------------------------------------------


def _log_ratio(x, other):
    """``x - other`` where ``x`` is finite; 0 where ``x = -inf`` (its probability is 0 there)."""
    return jnp.where(jnp.isneginf(x), 0, x - other)


def _first_pass(student, teacher, cfg: _Config, cdt):
    """Per token: each head's :class:`Normaliser` and, for the KLs, ``Σ_c p_c (x_c -
    y_c)``.

    ``p``/``x`` are the reference distribution's (teacher for ``"kl"``, student for
    ``"reverse_kl"``) and ``y`` the other's scaled logits; the sum is kept relative to the
    reference's running maximum and rescaled with it. Combined over ``cfg.vocab_axis``.
    """
    with_ratio = cfg.divergence != "jsd"
    teacher_ref = cfg.divergence == "kl"

    def update(a, b, carry, _):
        m_t, s_t, m_s, s_s, u = carry
        if not with_ratio:
            (m_t, s_t), (m_s, s_s) = online.fold_blocks((((m_t, s_t), (a,)), ((m_s, s_s), (b,))))
            return m_t, s_t, m_s, s_s, u
        # The reference head's exp-sum and the ratio's sum share one shift.
        x, y, m_x, s_x, m_y, s_y = (
            (a, b, m_t, s_t, m_s, s_s) if teacher_ref else (b, a, m_s, s_s, m_t, s_t)
        )
        (m_x, s_x, u), (m_y, s_y) = online.fold_blocks(
            (((m_x, s_x, u), (x, _log_ratio(x, y))), ((m_y, s_y), (y,)))
        )
        if teacher_ref:
            return m_x, s_x, m_y, s_y, u
        return m_y, s_y, m_x, s_x, u

    n = student[0].shape[0]
    ninf, zero = jnp.full((n,), -jnp.inf, cdt), jnp.zeros((n,), cdt)
    m_t, s_t, m_s, s_s, u = _sweep(
        student, teacher, (), (ninf, zero, ninf, zero, zero), update, cfg, cdt
    )
    (norm_t, local_t), (norm_s, local_s) = (
        combine_normaliser(m, jnp.log(s), cfg.vocab_axis) for m, s in ((m_t, s_t), (m_s, s_s))
    )
    if not with_ratio:
        return norm_t, norm_s, None
    s_ref, local_ref, norm_ref = (s_t, local_t, norm_t) if teacher_ref else (s_s, local_s, norm_s)
    mean = jnp.where(s_ref > 0, u / jnp.where(s_ref > 0, s_ref, 1), 0)
    return norm_t, norm_s, _combine_mean(mean, local_ref, norm_ref, cfg.vocab_axis)


def _combine_mean(mean, local_log_sum, norm: Normaliser, axis):
    """Shards' ``p``-weighted means, each weighted by its shard's share of ``p``, summed."""
    if axis is None:
        return mean
    log_share = local_log_sum - finite_or_zero(norm.log_sum)
    share = jnp.where(jnp.isneginf(local_log_sum), 0, jnp.exp(log_share))
    return jax.lax.psum(share * mean, axis)


def _log_mixture(lp_t, lp_s, beta):
    """``log(β p_t + (1 - β) p_s)`` from the two log-probabilities (β = 0 or 1 exact: a log
    weight of ``-inf``)."""
    return jnp.logaddexp(lp_t + jnp.log(beta), lp_s + jnp.log1p(-beta))


def _xlogy_ratio(lp, lm):
    """``p · (log p - log m)`` with ``0 · log 0 = 0``."""
    return jnp.where(jnp.isneginf(lp), 0, jnp.exp(lp) * (lp - lm))


def _jsd_pass(student, teacher, norm_t, norm_s, cfg: _Config, cdt):
    """Per token ``Σ p_t log(p_t / m)`` and ``Σ p_s log(p_s / m)``, given both normalisers."""

    def update(a, b, carry, stats):
        kl_t, kl_s = carry
        shift_t, log_sum_t, shift_s, log_sum_s = (x[:, None] for x in stats)
        lp_t = Normaliser(shift_t, log_sum_t).log_softmax(a)
        lp_s = Normaliser(shift_s, log_sum_s).log_softmax(b)
        lm = _log_mixture(lp_t, lp_s, cfg.beta)
        sum_t, sum_s = online.row_sums(_xlogy_ratio(lp_t, lm), _xlogy_ratio(lp_s, lm))
        return kl_t + sum_t, kl_s + sum_s

    zero = jnp.zeros((student[0].shape[0],), cdt)
    # A degenerate row (no finite normaliser) is NaN in the end; finite here, it stays quiet.
    stats = tuple(finite_or_zero(x) for x in (*norm_t, *norm_s))
    kl_t, kl_s = _sweep(student, teacher, stats, (zero, zero), update, cfg, cdt)
    axis = cfg.vocab_axis
    return (kl_t, kl_s) if axis is None else (jax.lax.psum(kl_t, axis), jax.lax.psum(kl_s, axis))


def _divergences(student, teacher, cfg: _Config):
    """Per-token divergence (not yet times τ²) and the statistics its gradient needs."""
    cdt = _compute_dtype(*student, *teacher)
    norm_t, norm_s, mean_ratio = _first_pass(student, teacher, cfg, cdt)
    if cfg.divergence == "jsd":
        kl_t, kl_s = _jsd_pass(student, teacher, norm_t, norm_s, cfg, cdt)
        # β = 0 or 1 drop a term outright: an infinite KL times 0 is no NaN here.
        beta = cfg.beta
        div = jnp.where(beta > 0, beta * kl_t, 0) + jnp.where(beta < 1, (1 - beta) * kl_s, 0)
        extra = kl_s
    else:
        mean_ratio = cast(jax.Array, mean_ratio)  # the KLs' first pass always computes it
        sign = 1 if cfg.divergence == "kl" else -1
        # lse_t - lse_s with the shifts apart: at large logits each lse rounds to its max.
        lse_gap = (norm_t.shift - norm_s.shift) + (norm_t.log_sum - norm_s.log_sum)
        div = extra = mean_ratio - sign * lse_gap
    finite = jnp.isfinite(norm_t.shift + norm_t.log_sum) & jnp.isfinite(
        norm_s.shift + norm_s.log_sum
    )
    div = _reductions.nan_where(~finite, jnp.asarray(div))
    return div, (*norm_t, *norm_s, extra)


# ----------------------------------------------------------------------------------------------
# Backward: ∂ℓ/∂z_s recomputed block by block
# ----------------------------------------------------------------------------------------------


def _student_slope(a, b, stats, cfg: _Config):
    """``∂ div / ∂b`` for a block (``b`` the student's scaled logits), before the cotangent.

    kl: ``p_s - p_t``; reverse_kl: ``p_s (log p_s/p_t - KL)``; jsd: ``(1-β) p_s (log p_s/m -
    KL(p_s‖m))``. Entries of zero student probability are exactly 0. A row where either head
    has no distribution (a ``+inf`` or NaN logit, or all ``-inf``) is NaN throughout, as
    autodiff of the materialised ``log_softmax`` gives (the finite-shift softmax would be NaN
    at the ``+inf`` logit only, and finite elsewhere).
    """
    shift_t, log_sum_t, shift_s, log_sum_s, extra = (x[:, None] for x in stats)
    norm_t, norm_s = Normaliser(shift_t, log_sum_t), Normaliser(shift_s, log_sum_s)
    lp_t, lp_s = norm_t.log_softmax(a), norm_s.log_softmax(b)
    p_s = jnp.exp(lp_s)
    if cfg.divergence == "kl":
        slope = p_s - jnp.exp(lp_t)
    elif cfg.divergence == "reverse_kl":
        slope = jnp.where(p_s == 0, 0, p_s * (lp_s - lp_t - extra))
    else:
        lm = _log_mixture(lp_t, lp_s, cfg.beta)
        slope = jnp.where(p_s == 0, 0, (1 - cfg.beta) * p_s * (lp_s - lm - extra))
    return _reductions.nan_where(~(norm_t.finite() & norm_s.finite()), slope)


@dataclasses.dataclass(frozen=True)
class _StudentGradient:
    """The engine's rule for one recomputed block (:class:`passes.BlockGradient`): ``∂ℓ/∂z_s``
    of the student's unscaled logits. Rows without a cotangent (masked tokens) are zeroed by
    the engine: the student's hidden rows before its matmuls, this rule's logit gradient by a
    select after it, so a NaN/inf teacher hidden row there contributes nothing either (zeroing
    it here, too, cost an N×D read and write per block: 2.6 ms of an H100's 67.9)."""

    student: Any
    teacher: Any
    per_row: tuple[jax.Array, ...]  # the statistics of :func:`_divergences`, then g / τ
    cfg: _Config
    cdt: Any
    target_entries = None  # every entry's gradient comes from the block

    def live(self, rows: Chunk) -> jax.Array:
        return take(self.per_row[-1], rows.start, self.cfg.chunks[0]) != 0

    def __call__(self, rows: Chunk, cols: Chunk, h_i, k_j, hit: bool = True):
        nc, vc = self.cfg.chunks
        *stats_i, g_i = _rows(self.per_row, rows.start, nc)
        th_i = take(self.teacher[0], rows.start, nc)
        a = _scaled_logits(th_i, *_columns(self.teacher, cols, vc), cols, self.cfg, self.cdt)
        b_j = maybe_take(self.student[2], cols.start, vc)
        b = _scaled_logits(h_i, k_j, b_j, cols, self.cfg, self.cdt)
        return g_i[:, None] * _student_slope(a, b, stats_i, self.cfg), ()


@dataclasses.dataclass(frozen=True)
class _TokenDivergence:
    """Per-token divergence of the two heads' tempered distributions as an engine op: ``O(N)``
    statistics saved, each block recomputed in the backward pass. The teacher is a constant
    (its inputs also pass through stop_gradient); β and τ are not differentiated."""

    static: tuple

    def forward(self, student, data):
        teacher, cfg_data = data
        return _divergences(student, teacher, _Config.of(self.static, cfg_data))

    def backward(self, student, data, stats, g):
        teacher, cfg_data = data
        cfg = _Config.of(self.static, cfg_data)
        hidden, kernel, bias = student
        cdt = _compute_dtype(*student, *teacher)
        # 1/τ: the slope is in the scaled logits z/τ.
        per_row = (*stats, g.astype(cdt) / cfg.temperature)
        block = _StudentGradient(student, teacher, per_row, cfg, cdt)
        varying = (*student, *teacher, *per_row)
        dh, dk, (db,) = passes.head_gradients(
            hidden, kernel, cfg.spans(student), cfg.chunks, block, cdt, (cdt,), varying
        )
        return dh, dk, (None if bias is None else db.astype(bias.dtype))


def _compute_dtype(*arrays) -> jnp.dtype:
    return _dtypes.compute_dtype(jnp.result_type(*(a.dtype for a in arrays if a is not None)))


# ----------------------------------------------------------------------------------------------
# Assembly: temperature, mask, reduction; the sharded form
# ----------------------------------------------------------------------------------------------


def _per_backend(implementation, student, teacher, mask, cfg, accelerator_chunks, reduction):
    """The single-device loss with each backend's blocks (GPUs and TPUs: whole-batch block
    rows)."""

    def run(chunks):
        c = cfg._replace(chunks=chunks)
        return lambda: _implementations.linear_head(
            _FN, implementation, _loss, student, teacher, mask, c, reduction
        )

    return on_backend_blocks(run, cfg.chunks, accelerator_chunks)


def _loss(student, teacher, mask, cfg: _Config, reduction: str, batch_axis=None):
    """τ²-scaled per-token divergences, masked and reduced (summed over ``batch_axis``)."""
    teacher = tuple(None if x is None else jax.lax.stop_gradient(x) for x in teacher)
    div = cast(jax.Array, vjp.apply(_TokenDivergence(cfg.static), student, (teacher, cfg.data)))
    loss = div * cfg.temperature**2
    if mask is not None:
        # A select, so a masked token's NaN (a degenerate row) leaks into neither value nor grad.
        loss = jnp.where(mask, loss, 0)
    if reduction == "none":
        return loss
    total = jnp.sum(loss)
    count = (
        jnp.asarray(loss.shape[0], loss.dtype) if mask is None else jnp.sum(mask, dtype=loss.dtype)
    )
    if batch_axis is not None:
        total, count = jax.lax.psum(total, batch_axis), jax.lax.psum(count, batch_axis)
    return total if reduction == "sum" else _reductions.safe_divide(total, count)


def _sharded(student, teacher, mask, cfg: _Config, reduction, mesh, batch_axis):
    """Token- and/or vocabulary-parallel loss under ``jax.shard_map``.

    Every device runs the blockwise passes on its own token rows and kernel columns; the
    per-token statistics are combined over the vocabulary shards inside the passes (``O(N)``
    numbers cross devices; no logits and no kernel are gathered). The student's inputs are
    marked as varying over every mesh axis in use, so that autodiff sums their per-device
    gradients over the axes each is replicated on.
    """

    def local(h, k, b, th, tk, tb, mask, beta, temperature):
        here = cfg._replace(beta=beta, temperature=temperature)
        if cfg.width is not None:  # uneven vocabulary shards: this device's column range
            start, owned_from = sharding.device_columns(cfg.vocab_axis, v, cfg.width)
            here = here._replace(col_start=start, owned_from=owned_from)
        # Not the mask: it must stay invariant over the vocabulary axis, like the loss.
        heads = [x for x in (h, k, b, th, tk, tb, here.col_start) if x is not None]
        h, k, b, th, tk, tb = (
            None if x is None else vary(x, *heads) for x in (h, k, b, th, tk, tb)
        )
        return _loss((h, k, b), (th, tk, tb), mask, here, reduction, batch_axis)

    v = student[1].shape[1]
    vocab = None if cfg.width is not None else cfg.vocab_axis  # replicated when uneven
    rows, cols = PartitionSpec(batch_axis), PartitionSpec(vocab)
    matrix_rows = PartitionSpec(batch_axis, None)
    matrix_cols = PartitionSpec(None, vocab)
    (h, k, b), (th, tk, tb) = student, teacher
    # The mask travels even when absent (all True): its sum counts the tokens per device.
    mask = jnp.ones((h.shape[0],), bool) if mask is None else mask
    arguments = dict(
        h=(h, matrix_rows), k=(k, matrix_cols), b=(b, cols), th=(th, matrix_rows),
        tk=(tk, matrix_cols), tb=(tb, cols), mask=(mask, rows), beta=(cfg.beta, PartitionSpec()),
        temperature=(cfg.temperature, PartitionSpec()),
    )  # fmt: skip
    out_specs = rows if reduction == "none" else PartitionSpec()
    return sharding.run(local, mesh, arguments, out_specs)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _check_hyperparameters(beta, temperature) -> None:
    """β in [0, 1] and τ > 0, finite: a concrete value out of range raises ``ValueError``; a
    traced one is checked for its type and shape only (check it with ``checkify``)."""
    _validation.hyperparameter(_FN, "beta", beta, high=1.0)
    _validation.hyperparameter(_FN, "temperature", temperature, positive=True)


def _prepare(arguments: dict[str, Any]) -> None:
    # Outside the compiled function, where a concrete array's value can still be read.
    _check_hyperparameters(arguments["beta"], arguments["temperature"])


def _check_options(divergence, beta, temperature, reduction) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(f"{_FN}: `divergence` must be one of {DIVERGENCES}, got {divergence!r}")
    _validation.check_reduction(_FN, reduction)
    _check_hyperparameters(beta, temperature)


def _check_head(prefix: str, hidden, kernel, bias, batch_shape):
    """A head's ``(hidden, kernel, bias)`` as arrays; ``hidden`` is ``(*batch_shape, D)``."""
    h, k = f"{prefix}hidden", f"{prefix}kernel"
    hidden = _validation.check_floating(_FN, h, hidden)
    kernel = _validation.check_floating(_FN, k, kernel)
    if hidden.ndim < 1:
        raise ValueError(f"{_FN}: `{h}` must have a feature axis (..., D), got a scalar")
    if batch_shape is not None and hidden.shape[:-1] != batch_shape:
        raise ValueError(
            f"{_FN}: `{h}` must have the student's token shape {batch_shape} before its feature "
            f"axis (its own D may differ), got shape {tuple(hidden.shape)}"
        )
    if kernel.ndim != 2 or kernel.shape[0] != hidden.shape[-1] or kernel.shape[1] == 0:
        raise ValueError(
            f"{_FN}: `{k}` must have shape (D, V) = ({hidden.shape[-1]}, V) with V >= 1 for "
            f"`{h}` with shape {tuple(hidden.shape)}; got `{k}` with shape "
            f"{tuple(kernel.shape)} and dtype {kernel.dtype}"
        )
    if bias is not None:
        name = f"{prefix}bias"
        bias = _validation.check_floating(_FN, name, bias)
        if bias.shape != (kernel.shape[1],):
            raise ValueError(
                f"{_FN}: `{name}` must have shape ({kernel.shape[1]},), one entry per class "
                f"(column of `{k}`), got shape {tuple(bias.shape)}"
            )
    return hidden, kernel, bias


def _check_mask(mask, batch_shape):
    if mask is None:
        return None
    mask = _validation.as_array(_FN, "mask", mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"{_FN}: `mask` must be boolean (True = a token that counts), got dtype "
                        f"{mask.dtype}; pass e.g. `targets != pad_id`")  # fmt: skip
    if mask.shape != batch_shape:
        raise ValueError(
            f"{_FN}: `mask` must have the token shape {batch_shape} (`hidden` without its "
            f"feature axis), got shape {tuple(mask.shape)}"
        )
    return mask


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


@functools.partial(
    _validation.jit,
    static_argnames=(
        "divergence", "reduction", "token_chunk", "vocab_chunk", "mesh", "batch_axis",
        "vocab_axis", "implementation",
    ),
    prepare=_prepare,
)  # fmt: skip
def linear_distillation(
    hidden: Float[ArrayLike, "*batch dim"],
    kernel: Float[ArrayLike, "dim classes"],
    teacher_hidden: Float[ArrayLike, "*batch teacher_dim"],
    teacher_kernel: Float[ArrayLike, "teacher_dim classes"],
    *,
    divergence: str = "kl",
    beta: float | Float[ArrayLike, ""] = 0.5,
    temperature: float | Float[ArrayLike, ""] = 1.0,
    mask: Bool[ArrayLike, "*batch"] | None = None,
    reduction: str = "mean",
    bias: Float[ArrayLike, " classes"] | None = None,
    teacher_bias: Float[ArrayLike, " classes"] | None = None,
    token_chunk: int | None = None,
    vocab_chunk: int | None = None,
    mesh: Mesh | None = None,
    batch_axis: str | tuple[str, ...] | None = None,
    vocab_axis: str | tuple[str, ...] | None = None,
    implementation: Literal["xla", "pallas"] | None = None,
) -> Float[Array, "*batch"] | Float[Array, ""]:
    r"""Distillation divergence between a teacher's and a student's linear heads, fused.

    With the student's logits \(z_s = h K + b\), the teacher's \(z_t = h_t K_t + b_t\) (the
    teacher may have another hidden size) and temperature τ, per token
    \(p_t = \mathrm{softmax}(z_t/τ)\), \(p_s = \mathrm{softmax}(z_s/τ)\) and

    $$
    \ell = τ^2 \cdot \begin{cases}
      \mathrm{KL}(p_t \,\|\, p_s) = \sum_c p_{t,c} \log (p_{t,c} / p_{s,c}) & \texttt{"kl"} \\
      \mathrm{KL}(p_s \,\|\, p_t) & \texttt{"reverse\_kl"} \\
      β\,\mathrm{KL}(p_t \,\|\, m) + (1-β)\,\mathrm{KL}(p_s \,\|\, m),
      \quad m = β p_t + (1-β) p_s & \texttt{"jsd"}
    \end{cases}
    $$

    (τ² keeps the gradient's scale independent of τ, as in Hinton et al.). Neither ``[N, V]``
    logit matrix is ever materialised: both are produced one ``token_chunk × vocab_chunk``
    block at a time. The KLs need per token the two log-sum-exps and the reference's mean
    log-ratio \(\sum_c p_c (x_c - y_c)\), accumulated in one pass with online rescaling; the JSD
    needs \(\log m\) per class, hence a first pass for the log-sum-exps and a second for the two
    KLs to \(m\). A ``jax.custom_vjp`` keeps those ``O(N)`` statistics and recomputes each block
    in the backward pass to form \(\partial\ell/\partial z_s\) (``p_s − p_t`` for ``"kl"``)
    and contract it with ``hidden`` and ``kernel``. Half-precision inputs are multiplied with
    float32 accumulation; the result comes back in the inputs' dtype.

    The teacher is a constant: ``teacher_hidden``, ``teacher_kernel`` and ``teacher_bias`` pass
    through ``jax.lax.stop_gradient`` (their gradients are zero). Reverse-mode differentiation
    only (no ``jax.jvp``/Hessians), in ``hidden``, ``kernel`` and ``bias``.

    Corners (τ-scaled logits; \(0 \log 0 = 0\) throughout):

    - a ``-inf`` teacher logit where the student's is finite adds nothing to ``"kl"`` and a
      finite term to ``"jsd"``, but makes ``"reverse_kl"`` ``inf`` (with NaN gradients): the
      student puts mass where the teacher has none; symmetrically a ``-inf`` student logit
      where the teacher's is finite makes ``"kl"`` ``inf``. Both ``-inf``: no term.
    - a token whose teacher or student logits are all ``-inf``, or hold a ``+inf``, has no
      distribution: its loss is NaN (as ``cross_entropy`` gives for such a row). Masked out,
      it contributes nothing to the value or the gradients.
    - ``mask`` all False: ``"mean"`` is NaN, ``"sum"`` is 0 and the gradients are 0
      (``cross_entropy``'s convention for all-ignored targets).

    Sharding: naming ``batch_axis`` (tokens: rows of ``hidden``, ``teacher_hidden``, ``mask``)
    and/or ``vocab_axis`` (classes: columns of both kernels and both biases) runs the loss under
    ``jax.shard_map``; each device works on its own blocks and only per-token statistics cross
    devices (``pmax``/``psum``): no logits and no kernel are ever gathered. Inputs sharded with
    explicit axis types (``jax.make_mesh``'s default) need the axes named: without them a
    ``ValueError`` says so. Under automatic sharding with no axes named, XLA partitions the
    loops itself (correct, but it may all-gather a vocabulary-sharded kernel).

    Args:
      hidden: the student's floating features ``(N, D)`` or ``(*batch, D)``.
      kernel: the student's head ``(D, V)``, laid out like a Flax ``Dense`` kernel.
      teacher_hidden: the teacher's features ``(*batch, D_t)``, the same tokens as ``hidden``.
      teacher_kernel: the teacher's head ``(D_t, V)``, over the same ``V`` classes.
      divergence: ``"kl"`` (forward KL, the teacher as reference), ``"reverse_kl"`` or ``"jsd"``.
      beta: β in ``[0, 1]``, the teacher's weight in the JSD mixture (``"jsd"`` only; β = 0 or 1
        give 0). A Python float or a traced scalar (a schedule compiles once).
      temperature: τ > 0, dividing both heads' logits. A Python float or a traced scalar (a
        schedule compiles once). Neither is differentiated. Concrete values out of range raise
        ``ValueError``; check traced ones with ``jaxloss.check_hyperparameters(temperature=tau,
        beta=b)`` inside a ``checkify.checkify``-transformed step.
      mask: optional boolean ``(*batch)``: True for the tokens that count (e.g. not padding).
        A masked token contributes nothing, even where its hidden rows are NaN or inf (the
        backward pass reads them as zeros).
      reduction: ``"none"`` (per token, shape ``(*batch)``, masked tokens 0), ``"sum"`` or
        ``"mean"`` (over the tokens where ``mask`` is True; over all tokens without a mask).
      bias: the student's optional bias ``(V,)``.
      teacher_bias: the teacher's optional bias ``(V,)``.
      token_chunk: rows per block (clipped to ``N``; need not divide it); ``None``: the
        backend's default, as ``linear_cross_entropy``'s (1024; on GPUs and TPUs every token up
        to 16384 in one block row, the hidden gradient carried).
      vocab_chunk: columns per block (clipped to ``V``; need not divide it); ``None``: 1024, on
        GPUs and TPUs ``2**24`` logits per block (2048 beyond 16384 tokens).
      mesh: the ``jax.sharding.Mesh`` for ``batch_axis``/``vocab_axis`` (default: the context
        mesh).
      batch_axis: mesh axis name(s) the tokens are split over (evenly), or ``None``.
      vocab_axis: mesh axis name(s) the classes are split over, or ``None``; they need not
        split evenly (each device then reads ``ceil(V / n)`` columns of the replicated
        kernels in place, the last range slid back with its overlap masked).
      implementation: ``None`` (each backend's default), ``"xla"`` (the blockwise XLA form)
        or ``"pallas"`` (no kernel yet: a ``ValueError``). Every backend gets the XLA form
        today; see docs/linear.md.

    Returns:
      Per-token losses (``"none"``) or a scalar, in the inputs' common floating dtype.

    Raises:
      ValueError: for inconsistent shapes, bad options or mesh axes.
      TypeError: for non-floating inputs, a non-boolean mask or non-int chunk sizes.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxloss
      >>> h, k = jnp.ones((6, 4)) / 4, jax.random.normal(jax.random.key(0), (4, 10))
      >>> th, tk = jnp.ones((6, 8)) / 8, jax.random.normal(jax.random.key(1), (8, 10))
      >>> fused = jaxloss.linear_distillation(h, k, th, tk, temperature=2.0, vocab_chunk=4)
      >>> log_p_t = jax.nn.log_softmax(th @ tk / 2.0)
      >>> log_p_s = jax.nn.log_softmax(h @ k / 2.0)
      >>> dense = 4.0 * jnp.mean(jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), -1))
      >>> bool(jnp.allclose(fused, dense, rtol=1e-5))
      True

    References:
      Hinton et al., "Distilling the Knowledge in a Neural Network" (2015); Agarwal et al.,
      "On-Policy Distillation of Language Models" (2024, generalised JSD); Liger Kernel's
      ``LigerFusedLinearJSD``; Milakov & Gimelshein, "Online normalizer calculation for
      softmax" (2018).
    """
    _check_options(divergence, beta, temperature, reduction)
    _implementations.check_linear(_FN, implementation)
    if token_chunk is not None:
        token_chunk = positive_int(_FN, "token_chunk", token_chunk)
    if vocab_chunk is not None:
        vocab_chunk = positive_int(_FN, "vocab_chunk", vocab_chunk)
    student = _check_head("", hidden, kernel, bias, None)
    batch_shape = tuple(student[0].shape[:-1])
    teacher = _check_head("teacher_", teacher_hidden, teacher_kernel, teacher_bias, batch_shape)
    if teacher[1].shape[1] != student[1].shape[1]:
        raise ValueError(
            f"{_FN}: `teacher_kernel` must cover the student's {student[1].shape[1]} classes, got "
            f"shape {tuple(teacher[1].shape)} for `kernel` with shape {tuple(student[1].shape)}"
        )
    mask = _check_mask(mask, batch_shape)
    out_dtype = jnp.result_type(*(x for x in (*student, *teacher) if x is not None))
    flat = lambda head: (*rows_with_a_feature(*head[:2]), *head[2:])
    student, teacher = flat(student), flat(teacher)
    mask = None if mask is None else mask.reshape(-1)
    n, v = student[0].shape[0], student[1].shape[1]
    resolved_mesh = sharding.check_mesh_axes(_FN, mesh, batch_axis, vocab_axis, n)
    if n == 0:
        empty = jnp.zeros((0,), _dtypes.compute_dtype(out_dtype))
        loss = _reductions.reduce_loss(empty, reduction)
    else:
        n_local = n // sharding.axis_size(resolved_mesh, batch_axis)
        split = sharding.VocabularySplit.of(resolved_mesh, vocab_axis, v)
        cdt = _dtypes.compute_dtype(out_dtype)
        beta, temperature = (
            jax.lax.stop_gradient(jnp.asarray(x, cdt)) for x in (beta, temperature)
        )
        width = split.width if split.uneven else None

        chunks, accelerator_chunks = (
            default_chunks(n_local, split.width, token_chunk, vocab_chunk, accelerator)
            for accelerator in (False, True)
        )
        cfg = _Config(divergence, beta, temperature, chunks, vocab_axis, width)
        if resolved_mesh is None:
            arrays = zip(_ARRAY_NAMES, (*student, *teacher, mask), strict=True)
            sharding.reject_explicit_sharding(_FN, **dict(arrays))
            loss = _per_backend(
                implementation, student, teacher, mask, cfg, accelerator_chunks, reduction
            )
        else:
            loss = _sharded(student, teacher, mask, cfg, reduction, resolved_mesh, batch_axis)
    if reduction == "none":
        loss = loss.reshape(batch_shape)
    return loss.astype(out_dtype)
