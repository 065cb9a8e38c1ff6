"""``linear_cross_entropy``: probability targets, ``soft_cap``, ``return_stats``, traced
hyperparameters, and the matmul count of its two differentiable forms.

The oracle is the materialised formula written here: PyTorch's cross-entropy of
``cap(hidden @ kernel + b)`` with ``cap(x) = c·tanh(x/c)`` (plus z-loss); soft-cap gradients
also against a float64 closed form, ``check_grads`` and torch autograd of the same formula.
Both forms are exercised: ``"mean"`` and ``"sum"`` (the gradient formed in the forward pass,
``grad_token_chunk`` rows at a time) and ``"none"`` (recomputing backward), with chunk sizes
that do not divide the problem.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import assert_close_to_scale
from jax.test_util import check_grads

import jaxloss
from benchmarks import hlo

N, D, V = 11, 6, 23
CHUNKS = dict(token_chunk=4, vocab_chunk=7, grad_token_chunk=3)


def _problem(seed=0, dtype=jnp.float32, probabilities=False):
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((N, D))
    kernel = (3 / np.sqrt(D)) * rng.standard_normal((D, V))
    bias = rng.standard_normal(V)
    weight = rng.uniform(0.2, 2.0, V)
    if probabilities:
        targets = jnp.asarray(rng.dirichlet(np.full(V, 0.3), N), dtype)
    else:
        labels = rng.integers(0, V, N)
        labels[[2, 7]] = -100
        targets = jnp.asarray(labels, jnp.int32)
    return (*(jnp.asarray(a, dtype) for a in (hidden, kernel, bias, weight)), targets)


def _capped(hidden, kernel, bias, soft_cap):
    z = hidden @ kernel + bias[None, :]
    return z if soft_cap is None else soft_cap * jnp.tanh(z / soft_cap)


def _materialised(
    hidden, kernel, targets, *, bias, weight, soft_cap=None, reduction="mean", ignore_index=-100,
    label_smoothing=0.0, z_loss=0.0,
):  # fmt: skip
    """PyTorch's cross_entropy of the capped logits, written out (plus z-loss λ·lse²)."""
    z = _capped(hidden, kernel, bias, soft_cap)
    v = z.shape[1]
    w = jnp.ones((v,)) if weight is None else weight
    log_p = jax.nn.log_softmax(z, axis=1)
    lse = jax.nn.logsumexp(z, axis=1)
    if jnp.issubdtype(targets.dtype, jnp.floating):
        t = (1 - label_smoothing) * targets + label_smoothing / v
        loss = -jnp.sum(w[None, :] * t * log_p, 1) + z_loss * lse**2
        denominator = loss.shape[0]
    else:
        valid = targets != ignore_index
        bad = valid & ((targets < 0) | (targets >= v))
        safe = jnp.clip(targets, 0, v - 1)
        picked = jnp.take_along_axis(log_p, safe[:, None], 1)[:, 0]
        smooth = -jnp.sum(w[None, :] * log_p, 1) / v
        loss = (1 - label_smoothing) * -w[safe] * picked + label_smoothing * smooth
        loss = jnp.where(valid & ~bad, loss + z_loss * lse**2, 0)
        # A bad target: NaN in value and in the gradient of its row's logits (cross_entropy's).
        loss = loss + jnp.where(bad, jnp.nan, 0) * lse
        denominator = jnp.sum(jnp.where(valid, w[safe], 0))
    if reduction == "none":
        return loss
    return jnp.sum(loss) if reduction == "sum" else jnp.sum(loss) / denominator


@functools.partial(jax.jit, static_argnums=(0,))
def _value_and_grads(loss_fn, hidden, kernel, bias, weight, targets, cotangent):
    value, vjp = jax.vjp(
        lambda h, k, b, w: loss_fn(h, k, targets, bias=b, weight=w), hidden, kernel, bias, weight
    )
    return value, vjp(cotangent.reshape(value.shape).astype(value.dtype))


