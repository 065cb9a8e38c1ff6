"""Compile-only H100 and TPU programs (issue 8): modelled HBM traffic, temporaries, sharding.

Nothing here runs on an accelerator: JAX compiles for an H100 (the CUDA PJRT plugin and the
device description in ``benchmarks/targets/h100_sxm.txtpb``) and for TPUs (``libtpu``) on this
CPU-only machine, and the tests read the optimised programs. The plugins are in the ``accel``
extra (not in ``test``: they print start-up errors on every JAX start of a machine without the
accelerator); without them these tests skip, naming the extra. Every compile is large, so they
are ``slow`` too (``python -m pytest --full``). The environment they need (the CUDA plugin's
check skipped, libtpu shareable) is set in ``conftest.py``, before JAX starts.

Traffic model, as in ``python -m benchmarks --target`` and read by the same HLO reader
(``benchmarks/hlo.py``): every kernel of the optimised program reads its operands from HBM and
writes its result there; an operand a fusion only gathers from counts the bytes gathered.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import jaxloss
from benchmarks import hlo
from benchmarks.targets import TARGETS, devices

SHAPE = (8192, 131072)  # a 128 Ki vocabulary; v5e's 16 GiB hold its f32 logits and gradient
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


def compile_only(test):
    """A test that compiles for a target: it needs the plugins, and each compile takes seconds."""
    return pytest.mark.accel(pytest.mark.slow(test))


def compile_for(target: str, fn, *shapes_dtypes):
    sharding = SingleDeviceSharding(devices(target)[0])
    args = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes_dtypes]
    return jax.jit(fn).trace(*args).lower().compile()


# ----------------------------------------------------------------------------------------------
# The traffic model
# ----------------------------------------------------------------------------------------------


def hbm_bytes(text: str) -> int:
    """Operands + results of every kernel the program launches (see module doc)."""
    return hlo.entry_traffic(text).bytes


@compile_only
def test_traffic_model_counts_a_copy_and_a_gather():
    """A copy moves its bytes twice; gathering one logit per row reads N elements, not N×C."""
    n, c = 1024, 4096
    copy = compile_for("h100", lambda x: x * 2, ((n, c), jnp.float32))
    assert hbm_bytes(copy.as_text()) == 2 * n * c * 4
    pick = compile_for(
        "h100",
        lambda x, y: jnp.take_along_axis(x, y[:, None], 1),
        ((n, c), jnp.float32),
        ((n,), jnp.int32),
    )
    assert hbm_bytes(pick.as_text()) < 4 * n * 4 * 2  # indices, gathered values: no [N, C]


# ----------------------------------------------------------------------------------------------
# cross_entropy: one pass of the forward over the logits, one read + write in the backward
# ----------------------------------------------------------------------------------------------


@compile_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target", ["h100", "tpu-v5e"])
def test_cross_entropy_reads_the_logits_once_forward_and_twice_with_the_gradient(target, dtype):
    """value_and_grad <= 1.5x the copy floor (read the logits, write the gradient), forward
    <= 1.05x the logits' bytes; both within N-sized vectors (0.1 % of the logits' bytes)."""
    dt = DTYPES[dtype]
    logits = SHAPE[0] * SHAPE[1] * jnp.dtype(dt).itemsize
    rows = 1e-3 * logits
    args = ((SHAPE, dt), (SHAPE[:1], jnp.int32))
    loss = lambda x, y: jaxloss.cross_entropy(x, y)
    fwd = hbm_bytes(compile_for(target, loss, *args).as_text())
    vag = hbm_bytes(compile_for(target, jax.value_and_grad(loss), *args).as_text())
    assert fwd <= 1.05 * logits + rows, f"forward reads {fwd / logits:.4f}x the logits"
    assert vag <= 1.5 * 2 * logits + rows, f"value_and_grad moves {vag / (2 * logits):.4f}x copy"


# ----------------------------------------------------------------------------------------------
# Everything else: no more bytes than its optax / jax.nn peer
# ----------------------------------------------------------------------------------------------

N, C = 2048, 131072  # ratios to a peer do not depend on N; compiles are faster


def _smoothed_weighted_peer(x, y, w):
    t = optax.smooth_labels(jax.nn.one_hot(y, C, dtype=x.dtype), 0.1) * w[None].astype(x.dtype)
    return optax.softmax_cross_entropy(x, t).sum() / w[y].sum().astype(x.dtype)


PEER_CASES = {
    "cross_entropy_probs": (
        lambda x, t: jaxloss.cross_entropy(x, t),
        lambda x, t: optax.softmax_cross_entropy(x, t).mean(),
        (((N, C), jnp.float32), ((N, C), jnp.float32)),
    ),
    "cross_entropy_smooth_weight": (
        lambda x, y, w: jaxloss.cross_entropy(x, y, weight=w, label_smoothing=0.1),
        _smoothed_weighted_peer,
        (((N, C), jnp.float32), ((N,), jnp.int32), ((C,), jnp.float32)),
    ),
    "softmax": (
        lambda x, g: jnp.sum(jaxloss.softmax(x) * g),
        lambda x, g: jnp.sum(jax.nn.softmax(x) * g),
        (((N, C), jnp.bfloat16), ((N, C), jnp.bfloat16)),
    ),
    "log_softmax": (
        lambda x, g: jnp.sum(jaxloss.log_softmax(x) * g),
        lambda x, g: jnp.sum(jax.nn.log_softmax(x) * g),
        (((N, C), jnp.bfloat16), ((N, C), jnp.bfloat16)),
    ),
}


PEER_POINTS = [(target, case) for target in ("h100", "tpu-v5e") for case in PEER_CASES]


@compile_only
@pytest.mark.parametrize(("target", "case"), PEER_POINTS)
def test_value_and_grad_moves_no_more_than_its_peer(target, case):
    """Within 0.1 % (of the peer's bytes or the logits', the larger) of the optax / jax.nn peer."""
    ours, peer, args = PEER_CASES[case]
    mine, theirs = (
        hbm_bytes(compile_for(target, jax.value_and_grad(f), *args).as_text()) for f in (ours, peer)
    )
    slack = 1e-3 * max(theirs, N * C * jnp.dtype(args[0][1]).itemsize)
    assert mine <= theirs + slack, f"{case}: {mine / theirs:.4f}x the peer's bytes"


# ----------------------------------------------------------------------------------------------
# linear_cross_entropy at LLM shapes: temporaries only (its blockwise loops defeat the model)
# ----------------------------------------------------------------------------------------------


_V5P_DEFAULT_PRECISION = pytest.mark.xfail(
    strict=True,
    reason="issue 8 goal not met by the XLA form at TPU DEFAULT matmul precision: XLA:TPU runs "
    "float32 matmuls as bf16 passes and keeps a bf16 copy of the whole kernel for them (512 MiB "
    "of the 560; an optimization_barrier is removed before it matters, no chunk size avoids "
    "it). The TPU default, the Pallas kernels, holds 212 MiB",
)


@compile_only
@pytest.mark.parametrize(
    ("target", "shape", "dtype", "precision", "implementation", "limit_mib"),
    [
        ("h100", (8192, 4096, 131072), "bf16", None, None, 256),
        ("tpu-v5p", (8192, 2048, 131072), "f32", "float32", None, 256),
        pytest.param(
            "tpu-v5p", (8192, 2048, 131072), "f32", None, "xla", 256,
            marks=_V5P_DEFAULT_PRECISION,
        ),
    ],
)  # fmt: skip
def test_linear_cross_entropy_temporaries(
    target, shape, dtype, precision, implementation, limit_mib
):
    """GPUs and TPUs take the recomputing pass for "mean" (the fused one keeps float32
    gradient accumulators of the whole kernel: 2.1 GiB on this H100). On TPUs the default is the
    Pallas kernels, whose accumulators live in VMEM: test_linear_pallas_tpu.py holds them to
    256 MiB at these shapes."""
    n, d, v = shape
    dt = DTYPES[dtype]
    head = functools.partial(jaxloss.linear_cross_entropy, implementation=implementation)
    fn = jax.value_and_grad(lambda h, k, y: head(h, k, y), argnums=(0, 1))
    with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
        compiled = compile_for(target, fn, ((n, d), dt), ((d, v), dt), ((n,), jnp.int32))
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp <= limit_mib * 2**20, f"{temp / 2**20:.0f} MiB of temporaries"


@compile_only
@pytest.mark.parametrize(("divergence", "limit_ms"), [("kl", 64), ("jsd", 86)])
def test_linear_distillation_temporaries_and_time_on_h100(divergence, limit_ms):
    """On GPUs the student's half-precision hidden gradient is carried in float32 through the
    kernel pass (128 MiB at this 8B-class shape, bf16), with the linear head's whole-batch
    blocks: 240 MiB, within issue 17's 512 MiB, for two N·D·V matmuls fewer. Modelled time
    (compiler figures): KL 62.8 ms (67.9 with a fold per head and the teacher's rows zeroed in
    every block; 159.2 before the carry), JSD 84.4 ms (89.5 with its two sums apart on GPUs,
    ``online.row_sums``). The temporaries were 288 MiB with that zeroing."""
    n, d, v = 8192, 4096, 131072
    bf16 = jnp.bfloat16
    loss = functools.partial(jaxloss.linear_distillation, divergence=divergence)
    fn = jax.value_and_grad(loss, argnums=(0, 1))
    compiled = compile_for("h100", fn, *(((n, d), bf16), ((d, v), bf16)) * 2)
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp <= 256 * 2**20, f"{temp / 2**20:.0f} MiB of temporaries"
    seconds = hlo.roofline(compiled.as_text(), TARGETS["h100"]).seconds
    assert seconds <= limit_ms * 1e-3, f"{divergence}: {seconds * 1e3:.2f} ms modelled"


# ----------------------------------------------------------------------------------------------
# Eight devices: sharded over the classes or the batch, nothing vocabulary-wide is gathered
# ----------------------------------------------------------------------------------------------

SN, SD, SV = 256, 96, 65536  # distinct sizes: a dimension in an HLO shape says which it is


def _mesh(target: str) -> Mesh:
    return Mesh(np.array(devices(target, multi=True)).reshape(2, 4), ("data", "model"))


def _placed(mesh: Mesh, *shape_dtype_spec):
    return [
        jax.ShapeDtypeStruct(s, d, sharding=NamedSharding(mesh, p)) for s, d, p in shape_dtype_spec
    ]


@compile_only
@pytest.mark.parametrize("layout", ["classes", "batch"])
@pytest.mark.parametrize("target", ["h100", "tpu-v5e"])
def test_sharded_cross_entropy_gathers_no_logits(target, layout):
    mesh = _mesh(target)
    spec = P(None, ("data", "model")) if layout == "classes" else P(("data", "model"), None)
    rows = P() if layout == "classes" else P(("data", "model"))
    args = _placed(mesh, ((SN, SV), jnp.bfloat16, spec), ((SN,), jnp.int32, rows))
    fn = jax.value_and_grad(lambda x, y: jaxloss.cross_entropy(x, y, label_smoothing=0.1))
    text = jax.jit(fn).trace(*args).lower().compile().as_text()
    assert text.count("all-reduce") or layout == "batch"  # the class sums cross devices
    wide = [s for s in hlo.all_gather_shapes(text) if SV in s and len(s) >= 2]
    assert not wide, f"all-gather of [N, V] logits: {wide}"


@compile_only
@pytest.mark.parametrize("target", ["h100", "tpu-v5e"])
def test_shard_map_linear_cross_entropy_gathers_neither_logits_nor_kernel(target):
    mesh = _mesh(target)
    args = _placed(
        mesh,
        ((SN, SD), jnp.bfloat16, P("data", None)),
        ((SD, SV), jnp.bfloat16, P(None, "model")),
        ((SN,), jnp.int32, P("data")),
    )

    def loss(h, k, y):
        return jaxloss.linear_cross_entropy(
            h, k, y, mesh=mesh, batch_axis="data", vocab_axis="model"
        )

    traced = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).trace(*args)
    text = hlo.optimised_text(traced.lower())
    wide = [s for s in hlo.all_gather_shapes(text) if SV in s]
    assert not wide, f"all-gather of a vocabulary-wide array: {wide}"


# ----------------------------------------------------------------------------------------------
# The one-pass logsumexp the accelerators compile, evaluated here on CPU
# ----------------------------------------------------------------------------------------------


def _rows(c: int) -> np.ndarray:
    z = np.random.default_rng(0).normal(size=(6, c)).astype(np.float32) * 30
    z[1, ::3] = -np.inf  # masked classes
    z[2] = -np.inf  # a fully masked row
    z[3, 5] = np.inf
    z[4, 7] = np.nan
    z[5, : c // 2] = -np.inf  # a whole first piece masked
    return z


@pytest.mark.parametrize("pieces", [1, 4])
@pytest.mark.parametrize("finite_shift", [False, True])
def test_one_pass_logsumexp_matches_max_then_sum(pieces, finite_shift):
    """The (max, rescaled sum) reduction gives the two-pass logsumexp, -inf rows included, and
    NaN (PyTorch's softmax) where a row holds +inf or NaN; its tangent is the two-pass one."""
    from jaxloss._classification import _max_then_sum, _online_max_sum

    z = jnp.asarray(_rows(4096))
    kw = dict(axis=1, e_dtype=jnp.float32, finite_shift=finite_shift)
    m1, s1 = _max_then_sum(z, z, **kw)
    m2, s2 = _online_max_sum(z, z, pieces=pieces, **kw)
    lse1, lse2 = np.asarray(m1 + jnp.log(s1))[:, 0], np.asarray(m2 + jnp.log(s2))[:, 0]
    np.testing.assert_allclose(lse2[[0, 1, 5]], lse1[[0, 1, 5]], rtol=1e-6)
    # All -inf: -inf (the two-pass sum without the finite shift is NaN): the loss z_y - lse is
    # NaN either way. +inf or NaN in a row: NaN.
    assert np.isneginf(lse2[2]) and np.isnan(lse2[3:5]).all()
    dz = jnp.asarray(np.random.default_rng(1).normal(size=z.shape).astype(np.float32))
    finite = jnp.where(jnp.isfinite(z), z, -30.0)
    t1 = jax.jvp(lambda x: _max_then_sum(x, x, **kw)[1], (finite,), (dz,))[1]
    t2 = jax.jvp(lambda x: _online_max_sum(x, x, pieces=pieces, **kw)[1], (finite,), (dz,))[1]
    np.testing.assert_allclose(t2, t1, rtol=1e-5)
