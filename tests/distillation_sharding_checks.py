"""Sharding checks for ``linear_distillation`` on 8 CPU devices (a 2 × 4 mesh).

Each check is one test of ``tests/test_sharding.py``, run in the pytest process on the eight CPU
devices that ``conftest.py`` sets up. Each compiles a jitted ``value_and_grad`` (plus the
``"mean"`` and ``"sum"`` values) with the inputs placed by ``NamedSharding`` — tokens split over
all 8 devices (``batch``), classes split over all 8 (``classes``), or tokens over ``data`` and
classes over ``model`` (``both``) — and compares it with the same function run on one device.
It then parses the compiled HLO:

- ``shard_map`` form (axes named, under automatic or explicit axis types): no all-gather of
  any array of rank >= 2 with the full vocabulary in it (logits or kernels);
- plain call under automatic sharding (XLA partitions the loops): no all-gather of logits.

A check takes the mesh and returns ``(problems, all_gathers)``, as in ``sharding_checks.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from sharding_problems import (
    LAYOUTS,
    D,
    N,
    V,
    compare,
    explicit,
    layout_specs,
    linear_axes,
    sharded,
    unsharded,
)

import jaxloss
from benchmarks.hlo import all_gather_shapes

D_T = 6  # the teacher's hidden size: distinct from N, D, V and their shards
N_ROWS = {N, N // 2, N // 4, N // 8}
OPTIONS = dict(beta=0.3, temperature=1.5, token_chunk=3, vocab_chunk=3)


DISTILLATION_KINDS = {
    "hidden": "hidden", "kernel": "kernel", "bias": "cols", "teacher_hidden": "hidden",
    "teacher_kernel": "kernel", "teacher_bias": "cols", "mask": "rows", "cotangent": "rows",
}  # fmt: skip


def distillation_data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    mask = rng.random(N) > 0.25
    return {
        "hidden": rng.standard_normal((N, D)).astype(np.float32),
        "kernel": (2 * rng.standard_normal((D, V)) / np.sqrt(D)).astype(np.float32),
        "bias": rng.standard_normal(V).astype(np.float32),
        "teacher_hidden": rng.standard_normal((N, D_T)).astype(np.float32),
        "teacher_kernel": (2 * rng.standard_normal((D_T, V)) / np.sqrt(D_T)).astype(np.float32),
        "teacher_bias": rng.standard_normal(V).astype(np.float32),
        "mask": mask,
        "cotangent": rng.standard_normal(N).astype(np.float32),
    }


def distillation_fn(divergence: str, masked: bool = True, **axes) -> Callable:
    def fn(hidden, kernel, bias, teacher_hidden, teacher_kernel, teacher_bias, mask, cotangent):
        def loss(reduction, h, k, b):
            return jaxloss.linear_distillation(
                h, k, teacher_hidden, teacher_kernel, bias=b, teacher_bias=teacher_bias,
                mask=mask if masked else None, divergence=divergence, reduction=reduction,
                **OPTIONS, **axes,
            )  # fmt: skip

        def weighted(h, k, b):
            per_token = loss("none", h, k, b)
            return jnp.sum(per_token * cotangent), per_token

        (_, per_token), grads = jax.value_and_grad(weighted, (0, 1, 2), has_aux=True)(
            hidden, kernel, bias
        )
        mean_grads = jax.grad(lambda *a: loss("mean", *a), (0, 1, 2))(hidden, kernel, bias)
        return (
            per_token,
            loss("mean", hidden, kernel, bias),
            loss("sum", hidden, kernel, bias),
            (grads, mean_grads),
        )

    return fn


def _run(mesh: Mesh, layout: str, fn: Callable, data: dict[str, np.ndarray] | None = None):
    return sharded(
        mesh, layout, fn, distillation_data() if data is None else data, DISTILLATION_KINDS
    )


@functools.cache
def _reference(divergence: str, masked: bool):
    """The plain call on one device (itself checked against the formulas in test_distillation)."""
    return unsharded(distillation_fn(divergence, masked), distillation_data())


CHECKS: dict[str, Callable[[Mesh], tuple[list[str], list[tuple[int, ...]]]]] = {}


def _register(mode: str, layout: str, divergence: str, masked: bool = True) -> None:
    name = f"{mode}/{divergence}/{layout}{'' if masked else '/no_mask'}"

    def run(mesh: Mesh):
        if mode == "explicit":
            mesh = explicit(mesh)
        axes = {} if mode == "auto" else dict(mesh=mesh, **linear_axes(layout))
        got, hlo = _run(mesh, layout, distillation_fn(divergence, masked, **axes))
        problems = compare(got, _reference(divergence, masked), name)
        gathers = all_gather_shapes(hlo)
        if mode == "auto":  # XLA may gather a kernel here, never the logits
            bad = [s for s in gathers if V in s and N_ROWS & set(s)]
        else:
            bad = [s for s in gathers if len(s) >= 2 and V in s]
        if bad and layout != "batch":
            problems.append(f"{name}: all-gather of a vocabulary-wide array {bad}; all: {gathers}")
        return problems, gathers

    CHECKS[name] = run


# Every divergence under every layout in the shard_map form; the other modes where they differ
# (explicit axis types reshard into the shard_map; automatic sharding may gather kernels).
for _layout in LAYOUTS:
    for _divergence in ("kl", "reverse_kl", "jsd"):
        _register("shard_map", _layout, _divergence)
for _layout in ("classes", "both"):
    _register("explicit", _layout, "jsd")
    _register("auto", _layout, "kl")
_register("shard_map", "both", "reverse_kl", masked=False)


# Classes that do not split evenly over the vocabulary axis: 37 over 4 (``both``) or 8
# (``classes``) devices. JAX cannot place such shards: both heads' kernels and biases arrive
# replicated and each device reads its own (slid-back, overlap-masked) column range in place.
UNEVEN_V = 37


def _uneven_data() -> dict[str, np.ndarray]:
    data = distillation_data()
    for name in ("kernel", "teacher_kernel"):
        data[name] = data[name][:, :UNEVEN_V]
    for name in ("bias", "teacher_bias"):
        data[name] = data[name][:UNEVEN_V]
    return data


def _register_uneven(layout: str, divergence: str) -> None:
    name = f"shard_map/{divergence}/{layout}/uneven_classes"

    def run(mesh: Mesh):
        vocabulary = ("kernel", "bias", "teacher_kernel", "teacher_bias")  # replicated
        kinds = {k: kind for k, kind in DISTILLATION_KINDS.items() if k not in vocabulary}
        fn = distillation_fn(divergence, mesh=mesh, **linear_axes(layout))
        got, _ = sharded(mesh, layout, fn, _uneven_data(), kinds)
        want = unsharded(distillation_fn(divergence), _uneven_data())
        problems = compare(got, want, name)
        kernel_grad = got[3][0][1]
        if not kernel_grad.sharding.is_fully_replicated:
            problems.append(f"{name}: kernel gradient sharding {kernel_grad.sharding}")
        return problems, []

    CHECKS[name] = run


for _layout in ("classes", "both"):
    for _divergence in ("kl", "jsd"):
        _register_uneven(_layout, _divergence)


def _huge_data() -> dict[str, np.ndarray]:
    """One feature of ones; logits 2^26 and 1, 2, 3 float32 ulps (8) below it on every shard."""
    ones = np.ones((N, 1), np.float32)
    student = (2.0**26 - 8.0 * (np.arange(V) % 4)).astype(np.float32)[None, :]
    teacher = (2.0**26 - 8.0 * ((np.arange(V) + 1) % 4)).astype(np.float32)[None, :]
    zeros = np.zeros(V, np.float32)
    return dict(
        distillation_data(), hidden=ones, kernel=student, bias=zeros, teacher_hidden=ones,
        teacher_kernel=teacher, teacher_bias=zeros,
    )  # fmt: skip


def _huge_fn(divergence: str, **axes) -> Callable:
    """Per-token losses and the kernel and bias gradients (not the hidden one: Σ_c ∂ℓ/∂z_c ·
    2^26 is rounding noise of that size in any summation order)."""

    def fn(hidden, kernel, bias, teacher_hidden, teacher_kernel, teacher_bias, mask, cotangent):
        def weighted(k, b):
            per_token = jaxloss.linear_distillation(
                hidden, k, teacher_hidden, teacher_kernel, bias=b, teacher_bias=teacher_bias,
                mask=mask, divergence=divergence, reduction="none", **OPTIONS, **axes,
            )  # fmt: skip
            return jnp.sum(per_token * cotangent), per_token

        return jax.value_and_grad(weighted, (0, 1), has_aux=True)(kernel, bias)

    return fn


def _register_huge(layout: str, divergence: str) -> None:
    name = f"shard_map/{divergence}/{layout}/huge_logits"

    def run(mesh: Mesh):
        """Shards' log-sums moved to the global maximum: exact at 2^26 (issue 19, item 2)."""
        got, _ = _run(
            mesh, layout, _huge_fn(divergence, mesh=mesh, **linear_axes(layout)), _huge_data()
        )
        return compare(got, unsharded(_huge_fn(divergence), _huge_data()), name), []

    CHECKS[name] = run


