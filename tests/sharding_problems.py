"""The problems the sharding tests solve on a mesh and on one device, and how they compare.

``sharding_checks.py`` and ``distillation_sharding_checks.py`` run them on the eight CPU devices
of this process (a 2 × 4 mesh), ``multiprocess_worker.py`` on a 2 × 2 mesh spanning two
processes. The mesh axes are ``data`` and ``model``; a layout splits the rows over both
(``batch``), the classes over both (``classes``), or the rows over ``data`` and the classes over
``model`` (``both``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxloss

# Sizes chosen so that N, D, V and all their shard sizes are distinct numbers: a dimension in an
# HLO shape then says which axis it is.
N, D, V = 16, 12, 40
AXES = ("data", "model")
LAYOUTS = ("batch", "classes", "both")
RTOL = 2e-5


def layout_specs(layout: str) -> dict[str, P]:
    """Specs by kind: matrix (N, V), rows (N,), cols (V,), hidden (N, D), kernel (D, V)."""
    rows = {"batch": AXES, "classes": None, "both": "data"}[layout]
    cols = {"batch": None, "classes": AXES, "both": "model"}[layout]
    return {
        "matrix": P(rows, cols),
        "rows": P(rows),
        "cols": P(cols),
        "hidden": P(rows, None),
        "kernel": P(None, cols),
        "replicated": P(),
    }


def linear_axes(layout: str) -> dict[str, str | tuple[str, ...] | None]:
    """The heads' ``batch_axis``/``vocab_axis`` (their shard_map form) for a layout."""
    return {
        "batch": {"batch_axis": AXES, "vocab_axis": None},
        "classes": {"batch_axis": None, "vocab_axis": AXES},
        "both": {"batch_axis": "data", "vocab_axis": "model"},
    }[layout]


def explicit(mesh: Mesh) -> Mesh:
    """The same devices and axis names with explicit sharding (``jax.make_mesh``'s default)."""
    return Mesh(
        mesh.devices, mesh.axis_names, axis_types=(AxisType.Explicit,) * len(mesh.axis_names)
    )


