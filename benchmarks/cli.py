"""``python -m benchmarks``: plan the grid, time it with pytest-benchmark, check the goals, write
the table, ``results.json`` and the plots."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from benchmarks import grid, report
from benchmarks.cases import (
    CPU_SIZES,
    DTYPES,
    GOAL_SHAPE,
    GPU_SIZES,
    QUICK_SIZES,
    Case,
    Inputs,
    abstract_args,
    all_cases,
    arg_names,
    jax_function,
)  # fmt: skip
from benchmarks.grid import Task
from benchmarks.targets import TARGETS

DEFAULT_OUT = Path("bench_out")  # ignored by git in this repository
# Measured wall times (README.md, Benchmarks; RESULTS.md).
QUICK_MEASURED = "2-5 min on a shared 2-core CPU"
FULL_MEASURED = "16 min idle, 24 shared, and about 7 GB of RAM"


def parse_sizes(text: str) -> list[tuple[int, ...]]:
    """``"128x10,1024x1000"`` -> ``[(128, 10), (1024, 1000)]``."""
    try:
        sizes = [tuple(int(d) for d in item.lower().split("x")) for item in text.split(",") if item]
    except ValueError:
        sizes = []
    if not sizes or any(len(s) != 2 or min(s) < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes look like 128x10,1024x1000; got {text!r}")
    return sizes


def _names(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [n for n in text.split(",") if n]
        if not names or set(names) - set(allowed):
            raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)}; got {text!r}")
        return names

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Times jaxloss against optax and torch.nn.functional (forward and\n"
        "value_and_grad) with pytest-benchmark, with compiled temp memory, a copy-bandwidth\n"
        "floor and goal checks. Arguments after -- go to pytest, e.g.\n"
        "  -- --benchmark-save=NAME\n  -- --benchmark-compare --benchmark-compare-fail=median:5%%",
    )  # fmt: skip
    flag = {"action": "store_true"}
    for name, options, text in [
        ("--quick", flag, f"small grid, few rounds (measured {QUICK_MEASURED}; the full grid "
         f"took {FULL_MEASURED})"),
        ("--out", {"type": Path, "default": DEFAULT_OUT}, "directory for results.json, "
         f"table.txt and PNGs (default: ./{DEFAULT_OUT})"),
        ("--filter", {"default": ""}, "comma-separated patterns (re.search; plain text is a "
         "substring) of benchmark names to keep, e.g. '^cross_entropy$,softmax'"),
        ("--sizes", {"type": parse_sizes}, "grid as NxC,NxC (replaces the default)"),
        ("--dtypes", {"type": _names(tuple(DTYPES)), "default": list(DTYPES)}, "comma-separated "
         f"input dtypes to run, from {','.join(DTYPES)} (default: all; --quick times f32 and one "
         "bf16 point, the goal's)"),
        ("--modes", {"type": _names(("fwd", "vag")), "default": ["fwd", "vag"]}, "comma-separated "
         "modes to run: fwd (the function's forward pass), vag (jax.value_and_grad w.r.t. its "
         "first input; torch: autograd.grad) (default: both)"),
        ("--repeats", {"type": int}, "fixed number of timed rounds per benchmark"),
        ("--compile-workers", {"type": int, "default": _cpu_threads()},
         "threads compiling for --target (default: cores)"),
        ("--no-torch", flag, "skip the PyTorch peers"),
        ("--fail-on-goal", flag, "exit with status 1 if a goal FAILs (INCONCLUSIVE, too noisy "
         "to tell, does not)"),
        # The old names of --fail-on-goal and --no-peer-check, kept working but out of --help.
        ("--check", {**flag, "dest": "fail_on_goal"}, argparse.SUPPRESS),
        ("--no-check", {**flag, "dest": "no_peer_check"}, argparse.SUPPRESS),
        ("--memory-only", flag, "compile every benchmark for its temporary memory and kernels, "
         "time nothing"),
        ("--dry-run", flag, "print the planned benchmarks (and their implementations) and the "
         "expected duration, run nothing"),
        ("--wide", flag, "print every column (table.txt always has them)"),
        ("--target", {"choices": sorted(TARGETS)}, "compile-only accelerator (benchmarks/"
         "targets.py): modelled time (a loop-aware roofline), HBM bytes, kernels and "
         "temporaries from the compiler, no timing"),
        ("--no-peer-check", flag, "do not compare each peer's output with jaxloss's before "
         "timing it (a disagreeing peer is then not flagged !MISMATCH)"),
        ("--no-plots", flag, "write JSON and table only, no PNGs"),
        ("--no-progress", flag, "no per-benchmark progress on stderr"),
    ]:  # fmt: skip
        p.add_argument(name, help=text, **options)
    return p


def parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """Our arguments, and those after ``--`` (for pytest)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    return build_parser().parse_args(argv[:cut]), argv[cut + 1 :]


