"""``linear_cross_entropy`` at the extremes: huge logits and non-finite inputs.

The oracle is ``jaxloss.cross_entropy`` of the materialised logits (itself checked against
PyTorch), in every form of the fused head: the fused gradient pass (CPU's ``"sum"``/``"mean"``),
the recomputing pass (GPUs' and TPUs', forced here by emptying ``FUSED_PLATFORMS``; also with
the one-pass fold of each block that GPUs and TPUs take), the per-token ``"none"`` form and the
``shard_map`` form (one device here; eight in ``tests/sharding_checks.py``). Inputs vary by
value only, so each form compiles once per dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxloss
from jaxloss._blockwise import online

DTYPES = ("float32", "float64", "bfloat16")
FORMS = ("fused", "recomputing", "none", "shard_map", "gpu_fold")
# Relative tolerance per dtype: float64 is held to a few ulps (the old lse - z_y lost 1e-8).
RTOL = {"float32": 1e-6, "float64": 1e-13, "bfloat16": 2**-8}


@pytest.fixture
def form(request, accelerator_forms):
    """Sets up one form of the head (conftest's ``accelerator_forms``): ``recomputing`` is the
    pass GPUs and TPUs take for "sum"/"mean"; ``gpu_fold`` adds the GPUs' one-pass fold of each
    block's max and sum (``online.fold_blocks``) and target entries set apart
    (``passes.EPILOGUE_PLATFORMS``)."""
    if request.param in ("recomputing", "gpu_fold"):
        gpu = request.param == "gpu_fold"
        accelerator_forms(recompute=True, reductions=gpu, epilogue=gpu)
    return request.param


def _head(form: str, **options):
    """``(hidden, kernel, targets) -> summed loss`` of the fused head in ``form``."""
    if form == "shard_map":
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("vocab",))
        options = dict(options, mesh=mesh, vocab_axis="vocab")
    if form == "none":
        loss = functools.partial(jaxloss.linear_cross_entropy, reduction="none", **options)
        return lambda h, k, y, **arrays: jnp.sum(loss(h, k, y, **arrays))
    return functools.partial(jaxloss.linear_cross_entropy, reduction="sum", **options)


def _dense_loss(**options):
    return lambda h, k, y: jaxloss.cross_entropy(h @ k, y, reduction="sum", **options)


@functools.cache
def _dense():
    """The oracle's jitted value and gradients, compiled once (per dtype)."""
    return _value_and_grads(_dense_loss())


def _value_and_grads(loss_fn):
    return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))


def _each_once(first, second) -> list:
    """The pairs of ``first`` × ``second``: by default one diagonal of the grid (every value of
    each axis at least once), the rest slow. The code paths differ by form and by dtype, not by
    the pair; ``--full`` runs them all."""
    period = min(len(first), len(second))
    return [
        pytest.param(a, b, marks=() if (i + j) % period == 0 else pytest.mark.slow)
        for i, a in enumerate(first) for j, b in enumerate(second)
    ]  # fmt: skip


def _assert_close(got, want, dtype: str, what: str):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    rtol = RTOL[dtype]
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.max(np.abs(want)), err_msg=what)


# ----------------------------------------------------------------------------------------------
# Item 2: huge logits, exact as cross_entropy (every term relative to the row's maximum)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "form"), _each_once(DTYPES, FORMS), indirect=["form"])
def test_huge_logits_are_exact(form, dtype):
    """The issue's reproducer: ``[[1e4, 1e4, 0]]`` gave 0.6933594 and ``[[1e8, 1e8, 0]]`` 0.0
    with kernel gradient ``[0, 1, 0]`` (exact: log 2 and ``[-0.5, 0.5, 0]``)."""
    with jax.enable_x64(dtype == "float64"):
        hidden, targets = jnp.ones((1, 1), dtype), jnp.array([0])
        fused = _value_and_grads(_head(form, vocab_chunk=2))
        dense = _dense()
        for scale in (1e4, 1e8):
            kernel = jnp.asarray([[scale, scale, 0.0]], dtype)
            got, want = fused(hidden, kernel, targets), dense(hidden, kernel, targets)
            assert got[0].dtype == jnp.dtype(dtype)
            _assert_close(got[0], want[0], dtype, f"loss at {scale:g}")
            _assert_close(got[0], np.log(2), dtype, f"loss at {scale:g} vs log 2")
            _assert_close(got[1][1], want[1][1], dtype, f"kernel gradient at {scale:g}")
            _assert_close(got[1][1], [[-0.5, 0.5, 0.0]], dtype, f"kernel gradient at {scale:g}")
            _assert_close(got[1][0], want[1][0], dtype, f"hidden gradient at {scale:g}")


