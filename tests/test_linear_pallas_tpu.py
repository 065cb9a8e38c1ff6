"""linear_cross_entropy's Pallas TPU kernels compiled for compile-only TPUs (issue 17, ``accel``).

Mosaic (libtpu) compiles both kernels at 8192×2048×131072 for v5e and v5p: the program holds one
``tpu_custom_call`` per kernel, temporaries stay under 256 MiB, and the modelled time of
``value_and_grad`` prices each kernel from its grid (``benchmarks.hlo.price_grid``: a block is
fetched when its index changes). The default ``implementation`` takes them on one chip and in the
``shard_map`` forms over eight; not where XLA partitions the program. The kernels' exactness is
``test_linear_pallas.py``'s (TPU interpret mode on CPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_linear_pallas import _kernel_rows

from benchmarks import hlo
from benchmarks.targets import TARGETS, devices
from jaxloss._linear import pallas_tpu as kernels

pytestmark = [pytest.mark.accel, pytest.mark.slow]

LLM = (8192, 2048, 131072)  # an LLM head: N tokens, D features, V classes
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
NAMES = ("jaxloss_linear_forward", "jaxloss_linear_backward")


def _compile(target: str, fn, specs):
    return hlo.compile_program(TARGETS[target], fn, specs)


def _modelled(target: str, program=None, *, text: str = "", pallas=None):
    """The roofline of a compiled program (or of its optimised ``text`` and the ``pallas``
    kernels' grid prices), each Pallas kernel priced from its grid. Its custom call carries the
    name under the transformations it was traced in (``jvp(...)``, ``transpose(jvp(...))``):
    each is matched to the kernel named inside."""
    if program is not None:
        text, pallas = program.text, program.pallas
    called = {hlo.pallas_name(launch.inst) for launch in hlo.launches(hlo.Module(text)).launches}
    costs = {c: cost for c in called for name, cost in pallas.items() if name in c}
    return hlo.roofline(text, TARGETS[target], costs)


def _specs(dtype):
    n, d, v = LLM
    return [jax.ShapeDtypeStruct((n, d), dtype), jax.ShapeDtypeStruct((d, v), dtype),
            jax.ShapeDtypeStruct((n,), jnp.int32)]  # fmt: skip


def _mean_of(rows):
    return lambda h, k, y: jnp.mean(rows(h, k, y))


# Modelled value_and_grad of the mean at 8192×2048×131072 (benchmarks.hlo, grid prices):
# the two kernels are compute-bound (two N·D·V matmuls each at the peak); the rest is the
# target-column gather and per-token work. Goal lines reached, not the 1.0x.
# Reached: v5p 38.55 (bf16) / 38.64 ms (f32), v5e 90.04 / 90.20 ms; four matmuls at the peak are
# 38.33 / 89.30 ms; the materialised path 31.1 / 30.3 ms on v5p (issue 17).
MODELLED_MS = {("tpu-v5p", "bf16"): 38.7, ("tpu-v5p", "f32"): 38.7, ("tpu-v5e", "bf16"): 90.4}


def _default_mean(implementation=None):
    import jaxloss

    return lambda h, k, y: jaxloss.linear_cross_entropy(h, k, y, implementation=implementation)


@pytest.mark.parametrize(
    ("target", "dtype"), [("tpu-v5p", "bf16"), ("tpu-v5p", "f32"), ("tpu-v5e", "bf16")]
)
def test_the_default_compiles_the_kernels_for_one_chip(target, dtype):
    """value_and_grad of ``linear_cross_entropy``'s mean, default ``implementation``: Mosaic
    compiles both kernels (one tpu_custom_call each), temporaries ≤ 256 MiB, four N·D·V
    matmuls, each kernel compute-bound when priced from its grid, and the modelled time within
    the goal line above."""

    program = _compile(target, jax.value_and_grad(_default_mean(), (0, 1)), _specs(DTYPES[dtype]))
    assert program.text.count("tpu_custom_call") == 2
    # Issue 17 allows 512 MiB; issue 8 asked 256 MiB of v5p float32 (the XLA form needs 560).
    assert program.compiled.memory_analysis().temp_size_in_bytes <= 256 * 2**20
    n, d, v = LLM
    matmul = 2.0 * n * d * v
    model = _modelled(target, program)
    assert not model.unpriced
    assert model.matmuls(matmul) == pytest.approx(4.0)
    for name in NAMES:
        cost = program.pallas[name]
        assert cost.flops == pytest.approx(2 * matmul)
        peak = TARGETS[target].peak_flops["bf16"]  # f32 at DEFAULT precision: one bf16 pass
        assert cost.bytes / TARGETS[target].bandwidth < cost.flops / peak, name
    assert model.seconds * 1e3 <= MODELLED_MS[target, dtype]


def test_pallas_lowers_to_the_kernels_and_xla_to_none():
    """On a v5p, ``"pallas"`` lowers to the two kernels and ``"xla"`` to none (the default's
    compiled program is the test above's)."""

    dev = jax.sharding.SingleDeviceSharding(devices("tpu-v5p")[0])
    specs = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev) for s in _specs(jnp.bfloat16)]
    for implementation, kernels_in_it in (("pallas", 2), ("xla", 0)):
        fn = jax.value_and_grad(_default_mean(implementation), (0, 1))
        text = jax.jit(fn).trace(*specs).lower().as_text()
        assert text.count("tpu_custom_call") == kernels_in_it, implementation


