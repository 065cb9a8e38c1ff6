"""Tests for the classification family: ``jaxloss.nll``, ``cross_entropy`` and ``check_targets``.

Oracles, independent of one another:

* golden arrays computed by PyTorch (``tests/golden/classification.npz``, values and input
  gradients over the whole grid of shapes, weights, ``ignore_index``, reductions, label smoothing,
  index/probability targets), checked without torch: float32 in both layouts, float64 on one
  shape; the plain (forward-only) call and the value under ``jax.vjp`` separately;
* live PyTorch (values, autograd gradients, Hessians) when torch is importable;
* closed-form gradients and Hessians in float64, and ``jax.test_util.check_grads``;
* a float64 NumPy reference and algebraic identities (hypothesis property tests);
* PyTorch's documented reference figures.

The grid evaluation is batched into one jitted program per (shape, layout, dtype) so that the
few hundred grid cases cost a handful of compilations.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental import checkify
from jax.test_util import check_grads

import jaxloss

GOLDEN_DIR = Path(__file__).parent / "golden"
GOLDEN_FILE = GOLDEN_DIR / "classification.npz"


def _load_generator():
    """The golden generator as a module: the single source of the grid (it imports torch lazily)."""
    spec = importlib.util.spec_from_file_location(
        "_gen_classification", GOLDEN_DIR / "gen_classification.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _load_generator()
SHAPES: dict[str, tuple[int, ...]] = GEN.SHAPES
CASES: list[tuple[str, ...]] = list(GEN.grid())
INPUT_NAMES = ("logits", "targets_m100", "targets_1", "probs", "weight", "cot")
LAYOUTS = {"axis1": 1, "classes_last": -1}
RTOL = {"float32": 1e-5, "float64": 1e-11}

# Property tests compile a fresh program for most examples; keep them few and unhurried.
PROPERTY = settings(max_examples=6, deadline=None, database=None)
# For the properties whose examples cost most (eager op-by-op runs, torch plus a compile).
PROPERTY_FEW = settings(PROPERTY, max_examples=4)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def assert_close(actual, expected, rtol: float, what: str = "", floor: float = 0.0) -> None:
    """Elementwise ``rtol``, plus an absolute floor of ``rtol`` times the array's largest entry
    (or times ``floor``, the size of the terms that cancel, where that is larger).

    The floor is what a float computation of ``a·p − b`` can promise for entries that cancel to
    near zero; NaN must match NaN exactly.
    """
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    finite = expected[np.isfinite(expected)]
    scale = max(float(np.max(np.abs(finite))) if finite.size else 0.0, floor)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, err_msg=what)


def np_log_softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    z = np.asarray(z, np.float64)
    shifted = z - np.max(z, axis, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis, keepdims=True))


def np_logsumexp(z: np.ndarray, axis: int = -1) -> np.ndarray:
    z = np.asarray(z, np.float64)
    m = np.max(z, axis, keepdims=True)
    return np.squeeze(m + np.log(np.sum(np.exp(z - m), axis, keepdims=True)), axis)


def np_reduce(loss: np.ndarray, reduction: str, denominator: float) -> np.ndarray:
    if reduction == "none":
        return loss
    total = np.sum(loss)
    if reduction == "sum":
        return total
    return total / denominator if denominator else np.float64(np.nan)


def np_cross_entropy(
    z, y, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0
) -> np.ndarray:
    """PyTorch's cross-entropy formula (plus the documented z-loss) in float64, classes last."""
    z = np.asarray(z, np.float64)
    y = np.asarray(y)
    c = z.shape[-1]
    logp = np_log_softmax(z)
    w = np.ones(c) if weight is None else np.asarray(weight, np.float64)
    valid = y != ignore_index
    safe = np.where(valid, y, 0)
    w_y = np.where(valid, w[safe], 0.0)
    picked = np.take_along_axis(logp, safe[..., None], -1)[..., 0]
    loss = -(1 - label_smoothing) * w_y * picked
    loss = loss - label_smoothing / c * np.sum(w * logp, -1)
    loss = loss + z_loss * np_logsumexp(z) ** 2
    return np_reduce(np.where(valid, loss, 0.0), reduction, np.sum(w_y))


def np_nll(x, y, *, weight=None, ignore_index=-100, reduction="mean") -> np.ndarray:
    """PyTorch's nll_loss in float64, classes last."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y)
    w = np.ones(x.shape[-1]) if weight is None else np.asarray(weight, np.float64)
    valid = y != ignore_index
    safe = np.where(valid, y, 0)
    w_y = np.where(valid, w[safe], 0.0)
    loss = -w_y * np.take_along_axis(x, safe[..., None], -1)[..., 0]
    return np_reduce(np.where(valid, loss, 0.0), reduction, np.sum(w_y))


def value_and_sum_grad(fun, *args):
    """``fun(*args)`` and the gradient of ``sum(fun(*args))`` in ``args[0]``, in one program.

    Both the plain call and the differentiated call are exercised: they are different kernels.
    """
    grad = jax.grad(lambda x, *rest: jnp.sum(fun(x, *rest)))
    return jax.jit(lambda *a: (fun(*a), grad(*a)))(*args)


def random_index_problem(seed: int, n: int, c: int, ignore_fraction: float = 0.3):
    """Logits ``(n, c)``, index targets with about ``ignore_fraction`` set to -100, weights."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=2.0, size=(n, c))
    y = rng.integers(0, c, size=n)
    y = np.where(rng.random(n) < ignore_fraction, -100, y)
    return z, y, rng.uniform(0.5, 2.0, size=c)


def random_probs(seed: int, shape: tuple[int, ...], zero_fraction: float = 0.0) -> np.ndarray:
    """Probability vectors along the last axis, with about ``zero_fraction`` exact zeros."""
    rng = np.random.default_rng(seed)
    raw = np.exp(rng.normal(size=shape)) * (rng.random(shape) >= zero_fraction)
    raw[..., 0] += 0.1  # never an all-zero row
    return raw / raw.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------------------------
# The grid, evaluated in one jitted program
# ----------------------------------------------------------------------------------------------


def _case_loss(case, targets_m100, targets_1, probs, weight, axis):
    """The jaxloss function of the logits for one grid case."""
    fn, kind, w, ii, reduction, ls = case
    kwargs = {"weight": weight if w == "w1" else None, "reduction": reduction, "axis": axis}
    smoothing = GEN.SMOOTHINGS[ls]
    if kind == "prob":
        return lambda z: jaxloss.cross_entropy(z, probs, label_smoothing=smoothing, **kwargs)
    targets = targets_m100 if ii == "iim100" else targets_1
    kwargs["ignore_index"] = GEN.IGNORE[ii]
    if fn == "ce":
        return lambda z: jaxloss.cross_entropy(z, targets, label_smoothing=smoothing, **kwargs)
    return lambda z: jaxloss.nll(z, targets, **kwargs)


@functools.partial(jax.jit, static_argnames="axis")
def evaluate_grid(logits, targets_m100, targets_1, probs, weight, cot, *, axis):
    """Every grid case's value and input gradient (of ``sum(loss * cot)`` for ``"none"``).

    For ``"none"`` the value also comes from a plain call: the forward-only kernel differs from the
    differentiated one, while the reductions after it are shared (and checked under ``vjp``).
    """
    out = {}
    for case in CASES:
        loss = _case_loss(case, targets_m100, targets_1, probs, weight, axis)
        value, vjp = jax.vjp(loss, logits)
        if case[4] == "none":
            out["__".join(case)] = (loss(logits), value, vjp(cot.astype(value.dtype))[0])
        else:
            out["__".join(case)] = (value, value, vjp(jnp.ones((), value.dtype))[0])
    return out


