"""linear_cross_entropy's Pallas TPU kernels (issue 17 items 4-5, ``jaxloss/_linear/pallas_tpu``).

Exactness: both kernels run in the TPU interpret mode on CPU — reads past an array's end return
NaN there, so a tail the kernels forgot to mask shows — and the per-token losses and the
gradients of ``hidden``, ``kernel`` and the class weights are compared with the materialised
reference (``jaxloss/_linear/reference.py``) over the options, in float32 and bfloat16, at sizes
the blocks do not divide; through the public API, the guard's references and both ``shard_map``
forms too. Compiled for compile-only TPUs: ``test_linear_pallas_tpu.py``.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close_to_scale
from jax.experimental.pallas import tpu as pltpu

from jaxloss._linear import assembly, chunked, kernel_stats, reference
from jaxloss._linear import pallas_tpu as kernels

# Uninitialised reads (past an array's end) are NaN in the TPU interpret mode.
INTERPRET = pltpu.InterpretParams(out_of_bounds_reads="uninitialized")
SMALL = kernels.Blocks(forward=(16, 128), backward=(16, 128))


def _problem(h, k, y, opts: dict):
    """``(problem, options, hyper)`` of per-token losses with ``opts``."""
    cw, eps, lam, cap = (opts.get(key) for key in ("weight", "smoothing", "z_loss", "cap"))
    cap = None if cap is None else jnp.float32(cap)
    p = chunked.Problem(h, k, None, y, None, cw, cap, eps is not None, False)
    options = assembly.Options(
        num_classes=k.shape[1], ignore_index=opts.get("ignore_index", -100), reduction="none",
        smoothing=eps is not None, z_loss=lam is not None,
    )  # fmt: skip
    return p, options, (0.0 if eps is None else eps, 0.0 if lam is None else lam)


def _reference_rows(h, k, y, opts: dict):
    """Per-token losses of the materialised reference (``reduction="none"``)."""
    p, options, hyper = _problem(h, k, y, opts)
    stats = reference.reference_stats(p)
    return assembly.RowLoss(options)(stats, chunked.whole_block(p), p.class_weight, hyper)


def _kernel_rows(
    h, k, y, opts: dict, blocks: kernels.Blocks | None = SMALL, interpret: object = INTERPRET
):
    """Per-token losses through the kernels (``interpret=False``: guarded, as in programs)."""
    p, options, hyper = _problem(h, k, y, opts)
    return kernel_stats.losses(p, options, hyper, blocks=blocks, interpret=interpret)[0]


def _data(n, d, v, dtype, seed=0):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(n, d)), dtype)
    k = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d) * 6, dtype)
    y = jnp.asarray(rng.integers(0, v, n), jnp.int32).at[2].set(-100)
    w = jnp.asarray(rng.uniform(0.2, 2.0, v), jnp.float32)
    g = jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float32)  # per-token cotangents
    return h, k, y, w, g


OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "smoothing": {"smoothing": 0.1},
    "weight_smoothing_zloss": {"weight": True, "smoothing": 0.2, "z_loss": 1e-3},
    "zloss": {"z_loss": 1e-2},
    "cap": {"cap": 5.0},
    "cap_weight_smoothing_zloss": {"cap": 4.0, "weight": True, "smoothing": 0.1, "z_loss": 1e-3},
    "ignore_7": {"ignore_index": 7},
}
# (N, D, V) with 16 × 128 blocks: tails in both axes; both divided; fewer classes than a block.
SIZES = [(37, 24, 300), (32, 16, 256), (20, 8, 100)]


def _close(a, b, dtype, what):
    assert_close_to_scale(a, b, 2e-5 if dtype == jnp.float32 else 2e-2, what)


# The default run: every option at least once (the combined case covers weight, smoothing,
# z-loss and the cap; the plain kernel is that kernel with them switched off), both dtypes, tails
# in both axes and fewer classes than a block. --full adds each option alone at the size with
# tails in both axes, in one dtype each (the dtypes alternate; the combined case and the plain
# kernel take both), and the plain kernel at the other sizes (each case is its own interpret-mode
# compile, ~4 s here).
DEFAULT_CASES = {
    ((37, 24, 300), "cap_weight_smoothing_zloss", jnp.bfloat16),
    ((20, 8, 100), "ignore_7", jnp.float32),
}
FULL_CASES = {
    *(((37, 24, 300), option, dtype) for option, dtype in zip(
        OPTIONS, itertools.cycle([jnp.float32, jnp.bfloat16]), strict=False)),
    ((37, 24, 300), "plain", jnp.bfloat16),
    ((37, 24, 300), "cap_weight_smoothing_zloss", jnp.float32),
    ((32, 16, 256), "plain", jnp.bfloat16),
    ((20, 8, 100), "plain", jnp.float32),
}  # fmt: skip


def _grid():
    """The cases above; the default run only ``DEFAULT_CASES``."""
    for case in itertools.product(SIZES, OPTIONS, [jnp.float32, jnp.bfloat16]):
        size, option, dtype = case
        if case not in DEFAULT_CASES | FULL_CASES:
            continue
        ids = f"{'x'.join(map(str, size))}-{option}-{'f32' if dtype == jnp.float32 else 'bf16'}"
        marks = () if case in DEFAULT_CASES else (pytest.mark.slow,)
        yield pytest.param(*case, id=ids, marks=marks)


def _value_and_grads(rows_fn, h, k, y, g, opts, w):
    def total(h, k, w):
        o = dict(opts, weight=w) if opts.get("weight") else opts
        return jnp.sum(g * rows_fn(h, k, y, o))

    return jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2)))(h, k, w)


@pytest.mark.parametrize("size, option, dtype", list(_grid()))
def test_kernels_match_the_reference(size, option, dtype):
    """Per-token losses, and the gradients of Σ g·loss in hidden, kernel and class weights."""
    n, d, v = size
    h, k, y, w, g = _data(n, d, v, dtype)
    opts = OPTIONS[option]
    if "ignore_index" in opts:
        y = y.at[::5].set(opts["ignore_index"])
    with_weight = dict(opts, weight=w if opts.get("weight") else None)
    rows = jax.jit(lambda h, k: _kernel_rows(h, k, y, with_weight))(h, k)
    want = _reference_rows(h, k, y, with_weight)
    assert rows.dtype == jnp.float32 and rows.shape == (size[0],)
    _close(rows, want, jnp.float32 if dtype == jnp.float32 else dtype, "per-token loss")
    got = _value_and_grads(_kernel_rows, h, k, y, g, opts, w)
    ref = _value_and_grads(_reference_rows, h, k, y, g, opts, w)
    assert got[1][0].dtype == dtype and got[1][1].dtype == dtype
    for name, a, b in zip(["value", "d hidden", "d kernel", "d weight"],
                          jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):  # fmt: skip
        _close(a, b, dtype, name)


@pytest.mark.parametrize(
    "opts",
    [{}, pytest.param({"weight": True, "smoothing": 0.1, "z_loss": 1e-3}, marks=pytest.mark.slow)],
)
def test_bad_and_ignored_targets(opts):
    """An out-of-range target: NaN loss there, NaN gradient in its row of ``hidden`` and in all
    of ``kernel`` (as the reference); every target ignored: zero losses and gradients."""
    h, k, y, w, g = _data(37, 24, 300, jnp.float32)
    for targets in (y.at[4].set(300).at[9].set(-3), jnp.full_like(y, -100)):
        o = dict(opts, weight=w if opts.get("weight") else None)
        _close(_kernel_rows(h, k, targets, o), _reference_rows(h, k, targets, o), jnp.float32,
               "loss")  # fmt: skip
        got = _value_and_grads(_kernel_rows, h, k, targets, g, opts, w)
        ref = _value_and_grads(_reference_rows, h, k, targets, g, opts, w)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
            _close(a, b, jnp.float32, "bad/ignored")
    zero = _value_and_grads(_kernel_rows, h, k, jnp.full_like(y, -100), g, {}, w)
    assert not np.asarray(zero[1][0]).any() and not np.asarray(zero[1][1]).any()


def test_default_blocks_match_the_reference():
    """The blocks :func:`choose_blocks` picks (one block per axis at this size)."""
    h, k, y, w, g = _data(40, 16, 520, jnp.float32)
    opts = {"weight": True, "smoothing": 0.1}
    got = _value_and_grads(lambda *a: _kernel_rows(*a, blocks=None), h, k, y, g, opts, w)
    ref = _value_and_grads(_reference_rows, h, k, y, g, opts, w)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        _close(a, b, jnp.float32, "default blocks")


def test_supported():
    assert kernels.supported((8192, 2048), (2048, 131072), jnp.bfloat16)
    assert kernels.supported((8192, 2048), (2048, 131072), jnp.float32)
    assert kernels.supported((3, 5), (5, 7), jnp.float32)  # whole-array blocks
    assert not kernels.supported((8192, 2048), (2048, 131072), jnp.float32, bias=True)
    assert not kernels.supported((64, 32), (32, 256), jnp.float32, probabilities=True)
    assert not kernels.supported((64, 32), (32, 256), jnp.float32, return_stats=True)
    assert not kernels.supported((64, 32), (32, 256), jnp.float64)
    assert not kernels.supported((64, 32), (32, 256), jnp.bfloat16, jnp.float32)
    assert not kernels.supported((0, 32), (32, 256), jnp.float32)
    assert not kernels.supported((64, 32), (16, 256), jnp.float32)
    assert not kernels.supported((64, 1 << 20), (1 << 20, 256), jnp.float32)  # D too large


# ----------------------------------------------------------------------------------------------
# Through the public API: linear_cross_entropy(..., implementation="pallas")
# ----------------------------------------------------------------------------------------------


def _counting_kernel_calls(monkeypatch):
    """Yields the list that each call of the kernels' entry point appends to, with fresh
    compilation caches before and after (a cached program would hide which form runs)."""
    calls = []
    run_kernel = kernels.run_kernel  # every path to the kernels (or their references)
    monkeypatch.setattr(
        kernels, "run_kernel", lambda *a, **k: calls.append(1) or run_kernel(*a, **k)
    )
    jax.clear_caches()
    yield calls
    monkeypatch.undo()
    jax.clear_caches()


@pytest.fixture
def kernel_on_cpu(monkeypatch):
    """The TPU kernels registered for the CPU backend, in the interpret mode, for this test."""
    from jaxloss import _implementations
    from jaxloss._linear import api

    monkeypatch.setitem(
        _implementations.LINEAR_KERNELS["linear_cross_entropy"], "cpu", api._pallas_tpu
    )
    monkeypatch.setattr(kernels, "INTERPRET", INTERPRET)
    yield from _counting_kernel_calls(monkeypatch)


API_OPTIONS = [
    pytest.param({"reduction": "mean"}, jnp.float32, id="mean-f32", marks=pytest.mark.slow),
    pytest.param(
        {
            "reduction": "sum",
            "weight": True,
            "label_smoothing": 0.1,
            "z_loss": 1e-3,
            "soft_cap": 5.0,
            "ignore_index": 3,
        },
        jnp.bfloat16,
        id="sum-everything-bf16",
    ),
    pytest.param(
        {"reduction": "none", "weight": True},
        jnp.float32,
        id="none-weight-f32",
        marks=pytest.mark.slow,
    ),
]


@pytest.mark.parametrize(("options", "dtype"), API_OPTIONS)
def test_implementation_pallas_matches_the_xla_form(kernel_on_cpu, options, dtype):
    """``implementation="pallas"`` runs the kernels (here in the interpret mode) with the XLA
    form's reduction and options: values and both gradients match ``"xla"``."""
    import jaxloss

    h, k, y, w, _ = _data(24, 16, 200, dtype)
    y = jnp.where(y == -100, options.get("ignore_index", -100), y)
    o = dict(options, weight=w if options.get("weight") else None)

    def loss(impl):
        def total(h, k):
            out = jaxloss.linear_cross_entropy(h, k, y, implementation=impl, **o)
            return jnp.sum(out.astype(jnp.float32))

        return jax.jit(jax.value_and_grad(total, argnums=(0, 1)))(h, k)

    ref = loss("xla")
    assert not kernel_on_cpu
    got = loss("pallas")
    assert kernel_on_cpu, "implementation='pallas' did not run the kernels"
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        _close(a, b, dtype, f"pallas vs xla {options}")


