"""The one reader of optimised HLO text (``compiled.as_text()``, the view every backend gives),
for the benchmarks and the tests: :class:`Module` parses it, :func:`launches` finds the kernels
the program runs and how often (loops × trip counts), :func:`kernel_bytes` what a kernel moves."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from collections.abc import Iterator
from typing import Any

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
NO_WORK_TARGETS = frozenset({"AllocateBuffer"})  # XLA:TPU's loop-carried accumulators
# Custom calls that are kernels of their own (Pallas: Mosaic TPU, Triton, Mosaic GPU).
PALLAS_TARGETS = frozenset(
    {"tpu_custom_call", "__gpu$xla.gpu.triton", "mosaic_gpu", "mosaic_gpu_v2"}
)


def arrays(hlo_type: str) -> list[tuple[str, tuple[int, ...]]]:
    """``(element type, dims)`` of every array in an HLO type (a tuple is flattened)."""
    return [(t, tuple(int(d) for d in dims.split(",") if d))
            for t, dims in _ARRAY_TYPE.findall(hlo_type)]  # fmt: skip


def type_bytes(hlo_type: str) -> int:
    return sum(ITEMSIZE.get(dtype, 0) * math.prod(dims) for dtype, dims in arrays(hlo_type))


def _closing(text: str, start: int, pair: str = "()") -> int:
    """Index just past the bracket group opening at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        depth += {pair[0]: 1, pair[1]: -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    return len(text)


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
        return type_bytes(self.type)

    def attr(self, key: str) -> str | None:
        """The value of ``key=...`` up to the next comma (a computation loses its ``%``)."""
        match = re.search(rf"(?:^|[\s,]){re.escape(key)}=%?([^,\s]+)", self.attributes)
        return match.group(1) if match else None

    @property
    def called(self) -> str | None:
        return self.attr("calls")

    @property
    def backend_config(self) -> dict[str, Any]:
        start = self.attributes.find("backend_config={") + len("backend_config=")
        if start < len("backend_config="):
            return {}
        try:
            return json.loads(self.attributes[start : _closing(self.attributes, start, "{}")])
        except ValueError:
            return {}

    @property
    def op_name(self) -> str:
        match = re.search(r'op_name="([^"]*)"', self.attributes)
        return match.group(1) if match else ""

    def computations(self, key: str) -> list[str]:
        """The computations named by ``key={%a, %b}``."""
        match = re.search(rf"{key}=\{{([^}}]*)\}}", self.attributes)
        return _NAME.findall(match.group(1)) if match else []


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
    return Instruction(
        name[1:], hlo_type, rest[:paren], tuple(_NAME.findall(inside)), rest[close:], inside
    )


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

    @functools.cached_property
    def _by_name(self) -> dict[str, dict[str, Instruction]]:
        return {c: {i.name: i for i in body} for c, body in self.computations.items()}

    def body(self, computation: str) -> list[Instruction]:
        return self.computations.get(computation, [])

    def get(self, computation: str, name: str) -> Instruction | None:
        return self._by_name.get(computation, {}).get(name)

    def root(self, computation: str) -> Instruction | None:
        body = self.body(computation)
        return body[-1] if body else None  # XLA prints the ROOT last

    def instructions(self) -> Iterator[tuple[str, Instruction]]:
        return ((c, inst) for c, body in self.computations.items() for inst in body)

    def trip_count(self, computation: str, loop: Instruction) -> int | None:
        """How often a ``while`` of ``computation`` runs its body: the count XLA:GPU proved
        (``known_trip_count``), else the induction pattern of ``fori_loop`` and ``scan`` (XLA:TPU
        says nothing): a condition ``state[i] < limit``, ``state[i]`` initially a constant, the
        body adding a constant step to it. None when neither is found."""
        known = loop.backend_config.get("known_trip_count", {}).get("n")
        if known is not None:
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
        if compare.attr("direction") != "LT" or lhs is None or limit is None:
            return None
        if lhs.opcode != "get-tuple-element":  # the induction variable: state[index]
            return None
        index, start = int(lhs.attr("index") or -1), None
        init = self.get(computation, loop.operands[0])
        if init is not None and init.opcode == "tuple" and index < len(init.operands):
            start = self._constant(computation, self.get(computation, init.operands[index]))
        step, last = None, self.root(body)
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


def _reads(module: Module, fused: str, name: str, full: int) -> int:
    """Bytes a fused computation reads of its buffer ``name`` (``full`` bytes in all): what is
    sliced or gathered from it; nothing where an in-place ``dynamic-update-slice`` writes into
    it; through a bitcast or a nested fusion, what that reads. At most ``full``."""
    users, total = [i for i in module.body(fused) if name in i.operands], 0
    for user in users:
        positions = [k for k, o in enumerate(user.operands) if o == name]
        if user.opcode in SLICING and positions == [0]:
            total += user.nbytes
        elif user.opcode == "dynamic-update-slice" and positions == [0]:
            continue
        elif user.opcode == "bitcast":
            total += _reads(module, fused, user.name, full)
        elif user.opcode == "fusion" and user.called:
            total += sum(operand_read_bytes(module, user.called, k, full) for k in positions)
        else:
            return full
    return total if users else full


def operand_read_bytes(module: Module, fused: str, index: int, full: int) -> int:
    """Bytes a fused computation reads of its parameter ``index`` (see :func:`_reads`)."""
    params = (
        i for i in module.body(fused) if i.opcode == "parameter" and i.arguments == str(index)
    )
    param = next(params, None)
    return full if param is None else min(full, _reads(module, fused, param.name, full))


def _update_bytes(module: Module, computation: str, inst: Instruction, default: int) -> int:
    """An in-place ``dynamic-update-slice`` writes its update; anything else ``default``."""
    if inst.opcode != "dynamic-update-slice":
        return default
    update = module.get(computation, inst.operands[1])
    return update.nbytes if update is not None else default


def kernel_bytes(module: Module, computation: str, inst: Instruction) -> int:
    """Modelled HBM bytes of one instruction that launches work: operands read + result
    written; a sliced operand counts what is taken, an in-place update (alone, at a fusion's
    root or in its root tuple) its update."""
    fused = inst.called or ""
    if inst.opcode != "fusion" or (root := module.root(fused)) is None:
        total = _update_bytes(module, computation, inst, inst.nbytes)
    elif root.opcode == "tuple":
        parts = [p for o in root.operands if (p := module.get(fused, o)) is not None]
        total = sum(_update_bytes(module, fused, p, p.nbytes) for p in parts)
    else:
        total = _update_bytes(module, fused, root, inst.nbytes)
    for k, operand in enumerate(inst.operands):
        if (source := module.get(computation, operand)) is None:
            continue
        if inst.opcode in SLICING and k == 0:
            total += inst.nbytes
        elif inst.opcode == "dynamic-update-slice" and k == 0:
            continue  # written in place: the update is counted with the result
        elif inst.opcode == "fusion" and inst.called:
            total += operand_read_bytes(module, inst.called, k, source.nbytes)
        else:
            total += source.nbytes
    return total


@dataclasses.dataclass(frozen=True)
class Launch:
    """An instruction that launches work, and how often it runs per call of the program."""

    computation: str
    inst: Instruction
    calls: int


def kernel_label(inst: Instruction) -> str:
    """The opcode, with a fusion's kind or a custom call's target spelt out."""
    if kind := inst.attr("kind"):
        return f"{inst.opcode}:{kind}"
    target = inst.attr("custom_call_target")
    return f"{inst.opcode}:{target.strip(chr(34))}" if target else inst.opcode


@dataclasses.dataclass
class Launches:
    """Every kernel launch of a module, loops unrolled into counts (see :func:`launches`)."""

    module: Module
    launches: list[Launch] = dataclasses.field(default_factory=list)
    unknown_loops: list[str] = dataclasses.field(default_factory=list)

    def walk(self, computation: str, calls: int) -> None:
        for inst in self.module.body(computation):
            target = kernel_label(inst).split(":", 1)[-1]
            # A custom call naming computations, other than a GEMM or a Pallas kernel, stands
            # for them (XLA:TPU's SparseCore gather offload, for one).
            plain = target in PALLAS_TARGETS or "gemm_backend_config" in inst.backend_config
            wrapped = [] if inst.opcode != "custom-call" or plain else (
                inst.computations("called_computations"))  # fmt: skip
            if inst.opcode in (*NO_WORK, "async-update", "async-done") or target in NO_WORK_TARGETS:
                continue  # an async op's work is its wrapped computation's (at its start)
            if inst.opcode == "while":
                trips = self.module.trip_count(computation, inst)
                if trips is None:
                    self.unknown_loops.append(f"{computation}/{inst.name}")
                    trips = 1
                self.walk(inst.attr("body") or "", calls * trips)
                self.walk(inst.attr("condition") or "", calls * (trips + 1))
            elif inst.opcode in ("call", "async-start"):
                self.walk(inst.called or inst.attr("to_apply") or "", calls)
            elif inst.opcode == "conditional":
                self.branch(inst, calls)
            elif wrapped:
                for name in wrapped:
                    self.walk(name, calls)
            else:
                self.launches.append(Launch(computation, inst, calls))

    def branch(self, inst: Instruction, calls: int) -> None:
        """A conditional runs one branch (which is data): the one that moves most bytes."""
        names = inst.computations("branch_computations")
        names += [inst.attr(k) or "" for k in ("true_computation", "false_computation")]
        branches = []
        for name in filter(None, names):
            sub = Launches(self.module)
            sub.walk(name, calls)
            moved = sum(x.calls * kernel_bytes(self.module, x.computation, x.inst)
                        for x in sub.launches)  # fmt: skip
            branches.append((moved, sub))
        if branches:
            best = max(branches, key=lambda b: b[0])[1]
            self.launches += best.launches
            self.unknown_loops += best.unknown_loops


def launches(module: Module) -> Launches:
    """The kernels the ENTRY computation launches with their counts: a while loop's body and
    condition once per trip (once when no count is found, listed in ``unknown_loops``), calls
    and async ops what they wrap."""
    found = Launches(module)
    found.walk(module.entry, 1)
    return found


@dataclasses.dataclass(frozen=True)
class Traffic:
    kernels: int  # ENTRY instructions that launch work
    bytes: int  # modelled HBM bytes of every launch (loops times their trip counts)
    ops: dict[str, int]  # the ENTRY kernels' opcodes (fusion kinds spelt out) and counts


def entry_traffic(hlo_text: str) -> Traffic:
    module = Module(hlo_text)
    total = sum(x.calls * kernel_bytes(module, x.computation, x.inst)
                for x in launches(module).launches)  # fmt: skip
    ops: dict[str, int] = {}
    for inst in module.body(module.entry):
        if inst.opcode not in NO_WORK:
            label = inst.opcode + (f":{inst.attr('kind')}" if inst.attr("kind") else "")
            ops[label] = ops.get(label, 0) + 1
    return Traffic(sum(ops.values()), total, ops)


def all_gather_shapes(hlo_text: str) -> list[tuple[int, ...]]:
    """The result dims of every all-gather (tuple results flattened)."""
    return [dims for _, inst in Module(hlo_text).instructions()
            if inst.opcode in ("all-gather", "all-gather-start")
            for _, dims in arrays(inst.type)]  # fmt: skip
