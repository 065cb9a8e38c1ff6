"""What comes out: the terminal table, the goals, ``results.json`` and the PNG plots."""

from __future__ import annotations

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


def format_table(records: Sequence[dict]) -> str:
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


def _goal(goal_id, description, lhs, rhs, threshold, lhs_label, rhs_label, note="", ratio=None):
    """A goal ``ratio <= threshold``; ``ratio`` is ``lhs / rhs`` unless given (paired ratios)."""
    if lhs is None or rhs is None:
        return {
            "id": goal_id, "description": description, "status": "N/A",
            "lhs_label": lhs_label, "lhs": lhs, "rhs_label": rhs_label, "rhs": rhs,
            "ratio": None, "threshold": threshold,
            "note": note or "not measured in this run (needs the full grid or --quick)",
        }  # fmt: skip
    ratio = lhs / rhs if ratio is None else ratio
    return {
        "id": goal_id, "description": description,
        "status": "PASS" if ratio <= threshold else "FAIL",
        "lhs_label": lhs_label, "lhs": lhs, "rhs_label": rhs_label, "rhs": rhs,
        "ratio": ratio, "threshold": threshold, "note": note,
    }  # fmt: skip


def evaluate_goals(records: Sequence[dict], backend: str) -> list[dict]:
    """The project's performance goals, PASS/FAIL (N/A when a point was not measured)."""
    big, small = tuple(GOAL_SHAPE), tuple(GOAL_SMALL_SHAPE)
    size = "x".join(map(str, big))
    note = "" if backend == "cpu" else f"goal is defined for CPU; measured on {backend}"

    def median(case, mode, dtype, shape, impl):
        r = _find(records, case, mode, dtype, shape, memory_only=False)
        return None if r is None else _impl(r, impl).get("median_s")

    def paired(case, mode, dtype, shape):
        r = _find(records, case, mode, dtype, shape, memory_only=False)
        return None if r is None else r.get("ratio_to_optax", {}).get("jaxloss")

    def temp(case, mode, dtype, shape, impl):
        r = _find(records, case, mode, dtype, shape)
        return None if r is None else _impl(r, impl).get("temp_bytes")

    def logits_bytes(dtype):
        r = _find(records, "cross_entropy", "vag", dtype, big)
        return None if r is None else r["logits_bytes"]

    goals = [
        _goal(
            "ce_vag_f32_vs_optax",
            f"f32 cross_entropy value_and_grad at {size}: jaxloss <= 0.6x optax",
            median("cross_entropy", "vag", "f32", big, "jaxloss"),
            median("cross_entropy", "vag", "f32", big, "optax"),
            0.6,
            "jaxloss s",
            "optax s",
            note,
            ratio=paired("cross_entropy", "vag", "f32", big),
        ),
        _goal(
            "ce_vag_bf16_vs_f32",
            f"bf16 cross_entropy value_and_grad at {size}: jaxloss bf16 <= jaxloss f32",
            median("cross_entropy", "vag", "bf16", big, "jaxloss"),
            median("cross_entropy", "vag", "f32", big, "jaxloss"),
            1.0,
            "jaxloss bf16 s",
            "jaxloss f32 s",
            note,
        ),
    ]
    for mode in ("fwd", "vag"):
        goals.append(
            _goal(
                f"ce_{mode}_small_vs_optax",
                f"f32 cross_entropy {MODE_LABELS[mode]} at {'x'.join(map(str, small))}: "
                "jaxloss <= 1.1x optax",
                median("cross_entropy", mode, "f32", small, "jaxloss"),
                median("cross_entropy", mode, "f32", small, "optax"),
                1.1,
                "jaxloss s",
                "optax s",
                ratio=paired("cross_entropy", mode, "f32", small),
            )
        )
    for dtype in ("f32", "bf16"):
        goals.append(
            _goal(
                f"ce_vag_temp_{dtype}",
                f"{dtype} cross_entropy value_and_grad temp memory at {size} <= 1x logits bytes",
                temp("cross_entropy", "vag", dtype, big, "jaxloss"),
                logits_bytes(dtype),
                1.0,
                "jaxloss temp bytes",
                "logits bytes",
                "optax temp ratio: "
                + fmt_ratio(
                    (lambda t, b: None if t is None or not b else t / b)(
                        temp("cross_entropy", "vag", dtype, big, "optax"), logits_bytes(dtype)
                    ),
                    3,
                ),
            )
        )
    return goals


def format_goals(goals: Sequence[dict]) -> str:
    lines = ["goals:"]
    for g in goals:
        if g["ratio"] is None:
            detail = g["note"]
        else:
            fmt = fmt_bytes if "bytes" in g["lhs_label"] else fmt_time
            detail = (
                f"{g['lhs_label']}={fmt(g['lhs'])}  {g['rhs_label']}={fmt(g['rhs'])}  "
                f"ratio={g['ratio']:.3f} (<= {g['threshold']})"
                + (f"  [{g['note']}]" if g["note"] else "")
            )
        lines.append(f"  {g['status']:<4}  {g['description']}\n        {detail}")
    lines.append("  (ratios to optax: median over rounds of the paired ratio; times: medians)")
    return "\n".join(lines)


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