def run_grid(inputs: dict[str, np.ndarray], layout: str, dtype: str) -> dict:
    """Evaluates the grid on PyTorch-layout ``inputs``; gradients come back in PyTorch layout."""
    axis = LAYOUTS[layout]
    args = {k: np.asarray(v) for k, v in inputs.items()}
    for name in ("logits", "probs", "weight", "cot"):
        args[name] = args[name].astype(dtype)
    if axis == -1:
        args["logits"] = np.moveaxis(args["logits"], 1, -1)
        args["probs"] = np.moveaxis(args["probs"], 1, -1)
    with jax.enable_x64(dtype == "float64"):
        out = evaluate_grid(*(args[k] for k in INPUT_NAMES), axis=axis)
        out = jax.tree.map(np.asarray, out)
    for key, (plain, value, grad) in out.items():
        assert plain.dtype == value.dtype == grad.dtype == np.dtype(dtype), key
        if axis == -1:
            out[key] = (plain, value, np.moveaxis(grad, -1, 1))
    return out


# ----------------------------------------------------------------------------------------------
# Golden arrays (PyTorch, committed): checked without torch
# ----------------------------------------------------------------------------------------------


@functools.cache
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN_FILE) as data:
        return dict(data)


@functools.cache
def golden_results(shape: str, layout: str, dtype: str) -> dict:
    inputs = {k: golden()[f"{shape}__{k}"] for k in INPUT_NAMES}
    return run_grid(inputs, layout, dtype)


def test_golden_file_covers_the_grid_and_is_small():
    keys = set(golden())
    expected = {"torch_version"}
    for shape in SHAPES:
        expected |= {f"{shape}__{k}" for k in INPUT_NAMES}
        for case in CASES:
            base = "__".join((case[0], shape, *case[1:]))
            expected |= {f"{base}__value", f"{base}__grad"}
    assert keys == expected
    assert GOLDEN_FILE.stat().st_size < 2_000_000
    for shape, dims in SHAPES.items():
        assert golden()[f"{shape}__logits"].shape == dims
        assert golden()[f"{shape}__logits"].dtype == np.float64
        # Both ignore settings really ignore something and keep something.
        for name, ignore_index in (("targets_m100", -100), ("targets_1", 1)):
            ignored = golden()[f"{shape}__{name}"] == ignore_index
            assert ignored.any() and not ignored.all()


# Each run is one large compilation, the dominant cost of this file. float32 in both layouts (for
# the 2-D shapes classes-last *is* axis 1, so once); float64 (to ~1e-11) on the richest shape.
GOLDEN_RUNS = [("float32", s, "axis1") for s in SHAPES]
GOLDEN_RUNS += [("float32", s, "classes_last") for s in SHAPES if len(SHAPES[s]) > 2]
GOLDEN_RUNS += [("float64", "4d", "axis1")]
# The default run compiles the 4-d grid once, classes last (every case; axis=1 against torch is in
# test_torch_parity_fresh_random_grid and the closed form). The other runs repeat every check in
# the other layout, on other shapes or in float64, a large compile each (~45 s here): slow.
GOLDEN_DEFAULT = {("float32", "4d", "classes_last")}


def _golden_param(run: tuple[str, str, str], values: tuple[str, ...]):
    marks = () if run in GOLDEN_DEFAULT else pytest.mark.slow
    return pytest.param(*values, marks=marks, id="-".join(values))


@pytest.mark.parametrize("case", CASES, ids="-".join)
@pytest.mark.parametrize(("dtype", "shape", "layout"), [_golden_param(r, r) for r in GOLDEN_RUNS])
def test_golden_torch_values_and_gradients(dtype, shape, layout, case):
    base = "__".join((case[0], shape, *case[1:]))
    plain, value, grad = golden_results(shape, layout, dtype)["__".join(case)]
    expected_value = golden()[f"{base}__value"]
    expected_grad = golden()[f"{base}__grad"]
    assert np.all(np.isfinite(expected_value)) and np.all(np.isfinite(expected_grad))
    assert_close(plain, expected_value, RTOL[dtype], f"{base} value (plain call)")
    assert_close(value, expected_value, RTOL[dtype], f"{base} value (under vjp)")
    assert_close(grad, expected_grad, RTOL[dtype], f"{base} grad")


# ----------------------------------------------------------------------------------------------
# PyTorch reference figures (documented values)
# ----------------------------------------------------------------------------------------------

REF_Z = np.array([[1.0, 2.0], [1.0, 3.0], [1.0, 3.0]], np.float32)
REF_Y = np.array([0, 1, 1])


@pytest.mark.parametrize(
    ("reduction", "expected"),
    [("none", [1.3133, 0.1269, 0.1269]), ("sum", 1.5671), ("mean", 0.5224)],
)
def test_reference_figures_cross_entropy(reduction, expected):
    out = jaxloss.cross_entropy(REF_Z, REF_Y, reduction=reduction)
    np.testing.assert_allclose(out, expected, atol=5e-5)


def test_reference_figure_weighted_mean():
    out = jaxloss.cross_entropy(REF_Z, REF_Y, weight=np.array([1.0, 2.0], np.float32))
    np.testing.assert_allclose(out, 0.3642, atol=5e-5)


@pytest.mark.parametrize(
    ("reduction", "expected"), [("none", [-1.0, -3.0, -3.0]), ("mean", -2.3333)]
)
def test_reference_figures_nll(reduction, expected):
    np.testing.assert_allclose(jaxloss.nll(REF_Z, REF_Y, reduction=reduction), expected, atol=5e-5)


def test_reference_figures_pytorch_layout():
    # The same figures with the classes on axis 1 of a (N, C, 1) input.
    out = jaxloss.cross_entropy(REF_Z[:, :, None], REF_Y[:, None], reduction="none", axis=1)
    np.testing.assert_allclose(out[:, 0], [1.3133, 0.1269, 0.1269], atol=5e-5)


# ----------------------------------------------------------------------------------------------
# Live PyTorch parity (skipped without torch)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "layout"),
    [_golden_param(run, run[1:]) for run in GOLDEN_RUNS if run[0] == "float32"],
)
def test_torch_parity_fresh_random_grid(shape, layout):
    """Fresh random data (not the golden's) through the whole grid, float32 vs torch float64."""
    pytest.importorskip("torch")
    seed = zlib_seed(shape, layout)
    inputs = GEN.make_inputs(SHAPES[shape], np.random.default_rng(seed))
    ours = run_grid(inputs, layout, "float32")
    failures = []
    for case in CASES:
        expected_value, expected_grad = GEN.torch_case(inputs, *case)
        plain, value, grad = ours["__".join(case)]
        checks = [("plain value", plain, expected_value), ("vjp value", value, expected_value)]
        for what, a, b in [*checks, ("grad", grad, expected_grad)]:
            try:
                assert_close(a, b, RTOL["float32"], f"{case} {what}")
            except AssertionError as err:
                failures.append(str(err))
    assert not failures, "\n".join(failures)


def zlib_seed(*parts: str) -> int:
    """A seed that is stable across runs (``hash`` of a str is salted per process)."""
    return zlib.crc32("/".join(parts).encode())