def problem_data(seed: int) -> dict[str, np.ndarray]:
    """Every array a problem may read, the same in every process for a seed."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, V, N).astype(np.int32)
    targets[[1, 6, 11]] = -100
    return {
        "logits": 2 * rng.standard_normal((N, V)).astype(np.float32),
        "log_probs": np.log(rng.dirichlet(np.ones(V), N)).astype(np.float32),
        "probs": rng.dirichlet(np.ones(V), N).astype(np.float32),
        "binary": rng.integers(0, 2, (N, V)).astype(np.float32),
        "targets": targets,
        "weight": rng.uniform(0.2, 2.0, V).astype(np.float32),
        "pos_weight": rng.uniform(0.5, 3.0, V).astype(np.float32),
        "hidden": rng.standard_normal((N, D)).astype(np.float32),
        "kernel": (rng.standard_normal((D, V)) / np.sqrt(D)).astype(np.float32),
        "bias": rng.standard_normal(V).astype(np.float32),
        "cotangent": rng.standard_normal(N).astype(np.float32),
    }


def compare(got, want, what: str) -> list[str]:
    """What differs between two output trees (nothing: they agree within ``RTOL`` of each
    entry and of the largest finite magnitude, NaN at the same places)."""
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    if len(got_leaves) != len(want_leaves):
        return [f"{what}: {len(got_leaves)} outputs, the unsharded run has {len(want_leaves)}"]
    problems = []
    for i, (g, w) in enumerate(zip(got_leaves, want_leaves, strict=True)):
        g, w = np.asarray(g), np.asarray(w)
        scale = float(np.max(np.abs(w[np.isfinite(w)]), initial=0.0))
        if g.shape != w.shape or not np.allclose(g, w, RTOL, RTOL * scale, equal_nan=True):
            err = np.max(np.abs(g - w)) if g.shape == w.shape else f"shape {g.shape} vs {w.shape}"
            problems.append(f"{what}: output {i} differs from unsharded (max abs diff {err})")
    return problems


def unsharded(fn: Callable, args: dict[str, np.ndarray]):
    """``jit(fn)`` on the default device: the oracle of the sharded runs."""
    return jax.jit(fn)(**{k: jnp.asarray(v) for k, v in args.items()})


def global_array(mesh: Mesh, spec: P, value: np.ndarray) -> jax.Array:
    """A global array whose shards this process fills only for its own devices."""
    return jax.make_array_from_callback(
        value.shape, NamedSharding(mesh, spec), lambda index: value[index]
    )


def sharded(mesh: Mesh, layout: str, fn: Callable, args: dict[str, np.ndarray],
            kinds: dict[str, str]) -> tuple[object, str]:  # fmt: skip
    """``jit(fn)`` on global arrays placed per ``kinds`` (argument -> spec kind; replicated
    when absent), each process filling only its own shards; its outputs and its HLO text. An
    explicit-sharding mesh is also made the context mesh, as ``jax.set_mesh`` users do."""
    specs = layout_specs(layout)
    placed = {k: global_array(mesh, specs[kinds.get(k, "replicated")], v) for k, v in args.items()}
    context = jax.set_mesh(mesh) if AxisType.Explicit in mesh.axis_types else nullcontext()
    with context:
        compiled = jax.jit(fn).lower(**placed).compile()
        return compiled(**placed), compiled.as_text()


# Problems: ``() -> (fn, args, kinds)``, ``fn`` returning values and gradients.


def cross_entropy_index():
    data = problem_data(0)
    options = dict(label_smoothing=0.1, z_loss=1e-3)

    def fn(logits, targets, weight, cotangent):
        def f(logits, weight):
            loss = jaxloss.cross_entropy(
                logits, targets, weight=weight, reduction="none", **options
            )
            return jnp.sum(loss * cotangent), loss

        (_, loss), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(logits, weight)
        mean = jaxloss.cross_entropy(logits, targets, weight=weight, **options)
        return loss, mean, grads

    kinds = {"logits": "matrix", "targets": "rows", "weight": "cols", "cotangent": "rows"}
    return fn, {k: data[k] for k in kinds}, kinds


def cross_entropy_probs():
    data = problem_data(1)

    def fn(logits, probs, weight):
        def f(logits, weight):
            return jaxloss.cross_entropy(logits, probs, weight=weight, label_smoothing=0.05)

        return jax.value_and_grad(f, argnums=(0, 1))(logits, weight)

    kinds = {"logits": "matrix", "probs": "matrix", "weight": "cols"}
    return fn, {k: data[k] for k in kinds}, kinds


def nll():
    data = problem_data(2)

    def fn(log_probs, targets, weight):
        def f(log_probs, weight):
            return jaxloss.nll(log_probs, targets, weight=weight)

        return jax.value_and_grad(f, argnums=(0, 1))(log_probs, weight)

    kinds = {"log_probs": "matrix", "targets": "rows", "weight": "cols"}
    return fn, {k: data[k] for k in kinds}, kinds


def bce_with_logits():
    data = problem_data(4)

    def fn(logits, binary, weight, pos_weight):
        def f(logits, weight, pos_weight):
            return jaxloss.bce_with_logits(logits, binary, weight=weight, pos_weight=pos_weight)

        return jax.value_and_grad(f, argnums=(0, 1, 2))(logits, weight, pos_weight)

    kinds = {"logits": "matrix", "binary": "matrix", "weight": "cols", "pos_weight": "cols"}
    return fn, {k: data[k] for k in kinds}, kinds


LINEAR_OPTIONS = dict(label_smoothing=0.1, z_loss=1e-3, token_chunk=3, vocab_chunk=3)
LINEAR_KINDS = {
    "hidden": "hidden", "kernel": "kernel", "bias": "cols", "targets": "rows", "weight": "cols",
    "cotangent": "rows",
}  # fmt: skip


def linear_fn(**axes) -> Callable:
    """Per-token losses, the mean and the sum, the gradients of the cotangent-weighted sum in
    hidden, kernel, bias and class weight."""

    def fn(hidden, kernel, bias, targets, weight, cotangent):
        def loss(reduction, hidden, kernel, bias, weight):
            return jaxloss.linear_cross_entropy(
                hidden, kernel, targets, bias=bias, weight=weight, reduction=reduction,
                **LINEAR_OPTIONS, **axes,
            )  # fmt: skip

        def f(*params):
            per_token = loss("none", *params)
            return jnp.sum(per_token * cotangent), per_token

        params = (hidden, kernel, bias, weight)
        (_, per_token), grads = jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True)(*params)
        return per_token, loss("mean", *params), loss("sum", *params), grads

    return fn


def linear_args() -> dict[str, np.ndarray]:
    data = problem_data(3)
    return {k: data[k] for k in LINEAR_KINDS}
