"""Modelled time of a compiled program: a loop-aware roofline, Pallas kernels priced from their
grids. **Compiler figures, not measurements.**

Every kernel that :func:`hlo.launches` finds costs ``max(FLOPs / peak, bytes / bandwidth)``,
times its calls (enclosing loops × trip counts); the program's time is the sum. Bytes are
:func:`hlo.kernel_bytes`; FLOPs those of dots and convolutions (``2·M·N·K``), each at the peak of
its operands' dtype and precision on the target (:attr:`Target.peak_flops`); elementwise work
is priced by its bytes. Nothing overlaps across kernels; caches and launch latency are not
modelled. A Pallas kernel's custom call says nothing of how often its grid fetches each block:
:func:`pallas_costs` prices every ``pallas_call`` of a traced program from its grid
(:func:`price_grid`), matched to its custom call by the ``name=`` it was given; one without a
price is listed in ``Roofline.unpriced``, never guessed (nor taken from its ``CostEstimate``).
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

# XLA's dot algorithms (``algorithm=``, or a GEMM custom call's precision config): the peak
# they run at and how many passes of it ("f32": TF32 on GPUs, one bf16 pass on TPUs).
_ALGORITHMS = {
    "bf16_bf16_f32": ("bf16", 1), "bf16_bf16_f32_x3": ("bf16", 3),
    "bf16_bf16_f32_x6": ("bf16", 6), "bf16_bf16_f32_x9": ("bf16", 9),
    "tf32_tf32_f32": ("f32", 1), "tf32_tf32_f32_x3": ("f32", 3),
    "f32_f32_f32": ("f32_highest", 1), "f16_f16_f32": ("bf16", 1), "f16_f16_f16": ("bf16", 1),
}  # fmt: skip
_HALF = frozenset({"bf16", "f16", "f8e4m3fn", "f8e5m2", "s8", "u8", "s4", "u4"})


def dot_peak(
    target: Target, dtypes: Sequence[str], precision: str = "", algorithm: str = ""
) -> float:
    """FLOP/s of a dot with operands of ``dtypes`` at ``precision`` (``DEFAULT``/``HIGH``/
    ``HIGHEST``) or an explicit XLA ``algorithm`` on ``target``."""
    algorithm = algorithm.lower().removeprefix("dot_").removeprefix("alg_dot_")
    if algorithm in _ALGORITHMS:
        kind, passes = _ALGORITHMS[algorithm]
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


def _dot(module: hlo.Module, computation: str, inst: hlo.Instruction, target: Target):
    """The :class:`Dot` of a dot, convolution or cuBLAS GEMM custom call; None otherwise."""
    gemm = inst.backend_config.get("gemm_backend_config") if inst.opcode == "custom-call" else None
    if not gemm and inst.opcode not in ("dot", "convolution"):
        return None
    found = [module.get(computation, o) for o in inst.operands[:2]]
    types = [hlo.arrays(f.type)[0] if f is not None and hlo.arrays(f.type) else ("", ())
             for f in found]  # fmt: skip
    dtypes, (lhs, rhs) = [d for d, _ in types], [s for _, s in types]
    out = math.prod(hlo.arrays(inst.type)[0][1])
    if gemm:  # the result's first array: a workspace may follow
        numbers, config = gemm.get("dot_dimension_numbers", {}), gemm.get("precision_config", {})
        contracted = math.prod(lhs[int(d)] for d in numbers.get("lhs_contracting_dimensions", []))
        precision = (config.get("operand_precision") or [""])[0]
        peak = dot_peak(target, dtypes, precision, config.get("algorithm", ""))
        return Dot(computation, inst.name, 2.0 * out * contracted, peak)
    precision = re.search(r"operand_precision=\{(\w+)", inst.attributes)
    algorithm = re.search(r"algorithm=(\w+)", inst.attributes)
    peak = dot_peak(target, dtypes, precision.group(1) if precision else "",
                    algorithm.group(1) if algorithm else "")  # fmt: skip
    if inst.opcode == "dot":
        dims = re.search(r"\blhs_contracting_dims=\{([\d,]*)\}", inst.attributes)
        contracted = [int(d) for d in dims.group(1).split(",") if d] if dims else []
        return Dot(computation, inst.name, 2.0 * out * math.prod(lhs[d] for d in contracted), peak)
    # A convolution's output element contracts the kernel's input features and spatial window.
    labels = re.search(r"dim_labels=\w+_(\w+)->", inst.attributes)  # e.g. bf_io->bf
    flops = 0.0 if labels is None or not rhs else 2.0 * out * math.prod(rhs) / rhs[
        labels.group(1).index("o")]  # fmt: skip
    return Dot(computation, inst.name, flops, peak)


def dots_in(module: hlo.Module, computation: str, target: Target) -> list[Dot]:
    """Every dot and convolution a computation runs, nested fusions and calls included."""
    found = []
    for inst in module.body(computation):
        if dot := _dot(module, computation, inst, target):
            found.append(dot)
        elif inst.opcode in ("fusion", "call") and inst.called:
            found += dots_in(module, inst.called, target)
    return found


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
        return sum(k.seconds for k in self.kernels if k.compute_s >= k.memory_s)

    def matmuls(self, flops: float, at_least: float = 0.5) -> float:
        """How many matmuls of ``flops`` the program runs: each dot site's FLOPs × calls in units
        of ``flops``, summed over sites of at least ``at_least`` units (a blocked matmul's block
        dot, run once per block, counts as one)."""
        units = [d.flops * calls / flops for d, calls in self.dots]
        return sum(u for u in units if u >= at_least)

    def top(self, count: int = 8) -> list[Kernel]:
        return sorted(self.kernels, key=lambda k: -k.seconds)[:count]


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
        inst, where = launch.inst, launch.computation
        label, nbytes = hlo.kernel_label(inst), hlo.kernel_bytes(module, where, inst)
        kernel_dots = [d] if (d := _dot(module, where, inst, target)) else []
        if not kernel_dots and inst.opcode == "fusion" and inst.called:
            kernel_dots = dots_in(module, inst.called, target)
        if label.split(":", 1)[-1] in hlo.PALLAS_TARGETS:
            cost = (pallas or {}).get(pallas_name(inst))
            if isinstance(cost, GridCost):
                peak = dot_peak(target, cost.dot_dtypes or ("f32",))
                nbytes, kernel_dots = cost.bytes, [Dot(where, inst.name, cost.flops, peak)]
            else:
                why = cost or "no grid price given (a pallas_call is matched by its name=)"
                unpriced.append(f"{pallas_name(inst)}: {why}")
        dots += [(d, launch.calls) for d in kernel_dots]
        compute = sum(d.flops / d.peak for d in kernel_dots)
        flops = sum(d.flops for d in kernel_dots)
        kernels.append(Kernel(where, inst.name, label, launch.calls, nbytes, flops, compute,
                              nbytes / target.bandwidth))  # fmt: skip
    return Roofline(tuple(kernels), tuple(dots), tuple(found.unknown_loops), tuple(unpriced))


@dataclasses.dataclass(frozen=True)
class Block:
    """One operand of a ``pallas_call`` as its grid moves it: ``block_shape`` (``None`` for a
    squeezed dimension), ``index_map`` (called once with one integer array per grid dimension,
    every step at once), the whole array's ``shape`` and ``itemsize``."""

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