@PROPERTY_FEW
@given(
    seed=st.integers(0, 2**31 - 1),
    shape=st.sampled_from([(3,), (2, 3), (3, 4, 2), (2, 5, 2, 3)]),
    weighted=st.booleans(),
    ignore_index=st.sampled_from([-100, 1]),
    reduction=st.sampled_from(GEN.REDUCTIONS),
    label_smoothing=st.sampled_from([0.0, 0.15, 1.0]),
    soft=st.booleans(),
)
def test_torch_parity_property(
    seed, shape, weighted, ignore_index, reduction, label_smoothing, soft
):
    """Random ranks (including 1-D logits with a scalar target) and settings vs torch autograd."""
    torch = pytest.importorskip("torch")
    f = torch.nn.functional
    rng = np.random.default_rng(seed)
    c = shape[0] if len(shape) == 1 else shape[1]
    z = rng.normal(scale=3.0, size=shape)
    target_shape = shape[:0] if len(shape) == 1 else shape[:1] + shape[2:]
    weight = rng.uniform(0.5, 2.0, size=c) if weighted else None
    if soft:
        y = np.moveaxis(random_probs(seed, (*target_shape, c), 0.3), -1, min(1, len(shape) - 1))
    else:
        y = rng.integers(0, c, size=target_shape)
        if y.size > 1:  # keep at least one position, ignore about a third of the rest
            y.reshape(-1)[1:][rng.random(y.size - 1) < 0.3] = ignore_index
    cot = rng.normal(size=target_shape)
    kwargs = {"reduction": reduction, "label_smoothing": label_smoothing}
    if not soft:
        kwargs["ignore_index"] = ignore_index

    zt = torch.tensor(z, requires_grad=True)
    wt = None if weight is None else torch.tensor(weight)
    loss_t = f.cross_entropy(zt, torch.tensor(y), weight=wt, **kwargs)
    loss_t.backward(torch.tensor(cot) if reduction == "none" else None)

    axis = 1 if len(shape) > 1 else -1
    fun = lambda x: jaxloss.cross_entropy(x, y, weight=weight, axis=axis, **kwargs)
    weighted_sum = lambda x, c: jnp.sum(fun(x) * c)
    z32, cot32 = np.float32(z), np.float32(cot if reduction == "none" else 1.0)
    plain, (value, grad) = jax.jit(lambda x, c: (fun(x), jax.value_and_grad(weighted_sum)(x, c)))(
        z32, cot32
    )
    # Each loss is lse(z) − z_y (smoothed: a weighted sum of such gaps), float32 against torch's
    # float64: a loss near 0 keeps float32's error of terms the size of the logits.
    terms = np.max(np.abs(z)) * (1.0 if weight is None else np.max(weight))
    floor = terms * (max(y.size, 1) if reduction == "sum" else 1)
    assert_close(plain, loss_t.detach().numpy(), 1e-5, "value", floor=floor)
    assert_close(value, np.sum(np.float64(plain) * cot32), 1e-5, "value under grad")
    assert_close(grad, zt.grad.numpy(), 1e-5, "grad")


def test_torch_parity_nll_one_dimensional():
    torch = pytest.importorskip("torch")
    x = np.array([-0.3, -2.0, -1.5])
    for target in (0, 2):
        expected = torch.nn.functional.nll_loss(torch.tensor(x), torch.tensor(target))
        out = jaxloss.nll(x.astype(np.float32), np.int32(target))
        assert out.shape == ()
        np.testing.assert_allclose(out, expected.numpy(), rtol=1e-6)


@pytest.mark.parametrize("soft", [False, True], ids=["index", "probs"])
def test_torch_parity_hessian(soft):
    torch = pytest.importorskip("torch")
    f = torch.nn.functional
    z, y, w = random_index_problem(3, 4, 5)
    if soft:
        y = random_probs(4, z.shape, 0.3)
    kwargs = {"weight": w, "label_smoothing": 0.15}
    if not soft:
        kwargs["ignore_index"] = -100
    torch_kwargs = {**kwargs, "weight": torch.tensor(w)}
    expected = torch.autograd.functional.hessian(
        lambda x: f.cross_entropy(x, torch.tensor(y), **torch_kwargs), torch.tensor(z)
    )
    with jax.enable_x64(True):
        hess = jax.jit(jax.hessian(lambda x: jaxloss.cross_entropy(x, y, **kwargs)))(jnp.asarray(z))
        assert hess.dtype == jnp.float64
        assert_close(hess, expected.numpy(), 1e-10, "hessian")


# ----------------------------------------------------------------------------------------------
# Closed-form gradients and Hessians, float64
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("soft", [False, True], ids=["index", "probs"])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.15, "z_loss": 1e-2}])
def test_float64_value_is_float64_accurate(soft, options):
    """A plain (undifferentiated) float64 call is as exact as the value under ``value_and_grad``."""
    z, y, w = random_index_problem(10, 5, 6)
    targets = random_probs(11, z.shape) if soft else y
    kwargs = {"weight": w, **options}
    if soft:
        c = z.shape[-1]
        t = (1 - options.get("label_smoothing", 0.0)) * targets
        t = t + options.get("label_smoothing", 0.0) / c
        per = -np.sum(w * t * np_log_softmax(z), -1)
        expected = np.mean(per + options.get("z_loss", 0.0) * np_logsumexp(z) ** 2)
    else:
        expected = np_cross_entropy(z, y, **kwargs)
    with jax.enable_x64(True):
        zz = jnp.asarray(z)
        plain = jaxloss.cross_entropy(zz, targets, **kwargs)
        value, _ = jax.value_and_grad(lambda x: jaxloss.cross_entropy(x, targets, **kwargs))(zz)
        assert plain.dtype == jnp.float64
        assert_close(value, expected, 1e-13, "under value_and_grad")
        assert_close(plain, expected, 1e-13, "plain call")


def closed_form_index_grad(z, y, w, ignore_index, eps, lam, reduction):
    """∂/∂z of PyTorch's smoothed, weighted CE plus z-loss, classes last.

    Per valid row: ``(1-ε)·w_y·(p − onehot_y) + ε/C·(Σw·p − w) + 2λ·lse·p``; ignored rows 0;
    ``"mean"`` divides by ``Σ w_y`` over valid rows.
    """
    c = z.shape[-1]
    p = np.exp(np_log_softmax(z))
    valid = (y != ignore_index)[:, None]
    safe = np.where(valid[:, 0], y, 0)
    w_y = (w[safe] * valid[:, 0])[:, None]
    onehot = np.eye(c)[safe]
    grad = (1 - eps) * w_y * (p - onehot) + eps / c * (w.sum() * p - w[None, :])
    grad = grad + 2 * lam * np_logsumexp(z)[:, None] * p
    grad = np.where(valid, grad, 0.0)
    return grad / w_y.sum() if reduction == "mean" else grad


def closed_form_prob_grad(z, t, w, eps, lam, reduction):
    """∂/∂z of ``−Σ_c w_c t'_c log p_c + λ·lse²`` with ``t' = (1-ε)t + ε/C``: ``Σt'w·p − t'w``."""
    c = z.shape[-1]
    p = np.exp(np_log_softmax(z))
    wt = w[None, :] * ((1 - eps) * t + eps / c)
    grad = wt.sum(-1, keepdims=True) * p - wt + 2 * lam * np_logsumexp(z)[:, None] * p
    return grad / z.shape[0] if reduction == "mean" else grad


