"""Compile-only accelerator figures: kernels, modelled HBM bytes, temporaries, roofline time.

``python -m benchmarks --target h100`` (or ``tpu-v5e``, ``tpu-v5p``; see
:mod:`benchmarks.targets`) compiles every case of the accelerator grid for a device this machine
does not have, and reads the optimised program. **These are compiler figures, not
measurements**: nothing runs on an accelerator.

Traffic model (loop-free programs): every instruction of the optimised ENTRY computation that
launches work reads each operand from device memory and writes its result there; its bytes are
the sum of those. An operand that a fusion reads only through ``gather`` or ``dynamic-slice``
counts the bytes those produce (a gather of one logit per row reads N elements, not N×C). The
"copy" floor is the least traffic of the function: every input read once and every output
written once (forward: the logits and targets; value_and_grad: plus the gradient). Programs with
loops (the chunked linear cross-entropy) are reported by their temporaries only.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

# libtpu takes a machine-wide lock file unless told that other processes may load it too;
# compile-only programs need no exclusive access to a chip (there is none).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# Without a GPU the CUDA plugin's check for CUDA libraries fails and the plugin (with it the
# compile-only H100) is not registered; compiling needs none of those libraries.
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

import jax
import numpy as np

from benchmarks.targets import TARGETS, Target

_ITEMSIZE = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1,
    "s4": 1, "u4": 1,
}  # fmt: skip
_ARRAY_TYPE = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")
_NAME = re.compile(r"%([\w.\-]+)")
# Instructions that name or regroup buffers without touching their contents, and the async
# copies between memory spaces on TPU (the data they move is counted at its consumer).
_NO_WORK = frozenset(
    {
        "parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all",
        "copy-start", "copy-done", "partition-id", "replica-id", "opt-barrier",
    }
)  # fmt: skip
_SLICING = frozenset({"gather", "dynamic-slice"})


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    type: str
    opcode: str
    operands: tuple[str, ...]
    attributes: str
    arguments: str = ""  # the text inside the parentheses (a parameter's number)

    @property
    def nbytes(self) -> int:
        return type_bytes(self.type)

    @property
    def called(self) -> str | None:
        match = re.search(r"calls=%([\w.\-]+)", self.attributes)
        return match.group(1) if match else None


def type_bytes(hlo_type: str) -> int:
    """Bytes of an HLO type (an array or a tuple of arrays); layouts are ignored."""
    total = 0
    for dtype, dims in _ARRAY_TYPE.findall(hlo_type):
        total += _ITEMSIZE.get(dtype, 0) * int(np.prod([int(d) for d in dims.split(",") if d]))
    return total


def _closing(text: str, start: int) -> int:
    """Index just past the parenthesis group opening at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    return len(text)


def parse_instruction(line: str) -> Instruction | None:
    line = line.strip()
    if line.startswith("ROOT "):
        line = line[5:]
    name, sep, rest = line.partition(" = ")
    if not sep or not name.startswith("%"):
        return None
    end = _closing(rest, 0) if rest.startswith("(") else rest.find(" ")
    hlo_type, rest = rest[:end], rest[end:].lstrip()
    paren = rest.find("(")
    if paren < 0:
        return None
    close = _closing(rest, paren)
    operands = tuple(_NAME.findall(rest[paren + 1 : close - 1]))
    return Instruction(
        name[1:], hlo_type, rest[:paren], operands, rest[close:], rest[paren + 1 : close - 1]
    )


def computations(hlo_text: str) -> tuple[dict[str, list[Instruction]], str]:
    """Instructions by computation name, and the ENTRY computation's name."""
    comps: dict[str, list[Instruction]] = {}
    entry, current = "", None
    for line in hlo_text.splitlines():
        header = re.match(r"^(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$", line)
        if header:
            current = header.group(2)
            comps[current] = []
            entry = current if header.group(1) else entry
        elif line.startswith("}"):
            current = None
        elif current is not None:
            inst = parse_instruction(line)
            if inst is not None:
                comps[current].append(inst)
    return comps, entry