def test_implementation_pallas_refuses_what_the_kernel_does_not_take():
    import jaxloss

    h, k, y, _, _ = _data(8, 4, 16, jnp.float32)
    with pytest.raises(ValueError, match=r"linear_cross_entropy: implementation='pallas'.*bias"):
        jaxloss.linear_cross_entropy(h, k, y, bias=jnp.zeros(16), implementation="pallas")
    with pytest.raises(ValueError, match=r"implementation='pallas'.*return_stats=True"):
        jaxloss.linear_cross_entropy(h, k, y, return_stats=True, implementation="pallas")
    with pytest.raises(ValueError, match=r"no kernel for the cpu backend.*tpu"):
        jaxloss.linear_cross_entropy(h, k, y, implementation="pallas")


# ----------------------------------------------------------------------------------------------
# Where Mosaic cannot lower the kernels: their references in jnp (the guard), the XLA form (the
# default's switch)
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def small_reference_steps(monkeypatch):
    """References a few tokens / classes per step, so that their padded tails show."""
    monkeypatch.setattr(kernels, "XLA_LOGITS_PER_STEP", 2048)
    jax.clear_caches()
    yield
    monkeypatch.undo()
    jax.clear_caches()


def _reference_rows_of_kernels(h, k, y, opts: dict):
    # Not interpreted: on CPU the guard lowers forward_reference and backward_reference.
    return _kernel_rows(h, k, y, opts, interpret=False)


