"""What comes out: the terminal table, the goals, ``results.json`` and the PNG plots."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.cases import GOAL_SHAPE, GOAL_SMALL_SHAPE

IMPL_COLUMNS = ("jaxloss", "optax", "torch")
IMPL_COLORS = {"jaxloss": "tab:blue", "optax": "tab:orange", "torch": "tab:green"}
MODE_LABELS = {"fwd": "forward", "vag": "value_and_grad"}
# Throughput counts logits elements per second, except for these functions, whose forward pass
# gathers one element per row (N of the N x C log-probabilities): counted per logits element,
# nll would "run" at ~1e12 elements/s on a CPU. Their throughput is rows per second.
PER_ROW_THROUGHPUT = frozenset({"nll"})
# A paired ratio (median of per-round ratios) this far from the ratio of the medians shown beside
# it means the load changed between rounds: the row says so (the paired figure is the one to use).
RATIO_DISAGREEMENT = 0.15


def throughput(record: dict, impl: str) -> float | None:
    """``impl``'s rate in the unit :func:`throughput_unit` names: logits elements or rows /s."""
    rate = _impl(record, impl).get("elements_per_s")
    if rate is None or record["case"] not in PER_ROW_THROUGHPUT:
        return rate
    return rate * record["shape"][0] / record["elements"]


def throughput_unit(case: str) -> str:
    if case in PER_ROW_THROUGHPUT:
        return "rows (one target each)"
    return "logits elements"


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g}{unit}"
    return f"{seconds * 1e9:.3g}ns"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}B"


def fmt_ratio(r: float | None, digits: int = 2) -> str:
    return "-" if r is None or not math.isfinite(r) else f"{r:.{digits}f}"


def fmt_frac(r: float | None) -> str:
    return "-" if r is None else f"{100 * r:.0f}%"


def _impl(record: dict, name: str) -> dict:
    return record["impls"].get(name, {})


def _ops(entry: dict) -> str:
    ops = entry.get("hlo_ops")
    return "-" if ops is None else str(sum(ops.values()))


def _shape(record: dict) -> str:
    return "x".join(map(str, record["shape"]))


def format_table(records: Sequence[dict], wide: bool = False) -> str:
    """The results table: within 100 columns, or ``wide`` with every column (``table.txt``)."""
    return _wide_table(records) if wide else _compact_table(records)


_COMPACT_HEADER = (
    f"{'function':<27} {'mode':<4} {'jaxloss':>7} {'optax':>7} {'torch':>7} {'jl/ox':>5} "
    f"{'to/ox':>5} {'%copy':>5} {'temp jl':>8} {'temp ox':>8}"
)


def _compact_table(records: Sequence[dict]) -> str:
    """One block per (dtype, size), one line per benchmark; notes on their own lines."""
    lines = [_COMPACT_HEADER, "-" * len(_COMPACT_HEADER)]
    previous_group = None
    for r in records:
        group = (r["dtype"], tuple(r["shape"]), r["memory_only"])
        if group != previous_group:
            names = "x".join(r.get("shape_names", ["N", "C"]))
            kind = ", compiled only" if r["memory_only"] else ""
            lines += ([""] if previous_group else []) + [
                f"{r['dtype']} {_shape(r)} ({names}{kind})"
            ]
        previous_group = group
        jl, ox, to = _impl(r, "jaxloss"), _impl(r, "optax"), _impl(r, "torch")
        ratios = r.get("ratio_to_optax", {})
        lines.append(
            f"{r['case']:<27} {r['mode']:<4} "
            f"{fmt_time(jl.get('median_s')):>7} {fmt_time(ox.get('median_s')):>7} "
            f"{fmt_time(to.get('median_s')):>7} {fmt_ratio(ratios.get('jaxloss')):>5} "
            f"{fmt_ratio(ratios.get('torch')):>5} {fmt_frac(jl.get('copy_fraction')):>5} "
            f"{fmt_bytes(jl.get('temp_bytes')):>8} {fmt_bytes(ox.get('temp_bytes')):>8}"
        )
        lines += [f"{'':29}{note}" for note in _row_notes(r)]
    legend = (
        "Times: median per call (fwd: forward, vag: jax.value_and_grad; compiled only: not run).\n"
        "jl/ox, to/ox: jaxloss and torch time over optax time (< 1: faster than optax), the\n"
        "median of per-round ratios: each round times every implementation back to back, so\n"
        "load from other processes cancels out. When the load changed between rounds this can\n"
        "differ from the ratio of the two medians shown; a 'load varied' line then gives both.\n"
        "An implementation outside the three columns (e.g. linear_cross_entropy's\n"
        "jaxloss_materialised, cross_entropy(h @ k)) gets a line of its own: its median time,\n"
        "temporaries and jaxloss/this, jaxloss's time over its time (per-round median; < 1:\n"
        "jaxloss faster). %copy: jaxloss's speed as a fraction of a copy of the same bytes\n"
        "(byte model below; logits >= 8 MiB). temp: compiled temporary memory.\n"
        "Every column (throughput, kernels, both copy fractions): table.txt and results.json."
    )
    return "\n".join([*lines, "", legend])


