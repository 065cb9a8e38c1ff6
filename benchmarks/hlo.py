"""Compile-only figures: compile for a target, read the optimised HLO once, price its kernels.

The one reader of optimised HLO text, for the benchmarks and the tests. :class:`Module` parses a
program; :func:`launches` finds the kernels it runs and how often (while loops × trip counts);
:func:`kernel_bytes` what each moves; :func:`roofline` prices each at ``max(FLOPs / peak, bytes /
bandwidth)`` × its calls and sums them (no overlap, caches or launch latency modelled), FLOPs
being those of dots and convolutions at the peak of their dtype and precision. A Pallas custom
call says nothing of how often its grid fetches each block: :func:`pallas_costs` prices each
``pallas_call`` from its grid, matched by its ``name=``; one without a price is listed in
``Roofline.unpriced``, never guessed (nor taken from its ``CostEstimate``). **Compiler figures,
not measurements.**
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import glob
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from benchmarks.targets import Target, devices

ITEMSIZE = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1,
    "s4": 1, "u4": 1,
}  # fmt: skip
_ARRAY_TYPE = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")
_NAME = re.compile(r"%([\w.\-]+)")
_HEADER = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
# Instructions that name or regroup buffers without touching their contents, and TPU's async
# copies between memory spaces (what they move is counted at its consumer).
NO_WORK = frozenset({
    "parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all", "copy-start",
    "copy-done", "partition-id", "replica-id", "opt-barrier",
})  # fmt: skip
SLICING = frozenset({"gather", "dynamic-slice", "slice"})
# In-place updates of their first operand (XLA copies it first, as an instruction of its own,
# where it is still used): the index of the operand holding what they write.
IN_PLACE = {"dynamic-update-slice": 1, "scatter": 2}
NO_WORK_TARGETS = frozenset({"AllocateBuffer"})  # XLA:TPU's loop-carried accumulators
# Custom calls that are kernels of their own (Pallas: Mosaic TPU, Triton, Mosaic GPU).
PALLAS_TARGETS = frozenset({"tpu_custom_call", "__gpu$xla.gpu.triton", "mosaic_gpu",
                            "mosaic_gpu_v2"})  # fmt: skip


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def arrays(hlo_type: str) -> list[tuple[str, tuple[int, ...]]]:
    """``(element type, dims)`` of every array in an HLO type (a tuple is flattened)."""
    return [(t, tuple(_ints(dims))) for t, dims in _ARRAY_TYPE.findall(hlo_type)]


def _closing(text: str, start: int, pair: str = "()") -> int:
    """Index just past the bracket group opening at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        depth += {pair[0]: 1, pair[1]: -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    return len(text)


def _search(pattern: str, text: str) -> str:
    return match.group(1) if (match := re.search(pattern, text)) else ""


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    type: str
    opcode: str
    operands: tuple[str, ...]
    attributes: str
    arguments: str = ""  # the text inside the parentheses (a parameter's number, a constant)

    @property
    def nbytes(self) -> int:
        return sum(ITEMSIZE.get(t, 0) * math.prod(dims) for t, dims in arrays(self.type))

    @property
    def called(self) -> str | None:
        return self.attr("calls")

    def attr(self, key: str) -> str | None:
        """The value of ``key=...`` up to the next comma (a computation loses its ``%``)."""
        return _search(rf"(?:^|[\s,]){re.escape(key)}=%?([^,\s]+)", self.attributes) or None

    def computations(self, key: str) -> list[str]:
        """The computations named by ``key={%a, %b}``."""
        return _NAME.findall(_search(rf"{key}=\{{([^}}]*)\}}", self.attributes))

    @property
    def callees(self) -> list[str]:
        """Every computation the instruction runs or applies (a fusion's included)."""
        keys = ("body", "condition", "to_apply", "calls", "true_computation", "false_computation")
        many = self.computations("branch_computations") + self.computations("called_computations")
        return [c for c in [*map(self.attr, keys), *many] if c]

    @functools.cached_property
    def backend_config(self) -> dict[str, Any]:
        start = self.attributes.find("backend_config={") + len("backend_config=")
        if start < len("backend_config="):
            return {}
        try:
            return json.loads(self.attributes[start : _closing(self.attributes, start, "{}")])
        except ValueError:
            return {}

    @property
    def label(self) -> str:
        """The opcode, with a fusion's kind or a custom call's target spelt out."""
        kind = self.attr("kind") or (self.attr("custom_call_target") or "").strip('"')
        return f"{self.opcode}:{kind}" if kind else self.opcode


def parse_instruction(line: str) -> Instruction | None:
    name, sep, rest = line.strip().removeprefix("ROOT ").partition(" = ")
    if not sep or not name.startswith("%"):
        return None
    end = _closing(rest, 0) if rest.startswith("(") else rest.find(" ")
    hlo_type, rest = rest[:end], rest[end:].lstrip()
    if (paren := rest.find("(")) < 0:
        return None
    close = _closing(rest, paren)
    inside = rest[paren + 1 : close - 1]
    return Instruction(name[1:], hlo_type, rest[:paren], tuple(_NAME.findall(inside)),
                       rest[close:], inside)  # fmt: skip


class Module:
    """An optimised HLO module: its computations, and lookups by name within each."""

    def __init__(self, hlo_text: str):
        self.computations: dict[str, list[Instruction]] = {}
        self.entry, current = "", None
        for line in hlo_text.splitlines():
            if header := _HEADER.match(line):
                current = header.group(2)
                self.computations[current] = []
                self.entry = current if header.group(1) else self.entry
            elif line.startswith("}"):
                current = None
            elif current is not None and (inst := parse_instruction(line)) is not None:
                self.computations[current].append(inst)
        self._by_name = {c: {i.name: i for i in body} for c, body in self.computations.items()}

    def body(self, computation: str) -> list[Instruction]:
        return self.computations.get(computation, [])

    def get(self, computation: str, name: str) -> Instruction | None:
        return self._by_name.get(computation, {}).get(name)

    def root(self, computation: str) -> Instruction | None:
        return (self.body(computation) or [None])[-1]  # XLA prints the ROOT last

    def instructions(self) -> Iterator[tuple[str, Instruction]]:
        return ((c, inst) for c, body in self.computations.items() for inst in body)

    def run_by_loops(self) -> set[str]:
        """The computations a while loop runs, directly or through what they call."""
        pending = [c for _, inst in self.instructions() if inst.opcode == "while"
                   for c in (inst.attr("body"), inst.attr("condition")) if c]  # fmt: skip
        found: set[str] = set()
        while pending:
            if (computation := pending.pop()) not in found:
                found.add(computation)
                pending += [c for inst in self.body(computation) for c in inst.callees]
        return found

    def trip_count(self, computation: str, loop: Instruction) -> int | None:
        """How often a ``while`` runs its body: the count XLA:GPU proved (``known_trip_count``),
        else the induction pattern of ``fori_loop`` and ``scan`` (XLA:TPU says nothing): a
        condition ``state[i] < limit``, ``state[i]`` starting at a constant, the body adding a
        constant step to it. None when neither is found."""
        if (known := loop.backend_config.get("known_trip_count", {}).get("n")) is not None:
            return int(known)
        condition, body = loop.attr("condition") or "", loop.attr("body") or ""
        root = self.root(condition)
        scope, compare = self._fused_root(condition, root)
        if root is None or compare is None or compare.opcode != "compare":
            return None
        lhs, rhs = (self.get(scope, o) for o in compare.operands)
        limit = self._constant(scope, rhs)
        if lhs is not None and lhs.opcode == "parameter" and scope != condition:
            lhs = self.get(condition, root.operands[int(lhs.arguments)])
        if compare.attr("direction") != "LT" or limit is None or lhs is None:
            return None
        if lhs.opcode != "get-tuple-element":  # the induction variable: state[index]
            return None
        index, start, step = int(lhs.attr("index") or -1), None, None
        init = self.get(computation, loop.operands[0])
        if init is not None and init.opcode == "tuple" and index < len(init.operands):
            start = self._constant(computation, self.get(computation, init.operands[index]))
        last = self.root(body)
        if last is not None and last.opcode == "tuple" and index < len(last.operands):
            scope, update = self._fused_root(body, self.get(body, last.operands[index]))
            if update is not None and update.opcode == "add":
                steps = [self._constant(scope, self.get(scope, o)) for o in update.operands]
                step = next((s for s in steps if s is not None), None)
        return None if start is None or not step else max(0, -(-(limit - start) // step))

    def _fused_root(self, computation: str, inst: Instruction | None):
        """Through a fusion (XLA:GPU fuses the loop's comparison and increment) to its root."""
        if inst is not None and inst.opcode == "fusion":
            return inst.called or "", self.root(inst.called or "")
        return computation, inst

    def _constant(self, computation: str, inst: Instruction | None) -> int | None:
        """The integer value of a scalar constant, seen through copies."""
        while inst is not None and inst.opcode == "copy":
            inst = self.get(computation, inst.operands[0])
        if inst is None or inst.opcode != "constant" or "[]" not in inst.type:
            return None
        try:
            return int(inst.arguments)
        except ValueError:
            return None


# Bytes: every kernel reads its operands from HBM and writes its result there


def _reads(module: Module, fused: str, name: str, full: int) -> int:
    """Bytes a fused computation reads of its buffer ``name`` (``full`` bytes in all): what is
    sliced or gathered from it; nothing where an in-place update (:data:`IN_PLACE`) writes into
    it; through a bitcast or a nested fusion, what that reads. At most ``full``."""
    users, total = [i for i in module.body(fused) if name in i.operands], 0
    for user in users:
        positions = [k for k, o in enumerate(user.operands) if o == name]
        if user.opcode in SLICING and positions == [0]:
            total += user.nbytes
        elif user.opcode in IN_PLACE and positions == [0]:
            continue
        elif user.opcode == "bitcast":
            total += _reads(module, fused, user.name, full)
        elif user.opcode == "fusion" and user.called:
            total += sum(_param_reads(module, user.called, k, full) for k in positions)
        else:
            return full
    return total if users else full


def _param_reads(module: Module, fused: str, index: int, full: int) -> int:
    """Bytes a fused computation reads of its parameter ``index`` (see :func:`_reads`)."""
    param = next((i for i in module.body(fused)
                  if i.opcode == "parameter" and i.arguments == str(index)), None)  # fmt: skip
    return full if param is None else min(full, _reads(module, fused, param.name, full))


def _written(module: Module, computation: str, inst: Instruction, fused: bool = False) -> int:
    """An in-place update (:data:`IN_PLACE`) writes its updates; anything else its result. In a
    fusion only an update of a buffer the fusion is given is in place: one it makes itself (a
    scatter into fused zeros, the gradient of a gather) is written whole."""
    if inst.opcode not in IN_PLACE:
        return inst.nbytes
    target = module.get(computation, inst.operands[0])
    if fused and (target is None or target.opcode != "parameter"):
        return inst.nbytes
    update = module.get(computation, inst.operands[IN_PLACE[inst.opcode]])
    return update.nbytes if update else inst.nbytes


def kernel_bytes(module: Module, computation: str, inst: Instruction) -> int:
    """Modelled HBM bytes of one kernel: operands read + result written; a sliced operand counts
    what is taken, an in-place update (alone, at a fusion's root or in its root tuple) its
    update."""
    fused = inst.called or ""
    if inst.opcode != "fusion" or (root := module.root(fused)) is None:
        total = _written(module, computation, inst)
    elif root.opcode == "tuple":
        parts = [p for o in root.operands if (p := module.get(fused, o)) is not None]
        total = sum(_written(module, fused, p, fused=True) for p in parts)
    else:
        total = _written(module, fused, root, fused=True)
    for k, operand in enumerate(inst.operands):
        if (source := module.get(computation, operand)) is None:
            continue
        if inst.opcode in SLICING and k == 0:
            total += inst.nbytes
        elif inst.opcode in IN_PLACE and k == 0:
            continue  # written in place: the update is counted with the result
        elif inst.opcode == "fusion" and inst.called:
            total += _param_reads(module, inst.called, k, source.nbytes)
        else:
            total += source.nbytes
    return total


# Launches: the kernels a program runs, loops unrolled into counts

Launch = collections.namedtuple("Launch", "computation inst calls")  # calls per program call


@dataclasses.dataclass
class Launches:
    module: Module
    launches: list[Launch] = dataclasses.field(default_factory=list)
    unknown_loops: list[str] = dataclasses.field(default_factory=list)  # priced once

    @property
    def bytes(self) -> int:
        return sum(x.calls * kernel_bytes(self.module, x.computation, x.inst)
                   for x in self.launches)  # fmt: skip

    def walk(self, computation: str, calls: int) -> Launches:
        for inst in self.module.body(computation):
            target = inst.label.split(":", 1)[-1]
            if inst.opcode in (*NO_WORK, "async-update", "async-done") or target in NO_WORK_TARGETS:
                continue  # an async op's work is its wrapped computation's (at its start)
            # A custom call naming computations, other than a GEMM or a Pallas kernel, stands
            # for them (XLA:TPU's SparseCore gather offload, for one).
            plain = target in PALLAS_TARGETS or "gemm_backend_config" in inst.backend_config
            wrapped = [] if inst.opcode != "custom-call" or plain else (
                inst.computations("called_computations"))  # fmt: skip
            if inst.opcode == "while":
                if (trips := self.module.trip_count(computation, inst)) is None:
                    self.unknown_loops.append(f"{computation}/{inst.name}")
                    trips = 1
                self.walk(inst.attr("body") or "", calls * trips)
                self.walk(inst.attr("condition") or "", calls * (trips + 1))
            elif inst.opcode in ("call", "async-start"):
                self.walk(inst.called or inst.attr("to_apply") or "", calls)
            elif inst.opcode == "conditional":  # one branch runs (data): the one moving most
                names = inst.computations("branch_computations")
                names += [inst.attr(k) or "" for k in ("true_computation", "false_computation")]
                if branches := [Launches(self.module).walk(n, calls) for n in names if n]:
                    best = max(branches, key=lambda b: b.bytes)
                    self.launches += best.launches
                    self.unknown_loops += best.unknown_loops
            elif wrapped:
                for name in wrapped:
                    self.walk(name, calls)
            else:
                self.launches.append(Launch(computation, inst, calls))
        return self


def launches(module: Module) -> Launches:
    """The kernels ENTRY launches, with their counts: a while loop's body and condition once per
    trip (once when no count is found, listed in ``unknown_loops``), calls and async ops what
    they wrap."""
    return Launches(module).walk(module.entry, 1)


# ENTRY's kernels; modelled HBM bytes of every launch; ENTRY's opcodes (fusion kinds spelt out).
Traffic = collections.namedtuple("Traffic", "kernels bytes ops")


def entry_traffic(hlo_text: str) -> Traffic:
    module, ops = Module(hlo_text), collections.Counter()
    for inst in module.body(module.entry):
        if inst.opcode not in NO_WORK:
            ops[inst.opcode + (f":{inst.attr('kind')}" if inst.attr("kind") else "")] += 1
    return Traffic(sum(ops.values()), launches(module).bytes, dict(ops))


def all_gather_shapes(hlo_text: str) -> list[tuple[int, ...]]:
    """The result dims of every all-gather (tuple results flattened)."""
    return [dims for _, inst in Module(hlo_text).instructions()
            if inst.opcode in ("all-gather", "all-gather-start")
            for _, dims in arrays(inst.type)]  # fmt: skip


_GROUP = re.compile(r"\{([\d,]*)\}")
_GROUPS = re.compile(r"^\{((?:\{[\d,]*\},?)*)\}")
_IOTA = re.compile(r"^\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_MESH_GROUPS = re.compile(r"^mesh\[([^\]]*)\]\s*\{([^}]*)\}")


def replica_groups(inst: Instruction) -> list[list[int]] | None:
    """A collective's device groups; None when it prints none (or in a form not read here).

    XLA prints them as lists (``{{0,1},{2,3}}``), as an iota (``[2,2]<=[2,2]T(1,0)``) or over
    a mesh of devices numbered in row-major order (``mesh['a'=2,'b'=4] {'a'}``: the devices that
    differ along ``a`` only).
    """
    start = inst.attributes.find("replica_groups=")
    text = inst.attributes[start + len("replica_groups=") :] if start >= 0 else ""
    if listed := _GROUPS.match(text):
        return [_ints(g) for g in _GROUP.findall(listed.group(1))]
    if iota := _IOTA.match(text):
        shape, dims, perm = (_ints(g or "") for g in iota.groups())
        ids = np.arange(math.prod(dims)).reshape(dims).transpose(perm or None).reshape(shape)
        return ids.tolist()
    if mesh := _MESH_GROUPS.match(text):
        names = re.findall(r"'([^']+)'=", mesh.group(1))
        sizes = [int(s) for s in re.findall(r"=(\d+)", mesh.group(1))]
        chosen = [names.index(a) for a in re.findall(r"'([^']+)'", mesh.group(2))]
        rest = [i for i in range(len(names)) if i not in chosen]
        ids = np.arange(math.prod(sizes)).reshape(sizes).transpose(rest + chosen)
        return ids.reshape(-1, math.prod(sizes[i] for i in chosen)).tolist()
    return None


def anonymous(hlo_text: str) -> list[str]:
    """The program's instructions with names and metadata dropped, in schedule order: two
    programs that differ only in what XLA named after the trace compare equal."""
    return [f"{inst.type} {inst.opcode}({_NAME.sub('%', inst.arguments)}) "
            + _NAME.sub("%", re.sub(r",? metadata=\{[^}]*\}", "", inst.attributes))
            for _, inst in Module(hlo_text).instructions()]  # fmt: skip


# FLOPs and the roofline

# XLA's dot algorithms (``algorithm=``, or a GEMM custom call's precision config): the peak
# they run at and how many passes of it ("f32": TF32 on GPUs, one bf16 pass on TPUs).
_ALGORITHMS = {
    "bf16_bf16_f32": ("bf16", 1), "bf16_bf16_f32_x3": ("bf16", 3),
    "bf16_bf16_f32_x6": ("bf16", 6), "bf16_bf16_f32_x9": ("bf16", 9),
    "tf32_tf32_f32": ("f32", 1), "tf32_tf32_f32_x3": ("f32", 3),
    "f32_f32_f32": ("f32_highest", 1), "f16_f16_f32": ("bf16", 1), "f16_f16_f16": ("bf16", 1),
}  # fmt: skip
_HALF = frozenset({"bf16", "f16", "f8e4m3fn", "f8e5m2", "s8", "u8", "s4", "u4"})


def dot_peak(target: Target, dtypes: Sequence[str], precision: str = "",
             algorithm: str = "") -> float:  # fmt: skip
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


Dot = collections.namedtuple("Dot", "computation name flops peak")  # one site: per call, FLOP/s


def _dot(module: Module, computation: str, inst: Instruction, target: Target) -> Dot | None:
    """The :class:`Dot` of a dot, convolution or cuBLAS GEMM custom call; None otherwise."""
    gemm = inst.backend_config.get("gemm_backend_config") if inst.opcode == "custom-call" else None
    if not gemm and inst.opcode not in ("dot", "convolution"):
        return None
    found = [module.get(computation, o) for o in inst.operands[:2]]
    types = [arrays(f.type)[0] if f is not None and arrays(f.type) else ("", ()) for f in found]
    dtypes, (lhs, rhs) = [d for d, _ in types], [s for _, s in types]
    out = 2.0 * math.prod(arrays(inst.type)[0][1])  # a GEMM's first array: a workspace may follow
    if gemm:
        config = gemm.get("precision_config", {})
        contracted = gemm.get("dot_dimension_numbers", {}).get("lhs_contracting_dimensions", [])
        precision, algorithm = (config.get("operand_precision") or [""])[0], config.get("algorithm")
    else:
        contracted = _ints(_search(r"\blhs_contracting_dims=\{([\d,]*)\}", inst.attributes))
        precision = _search(r"operand_precision=\{(\w+)", inst.attributes)
        algorithm = _search(r"algorithm=(\w+)", inst.attributes)
    peak = dot_peak(target, dtypes, precision, algorithm or "")
    if inst.opcode != "convolution":
        return Dot(computation, inst.name, out * math.prod(lhs[int(d)] for d in contracted), peak)
    # A convolution's output element contracts the kernel's input features and spatial window.
    labels = _search(r"dim_labels=\w+_(\w+)->", inst.attributes)  # e.g. bf_io->bf
    flops = out * math.prod(rhs) / rhs[labels.index("o")] if labels and rhs else 0.0
    return Dot(computation, inst.name, flops, peak)


def dots_in(module: Module, computation: str, target: Target) -> list[Dot]:
    """Every dot and convolution a computation runs, nested fusions and calls included."""
    found = []
    for inst in module.body(computation):
        if dot := _dot(module, computation, inst, target):
            found.append(dot)
        elif inst.opcode in ("fusion", "call") and inst.called:
            found += dots_in(module, inst.called, target)
    return found


class Kernel(collections.namedtuple("Kernel", "computation name label calls bytes flops "
                                     "compute_s memory_s")):  # fmt: skip
    """One kernel, per call (compute_s: Σ FLOPs / peak of its dots; memory_s: bytes /
    bandwidth), and how often it runs (the enclosing trip counts)."""

    @property
    def seconds(self) -> float:
        return self.calls * max(self.compute_s, self.memory_s)


@dataclasses.dataclass(frozen=True)
class Roofline:
    kernels: tuple[Kernel, ...]
    dots: tuple[tuple[Dot, int], ...]  # each dot site and how often it runs
    unknown_loops: tuple[str, ...]  # while loops with no trip count found (priced once)
    unpriced: tuple[str, ...]  # Pallas calls with no grid price (operands + result only)

    seconds = property(lambda self: sum(k.seconds for k in self.kernels))
    bytes = property(lambda self: sum(k.calls * k.bytes for k in self.kernels))
    flops = property(lambda self: sum(k.calls * k.flops for k in self.kernels))
    compute_bound_s = property(
        lambda self: sum(k.seconds for k in self.kernels if k.compute_s >= k.memory_s)
    )

    def matmuls(self, flops: float, at_least: float = 0.5) -> float:
        """How many matmuls of ``flops`` the program runs: each dot site's FLOPs × calls in units
        of ``flops``, summed over sites of at least ``at_least`` units (a blocked matmul's block
        dot, run once per block, counts as one)."""
        units = [d.flops * calls / flops for d, calls in self.dots]
        return sum(u for u in units if u >= at_least)


def pallas_name(inst: Instruction) -> str:
    """The name a ``pallas_call`` was given, from its custom call's name stack."""
    match = re.search(r"([^/]+)/pallas_call", _search(r'op_name="([^"]*)"', inst.attributes))
    return match.group(1) if match else re.sub(r"\.\d+$", "", inst.name)


def roofline(hlo_text: str, target: Target,
             pallas: Mapping[str, GridCost | str] | None = None) -> Roofline:  # fmt: skip
    """The modelled time of an optimised HLO module on ``target`` (see the module doc);
    ``pallas``: the grid prices of its Pallas kernels by name (:func:`pallas_costs`)."""
    module = Module(hlo_text)
    found = launches(module)
    kernels, dots, unpriced = [], [], []
    for where, inst, calls in found.launches:
        nbytes = kernel_bytes(module, where, inst)
        kernel_dots = [d] if (d := _dot(module, where, inst, target)) else []
        if not kernel_dots and inst.opcode == "fusion" and inst.called:
            kernel_dots = dots_in(module, inst.called, target)
        if inst.label.split(":", 1)[-1] in PALLAS_TARGETS:
            if isinstance(cost := (pallas or {}).get(pallas_name(inst)), GridCost):
                peak = dot_peak(target, cost.dot_dtypes or ("f32",))
                nbytes, kernel_dots = cost.bytes, [Dot(where, inst.name, cost.flops, peak)]
            else:
                why = cost or "no grid price given (a pallas_call is matched by its name=)"
                unpriced.append(f"{pallas_name(inst)}: {why}")
        dots += [(d, calls) for d in kernel_dots]
        compute = sum(d.flops / d.peak for d in kernel_dots)
        kernels.append(Kernel(where, inst.name, inst.label, calls, nbytes,
                              sum(d.flops for d in kernel_dots), compute,
                              nbytes / target.bandwidth))  # fmt: skip
    return Roofline(tuple(kernels), tuple(dots), tuple(found.unknown_loops), tuple(unpriced))


# Pallas kernels, priced from their grids

# One operand of a pallas_call as its grid moves it: block_shape (None: a squeezed dimension),
# index_map (called once with one integer array per grid dimension, every step at once), the
# whole array's shape and itemsize.
Block = collections.namedtuple("Block", "block_shape index_map shape itemsize")


class GridCost(collections.namedtuple("GridCost", "steps flops fetches writes read_bytes "
                                       "write_bytes dot_dtypes")):  # fmt: skip
    """What a grid moves and computes: per input its fetches and bytes, per output its
    write-backs and bytes; the operand dtypes of the kernel's dots (their peak)."""

    @property
    def bytes(self) -> int:
        return sum(self.read_bytes) + sum(self.write_bytes)


def price_grid(grid: Sequence[int], inputs: Sequence[Block], outputs: Sequence[Block],
               flops_per_step: float, *, skip_unchanged: bool = True,
               dot_dtypes: Sequence[str] = ()) -> GridCost:  # fmt: skip
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
            names = {"bfloat16": "bf16", "float16": "f16", "float32": "f32", "float64": "f64"}
            dtypes.append(names.get(lhs.dtype.name, lhs.dtype.name))
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


def _grid_cost(eqn: Any, skip_unchanged: bool) -> GridCost | str:
    """The grid price of one ``pallas_call`` equation, or why there is none."""
    mapping = eqn.params["grid_mapping"]
    if mapping.num_index_operands:
        return "scalar-prefetch index maps depend on data"
    if not all(isinstance(g, int) for g in mapping.grid):
        return "a dynamic grid"
    found = [_block(m) for m in mapping.block_mappings]
    if why := next((b for b in found if isinstance(b, str)), None):
        return why
    blocks = [b for b in found if not isinstance(b, str)]
    flops, dtypes = _jaxpr_dots(eqn.params["jaxpr"])
    n_in, n_out = mapping.num_inputs, mapping.num_outputs
    return price_grid(mapping.grid, blocks[:n_in], blocks[n_in : n_in + n_out], flops,
                      skip_unchanged=skip_unchanged, dot_dtypes=sorted(set(dtypes)))  # fmt: skip


def pallas_costs(closed_jaxpr: Any, *, skip_unchanged: bool = True) -> dict[str, GridCost | str]:
    """The grid price (:func:`price_grid`), or why there is none, of every ``pallas_call`` in a
    traced program, by the name its custom call carries (``name=``, else the kernel's name)."""
    costs: dict[str, GridCost | str] = {}
    pending = [getattr(closed_jaxpr, "jaxpr", closed_jaxpr)]
    while pending:
        for eqn in pending.pop().eqns:
            if eqn.primitive.name == "pallas_call":
                debug = getattr(eqn.params["jaxpr"], "debug_info", None)
                name = eqn.params.get("name") or getattr(debug, "func_name", "pallas_call")
                costs[name] = _grid_cost(eqn, skip_unchanged)
            pending += _subjaxprs(eqn)
    return costs


# A program compiled for a target, and its figures

# The executable, its optimised HLO text, the grid price of each of its Pallas kernels.
Program = collections.namedtuple("Program", "compiled text pallas")


def optimised_text(lowered: Any, compiled: Any = None) -> str:
    """The optimised HLO of ``lowered`` (``compiled``: its compiled form, if at hand)."""
    try:
        return str((compiled or lowered.compile()).as_text())
    except Exception:  # libtpu 0.0.52 cannot print some SparseCore async-updates: XLA's dump
        with tempfile.TemporaryDirectory() as folder:
            lowered.compile(compiler_options={"xla_dump_to": folder, "xla_dump_hlo_as_text": True})
            (path,) = glob.glob(os.path.join(folder, "*after_optimizations.txt"))
            with open(path) as dumped:
                return dumped.read()


def compile_program(target: Target, fn: Callable, specs: Sequence[Any]) -> Program:
    """``jax.jit(fn)`` compiled for one device of ``target`` on abstract arguments."""
    import jax

    sharding = jax.sharding.SingleDeviceSharding(devices(target.name)[0])
    placed = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding) for s in specs]
    traced = jax.jit(fn).trace(*placed)
    lowered = traced.lower()
    compiled = lowered.compile()
    # A TPU grid skips the fetch of an unchanged block; a GPU program instance loads its own.
    pallas = pallas_costs(traced.jaxpr, skip_unchanged=target.platform == "tpu")
    return Program(compiled, optimised_text(lowered, compiled), pallas)


