"""What comes out: the tables, the goal lines, ``results.json`` and the PNG plots."""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.cases import HEADS, MATERIALISED

IMPL_COLUMNS = ("jaxloss", "optax", "torch")
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


def count(value: float) -> str:
    return f"{value:.0f}" if abs(value - round(value)) < 0.05 else f"{value:.2f}"


def size(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def find(records: Sequence[dict], case: str, mode: str, dtype: str, shape, memory_only=None):
    key = (case, mode, dtype, tuple(shape))
    return next((r for r in records if (r["case"], r["mode"], r["dtype"], tuple(r["shape"])) == key
                 and memory_only in (None, r["memory_only"])), None)  # fmt: skip


# A column: header, width (negative: left-aligned) and the cell of a record.
Column = tuple[str, int, Callable[[dict], str]]


def impl(name: str, key: str, fmt: Callable[[Any], str] = str) -> Callable[[dict], str]:
    """The cell of ``impls[name][key]``, ``-`` where there is none."""
    return lambda r: "-" if (v := r["impls"].get(name, {}).get(key)) is None else fmt(v)


def pair(key: str, fmt: Callable[[Any], str], a: str = "jaxloss", b: str = "optax") -> Callable:
    return lambda r: f"{impl(a, key, fmt)(r)}/{impl(b, key, fmt)(r)}"


def _mat(key: str, fmt: Callable[[Any], str]) -> Callable[[dict], str]:
    return lambda r: impl(MATERIALISED[r["case"]], key, fmt)(r)


# fmt: off
FIRST: list[Column] = [("function", -27, lambda r: r["case"]), ("mode", -4, lambda r: r["mode"])]
CPU_COLUMNS: list[Column] = [
    *FIRST, *[(k, 7, impl(k, "median_s", fmt_time)) for k in IMPL_COLUMNS],
    *[(h, 5, lambda r, k=k: fmt_ratio(r.get("ratio_to_optax", {}).get(k)))
      for h, k in (("jl/ox", "jaxloss"), ("to/ox", "torch"))],
    ("temp jl", 8, impl("jaxloss", "temp_bytes", fmt_bytes)),
    ("temp ox", 8, impl("optax", "temp_bytes", fmt_bytes)),
]
TARGET_COLUMNS: list[Column] = [
    *FIRST, ("dtype", -5, lambda r: r["dtype"]), ("shape", -13, lambda r: size(r["shape"])),
    ("kernels", 7, pair("kernels", str)), ("x copy", 11, pair("copy_ratio", lambda v: f"{v:.3f}")),
    ("temporaries", 17, pair("temp_bytes", fmt_bytes)),
    ("roofline", 15, pair("roofline_s", fmt_time)),
]
HEAD_COLUMNS: list[Column] = [
    ("function", -21, lambda r: r["case"]), ("dtype", -5, lambda r: r["dtype"]),
    ("N x D x V", -17, lambda r: size(r["shape"])),
    ("fused", 7, impl("jaxloss", "roofline_s", fmt_time)),
    ("materia.", 8, _mat("roofline_s", fmt_time)),
    ("ratio", 6, lambda r: "-" if (v := r.get("ratio_to_materialised")) is None else f"{v:.2f}x"),
    ("NDV matmuls", 11, lambda r: f"{impl('jaxloss', 'matmuls', count)(r)} / "
                                  f"{_mat('matmuls', count)(r)}"),
    ("temporaries", 17, lambda r: f"{impl('jaxloss', 'temp_bytes', fmt_bytes)(r)} / "
                                  f"{_mat('temp_bytes', fmt_bytes)(r)}"),
    ("launches", 8, impl("jaxloss", "launches")),
]
# fmt: on
LEGEND = (
    "Times: median per call over pytest-benchmark's rounds (fwd: forward, vag: "
    "jax.value_and_grad; compiled only: not run). jl/ox, to/ox: jaxloss's and torch's median "
    "over optax's (< 1: faster than optax). Another implementation (linear_cross_entropy's "
    "jaxloss_materialised, cross_entropy(h @ k)) gets a line of its own: its median, temporaries "
    "and jaxloss/this, jaxloss's median over its median (< 1: jaxloss faster). temp: compiled "
    "temporary memory (memory_analysis); results.json has every figure."
)
NOT_MEASURED = (
    "COMPILER FIGURES, NOT MEASUREMENTS: each program is compiled for a device this machine "
    "does not have; kernels, bytes, FLOPs, loop trip counts and temporaries are read from the "
    "optimised program, and the time is modelled from them and the target's peaks."
)
TRAFFIC_MODEL = (
    "roofline = modelled time: every kernel of the optimised program (fusion, custom call, "
    "top-level op) costs max(dot/convolution FLOPs / peak, bytes / HBM bandwidth), loop bodies "
    "x their trip counts; hbm = the kernels' operands + results (a sliced or gathered operand "
    "counts what is taken, an in-place update its update); copy = every input read once and "
    "every output written once; x copy = hbm / copy."
)
HEADS_LEGEND = (
    "value_and_grad of the mean loss in (hidden, kernel), default options; fused: jaxloss; "
    "materialised: cross_entropy(h @ k, y) (linear_cross_entropy) or kl_div of the two "
    "log_softmaxes (linear_distillation); NDV matmuls: dots of ~2·N·D·V FLOPs (block dots "
    "x their loop trips), fused / materialised; launches: kernel launches of the fused "
    "program (loops unrolled)."
)


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
                versus = "" if ratio is None else f", jaxloss/this {ratio:.2f}"
                lines.append(f"{'':29}{k}: {fmt_time(e['median_s'])}, temp "
                             f"{fmt_bytes(e.get('temp_bytes'))}{versus}")  # fmt: skip
    return lines


def format_table(records: Sequence[dict]) -> str:
    """The CPU table, within 100 columns."""
    return "\n".join([*table(records, CPU_COLUMNS), "", *textwrap.wrap(LEGEND, 100)])


def format_target_tables(records: Sequence[dict]) -> str:
    """Every case but the heads (jaxloss/optax), then the linear heads against their
    materialised formulas and where the fused time goes."""
    heads = [r for r in records if r["case"] in HEADS]
    lines = table([r for r in records if r["case"] not in HEADS], TARGET_COLUMNS, group=False)
    lines += ["", "kernels, x copy, temporaries, roofline: jaxloss/optax (jax.nn for softmax and "
              "log_softmax). " + TRAFFIC_MODEL, "", *table(heads, HEAD_COLUMNS, False), "",
              "where the fused time goes (its costliest kernels: calls x bytes per call):"
              ]  # fmt: skip
    for r in heads:
        top = r["impls"].get("jaxloss", {}).get("top_kernels", [])[:4]
        parts = [f"{k['name']} {k['calls']}x {fmt_bytes(k['bytes_per_call'])} {k['bound']}-bound "
                 f"{fmt_time(k['seconds'])}" for k in top]  # fmt: skip
        lines.append(f"  {r['case']} {r['dtype']} {size(r['shape'])}: " + "; ".join(parts))
    return "\n".join([*lines, "", HEADS_LEGEND])


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
    wrap = lambda text, i: textwrap.wrap(text, 100, initial_indent=" " * 16,
                                         subsequent_indent=" " * i)  # fmt: skip
    lines = ["goals:"]
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
            what, fmt = (
                ("modelled", fmt_time) if g["kind"] == "modelled" else ("measured", fmt_bytes)
            )
            lines.append(f"{'':16}{what} {fmt(g['lhs'])} = {g['ratio']:.3f}x of {fmt(g['rhs'])} "
                         f"(goal <= {g['threshold']:g}x)")  # fmt: skip
        lines += wrap(f"note: {g['note']}", 22) if g["note"] else []
    return "\n".join([*lines, *(["", VERDICT_LEGEND] if legend else [])])


def write(args: Any, table: str, meta: dict, records: list[dict], goals: list[dict],
          plot_title: str) -> dict[str, Any]:  # fmt: skip
    """``table.txt``, the PNGs (unless ``--no-plots``) and ``results.json`` (JSON has no inf
    or NaN: they are written as null) in ``--out``."""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.txt").write_text(table)
    if not args.no_plots:
        meta["plots"] = [p.name for p in write_plots(args.out, records, plot_title)]
    payload = {"meta": meta, "results": records, "goals": goals}

    def finite(o: Any) -> Any:
        if isinstance(o, dict):
            return {k: finite(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [finite(v) for v in o]
        o = o.item() if hasattr(o, "item") else o
        return None if isinstance(o, float) and not math.isfinite(o) else o

    (args.out / "results.json").write_text(json.dumps(finite(payload), indent=1) + "\n")
    return payload


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
                                label=f"{name} {'forward' if mode == 'fwd' else 'value_and_grad'}")
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