def _sliced_bytes(body: Sequence[Instruction], index: int) -> int | None:
    """Bytes a fused computation reads of its parameter ``index`` when every use slices it."""
    param = next(
        (i.name for i in body if i.opcode == "parameter" and i.arguments == str(index)), None
    )
    if param is None:
        return None
    users = [i for i in body if param in i.operands]
    if not users or any(u.opcode not in _SLICING or u.operands[0] != param for u in users):
        return None
    return sum(u.nbytes for u in users)


@dataclasses.dataclass(frozen=True)
class Traffic:
    kernels: int  # ENTRY instructions that launch work
    bytes: int  # modelled HBM bytes: operands + results of each of them
    ops: dict[str, int]  # their opcodes (fusion kinds spelt out) and counts


def entry_traffic(hlo_text: str) -> Traffic:
    """The traffic model of the module doc, on an optimised HLO module's text."""
    comps, entry = computations(hlo_text)
    body = comps.get(entry, [])
    types = {i.name: i for i in body}
    total, kernels, ops = 0, 0, {}
    for inst in body:
        if inst.opcode in _NO_WORK:
            continue
        kernels += 1
        kind = re.search(r"kind=(k\w+)", inst.attributes)
        label = inst.opcode + (f":{kind.group(1)}" if kind else "")
        ops[label] = ops.get(label, 0) + 1
        fused = comps.get(inst.called or "", [])
        total += inst.nbytes
        for k, operand in enumerate(inst.operands):
            source = types.get(operand)
            if source is None:
                continue
            sliced = None
            if inst.opcode in _SLICING and k == 0:
                sliced = inst.nbytes
            elif inst.opcode == "fusion":
                sliced = _sliced_bytes(fused, k)
            total += source.nbytes if sliced is None else sliced
    return Traffic(kernels, total, ops)


# ----------------------------------------------------------------------------------------------
# Compiling for a target
# ----------------------------------------------------------------------------------------------


@functools.cache
def devices(target_name: str, multi: bool = False) -> tuple[Any, ...]:
    """The compile-only devices of a target (one, or eight with ``multi``)."""
    from jax.experimental import topologies

    target = TARGETS[target_name]
    topology = target.multi_topology if multi else target.topology
    if target.platform == "cuda":
        desc = topologies.get_topology_desc(
            "", "cuda", target_config=target.target_config(), topology=topology
        )
    else:
        desc = topologies.get_topology_desc(topology, target.platform)
    return tuple(desc.devices)


def place(specs: Any, device: Any) -> Any:
    """``ShapeDtypeStruct`` leaves of ``specs`` placed on one compile-only device."""
    sharding = jax.sharding.SingleDeviceSharding(device)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), specs)


def compile_on(target: Target, fn: Callable, specs: Sequence[Any]) -> Any:
    """``jax.jit(fn)`` compiled for one device of ``target`` on abstract arguments."""
    placed = place(tuple(specs), devices(target.name)[0])
    return jax.jit(fn).trace(*placed).lower().compile()


def analyse(compiled: Any) -> dict[str, Any]:
    """Kernels, modelled bytes, opcodes and temporaries of a compiled program."""
    text = compiled.as_text()
    traffic = entry_traffic(text)
    memory = compiled.memory_analysis()
    looped = bool(re.search(r"\bwhile\(", text[text.index("ENTRY") :]))
    entry: dict[str, Any] = {
        "kernels": traffic.kernels,
        "hbm_bytes": None if looped else traffic.bytes,
        "ops": traffic.ops,
        "temp_bytes": int(memory.temp_size_in_bytes),
        "has_loop": looped,
    }
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        entry["xla_bytes_accessed"] = float(cost["bytes accessed"]) if cost else None
    except Exception:  # the GPU compiler has no cost analysis of its own here
        entry["xla_bytes_accessed"] = None
    return entry