@pytest.mark.parametrize(
    ("option", "dtype"),
    [("cap_weight_smoothing_zloss", jnp.bfloat16), ("ignore_7", jnp.float32),
     ("weight_smoothing_zloss", jnp.float32), ("cap", jnp.float32)],
)  # fmt: skip
def test_kernel_references_match_the_reference(small_reference_steps, option, dtype):
    """What a program XLA partitions runs in place of each kernel (``forward_reference``,
    ``backward_reference``, a few rows or columns per step with padded tails): losses and the
    gradients of hidden, kernel and class weights equal the materialised reference's."""
    h, k, y, w, g = _data(37, 24, 300, dtype)
    opts = OPTIONS[option]
    if "ignore_index" in opts:
        y = y.at[::5].set(opts["ignore_index"])
    got = _value_and_grads(_reference_rows_of_kernels, h, k, y, g, opts, w)
    ref = _value_and_grads(_reference_rows, h, k, y, g, opts, w)
    assert got[1][0].dtype == dtype and got[1][1].dtype == dtype
    for name, a, b in zip(["value", "d hidden", "d kernel", "d weight"],
                          jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):  # fmt: skip
        _close(a, b, dtype, name)


def test_kernel_references_under_vmap(small_reference_steps):
    """The guard's batching rule: a vmapped batch of problems is each problem's result."""
    h, k, y, _, _ = _data(20, 8, 100, jnp.float32)
    hs = jnp.stack([h, 2 * h])
    rows = lambda h: _kernel_rows(h, k, y, {"smoothing": 0.1}, interpret=False)
    grads = lambda h: jax.grad(lambda h: jnp.sum(rows(h)))(h)
    for fn in (rows, grads):
        batched = jax.jit(jax.vmap(fn))(hs)
        for i in range(2):
            _close(batched[i], jax.jit(fn)(hs[i]), jnp.float32, fn.__name__)