def _compare(options, probabilities=False, rtol=3e-5):
    hidden, kernel, bias, weight, targets = _problem(probabilities=probabilities)
    cotangent = jnp.asarray(np.random.default_rng(5).standard_normal(N), jnp.float32)
    if options.get("reduction", "mean") != "none":
        cotangent = cotangent[:1]
    fused = functools.partial(jaxloss.linear_cross_entropy, **CHUNKS, **options)
    dense = functools.partial(_materialised, **options)
    got = _value_and_grads(fused, hidden, kernel, bias, weight, targets, cotangent)
    want = _value_and_grads(dense, hidden, kernel, bias, weight, targets, cotangent)
    names = ("loss", "d hidden", "d kernel", "d bias", "d weight")
    for name, g, w in zip(names, (got[0], *got[1]), (want[0], *want[1]), strict=True):
        assert_close_to_scale(g, w, rtol, name)  # NaN: a bad target's row, in both


PROBABILITY_OPTIONS = {
    "mean": {},
    "none-smoothing-z_loss": {"reduction": "none", "label_smoothing": 0.1, "z_loss": 0.01},
    "mean-soft_cap": {"soft_cap": 2.5, "label_smoothing": 0.05},
}


@pytest.mark.parametrize("name", PROBABILITY_OPTIONS)
def test_probability_targets_match_materialised(name):
    _compare(PROBABILITY_OPTIONS[name], probabilities=True)


SOFT_CAP_OPTIONS = {
    "none-everything": {
        "soft_cap": 3.0,
        "reduction": "none",
        "label_smoothing": 0.2,
        "z_loss": 0.05,
        "ignore_index": 4,
    },
    "sum-smoothing-z_loss": {
        "soft_cap": 0.7,
        "reduction": "sum",
        "label_smoothing": 0.1,
        "z_loss": 0.1,
    },
}


@pytest.mark.parametrize("name", SOFT_CAP_OPTIONS)
def test_soft_cap_matches_materialised(name):
    _compare(SOFT_CAP_OPTIONS[name])


def _soft_cap_closed_form(hidden, kernel, bias, labels, c):
    """float64 NumPy: the summed loss and its gradients, (softmax − onehot)·(1 − tanh²)."""
    h, k, b, y = (np.asarray(a) for a in (hidden, kernel, bias, labels))
    x = h @ k + b
    z = c * np.tanh(x / c)
    lse = np.log(np.sum(np.exp(z - z.max(1, keepdims=True)), 1)) + z.max(1)
    valid = y != -100
    safe = np.where(valid, y, 0)
    loss = np.sum(np.where(valid, lse - z[np.arange(len(y)), safe], 0))
    g_z = np.exp(z - lse[:, None])
    g_z[np.arange(len(y)), safe] -= 1
    g_x = np.where(valid[:, None], g_z, 0) * (1 - np.tanh(x / c) ** 2)
    return loss, (g_x @ k.T, h.T @ g_x, g_x.sum(0))


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_soft_cap_float64_closed_form_and_check_grads(reduction):
    with jax.enable_x64(True):
        hidden, kernel, bias, weight, targets = _problem(dtype=jnp.float64)

        def loss(h, k, b):
            out = jaxloss.linear_cross_entropy(
                h, k, targets, bias=b, soft_cap=2.0, reduction=reduction, **CHUNKS
            )
            return jnp.sum(out)

        want, want_grads = _soft_cap_closed_form(hidden, kernel, bias, targets, 2.0)
        value, grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(hidden, kernel, bias)
        np.testing.assert_allclose(value, want, rtol=1e-12)
        for g, w in zip(grads, want_grads, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)

        def everything(h, k, b, w):
            out = jaxloss.linear_cross_entropy(
                h, k, targets, bias=b, weight=w, soft_cap=1.3, label_smoothing=0.2, z_loss=0.05,
                reduction=reduction, **CHUNKS,
            )  # fmt: skip
            return jnp.sum(out)

        if reduction == "sum":  # the fused form; "none" is the recomputing one, also checked below
            check_grads(
                jax.jit(everything), (hidden, kernel, bias, weight), order=1, modes=("rev",)
            )


