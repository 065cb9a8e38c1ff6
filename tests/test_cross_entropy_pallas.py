"""cross_entropy's Pallas TPU kernel (issue 17 items 3-5).

Exactness: the kernel runs in Pallas's interpret mode on CPU and is compared with the XLA form
(``implementation="xla"``) over the options, in value and gradient. Compile-only TPU programs
(v5e, v5p, v6e through libtpu; see tests/test_accelerators.py): Mosaic compiles the kernel, the
optimised program holds one ``tpu_custom_call``, its temporaries are small, and the modelled
bytes of ``value_and_grad`` are one read of the logits and one write of the gradient, with the
kernel priced from its grid (a block is fetched whenever its block index changes).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close_to_scale
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P
from test_accelerators import SHAPE, compile_for, compile_only, hbm_bytes

import jaxloss
from benchmarks import hlo
from benchmarks.targets import devices
from jaxloss import _cross_entropy_pallas
from jaxloss._cross_entropy_pallas import pallas_tpu


@pytest.fixture
def interpret():
    with _cross_entropy_pallas.interpret_mode():
        yield


def _data(n, c, dtype, seed=0):
    rng = np.random.default_rng(seed)
    z = (rng.normal(size=(n, c)) * 4).astype(np.float32)
    z[1, ::3] = -np.inf  # masked classes
    y = rng.integers(0, c, n)
    y[2] = -100  # ignored
    weight = rng.uniform(0.2, 2.0, c).astype(np.float32)
    return jnp.asarray(z, dtype), jnp.asarray(y, jnp.int32), jnp.asarray(weight)


OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "smoothing": {"label_smoothing": 0.1},
    "weight_smoothing_zloss": {"weight": True, "label_smoothing": 0.2, "z_loss": 1e-3},
    "zloss": {"z_loss": 1e-2},
    "ignore_7": {"ignore_index": 7},
}
# (rows, classes): one block; blocks the rows do not divide (256-row blocks); a class count that
# is no multiple of 128; chunks of the row swept in a loop (4224 = 3 × 1408).
SIZES = [(37, 640), (300, 640), (45, 300), (20, 4224)]


def _call(z, y, w, opts, reduction, implementation):
    kw = {k: v for k, v in opts.items() if k != "weight"}
    if opts.get("weight"):
        kw["weight"] = w

    def loss(z, y):  # y traced: bad targets give NaN instead of PyTorch's eager error
        out = jaxloss.cross_entropy(z, y, reduction=reduction, implementation=implementation, **kw)
        return jnp.sum(out * jnp.arange(1, out.size + 1).reshape(out.shape).astype(out.dtype))

    return jax.jit(jax.value_and_grad(loss))(z, y)


def _close(a, b, dtype, what):
    assert_close_to_scale(a, b, 1e-5 if dtype == jnp.float32 else 1e-2, what)


def _grid():
    """Pairwise: every pair of values of any two of size, option, reduction and dtype in some
    case (24 of the 144 combinations; the kernel's code paths are chosen by one option, size or
    dtype at a time, so no case needs three of them together). The default run takes one case an
    option, which together hold each size, reduction and dtype; the full run all 24."""
    dtypes, reductions = [jnp.float32, jnp.bfloat16], ["mean", "sum", "none"]
    for (i, size), (j, option) in itertools.product(enumerate(SIZES), enumerate(OPTIONS)):
        reduction, dtype = reductions[(i + j) % 3], dtypes[(i + j // 3) % 2]
        ids = f"{size}-{option}-{reduction}-{'f32' if dtype == jnp.float32 else 'bf16'}"
        marks = () if i == j % len(SIZES) else (pytest.mark.slow,)
        yield pytest.param(size, option, reduction, dtype, id=ids, marks=marks)


def test_the_grid_holds_every_pair():
    cases = [p.values for p in _grid()]
    for a, b in itertools.combinations(range(4), 2):
        pairs = {(case[a], case[b]) for case in cases}
        assert len(pairs) == len({c[a] for c in cases}) * len({c[b] for c in cases}), (a, b)
    default = [p.values for p in _grid() if not p.marks]
    assert all(len({c[k] for c in default}) == len({c[k] for c in cases}) for k in range(4))


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("size, option, reduction, dtype", list(_grid()))
def test_kernel_matches_the_xla_form(size, option, reduction, dtype):
    z, y, w = _data(*size, dtype)
    opts = OPTIONS[option]
    if "ignore_index" in opts:
        y = y.at[::5].set(opts["ignore_index"])
    value, grad = _call(z, y, w, opts, reduction, "pallas")
    ref_value, ref_grad = _call(z, y, w, opts, reduction, "xla")
    assert grad.dtype == z.dtype
    _close(value, ref_value, dtype, "value")
    _close(grad, ref_grad, dtype, "gradient")


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize(
    "reduction",
    [
        "mean",
        pytest.param("sum", marks=pytest.mark.slow),
        pytest.param("none", marks=pytest.mark.slow),
    ],
)
def test_all_ignored_and_bad_targets(reduction):
    """Every target ignored: the mean is NaN with zero gradients (PyTorch); an out-of-range
    target makes its position NaN and its row's gradient NaN, as in the XLA form."""
    z, y, w = _data(300, 640, jnp.float32)
    for targets in (jnp.full_like(y, -100), y.at[4].set(640).at[9].set(-3)):
        for opts in ({}, {"weight": True, "label_smoothing": 0.1, "z_loss": 1e-3}):
            got = _call(z, targets, w, opts, reduction, "pallas")
            want = _call(z, targets, w, opts, reduction, "xla")
            _close(got[0], want[0], jnp.float32, "value")
            _close(got[1], want[1], jnp.float32, "gradient")
    value, grad = _call(z, jnp.full_like(y, -100), w, {}, "mean", "pallas")
    assert np.isnan(value) and not np.asarray(grad).any()