# ----------------------------------------------------------------------------------------------
# The accelerator grid: plan, compile, table, goals
# ----------------------------------------------------------------------------------------------

NOT_MEASURED = (
    "COMPILER FIGURES, NOT MEASUREMENTS: each program is compiled for a device this machine "
    "does not have; kernels, bytes and temporaries are read from the optimised program, and "
    "the roofline time is modelled bytes / HBM bandwidth."
)
TRAFFIC_MODEL = (
    "hbm = operands + results of every ENTRY instruction that launches work (a gather/"
    "dynamic-slice-only operand counts what it produces); copy = every input read once and "
    "every output written once; x copy = hbm / copy; roofline = hbm / bandwidth; loops (the "
    "chunked linear_cross_entropy): temporaries only."
)
# linear_cross_entropy value_and_grad temporaries: (shape, dtype, MiB) per target.
LINEAR_GOALS = {
    "h100": ((8192, 4096, 131072), "bf16", 128),
    "tpu-v5p": ((8192, 2048, 131072), "f32", 256),
}
LINEAR = "linear_cross_entropy"
PEERS = ("jaxloss", "optax")


@dataclasses.dataclass(frozen=True)
class Point:
    case: Any  # benchmarks.cases.Case
    mode: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.case.name}/{self.mode}/{self.dtype}/{'x'.join(map(str, self.shape))}"


# --quick: the goal points of cross_entropy and linear_cross_entropy (a dozen compiles).
QUICK_CASES = ("cross_entropy", LINEAR)


def plan(target: Target, cases: Sequence[Any], args: Any) -> list[Point]:
    """The grid of a target: every case at its sizes (``--quick``: see :data:`QUICK_CASES`)."""
    filters = [f for f in args.filter.split(",") if f]
    sizes = args.sizes or (target.sizes[-1:] if args.quick else target.sizes)
    points = []
    for case in cases:
        if filters and not any(re.search(f, case.name) for f in filters):
            continue
        if args.quick and not args.sizes and case.name not in QUICK_CASES:
            continue
        if case.name == LINEAR:
            grid = [(tuple(s), d) for s, d in target.linear_points]
            modes = ["vag"]
        else:
            grid = [(tuple(s), d) for s in sizes for d in args.dtypes]
            modes = [m for m in args.modes if m in case.modes]
        points += [Point(case, m, d, s) for s, d in grid if d in args.dtypes for m in modes]
    return points


def _nbytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def measure(target: Target, point: Point) -> dict[str, Any]:
    """Compiles every JAX implementation of one point for ``target``: one results record."""
    from benchmarks import harness

    case, mode = point.case, point.mode
    specs = harness.abstract_args(case, mode, point.dtype, point.shape)
    record = harness.base_record(case, mode, point.dtype, point.shape)
    record["memory_only"] = case.name == LINEAR
    outputs = jax.eval_shape(harness.jax_function(case, case.impls["jaxloss"], mode), *specs)
    record["min_bytes"] = _nbytes(specs) + _nbytes(outputs)
    for name, fn in case.impls.items():
        if name == "torch":
            record["impls"].pop(name)
            continue
        entry = record["impls"][name]
        try:
            entry.update(analyse(compile_on(target, harness.jax_function(case, fn, mode), specs)))
        except Exception as err:  # a peer that cannot compile is reported, not fatal
            entry["error"] = f"{type(err).__name__}: {err}"[:300]
            continue
        entry["temp_ratio"] = entry["temp_bytes"] / record["logits_bytes"]
        if case.name == LINEAR and target.platform == "tpu" and point.dtype == "f32":
            # TPUs run DEFAULT-precision float32 matmuls as bf16 passes, and XLA keeps a bf16
            # copy of the whole kernel for them; float32 matmuls need none.
            with jax.default_matmul_precision("float32"):
                program = compile_on(target, harness.jax_function(case, fn, mode), specs)
            entry["temp_bytes_f32_matmuls"] = program.memory_analysis().temp_size_in_bytes
        hbm = entry["hbm_bytes"]
        if hbm is not None:
            entry["copy_ratio"] = hbm / record["min_bytes"]
            entry["roofline_s"] = hbm / target.bandwidth
            entry["elements_per_s"] = record["elements"] / entry["roofline_s"]  # modelled
    jl, ox = (record["impls"].get(k, {}).get("hbm_bytes") for k in PEERS)
    # Modelled time ratio = bytes ratio (the plots' "time relative to optax").
    record["ratio_to_optax"] = {"jaxloss": jl / ox} if jl and ox else {}
    return record


