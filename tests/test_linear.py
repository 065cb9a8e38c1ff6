"""Tests for ``jaxloss.linear_cross_entropy``, the fused linear layer + cross-entropy.

The oracle is the materialised path ``jaxloss.cross_entropy(hidden @ kernel + bias, ...)`` (itself
checked against PyTorch in ``test_classification.py``): values and gradients in ``hidden``,
``kernel``, ``bias`` (and ``weight``) must agree for every option and every chunk geometry,
including chunks that do not divide the sizes. Besides: float64 finite differences, bf16
accumulation, misuse errors, and the memory bound at a large-vocabulary shape (compiled only).
"""

from __future__ import annotations

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxloss

N, D, V = 13, 8, 29
IGNORE_ROWS = (2, 9)


def _problem(seed=0, n=N, d=D, v=V, dtype=jnp.float32, ignore_index=-100, scale=1.0):
    """Hidden, kernel, bias, class weight and targets (some ignored) for one test.

    Drawn with NumPy: eager jax.random calls would each compile a program, in every dtype mode.
    """
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((n, d))
    kernel = (3 * scale / np.sqrt(d)) * rng.standard_normal((d, v))
    bias = rng.standard_normal(v)
    weight = rng.uniform(0.2, 2.0, v)
    targets = rng.integers(0, v, n)
    targets[[r for r in IGNORE_ROWS if r < n]] = ignore_index
    floats = (jnp.asarray(a, dtype) for a in (hidden, kernel, bias, weight))
    return (*floats, jnp.asarray(targets, jnp.int32))


def _materialised(hidden, kernel, targets, *, bias=None, **options):
    logits = hidden @ kernel
    if bias is not None:
        logits = logits + bias[None, :]
    return jaxloss.cross_entropy(logits, targets, **options)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _value_and_grads(loss_fn, with_bias, hidden, kernel, bias, targets, weight, cotangent):
    """The loss and the VJP of ``cotangent`` in hidden, kernel (and bias) and weight."""

    def f(hidden, kernel, bias, weight):
        return loss_fn(hidden, kernel, targets, bias=bias if with_bias else None, weight=weight)

    value, vjp = jax.vjp(f, hidden, kernel, bias, weight)
    return value, vjp(cotangent.reshape(value.shape).astype(value.dtype))


def _compare(options, chunks=(4, 6), with_bias=True, weighted=False, seed=0, rtol=2e-5):
    ignore_index = options.get("ignore_index", -100)
    hidden, kernel, bias, weight, targets = _problem(seed, ignore_index=ignore_index)
    cotangent = jnp.asarray(np.random.default_rng(seed + 100).standard_normal(N), jnp.float32)
    fused = functools.partial(
        jaxloss.linear_cross_entropy, token_chunk=chunks[0], vocab_chunk=chunks[1], **options
    )
    dense = functools.partial(_materialised, **options)
    if not weighted:
        fused = _drop_weight(fused)
        dense = _drop_weight(dense)
    if options.get("reduction", "mean") != "none":
        cotangent = cotangent[:1]
    got = _value_and_grads(fused, with_bias, hidden, kernel, bias, targets, weight, cotangent)
    want = _value_and_grads(dense, with_bias, hidden, kernel, bias, targets, weight, cotangent)
    names = ("loss", "d hidden", "d kernel", "d bias", "d weight")
    for name, g, w in zip(names, (got[0], *got[1]), (want[0], *want[1]), strict=True):
        assert g.dtype == w.dtype, name
        scale = float(jnp.max(jnp.abs(w)))
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * scale, err_msg=name)


def _drop_weight(loss_fn):
    """The loss without a class weight (the weight argument is then differentiated to 0)."""

    def f(hidden, kernel, targets, *, bias, weight):
        return loss_fn(hidden, kernel, targets, bias=bias) + 0 * jnp.sum(weight)

    return f