@pytest.mark.usefixtures("interpret")
def test_forward_mode_vmap_and_weight_gradient():
    """jvp, vmap and the gradient in the class weights (from the XLA form) agree with "xla"."""
    z, y, w = _data(37, 640, jnp.float32)

    def f(impl):
        return lambda z, w: jaxloss.cross_entropy(
            z, y, weight=w, label_smoothing=0.1, implementation=impl
        )

    dz = jnp.ones_like(z)
    for got, want in [
        (jax.jvp(f("pallas"), (z, w), (dz, w)), jax.jvp(f("xla"), (z, w), (dz, w))),
        (jax.grad(f("pallas"), 1)(z, w), jax.grad(f("xla"), 1)(z, w)),
        (jax.vmap(f("pallas"), (0, None))(z[None].repeat(3, 0), w),
         jax.vmap(f("xla"), (0, None))(z[None].repeat(3, 0), w)),
    ]:  # fmt: skip
        _close(jnp.asarray(got), jnp.asarray(want), jnp.float32, "transformed")


def test_kernel_outputs_vary_as_its_inputs_inside_shard_map():
    """Inside ``jax.shard_map`` the kernel primitive's loss and gradient are typed as varying
    over the mesh axis its rows vary over: typed invariant, they claimed that every device
    holds the same values, which JAX's collectives and transposes rely on."""
    from jaxloss._blockwise.blocks import _vma

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
    opts = pallas_tpu.Options(smoothing=False, z_loss=False, class_weight=False, with_grad=True)
    types = []

    def body(z, y):
        row_data = jnp.ones((z.shape[0], pallas_tpu.ROW_FIELDS), jnp.float32)
        loss, grad = pallas_tpu.rows(z, y, row_data, jnp.zeros(3), None, opts=opts)
        types.extend(_vma(x) for x in (loss, grad))
        return loss

    rows = jax.shard_map(body, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P("data"))
    jax.make_jaxpr(rows)(jnp.zeros((16, 256)), jnp.zeros(16, jnp.int32))
    assert types == [frozenset({"data"})] * 2


# ----------------------------------------------------------------------------------------------
# The choice: errors for "pallas" where there is no kernel, the XLA form on CPU
# ----------------------------------------------------------------------------------------------


def test_pallas_on_cpu_and_unsupported_cases_raise():
    z, y, _ = _data(8, 256, jnp.float32)
    with pytest.raises(ValueError, match=r"cross_entropy: implementation='pallas' .*cpu backend"):
        jaxloss.cross_entropy(z, y, implementation="pallas")
    with pytest.raises(ValueError, match=r"cross_entropy: implementation='pallas' .*probability"):
        jaxloss.cross_entropy(z, jax.nn.softmax(z), implementation="pallas")
    with pytest.raises(ValueError, match=r"cross_entropy: implementation='pallas' .*class axis"):
        jaxloss.cross_entropy(z.reshape(8, 256, 1), y[:, None], axis=1, implementation="pallas")
    # Type-checked runs refuse the string at the annotation (a TypeError naming the argument).
    with pytest.raises((ValueError, TypeError), match=r"implementation"):
        jaxloss.cross_entropy(z, y, implementation="triton")


def test_cpu_default_is_the_xla_form():
    z, y, _ = _data(64, 512, jnp.float32)
    fn = jax.value_and_grad(lambda z: jaxloss.cross_entropy(z, y))
    xla = jax.value_and_grad(lambda z: jaxloss.cross_entropy(z, y, implementation="xla"))
    assert _program(fn, z) == _program(xla, z)


def _program(fn, *args) -> list[str]:
    """The optimised program, names and source metadata (the Python frames) left out."""
    return hlo.anonymous(jax.jit(fn).lower(*args).compile().as_text())


def test_rows_too_wide_for_vmem_fall_back():
    assert pallas_tpu.supported(8192, 131072, jnp.float32)
    assert not pallas_tpu.supported(8192, 1 << 20, jnp.float32)  # 8 rows of 4 MiB: no
    assert not pallas_tpu.supported(8192, 131072, jnp.float64)


# ----------------------------------------------------------------------------------------------
# Compile-only TPUs: Mosaic compiles, one custom call, 1.0x copy priced from the grid
# ----------------------------------------------------------------------------------------------


