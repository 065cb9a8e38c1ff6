"""Sharding checks for ``nll``, ``cross_entropy`` and ``linear_cross_entropy`` on 8 CPU devices.

Each check is one test of ``tests/test_sharding.py``, run in the pytest process on the 2 × 4
mesh (axes ``data`` and ``model``) of the eight CPU devices that ``conftest.py`` sets up.

Every check compiles a jitted ``value_and_grad`` (or VJP) with inputs placed by ``NamedSharding``
— split over the batch (all 8 devices), over the classes (all 8 devices), or both (batch over
``data``, classes over ``model``) — and compares values and gradients with the same function run
unsharded. Under class sharding it also parses the compiled HLO: no ``all-gather`` may produce
logits with the full vocabulary (or, for the ``shard_map`` form of ``linear_cross_entropy``, the
kernel with the full vocabulary).

A check takes the mesh and returns ``(problems, all_gathers)``: what it found wrong (nothing when
it passes) and the result shapes of the compiled program's all-gathers.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from contextlib import nullcontext

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxloss
from benchmarks.hlo import all_gather_shapes

# Sizes chosen so that N, D, V and all their shard sizes are distinct numbers: a dimension in an
# HLO shape then says which axis it is.
N, D, V = 16, 12, 40
BATCH = ("data", "model")  # all 8 devices
NUM_DEVICES = 8  # tests/conftest.py's CPU devices, the 2 x 4 mesh
LAYOUTS = ("batch", "classes", "both")
RTOL = 2e-5


def _layout_specs(layout: str) -> dict[str, P]:
    """PartitionSpecs of a layout: rows (N, ...), classes (..., V), vectors over rows / classes."""
    rows = {"batch": BATCH, "classes": None, "both": "data"}[layout]
    cols = {"batch": None, "classes": BATCH, "both": "model"}[layout]
    return {
        "matrix": P(rows, cols),  # logits (N, V)
        "rows": P(rows),  # targets (N,)
        "cols": P(cols),  # weight, bias (V,)
        "hidden": P(rows, None),  # (N, D)
        "kernel": P(None, cols),  # (D, V)
    }


def _axes(layout: str) -> dict[str, str | tuple[str, ...] | None]:
    """``linear_cross_entropy``'s ``batch_axis`` / ``vocab_axis`` for a layout."""
    return {
        "batch": {"batch_axis": BATCH, "vocab_axis": None},
        "classes": {"batch_axis": None, "vocab_axis": BATCH},
        "both": {"batch_axis": "data", "vocab_axis": "model"},
    }[layout]


# ----------------------------------------------------------------------------------------------
# HLO inspection (benchmarks.hlo.all_gather_shapes: the one reader of optimised HLO)
# ----------------------------------------------------------------------------------------------


def gathers_vocabulary_matrix(shape: tuple[int, ...]) -> bool:
    """A gathered array of rank >= 2 with the full vocabulary in it: logits or the kernel."""
    return len(shape) >= 2 and V in shape


# ----------------------------------------------------------------------------------------------
# Problem data and comparison
# ----------------------------------------------------------------------------------------------


def _data(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, V, N)
    targets[[1, 6, 11]] = -100
    return {
        "logits": 2 * rng.standard_normal((N, V)).astype(np.float32),
        "log_probs": np.log(rng.dirichlet(np.ones(V), N)).astype(np.float32),
        "probs": rng.dirichlet(np.ones(V), N).astype(np.float32),
        "targets": targets.astype(np.int32),
        "weight": rng.uniform(0.2, 2.0, V).astype(np.float32),
        "hidden": rng.standard_normal((N, D)).astype(np.float32),
        "kernel": (rng.standard_normal((D, V)) / np.sqrt(D)).astype(np.float32),
        "bias": rng.standard_normal(V).astype(np.float32),
        "cotangent": rng.standard_normal(N).astype(np.float32),
    }


def _compare(got, want, what: str) -> list[str]:
    problems = []
    for i, (g, w) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)):
        g, w = np.asarray(g), np.asarray(w)
        scale = float(np.max(np.abs(w))) if w.size else 0.0
        if g.shape != w.shape or not np.allclose(g, w, rtol=RTOL, atol=RTOL * scale):
            err = np.max(np.abs(g - w)) if g.shape == w.shape else "shape"
            problems.append(f"{what}: output {i} differs from unsharded (max abs diff {err})")
    return problems


