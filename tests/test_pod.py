"""One pod-scale compile of the sharded linear heads (issue 17 item 5): v5p:4x4x4, 64 chips.

``value_and_grad`` of the mean of ``linear_cross_entropy`` and ``linear_distillation`` in their
``shard_map`` form (``batch_axis`` and ``vocab_axis`` named), compiled by libtpu for a 64-chip
v5p pod on an 8 (tokens) × 8 (classes) mesh, at two vocabulary sizes four times apart. Nothing
runs: the tests read the optimised program (``compiled.text``, through
``benchmarks/hlo.py``) and ``memory_analysis()``, compiler figures that are deterministic.

Every array any collective produces on one device is given the role that explains it:

- *per-token statistics*: scalars and ``[N/8]`` vectors — the logsumexp, target logit and the
  like combined over the vocabulary shards, the loss's sum and count over the token shards;
- *the hidden gradient*: ``[N/8, D]``, summed over the vocabulary axis: ``hidden`` is replicated
  there and every vocabulary shard contributes ``∂ℓ/∂z · Kᵀ`` of its own columns (the
  backward all-reduce of Megatron's column-parallel head). ``O(N·D)``, independent of ``V``;
- *the kernel gradient*: ``[D, V/8]``, summed over the token axis: the kernel is replicated
  there and every token shard contributes ``hᵀ · ∂ℓ/∂z`` of its own tokens. It grows with ``V``
  by nature (any data-parallel training reduces its parameters' gradients), so it is checked to
  be exactly one reduction of the gradient's size, and the rest separately.

Anything else — an all-gather of the kernel or of logits, a collective per block, a role on
the wrong axis — is a failure. The per-device bytes are the bytes of each collective's result
on one device (an all-reduce ring sends about twice that). The same census of the form XLA
partitions by itself (no axes named) finds the kernel all-gathered: the census can fail.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from test_accelerators import compile_only

import jaxloss
from benchmarks import hlo

TOPOLOGY = "v5p:4x4x4"
BATCH, VOCAB = "data", "model"
MESH_SHAPE = (8, 8)  # (BATCH, VOCAB)
# Sizes whose per-device dimensions are all distinct, so that a dimension says what it is:
# N/8 = 8192 tokens, D = 2048, D_t = 3072, V/8 = 4096 or 16384 classes.
N, D, D_TEACHER = 8 * 8192, 2048, 3072
VOCABS = (32 * 1024, 128 * 1024)  # Mistral 7B v0.3's 32768; about Llama 3's 128256; 4x apart
DTYPE = jnp.bfloat16
N_LOCAL = N // MESH_SHAPE[0]
KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
HEADS = ("linear_cross_entropy", "linear_distillation")
# Per-token statistics allowed per device: this many float32 numbers per token, plus scalars.
STATS_PER_TOKEN, SCALAR_BYTES = 8, 64
# Temporaries beyond the two gradients' unreduced buffers: a few blocks of logits.
BLOCK_TEMPORARIES = 32 * 2**20


@functools.cache
def pod_mesh() -> Mesh:
    devices = topologies.get_topology_desc(TOPOLOGY, "tpu").devices
    return Mesh(np.array(devices).reshape(MESH_SHAPE), (BATCH, VOCAB))


def _placed(*shape_spec) -> list[jax.ShapeDtypeStruct]:
    mesh = pod_mesh()
    return [jax.ShapeDtypeStruct(s, DTYPE, sharding=NamedSharding(mesh, p)) for s, p in shape_spec]


def _arguments(head: str, v: int) -> list[jax.ShapeDtypeStruct]:
    student = _placed(((N, D), P(BATCH, None)), ((D, v), P(None, VOCAB)))
    if head == "linear_distillation":
        return student + _placed(((N, D_TEACHER), P(BATCH, None)), ((D_TEACHER, v), P(None, VOCAB)))
    labels = jax.ShapeDtypeStruct((N,), jnp.int32, sharding=NamedSharding(pod_mesh(), P(BATCH)))
    return [*student, labels]


@dataclasses.dataclass(frozen=True)
class Program:
    text: str  # the optimised HLO of one device's program
    temporaries: int  # bytes, from memory_analysis()


@functools.cache
def compiled(head: str, v: int, axes: bool = True) -> Program:
    """``value_and_grad`` (in hidden and kernel) of the mean loss, compiled for the pod."""
    named = dict(mesh=pod_mesh(), batch_axis=BATCH, vocab_axis=VOCAB) if axes else {}
    fn = getattr(jaxloss, head)
    grad = jax.value_and_grad(lambda *args: fn(*args, **named), argnums=(0, 1))
    lowered = jax.jit(grad).trace(*_arguments(head, v)).lower()
    program = lowered.compile()
    text, memory = hlo.optimised_text(lowered, program), program.memory_analysis()
    assert text is not None and memory is not None, "libtpu gave no program text or memory"
    return Program(text, memory.temp_size_in_bytes)


# ----------------------------------------------------------------------------------------------
# The census of collectives
# ----------------------------------------------------------------------------------------------


def mesh_axes(inst: hlo.Instruction) -> frozenset[str] | None:
    """The mesh axes a collective reduces or gathers over (the axes along which the devices of a
    group differ, a device's mesh position being its number); None if its groups are unreadable."""
    if (groups := hlo.replica_groups(inst)) is None:
        return None
    coords = [np.unravel_index(group, MESH_SHAPE) for group in groups]
    names = (BATCH, VOCAB)
    return frozenset(n for i, n in enumerate(names) if any(len(set(c[i])) > 1 for c in coords))


@dataclasses.dataclass(frozen=True)
class Moved:
    """One array a collective produces on a device."""

    kind: str
    dims: tuple[int, ...]
    nbytes: int
    axes: frozenset[str] | None
    in_loop: bool  # run by a while loop: once per block
    name: str


def census(text: str) -> list[Moved]:
    """Every array every collective of the program produces (async pairs counted once)."""
    module = hlo.Module(text)
    in_loops = module.run_by_loops()
    moved = []
    for computation, inst in module.instructions():
        kind = inst.opcode.removesuffix("-done")
        if kind not in KINDS:
            continue  # a "-start" is counted at its "-done", whose result is the result alone
        source = inst
        if inst.opcode.endswith("-done"):
            source = module.get(computation, inst.operands[0]) or inst
        for dtype, dims in hlo.arrays(inst.type):
            nbytes = hlo.ITEMSIZE.get(dtype, 0) * math.prod(dims)
            moved.append(
                Moved(kind, dims, nbytes, mesh_axes(source), computation in in_loops, inst.name)
            )
    return moved


def role(m: Moved, v: int) -> str:
    """What a moved array is (see the module doc), or ``"unexplained"``."""
    v_local = v // MESH_SHAPE[1]
    reduced = m.kind == "all-reduce"
    if reduced and sorted(m.dims) == sorted((D, v_local)) and m.axes == {BATCH}:
        return "kernel gradient"
    if reduced and sorted(m.dims) == sorted((N_LOCAL, D)) and m.axes == {VOCAB}:
        return "hidden gradient"
    if reduced and m.dims == () and m.axes and m.axes <= {BATCH, VOCAB}:
        return "per-token statistics"
    if reduced and m.dims == (N_LOCAL,) and m.axes == {VOCAB}:
        return "per-token statistics"
    return "unexplained"


def bytes_by_role(moved: list[Moved], v: int) -> dict[str, int]:
    totals: dict[str, int] = {}
    for m in moved:
        totals[role(m, v)] = totals.get(role(m, v), 0) + m.nbytes
    return totals


# ----------------------------------------------------------------------------------------------
# The tests
# ----------------------------------------------------------------------------------------------


@compile_only
@pytest.mark.parametrize("v", VOCABS)
@pytest.mark.parametrize("head", HEADS)
def test_pod_collectives_are_token_statistics_and_the_two_gradient_reductions(head, v):
    moved = census(compiled(head, v).text)
    v_local = v // MESH_SHAPE[1]
    assert moved, "no collective at all: the program was not partitioned over the pod"
    per_block = [m.name for m in moved if m.in_loop]
    assert not per_block, f"collectives inside the blocked loops (per block): {per_block}"
    # Neither the logits nor the kernel is gathered: the only array with a vocabulary-sized
    # dimension (V or V/8) any collective produces is the kernel gradient's reduction.
    wide = [m for m in moved if {v, v_local} & set(m.dims) and role(m, v) != "kernel gradient"]
    assert not wide, f"vocabulary-wide arrays moved between devices: {wide}"
    unexplained = [m for m in moved if role(m, v) == "unexplained"]
    assert not unexplained, f"collectives that are neither statistics nor gradients: {unexplained}"
    totals = bytes_by_role(moved, v)
    itemsize = jnp.dtype(DTYPE).itemsize
    assert totals.get("kernel gradient") == D * v_local * itemsize, totals  # exactly one
    assert totals.get("hidden gradient") == N_LOCAL * D * itemsize, totals  # exactly one
    stats = totals.get("per-token statistics", 0)
    assert 0 < stats <= STATS_PER_TOKEN * N_LOCAL * 4 + SCALAR_BYTES, (
        f"{stats} bytes of per-token statistics for {N_LOCAL} tokens per device"
    )


@compile_only
@pytest.mark.parametrize("head", HEADS)
def test_pod_collective_bytes_do_not_grow_with_the_vocabulary(head):
    small, large = (bytes_by_role(census(compiled(head, v).text), v) for v in VOCABS)
    for part in ("per-token statistics", "hidden gradient"):
        assert small.get(part) == large.get(part), (part, small, large)
    # The kernel gradient's reduction is the kernel's own size: 4x the classes, 4x the bytes.
    assert large["kernel gradient"] == small["kernel gradient"] * (VOCABS[1] // VOCABS[0])


@compile_only
@pytest.mark.parametrize("head", HEADS)
def test_pod_temporaries_hold_blocks_and_the_unreduced_gradients(head):
    """No ``[N/8, V/8]`` logits: temporaries are at most the two gradients before their
    all-reduces, the float32 carry of the hidden gradient (one pass makes both gradients) and a
    few blocks, and grow with V by no more than the kernel gradient."""
    itemsize = jnp.dtype(DTYPE).itemsize
    temps = []
    for v in VOCABS:
        temp = compiled(head, v).temporaries
        unreduced = (D * v // MESH_SHAPE[1] + N_LOCAL * D) * itemsize
        carry = N_LOCAL * D * 4
        assert temp <= unreduced + carry + BLOCK_TEMPORARIES, (
            f"V={v}: {temp / 2**20:.1f} MiB of temporaries, over {unreduced / 2**20:.0f} MiB of "
            f"gradients + {carry / 2**20:.0f} MiB of carry + {BLOCK_TEMPORARIES / 2**20:.0f} MiB"
        )
        temps.append(temp)
    kernel_growth = D * (VOCABS[1] - VOCABS[0]) // MESH_SHAPE[1] * itemsize
    assert temps[1] - temps[0] <= kernel_growth, (temps, kernel_growth)


@compile_only
def test_pod_census_finds_the_kernel_gathered_without_named_axes():
    """Without mesh axes XLA partitions the blocked loops itself and all-gathers the
    vocabulary-sharded kernel (as documented): the census flags it."""
    v = VOCABS[0]
    moved = census(compiled("linear_cross_entropy", v, axes=False).text)
    gathered = [m for m in moved if m.kind == "all-gather" and v in m.dims]
    assert gathered, "expected the automatically partitioned form to all-gather the kernel"
    assert all(role(m, v) == "unexplained" for m in gathered)
