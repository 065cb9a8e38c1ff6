"""The public ``linear_cross_entropy``: argument checks, then one of four forms.

The forms: the fused gradient pass for ``"sum"``/``"mean"`` on CPU (:func:`chunked.fused_total`),
the per-token blocked statistics for ``"none"`` and for every reduction on GPUs and TPUs
(:func:`chunked.token_stats`), the ``shard_map`` form when mesh axes are named
(:mod:`jaxloss._linear.sharded`), and nothing for an empty batch.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Array, ArrayLike, Float, Integer

from jaxloss import _dtypes, _implementations, _reductions, _targets, _validation
from jaxloss._blockwise import blocks
from jaxloss._blockwise import sharding as mesh_axes
from jaxloss._linear import assembly, chunked, kernel_stats, pallas_tpu, sharded
from jaxloss._stats import LogitStats

_FN = "linear_cross_entropy"
# Where "sum" and "mean" take the fused gradient pass (see _summed); elsewhere, the recomputing one.
FUSED_PLATFORMS = ("cpu",)


def _check_arrays(hidden, kernel, targets, bias):
    """Validated ``(hidden, kernel, targets, bias)`` arrays of consistent shapes."""
    fn = _FN
    hidden = _validation.check_floating(fn, "hidden", hidden)
    kernel = _validation.check_floating(fn, "kernel", kernel)
    targets = _validation.check_real(fn, "targets", targets)
    if hidden.ndim < 1:
        raise ValueError(f"{fn}: `hidden` must have a feature axis (..., D), got a scalar")
    if kernel.ndim != 2 or kernel.shape[0] != hidden.shape[-1] or kernel.shape[1] == 0:
        raise ValueError(
            f"{fn}: `kernel` must have shape (D, V) = ({hidden.shape[-1]}, V) with V >= 1 for "
            f"`hidden` with shape {tuple(hidden.shape)}; got `kernel` with shape "
            f"{tuple(kernel.shape)} and dtype {kernel.dtype} (a PyTorch `(V, D)` weight: pass "
            "its transpose, or use jaxloss.torch_linear_cross_entropy)"
        )
    batch, v = tuple(hidden.shape[:-1]), kernel.shape[1]
    floating = jnp.issubdtype(targets.dtype, jnp.floating)
    if floating and targets.shape == batch:
        raise TypeError(
            f"{fn}: floating `targets` are read as class probabilities of shape {(*batch, v)}; "
            f"got shape {tuple(targets.shape)}, the shape of class indices: class indices need "
            "an integer dtype (e.g. `targets.astype(jnp.int32)`)"
        )
    if targets.shape != ((*batch, v) if floating else batch):
        want = f"{batch} for class indices or {(*batch, v)} for class probabilities"
        raise ValueError(
            f"{fn}: `targets` must have shape {want} (`hidden` has shape {tuple(hidden.shape)}, "
            f"{v} classes); got shape {tuple(targets.shape)} and dtype {targets.dtype}"
        )
    if bias is not None:
        bias = _validation.check_floating(fn, "bias", bias)
        if bias.shape != (v,):
            raise ValueError(
                f"{fn}: `bias` must have shape ({v},), one entry per class (column of `kernel`), "
                f"got shape {tuple(bias.shape)} and dtype {bias.dtype}"
            )
    return hidden, kernel, targets, bias


def _check_options(ignore_index, reduction, label_smoothing, z_loss, soft_cap):
    """``(static Options without num_classes, (smoothing, z_loss), soft_cap)``."""
    _validation.check_reduction(_FN, reduction)
    if not isinstance(ignore_index, (int, np.integer)) or isinstance(ignore_index, bool):
        raise TypeError(f"{_FN}: `ignore_index` must be an int, got {ignore_index!r}")
    smoothing = _validation.hyperparameter(_FN, "label_smoothing", label_smoothing, high=1.0)
    z_loss = _validation.hyperparameter(_FN, "z_loss", z_loss)
    soft_cap = _validation.hyperparameter(_FN, "soft_cap", soft_cap, positive=True)
    static = dict(
        ignore_index=int(ignore_index), reduction=reduction, smoothing=smoothing is not None,
        z_loss=z_loss is not None,
    )  # fmt: skip
    hyper = tuple(0.0 if value is None else value for value in (smoothing, z_loss))
    return static, hyper, soft_cap


@_validation.checked_call
def linear_cross_entropy(
    hidden: Float[ArrayLike, "*hidden_shape"],
    kernel: Float[ArrayLike, "*kernel_shape"],
    targets: Integer[ArrayLike, "*target_shape"] | Float[ArrayLike, "*target_shape"],
    *,
    bias: Float[ArrayLike, "*bias_shape"] | None = None,
    weight: Float[ArrayLike, "*weight_shape"] | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float | Float[ArrayLike, ""] = 0.0,
    z_loss: float | Float[ArrayLike, ""] = 0.0,
    soft_cap: float | Float[ArrayLike, ""] | None = None,
    return_stats: bool = False,
    token_chunk: int | None = None,
    vocab_chunk: int | None = None,
    grad_token_chunk: int | None = None,
    mesh: Mesh | None = None,
    batch_axis: str | tuple[str, ...] | None = None,
    vocab_axis: str | tuple[str, ...] | None = None,
    implementation: Literal["xla", "pallas"] | None = None,
) -> (
    Float[Array, "*batch"]
    | Float[Array, ""]
    | tuple[Float[Array, "*batch"] | Float[Array, ""], LogitStats]
):
    r"""Cross-entropy of the logits ``hidden @ kernel + bias``, never materialising them.

    (The annotations name each argument's shape apart so that a mismatch reaches this
    function's own error, which names the fix; the shapes are in Args below.)

    Equal to ``cross_entropy(cap(hidden @ kernel + bias), targets, weight=..., ignore_index=...,
    reduction=..., label_smoothing=..., z_loss=...)`` — same semantics in every corner — but the
    ``[N, V]`` logits only ever exist one block at a time. With
    \(z_n = \mathrm{cap}(h_n K + b)\), \(\mathrm{cap}(x) = c \tanh(x / c)\) (the identity
    without ``soft_cap``), over ``V`` classes with class weights ``w``:

    $$
    \ell_n = (1-\varepsilon)\, w_{y_n} (L_n - z_{n,y_n})
             + \frac{\varepsilon}{V} \Big(L_n \sum_c w_c - \sum_c w_c z_{n,c}\Big)
             + \lambda_z L_n^2,
    \qquad L_n = \log \sum_c e^{z_{n,c}}
    $$

    and for probability targets ``t`` (shape ``(*batch, V)``) \(\ell_n = \sum_c w_c t'_{n,c}
    (L_n - z_{n,c}) + \lambda_z L_n^2\) with \(t' = (1-\varepsilon) t + \varepsilon / V\),
    ``"mean"`` dividing by the number of positions (PyTorch's rules).

    \(L_n\) is accumulated by an online logsumexp over ``token_chunk × vocab_chunk`` blocks.
    On CPU, differentiated with ``"sum"``/``"mean"``, the forward pass already forms the
    gradient (per ``grad_token_chunk`` tokens, the logits over the whole vocabulary, then
    \(\partial \ell / \partial z\) contracted with ``hidden`` and ``kernel``): three
    ``N × D × V`` matmuls, as many as the materialised path; forward-only calls take the cheap
    blocked pass. With ``"none"``, and on GPUs and TPUs for every reduction, the backward pass
    recomputes each block: four matmuls, five for a half-precision ``hidden`` (its gradient
    gets a pass of its own instead of a float32 accumulator of its size), and nothing larger
    than a few blocks held (42 MiB at N=8192, D=4096, V=131072 in bf16 on an H100, compiled;
    the fused pass's float32 gradient accumulators would be 2.1 GiB). On TPU, float32 at
    DEFAULT matmul precision runs as bf16 passes for which XLA keeps a bf16 copy of the
    kernel; ``jax.default_matmul_precision("float32")`` avoids it. Half-precision inputs are
    multiplied with float32 accumulation and never rounded to half precision as logits. Reverse-mode
    differentiation only (no ``jax.jvp``/``jax.hessian``), in ``hidden``, ``kernel``, ``bias``
    and ``weight``; the targets and the hyperparameters (``label_smoothing``, ``z_loss``,
    ``soft_cap``) are not differentiated.

    Sharding: naming the mesh axes — ``vocab_axis`` (kernel columns, ``bias`` and ``weight``)
    and/or ``batch_axis`` (tokens) — runs the loss under ``jax.shard_map``, each device working
    on its own block of logits and exchanging only ``O(N)`` statistics (Megatron-style
    vocabulary-parallel cross-entropy); neither logits nor kernel are ever gathered. Nothing
    switches to that form by itself. Without axes, under automatic sharding, XLA partitions the
    computation: correct for any ``NamedSharding``, but a vocabulary-sharded kernel gets
    all-gathered (the logits never are). Inputs sharded with explicit axis types
    (``jax.make_mesh``'s default) need the axes named: without them a ``ValueError`` says so.

    Args:
      hidden: floating features ``(N, D)`` or ``(*batch, D)`` (flattened to tokens).
      kernel: floating weights ``(D, V)``, laid out like a Flax ``Dense`` kernel (a PyTorch
        ``nn.Linear.weight`` is its transpose; see :func:`jaxloss.torch_linear_cross_entropy`).
      targets: integer class indices of shape ``hidden.shape[:-1]``, or floating class
        probabilities of shape ``(*hidden.shape[:-1], V)``.
      bias: optional floating bias ``(V,)``.
      weight: optional per-class weight ``(V,)``.
      ignore_index: index target that contributes no loss, weight or gradient, even where its
        ``hidden`` row is NaN or inf (the gradient passes read that row as zeros).
      reduction: ``"none"`` (per token, shape ``hidden.shape[:-1]``), ``"sum"`` or ``"mean"``
        (index targets: divided by the total class weight of the non-ignored targets;
        probability targets: by the number of positions).
      label_smoothing: ε in ``[0, 1]`` (PyTorch's formula, class weights included); a Python
        float or a traced scalar (a schedule compiles once).
      z_loss: coefficient λ_z ≥ 0 on ``logsumexp(z)²`` at non-ignored positions, reduced like
        the main loss; a Python float or a traced scalar.
      soft_cap: ``c > 0`` for Gemma-2 style logit soft-capping ``z → c·tanh(z/c)`` before
        everything else (the loss, z-loss and the statistics see the capped logits); ``None``
        disables it. A Python float or a traced scalar.
      return_stats: also return a :class:`jaxloss.LogitStats` of per-position ``lse``,
        ``correct``, ``entropy`` and ``argmax`` of the (capped) logits, from the same pass.
      token_chunk: rows of ``hidden`` per block of the blocked pass (clipped to ``N``; any
        value works, the last chunk may overlap the previous one); ``None``: 1024 on CPUs; on
        GPUs and TPUs every token up to 16384 in one block row, else 2048 (docs/linear.md says
        why).
      vocab_chunk: columns of ``kernel`` per block of the blocked pass (clipped to ``V``);
        ``None``: 1024 on CPUs; on GPUs and TPUs ``2**24`` logits per block, or 2048 beyond
        16384 tokens.
      grad_token_chunk: tokens per block of the fused gradient pass (CPU), which holds
        ``[grad_token_chunk, V]`` logits; default ``2**24 // V`` (64 MiB of float32 logits).
      mesh: the ``jax.sharding.Mesh`` for ``batch_axis``/``vocab_axis`` (default: the context
        mesh).
      batch_axis: mesh axis name(s) the tokens are split over, or ``None``. Tokens must split
        evenly; ``token_chunk`` then applies to each device's share.
      vocab_axis: mesh axis name(s) the classes are split over, or ``None``. Classes need not
        split evenly (GPT-2's 50257 over 8 devices): each device then takes ``ceil(V / n)``
        columns of the kernel, which arrives replicated (JAX cannot place uneven shards), read
        in place, the last range slid back with its overlap masked; the kernel's gradient comes
        back replicated. ``vocab_chunk`` applies to each device's share.
      implementation: ``None`` (each backend's default, chosen when the program is lowered:
        on a TPU the Pallas kernels where they take the options and the program runs on one
        chip or inside the ``shard_map`` form, else the XLA form; elsewhere the XLA form),
        ``"xla"`` (the blockwise XLA form) or ``"pallas"`` (the TPU kernels; a ``ValueError``
        for options they do not take, on other backends and where XLA partitions the program
        over several chips). docs/linear.md says why.

    Returns:
      Per-token losses (``"none"``) or a scalar, in the dtype ``hidden @ kernel + bias`` would
      have; with ``return_stats``, ``(loss, stats)``. A target outside ``[0, V)`` that is not
      ``ignore_index`` gives NaN at its position (and NaN gradients), as in
      ``jaxloss.cross_entropy``.

    Raises:
      ValueError: for inconsistent shapes, bad options or mesh axes.
      TypeError: for non-floating inputs, non-numeric targets or non-int options.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxloss
      >>> h = jax.random.normal(jax.random.key(0), (6, 4))
      >>> k = jax.random.normal(jax.random.key(1), (4, 10))
      >>> y = jnp.array([0, 3, 9, 1, -100, 5])
      >>> fused = jaxloss.linear_cross_entropy(h, k, y, vocab_chunk=4, label_smoothing=0.1)
      >>> dense = jaxloss.cross_entropy(h @ k, y, label_smoothing=0.1)
      >>> bool(jnp.allclose(fused, dense, rtol=1e-5))
      True
      >>> loss, stats = jaxloss.linear_cross_entropy(h, k, y, soft_cap=5.0, return_stats=True)
      >>> stats.correct.shape, stats.correct[4].item()  # an ignored position is never correct
      ((6,), False)

    References:
      Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models" (2024); Hsu et al.,
      "Liger Kernel" (2024) for the gradient in the forward pass; Milakov & Gimelshein, "Online
      normalizer calculation for softmax" (2018); Shoeybi et al., "Megatron-LM" (2019) for the
      vocabulary-parallel form; Gemma Team, "Gemma 2" (2024) for logit soft-capping.
    """
    if np.ndim(kernel) == 2:  # PyTorch's error on concrete out-of-range targets (not traced)
        logits_shape = (*np.shape(hidden)[:-1], np.shape(kernel)[-1])
        _targets.raise_if_out_of_range(
            _FN, "hidden @ kernel", logits_shape, targets, ignore_index, -1
        )
    static, hyper, soft_cap = _check_options(
        ignore_index, reduction, label_smoothing, z_loss, soft_cap
    )
    config = chunked.ChunkConfig(token_chunk, vocab_chunk, grad_token_chunk)
    _implementations.check_linear(_FN, implementation)
    if not isinstance(return_stats, bool):
        raise TypeError(f"{_FN}: `return_stats` must be a bool, got {return_stats!r}")
    return _linear_cross_entropy(
        hidden, kernel, targets, bias, weight, hyper, soft_cap, static=tuple(static.items()),
        config=config, mesh=mesh, batch_axis=batch_axis, vocab_axis=vocab_axis,
        return_stats=return_stats, implementation=implementation,
    )  # fmt: skip


@functools.partial(
    jax.jit,
    static_argnames=(
        "static", "config", "mesh", "batch_axis", "vocab_axis", "return_stats", "implementation"
    ),
)  # fmt: skip
def _linear_cross_entropy(
    hidden, kernel, targets, bias, weight, hyper, soft_cap, *, static, config, mesh, batch_axis,
    vocab_axis, return_stats, implementation,
):  # fmt: skip
    hidden, kernel, targets, bias = _check_arrays(hidden, kernel, targets, bias)
    v = kernel.shape[1]
    options = assembly.Options(num_classes=v, **dict(static))
    out_dtype = jnp.result_type(hidden.dtype, kernel.dtype, *([] if bias is None else [bias]))
    cdt = _dtypes.compute_dtype(out_dtype)
    class_weight = _validation.check_class_weight(_FN, weight, v)
    if class_weight is not None:
        class_weight = class_weight.astype(cdt)
    probabilities = jnp.issubdtype(targets.dtype, jnp.floating)
    if probabilities and options.ignore_index >= 0:
        raise ValueError(
            f"{_FN}: `ignore_index`={options.ignore_index} is not supported for probability "
            "targets, as in PyTorch: only index targets can be ignored"
        )
    batch_shape = hidden.shape[:-1]
    h, kernel = blocks.rows_with_a_feature(hidden, kernel)
    n = h.shape[0]
    labels = None if probabilities else _targets.widen(targets).reshape(-1)
    probs = jax.lax.stop_gradient(targets.reshape(n, v)) if probabilities else None
    hyper = tuple(jax.lax.stop_gradient(jnp.asarray(x, cdt)) for x in hyper)
    if soft_cap is not None:
        soft_cap = jax.lax.stop_gradient(jnp.asarray(soft_cap, cdt))
    problem = chunked.Problem(
        h, kernel, bias, labels, probs, class_weight, soft_cap, options.smoothing, return_stats
    )
    resolved_mesh = mesh_axes.check_mesh_axes(_FN, mesh, batch_axis, vocab_axis, n)
    if n == 0:
        # Nothing to loop over: the loss of an empty batch, as cross_entropy gives it.
        empty = jnp.zeros((0,), cdt)
        loss = assembly.reduce(empty, empty, options.reduction)
        stats = (empty, jnp.zeros((0,), jnp.int32), empty)
    elif resolved_mesh is None:
        mesh_axes.reject_explicit_sharding(
            _FN, hidden=h, kernel=kernel, targets=targets, bias=bias, weight=weight
        )
        chunks = {
            "cpu": config.clipped(n, v),
            "accelerator": config.clipped(n, v, accelerator=True),
        }
        if implementation == "pallas":
            pallas_tpu.check_takes(_FN, problem)
        loss, stats = _implementations.linear_head(
            _FN, implementation, _single_device, problem, options, hyper, chunks
        )
    else:
        loss, stats = sharded.sharded_loss(
            problem, options, hyper, config, mesh=resolved_mesh, batch_axis=batch_axis,
            vocab_axis=vocab_axis, implementation=implementation,
        )  # fmt: skip
    if options.reduction == "none":
        loss = loss.reshape(batch_shape)
    loss = loss.astype(out_dtype)
    if not return_stats:
        return loss
    return loss, _logit_stats(problem, options, stats, batch_shape)


def _single_device(p: chunked.Problem, options: assembly.Options, hyper, chunks):
    """The loss (reduced as asked) and ``(lse, argmax, entropy)`` on one device (or XLA's
    automatic partitioning of it)."""
    if options.reduction == "none":
        return _per_token(p, options, hyper, chunks)
    total, stats = _summed(p, options, hyper, chunks)
    if options.reduction == "sum":
        return total, stats
    n = p.hidden.shape[0]
    den = assembly.denominator(options, p.labels, p.class_weight, n, total.dtype)
    return _reductions.safe_divide(total, den), stats


def _pallas_tpu(p: chunked.Problem, options: assembly.Options, hyper, chunks):
    """:func:`_single_device` through the Pallas TPU kernels (four N·D·V matmuls, accumulators
    in VMEM), for the problems they take (``takes``: the dispatcher asks first). The kernels
    compute no argmax or entropy (``return_stats`` takes the XLA form): zeros stand in for
    them."""
    losses, weights = kernel_stats.losses(p, options, hyper)
    stats_shape = jax.eval_shape(functools.partial(_single_device, p, options, hyper, chunks))[1]
    stats = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), stats_shape)
    return assembly.reduce(losses, weights, options.reduction).astype(stats[0].dtype), stats


_pallas_tpu.takes = lambda p, *_: pallas_tpu.takes(p)  # pyright: ignore[reportFunctionMemberAccess]
_implementations.LINEAR_KERNELS["linear_cross_entropy"]["tpu"] = _pallas_tpu


def _per_token(p: chunked.Problem, options: assembly.Options, hyper, chunks):
    """Per-token losses and stats; ``chunks`` maps "cpu" and "accelerator" (GPUs and TPUs) to
    their block sizes (one pass where they agree)."""

    def on(blocks):
        def per_token():
            s = chunked.token_stats(p, blocks[:2])
            losses = assembly.RowLoss(options)(s, chunked.whole_block(p), p.class_weight, hyper)
            return losses, (s.lse, s.arg, s.entropy)

        return per_token

    return blocks.on_backend_blocks(on, chunks["cpu"], chunks["accelerator"])


def _summed(p: chunked.Problem, options: assembly.Options, hyper, chunks):
    """``(Σ_n ℓ_n, stats)``: on CPU the fused gradient pass, elsewhere the recomputing one.

    The fused pass (three matmuls; on a 2-core x86 CPU 0.76x the materialised path's time)
    keeps its gradients from the forward pass to the backward one: float32 accumulators of the
    kernel's gradient, 2.1 GiB of temporaries on an H100 at N=8192, D=4096, V=131072 in bf16
    and 1.7 GiB on a TPU v5p at D=2048 in float32, where XLA:CPU writes them in place. The
    recomputing pass (four or five matmuls) holds a few blocks (42 MiB on that H100).
    """

    def fused():
        return chunked.fused_total(p, hyper, assembly.RowLoss(options), chunks["cpu"])

    def recomputed():
        losses, stats = _per_token(p, options, hyper, chunks)
        return jnp.sum(losses), stats

    return jax.lax.platform_dependent(**dict.fromkeys(FUSED_PLATFORMS, fused), default=recomputed)


def _logit_stats(p: chunked.Problem, options: assembly.Options, stats, batch_shape) -> LogitStats:
    lse, arg, entropy = (jax.lax.stop_gradient(a) for a in stats)
    if p.labels is None:
        correct = arg == jnp.argmax(p.probs, axis=-1)
    else:
        valid = ~_targets.ignored(p.labels, options.ignore_index)
        correct = valid & (arg == p.labels)
    return LogitStats(*(a.reshape(batch_shape) for a in (lse, correct, entropy, arg)))