def test_soft_cap_matches_torch_autograd_of_the_formula():
    with jax.enable_x64(True):
        hidden, kernel, bias, weight, targets = _problem(dtype=jnp.float64)
        c, smoothing = 1.7, 0.15
        t = {k: torch.tensor(np.asarray(a), requires_grad=True) for k, a in
             (("h", hidden), ("k", kernel), ("b", bias))}  # fmt: skip
        z = c * torch.tanh((t["h"] @ t["k"] + t["b"]) / c)
        want = torch.nn.functional.cross_entropy(
            z, torch.tensor(np.asarray(targets, np.int64)), weight=torch.tensor(np.asarray(weight)),
            label_smoothing=smoothing,
        )  # fmt: skip
        want.backward()

        def loss(h, k, b):
            return jaxloss.linear_cross_entropy(
                h, k, targets, bias=b, weight=weight, soft_cap=c, label_smoothing=smoothing,
                **CHUNKS,
            )  # fmt: skip

        value, grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(hidden, kernel, bias)
        np.testing.assert_allclose(value, want.item(), rtol=1e-12)
        for g, name in zip(grads, "hkb", strict=True):
            np.testing.assert_allclose(g, t[name].grad.numpy(), rtol=1e-10, atol=1e-13)


def test_traced_hyperparameters_compile_once():
    hidden, kernel, bias, _, targets = _problem()
    traces = []

    @jax.jit
    def step(c, smoothing, z_loss):
        traces.append(None)
        return jax.grad(
            lambda k: jaxloss.linear_cross_entropy(
                hidden, k, targets, bias=bias, soft_cap=c, label_smoothing=smoothing,
                z_loss=z_loss, **CHUNKS,
            )
        )(kernel)  # fmt: skip

    for c, smoothing in ((1.0, 0.0), (5.0, 0.3)):
        got = step(jnp.float32(c), jnp.float32(smoothing), jnp.float32(1e-3))
        want = jax.grad(
            lambda k: _materialised(hidden, k, targets, bias=bias, weight=None, soft_cap=c,
                                    label_smoothing=smoothing, z_loss=1e-3)
        )(kernel)  # fmt: skip
        np.testing.assert_allclose(got, want, rtol=3e-5, atol=3e-6)
    assert len(traces) == 1


@pytest.mark.parametrize(
    "name, value, error",
    [("soft_cap", 0.0, ValueError), ("soft_cap", -1.0, ValueError), ("soft_cap", "2", TypeError),
     ("label_smoothing", 1.5, ValueError), ("z_loss", -0.1, ValueError)],
)  # fmt: skip
def test_hyperparameter_misuse(name, value, error):
    hidden, kernel, _, _, targets = _problem()
    # With the suite's jaxtyping hook on, a wrong type is caught first by jaxtyping ("parameter").
    with pytest.raises(error, match=f"`{name}`|parameter '{name}'"):
        jaxloss.linear_cross_entropy(hidden, kernel, targets, **{name: value})


# ----------------------------------------------------------------------------------------------
# return_stats
# ----------------------------------------------------------------------------------------------


def _reference_stats(z, labels):
    lse = jax.nn.logsumexp(z, axis=1)
    entropy = -jnp.sum(jax.nn.softmax(z) * jax.nn.log_softmax(z), axis=1)
    correct = (jnp.argmax(z, axis=1) == labels) & (labels != -100)
    return lse, correct, entropy


def _tied_problem():
    """Classes 3 and 17 (different vocabulary chunks) tie for the largest logit in every row."""
    hidden, kernel, bias, weight, targets = _problem()
    kernel = kernel.at[:, 17].set(kernel[:, 3])
    bias = bias.at[3].set(20.0).at[17].set(20.0)
    targets = targets.at[jnp.array([0, 1, 4])].set(3).at[jnp.array([5, 6])].set(17)
    return hidden, kernel, bias, weight, targets


@pytest.mark.parametrize("reduction, soft_cap", [("none", None), ("mean", 4.0)])
def test_stats_match_materialised(reduction, soft_cap):
    hidden, kernel, bias, weight, targets = _tied_problem()
    loss, stats = jaxloss.linear_cross_entropy(
        hidden, kernel, targets, bias=bias, weight=weight, reduction=reduction,
        soft_cap=soft_cap, return_stats=True, **CHUNKS,
    )  # fmt: skip
    assert isinstance(stats, jaxloss.LogitStats)
    z = _capped(hidden, kernel, bias, soft_cap)
    want_lse, want_correct, want_entropy = _reference_stats(z, targets)
    assert stats.correct.dtype == jnp.bool_ and stats.correct.shape == (N,)
    np.testing.assert_array_equal(stats.correct, want_correct)
    assert bool(stats.correct[0]) and not bool(stats.correct[5])  # the tie goes to class 3
    np.testing.assert_array_equal(stats.argmax, jnp.argmax(z, axis=1))
    assert stats.argmax.dtype == jnp.int32 and bool(jnp.all(stats.argmax == 3))
    assert not bool(stats.correct[2]) and not bool(stats.correct[7])  # ignored positions
    np.testing.assert_allclose(stats.lse, want_lse, rtol=1e-6)
    np.testing.assert_allclose(stats.entropy, want_entropy, rtol=1e-4, atol=1e-5)
    plain = jaxloss.linear_cross_entropy(
        hidden, kernel, targets, bias=bias, weight=weight, reduction=reduction,
        soft_cap=soft_cap, **CHUNKS,
    )  # fmt: skip
    np.testing.assert_allclose(loss, plain, rtol=1e-6)