# Every option, alone and together; "weighted" adds a class weight (differentiated too).
OPTIONS = {
    "mean": {},
    "sum": {"reduction": "sum"},
    "none-weighted": {"reduction": "none", "weighted": True},
    "mean-weighted": {"weighted": True},
    "smoothing": {"label_smoothing": 0.15},
    "smoothing-none-weighted": {"label_smoothing": 0.3, "reduction": "none", "weighted": True},
    "z_loss-sum-weighted": {"z_loss": 0.1, "reduction": "sum", "weighted": True},
    "ignore_index=3": {"ignore_index": 3, "reduction": "none"},
    "everything-weighted": {
        "label_smoothing": 0.2,
        "z_loss": 1e-2,
        "ignore_index": 0,
        "weighted": True,
    },
}


@pytest.mark.parametrize("name", OPTIONS)
def test_matches_materialised(name):
    options = dict(OPTIONS[name])
    _compare(options, weighted=options.pop("weighted", False))


def test_matches_materialised_without_bias():
    _compare(
        {"label_smoothing": 0.2, "z_loss": 1e-2, "reduction": "none"},
        with_bias=False,
        weighted=True,
    )


# (token_chunk, vocab_chunk) against N=13, V=29: unit chunks, uneven last chunks in one or both
# axes, chunks that divide exactly, chunks larger than the sizes.
@pytest.mark.parametrize("chunks", [(1, 1), (5, 29), (13, 7), (64, 1024)])
def test_chunk_geometry(chunks):
    _compare({"label_smoothing": 0.1, "z_loss": 1e-3, "reduction": "none"}, chunks, weighted=True)


def test_batch_shape_is_flattened():
    hidden, kernel, bias, _, targets = _problem(n=12)
    shaped = jaxloss.linear_cross_entropy(
        hidden.reshape(3, 4, D), kernel, targets.reshape(3, 4), bias=bias, reduction="none"
    )
    flat = jaxloss.linear_cross_entropy(hidden, kernel, targets, bias=bias, reduction="none")
    assert shaped.shape == (3, 4)
    np.testing.assert_array_equal(shaped.reshape(-1), flat)
    mean = jaxloss.linear_cross_entropy(hidden.reshape(2, 6, D), kernel, targets.reshape(2, 6))
    np.testing.assert_allclose(mean, _materialised(hidden, kernel, targets), rtol=1e-6)


def test_bad_target_is_nan_in_value_and_gradient():
    hidden, kernel, _, _, targets = _problem()
    targets = targets.at[4].set(V)  # out of range and not ignored
    with pytest.raises(ValueError, match=rf"class index {V} at position \(4,\)"):
        jaxloss.linear_cross_entropy(hidden, kernel, targets)  # concrete: PyTorch's error
    under_jit = jax.jit(functools.partial(jaxloss.linear_cross_entropy, vocab_chunk=7))
    per_row = jax.jit(
        functools.partial(jaxloss.linear_cross_entropy, reduction="none", vocab_chunk=7)
    )(hidden, kernel, targets)
    assert np.isnan(per_row[4]) and np.all(np.isfinite(np.delete(np.asarray(per_row), 4)))

    def grads(loss_fn):
        # Targets traced: cross_entropy rejects a concrete out-of-range target eagerly.
        return jax.jit(jax.grad(loss_fn, argnums=(0, 1)))(hidden, kernel, targets)

    fused = grads(functools.partial(jaxloss.linear_cross_entropy, vocab_chunk=7))
    dense = grads(_materialised)
    assert np.isnan(under_jit(hidden, kernel, targets))
    for got, want in zip(fused, dense, strict=True):
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        assert np.isnan(got).any()


