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

import functools
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec
from jaxtyping import Array, ArrayLike, Bool, Float

from jaxloss import _dtypes, _reductions, _validation
from jaxloss._linear import chunked, sharded

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
# The same blocks as linear_cross_entropy's defaults (tuned there on a 2-core CPU).
DEFAULT_TOKEN_CHUNK = 1024
DEFAULT_VOCAB_CHUNK = 1024


class _Config(NamedTuple):
    """The options the blockwise passes read: ``divergence``, ``chunks`` and ``vocab_axis`` are
    static (:attr:`static`, a custom_vjp's nondiff arg); ``beta`` and ``temperature`` are
    scalars, data like ``label_smoothing`` (a schedule under ``jit`` compiles once)."""

    divergence: str
    beta: Any
    temperature: Any
    chunks: tuple[int, int]
    vocab_axis: Any

    @property
    def static(self) -> tuple[str, tuple[int, int], Any]:
        return self.divergence, self.chunks, self.vocab_axis

    @classmethod
    def of(cls, static, beta, temperature) -> _Config:
        divergence, chunks, vocab_axis = static
        return cls(divergence, beta, temperature, chunks, vocab_axis)


# ----------------------------------------------------------------------------------------------
# Blocks of both heads (the chunking itself is jaxloss._linear.chunked's)
# ----------------------------------------------------------------------------------------------


def _columns(head, start, width):
    """A head's kernel (and bias) columns ``[start, start + width)``."""
    _, kernel, bias = head
    k_j = jax.lax.dynamic_slice_in_dim(kernel, start, width, axis=1)
    return k_j, None if bias is None else jax.lax.dynamic_slice_in_dim(bias, start, width)


def _scaled_logits(h_i, k_j, b_j, col: chunked.Chunk, cfg: _Config, cdt):
    """``(h_i @ k_j + b_j) / τ``, with the columns already seen in the previous chunk at -inf.

    A -inf column is no class at all to every statistic below (zero probability, zero term), so
    the overlap of a slid-back last chunk needs no other masking.
    """
    z = chunked.dot(h_i, k_j, (1, 0), cdt)
    if b_j is not None:
        z = z + b_j.astype(cdt)[None, :]
    z = z * (1 / cfg.temperature)  # τ is data; at τ = 1 the product is z itself
    return z if col.fresh is None else jnp.where(col.fresh[None, :], z, -jnp.inf)


def _rows(arrays, start, width):
    return tuple(jax.lax.dynamic_slice_in_dim(a, start, width) for a in arrays)


def _sweep(student, teacher, stats, init, update, cfg: _Config, cdt):
    """Folds ``update`` over every block of both heads' scaled logits; returns per-token carries.

    ``update(a, b, carry_i, stats_i)`` gets the teacher's and the student's block ``(nc, vc)``
    and the row chunk's slices of the carries and of the read-only per-token ``stats``. Loops
    run over vocabulary chunks outside and token chunks inside.
    """
    n, v = student[0].shape[0], student[1].shape[1]
    nc, vc = cfg.chunks

    def vocab_step(j, carry):
        col = chunked.chunk(j, vc, v)
        cols_t, cols_s = _columns(teacher, col.start, vc), _columns(student, col.start, vc)

        def token_step(i, carry):
            row = chunked.chunk(i, nc, n)
            old = _rows(carry, row.start, nc)
            (th_i,), (h_i,) = _rows(teacher[:1], row.start, nc), _rows(student[:1], row.start, nc)
            a = _scaled_logits(th_i, *cols_t, col, cfg, cdt)
            b = _scaled_logits(h_i, *cols_s, col, cfg, cdt)
            new = update(a, b, old, _rows(stats, row.start, nc))
            if row.fresh is not None:
                new = tuple(jnp.where(row.fresh, x, y) for x, y in zip(new, old, strict=True))
            return tuple(
                jax.lax.dynamic_update_slice_in_dim(c, x, row.start, 0)
                for c, x in zip(carry, new, strict=True)
            )

        return jax.lax.fori_loop(0, chunked.num_chunks(n, nc), token_step, carry)

    init = tuple(chunked.vary(x, *student, *teacher, *stats) for x in init)
    return jax.lax.fori_loop(0, chunked.num_chunks(v, vc), vocab_step, init)