def _unsharded(fn: Callable, args: dict[str, np.ndarray]):
    """``fn(**args)`` on the default device, the oracle for the sharded runs."""
    return jax.jit(fn)(**{k: jnp.asarray(v) for k, v in args.items()})


def explicit(mesh: Mesh) -> Mesh:
    """The same devices and axis names with explicit sharding (``jax.make_mesh``'s default)."""
    explicit_axes = (AxisType.Explicit,) * len(mesh.axis_names)
    return Mesh(mesh.devices, mesh.axis_names, axis_types=explicit_axes)


def _sharded(
    mesh: Mesh, layout: str, fn: Callable, args: dict[str, np.ndarray], kinds: dict[str, str]
) -> tuple[object, str]:
    """``fn(**args)`` with ``args`` placed per ``kinds`` (arg -> spec kind), and its HLO.

    An explicit-sharding mesh is also made the context mesh, as ``jax.set_mesh`` users do.
    """
    specs = _layout_specs(layout)
    placed = {
        k: jax.device_put(v, NamedSharding(mesh, specs[kinds[k]] if k in kinds else P()))
        for k, v in args.items()
    }
    context = jax.set_mesh(mesh) if AxisType.Explicit in mesh.axis_types else nullcontext()
    with context:
        compiled = jax.jit(fn).lower(**placed).compile()
        return compiled(**placed), compiled.as_text()


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------

CHECKS: dict[str, Callable[[Mesh], tuple[list[str], list[tuple[int, ...]]]]] = {}


def check(name: str):
    def register(fn):
        CHECKS[name] = fn
        return fn

    return register


def _loss_checks(name: str, make_fn: Callable[[], tuple[Callable, dict, dict]]) -> None:
    """Registers ``[explicit/]name/layout`` for every layout: values, gradients, HLO gathers."""
    for layout, mode in itertools.product(LAYOUTS, ("auto", "explicit")):

        def run(mesh: Mesh, layout=layout, mode=mode):
            fn, args, kinds = make_fn()
            mesh = explicit(mesh) if mode == "explicit" else mesh
            got, hlo = _sharded(mesh, layout, fn, args, kinds)
            problems = _compare(got, _unsharded(fn, args), f"{name} sharded over {layout}")
            gathers = all_gather_shapes(hlo)
            if layout != "batch":
                bad = [s for s in gathers if gathers_vocabulary_matrix(s) and N_ROWS & set(s)]
                if bad:
                    problems.append(f"{name}: all-gather of [N, V] logits {bad}; all: {gathers}")
            return problems, gathers

        check(f"{'explicit/' if mode == 'explicit' else ''}{name}/{layout}")(run)


# Row counts an [N, V]-shaped array can have on some device (whole, or split over data/model).
N_ROWS = {N, N // 2, N // 4, N // 8}


def _cross_entropy_index():
    data = _data()
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

    args = {k: data[k] for k in ("logits", "targets", "weight", "cotangent")}
    return fn, args, {"logits": "matrix", "targets": "rows", "weight": "cols", "cotangent": "rows"}


def _cross_entropy_probs():
    data = _data(1)

    def fn(logits, probs, weight):
        def f(logits, weight):
            return jaxloss.cross_entropy(logits, probs, weight=weight, label_smoothing=0.05)

        return jax.value_and_grad(f, argnums=(0, 1))(logits, weight)

    args = {k: data[k] for k in ("logits", "probs", "weight")}
    return fn, args, {"logits": "matrix", "probs": "matrix", "weight": "cols"}


def _nll():
    data = _data(2)

    def fn(log_probs, targets, weight):
        def f(log_probs, weight):
            return jaxloss.nll(log_probs, targets, weight=weight)

        return jax.value_and_grad(f, argnums=(0, 1))(log_probs, weight)

    args = {k: data[k] for k in ("log_probs", "targets", "weight")}
    return fn, args, {"log_probs": "matrix", "targets": "rows", "weight": "cols"}


_loss_checks("cross_entropy/index", _cross_entropy_index)
_loss_checks("cross_entropy/probs", _cross_entropy_probs)
_loss_checks("nll", _nll)

LINEAR_OPTIONS = dict(label_smoothing=0.1, z_loss=1e-3, token_chunk=3, vocab_chunk=3)
LINEAR_KINDS = {
    "hidden": "hidden", "kernel": "kernel", "bias": "cols", "targets": "rows", "weight": "cols",
    "cotangent": "rows",
}  # fmt: skip


def _linear_fn(**axes):
    def fn(hidden, kernel, bias, targets, weight, cotangent):
        def f(hidden, kernel, bias, weight):
            loss = jaxloss.linear_cross_entropy(
                hidden, kernel, targets, bias=bias, weight=weight, reduction="none",
                **LINEAR_OPTIONS, **axes,
            )  # fmt: skip
            return jnp.sum(loss * cotangent), loss

        (_, loss), grads = jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True)(
            hidden, kernel, bias, weight
        )
        mean, total = (
            jaxloss.linear_cross_entropy(
                hidden, kernel, targets, bias=bias, weight=weight, reduction=reduction,
                **LINEAR_OPTIONS, **axes,
            )
            for reduction in ("mean", "sum")
        )  # fmt: skip
        return loss, mean, total, grads

    return fn