def test_forward_alone_is_one_kernel_of_one_matmul():
    """The loss without its gradient: one tpu_custom_call (the forward kernel without the
    hidden-gradient accumulator): one N·D·V matmul, the kernel fetched once per token block."""
    rows = lambda h, k, y: _kernel_rows(h, k, y, {}, blocks=None, interpret=False)
    program = _compile("tpu-v5p", _mean_of(rows), _specs(jnp.bfloat16))
    assert program.text.count("tpu_custom_call") == 1
    n, d, v = LLM
    cost = program.pallas["jaxloss_linear_forward"]
    bn, _ = kernels.choose_blocks(n, d, v, jnp.bfloat16, sums=1).forward  # pyright: ignore[reportOptionalMemberAccess]
    assert cost.flops == pytest.approx(2.0 * n * d * v)
    assert cost.fetches[2] == (n // bn) * (v // kernels.FORWARD_BLOCKS[0][1])
    assert cost.read_bytes[2] == (n // bn) * d * v * 2  # K once per token block
    assert cost.read_bytes[1] == n * d * 2  # h once


def _auto_partitioned(impl, topology="v5p:2x2x1"):
    """value_and_grad of the mean, compiled for a 4-chip v5p with batch-sharded ``hidden`` and
    targets and a replicated kernel, no mesh axes named: XLA partitions the program."""
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxloss

    devices = topologies.get_topology_desc(topology, "tpu").devices
    mesh = Mesh(np.array(devices).reshape(-1), ("data",))
    n, d, v = 1024, 256, 8192
    shapes = [((n, d), jnp.bfloat16, P("data", None)), ((d, v), jnp.bfloat16, P()),
              ((n,), jnp.int32, P("data"))]  # fmt: skip
    args = [jax.ShapeDtypeStruct(s, t, sharding=NamedSharding(mesh, p)) for s, t, p in shapes]
    loss = lambda h, k, y: jaxloss.linear_cross_entropy(h, k, y, implementation=impl)
    return str(jax.jit(jax.value_and_grad(loss, (0, 1))).trace(*args).lower().compile().as_text())


def test_the_tpu_default_is_the_xla_form_where_xla_partitions_the_program():
    """Several chips, no shard_map: Mosaic cannot lower a kernel XLA is to partition, so the
    default takes the XLA form for the forward and the backward pass alike (no custom call, the
    very program of ``"xla"``); ``"pallas"`` says what to do instead of Mosaic's error."""

    default = _auto_partitioned(None)
    assert "tpu_custom_call" not in default
    assert hlo.anonymous(default) == hlo.anonymous(_auto_partitioned("xla"))
    with pytest.raises(ValueError, match=r"implementation='pallas'.*partitioned by XLA.*mesh"):
        _auto_partitioned("pallas")


def _on_eight_chips(mesh_shape, n, d, v, **axes):
    """The optimised program of value_and_grad of the default mean over a v5p:2x2x2 mesh of
    ``mesh_shape`` (axes "data", "model"), bf16 inputs laid out as ``axes`` name, and its
    roofline (each kernel priced from its grid)."""
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxloss

    chips = np.array(topologies.get_topology_desc("v5p:2x2x2", "tpu").devices)
    mesh = Mesh(chips.reshape(mesh_shape), ("data", "model")[: len(mesh_shape)])
    rows, cols = axes.get("batch_axis"), axes.get("vocab_axis")
    shapes = [((n, d), jnp.bfloat16, P(rows, None)), ((d, v), jnp.bfloat16, P(None, cols)),
              ((n,), jnp.int32, P(rows))]  # fmt: skip
    args = [jax.ShapeDtypeStruct(s, t, sharding=NamedSharding(mesh, p)) for s, t, p in shapes]
    loss = lambda h, k, y: jaxloss.linear_cross_entropy(h, k, y, mesh=mesh, **axes)
    traced = jax.jit(jax.value_and_grad(loss, (0, 1))).trace(*args)
    text = hlo.optimised_text(traced.lower())
    return text, _modelled("tpu-v5p", text=text, pallas=hlo.pallas_costs(traced.jaxpr))


def test_batch_sharded_form_compiles_the_kernels_on_eight_chips():
    """``batch_axis`` over a v5p:2x2x2 (8 chips), default ``implementation``: each chip runs
    both kernels (one tpu_custom_call each) on its tokens, four N·D·V matmuls per chip priced
    from the grids; the only collectives are the kernel gradient's one all-reduce over the
    tokens and scalar sums of the mean: no all-gather (of logits or kernel) at all."""
    from test_pod import census

    n, d, v = 8 * 2048, 1024, 32768
    text, model = _on_eight_chips((8,), n, d, v, batch_axis="data")
    assert text.count("tpu_custom_call") == 2
    moved = census(text)
    assert {m.kind for m in moved} == {"all-reduce"}, moved
    wide = [m for m in moved if m.dims]
    assert [(m.dims, m.nbytes) for m in wide] == [((d, v), d * v * 2)], wide
    assert not model.unpriced
    assert model.matmuls(2.0 * n // 8 * d * v) == pytest.approx(4.0)


def test_vocabulary_sharded_form_compiles_the_kernels_on_eight_chips():
    """Tokens over 2 chips, the vocabulary over 4 (v5p:2x2x2), default ``implementation``: each
    chip runs both kernels on its tokens and its columns, four N·D·V matmuls per chip; the
    collectives are all-reduces, the wide ones the kernel gradient over the tokens and the
    hidden gradient over the vocabulary (as with the XLA blocks): no all-gather."""
    from test_pod import census

    n, d, v = 2 * 2048, 1024, 4 * 8192
    text, model = _on_eight_chips((2, 4), n, d, v, batch_axis="data", vocab_axis="model")
    assert text.count("tpu_custom_call") == 2
    moved = census(text)
    assert {m.kind for m in moved} == {"all-reduce"}, moved
    wide = sorted((m.dims, m.nbytes) for m in moved if len(m.dims) == 2)
    assert wide == sorted([((d, v // 4), d * v // 4 * 2), ((n // 2, d), n // 2 * d * 2)]), wide
    assert not model.unpriced
    assert model.matmuls(2.0 * n // 2 * d * v // 4) == pytest.approx(4.0)