# Near-equal huge logits per dtype (exactly representable, a few ulps apart): each class has
# some probability, so the smoothing and probability-target sums see every digit.
NEAR_TIES = {"float32": (1e8, 8.0), "float64": (1e17, 16.0)}


def _near_tie_cases(dtype):
    """``{name: (targets, options)}``: smoothing (weighted or not) and probability targets."""
    weight = jnp.asarray([0.5, 2.0, 1.0, 1.5], dtype)
    probabilities = jnp.asarray([[0.1, 0.2, 0.3, 0.4], [0.0, 0.5, 0.5, 0.0]], dtype)
    labels = jnp.array([0, 2])
    return {
        "smoothing": (labels, (("label_smoothing", 0.3),)),
        "weighted smoothing": (labels, (("label_smoothing", 0.3), ("weight", weight))),
        "probabilities": (probabilities, (("label_smoothing", 0.2),)),
    }


# shard_map: sharding_checks.py
@pytest.mark.parametrize(
    ("dtype", "form"), _each_once(list(NEAR_TIES), (*FORMS[:3], "gpu_fold")), indirect=["form"]
)
def test_huge_logits_smoothing_and_probabilities_are_exact(form, dtype):
    """``lse·Σw − Σw·z`` cancelled: the sums are now ``Σ w (max − z)`` (moved with the max
    from one vocabulary chunk to the next: the logits grow along the row)."""
    top, ulps = NEAR_TIES[dtype]
    with jax.enable_x64(dtype == "float64"):
        hidden = jnp.ones((2, 1), dtype)
        kernel = jnp.asarray([[top - 3 * ulps, top - ulps, top, top - 2 * ulps]], dtype)
        cases = _near_tie_cases(dtype)

        def every_case(loss):
            return jax.jit(lambda h, k: {
                name: jax.value_and_grad(loss(**dict(options)), argnums=(0, 1))(h, k, y)
                for name, (y, options) in cases.items()
            })  # fmt: skip

        got = every_case(functools.partial(_head, form, vocab_chunk=1, token_chunk=1))
        got = got(hidden, kernel)
        wants = every_case(_dense_loss)(hidden, kernel)
        for name, want in wants.items():
            _assert_close(got[name][0], want[0], dtype, f"{name}: loss")
            _assert_close(got[name][1][1], want[1][1], dtype, f"{name}: kernel gradient")


# ----------------------------------------------------------------------------------------------
# Item 4: a non-finite hidden row at an ignored token contributes nothing
# ----------------------------------------------------------------------------------------------

N, D, V = 7, 4, 9
IGNORED = (1, 4)


def _problem(seed=0):
    """Hidden, kernel, bias, class weight and targets (rows ``IGNORED`` ignored), float32."""
    rng = np.random.default_rng(seed)
    hidden, kernel = rng.standard_normal((N, D)), rng.standard_normal((D, V))
    bias, weight = rng.standard_normal(V), rng.uniform(0.5, 2.0, V)
    targets = rng.integers(0, V, N)
    targets[list(IGNORED)] = -100
    floats = (jnp.asarray(a, jnp.float32) for a in (hidden, kernel, bias, weight))
    return (*floats, jnp.asarray(targets, jnp.int32))


# Chunkings: uneven blocks that overlap, single rows and columns, and whole arrays.
CHUNKINGS = {"uneven": (3, 4, 2), "single": (1, 1, 1), "whole": (N, V, N)}


def _all_grads(loss_fn, targets):
    """Jitted value and gradients in hidden, kernel, bias and class weight."""
    f = lambda h, k, b, w: loss_fn(h, k, targets, bias=b, weight=w)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))


@pytest.mark.parametrize(
    ("chunking", "form"), _each_once(list(CHUNKINGS), FORMS), indirect=["form"]
)
def test_non_finite_hidden_at_ignored_tokens_contributes_nothing(form, chunking):
    """Padded positions may hold NaN/inf hidden states (fully masked attention rows): the loss
    and every gradient (kernel, bias, weight) are those of any finite hidden row there, and
    that row's own hidden gradient is 0."""
    hidden, kernel, bias, weight, targets = _problem()
    token_chunk, vocab_chunk, grad_token_chunk = CHUNKINGS[chunking]
    options = dict(label_smoothing=0.1, z_loss=1e-3, token_chunk=token_chunk,
                   vocab_chunk=vocab_chunk, grad_token_chunk=grad_token_chunk)  # fmt: skip
    fused = _all_grads(_head(form, **options), targets)
    dense = _all_grads(
        lambda h, k, y, *, bias, weight: jaxloss.cross_entropy(
            h @ k + bias[None, :], y, weight=weight, reduction="sum", label_smoothing=0.1,
            z_loss=1e-3,
        ),
        targets,
    )  # fmt: skip
    want = dense(hidden, kernel, bias, weight)
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        poisoned = hidden.at[IGNORED[0]].set(bad).at[IGNORED[1], 2].set(bad)
        got = fused(poisoned, kernel, bias, weight)
        for name, g, w in zip(("loss", "hidden", "kernel", "bias", "weight"), (got[0], *got[1]),
                              (want[0], *want[1]), strict=True):  # fmt: skip
            assert np.all(np.isfinite(g)), f"{bad}: {name}"
            _assert_close(g, w, "float32", f"{bad}: {name}")
        np.testing.assert_array_equal(np.asarray(got[1][0])[list(IGNORED)], 0.0)