def price_grid(
    grid: Sequence[int],
    inputs: Sequence[Block],
    outputs: Sequence[Block],
    flops_per_step: float,
    *,
    skip_unchanged: bool = True,
    dot_dtypes: Sequence[str] = (),
) -> GridCost:
    """HBM traffic and FLOPs of a Pallas grid, enumerated in Pallas order (row-major, the last
    dimension fastest). The TPU pipeline (``skip_unchanged``) fetches an input block whenever
    its index differs from the previous step's (the first step fetches all) and writes an output
    block back whenever its index is about to change, and after the last step. On GPUs each
    program instance loads its own blocks: ``skip_unchanged=False`` counts a fetch and a write
    at every step (L2 reuse not modelled). A block's bytes are clipped at the array's edge."""
    grid = tuple(int(g) for g in grid)
    steps = math.prod(grid)
    indices = list(np.indices(grid).reshape(len(grid), steps)) if grid else []

    def moved(block: Block, write: bool) -> tuple[int, int]:
        raw = block.index_map(*indices)
        index = np.stack([np.broadcast_to(np.asarray(i), (steps,)) for i in raw], axis=1)
        sizes = np.full(steps, block.itemsize, dtype=np.int64)
        for d, (b, n) in enumerate(zip(block.block_shape, block.shape, strict=True)):
            b = 1 if b is None else b
            sizes *= np.clip(n - index[:, d].astype(np.int64) * b, 0, b)
        mask = np.ones(steps, dtype=bool)
        if skip_unchanged:
            changed = np.any(index[1:] != index[:-1], axis=1)
            mask = np.concatenate([changed, [True]] if write else [[True], changed])
        return int(mask.sum()), int(sizes[mask].sum())

    (fetches, reads), (writes, wrote) = (
        zip(*[moved(b, write) for b in blocks], strict=True) if blocks else ((), ())
        for blocks, write in ((inputs, False), (outputs, True))
    )
    return GridCost(steps, float(flops_per_step) * steps, tuple(fetches), tuple(writes),
                    tuple(reads), tuple(wrote), tuple(dot_dtypes))  # fmt: skip