def closed_form_row_hessians(z, a, lam):
    """Per-row Hessian of ``a·lse(z) − b·z + λ·lse²``: ``(a + 2λ·lse)(diag p − ppᵀ) + 2λ·ppᵀ``."""
    p = np.exp(np_log_softmax(z))
    lse = np_logsumexp(z)
    outer = p[:, :, None] * p[:, None, :]
    lse_hess = np.einsum("nc,cd->ncd", p, np.eye(z.shape[-1])) - outer
    return (a + 2 * lam * lse)[:, None, None] * lse_hess + 2 * lam * outer


def block_diagonal(rows: np.ndarray) -> np.ndarray:
    """``(N, C, C)`` row Hessians as the full ``(N, C, N, C)`` Hessian."""
    n, c, _ = rows.shape
    full = np.zeros((n, c, n, c))
    for i in range(n):
        full[i, :, i, :] = rows[i]
    return full


# (weighted, ignore_index, label_smoothing, z_loss, reduction); probability targets ignore nothing.
GRAD_OPTIONS = list(
    itertools.product([False, True], [-100, 1], [0.0, 0.15], [0.0, 1e-2], ["sum", "mean"])
)
GRAD_CASES = [("index", *o) for o in GRAD_OPTIONS] + [
    ("probs", *o) for o in GRAD_OPTIONS if o[1] == -100
]
GRAD_Z, GRAD_Y, GRAD_W = random_index_problem(11, 6, 5)
GRAD_T = random_probs(13, GRAD_Z.shape, zero_fraction=0.3)


def _grad_case_id(case) -> str:
    kind, weighted, ignore_index, eps, lam, reduction = case
    return f"{kind}-w{int(weighted)}-ii{ignore_index}-ls{eps}-z{lam}-{reduction}"


def _grad_case_loss(case, axis):
    kind, weighted, ignore_index, eps, lam, reduction = case
    kwargs = {"weight": GRAD_W if weighted else None, "label_smoothing": eps, "z_loss": lam}
    kwargs |= {"reduction": reduction, "axis": axis}
    if kind == "probs":
        t = GRAD_T if axis == -1 else GRAD_T.T
        return lambda x: jaxloss.cross_entropy(x, t, **kwargs)
    y = np.where(GRAD_Y == -100, ignore_index, GRAD_Y)
    return lambda x: jaxloss.cross_entropy(x, y, ignore_index=ignore_index, **kwargs)


@functools.cache
def jax_gradients_float64() -> dict[str, np.ndarray]:
    """jaxloss's float64 gradient for every closed-form case, computed in one program."""

    def all_grads(z):
        out = {}
        for case in GRAD_CASES:
            out[f"{_grad_case_id(case)}-last"] = jax.grad(_grad_case_loss(case, -1))(z)
            if case[4]:  # classes first as well, for the half of the cases with a z-loss
                out[f"{_grad_case_id(case)}-first"] = jax.grad(_grad_case_loss(case, 0))(z.T).T
        return out

    with jax.enable_x64(True):
        return jax.tree.map(np.asarray, jax.jit(all_grads)(jnp.asarray(GRAD_Z)))


@pytest.mark.parametrize("case", GRAD_CASES, ids=map(_grad_case_id, GRAD_CASES))
def test_gradient_closed_form_float64(case):
    kind, weighted, ignore_index, eps, lam, reduction = case
    w = GRAD_W if weighted else np.ones(5)
    if kind == "probs":
        expected = closed_form_prob_grad(GRAD_Z, GRAD_T, w, eps, lam, reduction)
    else:
        y = np.where(GRAD_Y == -100, ignore_index, GRAD_Y)
        expected = closed_form_index_grad(GRAD_Z, y, w, ignore_index, eps, lam, reduction)
    for layout in ("last", "first") if lam else ("last",):
        grad = jax_gradients_float64()[f"{_grad_case_id(case)}-{layout}"]
        assert grad.dtype == np.float64
        assert_close(grad, expected, 1e-10, f"classes {layout}")


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.15])
def test_prob_target_gradient_closed_form_float64(weighted, eps):
    """∂CE/∂t_c = −(1−ε)·w_c·log p_c (CE is linear in t), also where t_c is exactly 0."""
    z, _, w = random_index_problem(14, 4, 5)
    t = random_probs(15, z.shape, zero_fraction=0.4)
    assert np.any(t == 0)
    w = w if weighted else np.ones(5)
    expected = -(1 - eps) * w[None, :] * np_log_softmax(z) / z.shape[0]
    with jax.enable_x64(True):
        grad = jax.grad(
            lambda tt: jaxloss.cross_entropy(
                jnp.asarray(z), tt, weight=w if weighted else None, label_smoothing=eps
            )
        )(jnp.asarray(t))
        assert_close(grad, expected, 1e-10)


def test_nll_gradient_closed_form_float64():
    x, y, w = random_index_problem(16, 7, 4)
    valid = y != -100
    expected = -np.eye(4)[np.where(valid, y, 0)] * (w[np.where(valid, y, 0)] * valid)[:, None]
    with jax.enable_x64(True):
        grad = jax.grad(lambda v: jaxloss.nll(v, y, weight=w))(jnp.asarray(x))
        assert_close(grad, expected / np.sum(w[y[valid]]), 1e-12)


@pytest.mark.parametrize("soft", [False, True], ids=["index", "probs"])
@pytest.mark.parametrize("lam", [0.0, 1e-2])
def test_hessian_closed_form_float64(soft, lam):
    z, y, w = random_index_problem(17, 4, 5)
    eps = 0.15
    if soft:
        t = random_probs(18, z.shape, 0.3)
        a = (w[None, :] * ((1 - eps) * t + eps / 5)).sum(-1)
        denom, targets, extra = z.shape[0], t, {}
    else:
        valid = y != -100
        w_y = np.where(valid, w[np.where(valid, y, 0)], 0.0)
        a = ((1 - eps) * w_y + eps / 5 * w.sum()) * valid
        denom, targets, extra = w_y.sum(), y, {"ignore_index": -100}
    rows = closed_form_row_hessians(z, a, lam)
    if not soft:
        rows = rows * valid[:, None, None]  # z-loss counts at valid positions only
    expected = block_diagonal(rows) / denom
    with jax.enable_x64(True):
        loss = lambda x: jaxloss.cross_entropy(
            x, targets, weight=w, label_smoothing=eps, z_loss=lam, **extra
        )
        hess = jax.jit(jax.hessian(loss))(jnp.asarray(z))
        assert_close(hess, expected, 1e-10)


def _squared_none_classes_first(z, y, t, w):
    """Classes first, every option, reduction "none" under a non-linear outer function."""
    options = {"ignore_index": 1, "label_smoothing": 0.15, "z_loss": 1e-2, "reduction": "none"}
    return jnp.sum(jaxloss.cross_entropy(z.T, y, axis=0, weight=w, **options) ** 2)


CHECK_GRADS_CASES = {
    "ce_index_all_options": _squared_none_classes_first,
    # Differentiated in the logits and in the probability targets.
    "ce_probs_all_options": lambda z, y, t, w: jaxloss.cross_entropy(
        z, t, weight=w, label_smoothing=0.15, z_loss=1e-2
    ),
    "nll": lambda z, y, t, w: jaxloss.nll(z, y, weight=w, reduction="sum"),
}


@pytest.mark.parametrize("name", CHECK_GRADS_CASES)
def test_check_grads_order_two_float64(name):
    z, y, w = random_index_problem(19, 3, 4)
    t = random_probs(20, z.shape)
    loss = CHECK_GRADS_CASES[name]
    with jax.enable_x64(True):
        args = (jnp.asarray(z), jnp.asarray(t))
        # Jitted so that each transformation compiles once instead of running op by op.
        fun = jax.jit(lambda x, tt: loss(x, y, tt, w))
        check_grads(fun, args, order=2, modes=("fwd", "rev"))