# ----------------------------------------------------------------------------------------------
# Forward statistics
# ----------------------------------------------------------------------------------------------


def _online_step(m, s, x):
    """One online log-sum-exp step: the new running max, the rescale factor and ``exp(x - max)``."""
    m_new = jnp.maximum(m, jnp.max(x, 1))
    shift = chunked.finite_or_zero(m_new)
    return m_new, jnp.exp(m - shift), jnp.exp(x - shift[:, None])


def _log_ratio(x, other):
    """``x - other`` where ``x`` is finite; 0 where ``x = -inf`` (its probability is 0 there)."""
    return jnp.where(jnp.isneginf(x), 0, x - other)


def _first_pass(student, teacher, cfg: _Config, cdt):
    """Per token: each head's :class:`chunked.Normaliser` and, for the KLs, ``Σ_c p_c (x_c -
    y_c)``.

    ``p``/``x`` are the reference distribution's (teacher for ``"kl"``, student for
    ``"reverse_kl"``) and ``y`` the other's scaled logits; the sum is kept relative to the
    reference's running maximum and rescaled with it. Combined over ``cfg.vocab_axis``.
    """
    with_ratio = cfg.divergence != "jsd"
    teacher_ref = cfg.divergence == "kl"

    def update(a, b, carry, _):
        m_t, s_t, m_s, s_s, u = carry
        m_t, scale_t, e_t = _online_step(m_t, s_t, a)
        m_s, scale_s, e_s = _online_step(m_s, s_s, b)
        if with_ratio:
            x, y, e, scale = (a, b, e_t, scale_t) if teacher_ref else (b, a, e_s, scale_s)
            u = u * scale + jnp.sum(e * _log_ratio(x, y), 1)
        return m_t, s_t * scale_t + jnp.sum(e_t, 1), m_s, s_s * scale_s + jnp.sum(e_s, 1), u

    n = student[0].shape[0]
    ninf, zero = jnp.full((n,), -jnp.inf, cdt), jnp.zeros((n,), cdt)
    m_t, s_t, m_s, s_s, u = _sweep(
        student, teacher, (), (ninf, zero, ninf, zero, zero), update, cfg, cdt
    )
    (norm_t, local_t), (norm_s, local_s) = (
        _combine_normaliser(m, jnp.log(s), cfg.vocab_axis) for m, s in ((m_t, s_t), (m_s, s_s))
    )
    if not with_ratio:
        return norm_t, norm_s, None
    s_ref, local_ref, norm_ref = (s_t, local_t, norm_t) if teacher_ref else (s_s, local_s, norm_s)
    mean = jnp.where(s_ref > 0, u / jnp.where(s_ref > 0, s_ref, 1), 0)
    return norm_t, norm_s, _combine_mean(mean, local_ref, norm_ref, cfg.vocab_axis)


def _combine_normaliser(top, log_sum, axis):
    """The normaliser over every vocabulary shard, and each shard's own ``log_sum`` moved to its
    shift (``-inf`` where the shard has no probability)."""
    if axis is None:
        return chunked.Normaliser(chunked.finite_or_zero(top), log_sum), log_sum
    top, total, step = chunked.combine_shards(top, log_sum, axis)
    return chunked.Normaliser(chunked.finite_or_zero(top), total), log_sum - step