def grid_bytes(jaxpr) -> int:
    """HBM bytes of every pallas_call in ``jaxpr``, priced from its grid by the benchmarks'
    pricer (``benchmarks.hlo.price_grid``: a block is fetched, or written back, whenever
    its block index changes; an unchanged block is not re-fetched)."""
    costs = hlo.pallas_costs(jaxpr).values()
    assert all(isinstance(c, hlo.GridCost) for c in costs), costs
    return sum(c.bytes for c in costs)


def _kernel_jaxpr(n, c, dtype):
    opts = pallas_tpu.Options(smoothing=False, z_loss=False, class_weight=False, with_grad=True)
    args = (
        jax.ShapeDtypeStruct((n, c), dtype),
        jax.ShapeDtypeStruct((n,), jnp.int32),
        jax.ShapeDtypeStruct((n, pallas_tpu.ROW_FIELDS), jnp.float32),
        jax.ShapeDtypeStruct((3,), jnp.float32),
    )
    return jax.make_jaxpr(lambda *a: pallas_tpu.loss_rows(*a, None, opts=opts))(*args).jaxpr


@compile_only
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("target", ["tpu-v5e", "tpu-v5p", "tpu-v6e"])
def test_value_and_grad_is_one_copy_on_tpu(target, dtype):
    """value_and_grad of the mean at 8192×131072: one tpu_custom_call; the kernel, priced from
    its grid, and the whole optimised program move ≤ 1.001× copy (read the logits once, write
    the gradient once; the XLA form moves 1.50×); temporaries ≤ 16 MiB."""
    dt = {"f32": jnp.float32, "bf16": jnp.bfloat16}[dtype]
    n, c = SHAPE
    copy = 2 * n * c * jnp.dtype(dt).itemsize
    loss = lambda x, y: jaxloss.cross_entropy(x, y)
    compiled = compile_for(target, jax.value_and_grad(loss), ((n, c), dt), ((n,), jnp.int32))
    text = compiled.as_text()
    assert text.count("tpu_custom_call") == 1
    kernel = grid_bytes(_kernel_jaxpr(n, c, dt))
    assert copy <= kernel <= 1.001 * copy, f"kernel moves {kernel / copy:.5f}x copy"
    program = hbm_bytes(text)
    assert program <= 1.001 * copy, f"program moves {program / copy:.5f}x copy"
    assert compiled.memory_analysis().temp_size_in_bytes <= 16 * 2**20


@compile_only
def test_pallas_where_xla_partitions_the_program_says_what_to_do():
    """Eight v5e chips: with NamedSharding inputs and no shard_map the default takes the XLA
    form (no custom call) and ``"pallas"`` raises a ValueError naming the argument and
    shard_map (it was Mosaic's NotImplementedError); inside shard_map (where the default failed
    at trace time: the kernel's outputs were not typed as varying over the mesh) both lower to
    the kernel, and on one chip ``"pallas"`` does."""
    mesh = Mesh(np.array(devices("tpu-v5e", multi=True)[:8]), ("data",))
    rows, one = NamedSharding(mesh, P("data")), SingleDeviceSharding(devices("tpu-v5e")[0])
    n, c = 256, 4096

    def lowered(impl, sharding, in_shard_map=False):
        loss = lambda x, y: jaxloss.cross_entropy(x, y, implementation=impl)
        if in_shard_map:  # per-row losses on each device's rows, their mean outside
            rows_loss = lambda x, y: jaxloss.cross_entropy(
                x, y, reduction="none", implementation=impl
            )
            per_row = jax.shard_map(rows_loss, mesh=mesh, in_specs=(P("data"), P("data")),
                                    out_specs=P("data"))  # fmt: skip
            loss = lambda x, y: jnp.mean(per_row(x, y))
        args = [jax.ShapeDtypeStruct((n, c), jnp.float32, sharding=sharding),
                jax.ShapeDtypeStruct((n,), jnp.int32, sharding=sharding)]  # fmt: skip
        return jax.jit(jax.value_and_grad(loss)).trace(*args).lower()

    assert "tpu_custom_call" not in lowered(None, rows).as_text()
    with pytest.raises(
        ValueError, match=r"cross_entropy: implementation='pallas'.*inside jax.shard_map"
    ):
        lowered("pallas", rows)
    for impl in (None, "pallas"):
        in_shard_map = lowered(impl, rows, in_shard_map=True)
        assert in_shard_map.as_text().count("tpu_custom_call") == 1, impl
    assert in_shard_map.compile().as_text().count("tpu_custom_call") == 1  # Mosaic compiles it
    assert lowered("pallas", one).as_text().count("tpu_custom_call") == 1


def test_grid_pricing_counts_a_refetched_block():
    """The pricer counts a block again only when its index changes: a (rows × 128) grid over a
    constant-index input fetches it once, a row-indexed input once per row block."""
    n, c = 64, 256
    jaxpr = _kernel_jaxpr(n, c, jnp.float32)
    bn = pallas_tpu.block_rows(n, c, jnp.float32)
    assert bn == n  # one block: each array once
    expected = (2 * n * c + n + n * pallas_tpu.ROW_FIELDS + n) * 4 + 3 * 4 + 128 * 4
    assert grid_bytes(jaxpr) == expected
