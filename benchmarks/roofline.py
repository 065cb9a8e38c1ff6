"""Modelled time of a compiled program: a loop-aware roofline, and Pallas kernels priced from
their grids. **Compiler figures, not measurements.**

Every kernel of the optimised program (a fusion, a custom call, a top-level op that launches
work, read by :mod:`benchmarks.hlo`) costs ``max(FLOPs / peak, bytes / bandwidth)``; a while
loop's body and condition count once per trip (the trip count XLA proved, or the loop's
induction pattern); the program's time is the sum. Bytes are :func:`hlo.kernel_bytes` (operands
read, results written, a sliced operand counts its slices, an in-place update its update). FLOPs
are those of dots and convolutions (``2·M·N·K``), each at the peak of its operands' dtype and
precision on the target (:data:`benchmarks.targets.Target.peak_flops`); elementwise work and
reductions are priced by their bytes only. Nothing overlaps across kernels, launch latency and
caches are not modelled: a kernel that reads a block twice pays twice.

A Pallas kernel is a custom call whose operands and result say nothing of how often its grid
fetches each block, and whose ``pl.CostEstimate`` is the author's claim. :func:`price_grid`
prices it from its grid; :func:`pallas_costs` does so for every ``pallas_call`` of a traced
program, and :func:`roofline` uses those prices for the custom calls they lowered to, matched
by the ``name=`` given to ``pl.pallas_call`` (the only name its custom call carries). A Pallas
call without a price is listed in ``Roofline.unpriced``, never guessed.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from benchmarks import hlo
from benchmarks.targets import Target

# ----------------------------------------------------------------------------------------------
# Peaks: which rate a dot runs at
# ----------------------------------------------------------------------------------------------

# XLA's dot algorithms (``algorithm=`` on a dot, or a GEMM custom call's precision config):
# the peak they run at and how many passes of it.
_ALGORITHMS = {
    "bf16_bf16_f32": ("bf16", 1), "bf16_bf16_f32_x3": ("bf16", 3),
    "bf16_bf16_f32_x6": ("bf16", 6), "bf16_bf16_f32_x9": ("bf16", 9),
    "tf32_tf32_f32": ("tf32", 1), "tf32_tf32_f32_x3": ("tf32", 3),
    "f32_f32_f32": ("f32_highest", 1), "f16_f16_f32": ("bf16", 1), "f16_f16_f16": ("bf16", 1),
}  # fmt: skip
_HALF = frozenset({"bf16", "f16", "f8e4m3fn", "f8e5m2", "s8", "u8", "s4", "u4"})


def dot_peak(
    target: Target, dtypes: Sequence[str], precision: str = "", algorithm: str = ""
) -> float:
    """FLOP/s of a dot with operands of ``dtypes`` at ``precision`` (``DEFAULT``/``HIGH``/
    ``HIGHEST``, the wider operand's) or an explicit XLA ``algorithm`` on ``target``."""
    algorithm = algorithm.lower().removeprefix("dot_").removeprefix("alg_dot_")
    if algorithm in _ALGORITHMS:
        kind, passes = _ALGORITHMS[algorithm]
        if kind == "tf32":
            kind = "f32"  # the targets' f32 DEFAULT rate is TF32 on GPUs, a bf16 pass on TPUs
        return target.peak_flops[kind] / passes
    if all(d in _HALF for d in dtypes):
        return target.peak_flops["bf16"]
    key = {"HIGH": "f32_high", "HIGHEST": "f32_highest"}.get(precision.upper(), "f32")
    return target.peak_flops[key]


@dataclasses.dataclass(frozen=True)
class Dot:
    """One dot or convolution site: FLOPs per call, the rate it runs at."""

    computation: str
    name: str
    flops: float
    peak: float


def _braced(attributes: str, key: str) -> list[int]:
    match = re.search(rf"\b{re.escape(key)}=\{{([\d,]*)\}}", attributes)
    return [int(d) for d in match.group(1).split(",") if d] if match else []


def _precision(attributes: str) -> tuple[str, str]:
    precision = re.search(r"operand_precision=\{(\w+)", attributes)
    algorithm = re.search(r"algorithm=(\w+)", attributes)
    return (precision.group(1) if precision else ""), (algorithm.group(1) if algorithm else "")


def _operand_types(module: hlo.Module, computation: str, inst: hlo.Instruction):
    found = [module.get(computation, o) for o in inst.operands[:2]]
    dims = [
        hlo.arrays(f.type)[0] if f is not None and hlo.arrays(f.type) else ("", ()) for f in found
    ]
    return [d for d, _ in dims], [s for _, s in dims]


def dot_flops(module: hlo.Module, computation: str, inst: hlo.Instruction) -> float:
    """``2 × output elements × contracted elements`` of a dot or convolution."""
    _, (lhs, rhs) = _operand_types(module, computation, inst)
    out = math.prod(hlo.arrays(inst.type)[0][1])
    if inst.opcode == "dot":
        return (
            2.0 * out * math.prod(lhs[d] for d in _braced(inst.attributes, "lhs_contracting_dims"))
        )
    labels = re.search(r"dim_labels=\w+_(\w+)->", inst.attributes)  # e.g. bf_io->bf
    if labels is None or not rhs:
        return 0.0
    # Each output element contracts the kernel's input features and spatial window.
    return 2.0 * out * math.prod(rhs) / rhs[labels.group(1).index("o")]


def _gemm_custom_call(module: hlo.Module, computation: str, inst: hlo.Instruction):
    """(FLOPs, dtypes, precision, algorithm) of a cuBLAS/cuBLASLt GEMM custom call, or None."""
    config = inst.backend_config.get("gemm_backend_config")
    if not config:
        return None
    dtypes, (lhs, _) = _operand_types(module, computation, inst)
    numbers = config.get("dot_dimension_numbers", {})
    contracted = math.prod(lhs[int(d)] for d in numbers.get("lhs_contracting_dimensions", []))
    out = math.prod(hlo.arrays(inst.type)[0][1])  # the first array; a workspace may follow
    precision = config.get("precision_config", {})
    operand = (precision.get("operand_precision") or [""])[0]
    return 2.0 * out * contracted, dtypes, operand, precision.get("algorithm", "")


def _dot(module: hlo.Module, computation: str, inst: hlo.Instruction, target: Target):
    """The :class:`Dot` of a dot, convolution or GEMM custom call; None for anything else."""
    if inst.opcode in ("dot", "convolution"):
        dtypes, _ = _operand_types(module, computation, inst)
        peak = dot_peak(target, dtypes, *_precision(inst.attributes))
        return Dot(computation, inst.name, dot_flops(module, computation, inst), peak)
    gemm = _gemm_custom_call(module, computation, inst) if inst.opcode == "custom-call" else None
    if gemm is None:
        return None
    flops, dtypes, precision, algorithm = gemm
    return Dot(computation, inst.name, flops, dot_peak(target, dtypes, precision, algorithm))


def dots_in(module: hlo.Module, computation: str, target: Target) -> list[Dot]:
    """Every dot and convolution a computation runs, nested fusions and calls included
    (reduction bodies are not entered: they hold no dots)."""
    found = []
    for inst in module.body(computation):
        if dot := _dot(module, computation, inst, target):
            found.append(dot)
        elif inst.opcode in ("fusion", "call") and inst.called:
            found += dots_in(module, inst.called, target)
    return found


# ----------------------------------------------------------------------------------------------
# The program's roofline
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One kernel of the program, per call, and how often it runs (the enclosing trip counts)."""

    computation: str
    name: str
    label: str
    calls: int
    bytes: int
    flops: float
    compute_s: float  # Σ FLOPs / peak of its dots
    memory_s: float  # bytes / bandwidth

    @property
    def seconds(self) -> float:
        return self.calls * max(self.compute_s, self.memory_s)


@dataclasses.dataclass(frozen=True)
class Roofline:
    kernels: tuple[Kernel, ...]
    dots: tuple[tuple[Dot, int], ...]  # each dot site and how often it runs
    unknown_loops: tuple[str, ...]  # while loops with no trip count found (priced once)
    unpriced: tuple[str, ...]  # Pallas calls with no grid price (operands + result only)

    @property
    def seconds(self) -> float:
        return sum(k.seconds for k in self.kernels)

    @property
    def bytes(self) -> int:
        return sum(k.calls * k.bytes for k in self.kernels)

    @property
    def flops(self) -> float:
        return sum(k.calls * k.flops for k in self.kernels)

    @property
    def compute_bound_s(self) -> float:
        """The time of the kernels whose FLOPs, not bytes, set their time."""
        return sum(k.seconds for k in self.kernels if k.compute_s >= k.memory_s)

    def matmuls(self, flops: float, at_least: float = 0.5) -> float:
        """How many matmuls of ``flops`` FLOPs the program runs: each dot site's FLOPs times its
        calls, in units of ``flops``, summed over the sites that reach ``at_least`` of a unit
        (a blocked matmul's block dot runs once per block: it counts as one)."""
        units = [d.flops * calls / flops for d, calls in self.dots]
        return sum(u for u in units if u >= at_least)

    def top(self, count: int = 8) -> list[Kernel]:
        return sorted(self.kernels, key=lambda k: -k.seconds)[:count]


def _launch_dots(module: hlo.Module, launch: hlo.Launch, target: Target) -> list[Dot]:
    inst = launch.inst
    if dot := _dot(module, launch.computation, inst, target):
        return [dot]
    return dots_in(module, inst.called, target) if inst.opcode == "fusion" and inst.called else []


_NO_PRICE = "no grid price given (a pallas_call is matched by its name=)"


def pallas_name(inst: hlo.Instruction) -> str:
    """The name a ``pallas_call`` was given, from its custom call's name stack."""
    match = re.search(r"([^/]+)/pallas_call", inst.op_name)
    return match.group(1) if match else re.sub(r"\.\d+$", "", inst.name)


def roofline(
    hlo_text: str, target: Target, pallas: Mapping[str, GridCost | str] | None = None
) -> Roofline:
    """The modelled time of an optimised HLO module on ``target`` (see the module doc);
    ``pallas``: the grid prices of its Pallas kernels by name (:func:`pallas_costs`)."""
    module = hlo.Module(hlo_text)
    found = hlo.launches(module)
    kernels, dots, unpriced = [], [], []
    for launch in found.launches:
        inst = launch.inst
        label = hlo.kernel_label(inst)
        nbytes = hlo.kernel_bytes(module, launch.computation, inst)
        kernel_dots = _launch_dots(module, launch, target)
        if label.split(":", 1)[-1] in hlo.PALLAS_TARGETS:
            cost = (pallas or {}).get(pallas_name(inst))
            if isinstance(cost, GridCost):
                nbytes = cost.bytes
                peak = dot_peak(target, cost.dot_dtypes or ("f32",))
                kernel_dots = [Dot(launch.computation, inst.name, cost.flops, peak)]
            else:
                unpriced.append(f"{pallas_name(inst)}: {cost or _NO_PRICE}")
        dots += [(d, launch.calls) for d in kernel_dots]
        flops = sum(d.flops for d in kernel_dots)
        compute = sum(d.flops / d.peak for d in kernel_dots)
        memory = nbytes / target.bandwidth
        kernels.append(Kernel(launch.computation, inst.name, label, launch.calls, nbytes, flops,
                              compute, memory))  # fmt: skip
    return Roofline(tuple(kernels), tuple(dots), tuple(found.unknown_loops), tuple(unpriced))


# ----------------------------------------------------------------------------------------------
# Pallas kernels, priced from their grids
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Block:
    """One operand of a ``pallas_call`` as its grid moves it: the ``block_shape`` (``None``
    for a squeezed dimension), the ``index_map`` (grid indices to block indices, as the
    ``BlockSpec``'s; called once with one integer array per grid dimension: every step at once),
    the whole array's ``shape`` and ``itemsize``."""

    block_shape: tuple[int | None, ...]
    index_map: Callable[..., Sequence[Any]]
    shape: tuple[int, ...]
    itemsize: int


@dataclasses.dataclass(frozen=True)
class GridCost:
    """What a grid moves and computes: per input, its fetches; per output, its write-backs."""

    steps: int
    flops: float
    fetches: tuple[int, ...]
    writes: tuple[int, ...]
    read_bytes: tuple[int, ...]
    write_bytes: tuple[int, ...]
    dot_dtypes: tuple[str, ...] = ()  # the operand dtypes of the kernel's dots (their peak)

    @property
    def bytes(self) -> int:
        return sum(self.read_bytes) + sum(self.write_bytes)


def _block_steps(block: Block, grid_indices: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per step: the block's index (steps × rank) and its bytes (clipped at the array's edge)."""
    steps = grid_indices[0].shape[0] if grid_indices else 1
    raw = block.index_map(*grid_indices)
    index = np.stack([np.broadcast_to(np.asarray(i), (steps,)) for i in raw], axis=1)
    sizes = np.ones(steps, dtype=np.int64)
    for d, (b, n) in enumerate(zip(block.block_shape, block.shape, strict=True)):
        b = 1 if b is None else b
        sizes *= np.clip(n - index[:, d].astype(np.int64) * b, 0, b)
    return index, sizes * block.itemsize


def _runs(index: np.ndarray, skip_unchanged: bool) -> tuple[np.ndarray, np.ndarray]:
    """Masks of the steps that start and that end a run of one block index."""
    steps = index.shape[0]
    if not skip_unchanged:
        every = np.ones(steps, dtype=bool)
        return every, every
    changed = np.any(index[1:] != index[:-1], axis=1)
    starts = np.concatenate([[True], changed])
    ends = np.concatenate([changed, [True]])
    return starts, ends


def price_grid(
    grid: Sequence[int],
    inputs: Sequence[Block],
    outputs: Sequence[Block],
    flops_per_step: float,
    *,
    skip_unchanged: bool = True,
    dot_dtypes: Sequence[str] = (),
) -> GridCost:
    """HBM traffic and FLOPs of a Pallas grid, enumerated in Pallas order.

    The grid runs row-major (the last dimension fastest). An input block is fetched whenever its
    block index differs from the previous step's (the first step fetches all); an output block is
    written back whenever its index is about to change, and after the last step. That is the
    TPU pipeline (``skip_unchanged=True``). On GPUs each program instance loads its own blocks:
    ``skip_unchanged=False`` counts a fetch and a write at every step (L2 reuse not modelled).
    """
    grid = tuple(int(g) for g in grid)
    steps = math.prod(grid)
    grid_indices = list(np.indices(grid).reshape(len(grid), steps)) if grid else []

    def moved(block: Block, write: bool) -> tuple[int, int]:
        index, nbytes = _block_steps(block, grid_indices)
        starts, ends = _runs(index, skip_unchanged)
        mask = ends if write else starts
        return int(mask.sum()), int(nbytes[mask].sum())

    read = [moved(b, write=False) for b in inputs]
    written = [moved(b, write=True) for b in outputs]
    return GridCost(
        steps,
        float(flops_per_step) * steps,
        tuple(n for n, _ in read),
        tuple(n for n, _ in written),
        tuple(b for _, b in read),
        tuple(b for _, b in written),
        tuple(dot_dtypes),
    )


# From a traced program: every pallas_call's grid, block specs and kernel body.


_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "f16", "float32": "f32", "float64": "f64"}


def _jaxpr_dots(jaxpr: Any) -> tuple[float, list[str]]:
    """FLOPs of one grid step's dots (every branch counted: an upper bound) and their dtypes."""
    flops, dtypes = 0.0, []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval
            out = eqn.outvars[0].aval
            flops += 2.0 * math.prod(out.shape) * math.prod(lhs.shape[d] for d in lhs_contract)
            dtypes.append(_DTYPE_NAMES.get(lhs.dtype.name, lhs.dtype.name))
        for sub in _subjaxprs(eqn):
            f, d = _jaxpr_dots(sub)
            flops, dtypes = flops + f, dtypes + d
    return flops, dtypes


def _subjaxprs(eqn: Any) -> list[Any]:
    found = []
    for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            inner = getattr(v, "jaxpr", v)
            if hasattr(inner, "eqns"):
                found.append(inner)
    return found


def _block(mapping: Any) -> Block | str:
    """A :class:`Block` of a Pallas ``BlockMapping``, or why it cannot be priced."""
    import jax
    from jax.extend.core import jaxpr_as_fun

    space = str(getattr(mapping.transformed_block_aval, "memory_space", "")).lower()
    if "any" in space:
        return "an operand left in HBM (memory_space=ANY): its DMAs are the kernel's own"
    shape = []
    for b in mapping.block_shape:
        if type(b).__name__ == "Squeezed" or b is None:
            shape.append(None)
        elif type(b).__name__ == "Blocked" or isinstance(b, int):
            shape.append(int(getattr(b, "block_size", b)))
        else:
            return f"a {type(b).__name__} block dimension"
    closed = mapping.index_map_jaxpr

    def index_map(*indices):
        batched = jax.vmap(jaxpr_as_fun(closed))
        return [np.asarray(x) for x in batched(*(np.asarray(i, np.int32) for i in indices))]

    aval = mapping.array_aval
    return Block(tuple(shape), index_map, tuple(aval.shape), np.dtype(aval.dtype).itemsize)


def price_pallas_call(eqn: Any, *, skip_unchanged: bool = True) -> GridCost | str:
    """:func:`price_grid` of one ``pallas_call`` equation, or why it cannot be priced."""
    mapping = eqn.params["grid_mapping"]
    if mapping.num_index_operands:
        return "scalar-prefetch index maps depend on data"
    if not all(isinstance(g, int) for g in mapping.grid):
        return "a dynamic grid"
    found = [_block(m) for m in mapping.block_mappings]
    blocks = [b for b in found if isinstance(b, Block)]
    if len(blocks) < len(found):
        return next(b for b in found if isinstance(b, str))
    flops, dtypes = _jaxpr_dots(eqn.params["jaxpr"])
    n_in = mapping.num_inputs
    return price_grid(
        mapping.grid, blocks[:n_in], blocks[n_in : n_in + mapping.num_outputs], flops,
        skip_unchanged=skip_unchanged, dot_dtypes=sorted(set(dtypes)),
    )  # fmt: skip


def pallas_costs(closed_jaxpr: Any, *, skip_unchanged: bool = True) -> dict[str, GridCost | str]:
    """The grid price (or why there is none) of every ``pallas_call`` in a traced program, by
    the name its custom call carries (``name=``, else the kernel function's name)."""
    costs: dict[str, GridCost | str] = {}

    def visit(jaxpr: Any) -> None:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                debug = getattr(eqn.params["jaxpr"], "debug_info", None)
                name = eqn.params.get("name") or getattr(debug, "func_name", "pallas_call")
                costs[name] = price_pallas_call(eqn, skip_unchanged=skip_unchanged)
            for sub in _subjaxprs(eqn):
                visit(sub)

    visit(getattr(closed_jaxpr, "jaxpr", closed_jaxpr))
    return costs
