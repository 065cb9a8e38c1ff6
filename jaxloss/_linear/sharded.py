"""The vocabulary- and token-parallel form of ``linear_cross_entropy`` (``jax.shard_map``).

Taken when the caller names ``batch_axis`` and/or ``vocab_axis``: every device runs the blocked
kernel on its own token rows and kernel columns; the global logsumexp is the logsumexp of the
per-shard ones, and the target logit, ``Σ_c w_c z_c`` and the target's class weight are sums
over the vocabulary shards (a target is owned by exactly one shard). The collectives move
``O(N)`` numbers; neither the logits nor the kernel are ever gathered (Megatron-style
vocabulary-parallel cross-entropy). Nothing switches to this form by itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from jaxloss import _common
from jaxloss._linear import assembly, chunked

_FN = "linear_cross_entropy"


def axis_size(mesh, axes) -> int:
    names = axes if isinstance(axes, tuple) else (axes,)
    return int(np.prod([mesh.shape[a] for a in names]))


def _names(axes) -> tuple[str, ...]:
    return axes if isinstance(axes, tuple) else (axes,)


def check_mesh_axes(mesh, batch_axis, vocab_axis, n: int, v: int):
    """The mesh to run on (``None``: no axes named), after checking the axes against it."""
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
        missing = [a for a in _names(axes) if a not in mesh.shape]
        if missing:
            raise ValueError(
                f"{_FN}: `{name}`={axes!r} names axes {missing} that are not in the mesh's axes "
                f"{tuple(mesh.shape)}"
            )
        parts = axis_size(mesh, axes)
        if size % parts:
            raise ValueError(
                f"{_FN}: the {size} {what} do not split evenly over `{name}`={axes!r} of size "
                f"{parts}"
            )
    both = batch_axis is not None and vocab_axis is not None
    if both and set(_names(batch_axis)) & set(_names(vocab_axis)):
        raise ValueError(f"{_FN}: `batch_axis` and `vocab_axis` must name different mesh axes")
    return mesh


def _local_loss(h, kernel, bias, y, class_weight, *, options, chunks, axes, v):
    """One device's share: blocked statistics, combined over the vocabulary shards."""
    batch_axis, vocab_axis = axes
    v_local = kernel.shape[1]
    cdt = _common.compute_dtype(jnp.result_type(h.dtype, kernel.dtype))
    offset = 0 if vocab_axis is None else jax.lax.axis_index(vocab_axis) * v_local
    y_local = (y - offset).astype(jnp.int32)
    everywhere = [a for a in (h, kernel, bias, y_local, class_weight) if a is not None]
    h, kernel, y_local = (chunked.vary(a, *everywhere) for a in (h, kernel, y_local))
    bias, class_weight = (
        None if a is None else chunked.vary(a, *everywhere) for a in (bias, class_weight)
    )
    smoothing = options["smoothing"]
    lse, tgt, wsum = chunked.linear_stats(h, kernel, bias, y_local, class_weight, chunks, smoothing)
    valid = ~assembly.ignored(y, options["ignore_index"])
    bad = valid & ((y < 0) | (y >= v))
    owned = (y_local >= 0) & (y_local < v_local)
    if class_weight is not None:
        picked = class_weight[jnp.clip(y_local, 0, v_local - 1)]
        pos_weight, sum_weight = jnp.where(valid & owned, picked, 0), jnp.sum(class_weight)
    else:
        pos_weight, sum_weight = valid.astype(cdt), v
    if vocab_axis is not None:
        shift = chunked.finite_or_zero(jax.lax.pmax(jax.lax.stop_gradient(lse), vocab_axis))
        lse = shift + jnp.log(jax.lax.psum(jnp.exp(lse - shift), vocab_axis))
        tgt = jax.lax.psum(tgt, vocab_axis)
        wsum = None if wsum is None else jax.lax.psum(wsum, vocab_axis)
        if class_weight is not None:
            pos_weight = jax.lax.psum(pos_weight, vocab_axis)
            sum_weight = jax.lax.psum(sum_weight, vocab_axis)
    loss = assembly.row_losses(
        lse, tgt, wsum, valid, bad, pos_weight, sum_weight, v, smoothing, options["z_loss"]
    )
    return assembly.reduce(loss, pos_weight, options["reduction"], batch_axis)


def sharded_loss(
    h, kernel, bias, y, class_weight, *, options, chunks, mesh, batch_axis, vocab_axis
):
    """``linear_cross_entropy`` of 2-D ``h`` and 1-D ``y`` under ``jax.shard_map`` on ``mesh``.

    The differentiable inputs are marked as varying over every mesh axis in use, so that
    autodiff sums their per-device gradients over the axes they are replicated on (``hidden``
    over the vocabulary axis, ``kernel``, ``bias`` and ``weight`` over the batch axis).
    """
    v = kernel.shape[1]
    rows, cols = PartitionSpec(batch_axis), PartitionSpec(vocab_axis)
    specs = {"h": PartitionSpec(batch_axis, None), "kernel": PartitionSpec(None, vocab_axis)}
    args, in_specs = [h, kernel, y], [specs["h"], specs["kernel"], rows]
    extras = [a is not None for a in (bias, class_weight)]
    for present, arg in zip(extras, (bias, class_weight), strict=True):
        if present:
            args.append(arg)
            in_specs.append(cols)

    def local(h, kernel, y, *rest):
        rest_iter = iter(rest)
        bias_l, weight_l = (next(rest_iter) if present else None for present in extras)
        return _local_loss(
            h, kernel, bias_l, y, weight_l, options=options, chunks=chunks,
            axes=(batch_axis, vocab_axis), v=v,
        )  # fmt: skip

    out_specs = rows if options["reduction"] == "none" else PartitionSpec()
    if any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
        # With explicit sharding (jax.make_mesh's default) shard_map takes inputs only in the
        # layout of its in_specs; with automatic sharding XLA reshards them itself.
        target = tuple(in_specs)
        if isinstance(mesh, Mesh):
            target = tuple(jax.sharding.NamedSharding(mesh, spec) for spec in in_specs)
        args = jax.reshard(tuple(args), target)
    shard_fn = jax.shard_map(local, mesh=mesh, in_specs=tuple(in_specs), out_specs=out_specs)
    return shard_fn(*args)