def selected(name: str, text: str) -> bool:
    filters = [f for f in text.split(",") if f]
    return not filters or any(re.search(f, name) for f in filters)


# fmt: off
def plan(args: argparse.Namespace, backend: str, cases: Sequence[Case] | None = None) -> list[Task]:
    """Every (case, mode, dtype, shape) to run, grouped by input set, small before big."""
    cases = list(all_cases(not args.no_torch)) if cases is None else cases
    dtypes, modes = args.dtypes, args.modes
    sizes = args.sizes or (QUICK_SIZES if args.quick else
                           CPU_SIZES if backend == "cpu" else GPU_SIZES)
    grid_dtypes = ["f32"] if args.quick and not args.sizes else dtypes
    grid_points = [(s, d) for s in sizes for d in grid_dtypes]
    tasks: list[Task] = []
    for case in (c for c in cases if selected(c.name, args.filter)):
        points = case.points(backend, args.quick) if case.points else grid_points
        tasks += [Task(case, m, d, tuple(s), args.memory_only) for s, d in points for m in modes
                  if d in dtypes and m in case.modes]
        if case.memory_only and "vag" in modes:
            tasks += [Task(case, "vag", d, s, True) for s, d in case.memory_only(backend)
                      if d in dtypes]
        if case.name == "cross_entropy" and not args.memory_only:  # the goal points
            timed = args.quick and not args.sizes and "vag" in modes  # else compiled only
            have = {(t.shape, t.dtype) for t in tasks if t.mode == "vag"}
            tasks += [Task(case, "vag", d, GOAL_SHAPE, not timed) for d in ("f32", "bf16")
                      if (GOAL_SHAPE, d) not in have]
    order = {c.name: i for i, c in enumerate(cases)}
    key = lambda t: (t.memory_only, len(t.shape), math.prod(t.shape),
                     list(DTYPES).index(t.dtype), order[t.case.name], t.mode)
    return sorted(tasks, key=key)
# fmt: on


def announce(tasks: Sequence[Task], args: argparse.Namespace) -> str:
    """The expected duration on a quiet 2-core machine: 0.3 s per timed implementation, 1.2 s per
    32 MiB of logits timed, 0.6 s per compile-only benchmark, 30 s of goal checks and start-up."""
    timed = [t for t in tasks if not t.memory_only]
    work = sum(len(t.case.impls) * (0.3 + 1.2 * t.logits_bytes / 2**25) for t in timed)
    seconds = 30 + work + 0.6 * (len(tasks) - len(timed))
    took = lambda s: f"{s:.0f} s" if s < 100 else f"{s / 60:.0f} min"
    line = (
        f"{len(timed)} benchmarks to time and {len(tasks) - len(timed)} to compile only: "
        f"expected {took(seconds)} to {took(1.6 * seconds)} on a 2-core CPU (quiet to busy)."
    )
    load, threads = _load_average(), _cpu_threads()
    if load is not None and load > threads:
        line += (
            f" The machine is busy now (1-min load {load:.1f} on {threads} cores): more "
            f"like {took(seconds * load / threads)}."
        )
    if not args.quick and not args.memory_only:
        line += f" For a first look, --quick took {QUICK_MEASURED}."
    return line  # fmt: skip