def test_all_ignored_mean_is_nan_with_zero_gradients():
    hidden, kernel, bias, _, _ = _problem()
    targets = jnp.full((N,), -100)

    def loss(h, k, b, reduction):
        return jaxloss.linear_cross_entropy(h, k, targets, bias=b, reduction=reduction, z_loss=0.1)

    assert np.isnan(loss(hidden, kernel, bias, "mean"))
    assert loss(hidden, kernel, bias, "sum") == 0
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    for g in grad(hidden, kernel, bias, "mean"):
        np.testing.assert_array_equal(g, jnp.zeros_like(g))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_empty_batch_matches_materialised(reduction):
    hidden, kernel = jnp.zeros((0, D)), jnp.ones((D, V))
    targets = jnp.zeros((0,), jnp.int32)
    got = jaxloss.linear_cross_entropy(hidden, kernel, targets, reduction=reduction)
    want = _materialised(hidden, kernel, targets, reduction=reduction)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_masked_vocabulary_entries(smoothing):
    """A -inf bias (padded vocabulary) is finite without smoothing and inf with it, as PyTorch."""
    hidden, kernel, bias, _, targets = _problem()
    bias = bias.at[V - 5 :].set(-jnp.inf)
    targets = jnp.where(targets >= V - 5, 0, targets)

    def run(loss_fn):
        f = lambda h, k, b: loss_fn(h, k, targets, bias=b, label_smoothing=smoothing)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(hidden, kernel, bias)

    (got, got_grads), (want, want_grads) = (
        run(functools.partial(jaxloss.linear_cross_entropy, vocab_chunk=8)),
        run(_materialised),
    )
    assert np.isfinite(got) == (smoothing == 0) and np.isfinite(want) == (smoothing == 0)
    np.testing.assert_allclose(got, want, rtol=2e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-6)


def test_large_logits_are_stable():
    hidden, kernel, _, _, targets = _problem(scale=300.0)
    f = lambda h, k: jaxloss.linear_cross_entropy(h, k, targets, vocab_chunk=5, z_loss=1e-4)
    g = lambda h, k: _materialised(h, k, targets, z_loss=1e-4)
    assert float(jnp.max(jnp.abs(hidden @ kernel))) > 500
    (vf, gf), (vd, gd) = (jax.jit(jax.value_and_grad(fn, (0, 1)))(hidden, kernel) for fn in (f, g))
    np.testing.assert_allclose(vf, vd, rtol=1e-5)
    for a, b in zip(gf, gd, strict=True):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))


def test_float64_finite_differences(x64):
    hidden, kernel, bias, weight, targets = _problem(n=5, d=3, v=7, dtype=jnp.float64)

    def loss(h, k, b, w):
        return jaxloss.linear_cross_entropy(
            h, k, targets, bias=b, weight=w, label_smoothing=0.2, z_loss=0.05,
            token_chunk=2, vocab_chunk=3,
        )  # fmt: skip

    assert loss(hidden, kernel, bias, weight).dtype == jnp.float64
    check_grads(jax.jit(loss), (hidden, kernel, bias, weight), order=1, modes=("rev",))


def _float64_case():
    hidden, kernel, bias, weight, targets = _problem(dtype=jnp.float64)
    options = dict(bias=bias, weight=weight, label_smoothing=0.1, z_loss=1e-3, reduction="none")
    # NumPy float64 reference of cross_entropy's formula.
    z = np.asarray(hidden) @ np.asarray(kernel) + np.asarray(bias)
    w, y = np.asarray(weight), np.asarray(targets)
    valid = y != -100
    lse = np.log(np.sum(np.exp(z - z.max(1, keepdims=True)), 1)) + z.max(1)
    logp = z - lse[:, None]
    picked = logp[np.arange(len(y)), np.where(valid, y, 0)]
    loss = -0.9 * w[np.where(valid, y, 0)] * picked - 0.1 / V * np.sum(w * logp, 1)
    want = np.where(valid, loss + 1e-3 * lse**2, 0)
    return (hidden, kernel, targets), options, want


def test_float64_matches_numpy_tightly(x64):
    args, options, want = _float64_case()
    got = jaxloss.linear_cross_entropy(*args, vocab_chunk=6, **options)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_float64_materialised_oracle_is_float64_exact(x64):
    """The oracle itself in float64 (a regression test for cross_entropy's float64 forward)."""
    args, options, want = _float64_case()
    np.testing.assert_allclose(_materialised(*args, **options), want, rtol=1e-12)