# ----------------------------------------------------------------------------------------------
# Item 7: non-finite inputs at counted tokens give the materialised path's non-finite gradients
# ----------------------------------------------------------------------------------------------


def _nonfinite_cases(value):
    """``{name: (hidden, kernel, bias, weight, targets, options)}`` with ``value`` (NaN or ±inf)
    in one input; ``IGNORED`` rows stay ignored (and finite) for index targets."""
    hidden, kernel, bias, weight, labels = _problem(1)
    rng = np.random.default_rng(2)
    probabilities = jnp.asarray(rng.dirichlet(np.ones(V), N), jnp.float32)
    smooth = (("label_smoothing", 0.1),)
    everything = (*smooth, ("z_loss", 1e-3), ("weight", None))
    return {
        # The record: one NaN kernel entry, probability targets, "sum", chunks of 1.
        "kernel, probabilities": (
            hidden, kernel.at[1, 2].set(value), bias, weight, probabilities, smooth),
        "kernel, index": (hidden, kernel.at[0, 5].set(value), bias, weight, labels, everything),
        "hidden row": (hidden.at[3].set(value), kernel, bias, weight, labels, everything),
        "hidden entry, probabilities": (
            hidden.at[2, 0].set(value), kernel, bias, weight, probabilities, ()),
        "bias": (hidden, kernel, bias.at[6].set(value), weight, labels, smooth),
        # -inf: every logit -inf, no distribution (NaN, as cross_entropy's gradient).
        "every bias": (hidden, kernel, jnp.full_like(bias, value), weight, labels, ()),
    }  # fmt: skip


def _every_case(loss, cases):
    """One jitted function: value and gradients (hidden, kernel, bias, weight) of every case."""

    def run(arrays):
        out = {}
        for name, (h, k, b, w, y, options) in cases.items():
            options = dict(options)
            weighted = "weight" in options

            def f(h, k, b, w, y=y, options=options, weighted=weighted):
                options = dict(options, weight=w if weighted else None)
                return loss(h, k, y, bias=b, **options) + (0 if weighted else 0 * jnp.sum(w))

            out[name] = jax.value_and_grad(f, argnums=(0, 1, 2, 3))(*arrays[name])
        return out

    return jax.jit(run)


# (token_chunk, vocab_chunk, grad_token_chunk): single rows, and slid-back row chunks (N = 7).
NONFINITE_CHUNKINGS = {"single rows": (1, 2, 1), "overlapping rows": (3, 4, 2)}


@pytest.mark.parametrize(
    ("form", "chunking"), _each_once(FORMS, list(NONFINITE_CHUNKINGS)), indirect=["form"]
)
def test_non_finite_inputs_give_the_materialised_non_finite_gradients(form, chunking):
    """``finite_or_zero(lse)`` turned a NaN log-sum-exp into 0 in the backward pass: gradients
    held finite values (up to 4.6e9 in the fuzz records) where the materialised formula's, and
    torch's, are NaN. Every entry now matches autodiff of the materialised formula: NaN, ±inf
    and finite alike. With overlapping row chunks, the hidden gradient of the rows a slid-back
    chunk shares with the previous one got ``0 · inf`` (their quieted logit gradient times an
    infinite kernel entry): NaN where the materialised gradient is ±inf or finite."""
    token_chunk, vocab_chunk, grad_token_chunk = NONFINITE_CHUNKINGS[chunking]
    head = _head(form, token_chunk=token_chunk, vocab_chunk=vocab_chunk,
                 grad_token_chunk=grad_token_chunk)  # fmt: skip
    dense = lambda h, k, y, *, bias, **options: jaxloss.cross_entropy(
        h @ k + bias[None, :], y, reduction="sum", **options
    )  # fmt: skip
    structure = _nonfinite_cases(jnp.nan)
    fused, oracle = _every_case(head, structure), _every_case(dense, structure)
    for value in (jnp.nan, jnp.inf, -jnp.inf):
        arrays = {name: case[:4] for name, case in _nonfinite_cases(value).items()}
        got, want = fused(arrays), oracle(arrays)
        for name in structure:
            for what, g, w in zip(("loss", "hidden", "kernel", "bias", "weight"),
                                  (got[name][0], *got[name][1]), (want[name][0], *want[name][1]),
                                  strict=True):  # fmt: skip
                np.testing.assert_allclose(
                    g, w, rtol=2e-5, atol=1e-6, err_msg=f"{value} in {name}: {what}"
                )