def _combine_mean(mean, local_log_sum, norm: chunked.Normaliser, axis):
    """Shards' ``p``-weighted means, each weighted by its shard's share of ``p``, summed."""
    if axis is None:
        return mean
    log_share = local_log_sum - chunked.finite_or_zero(norm.log_sum)
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
        lp_t = chunked.Normaliser(shift_t, log_sum_t).log_softmax(a)
        lp_s = chunked.Normaliser(shift_s, log_sum_s).log_softmax(b)
        lm = _log_mixture(lp_t, lp_s, cfg.beta)
        return kl_t + jnp.sum(_xlogy_ratio(lp_t, lm), 1), kl_s + jnp.sum(_xlogy_ratio(lp_s, lm), 1)

    zero = jnp.zeros((student[0].shape[0],), cdt)
    # A degenerate row (no finite normaliser) is NaN in the end; finite here, it stays quiet.
    stats = tuple(chunked.finite_or_zero(x) for x in (*norm_t, *norm_s))
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
    KL(p_s‖m))``. Entries of zero student probability are exactly 0.
    """
    shift_t, log_sum_t, shift_s, log_sum_s, extra = (x[:, None] for x in stats)
    lp_t = chunked.Normaliser(shift_t, log_sum_t).log_softmax(a)
    lp_s = chunked.Normaliser(shift_s, log_sum_s).log_softmax(b)
    p_s = jnp.exp(lp_s)
    if cfg.divergence == "kl":
        return p_s - jnp.exp(lp_t)
    if cfg.divergence == "reverse_kl":
        return jnp.where(p_s == 0, 0, p_s * (lp_s - lp_t - extra))
    lm = _log_mixture(lp_t, lp_s, cfg.beta)
    return jnp.where(p_s == 0, 0, (1 - cfg.beta) * p_s * (lp_s - lm - extra))


def _block_dz(student, teacher, per_row, row: chunked.Chunk, col: chunked.Chunk, cfg, cdt):
    """``(∂ℓ/∂z_s, h_i)`` of one recomputed block (``z_s`` the student's unscaled logits, ``h_i``
    its hidden rows as the gradient matmuls read them).

    Tokens without a cotangent (masked) contribute exactly nothing, even degenerate ones and
    NaN/inf hidden rows: those rows are zeroed before any matmul (a select, no ``0 · NaN``).
    """
    nc, vc = cfg.chunks
    *stats_i, g_i = _rows(per_row, row.start, nc)
    counted = g_i != 0
    th_i, h_i = (
        chunked.zero_rows(x, counted) for x in _rows((teacher[0], student[0]), row.start, nc)
    )
    a = _scaled_logits(th_i, *_columns(teacher, col.start, vc), col, cfg, cdt)
    b = _scaled_logits(h_i, *_columns(student, col.start, vc), col, cfg, cdt)
    live = counted if row.fresh is None else counted & row.fresh
    return jnp.where(live[:, None], g_i[:, None] * _student_slope(a, b, stats_i, cfg), 0), h_i


def _grads(student, teacher, stats, g, cfg: _Config):
    """Gradients for the student's hidden, kernel and bias from the per-token cotangent ``g``.

    Vocabulary chunks outside (each kernel-gradient column block is finished and written once),
    token chunks inside. A float32 hidden gradient accumulates in place there; a half-precision
    one gets a pass of its own (:func:`_hidden_grads`) rather than a float32 copy of its size.
    """
    hidden, kernel, bias = student
    (n, d), v = hidden.shape, kernel.shape[1]
    nc, vc = cfg.chunks
    mm = jnp.result_type(hidden.dtype, kernel.dtype)
    cdt = _compute_dtype(*student, *teacher)
    # 1/τ: the slope is in the scaled logits z/τ.
    per_row = (*stats, g.astype(cdt) / cfg.temperature)
    inputs = (*student, *teacher, *per_row)
    one_pass = jnp.dtype(hidden.dtype) == jnp.dtype(cdt)

    def vocab_step(j, carry):
        dh, dk, db = carry
        col = chunked.chunk(j, vc, v)
        k_j = _columns(student, col.start, vc)[0].astype(mm)

        def token_step(i, inner):
            dh, dk_j, db_j = inner
            row = chunked.chunk(i, nc, n)
            dz, h_i = _block_dz(student, teacher, per_row, row, col, cfg, cdt)
            dz_mm = dz.astype(mm)
            if dh is not None:
                dh_i = jax.lax.dynamic_slice_in_dim(dh, row.start, nc)
                dh_i = dh_i + chunked.dot(dz_mm, k_j, (1, 1), cdt)
                dh = jax.lax.dynamic_update_slice_in_dim(dh, dh_i, row.start, 0)
            return dh, dk_j + chunked.dot(h_i.astype(mm), dz_mm, (0, 0), cdt), db_j + jnp.sum(dz, 0)

        zeros = (jnp.zeros((d, vc), cdt), jnp.zeros((vc,), cdt))
        inner = (dh, *(chunked.vary(z, *inputs) for z in zeros))
        dh, dk_j, db_j = jax.lax.fori_loop(0, chunked.num_chunks(n, nc), token_step, inner)
        return dh, chunked.put_fresh(dk, dk_j, col, 1), chunked.put_fresh(db, db_j, col)

    dh = jnp.zeros((n, d), cdt) if one_pass else None
    init = (dh, jnp.zeros((d, v), kernel.dtype), jnp.zeros((v,), cdt))
    init = tuple(None if x is None else chunked.vary(x, *inputs) for x in init)
    dh, dk, db = jax.lax.fori_loop(0, chunked.num_chunks(v, vc), vocab_step, init)
    if not one_pass:
        dh = _hidden_grads(student, teacher, per_row, cfg, cdt)
    return dh.astype(hidden.dtype), dk, (None if bias is None else db.astype(bias.dtype))


def _hidden_grads(student, teacher, per_row, cfg: _Config, cdt):
    """The student hidden's gradient, one row block at a time (no full-size accumulator)."""
    hidden, kernel, _ = student
    mm = jnp.result_type(hidden.dtype, kernel.dtype)

    def block(row: chunked.Chunk, col: chunked.Chunk) -> jax.Array:
        dz, _ = _block_dz(student, teacher, per_row, row, col, cfg, cdt)
        k_j = _columns(student, col.start, cfg.chunks[1])[0].astype(mm)
        return chunked.dot(dz.astype(mm), k_j, (1, 1), cdt)

    inputs = (*student, *teacher, *per_row)
    return chunked.sum_over_columns(hidden, cfg.chunks, kernel.shape[1], block, cdt, *inputs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _token_divergence(hidden, kernel, bias, t_hidden, t_kernel, t_bias, beta, temperature, static):
    """Per-token divergence of the two heads' tempered distributions, with a recomputing VJP."""
    cfg = _Config.of(static, beta, temperature)
    return _divergences((hidden, kernel, bias), (t_hidden, t_kernel, t_bias), cfg)[0]


def _token_divergence_fwd(hidden, kernel, bias, t_hidden, t_kernel, t_bias, beta, temperature,
                          static):  # fmt: skip
    student, teacher = (hidden, kernel, bias), (t_hidden, t_kernel, t_bias)
    div, stats = _divergences(student, teacher, _Config.of(static, beta, temperature))
    return div, (student, teacher, stats, beta, temperature)


def _token_divergence_bwd(static, residuals, g):
    student, teacher, stats, beta, temperature = residuals
    dh, dk, db = _grads(student, teacher, stats, g, _Config.of(static, beta, temperature))
    # The teacher is a constant (its inputs also pass through stop_gradient); β and τ are not
    # differentiated.
    return dh, dk, db, None, None, None, None, None


_token_divergence.defvjp(_token_divergence_fwd, _token_divergence_bwd)


def _compute_dtype(*arrays) -> jnp.dtype:
    return _dtypes.compute_dtype(jnp.result_type(*(a.dtype for a in arrays if a is not None)))


# ----------------------------------------------------------------------------------------------
# Assembly: temperature, mask, reduction; the sharded form
# ----------------------------------------------------------------------------------------------


def _loss(student, teacher, mask, cfg: _Config, reduction: str, batch_axis=None):
    """τ²-scaled per-token divergences, masked and reduced (summed over ``batch_axis``)."""
    teacher = tuple(None if x is None else jax.lax.stop_gradient(x) for x in teacher)
    div = _token_divergence(*student, *teacher, cfg.beta, cfg.temperature, cfg.static)
    div = cast(jax.Array, div)
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
    has_bias = (student[2] is not None, teacher[2] is not None)

    def local(h, k, b, th, tk, tb, mask, beta, temperature):
        # Not the mask: it must stay invariant over the vocabulary axis, like the loss.
        heads = (h, k, b, th, tk, tb)
        h, k, b, th, tk, tb = (chunked.vary(x, *heads) for x in heads)
        b, tb = (x if kept else None for x, kept in zip((b, tb), has_bias, strict=True))
        # The mask travels even when absent (all True): its sum counts the tokens per device.
        here = cfg._replace(beta=beta, temperature=temperature)
        return _loss((h, k, b), (th, tk, tb), mask, here, reduction, batch_axis)

    rows, cols = PartitionSpec(batch_axis), PartitionSpec(cfg.vocab_axis)
    matrix_rows = PartitionSpec(batch_axis, None)
    matrix_cols = PartitionSpec(None, cfg.vocab_axis)
    scalar = PartitionSpec()
    in_specs = (
        matrix_rows,
        matrix_cols,
        cols,
        matrix_rows,
        matrix_cols,
        cols,
        rows,
        scalar,
        scalar,
    )
    n, v = student[0].shape[0], student[1].shape[1]
    # shard_map takes arrays only: absent biases and mask travel as inert placeholders.
    (h, k, b), (th, tk, tb) = student, teacher
    no_bias = jnp.zeros((v,), jnp.float32)
    b, tb = (no_bias if x is None else x for x in (b, tb))
    args = (h, k, b, th, tk, tb, jnp.ones((n,), bool) if mask is None else mask, cfg.beta,
            cfg.temperature)  # fmt: skip
    if any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
        # Explicitly sharded inputs must arrive in exactly the in_specs' layout.
        target = in_specs
        if isinstance(mesh, Mesh):
            target = tuple(jax.sharding.NamedSharding(mesh, spec) for spec in in_specs)
        args = jax.reshard(args, target)
    out_specs = rows if reduction == "none" else PartitionSpec()
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs)(*args)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _check_chunk(name: str, value: Any) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"{_FN}: `{name}` must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{_FN}: `{name}` must be a positive int, got {value}")
    return int(value)


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
        "vocab_axis",
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
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    mesh: Mesh | None = None,
    batch_axis: str | tuple[str, ...] | None = None,
    vocab_axis: str | tuple[str, ...] | None = None,
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
      token_chunk: rows per block (clipped to ``N``; need not divide it).
      vocab_chunk: columns per block (clipped to ``V``; need not divide it).
      mesh: the ``jax.sharding.Mesh`` for ``batch_axis``/``vocab_axis`` (default: the context
        mesh).
      batch_axis: mesh axis name(s) the tokens are split over (evenly), or ``None``.
      vocab_axis: mesh axis name(s) the classes are split over (evenly), or ``None``.

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
    token_chunk = _check_chunk("token_chunk", token_chunk)
    vocab_chunk = _check_chunk("vocab_chunk", vocab_chunk)
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
    flat = lambda head: (*chunked.rows_with_a_feature(*head[:2]), *head[2:])
    student, teacher = flat(student), flat(teacher)
    mask = None if mask is None else mask.reshape(-1)
    n, v = student[0].shape[0], student[1].shape[1]
    resolved_mesh = sharded.check_mesh_axes(mesh, batch_axis, vocab_axis, n, v, fn=_FN)
    if n == 0:
        empty = jnp.zeros((0,), _dtypes.compute_dtype(out_dtype))
        loss = _reductions.reduce_loss(empty, reduction)
    else:
        n_local = n // (1 if batch_axis is None else sharded.axis_size(resolved_mesh, batch_axis))
        v_local = v // (1 if vocab_axis is None else sharded.axis_size(resolved_mesh, vocab_axis))
        chunks = (min(token_chunk, n_local), min(vocab_chunk, v_local))
        cdt = _dtypes.compute_dtype(out_dtype)
        beta, temperature = (
            jax.lax.stop_gradient(jnp.asarray(x, cdt)) for x in (beta, temperature)
        )
        cfg = _Config(divergence, beta, temperature, chunks, vocab_axis)
        if resolved_mesh is None:
            arrays = zip(_ARRAY_NAMES, (*student, *teacher, mask), strict=True)
            sharded.reject_explicit_sharding(_FN, **dict(arrays))
            loss = _loss(student, teacher, mask, cfg, reduction)
        else:
            loss = _sharded(student, teacher, mask, cfg, reduction, resolved_mesh, batch_axis)
    if reduction == "none":
        loss = loss.reshape(batch_shape)
    return loss.astype(out_dtype)