def _cell(entry: dict, key: str, fmt: Callable[[Any], str]) -> str:
    value = entry.get(key)
    return "-" if value is None else fmt(value)


def format_table(records: Sequence[dict]) -> str:
    """One line per point: kernels, x copy, temporaries, roofline time; jaxloss and optax."""
    from benchmarks.report import fmt_bytes, fmt_time

    head = (
        f"{'function':<27} {'mode':<4} {'dtype':<5} {'shape':<12} {'kernels':>7} "
        f"{'x copy':>11} {'temporaries':>17} {'roofline':>15}"
    )
    sub = f"{'':<59}{'jl/ox':>7} {'jl    ox':>11} {'jl       ox':>17} {'jl      ox':>15}"
    lines = [head, sub, "-" * len(head)]
    for r in records:
        jl, ox = (r["impls"].get(k, {}) for k in PEERS)
        errors = [f"{k}: {e['error'][:50]}" for k, e in r["impls"].items() if "error" in e]

        def pair(key, fmt, width, jl=jl, ox=ox):
            return f"{_cell(jl, key, fmt):>{width}} {_cell(ox, key, fmt):>{width}}"

        kernels = f"{_cell(jl, 'kernels', str)}/{_cell(ox, 'kernels', str)}"
        lines.append(
            f"{r['case']:<27} {r['mode']:<4} {r['dtype']:<5} {'x'.join(map(str, r['shape'])):<12} "
            f"{kernels:>7} {pair('copy_ratio', lambda v: f'{v:.3f}', 5)} "
            f"{pair('temp_bytes', fmt_bytes, 8)} {pair('roofline_s', fmt_time, 7)}"
            + (f"  errors: {'; '.join(errors)}" if errors else "")
        )
    legend = (
        "kernels: ENTRY instructions that launch work, jaxloss/optax (jax.nn for softmax and "
        "log_softmax; optax\nmaterialises the logits for linear_cross_entropy). " + TRAFFIC_MODEL
    )
    return "\n".join([*lines, "", legend])


# Per-row vectors (max, sum, weights, the loss) are N-sized: goals on N×C traffic allow this
# much of the logits' bytes for them.
ROW_SLACK = 1e-3
ROW_NOTE = "judged within N-sized vectors: 0.1% of the logits' bytes"
PEER_NOTE = "judged within 0.1% of the larger of the peer's and the logits' bytes"


def _bytes_goal(goal_id, description, lhs, rhs, threshold, lhs_label, rhs_label, note="", slack=0):
    """``lhs <= threshold * rhs + slack`` (bytes)."""
    goal = {
        "id": goal_id, "description": description, "kind": "bytes", "lhs_label": lhs_label,
        "lhs": lhs, "rhs_label": rhs_label, "rhs": rhs, "threshold": threshold,
        "interval": None, "rounds": 0, "note": note,
    }  # fmt: skip
    if lhs is None or not rhs:
        return {**goal, "status": "N/A", "ratio": None, "note": note or "not compiled"}
    passed = lhs <= threshold * rhs + slack
    return {**goal, "status": "PASS" if passed else "FAIL", "ratio": lhs / rhs}