def analyse(program: Program, target: Target, unit_flops: float | None = None) -> dict[str, Any]:
    """Modelled time and bytes, kernels and temporaries of a compiled program; with
    ``unit_flops`` (2·N·D·V of a linear head), how many such matmuls it runs."""
    model, traffic = roofline(program.text, target, program.pallas), entry_traffic(program.text)
    bound = lambda k: "compute" if k.compute_s >= k.memory_s else "memory"
    entry: dict[str, Any] = {
        "kernels": traffic.kernels, "hbm_bytes": model.bytes, "ops": traffic.ops,
        "temp_bytes": int(program.compiled.memory_analysis().temp_size_in_bytes),
        "roofline_s": model.seconds, "flops": model.flops, "compute_bound_s": model.compute_bound_s,
        "launches": sum(k.calls for k in model.kernels),
        "top_kernels": [{"name": k.name, "label": k.label, "calls": k.calls, "seconds": k.seconds,
                         "bytes_per_call": k.bytes, "flops_per_call": k.flops, "bound": bound(k)}
                        for k in sorted(model.kernels, key=lambda k: -k.seconds)[:6]],
        "unknown_loops": list(model.unknown_loops), "unpriced_pallas": list(model.unpriced),
    }  # fmt: skip
    if unit_flops:
        entry["matmuls"] = model.matmuls(unit_flops)
    try:  # XLA's own figure where the backend has one (not the GPU plugin here)
        cost = program.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        entry["xla_bytes_accessed"] = float(cost["bytes accessed"]) if cost else None
    except Exception:
        entry["xla_bytes_accessed"] = None
    return entry
