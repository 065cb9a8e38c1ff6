"""What comes out: the terminal table, the goals, ``results.json`` and the PNG plots."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.cases import GOAL_SHAPE, GOAL_SMALL_SHAPE

IMPL_COLUMNS = ("jaxloss", "optax", "torch")
IMPL_COLORS = {"jaxloss": "tab:blue", "optax": "tab:orange", "torch": "tab:green"}
MODE_LABELS = {"fwd": "forward", "vag": "value_and_grad"}


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
        "jl/ox, to/ox: jaxloss and torch time over optax time, median of per-round ratios\n"
        "(< 1: faster than optax). %copy: jaxloss's speed as a fraction of a copy of the same\n"
        "bytes (byte model below; logits >= 8 MiB). temp: compiled temporary memory.\n"
        "Every column (throughput, kernels, both copy fractions): table.txt and results.json."
    )
    return "\n".join([*lines, "", legend])


def _row_notes(r: dict) -> list[str]:
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
                + ("" if ratio is None else f", jaxloss/it {ratio:.2f}")
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
                f" jaxloss/it={r['jaxloss_ratio_to'][k]:.2f}"
                if k in r.get("jaxloss_ratio_to", {})
                else ""
            )
            for k, e in r["impls"].items()
            if k not in IMPL_COLUMNS and "error" not in e
        ]
        mode = "mem" if r["memory_only"] else r["mode"]
        gel = jl.get("elements_per_s")
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
        "jl/ox, to/ox: median over rounds of time / optax time of the same round (< 1 is faster). "
        "Gel/s: 1e9 logits elements per second. "
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
    shape: tuple[int, int]
    numerator: tuple[str, str]
    denominator: tuple[str, str]
    threshold: float
    cpu_note: str = ""

    @property
    def case(self) -> str:
        return "cross_entropy"


def speed_goals() -> list[SpeedGoal]:
    big, small = tuple(GOAL_SHAPE), tuple(GOAL_SMALL_SHAPE)
    size, small_size = _size(big), _size(small)
    goals = [
        SpeedGoal(
            "ce_vag_f32_vs_optax",
            f"f32 cross_entropy value_and_grad at {size}: jaxloss <= 0.6x optax",
            "vag", big, ("jaxloss", "f32"), ("optax", "f32"), 0.6,
            "on CPU both run near the memory floor (~1x optax): not reachable here, see "
            "benchmarks/RESULTS.md; the goal is meant for accelerators",
        ),
        SpeedGoal(
            "ce_vag_bf16_vs_f32",
            f"bf16 cross_entropy value_and_grad at {size}: jaxloss bf16 <= jaxloss f32",
            "vag", big, ("jaxloss", "bf16"), ("jaxloss", "f32"), 1.0,
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


def _speed_result(goal: SpeedGoal, check: dict | None, backend: str) -> dict:
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
            "note": "not timed in this run (needs the full grid or --quick)",
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
    records: Sequence[dict], backend: str, checks: dict[str, dict] | None = None
) -> list[dict]:
    """The project's goals: PASS, FAIL, INCONCLUSIVE (timing too noisy to tell) or N/A.

    ``checks`` maps a speed goal's id to its paired check (see :class:`SpeedGoal`); memory goals
    are compiler figures, exact, and judged directly.
    """
    checks = checks or {}
    goals = [_speed_result(g, checks.get(g.id), backend) for g in speed_goals()]
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
    "a quieter machine). Memory goals are exact compiler figures. --check: exit status 1 if any\n"
    "goal FAILs."
)


def format_goals(goals: Sequence[dict]) -> str:
    """Two or three lines per goal: verdict and goal, measured value, note; within 100 columns."""
    lines = ["goals:"]
    for g in goals:
        lines.append(f"  {g['status']:<12}  {g['description']}")
        if g["ratio"] is None:
            lines.append(f"{'':16}{g['note']}")
            continue
        if g["kind"] == "bytes":
            detail = (
                f"measured {fmt_bytes(g['lhs'])} = {g['ratio']:.3f}x of "
                f"{fmt_bytes(g['rhs'])} (goal <= {g['threshold']:g}x)"
            )
        else:
            lo, hi = g["interval"] or (math.nan, math.nan)
            detail = (
                f"measured {g['ratio']:.2f}x (95% interval {lo:.2f}-{hi:.2f}, {g['rounds']} "
                f"rounds; {fmt_time(g['lhs'])} vs {fmt_time(g['rhs'])}), goal <= "
                f"{g['threshold']:g}x"
            )
        lines.append(f"{'':16}{detail}")
        if g["note"]:
            lines.append(f"{'':16}note: {g['note']}")
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
    """Throughput vs size per function, temp memory and time ratios at the biggest size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    timed = [r for r in records if not r["memory_only"]]
    written: list[Path] = []
    cases = list(dict.fromkeys(r["case"] for r in timed))
    dtypes = sorted({r["dtype"] for r in timed}, key=_dtype_order)
    for case in cases:
        fig, axes = plt.subplots(
            1, len(dtypes), figsize=(5.2 * len(dtypes), 4.4), squeeze=False, sharex=True,
            sharey=True,
        )  # fmt: skip
        handles: dict[str, Any] = {}
        for ax, dtype in zip(axes[0], dtypes, strict=True):
            rows = [r for r in timed if r["case"] == case and r["dtype"] == dtype]
            for mode, style in (("fwd", "-"), ("vag", "--")):
                mode_rows = sorted(
                    (r for r in rows if r["mode"] == mode), key=lambda r: r["elements"]
                )
                impls = dict.fromkeys(k for r in mode_rows for k in r["impls"])
                for impl in impls:
                    pts = [
                        (r["elements"], _impl(r, impl)["elements_per_s"])
                        for r in mode_rows
                        if _impl(r, impl).get("elements_per_s")
                    ]
                    if pts:
                        xs, ys = zip(*pts, strict=True)
                        label = f"{impl} {MODE_LABELS[mode]}"
                        (line,) = ax.plot(
                            xs, ys, style, marker="o" if mode == "fwd" else "s",
                            color=IMPL_COLORS.get(impl, "tab:gray"), label=label,
                        )  # fmt: skip
                        handles.setdefault(label, line)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{case} — {dtype}", fontsize=10)
            ax.set_xlabel("logits elements (N x C)")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].set_ylabel("elements / s (higher is better)")
        fig.suptitle(f"throughput vs size ({title})", fontsize=9)
        fig.legend(
            handles.values(), handles.keys(), loc="lower center", ncol=3, fontsize=8,
            frameon=False,
        )  # fmt: skip
        fig.tight_layout(rect=(0, 0.12, 1, 1))
        path = out / f"throughput_{case}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    written.append(_bar_plot(plt, ticker, out, timed, "temp_ratio", title))
    written.append(_bar_plot(plt, ticker, out, timed, "time_ratio", title))
    return written