def _get(records, case, mode, dtype, shape):
    return next(
        (r for r in records if (r["case"], r["mode"], r["dtype"], tuple(r["shape"]))
         == (case, mode, dtype, tuple(shape))),
        None,
    )  # fmt: skip


def evaluate_goals(target: Target, records: Sequence[dict]) -> list[dict]:
    """Modelled-bytes goals of issue 8 for one target (compiler figures, exact)."""
    shape = target.sizes[-1]
    size = "x".join(map(str, shape))
    goals = []
    for dtype in ("f32", "bf16"):
        vag = _get(records, "cross_entropy", "vag", dtype, shape) or {"impls": {}}
        fwd = _get(records, "cross_entropy", "fwd", dtype, shape) or {"impls": {}}
        goals.append(_bytes_goal(
            f"ce_vag_hbm_{dtype}",
            f"{dtype} cross_entropy value_and_grad at {size}: modelled HBM <= 1.5x copy",
            vag["impls"].get("jaxloss", {}).get("hbm_bytes"), vag.get("min_bytes"), 1.5,
            "jaxloss bytes", "copy bytes", ROW_NOTE, ROW_SLACK * vag.get("logits_bytes", 0),
        ))  # fmt: skip
        goals.append(_bytes_goal(
            f"ce_fwd_hbm_{dtype}",
            f"{dtype} cross_entropy forward at {size}: modelled HBM <= 1.05x the logits",
            fwd["impls"].get("jaxloss", {}).get("hbm_bytes"), fwd.get("logits_bytes"), 1.05,
            "jaxloss bytes", "logits bytes", ROW_NOTE, ROW_SLACK * fwd.get("logits_bytes", 0),
        ))  # fmt: skip
        goals.append(_peer_goal(records, dtype, shape))
    if target.name in LINEAR_GOALS:
        lshape, dtype, mib = LINEAR_GOALS[target.name]
        r = _get(records, LINEAR, "vag", dtype, lshape) or {"impls": {}}
        ours = r["impls"].get("jaxloss", {})
        what = f"{dtype} linear_cross_entropy value_and_grad temporaries at "
        what += f"{'x'.join(map(str, lshape))} <= {mib} MiB"
        goals.append(_bytes_goal(
            f"linear_ce_temp_{dtype}", what, ours.get("temp_bytes"), mib * 2**20, 1.0,
            "jaxloss temp bytes", f"{mib} MiB",
            "DEFAULT matmul precision: on TPU, XLA's bf16 copy of a float32 kernel included"
            if "temp_bytes_f32_matmuls" in ours else "",
        ))  # fmt: skip
        if "temp_bytes_f32_matmuls" in ours:
            goals.append(_bytes_goal(
                f"linear_ce_temp_{dtype}_f32_matmuls", what + " (float32 matmul precision)",
                ours["temp_bytes_f32_matmuls"], mib * 2**20, 1.0, "jaxloss temp bytes",
                f"{mib} MiB", 'under jax.default_matmul_precision("float32")',
            ))  # fmt: skip
    return goals