def _dot_output_dtypes(jaxpr) -> list[str]:
    """The result dtype of every dot_general in a jaxpr, sub-jaxprs (loops, custom_vjp) included."""
    text = str(jaxpr)
    return re.findall(r"(\w+)\[[\d,]*\] = dot_general", text)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bf16_accumulates_in_float32(reduction):
    """ "mean" on CPU: the fused pass; "none": the recomputing pass, whose hidden gradient has a
    pass of its own in half precision (no float32 copy of it)."""
    hidden, kernel, bias, _, targets = _problem(n=37, d=64, v=50)
    low = [a.astype(jnp.bfloat16) for a in (hidden, kernel, bias)]

    def f(h, k, b):
        losses = jaxloss.linear_cross_entropy(
            h, k, targets, bias=b, vocab_chunk=16, token_chunk=8, reduction=reduction
        )
        return jnp.mean(losses) if reduction == "none" else losses

    value, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(*low)
    assert value.dtype == jnp.bfloat16
    assert [g.dtype for g in grads] == [jnp.bfloat16] * 3
    # The reference sees the same bf16 numbers but computes in float32 throughout.
    up = [a.astype(jnp.float32) for a in low]
    want, want_grads = jax.jit(
        jax.value_and_grad(lambda h, k, b: _materialised(h, k, targets, bias=b), argnums=(0, 1, 2))
    )(*up)
    if reduction == "none":  # the mean over every position, ignored ones included
        want_grads = [g * (N_VALID_37 / 37) for g in want_grads]
        want = want * N_VALID_37 / 37
    np.testing.assert_allclose(np.float32(value), want, rtol=2**-8)
    for g, w in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(
            np.float32(g), w, rtol=2**-7, atol=2**-7 * float(jnp.max(jnp.abs(w)))
        )
    dots = _dot_output_dtypes(jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2)))(*low))
    assert dots and set(dots) == {"f32"}, dots


N_VALID_37 = 37 - len(IGNORE_ROWS)


# bf16 in the recomputing pass: test_bf16_accumulates_in_float32[none] by default.
@pytest.mark.parametrize(
    ("reduction", "dtype"),
    [("mean", jnp.float32), pytest.param("sum", jnp.bfloat16, marks=pytest.mark.slow)],
)
def test_recomputing_pass_of_the_accelerators_matches_the_fused_one(
    accelerator_forms, reduction, dtype
):
    """GPUs and TPUs take the recomputing pass for "sum"/"mean" (no full-size float32
    gradient accumulators); run here, on CPU, against the fused pass CPU takes."""
    hidden, kernel, bias, weight, targets = _problem(n=19, d=24, v=41, dtype=dtype)
    options = dict(
        bias=bias, weight=weight, label_smoothing=0.1, z_loss=1e-3, soft_cap=4.0,
        reduction=reduction, token_chunk=6, vocab_chunk=9, return_stats=True,
    )  # fmt: skip

    def run():
        f = lambda h, k, b: jaxloss.linear_cross_entropy(h, k, targets, **{**options, "bias": b})
        (loss, stats), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(
            hidden, kernel, bias
        )
        return loss, stats, grads

    fused = run()
    accelerator_forms(recompute=True)
    recomputed = run()
    tol = 1e-5 if dtype == jnp.float32 else 2**-7
    chex.assert_trees_all_close(recomputed, fused, rtol=tol, atol=tol)


