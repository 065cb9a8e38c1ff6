"""What comes out: the terminal table, the goals, ``results.json`` and the PNG plots."""

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


def _scaled(value: float | None, units: Sequence[tuple[str, float]], digits: str) -> str:
    if value is None:
        return "-"
    unit, scale = next(((u, s) for u, s in units if value >= s), units[-1])
    return f"{value / scale:{digits}}{unit}"


def fmt_time(seconds: float | None) -> str:
    return _scaled(seconds, (("s", 1), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9)), ".3g")


def fmt_bytes(n: float | None) -> str:
    return _scaled(n, (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1)), ".3g")


def fmt_ratio(r: float | None, digits: int = 2) -> str:
    return "-" if r is None or not math.isfinite(r) else f"{r:.{digits}f}"


def _size(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


# A column: header, width, and the cell of a record.
Column = tuple[str, int, Callable[[dict], str]]


def _impl(name: str, key: str, fmt: Callable[[Any], str]) -> Callable[[dict], str]:
    return lambda r: fmt(r["impls"].get(name, {}).get(key))


def _ratio(name: str) -> Callable[[dict], str]:
    return lambda r: fmt_ratio(r.get("ratio_to_optax", {}).get(name))


def _pct(r: float | None) -> str:
    return "-" if r is None else f"{100 * r:.0f}%"


def _ops(name: str) -> Callable[[dict], str]:
    return lambda r: (
        str(sum(ops.values())) if (ops := r["impls"].get(name, {}).get("hlo_ops")) else "-"
    )


COMPACT: list[Column] = [
    ("function", -27, lambda r: r["case"]),
    ("mode", -4, lambda r: r["mode"]),
    *[(k, 7, _impl(k, "median_s", fmt_time)) for k in IMPL_COLUMNS],
    ("jl/ox", 5, _ratio("jaxloss")),
    ("to/ox", 5, _ratio("torch")),
    ("%copy", 5, _impl("jaxloss", "copy_fraction", _pct)),
    ("temp jl", 8, _impl("jaxloss", "temp_bytes", fmt_bytes)),
    ("temp ox", 8, _impl("optax", "temp_bytes", fmt_bytes)),
]
WIDE: list[Column] = [
    *COMPACT[:2],
    ("dtype", -5, lambda r: r["dtype"]),
    ("shape", -13, lambda r: _size(r["shape"])),
    *COMPACT[2:7],
    (
        "jl Gel/s",
        8,
        lambda r: fmt_ratio(None if (t := throughput(r, "jaxloss")) is None else t / 1e9, 3),
    ),
    COMPACT[7],
    ("ox%cpy", 6, _impl("optax", "copy_fraction", _pct)),
    *COMPACT[8:],
    ("jl/lgt", 6, _impl("jaxloss", "temp_ratio", lambda v: fmt_ratio(v, 3))),
    ("ox/lgt", 6, _impl("optax", "temp_ratio", lambda v: fmt_ratio(v, 3))),
    ("ops", 7, lambda r: f"{_ops('jaxloss')(r)}/{_ops('optax')(r)}"),
]
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


def _cells(columns: Sequence[Column], cell: Callable[[Column], str]) -> str:
    return " ".join(f"{cell(c):{'<' if c[1] < 0 else '>'}{abs(c[1])}}" for c in columns)


def _notes(r: dict) -> list[str]:
    """Peer disagreement, errors and extra implementations of one record, one line each."""
    notes = []
    if not r.get("agrees", True):
        notes.append("!MISMATCH " + ", ".join(f"{k}={v:.1e}" for k, v in r["agreement"].items()))
    notes += [f"error {k}: {e['error'][:60]}" for k, e in r["impls"].items() if "error" in e]
    for k, e in r["impls"].items():
        if k not in IMPL_COLUMNS and "error" not in e:
            ratio = r.get("jaxloss_ratio_to", {}).get(k)
            notes.append(
                f"{k}: {fmt_time(e.get('median_s'))}, temp {fmt_bytes(e.get('temp_bytes'))}"
                + ("" if ratio is None else f", jaxloss/this {ratio:.2f}")
            )
    return notes


def format_table(records: Sequence[dict], wide: bool = False) -> str:
    """One block per (dtype, size), one line per benchmark, notes on their own lines; the
    compact table fits 100 columns, ``wide`` (table.txt) has every column."""
    columns = WIDE if wide else COMPACT
    header = _cells(columns, lambda c: c[0])
    lines, previous = [header, "-" * len(header)], None
    for r in records:
        group = (r["dtype"], tuple(r["shape"]), r["memory_only"])
        if group != previous:
            kind = ", compiled only" if r["memory_only"] else ""
            lines += ([""] if previous else []) + [
                f"{r['dtype']} {_size(r['shape'])} ({'x'.join(r['shape_names'])}{kind})"
            ]
        previous = group
        lines.append(_cells(columns, lambda c, r=r: c[2](r)))
        lines += [f"{'':29}{note}" for note in _notes(r)]
    return "\n".join([*lines, "", *textwrap.wrap(LEGEND, 100)])


# ----------------------------------------------------------------------------------------------
# Goals
# ----------------------------------------------------------------------------------------------


def find(records: Sequence[dict], case: str, mode: str, dtype: str, shape, memory_only=None):
    return next(
        (
            r
            for r in records
            if (r["case"], r["mode"], r["dtype"], tuple(r["shape"]))
            == (case, mode, dtype, tuple(shape))
            and memory_only in (None, r["memory_only"])
        ),
        None,
    )


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
    big, small, at = tuple(GOAL_SHAPE), tuple(GOAL_SMALL_SHAPE), f"at {_size(GOAL_SHAPE)}"
    jl32, jl16 = ("jaxloss", "f32"), ("jaxloss", "bf16")
    return [
        SpeedGoal(
            "ce_vag_f32_vs_optax",
            f"f32 cross_entropy value_and_grad {at}: jaxloss <= 1.05x optax",
            "vag",
            big,
            jl32,
            ("optax", "f32"),
            1.05,
        ),
        SpeedGoal(
            "ce_vag_bf16_vs_optax",
            f"bf16 cross_entropy value_and_grad {at}: jaxloss <= 0.5x optax bf16",
            "vag",
            big,
            jl16,
            ("optax", "bf16"),
            0.5,
        ),
        SpeedGoal(
            "ce_vag_bf16_vs_f32",
            f"bf16 cross_entropy value_and_grad {at}: jaxloss bf16 <= jaxloss f32",
            "vag",
            big,
            jl16,
            jl32,
            1.0,
        ),
        SpeedGoal(
            "linear_vag_vs_materialised",
            "f32 linear_cross_entropy value_and_grad at "
            f"{_size(LINEAR_GOAL_SHAPE)}: <= 1.0x materialised",
            "vag",
            tuple(LINEAR_GOAL_SHAPE),
            jl32,
            ("jaxloss_materialised", "f32"),
            1.0,
            "linear_cross_entropy",
        ),
        *[
            SpeedGoal(
                f"ce_{m}_small_vs_optax",
                f"f32 cross_entropy {MODE_LABELS[m]} at {_size(small)}: jaxloss <= 1.1x optax",
                m,
                small,
                jl32,
                ("optax", "f32"),
                1.1,
            )
            for m in ("fwd", "vag")
        ],
    ]


def timed(records: Sequence[dict], goal: SpeedGoal) -> bool:
    """Whether the grid timed both sides of ``goal`` (then it gets its own paired check)."""
    return all(
        (r := find(records, goal.case, goal.mode, dtype, goal.shape, False)) is not None
        and r["impls"].get(impl, {}).get("median_s")
        for impl, dtype in (goal.numerator, goal.denominator)
    )


def goal(
    goal_id: str,
    description: str,
    kind: str,
    lhs,
    rhs,
    threshold: float,
    lhs_label: str,
    rhs_label: str,
    note: str = "",
    slack: float = 0.0,
) -> dict:
    """``lhs <= threshold * rhs + slack``: a compiler figure (bytes, modelled time), exact."""
    result = {
        "id": goal_id,
        "description": description,
        "kind": kind,
        "lhs_label": lhs_label,
        "lhs": lhs,
        "rhs_label": rhs_label,
        "rhs": rhs,
        "threshold": threshold,
        "interval": None,
        "rounds": 0,
        "note": note,
    }
    if lhs is None or not rhs:
        return {**result, "status": "N/A", "ratio": None, "note": note or "not compiled"}
    return {
        **result,
        "status": "PASS" if lhs <= threshold * rhs + slack else "FAIL",
        "ratio": lhs / rhs,
    }


def _speed_result(g: SpeedGoal, check: dict | None, backend: str, in_quick: bool) -> dict:
    result = {
        "id": g.id,
        "description": g.description,
        "kind": "time",
        "threshold": g.threshold,
        "lhs_label": f"{g.numerator[0]} {g.numerator[1]} s",
        "rhs_label": f"{g.denominator[0]} {g.denominator[1]} s",
        "note": "" if backend == "cpu" else f"goal is defined for CPU; measured on {backend}",
    }
    if check is None:
        note = (
            "not timed in this run (the full grid and --quick time it)"
            if in_quick
            else (
                f"not timed in this run: --quick leaves out {_size(g.shape)}; the full grid times "
                f"it (this goal's function alone: python -m benchmarks --filter '^{g.case}$')"
            )
        )
        return {
            **result,
            "status": "N/A",
            "lhs": None,
            "rhs": None,
            "ratio": None,
            "interval": None,
            "rounds": 0,
            "note": note,
        }
    return {
        **result,
        "status": check["verdict"],
        "lhs": check["numerator_s"],
        "rhs": check["denominator_s"],
        "ratio": check["ratio"],
        "interval": check["interval"],
        "rounds": check["rounds"],
        "check": check,
    }


def evaluate_goals(
    records: Sequence[dict],
    backend: str,
    checks: dict[str, dict] | None = None,
    quick_times: set[str] | None = None,
) -> list[dict]:
    """PASS, FAIL, INCONCLUSIVE (timing too noisy to tell) or N/A. ``checks``: the paired check
    of each speed goal by id; ``quick_times``: the speed goals ``--quick`` times (default all)."""
    checks = checks or {}
    found = [
        _speed_result(g, checks.get(g.id), backend, quick_times is None or g.id in quick_times)
        for g in speed_goals()
    ]
    for dtype in ("f32", "bf16"):
        r = find(records, "cross_entropy", "vag", dtype, GOAL_SHAPE) or {"impls": {}}
        mine, theirs = (r["impls"].get(k, {}).get("temp_bytes") for k in ("jaxloss", "optax"))
        note = (
            f"optax: {fmt_bytes(theirs)}"
            if mine is not None
            else (
                "no memory analysis from XLA"
                if r.get("logits_bytes")
                else "not compiled in this run"
            )
        )
        found.append(
            goal(
                f"ce_vag_temp_{dtype}",
                f"{dtype} cross_entropy value_and_grad "
                f"temporaries at {_size(GOAL_SHAPE)} <= 1x logits bytes",
                "bytes",
                mine,
                r.get("logits_bytes"),
                1.0,
                "jaxloss temp bytes",
                "logits bytes",
                note,
            )
        )
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
    lines = ["goals:"]
    for g in goals:
        lines.append(f"  {g['status']:<12}  {g['description']}")
        if g["ratio"] is None:
            lines += textwrap.wrap(
                g["note"], 100, initial_indent=" " * 16, subsequent_indent=" " * 16
            )
            continue
        if g["kind"] == "time":
            lo, hi = g["interval"] or (math.nan, math.nan)
            detail = (
                f"measured {g['ratio']:.2f}x (95% interval {lo:.2f}-{hi:.2f}, {g['rounds']} "
                f"rounds; {fmt_time(g['lhs'])} vs {fmt_time(g['rhs'])})"
            )
        else:  # bytes, or a compile-only target's modelled time (a roofline, not a timing)
            what, fmt = (
                ("modelled", fmt_time) if g["kind"] == "modelled" else ("measured", fmt_bytes)
            )
            detail = (
                f"{what} {fmt(g['lhs'])} = {g['ratio']:.3f}x of {fmt(g['rhs'])} "
                f"(goal <= {g['threshold']:g}x)"
            )
        lines.append(f"{'':16}{detail}")
        if g["note"]:
            lines += textwrap.wrap(
                f"note: {g['note']}", 100, initial_indent=" " * 16, subsequent_indent=" " * 22
            )
    return "\n".join([*lines, *(["", VERDICT_LEGEND] if legend else [])])


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


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


def write_plots(out: Path, records: Sequence[dict], title: str) -> list[Path]:
    """Throughput by size per function; temporaries and time ratios, per function at one size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in records if not r["memory_only"]]
    paths = [
        _throughput(plt, out, [r for r in timed if r["case"] == c], title)
        for c in dict.fromkeys(r["case"] for r in timed)
    ]
    rows = []  # per function, its records at the size with the most (mode, dtype) series
    for case in dict.fromkeys(r["case"] for r in timed):
        mine = [r for r in timed if r["case"] == case]
        size = max(mine, key=lambda r: (sum(s["shape"] == r["shape"] for s in mine), r["elements"]))
        rows.append(
            (f"{case}\n{_size(size['shape'])}", [r for r in mine if r["shape"] == size["shape"]])
        )
    for kind in ("temp_ratio", "time_ratio"):
        paths.append(_bars(plt, out, rows, kind, title))
    return paths


def _throughput(plt: Any, out: Path, rows: Sequence[dict], title: str) -> Path:
    case, dtypes = rows[0]["case"], sorted({r["dtype"] for r in rows}, key=["f32", "bf16"].index)
    fig, axes = plt.subplots(
        1, len(dtypes), figsize=(7 * len(dtypes), 4.6), squeeze=False, sharey=True
    )
    for ax, dtype in zip(axes[0], dtypes, strict=True):
        for mode, style in (("fwd", "o-"), ("vag", "s--")):
            mine = sorted(
                (r for r in rows if (r["mode"], r["dtype"]) == (mode, dtype)),
                key=lambda r: r["elements"],
            )
            for impl in dict.fromkeys(k for r in mine for k in r["impls"]):
                pts = [(r["elements"], v) for r in mine if (v := throughput(r, impl))]
                if pts:
                    ax.plot(
                        *zip(*pts, strict=True),
                        style,
                        color=COLORS.get(impl, "tab:gray"),
                        label=f"{impl} {MODE_LABELS[mode]}",
                    )
        sizes = sorted({(r["elements"], _size(r["shape"])) for r in rows})
        ax.set(
            xscale="log",
            yscale="log",
            title=dtype,
            xlabel="size (" + " x ".join(rows[0]["shape_names"]) + ")",
        )
        ax.set_xticks([e for e, _ in sizes], [s for _, s in sizes], fontsize=7)
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(f"{throughput_unit(case)} per second (higher is better)")
    fig.suptitle(f"{case}: throughput by size\n{title}", fontsize=9)
    fig.tight_layout()
    path = out / f"throughput_{case}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bars(
    plt: Any, out: Path, rows: Sequence[tuple[str, list[dict]]], kind: str, title: str
) -> Path:
    """Horizontal bars, one per (mode, dtype) of each function: temporaries / logits bytes, or
    time / optax's (log axis from 1)."""
    impls = ("jaxloss", "optax") if kind == "temp_ratio" else ("jaxloss", "torch")
    fig, axes = plt.subplots(
        1, 2, figsize=(13, 1.6 + 0.5 * sum(len(r) for _, r in rows)), sharey=True
    )
    for ax, impl in zip(axes, impls, strict=True):
        labels, values = [], []
        for name, records in rows:
            for r in records:
                v = (
                    r["impls"].get(impl, {}).get("temp_ratio")
                    if kind == "temp_ratio"
                    else r.get("ratio_to_optax", {}).get(impl)
                )
                labels.append(f"{name} {MODE_LABELS[r['mode']]} {r['dtype']}")
                values.append(v if v is not None and (kind == "temp_ratio" or v > 0) else math.nan)
        base = 0.0 if kind == "temp_ratio" else 1.0
        ax.barh(range(len(values)), [v - base for v in values], left=base, color=COLORS[impl])
        for y, v in enumerate(values):
            if math.isfinite(v):
                ax.text(v, y, f" {v:.2f} ", va="center", fontsize=6)
        ax.axvline(1.0, color="k", lw=0.8, ls=":")
        if kind == "time_ratio":
            ax.set_xscale("log")
        ax.set_title(
            f"{impl}: "
            + (
                "temporaries / logits bytes (lower is better)"
                if kind == "temp_ratio"
                else "time / optax time (< 1x: faster)"
            ),
            fontsize=9,
        )
        ax.set_yticks(range(len(labels)), labels, fontsize=6)
    axes[0].invert_yaxis()
    what = "compiled temporary memory" if kind == "temp_ratio" else "time relative to optax"
    fig.suptitle(f"{what}, each function at the size named\n{title}", fontsize=9)
    fig.tight_layout()
    path = out / ("temp_memory.png" if kind == "temp_ratio" else "ratio_to_optax.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