def _linear_args():
    data = _data(3)
    return {k: data[k] for k in LINEAR_KINDS}


def _linear_reference():
    """The plain call on one device (itself checked against cross_entropy in test_linear.py)."""
    return _unsharded(_linear_fn(), _linear_args())


for _layout in LAYOUTS:

    @check(f"linear_cross_entropy/auto/{_layout}")
    def _linear_auto(mesh: Mesh, layout=_layout):
        """Plain call under jit: XLA partitions the blockwise loops itself."""
        got, hlo = _sharded(mesh, layout, _linear_fn(), _linear_args(), LINEAR_KINDS)
        problems = _compare(got, _linear_reference(), f"linear_cross_entropy (auto) {layout}")
        gathers = all_gather_shapes(hlo)
        logits = [s for s in gathers if V in s and N_ROWS & set(s)]
        if logits:
            problems.append(f"all-gather of [N, V] logits {logits}; all: {gathers}")
        return problems, gathers

    @check(f"linear_cross_entropy/shard_map/{_layout}")
    def _linear_shard_map(mesh: Mesh, layout=_layout):
        """batch_axis / vocab_axis: shard_map, no logits and no kernel ever gathered."""
        fn = _linear_fn(mesh=mesh, **_axes(layout))
        got, hlo = _sharded(mesh, layout, fn, _linear_args(), LINEAR_KINDS)
        problems = _compare(got, _linear_reference(), f"linear_cross_entropy (shard_map) {layout}")
        gathers = all_gather_shapes(hlo)
        vocab = [s for s in gathers if gathers_vocabulary_matrix(s)]
        if vocab:
            problems.append(f"all-gather of a [*, V] array {vocab}; all: {gathers}")
        return problems, gathers

    @check(f"explicit/linear_cross_entropy/{_layout}")
    def _linear_explicit(mesh: Mesh, layout=_layout):
        """Explicit sharding with the axes named: the shard_map form, nothing gathered."""
        fn = _linear_fn(**_axes(layout))
        got, hlo = _sharded(explicit(mesh), layout, fn, _linear_args(), LINEAR_KINDS)
        problems = _compare(got, _linear_reference(), f"linear_cross_entropy (explicit) {layout}")
        gathers = all_gather_shapes(hlo)
        vocab = [s for s in gathers if gathers_vocabulary_matrix(s)]
        if vocab:
            problems.append(f"all-gather of a [*, V] array {vocab}; all: {gathers}")
        return problems, gathers

    @check(f"explicit/linear_cross_entropy/{_layout}/without_axes_is_an_error")
    def _linear_explicit_unnamed(mesh: Mesh, layout=_layout):
        """Explicitly sharded inputs and no axes named: a ValueError naming the fix."""
        try:
            _sharded(explicit(mesh), layout, _linear_fn(), _linear_args(), LINEAR_KINDS)
        except ValueError as err:
            if "`batch_axis`" not in str(err) or "`vocab_axis`" not in str(err):
                return [f"unexpected message: {err}"], []
            return [], []
        return ["no ValueError for explicitly sharded inputs without batch_axis/vocab_axis"], []