def _peer_goal(records: Sequence[dict], dtype: str, shape: tuple[int, ...]) -> dict:
    """Every other function at ``shape``, both modes: jaxloss's bytes <= its peer's."""
    compared: dict[str, tuple[int, int, float]] = {}
    for r in records:
        if r["case"] in ("cross_entropy", LINEAR) or r["dtype"] != dtype:
            continue
        if tuple(r["shape"]) == tuple(shape) and r.get("ratio_to_optax"):
            jl, ox = (r["impls"][k]["hbm_bytes"] for k in PEERS)
            slack = ROW_SLACK * max(ox, r["logits_bytes"])
            compared[f"{r['case']} {r['mode']}"] = (jl, ox, slack)
    over = sorted(k for k, (jl, ox, slack) in compared.items() if jl > ox + slack)
    # Judged against the peer's bytes plus the slack, so the ratio shown is the one judged.
    worst = max(compared, key=lambda k: compared[k][0] / sum(compared[k][1:]), default=None)
    description = (
        f"{dtype} every other function at {'x'.join(map(str, shape))}, fwd and vag: modelled "
        "HBM <= its optax/jax.nn peer's"
    )
    if worst is None:
        note = "not compiled in this run (the full grid has it; --quick does not)"
        return _bytes_goal(f"peers_hbm_{dtype}", description, None, None, 1.0, "", "", note)
    jl, ox, slack = compared[over[0] if over else worst]
    goal = _bytes_goal(
        f"peers_hbm_{dtype}", description, jl, ox + slack, 1.0, "jaxloss bytes",
        "peer bytes + slack", f"{len(compared)} compared; " + (f"over: {', '.join(over)}" if over
        else f"largest ratio: {worst}") + f"; {PEER_NOTE}",
    )  # fmt: skip
    return {**goal, "status": "FAIL" if over else "PASS"}


def _metadata(target: Target, args: Any, argv: Sequence[str] | None, points) -> dict[str, Any]:
    import datetime
    import importlib.metadata
    import platform
    import subprocess

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    packages = ("jax", "jaxlib", "optax", "numpy", "jax-cuda12-pjrt", "jax-cuda12-plugin", "libtpu")
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False,
        cwd=os.path.dirname(os.path.abspath(__file__)),
    ).stdout.strip()  # fmt: skip
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "target": dataclasses.asdict(target),
        "device": f"{target.platform}: {devices(target.name)[0].device_kind}",
        "compile_only": True,
        "not_measured": NOT_MEASURED,
        "traffic_model": TRAFFIC_MODEL,
        "versions": {"python": platform.python_version(), **{p: version(p) for p in packages}},
        "git_commit": commit or None,
        "argv": list(sys.argv[1:] if argv is None else argv),
        "quick": args.quick,
        "points": [p.name for p in points],
    }


def run(args: Any, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m benchmarks --target NAME``: compiles the grid, prints and writes the results."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from benchmarks import report
    from benchmarks.cases import all_cases

    started = time.perf_counter()
    # The host backend stays CPU (nothing runs); the targets come from their PJRT plugins.
    jax.config.update("jax_platforms", "cpu")
    target = TARGETS[args.target]
    points = plan(target, all_cases(include_torch=False), args)
    devices(target.name)  # the plugin loads once, before the compile threads start
    bar = tqdm(total=len(points), file=sys.stderr, disable=args.no_progress)
    with ThreadPoolExecutor(max(1, min(args.compile_workers, 4))) as pool:
        records = []
        for record in pool.map(lambda p: measure(target, p), points):
            records.append(record)
            bar.set_postfix_str(record["name"], refresh=False)
            bar.update()
    bar.close()
    goals = evaluate_goals(target, records)
    meta = _metadata(target, args, argv, points)
    meta["wall_s"] = time.perf_counter() - started
    title = f"{target.description}, compile-only, jax {jax.__version__}"
    text = "\n\n".join(
        [
            f"jaxloss on {title}{', quick' if args.quick else ''}, {meta['date']}",
            NOT_MEASURED,
            format_table(records),
            f"bandwidth {target.bandwidth / 1e12:.3g} TB/s (roofline = hbm / bandwidth)",
            report.format_goals(goals).split("\n\nA time goal")[0],
            f"wall time {meta['wall_s']:.1f} s",
        ]
    )
    print(text)
    payload = {"meta": meta, "results": records, "goals": goals}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.txt").write_text(text + "\n")
        if not args.no_plots:
            plots = report.write_plots(args.out, records, f"{title}: MODELLED, not measured")
            meta["plots"] = [p.name for p in plots]
        report.write_json(args.out / "results.json", payload)
        print(f"wrote {args.out / 'results.json'}, table.txt and the plots", file=sys.stderr)
    return payload