@pytest.fixture
def kernel_as_cpu_default(monkeypatch):
    """The TPU kernels registered as the CPU default (not interpreted: guarded, they lower their
    references on CPU), for this test."""
    from jaxloss import _implementations
    from jaxloss._linear import api

    table = _implementations.LINEAR_KERNELS["linear_cross_entropy"]
    monkeypatch.setitem(table, "cpu", api._pallas_tpu)
    defaults = dict(_implementations.DEFAULTS["linear_cross_entropy"], cpu="pallas")
    monkeypatch.setitem(_implementations.DEFAULTS, "linear_cross_entropy", defaults)
    yield from _counting_kernel_calls(monkeypatch)


def _poisoned(reference):
    """``reference`` with NaN outputs: shows which programs run it."""

    def poisoned(*args, **kwargs):
        return jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), reference(*args, **kwargs))

    return poisoned


def _poison_the_references(monkeypatch):
    """Both kernels' references give NaN from now on (fresh compilation caches)."""
    for name in ("forward_reference", "backward_reference"):
        monkeypatch.setattr(kernels, name, _poisoned(getattr(kernels, name)))
    jax.clear_caches()


def test_default_kernels_on_one_device_and_on_several(kernel_as_cpu_default, monkeypatch):
    """``None`` where the kernels are the default: on one device the kernel path (here their
    references: this is CPU), on eight devices with NamedSharding inputs, where XLA partitions
    the program, the XLA form in the forward and the backward pass alike: with the kernels'
    references poisoned, one device gives NaN, eight devices still the XLA form's values and
    gradients."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxloss

    h, k, y, w, _ = _data(32, 16, 200, jnp.float32)

    def vg(impl, *args):
        loss = lambda h, k, y: jaxloss.linear_cross_entropy(
            h, k, y, weight=w, label_smoothing=0.1, implementation=impl
        )
        return jax.jit(jax.value_and_grad(loss, (0, 1)))(*args)

    ref = vg("xla", h, k, y)
    got = vg(None, h, k, y)
    assert kernel_as_cpu_default, "the default did not take the kernel path"
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        _close(a, b, jnp.float32, "one device")
    _poison_the_references(monkeypatch)
    loss, (dh, dk) = vg(None, h, k, y)  # (an ignored token's hidden gradient stays 0)
    assert np.isnan(loss) and np.isnan(dk).all() and np.isnan(dh[y != -100]).all()
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    placed = [jax.device_put(x, NamedSharding(mesh, p)) for x, p in
              ((h, P("data", None)), (k, P()), (y, P("data")))]  # fmt: skip
    for a, b in zip(jax.tree.leaves(vg(None, *placed)), jax.tree.leaves(ref), strict=True):
        _close(a, b, jnp.float32, "eight devices")


# ----------------------------------------------------------------------------------------------
# Inside the shard_map form: each device's tokens through the kernels (batch-sharded)
# ----------------------------------------------------------------------------------------------


def _materialised(h, k, y, opts: dict, reduction="mean"):
    """The materialised reference (``reference.reference_loss``) of the public options."""
    eps, lam, cap = (opts.get(key) for key in ("label_smoothing", "z_loss", "soft_cap"))
    cw = opts.get("weight")
    p = chunked.Problem(h, k, None, y, None, cw, cap, eps is not None, False)
    options = assembly.Options(
        num_classes=k.shape[1], ignore_index=opts.get("ignore_index", -100),
        reduction=reduction, smoothing=eps is not None, z_loss=lam is not None,
    )  # fmt: skip
    hyper = (0.0 if eps is None else eps, 0.0 if lam is None else lam)
    return reference.reference_loss(p, options, hyper)


SHARDED_OPTIONS = {
    "weight_smoothing_zloss": {"weight": True, "label_smoothing": 0.1, "z_loss": 1e-3},
    "cap_ignore": {"soft_cap": 4.0, "ignore_index": 5},
}


def _sharded_check(option, dtype, mesh_axes, reduction="mean", poisoned=False, impl=None, v=300):
    """value_and_grad (of ``hidden``, ``kernel`` and any class weights) of the shard_map form
    on a 4 × 2 CPU mesh against the materialised reference (``v`` classes: 301 split unevenly);
    with ``poisoned`` the kernels' references give NaN (the kernel path shows)."""
    import jaxloss

    h, k, y, w, _ = _data(64, 16, v, dtype)
    opts = dict(SHARDED_OPTIONS[option])
    if opts.get("weight"):
        opts["weight"] = w
    if "ignore_index" in opts:
        y = jnp.where(y == -100, 0, y).at[::7].set(opts["ignore_index"])
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)

    argnums = (0, 1, 2) if opts.get("weight") is not None else (0, 1)

    def total(fn):
        loss = lambda h, k, w: jnp.sum(fn(h, k, dict(opts, weight=w) if w is not None else opts))
        return jax.jit(jax.value_and_grad(loss, argnums))(h, k, opts.get("weight"))

    sharded = lambda h, k, o: jaxloss.linear_cross_entropy(
        h, k, y, mesh=mesh, reduction=reduction, implementation=impl, **mesh_axes, **o
    ).astype(jnp.float32)
    got = total(sharded)
    if poisoned:
        return got
    ref = total(lambda h, k, o: _materialised(h, k, y, o, reduction))
    names = ["value", "d hidden", "d kernel", "d weight"][: 1 + len(argnums)]
    for name, a, b in zip(names, jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        _close(a, b, dtype, f"{option} {mesh_axes} {name}")
    return got


def _check_the_kernels_ran(option, mesh_axes, **kwargs):
    """With the references poisoned: the shard_map form's loss and kernel gradient are NaN."""
    loss, grads = _sharded_check(option, jnp.float32, mesh_axes, poisoned=True, **kwargs)
    assert np.isnan(loss) and np.isnan(grads[1]).all()


@pytest.mark.parametrize(
    "option", [pytest.param(o, marks=() if i == 0 else (pytest.mark.slow,))
               for i, o in enumerate(SHARDED_OPTIONS)],
)  # fmt: skip
def test_batch_sharded_form_takes_the_kernels(kernel_as_cpu_default, monkeypatch, option):
    """``batch_axis`` alone: each device's tokens through the kernels (here, on CPU, their
    guarded references), reduced over the batch axis: exact against the materialised reference
    on a 4 × 2 mesh (tokens over both axes; --full: over one). Poisoned references give NaN there
    (the kernel path runs inside shard_map); --full: with the vocabulary sharded too."""
    tokens = {"batch_axis": ("data", "model")}
    _sharded_check(option, jnp.float32, tokens)
    assert kernel_as_cpu_default
    full = option != next(iter(SHARDED_OPTIONS))
    both = {"batch_axis": "data", "vocab_axis": "model"}
    if full:
        _sharded_check(option, jnp.float32, {"batch_axis": "data"})
        _sharded_check(option, jnp.float32, both)
    _poison_the_references(monkeypatch)
    _check_the_kernels_ran(option, tokens)
    if full:
        _check_the_kernels_ran(option, both)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("option", "dtype", "reduction"),
    [("weight_smoothing_zloss", jnp.float32, "mean"), ("cap_ignore", jnp.bfloat16, "none")],
)
def test_batch_sharded_form_runs_the_kernels_exactly(kernel_on_cpu, option, dtype, reduction):
    """The kernels themselves (TPU interpret mode) inside the batch-sharded form on 8 CPU
    devices, ``implementation="pallas"``: values and gradients of the materialised reference."""
    _sharded_check(option, dtype, {"batch_axis": ("data", "model")}, reduction, impl="pallas")
    assert kernel_on_cpu, "the kernels did not run"