def test_stats_of_probability_targets_and_batch_shape():
    hidden, kernel, bias, _, probs = _problem(probabilities=True)
    h3, p3 = hidden[:10].reshape(2, 5, D), probs[:10].reshape(2, 5, V)
    _, stats = jaxloss.linear_cross_entropy(h3, kernel, p3, bias=bias, return_stats=True, **CHUNKS)
    assert stats.lse.shape == stats.correct.shape == stats.entropy.shape == (2, 5)
    z = hidden[:10] @ kernel + bias[None, :]
    want = jnp.argmax(z, 1) == jnp.argmax(probs[:10], 1)
    np.testing.assert_array_equal(stats.correct.reshape(-1), want)


def test_stats_are_not_differentiated():
    hidden, kernel, bias, _, targets = _problem()

    def logged(k):
        _, stats = jaxloss.linear_cross_entropy(
            hidden, k, targets, bias=bias, return_stats=True, **CHUNKS
        )
        return jnp.sum(stats.entropy) + jnp.sum(stats.lse)

    grad = jax.jit(jax.grad(logged))(kernel)
    np.testing.assert_array_equal(grad, jnp.zeros_like(grad))


# ----------------------------------------------------------------------------------------------
# The two differentiable forms: matmul counts (deterministic, from the jaxpr)
# ----------------------------------------------------------------------------------------------


def _matmuls(fn, *args) -> int:
    """N·D·V matmuls of ``fn`` as lowered for this machine's CPU (one platform's branch)."""
    return jax.jit(fn).lower(*args).as_text().count("stablehlo.dot_general")