def _linear_stats_fn(**axes):
    """Soft-capped loss and its statistics; classes 3 and 33 tie for the top logit everywhere."""

    def fn(hidden, kernel, bias, targets, weight, cotangent):
        kernel = kernel.at[:, 33].set(kernel[:, 3])
        bias = bias.at[3].set(9.0).at[33].set(9.0)
        targets = targets.at[0].set(3).at[2].set(33)

        def f(hidden, kernel):
            loss, stats = jaxloss.linear_cross_entropy(
                hidden, kernel, targets, bias=bias, weight=weight, soft_cap=5.0,
                return_stats=True, **LINEAR_OPTIONS, **axes,
            )  # fmt: skip
            return loss, stats

        (loss, stats), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(hidden, kernel)
        stats_out = (stats.lse, stats.entropy, stats.argmax, stats.correct)
        return loss, grads, *(s.astype(jnp.float32) for s in stats_out)

    return fn


for _layout in LAYOUTS:

    @check(f"linear_cross_entropy/shard_map/{_layout}/soft_cap_and_stats")
    def _linear_shard_map_stats(mesh: Mesh, layout=_layout):
        """Statistics combined over vocabulary shards (argmax ties to the lowest class)."""
        fn = _linear_stats_fn(mesh=mesh, **_axes(layout))
        got, _ = _sharded(mesh, layout, fn, _linear_args(), LINEAR_KINDS)
        want = _unsharded(_linear_stats_fn(), _linear_args())
        problems = _compare(got, want, f"linear_cross_entropy stats (shard_map) {layout}")
        if not (want[-1][0] == 1 and want[-1][2] == 0 and np.all(want[-2] == 3)):
            problems.append(f"the unsharded tie did not go to class 3: {want[-2:]}")
        return problems, []


def _huge_fn(dense: bool = False, **axes):
    """Per-token losses, their mean and sum, and gradients (kernel, bias, class weight) at
    logits near 1e8 (float32)."""

    def fn(hidden, kernel, bias, targets, weight, cotangent):
        def loss_of(reduction, h, k, b, w):
            options = dict(weight=w, reduction=reduction, label_smoothing=0.1)
            if dense:
                return jaxloss.cross_entropy(h @ k + b[None, :], targets, **options)
            return jaxloss.linear_cross_entropy(
                h, k, targets, bias=b, token_chunk=3, vocab_chunk=3, **options, **axes
            )

        def f(*args):
            loss = loss_of("none", *args)
            return jnp.sum(loss * cotangent), loss

        args = (hidden, kernel, bias, weight)
        # Not the hidden gradient: Σ_c ∂ℓ/∂z_c · 1e8 is rounding noise of 1e8 in any order.
        (_, loss), grads = jax.value_and_grad(f, argnums=(1, 2, 3), has_aux=True)(*args)
        return loss, loss_of("mean", *args), loss_of("sum", *args), grads

    return fn


def _huge_args():
    """One feature of ones; logits 1e8 and 1, 2, 3 float32 ulps (8) below it, on every shard
    (each class keeps some probability: the losses are a few units, not 1e8)."""
    kernel = (1e8 - 8.0 * (np.arange(V) % 4)).astype(np.float32)[None, :]
    return dict(_linear_args(), hidden=np.ones((N, 1), np.float32), kernel=kernel)


for _layout in LAYOUTS:

    @check(f"linear_cross_entropy/shard_map/{_layout}/huge_logits")
    def _linear_shard_map_huge(mesh: Mesh, layout=_layout):
        """Shards' sums relative to their own maxima, moved to the global one: exact at 1e8
        as cross_entropy of the materialised logits (issue 19, item 2)."""
        fn = _huge_fn(mesh=mesh, **_axes(layout))
        got, _ = _sharded(mesh, layout, fn, _huge_args(), LINEAR_KINDS)
        want = _unsharded(_huge_fn(dense=True), _huge_args())
        return _compare(got, want, f"linear_cross_entropy at 1e8 (shard_map) {layout}"), []


def _poisoned_args():
    """``_linear_args`` with NaN/inf hidden rows at the ignored positions (padding)."""
    args = _linear_args()
    hidden = args["hidden"].copy()
    ignored = np.flatnonzero(args["targets"] == -100)
    hidden[ignored[0]], hidden[ignored[1], 0], hidden[ignored[2]] = np.nan, -np.inf, np.inf
    return dict(args, hidden=hidden)