_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "f16", "float32": "f32", "float64": "f64"}


def _subjaxprs(eqn: Any) -> list[Any]:
    values = [v for value in eqn.params.values()
              for v in (value if isinstance(value, (tuple, list)) else (value,))]  # fmt: skip
    return [inner for v in values if hasattr(inner := getattr(v, "jaxpr", v), "eqns")]


def _jaxpr_dots(jaxpr: Any) -> tuple[float, list[str]]:
    """FLOPs of one grid step's dots (every branch counted: an upper bound) and their dtypes."""
    flops, dtypes = 0.0, []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs, out = eqn.invars[0].aval, eqn.outvars[0].aval
            flops += 2.0 * math.prod(out.shape) * math.prod(lhs.shape[d] for d in lhs_contract)
            dtypes.append(_DTYPE_NAMES.get(lhs.dtype.name, lhs.dtype.name))
        for sub in _subjaxprs(eqn):
            f, d = _jaxpr_dots(sub)
            flops, dtypes = flops + f, dtypes + d
    return flops, dtypes


def _block(mapping: Any) -> Block | str:
    """A :class:`Block` of a Pallas ``BlockMapping``, or why it cannot be priced."""
    import jax
    from jax.extend.core import jaxpr_as_fun

    if "any" in str(getattr(mapping.transformed_block_aval, "memory_space", "")).lower():
        return "an operand left in HBM (memory_space=ANY): its DMAs are the kernel's own"
    shape = []
    for b in mapping.block_shape:
        if type(b).__name__ == "Squeezed" or b is None:
            shape.append(None)
        elif type(b).__name__ == "Blocked" or isinstance(b, int):
            shape.append(int(getattr(b, "block_size", b)))
        else:
            return f"a {type(b).__name__} block dimension"
    batched = jax.vmap(jaxpr_as_fun(mapping.index_map_jaxpr))
    index_map = lambda *ix: [np.asarray(x) for x in batched(*(np.asarray(i, np.int32) for i in ix))]
    aval = mapping.array_aval
    return Block(tuple(shape), index_map, tuple(aval.shape), np.dtype(aval.dtype).itemsize)


def price_pallas_call(eqn: Any, *, skip_unchanged: bool = True) -> GridCost | str:
    """:func:`price_grid` of one ``pallas_call`` equation, or why it cannot be priced."""
    mapping = eqn.params["grid_mapping"]
    if mapping.num_index_operands:
        return "scalar-prefetch index maps depend on data"
    if not all(isinstance(g, int) for g in mapping.grid):
        return "a dynamic grid"
    blocks = [_block(m) for m in mapping.block_mappings]
    if why := next((b for b in blocks if isinstance(b, str)), None):
        return why
    flops, dtypes = _jaxpr_dots(eqn.params["jaxpr"])
    n_in, n_out = mapping.num_inputs, mapping.num_outputs
    return price_grid(mapping.grid, blocks[:n_in], blocks[n_in : n_in + n_out], flops,  # type: ignore[arg-type]
                      skip_unchanged=skip_unchanged, dot_dtypes=sorted(set(dtypes)))  # fmt: skip


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
