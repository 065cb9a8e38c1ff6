"""The ``shard_map`` glue of the blockwise ops: mesh-axis checks and the call itself.

Every device runs an op's blocked passes on its own token rows and kernel columns; only
per-token statistics cross devices (the ops combine them with
:func:`jaxloss._blockwise.online.combine_shards`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh


def names(axes) -> tuple[str, ...]:
    return axes if isinstance(axes, tuple) else (axes,)


def axis_size(mesh, axes) -> int:
    """Devices along ``axes`` (``None``: 1)."""
    if axes is None:
        return 1
    return int(np.prod([mesh.shape[a] for a in names(axes)]))


def reject_explicit_sharding(fn: str, **arrays) -> None:
    """Explicitly sharded inputs need named axes: the blocked loops cannot slice them.

    No silent switch to the ``shard_map`` form from the inputs' types: the error names the fix.
    """
    for name, x in arrays.items():
        sharding = getattr(jax.typeof(x), "sharding", None) if x is not None else None
        spec = tuple(getattr(sharding, "spec", None) or ())
        if any(axis is not None for axis in spec):
            raise ValueError(
                f"{fn}: `{name}` is sharded with explicit axis types (spec {spec}); pass "
                "`batch_axis` (the axes of the tokens) and/or `vocab_axis` (the axes of the "
                "classes) for the shard_map form, or reshard the inputs to replicated"
            )


def platform_of(mesh) -> str | None:
    """The backend of a concrete mesh's devices (compile-only TPUs included); None for an
    abstract mesh."""
    if isinstance(mesh, jax.sharding.AbstractMesh):  # (its ``devices`` raises)
        return None
    return mesh.devices.flat[0].platform


def _resolve_mesh(fn: str, mesh):
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            raise ValueError(
                f"{fn}: `batch_axis`/`vocab_axis` need a `mesh` (or a context mesh set with "
                "jax.set_mesh)"
            )
    elif not isinstance(mesh, (Mesh, jax.sharding.AbstractMesh)):
        raise TypeError(f"{fn}: `mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    return mesh


def check_mesh_axes(fn: str, mesh, batch_axis, vocab_axis, n: int):
    """The mesh to run on (``None``: no axes named), after checking the axes against it.

    Tokens must split evenly over ``batch_axis``; classes need not over ``vocab_axis`` (see
    :class:`VocabularySplit`).
    """
    if batch_axis is None and vocab_axis is None:
        return None
    mesh = _resolve_mesh(fn, mesh)
    for name, axes in (("batch_axis", batch_axis), ("vocab_axis", vocab_axis)):
        if axes is None:
            continue
        missing = [a for a in names(axes) if a not in mesh.shape]
        if missing:
            raise ValueError(
                f"{fn}: `{name}`={axes!r} names axes {missing} that are not in the mesh's axes "
                f"{tuple(mesh.shape)}"
            )
    parts = axis_size(mesh, batch_axis)
    if n % parts:
        raise ValueError(
            f"{fn}: the {n} tokens do not split evenly over `batch_axis`={batch_axis!r} of size "
            f"{parts}"
        )
    both = batch_axis is not None and vocab_axis is not None
    if both and set(names(batch_axis)) & set(names(vocab_axis)):
        raise ValueError(f"{fn}: `batch_axis` and `vocab_axis` must name different mesh axes")
    return mesh


class VocabularySplit(NamedTuple):
    """How ``V`` classes split over a vocabulary axis of ``parts`` devices: ``width`` columns
    each (``ceil(V / parts)``).

    ``uneven`` (``V`` not divisible): JAX cannot place such shards, so the vocabulary arrays
    (kernel, biases, class weights, probabilities) travel replicated over the axis (or as
    sharded over other axes) and each device reads its own column range of them in place —
    no copy, no padding: ``[start, start + width)`` with ``start = min(i · width, V - width)``,
    the last range slid back and its columns before ``i · width`` (the previous device's)
    masked out (:func:`device_columns`). Their gradients come back replicated, as they came:
    each device writes its own columns, a ``psum`` over the axis adds them up.
    """

    width: int
    uneven: bool

    @classmethod
    def of(cls, mesh, vocab_axis, v: int) -> VocabularySplit:
        parts = axis_size(mesh, vocab_axis)
        return cls(-(-v // parts), v % parts != 0)

    def axis(self, vocab_axis):
        """The mesh axes the vocabulary arrays are split over (``None``: replicated)."""
        return None if self.uneven else vocab_axis


def device_columns(vocab_axis, v: int, width: int) -> tuple[jax.Array, jax.Array]:
    """Inside ``shard_map``: ``(start, owned_from)`` of this device's column range (see
    :class:`VocabularySplit`)."""
    nominal = jax.lax.axis_index(vocab_axis) * width
    return jnp.minimum(nominal, v - width), nominal


def run(local: Callable, mesh, arguments: dict[str, tuple[Any, Any]], out_specs):
    """``local(**arrays)`` under ``jax.shard_map`` on ``mesh``.

    ``arguments`` maps each name to ``(array, PartitionSpec)``; a ``None`` array does not travel
    (``shard_map`` takes arrays only) and reaches ``local`` as ``None``.
    """
    present = [k for k, (value, _) in arguments.items() if value is not None]
    args = tuple(arguments[k][0] for k in present)
    in_specs = tuple(arguments[k][1] for k in present)
    if any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
        # With explicit sharding (jax.make_mesh's default) shard_map takes inputs only in the
        # layout of its in_specs; with automatic sharding XLA reshards them itself.
        target: Any = in_specs
        if isinstance(mesh, Mesh):
            target = tuple(jax.sharding.NamedSharding(mesh, spec) for spec in in_specs)
        args = jax.reshard(args, target)

    def body(*arrays):
        given = dict(zip(present, arrays, strict=True))
        return local(**{k: given.get(k) for k in arguments})

    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs)(*args)