def test_implementation_pallas_in_shard_map_refuses_what_the_kernels_do_not_take(mesh):
    """``"pallas"`` with mesh axes where the kernels do not take the case (a bias) raises; it
    ran the XLA blocks silently."""
    import jaxloss

    h, k = jnp.ones((8, 4)), jnp.ones((4, 15))
    y = jnp.zeros((8,), jnp.int32)
    for axes in ({"batch_axis": "data"}, {"vocab_axis": "model"}):
        with pytest.raises(ValueError, match=r"implementation='pallas'.*bias=True"):
            jaxloss.linear_cross_entropy(
                h, k, y, bias=jnp.zeros(15), mesh=mesh, implementation="pallas", **axes
            )


# ----------------------------------------------------------------------------------------------
# The vocabulary-sharded form: each device's columns through the kernels (kernel_stats)
# ----------------------------------------------------------------------------------------------

# A device's columns of an uneven split (V=301 over 2): the second device's 151 columns start at
# 150, the first of them its neighbour's (sharding.VocabularySplit).
UNEVEN = {"col_start": jnp.int32(150), "width": 151, "owned_from": jnp.int32(151)}
STATS_CASES = [
    pytest.param("cap_weight_smoothing_zloss", jnp.float32, None, id="cap-weight-smoothing-f32"),
    pytest.param("weight_smoothing_zloss", jnp.float32, UNEVEN, id="uneven-weight-smoothing"),
    pytest.param("smoothing", jnp.bfloat16, None, id="smoothing-bf16", marks=pytest.mark.slow),
    pytest.param("cap", jnp.float32, UNEVEN, id="uneven-cap", marks=pytest.mark.slow),
    pytest.param("plain", jnp.float32, None, id="plain-f32", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("option", "dtype", "columns"), STATS_CASES)
def test_kernel_stats_match_the_xla_blocks(monkeypatch, option, dtype, columns):
    """The kernels' raw statistics of a device's columns (``kernel_stats.token_stats``, TPU
    interpret mode, 16 × 128 blocks with tails in both axes) and the gradients of ``hidden``,
    ``kernel`` and the class weights through them equal the XLA blocks' (``chunked.token_stats``),
    with targets another shard owns (outside the columns, in the last block's padding too: no
    target logit here); ``columns``: one device's of an uneven split."""
    from jaxloss._linear import kernel_stats

    monkeypatch.setattr(kernels, "INTERPRET", INTERPRET)
    h, k, y, w, g = _data(37, 24, 300 if columns is None else 301, dtype)
    y = y.at[5].set(310).at[6].set(-3).at[7].set(400)  # 310: a padding column of the last block
    if columns is not None:
        y = y.at[8].set(150).at[9].set(151)  # the neighbour's column, the first of the device's
    opts = OPTIONS[option]
    cw = w if opts.get("weight") else None
    cap = None if "cap" not in opts else jnp.float32(opts["cap"])
    smoothing = "smoothing" in opts

    def total(stats_fn, h, k, cw):
        p = chunked.Problem(h, k, None, y, None, cw, cap, smoothing, False, **(columns or {}))
        s = stats_fn(p)
        value = g @ s.log_sum + (0.7 * g) @ s.tgt
        if smoothing:
            value += (0.3 * g) @ s.wgap
        return value, (s.max, s.log_sum, s.tgt, s.wgap)

    argnums = (0, 1) if cw is None else (0, 1, 2)
    got, want = (
        jax.jit(jax.value_and_grad(functools.partial(total, fn), argnums, has_aux=True))(h, k, cw)
        for fn in (
            functools.partial(kernel_stats.token_stats, blocks=SMALL),
            functools.partial(chunked.token_stats, chunks=(16, 128)),
        )
    )
    names = ["max", "log_sum", "tgt", "wgap", "d hidden", "d kernel", "d weight"]
    leaves = lambda out: [*out[0][1], *out[1]]
    for name, a, b in zip(names[: len(leaves(want))], leaves(got), leaves(want), strict=True):
        if b is not None:
            _close(a, b, dtype, f"{option} {name}")


@pytest.mark.parametrize(
    "option", [pytest.param(o, marks=() if i == 0 else (pytest.mark.slow,))
               for i, o in enumerate(SHARDED_OPTIONS)],
)  # fmt: skip
def test_vocabulary_sharded_form_takes_the_kernels(kernel_as_cpu_default, monkeypatch, option):
    """``vocab_axis`` with ``batch_axis`` (--full: alone, and over 301 classes split
    unevenly): each device's columns through the kernels (here, on CPU, their guarded
    references), combined over the shards: exact against the materialised reference, the class
    weights' gradient included. Poisoned references give NaN (the kernel path runs; before, this
    form always ran the XLA blocks)."""
    full = option != next(iter(SHARDED_OPTIONS))
    vocab = {"vocab_axis": "model"}
    _sharded_check(option, jnp.float32, {"batch_axis": "data", **vocab})
    if full:
        _sharded_check(option, jnp.float32, vocab)
        _sharded_check(option, jnp.float32, vocab, v=301)
    assert kernel_as_cpu_default
    _poison_the_references(monkeypatch)
    for v in (300, 301)[: 1 + full]:
        _check_the_kernels_ran(option, vocab, v=v)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("option", "dtype", "reduction"),
    [("weight_smoothing_zloss", jnp.bfloat16, "sum"), ("cap_ignore", jnp.float32, "none")],
)
def test_vocabulary_sharded_form_runs_the_kernels_exactly(kernel_on_cpu, option, dtype, reduction):
    """The kernels themselves (TPU interpret mode) in the vocabulary-sharded form on 8 CPU
    devices, ``implementation="pallas"``: values and gradients of the materialised reference."""
    axes = {"batch_axis": "data", "vocab_axis": "model"}
    _sharded_check(option, dtype, axes, reduction, impl="pallas")
    _sharded_check(option, dtype, axes, reduction, impl="pallas", v=301)