# KL only: its slope p_s - p_t is well conditioned; the reverse KL's and the JSD's cancel at
# these logits (test_distillation.py holds them to the materialised formula unsharded).
for _layout in ("classes", "both"):
    _register_huge(_layout, "kl")


def _register_poisoned(layout: str, divergence: str) -> None:
    name = f"shard_map/{divergence}/{layout}/non_finite_masked_rows"

    def run(mesh: Mesh):
        """NaN/inf hidden rows (student's and teacher's) at masked tokens: the values and
        gradients of finite ones (issue 19, item 4)."""
        data = distillation_data()
        masked = np.flatnonzero(~data["mask"])
        hidden, teacher_hidden = data["hidden"].copy(), data["teacher_hidden"].copy()
        hidden[masked[0]], hidden[masked[1], 0], teacher_hidden[masked[2]] = np.nan, np.inf, np.inf
        poisoned = dict(data, hidden=hidden, teacher_hidden=teacher_hidden)
        got, _ = _run(
            mesh, layout, distillation_fn(divergence, mesh=mesh, **linear_axes(layout)), poisoned
        )
        return compare(got, _reference(divergence, True), name), []

    CHECKS[name] = run


for _layout in LAYOUTS:
    _register_poisoned(_layout, "jsd")


def _parser_self_test(mesh: Mesh):
    """The HLO parser finds a forced all-gather of a class-sharded kernel (so a pass means much)."""
    kernel = jax.device_put(
        jnp.zeros((D, V)), NamedSharding(mesh, layout_specs("classes")["kernel"])
    )
    replicated = NamedSharding(mesh, P())
    hlo = jax.jit(lambda x: x * 2, out_shardings=replicated).lower(kernel).compile().as_text()
    gathers = all_gather_shapes(hlo)
    ok = any(len(s) >= 2 and V in s for s in gathers)
    return ([] if ok else [f"parser found no [D, V] all-gather in a forced gather: {gathers}"]), (
        gathers
    )


CHECKS["hlo_parser/sees_all_gathers"] = _parser_self_test


def _explicit_without_axes(mesh: Mesh):
    """Explicitly sharded inputs and no axes named: a ValueError naming the fix."""
    mesh = explicit(mesh)
    try:
        _run(mesh, "both", distillation_fn("kl"))
    except ValueError as err:
        if "`batch_axis`" not in str(err) or "`vocab_axis`" not in str(err):
            return [f"unexpected message: {err}"], []
        return [], []
    return ["no ValueError for explicitly sharded inputs without batch_axis/vocab_axis"], []


CHECKS["explicit/without_axes_is_an_error"] = _explicit_without_axes
