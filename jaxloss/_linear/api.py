"""The public ``linear_cross_entropy``: argument checks, then one of three forms.

The forms: the blocked kernel (:mod:`jaxloss._linear.chunked`, the default), its ``shard_map``
form when mesh axes are named (:mod:`jaxloss._linear.sharded`), and nothing for an empty batch.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Array, ArrayLike, Float, Int

from jaxloss import _common
from jaxloss._linear import assembly, chunked, sharded

_FN = "linear_cross_entropy"


def _check_arrays(hidden, kernel, targets, bias):
    """Validated ``(hidden, kernel, targets, bias)`` arrays of consistent shapes."""
    fn = _FN
    hidden = _common.check_floating("hidden", fn, hidden)
    kernel = _common.check_floating("kernel", fn, kernel)
    targets = _common.check_integer("targets", fn, targets)
    if hidden.ndim < 1:
        raise ValueError(f"{fn}: `hidden` must have a feature axis (..., D), got a scalar")
    if kernel.ndim != 2 or kernel.shape[0] != hidden.shape[-1] or kernel.shape[1] == 0:
        raise ValueError(
            f"{fn}: `kernel` must have shape (D, V) = ({hidden.shape[-1]}, V) with V >= 1 for "
            f"`hidden` with shape {tuple(hidden.shape)}; got `kernel` with shape "
            f"{tuple(kernel.shape)} and dtype {kernel.dtype}"
        )
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"{fn}: `targets` must have the shape of `hidden` without its feature axis, i.e. "
            f"{tuple(hidden.shape[:-1])}; got `targets` with shape {tuple(targets.shape)} (dtype "
            f"{targets.dtype}) for `hidden` with shape {tuple(hidden.shape)}"
        )
    if bias is not None:
        v = kernel.shape[1]
        bias = _common.check_floating("bias", fn, bias)
        if bias.shape != (v,):
            raise ValueError(
                f"{fn}: `bias` must have shape ({v},), one entry per class (column of `kernel`), "
                f"got shape {tuple(bias.shape)} and dtype {bias.dtype}"
            )
    return hidden, kernel, targets, bias


def _check_options(ignore_index, reduction, label_smoothing, z_loss) -> dict[str, Any]:
    fn = _FN
    _common.check_reduction(fn, reduction)
    if not isinstance(ignore_index, (int, np.integer)) or isinstance(ignore_index, bool):
        raise TypeError(f"{fn}: `ignore_index` must be an int, got {ignore_index!r}")
    return dict(
        ignore_index=int(ignore_index),
        reduction=reduction,
        smoothing=_common.check_unit_interval("label_smoothing", fn, label_smoothing),
        z_loss=_common.check_nonnegative("z_loss", fn, z_loss),
    )


def _reject_explicit_sharding(**arrays) -> None:
    """Explicitly sharded inputs need named axes: the blocked loops cannot slice them."""
    for name, x in arrays.items():
        sharding = getattr(jax.typeof(x), "sharding", None) if x is not None else None
        spec = tuple(getattr(sharding, "spec", None) or ())
        if any(axis is not None for axis in spec):
            raise ValueError(
                f"{_FN}: `{name}` is sharded with explicit axis types (spec {spec}); pass "
                "`batch_axis` (the axes of the tokens) and/or `vocab_axis` (the axes of the "
                "classes) for the shard_map form, or reshard the inputs to replicated"
            )


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
    token_chunk: int = chunked.DEFAULT_TOKEN_CHUNK,
    vocab_chunk: int = chunked.DEFAULT_VOCAB_CHUNK,
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
    vocabulary-parallel cross-entropy); neither logits nor kernel are ever gathered. Nothing
    switches to that form by itself. Without axes, under automatic sharding, XLA partitions the
    computation: correct for any ``NamedSharding``, but a vocabulary-sharded kernel gets
    all-gathered (the logits never are). Inputs sharded with explicit axis types
    (``jax.make_mesh``'s default) need the axes named: without them a ``ValueError`` says so.

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
    hidden, kernel, targets, bias = _check_arrays(hidden, kernel, targets, bias)
    options = _check_options(ignore_index, reduction, label_smoothing, z_loss)
    config = chunked.ChunkConfig(token_chunk, vocab_chunk)
    d, v = kernel.shape
    out_dtype = jnp.result_type(hidden.dtype, kernel.dtype, *([] if bias is None else [bias]))
    cdt = _common.compute_dtype(out_dtype)
    class_weight = _common.check_class_weight(_FN, weight, v)
    if class_weight is not None:
        class_weight = class_weight.astype(cdt)
    batch_shape = hidden.shape[:-1]
    h, y = hidden.reshape(-1, d), targets.reshape(-1)
    n = h.shape[0]
    resolved_mesh = sharded.check_mesh_axes(mesh, batch_axis, vocab_axis, n, v)
    if n == 0:
        # Nothing to loop over: the loss of an empty batch, as cross_entropy gives it.
        empty = jnp.zeros((0,), cdt)
        loss = assembly.reduce(empty, empty, reduction)
    elif resolved_mesh is None:
        _reject_explicit_sharding(hidden=h, kernel=kernel, targets=y, bias=bias, weight=weight)
        loss = _blocked(h, kernel, bias, y, class_weight, options, config.clipped(n, v))
    else:
        n_local = n // (1 if batch_axis is None else sharded.axis_size(resolved_mesh, batch_axis))
        v_local = v // (1 if vocab_axis is None else sharded.axis_size(resolved_mesh, vocab_axis))
        loss = sharded.sharded_loss(
            h, kernel, bias, y, class_weight, options=options,
            chunks=config.clipped(n_local, v_local), mesh=resolved_mesh,
            batch_axis=batch_axis, vocab_axis=vocab_axis,
        )  # fmt: skip
    if reduction == "none":
        loss = loss.reshape(batch_shape)
    return loss.astype(out_dtype)


def _blocked(h, kernel, bias, y, class_weight, options, chunks):
    """The single-device (or automatically partitioned) path."""
    v = kernel.shape[1]
    smoothing = options["smoothing"]
    lse, tgt, wsum = chunked.linear_stats(h, kernel, bias, y, class_weight, chunks, smoothing)
    valid, bad, pos_weight = assembly.index_setup(
        y, class_weight, v, options["ignore_index"], lse.dtype
    )
    sum_weight = v if class_weight is None else jnp.sum(class_weight)
    loss = assembly.row_losses(
        lse, tgt, wsum, valid, bad, pos_weight, sum_weight, v, smoothing, options["z_loss"]
    )
    return assembly.reduce(loss, pos_weight, options["reduction"])