for _layout in LAYOUTS:

    @check(f"linear_cross_entropy/shard_map/{_layout}/non_finite_ignored_rows")
    def _linear_shard_map_poisoned(mesh: Mesh, layout=_layout):
        """NaN/inf hidden rows at ignored tokens: the values and gradients of finite ones
        (issue 19, item 4)."""
        fn = _linear_fn(mesh=mesh, **_axes(layout))
        got, _ = _sharded(mesh, layout, fn, _poisoned_args(), LINEAR_KINDS)
        what = f"linear_cross_entropy, NaN at ignored rows (shard_map) {layout}"
        problems = _compare(got, _linear_reference(), what)
        if not all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(got)):
            problems.append(f"{what}: non-finite outputs")
        return problems, []


def _masked_shard_fn(**axes):
    """Values and gradients with the classes of the last vocabulary shard all masked (-inf
    bias): that shard's log-sum is -inf for every row, and adds exactly nothing."""

    def fn(hidden, kernel, bias, targets, weight, cotangent):
        bias = bias.at[V - V // NUM_DEVICES :].set(-jnp.inf)
        targets = jnp.where(targets >= V - V // NUM_DEVICES, 0, targets)

        def f(h, k, w):
            loss = jaxloss.linear_cross_entropy(
                h, k, targets, bias=bias, weight=w, reduction="none", z_loss=1e-3,
                token_chunk=3, vocab_chunk=3, **axes,
            )  # fmt: skip
            return jnp.sum(loss * cotangent), loss

        return jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(hidden, kernel, weight)

    return fn


@check("linear_cross_entropy/shard_map/classes/masked_shard")
def _linear_shard_map_masked_shard(mesh: Mesh):
    """A shard without a finite logit (its finite_or_zero shift): finite, as unsharded."""
    got, _ = _sharded(mesh, "classes", _masked_shard_fn(mesh=mesh, **_axes("classes")),
                      _linear_args(), LINEAR_KINDS)  # fmt: skip
    want = _unsharded(_masked_shard_fn(), _linear_args())
    problems = _compare(got, want, "linear_cross_entropy, a masked vocabulary shard")
    if not all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(got)):
        problems.append("non-finite outputs with a masked vocabulary shard")
    return problems, []


def _infinite_kernel_fn(dense: bool = False, **axes):
    """Per-token losses and all gradients with +inf and -inf kernel entries (rows whose logits
    hold +inf or -inf on one shard only)."""

    def fn(hidden, kernel, bias, targets, weight, cotangent):
        kernel = kernel.at[0, 7].set(jnp.inf).at[3, 30].set(-jnp.inf)

        def f(h, k, b, w):
            options = dict(weight=w, reduction="none", label_smoothing=0.1)
            if dense:
                loss = jaxloss.cross_entropy(h @ k + b[None, :], targets, **options)
            else:
                loss = jaxloss.linear_cross_entropy(
                    h, k, targets, bias=b, token_chunk=3, vocab_chunk=3, **options, **axes
                )
            return jnp.sum(loss * cotangent), loss

        args = (hidden, kernel, bias, weight)
        return jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True)(*args)

    return fn


for _layout in ("classes", "both"):

    @check(f"linear_cross_entropy/shard_map/{_layout}/infinite_kernel")
    def _linear_shard_map_infinite(mesh: Mesh, layout=_layout):
        """Every entry, NaN, inf and finite, as autodiff of the materialised formula (issue 19,
        item 7): the log-sum over shards gives a row holding +inf the unsharded gradient."""
        fn = _infinite_kernel_fn(mesh=mesh, **_axes(layout))
        got, _ = _sharded(mesh, layout, fn, _linear_args(), LINEAR_KINDS)
        want = _unsharded(_infinite_kernel_fn(dense=True), _linear_args())
        problems = []
        for i, (g, w) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)):
            g, w = np.asarray(g), np.asarray(w)
            scale = float(np.max(np.abs(w[np.isfinite(w)]), initial=0.0))
            if not np.allclose(g, w, rtol=RTOL, atol=RTOL * scale, equal_nan=True):
                problems.append(f"infinite kernel ({layout}): output {i} differs from materialised")
        return problems, []


@check("linear_cross_entropy/shard_map/uneven_tokens_is_an_error")
def _linear_uneven_tokens(mesh: Mesh):
    """Tokens that do not split evenly over the batch axis raise a ValueError."""
    data = _linear_args()
    h, k, y = data["hidden"], data["kernel"], data["targets"]
    try:
        jaxloss.linear_cross_entropy(h[:-1], k, y[:-1], mesh=mesh, batch_axis=BATCH)
    except ValueError as err:
        return ([] if "split evenly" in str(err) else [f"unexpected message {err}"]), []
    return ["no ValueError for tokens that do not split evenly"], []