def test_forward_and_reverse_hessians_agree():
    z, y, w = random_index_problem(23, 3, 4)
    loss = lambda x: jaxloss.cross_entropy(x, y, weight=w, label_smoothing=0.1, z_loss=1e-3)
    with jax.enable_x64(True):
        both = jax.jit(lambda x: (jax.jacfwd(jax.jacfwd(loss))(x), jax.jacrev(jax.jacrev(loss))(x)))
        forward, reverse = both(jnp.asarray(z))
        assert_close(forward, reverse, 1e-12)


# ----------------------------------------------------------------------------------------------
# Edge cases
# ----------------------------------------------------------------------------------------------


def _value_and_grads(fun, z, reduction):
    """The loss, and the gradient of its sum (of itself for scalar reductions)."""
    value, grad = value_and_sum_grad(fun, z)
    assert value.shape == (z.shape[:-1] if reduction == "none" else ())
    return value, grad


@pytest.mark.parametrize("reduction", GEN.REDUCTIONS)
@pytest.mark.parametrize(
    "loss",
    [
        lambda z, y, r: jaxloss.cross_entropy(z, y, reduction=r),
        lambda z, y, r: jaxloss.cross_entropy(
            z, y, reduction=r, weight=jnp.arange(1.0, 4.0), label_smoothing=0.2, z_loss=0.1
        ),
        lambda z, y, r: jaxloss.nll(z, y, reduction=r, weight=jnp.arange(1.0, 4.0)),
    ],
    ids=["ce", "ce_all_options", "nll"],
)
def test_every_target_ignored(loss, reduction):
    z = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)
    y = jnp.full((4,), -100)
    value, grad = _value_and_grads(lambda x: loss(x, y, reduction), z, reduction)
    if reduction == "mean":
        assert np.isnan(value)
    else:
        np.testing.assert_array_equal(value, 0.0)
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_negative_infinity_masked_logits(weighted, layout):
    """-inf on non-target classes: finite loss and gradients, equal to the loss on the rest."""
    rng = np.random.default_rng(1)
    z = rng.normal(size=(4, 5)).astype(np.float32)
    masked = np.array([[0, 1, 0, 0, 1], [1, 0, 0, 0, 0], [0, 0, 0, 1, 1], [0, 0, 0, 0, 0]], bool)
    y = np.array([0, 2, 1, -100])  # never a masked class
    w = rng.uniform(0.5, 2.0, 5).astype(np.float32) if weighted else None
    z_masked = np.where(masked, -np.inf, z)
    axis = LAYOUTS[layout]
    to_layout = (lambda a: a) if axis == -1 else (lambda a: a.T)
    for reduction in GEN.REDUCTIONS:
        fun = lambda x: jaxloss.cross_entropy(
            to_layout(x), y, weight=w, reduction=reduction, axis=0 if axis == 1 else -1
        )
        value, grad = _value_and_grads(fun, jnp.asarray(z_masked), reduction)
        assert np.all(np.isfinite(value)) and np.all(np.isfinite(grad))
        np.testing.assert_array_equal(np.asarray(grad)[masked], 0.0)
        # The same loss, row by row, on the unmasked classes only (weights follow their class).
        rows = []
        for i in range(4):
            keep = ~masked[i]
            # The target's index among the kept classes (y[i] is never masked).
            target = [0 if y[i] == -100 else int(np.sum(keep[: y[i]]))]
            kept_w = None if w is None else w[keep]
            row = np_cross_entropy(z[i][keep][None], target, weight=kept_w, reduction="none")
            rows.append(row[0] * (y[i] != -100))
        w_y = np.array([0.0 if t == -100 else (1.0 if w is None else w[t]) for t in y])
        assert_close(value, np_reduce(np.array(rows), reduction, w_y.sum()), 1e-5)


def test_negative_infinity_masked_logits_probability_targets():
    """A zero target at a -inf logit counts 0·log 0 = 0; PyTorch 2.13 gives NaN (0·(-inf))."""
    torch = pytest.importorskip("torch")
    z = np.array([[0.3, -np.inf, 1.2], [-np.inf, -np.inf, 0.5]], np.float32)
    t = np.array([[0.25, 0.0, 0.75], [0.0, 0.0, 1.0]], np.float32)
    theirs = torch.nn.functional.cross_entropy(torch.tensor(z), torch.tensor(t), reduction="none")
    assert np.isnan(theirs.numpy()).all()  # the documented difference (docs/classification.md)
    value, grad = _value_and_grads(
        lambda x: jaxloss.cross_entropy(x, t, reduction="none"), jnp.asarray(z), "none"
    )
    assert np.all(np.isfinite(value)) and np.all(np.isfinite(grad))
    # Row 0 is a two-class problem on the unmasked classes; row 1 has all its mass on class 2.
    logp = np_log_softmax(z[0, [0, 2]])
    expected = [-(0.25 * logp[0] + 0.75 * logp[1]), 0.0]
    assert_close(value, expected, 1e-6)


@pytest.mark.parametrize("soft", [False, True], ids=["index", "probs"])
def test_degenerate_rows_are_nan_and_do_not_leak(soft):
    """A row of all -inf or with +inf logits has no softmax: its loss is NaN (as in PyTorch),
    in the forward-only path and in value_and_grad alike, and the other rows keep their loss."""
    z = np.array(
        [[0.3, -1.0, 1.2], [-np.inf, -np.inf, -np.inf], [0.0, np.inf, 1.0], [2.0, 0.5, -0.5]],
        np.float32,
    )
    y = np.array([2, 0, 1, 0])
    t = random_probs(3, z.shape).astype(np.float32)
    targets = t if soft else y
    loss = lambda x: jaxloss.cross_entropy(x, targets, reduction="none")
    value = np.asarray(jax.jit(loss)(jnp.asarray(z)))
    value_vag, grad = _value_and_grads(loss, jnp.asarray(z), "none")
    healthy = [0, 3]
    for v in (value, np.asarray(value_vag)):
        assert np.all(np.isnan(v[[1, 2]])), v
        if soft:
            expected = -np.sum(t[healthy] * np_log_softmax(z[healthy].astype(np.float64)), -1)
        else:
            expected = np_cross_entropy(z[healthy], y[healthy], reduction="none")
        assert_close(v[healthy], expected, 1e-6)
    assert np.all(np.isfinite(np.asarray(grad)[healthy]))


def test_ignored_all_negative_infinity_row_is_dropped():
    """Ignored padding rows of all -inf logits leave the loss and gradients of the rest alone."""
    z = np.array([[0.3, -1.0, 1.2], [-np.inf, -np.inf, -np.inf], [2.0, 0.5, -0.5]], np.float32)
    y = np.array([2, -100, 0])
    for reduction in GEN.REDUCTIONS:
        loss = lambda x: jaxloss.cross_entropy(x, y, reduction=reduction)
        forward = np.asarray(jax.jit(loss)(jnp.asarray(z)))
        value, grad = _value_and_grads(loss, jnp.asarray(z), reduction)
        expected = np_cross_entropy(z[[0, 2]], y[[0, 2]], reduction=reduction)
        if reduction == "none":
            expected = np.array([expected[0], 0.0, expected[1]])
        assert_close(forward, expected, 1e-6)
        assert_close(value, expected, 1e-6)
        np.testing.assert_array_equal(np.asarray(grad)[1], 0.0)
        assert np.all(np.isfinite(grad))