def _row_notes(r: dict) -> list[str]:
    """Peer disagreement, errors and extra implementations of one record, one line each."""
    notes = []
    if not r.get("agrees", True):
        notes.append("!MISMATCH " + ", ".join(f"{k}={v:.1e}" for k, v in r["agreement"].items()))
    notes += [f"error {k}: {e['error'][:50]}" for k, e in r["impls"].items() if "error" in e]
    for k, e in r["impls"].items():
        if k not in IMPL_COLUMNS and "error" not in e:
            ratio = r.get("jaxloss_ratio_to", {}).get(k)
            notes.append(
                f"{k}: {fmt_time(e.get('median_s'))}, temp {fmt_bytes(e.get('temp_bytes'))}"
                + ("" if ratio is None else f", jaxloss/this {ratio:.2f}")
            )
    notes += _load_varied(r)
    return notes


def _load_varied(r: dict) -> list[str]:
    """A line per ratio column whose paired figure the medians shown beside it contradict."""
    notes = []
    for impl, column in (("jaxloss", "jl/ox"), ("torch", "to/ox")):
        paired = r.get("ratio_to_optax", {}).get(impl)
        medians = r.get("ratio_of_medians", {}).get(impl)
        if paired and medians and abs(medians / paired - 1) > RATIO_DISAGREEMENT:
            notes.append(
                f"load varied: the medians give {column} {medians:.2f}, paired rounds "
                f"{paired:.2f} (shown)"
            )
    return notes