def test_matmul_counts_of_each_form(accelerator_forms):
    """value_and_grad on CPU: 3 N·D·V matmuls for "mean" (gradient in the forward pass), 4 for
    "none" (the backward recomputes the logits); a forward-only call does 1. The recomputing
    form GPUs and TPUs take for "mean": 4 in float32, 5 in bf16 (the hidden gradient's own
    pass)."""
    hidden, kernel, _, _, targets = _problem()

    def loss(reduction):
        return lambda h, k: jnp.sum(
            jaxloss.linear_cross_entropy(h, k, targets, reduction=reduction, **CHUNKS)
        )

    assert _matmuls(jax.value_and_grad(loss("mean"), (0, 1)), hidden, kernel) == 3
    assert _matmuls(jax.value_and_grad(loss("none"), (0, 1)), hidden, kernel) == 4
    low = (hidden.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
    assert _matmuls(jax.value_and_grad(loss("none"), (0, 1)), *low) == 5
    accelerator_forms(recompute=True)
    assert _matmuls(jax.value_and_grad(loss("mean"), (0, 1)), hidden, kernel) == 4
    assert _matmuls(jax.value_and_grad(loss("mean"), (0, 1)), *low) == 5
    assert _matmuls(loss("mean"), hidden, kernel) == 1


# ----------------------------------------------------------------------------------------------
# implementation= (issue 17 item 3): the one table in jaxloss/_implementations.py
# ----------------------------------------------------------------------------------------------


def _heads(implementation):
    """``{name: () -> loss}``: the three fused heads with ``implementation``."""
    hidden, kernel, _, _, targets = _problem()
    return {
        "linear_cross_entropy": lambda: jaxloss.linear_cross_entropy(
            hidden, kernel, targets, implementation=implementation
        ),
        "torch_linear_cross_entropy": lambda: jaxloss.torch_linear_cross_entropy(
            hidden, kernel.T, targets, implementation=implementation
        ),
        "linear_distillation": lambda: jaxloss.linear_distillation(
            hidden, kernel, hidden, kernel, implementation=implementation
        ),
    }


@pytest.mark.parametrize("name", ["linear_cross_entropy", "torch_linear_cross_entropy",
                                  "linear_distillation"])  # fmt: skip
def test_pallas_without_a_kernel_names_the_function_backend_and_what_exists(name):
    """Where a head has no Pallas kernel on this backend, ``"pallas"`` says so, naming the
    function, the backend and the kernels that do exist; an unknown name is refused too.
    linear_distillation has none anywhere (said at call time); linear_cross_entropy (and the
    torch form, which runs it) has the TPU kernels (said when the program is lowered)."""
    if name == "linear_distillation":
        message = rf"^{name}: implementation='pallas' has no kernel on the cpu backend.*"
        message += r"cross_entropy on tpu.*'xla'"
    else:
        message = r"linear_cross_entropy: implementation='pallas' has no kernel for the cpu "
        message += r"backend \(Pallas kernels exist for: tpu\).*'xla'"
    with pytest.raises(ValueError, match=message):
        _heads("pallas")[name]()
    with pytest.raises((ValueError, TypeError), match="implementation"):
        _heads("triton")[name]()


@pytest.mark.parametrize("name", ["linear_cross_entropy", "linear_distillation"])
def test_default_is_the_xla_form_on_cpu(name):
    """``None`` resolves to the XLA form on CPU (the same optimised program as ``"xla"``) and
    on GPUs, per the table; linear_cross_entropy takes its Pallas kernels on TPUs (where Mosaic
    may lower them: tests/test_linear_pallas_tpu.py compiles both cases)."""
    from jaxloss import _implementations

    kernels = {"linear_cross_entropy": {"tpu"}, "linear_distillation": set()}[name]
    table = _implementations.DEFAULTS[name]
    assert {p for p, impl in table.items() if impl == "pallas"} == kernels
    assert {impl for p, impl in table.items() if p not in kernels} == {"xla"}
    hidden, kernel, _, _, targets = _problem()
    loss = {
        "linear_cross_entropy": lambda impl: (
            lambda h, k: jaxloss.linear_cross_entropy(h, k, targets, implementation=impl)
        ),
        "linear_distillation": lambda impl: (
            lambda h, k: jaxloss.linear_distillation(h, k, hidden, kernel, implementation=impl)
        ),
    }[name]
    programs = [
        jax.jit(jax.value_and_grad(loss(impl), (0, 1))).lower(hidden, kernel).compile().as_text()
        for impl in (None, "xla")
    ]
    assert hlo.anonymous(programs[0]) == hlo.anonymous(programs[1])


@pytest.mark.parametrize("name", ["linear_cross_entropy", "linear_distillation"])
def test_a_registered_kernel_plugs_into_the_seam(name, monkeypatch):
    """The seam a Pallas kernel plugs into: registered for a backend in ``LINEAR_KERNELS``, it
    gets the XLA form's operands; ``"pallas"`` takes it, ``None`` only where ``DEFAULTS`` names
    it, ``"xla"`` never."""
    from jaxloss import _implementations
    from jaxloss._linear import api

    calls = []

    def kernel(*operands):  # stands in for a kernel: the XLA form's result plus 1000
        calls.append(len(operands))
        xla = {"linear_cross_entropy": api._single_device, "linear_distillation": None}[name]
        if xla is None:
            from jaxloss import _distillation

            return _distillation._loss(*operands) + 1000
        loss, stats = xla(*operands)
        return loss + 1000, stats

    def run(impl):
        api._linear_cross_entropy.clear_cache()  # pyright: ignore[reportFunctionMemberAccess]
        jaxloss.linear_distillation.clear_cache()  # pyright: ignore[reportFunctionMemberAccess]
        return float(_heads(impl)[name]())

    monkeypatch.setitem(_implementations.LINEAR_KERNELS, name, {"cpu": kernel})
    xla, pallas, default = run("xla"), run("pallas"), run(None)
    assert pallas == pytest.approx(xla + 1000) and default == xla and calls
    monkeypatch.setitem(_implementations.DEFAULTS, name, {"cpu": "pallas"})
    assert run(None) == pytest.approx(xla + 1000)
    monkeypatch.undo()
    run("xla")  # no patched program left in the caches