def test_one_pass_fold_is_the_two_pass_fold():
    """The GPUs' and TPUs' fold of blocks (one variadic reduction over two heads, one with a
    weighted sum) gives the running statistics of the two-pass fold block after block: -inf
    columns and rows, very negative logits after an empty start (a rescaled empty sum must stay
    0, not 0 · inf), +inf, NaN, and infinite and NaN weights."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(8, 12)).astype(np.float32) * 30
    z[1, ::2] = -np.inf
    z[2] = -np.inf
    z[3, :4], z[3, 4:] = -np.inf, -1e4  # an empty first block, then far below e^-88
    z[4] = -1e4
    z[5, 6] = np.inf
    z[6, 9] = np.nan
    z[7, :4], z[7, 5] = -np.inf, np.inf
    w = rng.normal(size=z.shape).astype(np.float32)
    w[0, 3], w[1, 1], w[4, 7], w[3, 10] = np.inf, -np.inf, np.nan, np.inf
    w[np.isneginf(z)] = 0  # a weight is 0 where its entry has no probability (as the heads')
    other = z[::-1].copy()
    empty, zero = jnp.full(8, -jnp.inf), jnp.zeros(8)
    folds = (online._fold_in_two_passes, online._fold_in_one_pass)
    runs = dict.fromkeys(folds, ((empty, zero, zero), (empty, zero)))
    for zb, wb, ob in zip(*(np.split(x, 3, axis=1) for x in (z, w, other)), strict=True):
        blocks = ((jnp.asarray(zb), jnp.asarray(wb)), (jnp.asarray(ob),))
        runs = {fold: jax.jit(fold)(tuple(zip(r, blocks, strict=True))) for fold, r in runs.items()}
        want, got = (jax.tree.leaves(r) for r in runs.values())
        assert len(want) == 5
        for a, b in zip(want, got, strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Item 3: bf16 gradients through jax.vmap, every primitive run on its own (jax.disable_jit)
# ----------------------------------------------------------------------------------------------


def _bf16_heads():
    rng = np.random.default_rng(3)
    hidden = jnp.asarray(rng.standard_normal((5, 4)), jnp.bfloat16)
    kernels = jnp.asarray(rng.standard_normal((4, 4, 5)), jnp.bfloat16)
    return hidden, kernels, jnp.array([0, 3, 1, 4, 2])


@pytest.mark.slow  # op by op: ~25 s here
def test_eager_bf16_gradient_through_vmap():
    """The issue's reproducer: eagerly (and op by op, ``jax.disable_jit``) XLA:CPU got the
    vmapped ``hidden^T · ∂ℓ/∂z`` of bf16 operands with float32 accumulation as a dot of its
    own and raised "Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32" (when
    the gradient was read)."""
    h, ks, y = _bf16_heads()

    def total(ks):
        losses = jax.vmap(lambda k: jaxloss.linear_cross_entropy(h, k, y))(ks)
        return jnp.sum(losses).astype(jnp.float32)

    want = jax.jit(jax.grad(total))(ks)
    eager = jax.grad(total)(ks)
    assert eager.dtype == jnp.bfloat16
    _assert_close(eager, want, "bfloat16", "kernel gradient, eager")
    with jax.disable_jit():
        got = jax.grad(total)(ks)
    _assert_close(got, want, "bfloat16", "kernel gradient, op by op")


@pytest.mark.slow  # op by op: ~20 s here
def test_eager_bf16_gradient_of_a_k_dimensional_torch_weight():
    """``torch_linear_cross_entropy`` maps the head over a K-dimensional weight (``jax.vmap``):
    the same crash."""
    h, _, _ = _bf16_heads()
    rng = np.random.default_rng(4)
    weight = jnp.asarray(rng.standard_normal((5, 2, 4)), jnp.bfloat16)  # (C, d_1, in_features)
    targets = jnp.asarray(rng.integers(0, 5, (5, 2)))

    def loss(w):
        return jaxloss.torch_linear_cross_entropy(h, w, targets).astype(jnp.float32)

    want = jax.jit(jax.grad(loss))(weight)
    _assert_close(jax.grad(loss)(weight), want, "bfloat16", "weight gradient, eager")
    with jax.disable_jit():
        got = jax.grad(loss)(weight)
    _assert_close(got, want, "bfloat16", "weight gradient, op by op")