def _wide_table(records: Sequence[dict]) -> str:
    """One line per benchmark: times, ratios to optax, throughput, copy fraction, temp memory."""
    header = (
        f"{'function':<28} {'mode':<4} {'dtype':<5} {'shape':<13} "
        f"{'jaxloss':>8} {'optax':>8} {'torch':>8} {'jl/ox':>6} {'to/ox':>6} "
        f"{'jl Gel/s':>8} {'jl%cpy':>6} {'ox%cpy':>6} "
        f"{'temp jl':>8} {'temp ox':>8} {'jl/lgt':>6} {'ox/lgt':>6} {'ops':>7}"
    )
    lines = [header, "-" * len(header)]
    previous_group = None
    for r in records:
        group = (r["dtype"], tuple(r["shape"]), r["memory_only"])
        if previous_group is not None and group != previous_group:
            lines.append("")
        previous_group = group
        jl, ox, to = _impl(r, "jaxloss"), _impl(r, "optax"), _impl(r, "torch")
        ratios = r.get("ratio_to_optax", {})
        flag = (
            ""
            if r.get("agrees", True)
            else "  !MISMATCH " + ", ".join(f"{k}={v:.1e}" for k, v in r["agreement"].items())
        )
        errors = [f"{k}: {e['error'][:60]}" for k, e in r["impls"].items() if "error" in e]
        extras = [
            f"{k}={fmt_time(e.get('median_s'))} temp={fmt_bytes(e.get('temp_bytes'))}"
            + (
                f" jaxloss/this={r['jaxloss_ratio_to'][k]:.2f}"
                if k in r.get("jaxloss_ratio_to", {})
                else ""
            )
            for k, e in r["impls"].items()
            if k not in IMPL_COLUMNS and "error" not in e
        ] + _load_varied(r)
        mode = "mem" if r["memory_only"] else r["mode"]
        gel = throughput(r, "jaxloss")
        lines.append(
            f"{r['case']:<28} {mode:<4} {r['dtype']:<5} {_shape(r):<13} "
            f"{fmt_time(jl.get('median_s')):>8} {fmt_time(ox.get('median_s')):>8} "
            f"{fmt_time(to.get('median_s')):>8} "
            f"{fmt_ratio(ratios.get('jaxloss')):>6} {fmt_ratio(ratios.get('torch')):>6} "
            f"{'-' if gel is None else f'{gel / 1e9:.3g}':>8} "
            f"{fmt_frac(jl.get('copy_fraction')):>6} {fmt_frac(ox.get('copy_fraction')):>6} "
            f"{fmt_bytes(jl.get('temp_bytes')):>8} {fmt_bytes(ox.get('temp_bytes')):>8} "
            f"{fmt_ratio(jl.get('temp_ratio'), 3):>6} {fmt_ratio(ox.get('temp_ratio'), 3):>6} "
            f"{_ops(jl) + '/' + _ops(ox):>7}"
            + (f"  [{'; '.join(extras)}]" if extras else "")
            + flag
            + (f"  errors: {'; '.join(errors)}" if errors else "")
        )
    legend = (
        "mode: fwd = forward, vag = jax.value_and_grad w.r.t. the first input (torch: "
        "autograd.grad), mem = compiled only (temp memory, no run). Times are medians per call. "
        "jl/ox, to/ox: median over rounds of time / optax time of the same round (< 1 is faster; "
        "'load varied' where the ratio of the medians differs by more than 15%). "
        "[name=... jaxloss/this=r]: another implementation's median time and temporaries, r = "
        "jaxloss's time / its time (median over rounds). "
        "Gel/s: 1e9 logits elements per second (nll: 1e9 rows per second; its forward gathers "
        "one element per row). "
        "%cpy: fraction of the copy floor achieved (byte model below; shown for logits >= 8 MiB). "
        "ops: XLA ops (kernels, mostly fusions) in the compiled entry computation, jaxloss/optax. "
        "temp: compiled "
        "temp_size_in_bytes; /lgt: temp / logits bytes."
    )
    return "\n".join([*lines, "", legend])