# Classes that do not split evenly over the vocabulary axis (GPT-2's 50257 over 8, small): 37
# over 4 devices (ranges of 10, the last slid back to [27, 37) owning [30, 37)) and over 8
# (ranges of 5, the last owning [35, 37)). JAX cannot place such an uneven shard, so the kernel,
# bias and weight arrive replicated; each device reads its own column range of them in place.
UNEVEN_V = 37
UNEVEN_AXES = {
    "classes": {"batch_axis": None, "vocab_axis": BATCH},
    "both": {"batch_axis": "data", "vocab_axis": "model"},
}


def _uneven_args():
    data = _linear_args()
    targets = np.where(data["targets"] >= UNEVEN_V, UNEVEN_V - 1, data["targets"])
    targets[[2, 3]] = [UNEVEN_V - 1, 30]  # the last device's first and last owned classes
    return dict(
        data, kernel=data["kernel"][:, :UNEVEN_V], bias=data["bias"][:UNEVEN_V],
        weight=data["weight"][:UNEVEN_V], targets=targets,
    )  # fmt: skip


for _layout in UNEVEN_AXES:

    @check(f"linear_cross_entropy/shard_map/{_layout}/uneven_classes")
    def _linear_uneven_classes(mesh: Mesh, layout=_layout):
        """Values, gradients and statistics exact against the unsharded call; the kernel's
        gradient comes back with the kernel's (replicated) sharding."""
        axes = UNEVEN_AXES[layout]
        kinds = {"hidden": "hidden", "targets": "rows", "cotangent": "rows"}
        got, _ = _sharded(mesh, layout, _linear_fn(mesh=mesh, **axes), _uneven_args(), kinds)
        problems = _compare(got, _unsharded(_linear_fn(), _uneven_args()), f"uneven {layout}")
        kernel_grad = got[3][1]
        if not kernel_grad.sharding.is_fully_replicated:
            problems.append(f"kernel gradient sharding {kernel_grad.sharding}, not replicated")
        stats, _ = _sharded(
            mesh, layout, _linear_stats_fn(mesh=mesh, **axes), _uneven_args(), kinds
        )
        want = _unsharded(_linear_stats_fn(), _uneven_args())
        problems += _compare(stats, want, f"uneven {layout}, soft cap and statistics")
        probs, _ = _sharded(mesh, layout, _uneven_probs_fn(mesh=mesh, **axes), _uneven_probs(), {
            "hidden": "hidden", "probs": "rows"})  # fmt: skip
        want = _unsharded(_uneven_probs_fn(), _uneven_probs())
        problems += _compare(probs, want, f"uneven {layout}, probability targets")
        return problems, []


def _uneven_probs():
    data = _uneven_args()
    rng = np.random.default_rng(5)
    probs = rng.dirichlet(np.ones(UNEVEN_V), N).astype(np.float32)
    return {k: data[k] for k in ("hidden", "kernel", "bias", "weight")} | {"probs": probs}


def _uneven_probs_fn(**axes):
    """Probability targets: each device's mass counts only the classes it owns."""

    def fn(hidden, kernel, bias, weight, probs):
        def f(hidden, kernel, bias, weight):
            return jaxloss.linear_cross_entropy(
                hidden, kernel, probs, bias=bias, weight=weight, reduction="sum",
                label_smoothing=0.1, z_loss=1e-3, token_chunk=3, vocab_chunk=3, **axes,
            )  # fmt: skip

        return jax.value_and_grad(f, argnums=(0, 1, 2, 3))(hidden, kernel, bias, weight)

    return fn


@check("hlo_parser/sees_all_gathers")
def _parser_self_test(mesh: Mesh):
    """The HLO parser finds a forced all-gather of the logits (so a pass above means something)."""
    logits = jax.device_put(
        jnp.zeros((N, V)), NamedSharding(mesh, _layout_specs("classes")["matrix"])
    )
    replicated = NamedSharding(mesh, P())
    hlo = jax.jit(lambda x: x * 2, out_shardings=replicated).lower(logits).compile().as_text()
    gathers = all_gather_shapes(hlo)
    ok = any(gathers_vocabulary_matrix(s) and N_ROWS & set(s) for s in gathers)
    return ([] if ok else [f"parser found no [N, V] all-gather in a forced gather: {gathers}"]), (
        gathers
    )