def test_vmap_matches_per_example():
    hidden, kernel, bias, _, targets = _problem(n=12)
    h, y = hidden.reshape(3, 4, D), targets.reshape(3, 4)
    f = lambda h, y: jaxloss.linear_cross_entropy(h, kernel, y, bias=bias, vocab_chunk=7)
    value_and_grad = jax.value_and_grad(f)
    batched = jax.jit(jax.vmap(value_and_grad))(h, y)
    single = jax.jit(value_and_grad)
    for i in range(3):
        value, grad = single(h[i], y[i])
        np.testing.assert_allclose(batched[0][i], value, rtol=1e-6)
        np.testing.assert_allclose(batched[1][i], grad, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Misuse
# ----------------------------------------------------------------------------------------------

_H, _K, _Y = jnp.zeros((4, 3)), jnp.zeros((3, 5)), jnp.zeros((4,), jnp.int32)
MISUSE = {
    "integer hidden": (TypeError, "`hidden`", (_H.astype(int), _K, _Y), {}),
    "integer kernel": (TypeError, "`kernel`", (_H, _K.astype(int), _Y), {}),
    "float targets": (TypeError, "`targets`", (_H, _K, _Y.astype(float)), {}),
    "kernel rows != D": (ValueError, "`kernel`", (_H, jnp.zeros((4, 5)), _Y), {}),
    "kernel rank 3": (ValueError, "`kernel`", (_H, jnp.zeros((3, 5, 1)), _Y), {}),
    "targets shape": (ValueError, "`targets`", (_H, _K, jnp.zeros((3,), int)), {}),
    "scalar hidden": (ValueError, "`hidden`", (jnp.zeros(()), _K, _Y), {}),
    "bias shape": (ValueError, "`bias`", (_H, _K, _Y), {"bias": jnp.zeros((4,))}),
    "integer bias": (TypeError, "`bias`", (_H, _K, _Y), {"bias": jnp.zeros((5,), int)}),
    "weight shape": (ValueError, "`weight`", (_H, _K, _Y), {"weight": jnp.zeros((4,))}),
    "reduction": (ValueError, "`reduction`", (_H, _K, _Y), {"reduction": "avg"}),
    "smoothing": (ValueError, "`label_smoothing`", (_H, _K, _Y), {"label_smoothing": 1.5}),
    "z_loss": (ValueError, "`z_loss`", (_H, _K, _Y), {"z_loss": -1.0}),
    "ignore_index": (TypeError, "`ignore_index`", (_H, _K, _Y), {"ignore_index": 1.0}),
    "token_chunk 0": (ValueError, "`token_chunk`", (_H, _K, _Y), {"token_chunk": 0}),
    "vocab_chunk float": (TypeError, "`vocab_chunk`", (_H, _K, _Y), {"vocab_chunk": 2.0}),
    "axes without mesh": (ValueError, "`mesh`", (_H, _K, _Y), {"vocab_axis": "model"}),
}


@pytest.mark.parametrize("case", MISUSE)
def test_misuse_names_the_argument(case):
    error, name, args, kwargs = MISUSE[case]
    # Our message names `the argument`; with the suite's jaxtyping hook on, a wrong dtype or type
    # is caught first by jaxtyping, whose message names "parameter 'the argument'".
    bare = name.strip("`")
    with pytest.raises(error, match=f"{re.escape(name)}|parameter '{re.escape(bare)}'"):
        jaxloss.linear_cross_entropy(*args, **kwargs)


def test_mesh_axis_errors():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    with pytest.raises(ValueError, match="not in the mesh"):
        jaxloss.linear_cross_entropy(_H, _K, _Y, mesh=mesh, vocab_axis="model")
    with pytest.raises(ValueError, match="different mesh axes"):
        jaxloss.linear_cross_entropy(_H, _K, _Y, mesh=mesh, vocab_axis="data", batch_axis="data")


# ----------------------------------------------------------------------------------------------
# Memory: the point of the function (compiled only; nothing runs)
# ----------------------------------------------------------------------------------------------

BIG_N, BIG_D, BIG_V = 8192, 2048, 131072
MiB = 2**20


def _temp_bytes(loss_fn) -> int:
    args = (
        jax.ShapeDtypeStruct((BIG_N, BIG_D), jnp.float32),
        jax.ShapeDtypeStruct((BIG_D, BIG_V), jnp.float32),
        jax.ShapeDtypeStruct((BIG_N,), jnp.int32),
    )
    compiled = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow  # a compile at an LLM shape
def test_memory_at_large_vocabulary():
    """value_and_grad at N=8192, D=2048, V=131072 f32: [N, V] logits alone would be 4 GiB."""
    fused = _temp_bytes(jaxloss.linear_cross_entropy)
    recomputing = _temp_bytes(
        lambda h, k, y: jnp.sum(jaxloss.linear_cross_entropy(h, k, y, reduction="none"))
    )
    materialised = _temp_bytes(lambda h, k, y: jaxloss.cross_entropy(h @ k, y))
    assert materialised >= BIG_N * BIG_V * 4, "the materialised path should hold [N, V] logits"
    assert fused <= 128 * MiB, (
        f"fused (gradient in the forward pass) temporaries {fused / MiB:.1f} MiB"
    )
    assert recomputing <= 64 * MiB, f"recomputing form temporaries {recomputing / MiB:.1f} MiB"


@pytest.mark.parametrize("smoothing, z_loss, reduction", [(0.0, 0.0, "mean"), (0.2, 0.01, "sum")])
def test_reference_form_matches_blocked(smoothing, z_loss, reduction):
    """The materialised definition (jaxloss._linear.reference) and the blocked kernel agree."""
    from jaxloss._linear import assembly, chunked, reference

    hidden, kernel, bias, weight, targets = _problem()
    got = jaxloss.linear_cross_entropy(
        hidden, kernel, targets, bias=bias, weight=weight, vocab_chunk=7,
        label_smoothing=smoothing, z_loss=z_loss, reduction=reduction,
    )  # fmt: skip
    problem = chunked.Problem(hidden, kernel, bias, targets, None, weight, None, True, False)
    options = assembly.Options(V, reduction=reduction, smoothing=True, z_loss=True)
    want = reference.reference_loss(problem, options, (jnp.float32(smoothing), jnp.float32(z_loss)))
    np.testing.assert_allclose(got, want, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# The GPUs' recomputing pass: a half-precision hidden's gradient carried in float32 through the
# kernel pass (jaxloss._blockwise.passes.CARRY_PLATFORMS), forced here on CPU
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def carried(accelerator_forms):
    """The GPUs' recomputing pass on this CPU: the hidden gradient carried (four matmuls), the
    target entries set apart."""
    accelerator_forms(carry=True, epilogue=True)


def _reference_value_and_grads(arrays, targets, reduction, soft_cap):
    """``reference.py``'s loss and its gradients in hidden, kernel and bias, in float32 from the
    same (half-precision) ``arrays``: hidden, kernel, bias, class weight."""
    from jaxloss._linear import assembly, chunked, reference

    up = [a.astype(jnp.float32) for a in arrays]
    probabilities = jnp.issubdtype(targets.dtype, jnp.floating)
    options = assembly.Options(V, reduction=reduction, smoothing=True, z_loss=True)

    def loss(h, k, b):
        labels, probs = (None, targets) if probabilities else (targets, None)
        p = chunked.Problem(h, k, b, labels, probs, up[3], jnp.float32(soft_cap), True, False)
        losses = reference.reference_loss(p, options, (jnp.float32(0.1), jnp.float32(1e-3)))
        return jnp.sum(losses)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(*up[:3])


def _assert_half_precision_close(value, grads, want, want_grads):
    """A half-precision head's value and (hidden, kernel, bias) gradients against the reference:
    bf16/f16 rounding of the inputs, float32 accumulation."""
    np.testing.assert_allclose(value, want, rtol=2**-7)
    for name, g, w in zip(("hidden", "kernel", "bias"), grads, want_grads, strict=True):
        scale = float(jnp.max(jnp.abs(w)))
        np.testing.assert_allclose(np.float32(g), w, rtol=2**-6, atol=2**-7 * scale, err_msg=name)


CARRY_CHUNKS = {"uneven": (4, 6), "one token chunk": (N, 7), "whole": (N, V)}


# The default run: each reduction, chunking and dtype once; --full every pair of chunking and
# reduction, each chunking and each reduction in both dtypes (9 of the 18 combinations).
BF16, F16 = jnp.bfloat16, jnp.float16
CARRY_DEFAULT = {("uneven", "mean", BF16), ("one token chunk", "none", F16), ("whole", "sum", BF16)}
CARRY_FULL = {
    ("uneven", "sum", F16), ("uneven", "none", BF16), ("one token chunk", "mean", F16),
    ("one token chunk", "sum", BF16), ("whole", "mean", F16), ("whole", "none", BF16),
}  # fmt: skip
CARRY_CASES = [
    pytest.param(*case, marks=() if case in CARRY_DEFAULT else pytest.mark.slow)
    for case in sorted(CARRY_DEFAULT | CARRY_FULL, key=str)
]


@pytest.mark.parametrize(("chunks", "reduction", "dtype"), CARRY_CASES)
def test_gpu_hidden_gradient_carry_matches_the_reference(carried, chunks, reduction, dtype):
    """Every option through the carried pass (class weights, ignored targets, smoothing,
    z-loss, soft-cap, bias, return_stats), blocks that do not divide the sizes and a single
    token chunk (its hidden rows selected once), against the materialised reference."""
    hidden, kernel, bias, weight, targets = _problem(dtype=dtype)
    low = [a.astype(dtype) for a in (hidden, kernel, bias, weight)]
    token_chunk, vocab_chunk = CARRY_CHUNKS[chunks]

    def f(h, k, b):
        loss, stats = jaxloss.linear_cross_entropy(
            h, k, targets, bias=b, weight=low[3], label_smoothing=0.1, z_loss=1e-3,
            soft_cap=4.0, reduction=reduction, token_chunk=token_chunk, vocab_chunk=vocab_chunk,
            return_stats=True,
        )  # fmt: skip
        return jnp.sum(loss.astype(jnp.float32)), stats

    (value, _), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(*low[:3])
    assert [g.dtype for g in grads] == [jnp.dtype(dtype)] * 3
    want, want_grads = _reference_value_and_grads(low, targets, reduction, 4.0)
    _assert_half_precision_close(value, grads, want, want_grads)


@pytest.mark.parametrize("chunks", ["uneven", "one token chunk"])
def test_gpu_hidden_gradient_carry_with_probability_targets(carried, chunks):
    hidden, kernel, bias, weight, _ = _problem()
    probs = jnp.asarray(np.random.default_rng(3).dirichlet(np.ones(V), N), jnp.float32)
    low = [a.astype(jnp.bfloat16) for a in (hidden, kernel, bias, weight)]
    token_chunk, vocab_chunk = CARRY_CHUNKS[chunks]

    def f(h, k, b):
        loss, _ = jaxloss.linear_cross_entropy(
            h, k, probs.astype(jnp.bfloat16), bias=b, weight=low[3], label_smoothing=0.1,
            z_loss=1e-3, soft_cap=4.0, reduction="sum", token_chunk=token_chunk,
            vocab_chunk=vocab_chunk, return_stats=True,
        )  # fmt: skip
        return loss.astype(jnp.float32)

    value, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(*low[:3])
    bf16_probs = probs.astype(jnp.bfloat16).astype(jnp.float32)
    want, want_grads = _reference_value_and_grads(low, bf16_probs, "sum", 4.0)
    _assert_half_precision_close(value, grads, want, want_grads)


@pytest.mark.parametrize("chunks", ["uneven", "one token chunk"])
def test_gpu_hidden_gradient_carry_ignores_non_finite_hidden_at_ignored_tokens(carried, chunks):
    """A NaN/inf hidden row at an ignored token (a padded position) reaches no gradient: the
    carried pass selects it away before its matmuls, once for a single token chunk."""
    hidden, kernel, _, _, targets = _problem()
    low = [a.astype(jnp.bfloat16) for a in (hidden, kernel)]
    token_chunk, vocab_chunk = CARRY_CHUNKS[chunks]
    f = lambda h, k: jaxloss.linear_cross_entropy(
        h, k, targets, token_chunk=token_chunk, vocab_chunk=vocab_chunk
    )
    value_and_grad = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
    want = value_and_grad(*low)
    for bad in (jnp.nan, jnp.inf):
        got = value_and_grad(low[0].at[IGNORE_ROWS[0]].set(bad), low[1])
        chex.assert_trees_all_equal(got, want)


def test_gpu_hidden_gradient_carry_takes_four_matmuls(carried, monkeypatch):
    """value_and_grad of a bf16 head through the carried pass: four N·D·V matmuls (the
    forward's and three in the backward: logits, kernel and hidden gradients from the same
    logit gradient), not five; and none beyond CARRY_MAX_BYTES."""
    from jaxloss._blockwise import passes

    hidden, kernel, _, _, targets = _problem()
    low = (hidden.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
    f = lambda h, k: jaxloss.linear_cross_entropy(h, k, targets, token_chunk=4, vocab_chunk=6)
    lowered = lambda: jax.jit(jax.value_and_grad(f, (0, 1))).lower(*low).as_text()
    assert lowered().count("stablehlo.dot_general") == 4
    monkeypatch.setattr(passes, "CARRY_MAX_BYTES", N * D * 4 - 1)
    jax.clear_caches()
    assert lowered().count("stablehlo.dot_general") == 5