def format_copy_floors(records: Sequence[dict]) -> str:
    """Median copy times per logits shape and dtype, over the benchmarks that ran them."""
    floors: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        if r.get("copy"):
            floors.setdefault((r["dtype"], _shape(r)), []).append(r["copy"])
    lines = ["copy floor (x * s of the logits, in place (donated) | into a fresh buffer; median"]
    lines.append("over the benchmarks that timed it alongside themselves):")
    for (dtype, shape), copies in floors.items():
        in_place = statistics.median(c["in_place_s"] for c in copies)
        fresh = statistics.median(c["fresh_output_s"] for c in copies)
        rate = statistics.median(c["bytes_per_s"] for c in copies)
        lines.append(
            f"  {dtype:<5} {shape:<12} {fmt_time(in_place):>8} ({rate / 1e9:.3g} GB/s) | "
            f"{fmt_time(fresh):>8}"
        )
    if len(lines) == 2:
        lines.append("  (none: no memory-bound benchmark with logits >= 8 MiB)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Goals
# ----------------------------------------------------------------------------------------------


def _find(records: Sequence[dict], case: str, mode: str, dtype: str, shape, memory_only=None):
    for r in records:
        if (r["case"], r["mode"], r["dtype"], tuple(r["shape"])) == (case, mode, dtype, shape) and (
            memory_only is None or r["memory_only"] == memory_only
        ):
            return r
    return None


@dataclasses.dataclass(frozen=True)
class SpeedGoal:
    """``time(numerator) / time(denominator) <= threshold`` for cross_entropy at one point.

    Each side is an ``(implementation, dtype)`` pair. The verdict comes from a dedicated paired
    measurement (:func:`benchmarks.harness.compare_until_clear`), taken after the grid whenever
    the grid timed both sides.
    """

    id: str
    description: str
    mode: str
    shape: tuple[int, ...]
    numerator: tuple[str, str]
    denominator: tuple[str, str]
    threshold: float
    cpu_note: str = ""
    case: str = "cross_entropy"


def speed_goals() -> list[SpeedGoal]:
    big, small = tuple(GOAL_SHAPE), tuple(GOAL_SMALL_SHAPE)
    size, small_size = _size(big), _size(small)
    goals = [
        # CPU keeps what it has (the accelerators issue restated the old 0.6x goal as this).
        SpeedGoal(
            "ce_vag_f32_vs_optax",
            f"f32 cross_entropy value_and_grad at {size}: jaxloss <= 1.05x optax",
            "vag", big, ("jaxloss", "f32"), ("optax", "f32"), 1.05,
        ),
        SpeedGoal(
            "ce_vag_bf16_vs_optax",
            f"bf16 cross_entropy value_and_grad at {size}: jaxloss <= 0.5x optax bf16",
            "vag", big, ("jaxloss", "bf16"), ("optax", "bf16"), 0.5,
        ),
        SpeedGoal(
            "ce_vag_bf16_vs_f32",
            f"bf16 cross_entropy value_and_grad at {size}: jaxloss bf16 <= jaxloss f32",
            "vag", big, ("jaxloss", "bf16"), ("jaxloss", "f32"), 1.0,
        ),
        SpeedGoal(
            "linear_vag_vs_materialised",
            # within the printed 100 columns: "materialised" is cross_entropy(h @ k)
            "f32 linear_cross_entropy value_and_grad at 2048x512x32768: <= 1.0x materialised",
            "vag", (2048, 512, 32768), ("jaxloss", "f32"), ("jaxloss_materialised", "f32"), 1.0,
            case="linear_cross_entropy",
        ),
    ]  # fmt: skip
    for mode in ("fwd", "vag"):
        goals.append(
            SpeedGoal(
                f"ce_{mode}_small_vs_optax",
                f"f32 cross_entropy {MODE_LABELS[mode]} at {small_size}: jaxloss <= 1.1x optax",
                mode,
                small,
                ("jaxloss", "f32"),
                ("optax", "f32"),
                1.1,
            )
        )
    return goals


def _size(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def timed(records: Sequence[dict], goal: SpeedGoal) -> bool:
    """Whether the grid timed both sides of ``goal`` (then it gets its own paired check)."""
    for impl, dtype in (goal.numerator, goal.denominator):
        r = _find(records, goal.case, goal.mode, dtype, goal.shape, memory_only=False)
        if r is None or not _impl(r, impl).get("median_s"):
            return False
    return True


def _untimed_note(goal: SpeedGoal, in_quick: bool) -> str:
    """Why a speed goal has no verdict, and the shortest run that gives it one."""
    if in_quick:
        return "not timed in this run (the full grid and --quick time it)"
    return (
        f"not timed in this run: --quick leaves out {_size(goal.shape)}; the full grid times it "
        f"(this goal's function alone: python -m benchmarks --filter '^{goal.case}$')"
    )


def _speed_result(goal: SpeedGoal, check: dict | None, backend: str, in_quick: bool) -> dict:
    note = goal.cpu_note if backend == "cpu" else f"goal is defined for CPU; measured on {backend}"
    result = {
        "id": goal.id, "description": goal.description, "kind": "time",
        "lhs_label": f"{goal.numerator[0]} {goal.numerator[1]} s",
        "rhs_label": f"{goal.denominator[0]} {goal.denominator[1]} s",
        "threshold": goal.threshold, "note": note,
    }  # fmt: skip
    if check is None:
        return {
            **result, "status": "N/A", "lhs": None, "rhs": None, "ratio": None,
            "interval": None, "rounds": 0,
            "note": _untimed_note(goal, in_quick),
        }  # fmt: skip
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
    """The project's goals: PASS, FAIL, INCONCLUSIVE (timing too noisy to tell) or N/A.

    ``checks`` maps a speed goal's id to its paired check (see :class:`SpeedGoal`); memory goals
    are compiler figures, exact, and judged directly. ``quick_times``: the ids of the speed goals
    a ``--quick`` run times (default: all), for what an untimed goal's note says to run.
    """
    checks = checks or {}
    goals = [
        _speed_result(g, checks.get(g.id), backend, quick_times is None or g.id in quick_times)
        for g in speed_goals()
    ]
    return goals + [_memory_goal(records, dtype) for dtype in ("f32", "bf16")]


def _memory_goal(records: Sequence[dict], dtype: str) -> dict:
    """cross_entropy value_and_grad temporaries at the goal shape within the logits' bytes."""
    big = tuple(GOAL_SHAPE)
    r = _find(records, "cross_entropy", "vag", dtype, big) or {"impls": {}}
    logits = r.get("logits_bytes")
    mine, theirs = _impl(r, "jaxloss").get("temp_bytes"), _impl(r, "optax").get("temp_bytes")
    goal = {
        "id": f"ce_vag_temp_{dtype}", "kind": "bytes",
        "description": f"{dtype} cross_entropy value_and_grad temporaries at {_size(big)} "
        "<= 1x logits bytes",
        "lhs_label": "jaxloss temp bytes", "lhs": mine, "rhs_label": "logits bytes",
        "rhs": logits, "threshold": 1.0, "interval": None, "rounds": 0,
    }  # fmt: skip
    if logits is None or mine is None:
        why = "not compiled in this run" if logits is None else "no memory analysis from XLA"
        return {**goal, "status": "N/A", "ratio": None, "note": why}
    return {
        **goal,
        "status": "PASS" if mine <= logits else "FAIL",
        "ratio": mine / logits,
        "note": f"optax: {fmt_bytes(theirs)}",
    }


VERDICT_LEGEND = (
    "A time goal is judged on its own paired measurement, taken after the grid: both sides\n"
    "timed back to back in each round (long samples, alternating order) until the 95% interval\n"
    "of the median ratio lies wholly below the goal (PASS) or above it (FAIL); if it still\n"
    "straddles the goal after the rounds allowed, INCONCLUSIVE (too noisy here to tell; rerun on\n"
    "a quieter machine). Memory goals are exact compiler figures. --fail-on-goal: exit status 1\n"
    "if any goal FAILs."
)


def format_goals(goals: Sequence[dict]) -> str:
    """Two or three lines per goal: verdict and goal, measured value, note; within 100 columns."""
    lines = ["goals:"]
    for g in goals:
        lines.append(f"  {g['status']:<12}  {g['description']}")
        if g["ratio"] is None:
            lines += textwrap.wrap(
                g["note"], 100, initial_indent=" " * 16, subsequent_indent=" " * 16
            )
            continue
        if g["kind"] == "bytes":
            detail = (
                f"measured {fmt_bytes(g['lhs'])} = {g['ratio']:.3f}x of "
                f"{fmt_bytes(g['rhs'])} (goal <= {g['threshold']:g}x)"
            )
        elif g["kind"] == "modelled":  # compile-only targets: a roofline time, not a timing
            detail = (
                f"modelled {fmt_time(g['lhs'])} = {g['ratio']:.3f}x of "
                f"{fmt_time(g['rhs'])} (goal <= {g['threshold']:g}x)"
            )
        else:
            lo, hi = g["interval"] or (math.nan, math.nan)
            detail = (
                f"measured {g['ratio']:.2f}x (95% interval {lo:.2f}-{hi:.2f}, {g['rounds']} "
                f"rounds; {fmt_time(g['lhs'])} vs {fmt_time(g['rhs'])})"
            )
        lines.append(f"{'':16}{detail}")
        if g["note"]:
            lines += textwrap.wrap(
                f"note: {g['note']}", 100, initial_indent=" " * 16, subsequent_indent=" " * 22
            )
    return "\n".join([*lines, "", VERDICT_LEGEND])


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def write_json(path: Path, payload: dict[str, Any]) -> None:
    def default(o: Any) -> Any:
        if hasattr(o, "item"):
            return o.item()
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    def finite(o: Any) -> Any:  # JSON has no inf/nan: write null
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: finite(v) for k, v in o.items()}
        if isinstance(o, list):
            return [finite(v) for v in o]
        return o

    path.write_text(json.dumps(finite(payload), indent=1, default=default) + "\n")


def write_plots(out: Path, records: Sequence[dict], title: str) -> list[Path]:
    """Throughput vs size per function; temp memory and time ratios, one size per function."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in records if not r["memory_only"]]
    written = [
        _throughput_plot(plt, out, [r for r in timed if r["case"] == case], title)
        for case in dict.fromkeys(r["case"] for r in timed)
    ]
    rows = _bar_rows(timed)
    written.append(_bar_plot(plt, out, rows, "temp_ratio", title))
    written.append(_bar_plot(plt, out, rows, "time_ratio", title))
    return written


def _log_ticks(ax: Any, axis: str, unit: str = "") -> None:
    """Labelled ticks at 1, 2 and 5 per decade; finer within one decade, per decade over more
    than three (the default labels only the decades: a narrow range had no label at all)."""
    from matplotlib import ticker

    target = ax.xaxis if axis == "x" else ax.yaxis
    lo, hi = ax.get_xlim() if axis == "x" else ax.get_ylim()
    subs = (1.0, 2.0, 5.0)
    if hi > 1000 * lo:
        subs = (1.0,)
    elif hi < 10 * lo:
        subs = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)
    target.set_major_locator(ticker.LogLocator(base=10, subs=subs))
    target.set_major_formatter(ticker.EngFormatter(unit=unit, sep=""))
    target.set_minor_formatter(ticker.NullFormatter())


def _ratio_axis(ax: Any, values: Sequence[float]) -> None:
    """A log x axis around 1 that spans ``values``, with 4-9 labelled ticks ("0.5x", "1x")."""
    from matplotlib import ticker

    lo, hi = min([1.0, *values]) / 1.3, max([1.0, *values]) * 1.3
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ticks: list[float] = []
    for mantissas in ((1, 1.5, 2, 3, 5, 7), (1, 2, 5), (1,)):
        ticks = [
            m * 10.0**e
            for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
            for m in mantissas
            if lo <= m * 10.0**e <= hi
        ]
        if len(ticks) <= 9:
            break
    ax.xaxis.set_major_locator(ticker.FixedLocator(ticks))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_locator(ticker.NullLocator())


def _throughput_plot(plt: Any, out: Path, rows: Sequence[dict], title: str) -> Path:
    """One panel per dtype the function ran in; x: its sizes (labelled), y: elements per s."""
    case = rows[0]["case"]
    dtypes = sorted({r["dtype"] for r in rows}, key=_dtype_order)
    sizes = sorted({(r["elements"], _shape(r)) for r in rows})
    fig, axes = plt.subplots(
        1, len(dtypes), figsize=(max(6.5, 1.3 * len(sizes) + 3) * len(dtypes), 4.6),
        squeeze=False, sharey=True,
    )  # fmt: skip
    handles: dict[str, Any] = {}
    for ax, dtype in zip(axes[0], dtypes, strict=True):
        for mode, style in (("fwd", "-"), ("vag", "--")):
            mode_rows = sorted(
                (r for r in rows if (r["mode"], r["dtype"]) == (mode, dtype)),
                key=lambda r: r["elements"],
            )
            for impl in dict.fromkeys(k for r in mode_rows for k in r["impls"]):
                pts = [(r["elements"], rate) for r in mode_rows if (rate := throughput(r, impl))]
                if not pts:
                    continue
                label = f"{impl} {MODE_LABELS[mode]}"
                (line,) = ax.plot(
                    *zip(*pts, strict=True), style, marker="o" if mode == "fwd" else "s",
                    color=IMPL_COLORS.get(impl, "tab:gray"), label=label,
                )  # fmt: skip
                handles.setdefault(label, line)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks([e for e, _ in sizes], [name for _, name in sizes], fontsize=7)
        ax.xaxis.set_minor_locator(plt.NullLocator())  # the sizes are the ticks
        ax.set_xlim(sizes[0][0] / 2, sizes[-1][0] * 2)
        names = " x ".join(rows[0].get("shape_names", ["N", "C"]))
        ax.set_xlabel(f"size ({names}); spaced by logits elements")
        ax.set_title(dtype, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
    _log_ticks(axes[0][0], "y", unit="/s")  # once, on the shared and final y range
    axes[0][0].set_ylabel(f"{throughput_unit(case)} per second (higher is better)")
    fig.suptitle(f"{case}: throughput by size\n{title}", fontsize=9)
    fig.legend(
        handles.values(), handles.keys(), loc="lower center", ncol=3, fontsize=8, frameon=False
    )
    legend_rows = math.ceil(len(handles) / 3)
    fig.tight_layout(rect=(0, 0.04 + 0.05 * legend_rows, 1, 1))
    path = out / f"throughput_{case}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _dtype_order(dtype: str) -> int:
    return {"f32": 0, "bf16": 1}.get(dtype, 2)


def _bar_rows(records: Sequence[dict]) -> list[tuple[str, str, dict[tuple[str, str], dict]]]:
    """Per function, one size and its records by (mode, dtype): the largest size among those
    with the most (mode, dtype) series, so that every bar of a row is at the size it names."""
    rows = []
    for case in dict.fromkeys(r["case"] for r in records):
        by_size: dict[str, dict[tuple[str, str], dict]] = {}
        elements: dict[str, int] = {}
        for r in records:
            if r["case"] == case:
                by_size.setdefault(_shape(r), {})[r["mode"], r["dtype"]] = r
                elements[_shape(r)] = r["elements"]
        size = max(by_size, key=lambda k: (len(by_size[k]), elements[k]))
        rows.append((case, size, by_size[size]))
    return rows


_SERIES_COLORS = {
    ("fwd", "f32"): "#9ecae1", ("vag", "f32"): "#2171b5",
    ("fwd", "bf16"): "#fdae6b", ("vag", "bf16"): "#d94801",
}  # fmt: skip


def _bar_value(r: dict, impl: str, kind: str) -> float | None:
    if kind == "temp_ratio":
        return _impl(r, impl).get("temp_ratio")
    return r.get("ratio_to_optax", {}).get(impl)


def _bar_plot(
    plt: Any, out: Path, rows: Sequence[tuple[str, str, dict]], kind: str, title: str
) -> Path:
    """Horizontal bars per function at one size: temp/logits, or time/optax (log axis)."""
    series = sorted(
        {key for _, _, by in rows for key in by}, key=lambda s: (_dtype_order(s[1]), s[0] != "fwd")
    )
    impls = ("jaxloss", "optax") if kind == "temp_ratio" else ("jaxloss", "torch")
    height = 0.8 / max(1, len(series))
    fig, axes = plt.subplots(
        1, len(impls), figsize=(6.5 * len(impls), 1.6 + 0.3 * len(rows) * len(series)),
        squeeze=False, sharey=True, sharex=kind == "temp_ratio",
    )  # fmt: skip
    for ax, impl in zip(axes[0], impls, strict=True):
        for j, (mode, dtype) in enumerate(series):
            bars = [
                (i + j * height, v)
                for i, (_, _, by) in enumerate(rows)
                if (mode, dtype) in by
                and (v := _bar_value(by[mode, dtype], impl, kind)) is not None
                and (kind == "temp_ratio" or v > 0)
            ]
            if not bars:
                continue
            ys, vals = zip(*bars, strict=True)
            # Time ratios are drawn from 1 on a log axis: left of 1 is faster than optax.
            base = 0.0 if kind == "temp_ratio" else 1.0
            ax.barh(
                ys, [v - base for v in vals], left=base, height=height,
                color=_SERIES_COLORS.get((mode, dtype), "tab:gray"),
                label=f"{MODE_LABELS[mode]} {dtype}",
            )  # fmt: skip
            for y, v in zip(ys, vals, strict=True):
                ax.text(
                    v, y, f" {v:.2f} ", va="center", fontsize=6, ha="left" if v >= base else "right"
                )
        ax.axvline(1.0, color="k", lw=0.8, ls=":")
        ax.grid(True, axis="x", which="major", alpha=0.3)
        if kind == "temp_ratio":
            ax.set_title(f"{impl}: compiled temporaries / logits bytes", fontsize=9)
            ax.set_xlabel("temp_size_in_bytes / logits bytes (lower is better)")
        else:
            _ratio_axis(
                ax,
                [v for _, _, by in rows for r in by.values() if (v := _bar_value(r, impl, kind))],
            )
            ax.set_title(f"{impl} time / optax time (same rounds)", fontsize=9)
            ax.set_xlabel("time ratio to optax, log scale (< 1x: faster than optax)")
    ticks = [i + (len(series) - 1) * height / 2 for i in range(len(rows))]
    axes[0][0].set_yticks(ticks, [f"{case}\n{size}" for case, size, _ in rows], fontsize=7)
    axes[0][0].invert_yaxis()  # once: the y axis is shared
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(series), fontsize=8, frameon=False)
    what = "compiled temporary memory" if kind == "temp_ratio" else "time relative to optax"
    fig.suptitle(f"{what}, each function at the size named\n{title}", fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path = out / ("temp_memory.png" if kind == "temp_ratio" else "ratio_to_optax.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
