"""What comes out: the tables, the goals, ``results.json`` and the PNG plots."""

from __future__ import annotations

import dataclasses
import json
import math
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.cases import GOAL_SHAPE, GOAL_SMALL_SHAPE, LINEAR_GOAL_SHAPE

IMPL_COLUMNS = ("jaxloss", "optax", "torch")
MODE_LABELS = {"fwd": "forward", "vag": "value_and_grad"}
# nll's forward gathers one element per row: its throughput counts rows, not logits elements
# (per element it would "run" at ~1e12 elements/s on a CPU).
PER_ROW_THROUGHPUT = frozenset({"nll"})


def throughput(record: dict, impl: str) -> float | None:
    """``impl``'s rate in the unit :func:`throughput_unit` names."""
    rate = record["impls"].get(impl, {}).get("elements_per_s")
    if rate is None or record["case"] not in PER_ROW_THROUGHPUT:
        return rate
    return rate * record["shape"][0] / record["elements"]


def throughput_unit(case: str) -> str:
    return "rows (one target each)" if case in PER_ROW_THROUGHPUT else "logits elements"


def _scaled(value: float | None, units: Sequence[tuple[str, float]]) -> str:
    if value is None:
        return "-"
    unit, scale = next(((u, s) for u, s in units if value >= s), units[-1])
    return f"{value / scale:.3g}{unit}"


def fmt_time(seconds: float | None) -> str:
    return _scaled(seconds, (("s", 1), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9)))


def fmt_bytes(n: float | None) -> str:
    return _scaled(n, (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1)))


def fmt_ratio(r: float | None, digits: int = 2) -> str:
    return "-" if r is None or not math.isfinite(r) else f"{r:.{digits}f}"