def test_negative_infinity_with_label_smoothing_is_infinite():
    # README: with ε > 0 a -inf logit makes the loss inf, as in PyTorch.
    z = jnp.array([[0.0, -jnp.inf, 1.0]])
    assert np.isposinf(jaxloss.cross_entropy(z, jnp.array([0]), label_smoothing=0.1))


@pytest.mark.parametrize("scale", [1e4, -1e4])
@pytest.mark.parametrize("soft", [False, True])
def test_huge_logits_are_finite_and_exact(scale, soft):
    z = np.array([[1.0, -1.0, 0.0], [-1.0, 1.0, 1.0 - 1e-4], [0.5, 0.5, 0.5]]) * scale
    z = z.astype(np.float32)
    y = np.array([0, 2, 1])
    t = random_probs(5, z.shape)
    w = np.array([0.5, 1.0, 2.0], np.float32)
    for reduction in GEN.REDUCTIONS:
        if soft:
            fun = lambda x: jaxloss.cross_entropy(x, t, weight=w, reduction=reduction)
            logp = np_log_softmax(z)
            per = -np.sum(w * t * logp, -1)
            expected = np_reduce(per, reduction, 3)
            grad_ref = np.sum(w * t, -1, keepdims=True) * np.exp(logp) - w * t
            grad_ref = grad_ref / 3 if reduction == "mean" else grad_ref
        else:
            fun = lambda x: jaxloss.cross_entropy(x, y, weight=w, reduction=reduction)
            expected = np_cross_entropy(z, y, weight=w, reduction=reduction)
            grad_ref = closed_form_index_grad(z.astype(np.float64), y, w, -100, 0.0, 0.0, "sum")
            grad_ref = grad_ref / w[y].sum() if reduction == "mean" else grad_ref
        value, grad = _value_and_grads(fun, jnp.asarray(z), reduction)
        assert np.all(np.isfinite(value)) and np.all(np.isfinite(grad))
        assert_close(value, expected, 1e-5, f"{reduction} value")
        if reduction != "none":  # the "none" gradient is that of the sum, checked via "sum"
            assert_close(grad, grad_ref, 1e-5, f"{reduction} grad")


HALF_LOSSES = {
    "ce_index": lambda z, y, t, w: jaxloss.cross_entropy(
        z, y, weight=w, label_smoothing=0.1, ignore_index=1
    ),
    "ce_index_axis1_none": lambda z, y, t, w: jaxloss.cross_entropy(
        jnp.moveaxis(z, -1, 1), y, reduction="none", axis=1
    ),
    "ce_probs": lambda z, y, t, w: jaxloss.cross_entropy(z, t.astype(z.dtype), weight=w),
    "ce_zloss": lambda z, y, t, w: jaxloss.cross_entropy(z, y, z_loss=1e-3, reduction="sum"),
    "nll": lambda z, y, t, w: jaxloss.nll(jaxloss.log_softmax(z), y, weight=w),
}