def time_grid(tasks: list[Task], args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    """Runs :mod:`benchmarks.grid` under pytest-benchmark; its JSON."""
    import pytest

    grid.PLAN[:] = tasks
    grid.CHECK = not args.no_peer_check
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "pytest-benchmark.json"
    rounds = ["--benchmark-min-rounds", "3", "--benchmark-min-time", "0.004" if args.quick
              else "0.02", "--benchmark-max-time", "0.1" if args.quick else "0.5"]  # fmt: skip
    if args.repeats:
        rounds = ["--benchmark-min-rounds", str(args.repeats), "--benchmark-max-time", "0"]
    argv = [grid.__file__, "-o", "addopts=", "-p", "no:cacheprovider", "-p", "no:randomly",
            "-q" if args.no_progress else "-v", f"--benchmark-json={path}",
            "--benchmark-sort=name", *rounds, *extra]  # fmt: skip
    # Started from a pytest-xdist worker (tests/test_benchmarks.py under -n), the inherited
    # PYTEST_XDIST_WORKER makes pytest-benchmark disable every benchmark: this is its own run.
    for name in [k for k in os.environ if k.startswith("PYTEST_XDIST_")]:
        del os.environ[name]
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the table's
        code = int(pytest.main(argv))
    saved = json.loads(path.read_text()) if path.exists() else {"benchmarks": []}
    return {**saved, "exit_code": code}


def memory_record(task: Task) -> dict[str, Any]:
    """Compiles every JAX implementation on abstract inputs (nothing allocated)."""
    record = grid.base_record(task)
    record["impls"].pop("torch", None)
    specs = abstract_args(task.case, task.mode, task.dtype, task.shape)
    for name, entry in record["impls"].items():
        try:
            fn = jax_function(task.case, task.case.impls[name], task.mode)
            entry.update(grid.compile_info(jax.jit(fn).lower(*specs).compile()))
        except Exception as err:
            entry["error"] = f"{type(err).__name__}: {err}"[:300]
    grid.finish_record(record)
    return record


# Goal checks: a paired measurement, sampled until its verdict is clear


def median_interval(
    values: Sequence[float], confidence: float = 0.95
) -> tuple[float, float] | None:
    """Distribution-free interval of the median, ``x_(k)``, ``x_(n+1-k)``, ``k`` the largest
    rank with ``P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2`` (a sign test: load bursts give
    heavy tails that a normal interval would understate); None when ``n`` is too small."""
    x, n, tail, k = sorted(values), len(values), 0.0, 0
    for j in range(n + 1):
        tail += math.comb(n, j) / 2**n
        if tail > (1 - confidence) / 2:
            break
        k = j + 1
    return None if k == 0 else (x[k - 1], x[n - k])


def _sampler(case: Case, impl: str, dtype: str, goal: report.SpeedGoal) -> Callable[[int], float]:
    """Seconds per call over ``n`` back-to-back calls of one side of a goal, warmed up."""
    inputs = Inputs(goal.shape, DTYPES[dtype])
    args = jax.block_until_ready(tuple(inputs[n] for n in arg_names(case, goal.mode)))
    compiled = jax.jit(jax_function(case, case.impls[impl], goal.mode)).lower(*args).compile()
    jax.block_until_ready(compiled(*args))

    def sample(n: int) -> float:
        start, out = time.perf_counter(), None
        for _ in range(n):
            out = compiled(*args)
        jax.block_until_ready(out)
        return (time.perf_counter() - start) / n

    return sample


def _calls_for(sample: Callable[[int], float], min_sample_s: float = 0.05) -> int:
    """Calls per sample such that one sample lasts ``min_sample_s``, measured on whole samples."""
    n = 1
    while (elapsed := sample(n) * n) < min_sample_s:
        n = max(n + 1, math.ceil(1.2 * n * min_sample_s / elapsed))
    return n


def compare_until_clear(
    numerator: Callable[[int], float],
    denominator: Callable[[int], float],
    threshold: float,
    max_rounds: int,
    budget_s: float,
) -> dict[str, Any]:
    """Samples ``numerator / denominator`` in paired rounds (alternating which goes first) until
    the 95 % interval of the median ratio lies wholly below ``threshold`` (PASS) or above it
    (FAIL), from 7 rounds on; INCONCLUSIVE when ``max_rounds`` or ``budget_s`` run out first."""
    calls = [_calls_for(numerator), _calls_for(denominator)]
    started, times = time.perf_counter(), ([], [])
    verdict, interval = "INCONCLUSIVE", None
    for k in range(max_rounds):
        for side in (0, 1) if k % 2 == 0 else (1, 0):
            times[side].append((numerator, denominator)[side](calls[side]))
        ratios = [a / b for a, b in zip(*times, strict=True)]
        if k + 1 < 7:
            continue
        interval = median_interval(ratios)
        if interval is not None and interval[1] <= threshold:
            verdict = "PASS"
        elif interval is not None and interval[0] > threshold:
            verdict = "FAIL"
        if verdict != "INCONCLUSIVE" or time.perf_counter() - started > budget_s:
            break
    ratios = [a / b for a, b in zip(*times, strict=True)]
    return {
        "verdict": verdict, "ratio": float(np.median(ratios)), "rounds": len(ratios),
        "interval": None if interval is None else [float(interval[0]), float(interval[1])],
        "ratios": ratios, "numerator_s": float(np.median(times[0])),
        "denominator_s": float(np.median(times[1])), "calls_per_sample": calls,
        "seconds": time.perf_counter() - started,
    }  # fmt: skip


def check_goals(records: Sequence[dict], cases: Sequence[Case], quick: bool) -> dict[str, dict]:
    """The paired check of every speed goal whose both sides the grid timed."""
    by_name = {c.name: c for c in cases}
    checks = {}
    for goal in report.speed_goals():
        if goal.case in by_name and report.timed(records, goal):
            print(f"goal check: {goal.description}", file=sys.stderr, flush=True)
            case = by_name[goal.case]
            numerator, denominator = (
                _sampler(case, *s, goal) for s in (goal.numerator, goal.denominator)
            )
            checks[goal.id] = compare_until_clear(
                numerator, denominator, goal.threshold, 15 if quick else 41, 4.0 if quick else 20.0
            )
    return checks


def quick_goals(cases: Sequence[Case], backend: str) -> set[str]:
    """The speed goals whose both sides a plain ``--quick`` run times."""
    quick_plan = plan(build_parser().parse_args(["--quick"]), backend, cases)
    timed = {(t.case.name, t.mode, t.dtype, t.shape) for t in quick_plan if not t.memory_only}
    sides = lambda g: [(g.case, g.mode, d, g.shape) for _, d in (g.numerator, g.denominator)]
    return {g.id for g in report.speed_goals() if set(sides(g)) <= timed}


# What ran where, and the files


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _cpu_threads() -> int:
    """XLA's CPU thread pool has one thread per schedulable core."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def versions(*packages: str) -> dict[str, str | None]:
    """Installed versions (read from the metadata: importing torch only for it is seconds)."""

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    names = ("jax", "jaxlib", "optax", "numpy", "jaxloss", "torch", "pytest-benchmark", *packages)
    return {"python": platform.python_version(), **{p: version(p) for p in names}}


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=here)
    return out.stdout.strip() or None


def _device_name(device: Any) -> str:
    """The processor model on CPU (XLA says only "cpu"), the device kind elsewhere."""
    if device.platform == "cpu" and os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return device.device_kind if device.platform != "cpu" else platform.machine() or "cpu"


def metadata(args: argparse.Namespace, argv: list, tasks: Sequence[Task], cases: Sequence[Case],
             torch_note: str | None, load: float | None) -> dict:  # fmt: skip
    device = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": jax.default_backend(), "device": f"{device.platform}: {_device_name(device)}",
        "device_kind": device.device_kind, "devices": [str(d) for d in jax.devices()],
        "host": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                 "cpu_threads_available": _cpu_threads()},
        "versions": versions(), "git_commit": git_commit(), "argv": argv, "quick": args.quick,
        "torch": {"used": torch_note is None, "note": torch_note,
                  "num_threads": None if torch_note else _cpu_threads(),
                  "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "load_average_1min": {"start": load, "end": _load_average()},
        "settings": {"min_repeats": args.repeats or 3, "max_repeats": args.repeats,
                     "check": not args.no_peer_check, "timer": "benchmarks.grid.wait_then_time"},
        "shapes": sorted({tuple(t.shape) for t in tasks}, key=math.prod),
        "dtypes": sorted({t.dtype for t in tasks}), "byte_model": grid.BYTE_MODEL,
        "cases": {c.name: {"description": c.description, "peers": c.peer_note,
                           "impls": list(c.impls)} for c in cases if selected(c.name, args.filter)},
    }  # fmt: skip


def plot_title(meta: dict[str, Any]) -> str:
    """What ran where: device model, threads, versions, date (the plots and the table say it)."""
    v, device = meta["versions"], meta["device"].split(": ", 1)[-1]
    if meta["backend"] == "cpu":
        device += f", {meta['host']['cpu_threads_available']} threads"
    peers = f"jax {v['jax']}, optax {v['optax']}"
    peers += f", torch {v['torch']}" if meta["torch"]["used"] else ""
    quick = ", --quick" if meta["quick"] else ""
    return f"{device} (XLA:{meta['backend'].upper()}) · {peers} · {meta['date'][:10]}{quick}"


def text(meta: dict[str, Any], records: Sequence[dict], goals: Sequence[dict], wide: bool) -> str:
    torch = meta["torch"]
    title = "\n".join(textwrap.wrap(plot_title(meta), 100, break_on_hyphens=False))
    heading = f"jaxloss benchmarks, {meta['date']}\n{title}\n" + (
        f"torch threads {torch['num_threads']}, OMP_WAIT_POLICY={torch['omp_wait_policy']}"
        if torch["used"] else f"no torch peers ({torch['note']})")  # fmt: skip
    parts = [heading, report.format_table(records, wide=wide)]
    if wide:
        parts += ["byte model: " + grid.BYTE_MODEL]
    out = "\n\n".join([*parts, report.format_goals(goals)])
    busiest = max([v for v in meta["load_average_1min"].values() if v is not None], default=0.0)
    threads = meta["host"]["cpu_threads_available"]
    if meta["backend"] == "cpu" and busiest > 0.5 * threads:
        out += (f"\n\nnote: the machine was busy (1-min load average up to {busiest:.1f} on "
                f"{threads} cores): absolute times are\ninflated and noisy (the goal checks less "
                "so: paired rounds); multi-threaded torch suffers most.")  # fmt: skip
    return out + f"\n\nwall time {meta['wall_s']:.1f} s\n"


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the suite and returns the results payload (also printed and written)."""
    args, extra = parse(argv)
    if args.target:
        from benchmarks import compiled

        return compiled.run(args, argv)
    started, load_before, backend = time.perf_counter(), _load_average(), jax.default_backend()
    torch_note = "--no-torch" if args.no_torch else _torch_note(backend)
    args.no_torch = torch_note is not None
    cases = all_cases(include_torch=not args.no_torch)
    tasks = plan(args, backend, cases)
    print(announce(tasks, args), file=sys.stderr, flush=True)
    if args.dry_run:
        for task in tasks:
            print(f"{task.name}  {','.join(task.case.impls)}")
        return {"tasks": [task.name for task in tasks]}
    saved = time_grid(tasks, args, extra) if any(not t.memory_only for t in tasks) else None
    records = grid.records(tasks, saved) if saved else []
    records += [memory_record(t) for t in tasks if t.memory_only]
    checks = check_goals(records, cases, args.quick)
    goals = report.evaluate_goals(records, backend, checks, quick_goals(cases, backend))
    argv = list(sys.argv[1:] if argv is None else argv)
    meta = metadata(args, argv, tasks, cases, torch_note, load_before)
    meta["pytest_exit_code"] = saved["exit_code"] if saved else None
    meta["wall_s"] = time.perf_counter() - started
    print(text(meta, records, goals, wide=args.wide))
    table = text(meta, records, goals, wide=True)
    payload = report.write(args, table, meta, records, goals, plot_title(meta))
    written = f"{len(meta.get('plots', []))} PNG plots, " if meta.get("plots") else ""
    print(f"wrote results.json, table.txt (every column), {written}pytest-benchmark.json to "
          f"{args.out}/ (--out DIR to change)", file=sys.stderr)  # fmt: skip
    return payload


def _torch_note(backend: str) -> str | None:
    """None when torch can be a peer (its intra-op threads then match XLA's), else why not."""
    try:
        import torch
    except ImportError:
        return "torch not importable"
    if backend == "cpu":
        torch.set_num_threads(_cpu_threads())
        return None
    return None if torch.cuda.is_available() else f"torch cannot run on the {backend} backend here"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks``; with ``--fail-on-goal``, exit status 1 when a goal FAILs."""
    args, extra = parse(argv)
    payload = run(argv)
    failed = [g["id"] for g in payload.get("goals", ()) if g["status"] == "FAIL"]
    if args.fail_on_goal and failed:
        print(f"--fail-on-goal: goals failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    # pytest-benchmark's --benchmark-compare-fail ends pytest with an error on a regression.
    compare_fail = any(a.startswith("--benchmark-compare-fail") for a in extra)
    return 1 if compare_fail and payload.get("meta", {}).get("pytest_exit_code") else 0
