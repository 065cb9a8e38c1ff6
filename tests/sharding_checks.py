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

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from sharding_problems import (
    AXES,
    LAYOUTS,
    LINEAR_KINDS,
    LINEAR_OPTIONS,
    N,
    V,
    compare,
    cross_entropy_index,
    cross_entropy_probs,
    explicit,
    layout_specs,
    linear_args,
    linear_axes,
    linear_fn,
    nll,
    sharded,
    unsharded,
)

import jaxloss
from benchmarks.hlo import all_gather_shapes

NUM_DEVICES = 8  # tests/conftest.py's CPU devices, the 2 x 4 mesh
# Row counts an [N, V]-shaped array can have on some device (whole, or split over data/model).
N_ROWS = {N, N // 2, N // 4, N // 8}


def gathers_vocabulary_matrix(shape: tuple[int, ...]) -> bool:
    """A gathered array of rank >= 2 with the full vocabulary in it: logits or the kernel
    (found by ``benchmarks.hlo.all_gather_shapes``, the one reader of optimised HLO)."""
    return len(shape) >= 2 and V in shape


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
            got, hlo = sharded(mesh, layout, fn, args, kinds)
            problems = compare(got, unsharded(fn, args), f"{name} sharded over {layout}")
            gathers = all_gather_shapes(hlo)
            if layout != "batch":
                bad = [s for s in gathers if gathers_vocabulary_matrix(s) and N_ROWS & set(s)]
                if bad:
                    problems.append(f"{name}: all-gather of [N, V] logits {bad}; all: {gathers}")
            return problems, gathers

        check(f"{'explicit/' if mode == 'explicit' else ''}{name}/{layout}")(run)


_loss_checks("cross_entropy/index", cross_entropy_index)
_loss_checks("cross_entropy/probs", cross_entropy_probs)
_loss_checks("nll", nll)


def _linear_reference():
    """The plain call on one device (itself checked against cross_entropy in test_linear.py)."""
    return unsharded(linear_fn(), linear_args())


for _layout in LAYOUTS:

    @check(f"linear_cross_entropy/auto/{_layout}")
    def _linear_auto(mesh: Mesh, layout=_layout):
        """Plain call under jit: XLA partitions the blockwise loops itself."""
        got, hlo = sharded(mesh, layout, linear_fn(), linear_args(), LINEAR_KINDS)
        problems = compare(got, _linear_reference(), f"linear_cross_entropy (auto) {layout}")
        gathers = all_gather_shapes(hlo)
        logits = [s for s in gathers if V in s and N_ROWS & set(s)]
        if logits:
            problems.append(f"all-gather of [N, V] logits {logits}; all: {gathers}")
        return problems, gathers

    @check(f"linear_cross_entropy/shard_map/{_layout}")
    def _linear_shard_map(mesh: Mesh, layout=_layout):
        """batch_axis / vocab_axis: shard_map, no logits and no kernel ever gathered."""
        fn = linear_fn(mesh=mesh, **linear_axes(layout))
        got, hlo = sharded(mesh, layout, fn, linear_args(), LINEAR_KINDS)
        problems = compare(got, _linear_reference(), f"linear_cross_entropy (shard_map) {layout}")
        gathers = all_gather_shapes(hlo)
        vocab = [s for s in gathers if gathers_vocabulary_matrix(s)]
        if vocab:
            problems.append(f"all-gather of a [*, V] array {vocab}; all: {gathers}")
        return problems, gathers

    @check(f"explicit/linear_cross_entropy/{_layout}")
    def _linear_explicit(mesh: Mesh, layout=_layout):
        """Explicit sharding with the axes named: the shard_map form, nothing gathered."""
        fn = linear_fn(**linear_axes(layout))
        got, hlo = sharded(explicit(mesh), layout, fn, linear_args(), LINEAR_KINDS)
        problems = compare(got, _linear_reference(), f"linear_cross_entropy (explicit) {layout}")
        gathers = all_gather_shapes(hlo)
        vocab = [s for s in gathers if gathers_vocabulary_matrix(s)]
        if vocab:
            problems.append(f"all-gather of a [*, V] array {vocab}; all: {gathers}")
        return problems, gathers

    @check(f"explicit/linear_cross_entropy/{_layout}/without_axes_is_an_error")
    def _linear_explicit_unnamed(mesh: Mesh, layout=_layout):
        """Explicitly sharded inputs and no axes named: a ValueError naming the fix."""
        try:
            sharded(explicit(mesh), layout, linear_fn(), linear_args(), LINEAR_KINDS)
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
        fn = _linear_stats_fn(mesh=mesh, **linear_axes(layout))
        got, _ = sharded(mesh, layout, fn, linear_args(), LINEAR_KINDS)
        want = unsharded(_linear_stats_fn(), linear_args())
        problems = compare(got, want, f"linear_cross_entropy stats (shard_map) {layout}")
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
    return dict(linear_args(), hidden=np.ones((N, 1), np.float32), kernel=kernel)


for _layout in LAYOUTS:

    @check(f"linear_cross_entropy/shard_map/{_layout}/huge_logits")
    def _linear_shard_map_huge(mesh: Mesh, layout=_layout):
        """Shards' sums relative to their own maxima, moved to the global one: exact at 1e8
        as cross_entropy of the materialised logits (issue 19, item 2)."""
        fn = _huge_fn(mesh=mesh, **linear_axes(layout))
        got, _ = sharded(mesh, layout, fn, _huge_args(), LINEAR_KINDS)
        want = unsharded(_huge_fn(dense=True), _huge_args())
        return compare(got, want, f"linear_cross_entropy at 1e8 (shard_map) {layout}"), []


def _poisoned_args():
    """``_linear_args`` with NaN/inf hidden rows at the ignored positions (padding)."""
    args = linear_args()
    hidden = args["hidden"].copy()
    ignored = np.flatnonzero(args["targets"] == -100)
    hidden[ignored[0]], hidden[ignored[1], 0], hidden[ignored[2]] = np.nan, -np.inf, np.inf
    return dict(args, hidden=hidden)


for _layout in LAYOUTS:

    @check(f"linear_cross_entropy/shard_map/{_layout}/non_finite_ignored_rows")
    def _linear_shard_map_poisoned(mesh: Mesh, layout=_layout):
        """NaN/inf hidden rows at ignored tokens: the values and gradients of finite ones
        (issue 19, item 4)."""
        fn = linear_fn(mesh=mesh, **linear_axes(layout))
        got, _ = sharded(mesh, layout, fn, _poisoned_args(), LINEAR_KINDS)
        what = f"linear_cross_entropy, NaN at ignored rows (shard_map) {layout}"
        problems = compare(got, _linear_reference(), what)
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
    got, _ = sharded(mesh, "classes", _masked_shard_fn(mesh=mesh, **linear_axes("classes")),
                      linear_args(), LINEAR_KINDS)  # fmt: skip
    want = unsharded(_masked_shard_fn(), linear_args())
    problems = compare(got, want, "linear_cross_entropy, a masked vocabulary shard")
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
        fn = _infinite_kernel_fn(mesh=mesh, **linear_axes(layout))
        got, _ = sharded(mesh, layout, fn, linear_args(), LINEAR_KINDS)
        want = unsharded(_infinite_kernel_fn(dense=True), linear_args())
        return compare(got, want, f"infinite kernel ({layout}), against the materialised"), []


@check("linear_cross_entropy/shard_map/uneven_tokens_is_an_error")
def _linear_uneven_tokens(mesh: Mesh):
    """Tokens that do not split evenly over the batch axis raise a ValueError."""
    data = linear_args()
    h, k, y = data["hidden"], data["kernel"], data["targets"]
    try:
        jaxloss.linear_cross_entropy(h[:-1], k, y[:-1], mesh=mesh, batch_axis=AXES)
    except ValueError as err:
        return ([] if "split evenly" in str(err) else [f"unexpected message {err}"]), []
    return ["no ValueError for tokens that do not split evenly"], []


# Classes that do not split evenly over the vocabulary axis (GPT-2's 50257 over 8, small): 37
# over 4 devices (ranges of 10, the last slid back to [27, 37) owning [30, 37)) and over 8
# (ranges of 5, the last owning [35, 37)). JAX cannot place such an uneven shard, so the kernel,
# bias and weight arrive replicated; each device reads its own column range of them in place.
UNEVEN_V = 37


def _uneven_args():
    data = linear_args()
    targets = np.where(data["targets"] >= UNEVEN_V, UNEVEN_V - 1, data["targets"])
    targets[[2, 3]] = [UNEVEN_V - 1, 30]  # the last device's first and last owned classes
    return dict(
        data, kernel=data["kernel"][:, :UNEVEN_V], bias=data["bias"][:UNEVEN_V],
        weight=data["weight"][:UNEVEN_V], targets=targets,
    )  # fmt: skip


for _layout in ("classes", "both"):

    @check(f"linear_cross_entropy/shard_map/{_layout}/uneven_classes")
    def _linear_uneven_classes(mesh: Mesh, layout=_layout):
        """Values, gradients and statistics exact against the unsharded call; the kernel's
        gradient comes back with the kernel's (replicated) sharding."""
        axes = linear_axes(layout)
        kinds = {"hidden": "hidden", "targets": "rows", "cotangent": "rows"}
        got, _ = sharded(mesh, layout, linear_fn(mesh=mesh, **axes), _uneven_args(), kinds)
        problems = compare(got, unsharded(linear_fn(), _uneven_args()), f"uneven {layout}")
        kernel_grad = got[3][1]
        if not kernel_grad.sharding.is_fully_replicated:
            problems.append(f"kernel gradient sharding {kernel_grad.sharding}, not replicated")
        stats, _ = sharded(mesh, layout, _linear_stats_fn(mesh=mesh, **axes), _uneven_args(), kinds)
        want = unsharded(_linear_stats_fn(), _uneven_args())
        problems += compare(stats, want, f"uneven {layout}, soft cap and statistics")
        probs, _ = sharded(mesh, layout, _uneven_probs_fn(mesh=mesh, **axes), _uneven_probs(), {
            "hidden": "hidden", "probs": "rows"})  # fmt: skip
        want = unsharded(_uneven_probs_fn(), _uneven_probs())
        problems += compare(probs, want, f"uneven {layout}, probability targets")
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
        jnp.zeros((N, V)), NamedSharding(mesh, layout_specs("classes")["matrix"])
    )
    replicated = NamedSharding(mesh, P())
    hlo = jax.jit(lambda x: x * 2, out_shardings=replicated).lower(logits).compile().as_text()
    gathers = all_gather_shapes(hlo)
    ok = any(gathers_vocabulary_matrix(s) and N_ROWS & set(s) for s in gathers)
    return ([] if ok else [f"parser found no [N, V] all-gather in a forced gather: {gathers}"]), (
        gathers
    )