@functools.cache
def half_precision_results(dtype: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every HALF_LOSSES value and gradient for logits rounded to ``dtype``, one program.

    ``dtype`` float32 gives the reference: the same rounded inputs, computed in float32.
    """
    rng = np.random.default_rng(2)
    z = np.asarray(jnp.asarray(rng.normal(scale=2.0, size=(8, 6)), jnp.bfloat16), np.float32)
    z = np.asarray(jnp.asarray(z, jnp.float16), np.float32)  # representable in both
    y = rng.integers(0, 6, size=8)
    y[1] = 1  # the ignore_index=1 case ignores something
    t = random_probs(3, (8, 6))
    w = rng.uniform(0.5, 2.0, size=6).astype(np.float32)

    def run(x):
        return {
            name: value_and_sum_grad(lambda v: loss(v, y, t, w), x)
            for name, loss in HALF_LOSSES.items()
        }

    out = jax.jit(run)(jnp.asarray(z, dtype))
    return jax.tree.map(np.asarray, out)


@pytest.mark.parametrize("name", HALF_LOSSES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision(name, dtype):
    value, grad = half_precision_results(dtype)[name]
    value32, grad32 = half_precision_results("float32")[name]
    assert value.dtype == jnp.dtype(dtype) and grad.dtype == jnp.dtype(dtype)
    assert np.all(np.isfinite(np.asarray(value, np.float32)))
    assert_close(np.asarray(value, np.float32), value32, 1e-2, "value")
    assert_close(np.asarray(grad, np.float32), grad32, 1e-2, "grad")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_large_class_count(dtype):
    """4096 near-equal logits (a long reduction): value and gradient within 1e-2 of float32."""
    z = np.random.default_rng(7).uniform(-0.01, 0.01, size=(2, 4096))
    z = np.asarray(jnp.asarray(z, dtype), np.float32)
    y = np.array([5, 4000])
    t = random_probs(8, z.shape)
    for targets in (y, t):
        value, grad = value_and_sum_grad(
            lambda x: jaxloss.cross_entropy(x, targets), z.astype(dtype)
        )
        value32, grad32 = value_and_sum_grad(lambda x: jaxloss.cross_entropy(x, targets), z)
        assert value.dtype == grad.dtype == jnp.dtype(dtype)
        assert_close(np.float32(value), value32, 1e-2, "value")
        assert_close(np.asarray(grad, np.float32), grad32, 1e-2, "grad")
    np.testing.assert_allclose(value32, np.log(4096), rtol=1e-3)  # sanity of the reference


@pytest.mark.parametrize("fn", ["cross_entropy", "nll"])
def test_out_of_range_target_is_nan(fn):
    """Targets C, 99 and -5 (ignore_index -100) give NaN at their position, not a finite loss."""
    z = np.random.default_rng(4).normal(size=(4, 3)).astype(np.float32)
    loss = getattr(jaxloss, fn)
    extra = {"label_smoothing": 0.1, "z_loss": 1e-3} if fn == "cross_entropy" else {}

    @jax.jit
    def run(x, y):
        out = {r: loss(x, y, reduction=r) for r in GEN.REDUCTIONS}
        out["mean_options"] = loss(x, y, weight=jnp.ones(3), **extra)
        out["grad"] = jax.grad(lambda v: loss(v, y))(x)
        return out

    good = run(z, np.array([0, -100, 2, -100]))
    for bad in (3, 99, -5):
        out = run(z, np.array([0, bad, 2, -100]))
        per = np.asarray(out["none"])
        assert np.isnan(per[1]), bad
        np.testing.assert_array_equal(per[[0, 2, 3]], np.asarray(good["none"])[[0, 2, 3]])
        for key in ("sum", "mean", "mean_options"):
            assert np.isnan(out[key]), (bad, key)
        if fn == "cross_entropy":  # the bad row's gradient is NaN as well
            assert np.all(np.isnan(out["grad"][1]))


def test_ignore_index_of_a_real_class_makes_minus_100_out_of_range():
    z = jnp.zeros((2, 3))
    under_jit = jax.jit(lambda z, y: jaxloss.cross_entropy(z, y, ignore_index=1))
    assert np.isnan(under_jit(z, np.array([0, -100])))
    with pytest.raises(ValueError, match=r"class index -100 at position \(1,\)"):
        jaxloss.cross_entropy(z, np.array([0, -100]), ignore_index=1)  # concrete: PyTorch's error
    np.testing.assert_allclose(
        jaxloss.cross_entropy(z, np.array([0, 1]), ignore_index=1, reduction="none"),
        [np.log(3), 0.0],
        rtol=1e-6,
    )


def _checked_step(ignore_index: int):
    def step(z, y):
        jaxloss.check_targets(y, z.shape[-1], ignore_index=ignore_index)
        return jaxloss.cross_entropy(z, y, ignore_index=ignore_index)

    return jax.jit(checkify.checkify(step))


@pytest.mark.parametrize(
    ("targets", "ignore_index", "bad"),
    [
        (np.array([0, 3, 1], np.int32), -100, 3),
        (np.array([0, 1, 99], np.int32), -100, 99),
        (np.array([-5, 1, 2], np.int32), -100, -5),
        (np.array([-100, 2, 1], np.int32), 1, -100),
        (np.array([[0, 1], [2, 7]], np.int32), -100, 7),
        (np.array([0, 200, 1], np.uint8), -100, 200),
    ],
)
def test_check_targets_reports_the_bad_value(targets, ignore_index, bad):
    z = jnp.zeros((*targets.shape, 3))
    err, value = _checked_step(ignore_index)(z, targets)
    message = err.get()
    assert message is not None
    assert f": {bad} " in message and "[0, 3)" in message
    with pytest.raises(checkify.JaxRuntimeError, match=str(bad)):
        err.throw()
    assert np.isnan(value)


@pytest.mark.parametrize(
    ("targets", "ignore_index"),
    [
        (np.array([0, 1, 2], np.int32), -100),
        (np.array([0, -100, 2], np.int32), -100),
        (np.array([[-100, 2], [1, 0]], np.int32), -100),
        (np.array([0, 7, 2], np.int32), 7),
        (np.array([0, 2, 1], np.uint8), -100),
        (np.array([0, 255, 1], np.uint8), 255),
    ],
)
def test_check_targets_accepts_good_and_ignored(targets, ignore_index):
    err, value = _checked_step(ignore_index)(jnp.zeros((*targets.shape, 3)), targets)
    assert err.get() is None
    assert np.isfinite(value)


def test_check_targets_empty_targets():
    err, _ = jax.jit(checkify.checkify(lambda y: jaxloss.check_targets(y, 3)))(
        jnp.zeros((0,), jnp.int32)
    )
    assert err.get() is None


def test_uint8_targets_with_negative_ignore_index():
    rng = np.random.default_rng(6)
    z = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
    y = rng.integers(0, 4, size=5)
    w = jnp.asarray(rng.uniform(0.5, 2, 4), jnp.float32)
    for fn in (jaxloss.cross_entropy, jaxloss.nll):
        for reduction in ("none", "mean"):
            expected = fn(z, y.astype(np.int32), weight=w, reduction=reduction)
            out = fn(z, y.astype(np.uint8), weight=w, reduction=reduction, ignore_index=-100)
            np.testing.assert_array_equal(out, expected)
    # A uint8 ignore value inside the dtype's range still works.
    y8 = np.array([0, 255, 3, 1, 255], np.uint8)
    out = jaxloss.cross_entropy(z, y8, ignore_index=255, reduction="none")
    np.testing.assert_array_equal(np.asarray(out)[[1, 4]], 0.0)
    assert_close(out, np_cross_entropy(z, y8.astype(int), ignore_index=255, reduction="none"), 1e-5)


@pytest.mark.parametrize("fn", ["cross_entropy", "nll"])
def test_one_dimensional_logits_with_scalar_target(fn):
    z = jnp.asarray([0.2, -1.0, 2.5, 0.0], jnp.float32)
    loss = getattr(jaxloss, fn)

    @jax.jit
    def run(x, target):
        out = {r: loss(x, target, reduction=r) for r in GEN.REDUCTIONS}
        out["batched"] = loss(x[None], target[None], reduction="sum")
        out["grad"] = jax.grad(lambda v: loss(v, target))(x)
        out["grad_batched"] = jax.grad(lambda v: loss(v, target[None]))(x[None])[0]
        return out

    for target in (0, 2):
        out = run(z, jnp.int32(target))
        for reduction in GEN.REDUCTIONS:
            assert out[reduction].shape == ()
            np.testing.assert_allclose(out[reduction], out["batched"], rtol=1e-6)
        assert out["grad"].shape == (4,)
        np.testing.assert_allclose(out["grad"], out["grad_batched"], rtol=1e-6)
    ignored = run(z, jnp.int32(-100))
    assert np.isnan(ignored["mean"])  # the only target ignored: a mean over nothing
    np.testing.assert_array_equal(ignored["sum"], 0.0)
    np.testing.assert_array_equal(ignored["grad"], 0.0)


@pytest.mark.parametrize(
    ("weighted", "ignore_index", "soft"),
    [(False, -100, False), (False, 1, False), (True, 1, False), (True, -100, True)],
    ids=["index", "index-ii1", "index-ii1-weighted", "probs-weighted"],
)
def test_z_loss_matches_docstring_formula(weighted, ignore_index, soft):
    """z-loss adds λ·logsumexp(z)² at non-ignored positions, reduced like the main loss."""
    lam = 0.05
    z, y, w = random_index_problem(8, 6, 4)
    z = z.astype(np.float32)
    y = np.where(y == -100, ignore_index, y)
    y[0] = 0 if ignore_index == 1 else y[0]  # something kept
    w = w.astype(np.float32) if weighted else None
    targets = random_probs(9, z.shape).astype(np.float32) if soft else y
    kwargs = {"weight": w, "ignore_index": ignore_index, "label_smoothing": 0.1}
    valid = np.ones(6, bool) if soft else y != ignore_index
    lse_sq = np_logsumexp(z) ** 2 * valid
    run = jax.jit(
        lambda x: {
            (r, lam_): jaxloss.cross_entropy(x, targets, reduction=r, z_loss=lam_, **kwargs)
            for r in GEN.REDUCTIONS
            for lam_ in (0.0, lam)
        }
    )
    out = jax.tree.map(lambda a: np.asarray(a, np.float64), run(z))
    base = out["none", 0.0]
    assert_close(out["none", lam], base + lam * lse_sq, 1e-5, "none")
    assert_close(out["sum", lam], out["sum", 0.0] + lam * lse_sq.sum(), 1e-5, "sum")
    if soft:
        denominator = 6.0
    else:
        denominator = np.sum(np.where(valid, 1.0 if w is None else w[np.where(valid, y, 0)], 0))
    assert_close(out["mean", 0.0], base.sum() / denominator, 1e-5, "mean denominator")
    expected = out["mean", 0.0] + lam * lse_sq.sum() / denominator
    assert_close(out["mean", lam], expected, 1e-5, "mean")
    if w is None and not soft:  # unweighted: the plain mean of lse² over non-ignored positions
        expected = out["mean", 0.0] + lam * np.mean(np_logsumexp(z)[valid] ** 2)
        assert_close(out["mean", lam], expected, 1e-5, "plain mean")


# ----------------------------------------------------------------------------------------------
# Property tests (hypothesis)
# ----------------------------------------------------------------------------------------------

INDEX_SETTINGS = {
    "seed": st.integers(0, 2**31 - 1),
    "n": st.integers(1, 5),
    "c": st.sampled_from([2, 3, 7]),
    "weighted": st.booleans(),
    "ignore_index": st.sampled_from([-100, 0, 1]),
    "reduction": st.sampled_from(GEN.REDUCTIONS),
}
index_settings = st.fixed_dictionaries(INDEX_SETTINGS)


def draw_index_problem(s: dict):
    rng = np.random.default_rng(s["seed"])
    z = rng.normal(scale=3.0, size=(s["n"], s["c"])).astype(np.float32)
    y = rng.integers(0, s["c"], size=s["n"])
    y = np.where(rng.random(s["n"]) < 0.3, s["ignore_index"], y)
    w = rng.uniform(0.5, 2.0, size=s["c"]).astype(np.float32) if s["weighted"] else None
    return z, y, w


@PROPERTY
@given(index_settings)
def test_property_cross_entropy_is_nll_of_log_softmax(s):
    z, y, w = draw_index_problem(s)
    kwargs = {"weight": w, "ignore_index": s["ignore_index"], "reduction": s["reduction"]}
    ce = lambda x: jaxloss.cross_entropy(x, y, **kwargs)
    composed = lambda x: jaxloss.nll(jaxloss.log_softmax(x), y, **kwargs)
    (ce_value, ce_grad), (value, grad) = jax.jit(
        lambda x: (value_and_sum_grad(ce, x), value_and_sum_grad(composed, x))
    )(z)
    assert_close(ce_value, value, 1e-5, "value")
    # w·(p − 1) at p ≈ 1 keeps float32's absolute error of p (a few 1e-8 times w), however small
    # the entry: the floor scales with the weights, not with the gradient's largest entry.
    floor = 1e-6 * (1.0 if w is None else float(np.max(w)))
    np.testing.assert_allclose(ce_grad, grad, rtol=1e-5, atol=floor, err_msg="grad")


@PROPERTY
@given(
    seed=st.integers(0, 2**31 - 1),
    shape=st.sampled_from([(3,), (2, 4), (3, 2, 5)]),
    zero_fraction=st.sampled_from([0.0, 0.5]),
)
def test_property_cross_entropy_is_entropy_plus_kl(seed, shape, zero_fraction):
    """CE(p, z) = H(p) + KL(p ‖ softmax(z)), exact zeros in p included."""
    z = np.random.default_rng(seed).normal(scale=2.0, size=shape).astype(np.float32)
    p = random_probs(seed + 1, shape, zero_fraction).astype(np.float32)
    ce, kl, entropy = jax.jit(
        lambda x, q: (
            jaxloss.cross_entropy(x, q, reduction="none"),
            jnp.sum(jaxloss.kl_div(jaxloss.log_softmax(x), q, reduction="none"), -1),
            jaxloss.entropy(q),
        )
    )(z, p)
    assert_close(ce, entropy + kl, 1e-5)
    assert np.all(np.asarray(kl) >= -1e-6)  # Gibbs' inequality: CE ≥ H


@PROPERTY
@given(index_settings, st.sampled_from([0.0, 0.2]), st.sampled_from([0.0, 1e-2]))
def test_property_matches_numpy_reference(s, label_smoothing, z_loss):
    z, y, w = draw_index_problem(s)
    kwargs = {"weight": w, "ignore_index": s["ignore_index"], "reduction": s["reduction"]}
    nll_kwargs = dict(kwargs)
    kwargs |= {"label_smoothing": label_smoothing, "z_loss": z_loss}
    ce, nll = jax.jit(
        lambda x: (jaxloss.cross_entropy(x, y, **kwargs), jaxloss.nll(x, y, **nll_kwargs))
    )(z)
    assert_close(ce, np_cross_entropy(z, y, **kwargs), 1e-5, "cross_entropy")
    # nll's "sum"/"mean" can cancel (logits of both signs): the float32 error is relative to the
    # sum of the terms' magnitudes, not to the result, so the floor uses the "none" terms.
    terms = np.abs(np_nll(z, y, **(nll_kwargs | {"reduction": "none"})))
    expected_nll = np_nll(z, y, **nll_kwargs)
    np.testing.assert_allclose(nll, expected_nll, rtol=1e-6, atol=1e-6 * float(np.sum(terms)))


# One shape, so that the op-by-op (eager) runs reuse their per-primitive compilations.
eager_settings = st.fixed_dictionaries({**INDEX_SETTINGS, "n": st.just(5), "c": st.just(3)})


@PROPERTY_FEW
@given(eager_settings, st.sampled_from([0.0, 0.2]), st.sampled_from([0.0, 1e-2]))
def test_property_jit_matches_eager(s, label_smoothing, z_loss):
    """The jitted functions equal their un-jitted Python (``__wrapped__``) run op by op."""
    z, y, w = draw_index_problem(s)
    kwargs = {"weight": w, "ignore_index": s["ignore_index"], "reduction": s["reduction"]}
    nll_kwargs = dict(kwargs)
    kwargs |= {"label_smoothing": label_smoothing, "z_loss": z_loss}
    eager = jaxloss.cross_entropy.__wrapped__(z, y, **kwargs)
    assert_close(jaxloss.cross_entropy(z, y, **kwargs), eager, 1e-6, "cross_entropy")
    eager_nll = jaxloss.nll.__wrapped__(z, y, **nll_kwargs)
    assert_close(jaxloss.nll(z, y, **nll_kwargs), eager_nll, 0, "nll")


@PROPERTY
@given(index_settings, st.sampled_from([0.0, 0.2]), st.sampled_from([0.0, 1e-2]))
def test_property_vmap_matches_batched_none(s, label_smoothing, z_loss):
    z, y, w = draw_index_problem(s)
    kwargs = {"weight": w, "ignore_index": s["ignore_index"], "label_smoothing": label_smoothing}
    kwargs["z_loss"] = z_loss
    # Rows of (n, C); and, in PyTorch's layout, examples (C, n) of a (2, C, n) batch.
    z3 = np.stack([z.T, z.T[:, ::-1]])
    y3 = np.stack([y, y[::-1]])
    ce = lambda x, t, **kw: jaxloss.cross_entropy(x, t, reduction="none", **kwargs, **kw)

    @jax.jit
    def run(x, t, x3, t3):
        rows = jax.vmap(ce)(x, t)
        examples = jax.vmap(lambda a, b: ce(a[None], b[None], axis=1)[0])(x3, t3)
        return rows, ce(x, t), examples, ce(x3, t3, axis=1)

    rows, batched, examples, batched3 = run(z, y, z3, y3)
    assert_close(rows, batched, 1e-6, "rows")
    assert_close(examples, batched3, 1e-6, "examples")


@PROPERTY
@given(index_settings, st.sampled_from([0.0, 0.2]), st.sampled_from([0.0, 1e-2]))
def test_property_per_example_gradients(s, label_smoothing, z_loss):
    z, y, w = draw_index_problem(s)
    kwargs = {"weight": w, "ignore_index": s["ignore_index"], "label_smoothing": label_smoothing}
    kwargs |= {"z_loss": z_loss, "reduction": "sum"}
    ce = lambda x, t: jaxloss.cross_entropy(x, t, **kwargs)
    nll = lambda x, t: jaxloss.nll(x, t, weight=w, ignore_index=s["ignore_index"], reduction="sum")
    run = jax.jit(
        lambda x, t: [(jax.vmap(jax.grad(f))(x, t), jax.grad(f)(x, t)) for f in (ce, nll)]
    )
    (ce_rows, ce_batched), (nll_rows, nll_batched) = run(z, y)
    assert_close(ce_rows, ce_batched, 1e-6, "cross_entropy")
    assert_close(nll_rows, nll_batched, 0, "nll")