def size(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


# A column: header, width (negative: left-aligned) and the cell of a record.
Column = tuple[str, int, Callable[[dict], str]]


def impl(name: str, key: str, fmt: Callable[[Any], str] = str) -> Callable[[dict], str]:
    """The cell of ``impls[name][key]``, ``-`` where there is none."""
    return lambda r: "-" if (v := r["impls"].get(name, {}).get(key)) is None else fmt(v)


def pair(key: str, fmt: Callable[[Any], str], a: str = "jaxloss", b: str = "optax") -> Callable:
    return lambda r: f"{impl(a, key, fmt)(r)}/{impl(b, key, fmt)(r)}"


def _pct(r: float) -> str:
    return f"{100 * r:.0f}%"


def _ratio(name: str) -> Callable[[dict], str]:
    return lambda r: fmt_ratio(r.get("ratio_to_optax", {}).get(name))


def _gel(r: dict) -> str:
    return fmt_ratio(None if (t := throughput(r, "jaxloss")) is None else t / 1e9, 3)


FIRST: list[Column] = [("function", -27, lambda r: r["case"]), ("mode", -4, lambda r: r["mode"])]
WHERE: list[Column] = [("dtype", -5, lambda r: r["dtype"]),
                       ("shape", -13, lambda r: size(r["shape"]))]  # fmt: skip
TIMES: list[Column] = [*[(k, 7, impl(k, "median_s", fmt_time)) for k in IMPL_COLUMNS],
                       ("jl/ox", 5, _ratio("jaxloss")), ("to/ox", 5, _ratio("torch")),
                       ("%copy", 5, impl("jaxloss", "copy_fraction", _pct))]  # fmt: skip
TEMPS: list[Column] = [("temp jl", 8, impl("jaxloss", "temp_bytes", fmt_bytes)),
                       ("temp ox", 8, impl("optax", "temp_bytes", fmt_bytes))]  # fmt: skip
COMPACT = [*FIRST, *TIMES, *TEMPS]
WIDE = [*FIRST, *WHERE, *TIMES, ("ox%cpy", 6, impl("optax", "copy_fraction", _pct)),
        ("jl Gel/s", 8, _gel), *TEMPS, ("jl/lgt", 6, impl("jaxloss", "temp_ratio", fmt_ratio)),
        ("ox/lgt", 6, impl("optax", "temp_ratio", fmt_ratio)),
        ("ops", 7, pair("hlo_ops", lambda ops: str(sum(ops.values()))))]  # fmt: skip
LEGEND = (
    "Times: median per call over pytest-benchmark's rounds (fwd: forward, vag: "
    "jax.value_and_grad; compiled only: not run). jl/ox, to/ox: jaxloss's and torch's median "
    "over optax's (< 1: faster than optax). Another implementation (linear_cross_entropy's "
    "jaxloss_materialised, cross_entropy(h @ k)) gets a line of its own: its median, temporaries "
    "and jaxloss/this, jaxloss's median over its median (< 1: jaxloss faster). %copy: jaxloss's "
    "speed as a fraction of a copy of the same bytes (byte model in table.txt; logits >= 8 MiB). "
    "temp: compiled temporary memory (memory_analysis). Wide table: Gel/s = 1e9 logits elements "
    "per second (nll: rows), /lgt = temp / logits bytes, ops = kernels of the compiled entry "
    "computation (jaxloss/optax)."
)


# fmt: off
def table(records: Sequence[dict], columns: Sequence[Column], group: bool = True) -> list[str]:
    """A header and one line per record (a heading per dtype and size with ``group``), each
    followed by its notes: disagreeing peers, errors, other implementations."""
    align = lambda c: f"{'<' if c[1] < 0 else '>'}{abs(c[1])}"
    cells = lambda cell: " ".join(f"{cell(c):{align(c)}}" for c in columns)
    lines, previous = [cells(lambda c: c[0])], None
    lines.append("-" * len(lines[0]))
    for r in records:
        heading = (r["dtype"], size(r["shape"]), "x".join(r["shape_names"]), r["memory_only"])
        if group and heading != previous:
            kind = ", compiled only" if r["memory_only"] else ""
            lines += [""] * (previous is not None) + ["{} {} ({}".format(*heading[:3]) + f"{kind})"]
        previous = heading
        lines.append(cells(lambda c, r=r: c[2](r)))
        if not r.get("agrees", True):
            errors = ", ".join(f"{k}={v:.1e}" for k, v in r["agreement"].items())
            lines.append(f"{'':29}!MISMATCH {errors}")
        for k, e in r["impls"].items():
            if "error" in e:
                lines.append(f"{'':29}error {k}: {e['error'][:60]}")
            elif k not in IMPL_COLUMNS and group and "median_s" in e:
                ratio = r.get("jaxloss_ratio_to", {}).get(k)
                lines.append(f"{'':29}{k}: {fmt_time(e['median_s'])}, temp "
                             f"{fmt_bytes(e.get('temp_bytes'))}"
                             + ("" if ratio is None else f", jaxloss/this {ratio:.2f}"))
    return lines
# fmt: on


def format_table(records: Sequence[dict], wide: bool = False) -> str:
    """The CPU table: within 100 columns, or ``wide`` with every column (``table.txt``)."""
    return "\n".join([*table(records, WIDE if wide else COMPACT), "", *textwrap.wrap(LEGEND, 100)])


# Goals


def find(records: Sequence[dict], case: str, mode: str, dtype: str, shape, memory_only=None):
    key = (case, mode, dtype, tuple(shape))
    return next((r for r in records if (r["case"], r["mode"], r["dtype"], tuple(r["shape"])) == key
                 and memory_only in (None, r["memory_only"])), None)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class SpeedGoal:
    """``time(numerator) / time(denominator) <= threshold``, each side ``(impl, dtype)``,
    judged by its own paired measurement (:func:`benchmarks.cli.compare_until_clear`)."""

    id: str
    description: str
    mode: str
    shape: tuple[int, ...]
    numerator: tuple[str, str]
    denominator: tuple[str, str]
    threshold: float
    case: str = "cross_entropy"


def speed_goals() -> list[SpeedGoal]:
    big, small, at = tuple(GOAL_SHAPE), tuple(GOAL_SMALL_SHAPE), f"at {size(GOAL_SHAPE)}"
    jl32, jl16, ox32, vag = ("jaxloss", "f32"), ("jaxloss", "bf16"), ("optax", "f32"), "vag"
    ce = "cross_entropy value_and_grad"
    return [
        SpeedGoal("ce_vag_f32_vs_optax", f"f32 {ce} {at}: jaxloss <= 1.05x optax", vag, big,
                  jl32, ox32, 1.05),
        SpeedGoal("ce_vag_bf16_vs_optax", f"bf16 {ce} {at}: jaxloss <= 0.5x optax bf16", vag,
                  big, jl16, ("optax", "bf16"), 0.5),
        SpeedGoal("ce_vag_bf16_vs_f32", f"bf16 {ce} {at}: jaxloss bf16 <= jaxloss f32", vag, big,
                  jl16, jl32, 1.0),
        SpeedGoal("linear_vag_vs_materialised", "f32 linear_cross_entropy value_and_grad at "
                  f"{size(LINEAR_GOAL_SHAPE)}: <= 1.0x materialised", vag, tuple(LINEAR_GOAL_SHAPE),
                  jl32, ("jaxloss_materialised", "f32"), 1.0, "linear_cross_entropy"),
        *[SpeedGoal(f"ce_{m}_small_vs_optax", f"f32 cross_entropy {MODE_LABELS[m]} at "
                    f"{size(small)}: jaxloss <= 1.1x optax", m, small, jl32, ox32, 1.1)
          for m in ("fwd", "vag")],
    ]  # fmt: skip


def timed(records: Sequence[dict], goal: SpeedGoal) -> bool:
    """Whether the grid timed both sides of ``goal`` (then it gets its own paired check)."""
    found = [(find(records, goal.case, goal.mode, d, goal.shape, False), i)
             for i, d in (goal.numerator, goal.denominator)]  # fmt: skip
    return all(r is not None and r["impls"].get(i, {}).get("median_s") for r, i in found)


def goal(goal_id: str, description: str, kind: str, lhs, rhs, threshold: float, lhs_label: str,
         rhs_label: str, note: str = "", slack: float = 0.0) -> dict:  # fmt: skip
    """``lhs <= threshold * rhs + slack``: a compiler figure (bytes, modelled time), exact."""
    result = {"id": goal_id, "description": description, "kind": kind, "lhs_label": lhs_label,
              "lhs": lhs, "rhs_label": rhs_label, "rhs": rhs, "threshold": threshold,
              "interval": None, "rounds": 0, "note": note}  # fmt: skip
    if lhs is None or not rhs:
        return {**result, "status": "N/A", "ratio": None, "note": note or "not compiled"}
    status = "PASS" if lhs <= threshold * rhs + slack else "FAIL"
    return {**result, "status": status, "ratio": lhs / rhs}


def evaluate_goals(records: Sequence[dict], backend: str, checks: dict[str, dict] | None = None,
                   quick_times: set[str] | None = None) -> list[dict]:  # fmt: skip
    """PASS, FAIL, INCONCLUSIVE (timing too noisy to tell) or N/A. ``checks``: the paired check
    of each speed goal by id; ``quick_times``: the speed goals ``--quick`` times (default all)."""
    found = []
    for g in speed_goals():
        check = (checks or {}).get(g.id)
        result = {"id": g.id, "description": g.description, "kind": "time",
                  "threshold": g.threshold, "lhs_label": " ".join(g.numerator) + " s",
                  "rhs_label": " ".join(g.denominator) + " s", "interval": None, "rounds": 0,
                  "status": "N/A", "lhs": None, "rhs": None, "ratio": None,
                  "note": "" if backend == "cpu" else f"goal is defined for CPU; measured on "
                  f"{backend}"}  # fmt: skip
        if check is not None:
            result.update(status=check["verdict"], lhs=check["numerator_s"], ratio=check["ratio"],
                          rhs=check["denominator_s"], interval=check["interval"],
                          rounds=check["rounds"], check=check)  # fmt: skip
        elif quick_times is None or g.id in quick_times:
            result["note"] = "not timed in this run (the full grid and --quick time it)"
        else:
            result["note"] = (f"not timed in this run: --quick leaves out {size(g.shape)}; the "
                              f"full grid times it (this goal's function alone: python -m "
                              f"benchmarks --filter '^{g.case}$')")  # fmt: skip
        found.append(result)
    for dtype in ("f32", "bf16"):
        r = find(records, "cross_entropy", "vag", dtype, GOAL_SHAPE) or {"impls": {}}
        mine, theirs = (r["impls"].get(k, {}).get("temp_bytes") for k in ("jaxloss", "optax"))
        why = "no memory analysis from XLA" if r.get("logits_bytes") else "not compiled in this run"
        found.append(goal(f"ce_vag_temp_{dtype}", f"{dtype} cross_entropy value_and_grad "
                          f"temporaries at {size(GOAL_SHAPE)} <= 1x logits bytes", "bytes", mine,
                          r.get("logits_bytes"), 1.0, "jaxloss temp bytes", "logits bytes",
                          why if mine is None else f"optax: {fmt_bytes(theirs)}"))  # fmt: skip
    return found


VERDICT_LEGEND = (
    "A time goal is judged on its own paired measurement, taken after the grid: both sides\n"
    "timed back to back in each round (long samples, alternating order) until the 95% interval\n"
    "of the median ratio lies wholly below the goal (PASS) or above it (FAIL); if it still\n"
    "straddles the goal after the rounds allowed, INCONCLUSIVE (too noisy here to tell; rerun on\n"
    "a quieter machine). Memory goals are exact compiler figures. --fail-on-goal: exit status 1\n"
    "if any goal FAILs."
)


def format_goals(goals: Sequence[dict], legend: bool = True) -> str:
    """Two or three lines per goal: verdict and goal, measured value, note; within 100 columns."""
    lines, wrap = ["goals:"], lambda text, i: textwrap.wrap(text, 100, initial_indent=" " * 16,
                                                            subsequent_indent=" " * i)  # fmt: skip
    for g in goals:
        lines.append(f"  {g['status']:<12}  {g['description']}")
        if g["ratio"] is None:
            lines += wrap(g["note"], 16)
            continue
        if g["kind"] == "time":
            lo, hi = g["interval"] or (math.nan, math.nan)
            lines.append(f"{'':16}measured {g['ratio']:.2f}x (95% interval {lo:.2f}-{hi:.2f}, "
                         f"{g['rounds']} rounds; {fmt_time(g['lhs'])} vs "
                         f"{fmt_time(g['rhs'])})")  # fmt: skip
        else:  # bytes, or a compile-only target's modelled time (a roofline, not a timing)
            modelled = g["kind"] == "modelled"
            what, fmt = ("modelled", fmt_time) if modelled else ("measured", fmt_bytes)
            lines.append(f"{'':16}{what} {fmt(g['lhs'])} = {g['ratio']:.3f}x of {fmt(g['rhs'])} "
                         f"(goal <= {g['threshold']:g}x)")  # fmt: skip
        lines += wrap(f"note: {g['note']}", 22) if g["note"] else []
    return "\n".join([*lines, *(["", VERDICT_LEGEND] if legend else [])])


# Files


def write(args: Any, table: str, meta: dict, records: list[dict], goals: list[dict],
          plot_title: str) -> dict[str, Any]:  # fmt: skip
    """``table.txt``, the PNGs (unless ``--no-plots``) and ``results.json`` in ``--out``."""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.txt").write_text(table)
    if not args.no_plots:
        meta["plots"] = [p.name for p in write_plots(args.out, records, plot_title)]
    payload = {"meta": meta, "results": records, "goals": goals}
    write_json(args.out / "results.json", payload)
    return payload


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """JSON has no inf or NaN: they are written as null."""

    def finite(o: Any) -> Any:
        if isinstance(o, dict):
            return {k: finite(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [finite(v) for v in o]
        o = o.item() if hasattr(o, "item") else o
        return None if isinstance(o, float) and not math.isfinite(o) else o

    path.write_text(json.dumps(finite(payload), indent=1) + "\n")


COLORS = {"jaxloss": "tab:blue", "optax": "tab:orange", "torch": "tab:green"}


# fmt: off
def write_plots(out: Path, records: Sequence[dict], title: str) -> list[Path]:
    """Per function, throughput by size (a panel per dtype); per function at the size with most
    series, compiled temporaries / logits bytes and time / optax's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig: Any, name: str, heading: str) -> Path:
        fig.suptitle(f"{heading}\n{title}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        return out / name

    timed = [r for r in records if not r["memory_only"]]
    cases = {c: [r for r in timed if r["case"] == c] for c in {r["case"]: 0 for r in timed}}
    paths = []
    for case, rows in cases.items():
        dtypes = sorted({r["dtype"] for r in rows}, key=["f32", "bf16"].index)
        fig, axes = plt.subplots(1, len(dtypes), figsize=(7 * len(dtypes), 4.6), squeeze=False)
        for ax, dtype in zip(axes[0], dtypes, strict=True):
            for mode, style in (("fwd", "o-"), ("vag", "s--")):
                mine = sorted((r for r in rows if (r["mode"], r["dtype"]) == (mode, dtype)),
                              key=lambda r: r["elements"])
                for name in dict.fromkeys(k for r in mine for k in r["impls"]):
                    if points := [(r["elements"], v) for r in mine if (v := throughput(r, name))]:
                        ax.plot(*zip(*points, strict=True), style, color=COLORS.get(name, "gray"),
                                label=f"{name} {MODE_LABELS[mode]}")
            sizes = sorted({(r["elements"], size(r["shape"])) for r in rows})
            ax.set(xscale="log", yscale="log", title=dtype, ylabel=f"{throughput_unit(case)}/s",
                   xlabel=" x ".join(rows[0]["shape_names"]))
            ax.set_xticks([e for e, _ in sizes], [s for _, s in sizes], fontsize=7, minor=False)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        paths.append(save(fig, f"throughput_{case}.png", f"{case}: throughput by size"))
    largest = []  # per function, its records at the size with the most (mode, dtype) series
    for rows in cases.values():
        best = max(rows, key=lambda r: (sum(s["shape"] == r["shape"] for s in rows), r["elements"]))
        largest += [r for r in rows if r["shape"] == best["shape"]]
    labels = [f"{r['case']} {size(r['shape'])} {r['mode']} {r['dtype']}" for r in largest]
    for kind, names, what in (
        ("temp_memory", ("jaxloss", "optax"), "compiled temporaries / logits bytes"),
        ("ratio_to_optax", ("jaxloss", "torch"), "time / optax time (< 1: faster than optax)"),
    ):
        fig, axes = plt.subplots(1, 2, figsize=(13, 1.6 + 0.25 * len(largest)), sharey=True)
        for ax, name in zip(axes, names, strict=True):
            values = [r["impls"].get(name, {}).get("temp_ratio") if kind == "temp_memory"
                      else r.get("ratio_to_optax", {}).get(name) for r in largest]
            base = 0.0 if kind == "temp_memory" else 1.0  # time ratios are drawn from 1
            ax.barh(range(len(values)), [math.nan if v is None else v - base for v in values],
                    left=base, color=COLORS[name])
            ax.axvline(1.0, color="k", lw=0.8, ls=":")
            ax.set(title=f"{name}: {what}", xscale="linear" if kind == "temp_memory" else "log")
            ax.set_yticks(range(len(labels)), labels, fontsize=6)
        axes[0].invert_yaxis()
        paths.append(save(fig, f"{kind}.png", f"{what}, each function at one size"))
    return paths
# fmt: on