def _dtype_order(dtype: str) -> int:
    return {"f32": 0, "bf16": 1}.get(dtype, 2)


def _largest(records: Sequence[dict]) -> dict[tuple[str, str, str], dict]:
    """Per (case, mode, dtype), the record at the largest size."""
    best: dict[tuple[str, str, str], dict] = {}
    for r in records:
        key = (r["case"], r["mode"], r["dtype"])
        if key not in best or r["elements"] > best[key]["elements"]:
            best[key] = r
    return best


_SERIES_COLORS = {
    ("fwd", "f32"): "#9ecae1", ("vag", "f32"): "#2171b5",
    ("fwd", "bf16"): "#fdae6b", ("vag", "bf16"): "#d94801",
}  # fmt: skip


def _bar_plot(
    plt: Any, ticker: Any, out: Path, records: Sequence[dict], kind: str, title: str
) -> Path:
    """Horizontal bars per function at its largest size: temp/logits or time/optax."""
    best = _largest(records)
    cases = list(dict.fromkeys(k[0] for k in best))
    series = sorted({(k[1], k[2]) for k in best}, key=lambda s: (_dtype_order(s[1]), s[0] != "fwd"))
    impls = ("jaxloss", "optax") if kind == "temp_ratio" else ("jaxloss", "torch")
    height = 0.8 / max(1, len(series))
    fig, axes = plt.subplots(
        1, len(impls), figsize=(6.5 * len(impls), 1.2 + 0.32 * len(cases) * len(series)),
        squeeze=False, sharey=True, sharex=kind == "temp_ratio",
    )  # fmt: skip
    for ax, impl in zip(axes[0], impls, strict=True):
        for j, (mode, dtype) in enumerate(series):
            ys, vals = [], []
            for i, case in enumerate(cases):
                r = best.get((case, mode, dtype))
                if r is None:
                    continue
                v = (
                    _impl(r, impl).get("temp_ratio")
                    if kind == "temp_ratio"
                    else r.get("ratio_to_optax", {}).get(impl)
                )
                if v is not None:
                    ys.append(i + j * height)
                    vals.append(v)
            # Time ratios are drawn from 1 on a log axis: left of 1 is faster than optax.
            base = 0.0 if kind == "temp_ratio" else 1.0
            ax.barh(
                ys, [v - base for v in vals], left=base, height=height,
                color=_SERIES_COLORS.get((mode, dtype)), label=f"{MODE_LABELS[mode]} {dtype}",
            )  # fmt: skip
            for y, v in zip(ys, vals, strict=True):
                ax.text(
                    v, y, f" {v:.2f} ", va="center", fontsize=6, ha="left" if v >= base else "right"
                )
        ax.axvline(1.0, color="k", lw=0.8, ls=":")
        ax.grid(True, axis="x", alpha=0.3)
        if kind == "temp_ratio":
            ax.set_title(f"{impl}: compiled temp memory / logits bytes", fontsize=9)
            ax.set_xlabel("temp_size_in_bytes / logits bytes (lower is better)")
        else:
            ax.set_xscale("log")
            # Plain numbers on the major ticks only: log minor labels overlap.
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set_title(f"{impl} time / optax time", fontsize=9)
            ax.set_xlabel("time ratio to optax (< 1: faster than optax)")
    sizes = {
        case: "/".join(dict.fromkeys(_shape(r) for k, r in best.items() if k[0] == case))
        for case in cases
    }
    ticks = [i + (len(series) - 1) * height / 2 for i in range(len(cases))]
    axes[0][0].set_yticks(ticks, [f"{c}\n{sizes[c]}" for c in cases], fontsize=7)
    axes[0][0].invert_yaxis()  # once: the y axis is shared
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(series), fontsize=8, frameon=False)
    fig.suptitle(f"at each function's largest size run ({title})", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path = out / ("temp_memory.png" if kind == "temp_ratio" else "ratio_to_optax.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
