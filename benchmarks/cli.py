"""``python -m benchmarks``: plan the grid, time it with pytest-benchmark (or, with ``--target``,
compile it for an accelerator and model it), check the goals, write the table, ``results.json``
and the plots."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from benchmarks import cases, goals, grid, hlo, report
from benchmarks.cases import DTYPES, GOAL_SHAPE, HEADS, LINEAR, MATERIALISED, Case, all_cases
from benchmarks.grid import Task
from benchmarks.targets import TARGETS, Target, devices

# Measured wall times (README.md, Benchmarks; RESULTS.md).
QUICK_MEASURED = "2-5 min on a shared 2-core CPU"
FULL_MEASURED = "16 min idle, 24 shared, and about 7 GB of RAM"
QUICK_TARGET_CASES = ("cross_entropy", *HEADS)  # --quick --target: the goal points


def _sizes(text: str) -> list[tuple[int, ...]]:
    """``"128x10,1024x1000"`` -> ``[(128, 10), (1024, 1000)]``."""
    try:
        sizes = [tuple(int(d) for d in item.lower().split("x")) for item in text.split(",") if item]
    except ValueError:
        sizes = []
    if not sizes or any(len(s) != 2 or min(s) < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes look like 128x10,1024x1000; got {text!r}")
    return sizes


def _names(allowed: Sequence[str]):
    def parse(text: str) -> list[str]:
        if not (names := [n for n in text.split(",") if n]) or set(names) - set(allowed):
            raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)}; got {text!r}")
        return names

    return parse


def parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """Our arguments, and those after ``--`` (for pytest)."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Times jaxloss against optax and torch.nn.functional (forward and\n"
        "value_and_grad) with pytest-benchmark, with compiled temp memory and goal checks.\n"
        "Arguments after -- go to pytest, e.g.\n  -- --benchmark-save=NAME\n"
        "  -- --benchmark-compare --benchmark-compare-fail=median:5%%",
    )  # fmt: skip
    flag = {"action": "store_true"}
    for name, options, text in [
        ("--quick", flag, f"small grid, few rounds (measured {QUICK_MEASURED}; the full grid "
         f"took {FULL_MEASURED})"),
        ("--out", {"type": Path, "default": Path("bench_out")}, "directory for results.json, "
         "table.txt and PNGs (default: ./bench_out)"),
        ("--filter", {"default": ""}, "comma-separated patterns (re.search; plain text is a "
         "substring) of benchmark names to keep, e.g. '^cross_entropy$,softmax'"),
        ("--sizes", {"type": _sizes}, "grid as NxC,NxC (replaces the default)"),
        ("--dtypes", {"type": _names(tuple(DTYPES)), "default": list(DTYPES)}, "comma-separated "
         f"input dtypes to run, from {','.join(DTYPES)} (default: all; --quick times f32 and one "
         "bf16 point, the goal's)"),
        ("--modes", {"type": _names(("fwd", "vag")), "default": ["fwd", "vag"]}, "comma-separated "
         "modes to run: fwd (the function's forward pass), vag (jax.value_and_grad w.r.t. its "
         "first input; torch: autograd.grad) (default: both)"),
        ("--repeats", {"type": int}, "fixed number of timed rounds per benchmark"),
        ("--no-torch", flag, "skip the PyTorch peers"),
        ("--fail-on-goal", flag, "exit with status 1 if a goal FAILs (INCONCLUSIVE, too noisy "
         "to tell, does not)"),
        # The old names of --fail-on-goal and --no-peer-check, kept working but out of --help.
        ("--check", {**flag, "dest": "fail_on_goal"}, argparse.SUPPRESS),
        ("--no-check", {**flag, "dest": "no_peer_check"}, argparse.SUPPRESS),
        ("--dry-run", flag, "print the planned benchmarks (and their implementations) and the "
         "expected duration, run nothing"),
        ("--target", {"choices": sorted(TARGETS)}, "compile-only accelerator (benchmarks/"
         "targets.py): modelled time (a loop-aware roofline), HBM bytes, kernels and "
         "temporaries from the compiler, no timing"),
        ("--no-peer-check", flag, "do not compare each peer's output with jaxloss's before "
         "timing it (a disagreeing peer is then not flagged !MISMATCH)"),
        ("--memory-only", flag, "compile every benchmark for its temporary memory and kernels, "
         "time nothing (tests/test_memory.py reads these records)"),
        ("--no-plots", flag, "write JSON and table only, no PNGs"),
        ("--no-progress", flag, "no per-benchmark progress on stderr"),
    ]:  # fmt: skip
        p.add_argument(name, help=text, **options)
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    return p.parse_args(argv[:cut]), argv[cut + 1 :]


def selected(name: str, text: str) -> bool:
    filters = [f for f in text.split(",") if f]
    return not filters or any(re.search(f, name) for f in filters)


# fmt: off
def plan(args: argparse.Namespace, backend: str, chosen: Sequence[Case] | None = None) -> list:
    """Every (case, mode, dtype, shape) to time, grouped by input set, small before big; the
    goal points not timed are compiled for their temporaries."""
    chosen = list(all_cases(not args.no_torch)) if chosen is None else chosen
    sizes = args.sizes or (cases.QUICK_SIZES if args.quick else
                           cases.CPU_SIZES if backend == "cpu" else cases.GPU_SIZES)
    dtypes = ["f32"] if args.quick and not args.sizes else args.dtypes
    grid_points = [(s, d) for s in sizes for d in dtypes]
    tasks: list[Task] = []
    for case in (c for c in chosen if selected(c.name, args.filter)):
        points = case.points(backend, args.quick) if case.points else grid_points
        tasks += [Task(case, m, d, tuple(s), args.memory_only) for s, d in points
                  for m in args.modes if d in args.dtypes and m in case.modes]
        if "vag" in args.modes:
            tasks += [Task(case, "vag", d, s, True) for s, d in case.memory_only
                      if d in args.dtypes]
        if case.name == "cross_entropy" and not args.memory_only:  # the goal points
            timed = args.quick and not args.sizes and "vag" in args.modes  # else compiled only
            have = {(t.shape, t.dtype) for t in tasks if t.mode == "vag"}
            tasks += [Task(case, "vag", d, GOAL_SHAPE, not timed) for d in ("f32", "bf16")
                      if (GOAL_SHAPE, d) not in have]
    order = {c.name: i for i, c in enumerate(chosen)}
    key = lambda t: (t.memory_only, len(t.shape), math.prod(t.shape), list(DTYPES).index(t.dtype),
                     order[t.case.name], t.mode)
    return sorted(tasks, key=key)


def target_plan(target: Target, args: argparse.Namespace) -> list[Task]:
    """Every case at the target's sizes (``--quick``: the goal cases at the last); the linear
    heads at the target's ``linear_points`` (distillation: the bf16 ones)."""
    sizes, tasks = args.sizes or (target.sizes[-1:] if args.quick else target.sizes), []
    for case in [*all_cases(False), cases.distillation_case()]:
        if not selected(case.name, args.filter) or (
                args.quick and not args.sizes and case.name not in QUICK_TARGET_CASES):
            continue
        points = [(s, d) for s in sizes for d in args.dtypes]
        if case.name in HEADS:
            points = [(s, d) for s, d in target.linear_points if case.name == LINEAR or d == "bf16"]
        modes = ["vag"] if case.name in HEADS else args.modes
        tasks += [Task(case, m, d, tuple(s), case.name in HEADS) for s, d in points
                  if d in args.dtypes for m in modes if m in case.modes]
    return tasks
# fmt: on


def quick_goals(chosen: Sequence[Case], backend: str) -> set[str]:
    """The speed goals whose both sides a plain ``--quick`` run times."""
    tasks = plan(parse(["--quick"])[0], backend, chosen)
    timed = {(t.case.name, t.mode, t.dtype, t.shape) for t in tasks if not t.memory_only}
    sides = lambda g: {(g.case, g.mode, d, g.shape) for _, d in (g.numerator, g.denominator)}
    return {g.id for g in goals.speed_goals() if sides(g) <= timed}


def announce(tasks: Sequence[Task], args: argparse.Namespace) -> str:
    """The expected duration on a quiet 2-core machine: 0.3 s per timed implementation, 1.2 s per
    32 MiB of logits timed, 0.6 s per compile-only benchmark, 30 s of goal checks and start-up."""
    timed = [t for t in tasks if not t.memory_only]
    work = sum(len(t.case.impls) * (0.3 + 1.2 * t.logits_bytes / 2**25) for t in timed)
    seconds = 30 + work + 0.6 * (len(tasks) - len(timed))
    took = lambda s: f"{s:.0f} s" if s < 100 else f"{s / 60:.0f} min"
    line = (f"{len(timed)} benchmarks to time and {len(tasks) - len(timed)} to compile only: "
            f"expected {took(seconds)} to {took(1.6 * seconds)} on a 2-core CPU "
            "(quiet to busy).")  # fmt: skip
    return line + ("" if args.quick else f" For a first look, --quick took {QUICK_MEASURED}.")


def time_grid(tasks: list[Task], args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    """Runs :mod:`benchmarks.grid` under pytest-benchmark; its JSON."""
    import pytest

    grid.PLAN[:], grid.CHECK = tasks, not args.no_peer_check
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


def compiled_record(task: Task, target: Target | None = None) -> dict[str, Any]:
    """Compiles every JAX implementation of a task on abstract inputs (nothing allocated): for
    this backend its temporaries and kernels; for a ``target``, modelled time and bytes too."""
    record = grid.base_record(task)
    record["impls"].pop("torch", None)
    specs = cases.abstract_args(task.case, task.mode, task.dtype, task.shape)
    shape = task.shape
    unit = 2.0 * shape[0] * shape[1] * shape[2] if task.case.name in HEADS else None
    for name, entry in record["impls"].items():
        function = cases.jax_function(task.case, task.case.impls[name], task.mode)
        try:
            if target is None:
                entry.update(grid.compile_info(jax.jit(function).lower(*specs).compile()))
            else:
                entry.update(
                    hlo.analyse(hlo.compile_program(target, function, specs), target, unit)
                )
        except Exception as err:  # a peer that cannot compile is reported, not fatal
            entry["error"] = f"{type(err).__name__}: {err}"[:300]
        if target is None or "error" in entry:
            continue
        entry["temp_ratio"] = entry["temp_bytes"] / record["logits_bytes"]
        if task.case.name == LINEAR and target.platform == "tpu" and task.dtype == "f32":
            # TPUs run DEFAULT-precision float32 matmuls as bf16 passes, and XLA keeps a bf16
            # copy of the whole kernel for them; float32 matmuls need none.
            with jax.default_matmul_precision("float32"):
                program = hlo.compile_program(target, function, specs).compiled
            entry["temp_bytes_f32_matmuls"] = program.memory_analysis().temp_size_in_bytes
        entry["copy_ratio"] = entry["hbm_bytes"] / record["min_bytes"]
        entry["elements_per_s"] = record["elements"] / entry["roofline_s"]  # modelled
    if target is None:
        grid.finish_record(record)
        return record
    times = {k: e.get("roofline_s") for k, e in record["impls"].items()}
    jl, ox = times.get("jaxloss"), times.get("optax")
    ref = times.get(MATERIALISED.get(task.case.name, ""))
    record["ratio_to_optax"] = {"jaxloss": jl / ox} if jl and ox else {}  # modelled time
    if jl and ref:
        record["ratio_to_materialised"] = jl / ref
    return record


def _threads() -> int:
    """XLA's CPU thread pool has one thread per schedulable core."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _meta(args: argparse.Namespace, argv: Sequence[str] | None, tasks: Sequence[Task],
          *packages: str) -> dict[str, Any]:  # fmt: skip
    """What ran where: date, commit, argv, points, installed versions (read from the metadata:
    importing torch only for it is seconds)."""
    names = ("jax", "jaxlib", "optax", "numpy", "jaxloss", "torch", "pytest-benchmark", *packages)
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        versions[name] = None  # not installed
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()  # fmt: skip
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": commit or None, "argv": list(sys.argv[1:] if argv is None else argv),
            "quick": args.quick, "shapes": sorted({tuple(t.shape) for t in tasks}, key=math.prod),
            "dtypes": sorted({t.dtype for t in tasks}), "versions": versions}  # fmt: skip


def _finish(args, parts: list[str], meta: dict, records: list, found: list, title: str) -> dict:
    """Prints the text, writes table.txt, the PNGs and results.json to ``--out``."""
    text = "\n\n".join([*parts, f"wall time {meta['wall_s']:.1f} s\n"])
    print(text, end="")
    payload = report.write(args, text, meta, records, found, title)
    plots = [f"{len(meta['plots'])} PNG plots"] if meta.get("plots") else []
    written = [
        "results.json",
        "table.txt",
        *plots,
        *([] if args.target else ["pytest-benchmark.json"]),
    ]
    print(f"wrote {', '.join(written)} to {args.out}/ (--out DIR to change)", file=sys.stderr)
    return payload


def run_target(args: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, Any]:
    """``--target NAME``: compiles the grid for a compile-only device, prints and writes."""
    from concurrent.futures import ThreadPoolExecutor

    started = time.perf_counter()
    jax.config.update("jax_platforms", "cpu")  # the host stays CPU; targets come from plugins
    target = TARGETS[args.target]
    tasks = target_plan(target, args)
    devices(target.name)  # the plugin loads once, before the compile threads start
    records = []
    with ThreadPoolExecutor(max(1, min(_threads(), 4))) as pool:
        for record in pool.map(lambda t: compiled_record(t, target), tasks):
            records.append(record)
            if not args.no_progress:
                print(f"[{len(records)}/{len(tasks)}] {record['name']}", file=sys.stderr)
    found = goals.target_goals(target, records)
    meta = {**_meta(args, argv, tasks, "jax-cuda12-pjrt", "jax-cuda12-plugin", "libtpu"),
            "target": dataclasses.asdict(target), "compile_only": True,
            "device": f"{target.platform}: {devices(target.name)[0].device_kind}",
            "not_measured": report.NOT_MEASURED, "traffic_model": report.TRAFFIC_MODEL,
            "points": [t.name for t in tasks], "wall_s": time.perf_counter() - started}  # fmt: skip
    title, peaks = f"{target.description}, compile-only, jax {jax.__version__}", target.peak_flops
    return _finish(args, [
        f"jaxloss on {title}{', quick' if args.quick else ''}, {meta['date']}", report.NOT_MEASURED,
        report.format_target_tables(records),
        f"peaks: bf16 {peaks['bf16'] / 1e12:.4g} TFLOP/s, f32 at DEFAULT precision "
        f"{peaks['f32'] / 1e12:.4g} ({'one bf16 pass' if target.platform == 'tpu' else 'TF32'}), "
        f"HIGHEST {peaks['f32_highest'] / 1e12:.4g}; HBM {target.bandwidth / 1e12:.4g} TB/s "
        "(benchmarks/targets.py says where each comes from)",
        report.format_goals(found, legend=False),
    ], meta, records, found, f"{title}: MODELLED, not measured")  # fmt: skip


def _torch_note(backend: str) -> str | None:
    """None when torch can be a peer (its intra-op threads then match XLA's), else why not."""
    try:
        import torch
    except ImportError:
        return "torch not importable"
    if backend == "cpu":
        torch.set_num_threads(_threads())
        return None
    return None if torch.cuda.is_available() else f"torch cannot run on the {backend} backend here"


def _device_name(device: Any) -> str:
    """The processor model on CPU (XLA says only "cpu"), the device kind elsewhere."""
    if device.platform == "cpu" and os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            models = [line.split(":", 1)[1].strip() for line in cpuinfo
                      if line.startswith("model name")]  # fmt: skip
        return models[0] if models else platform.machine() or "cpu"
    return device.device_kind if device.platform != "cpu" else platform.machine() or "cpu"


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the suite and returns the results payload (also printed and written)."""
    args, extra = parse(argv)
    if args.target:
        return run_target(args, argv)
    started, backend = time.perf_counter(), jax.default_backend()
    torch_note = "--no-torch" if args.no_torch else _torch_note(backend)
    args.no_torch = torch_note is not None
    chosen = all_cases(include_torch=not args.no_torch)
    tasks = plan(args, backend, chosen)
    print(announce(tasks, args), file=sys.stderr, flush=True)
    if args.dry_run:
        print("".join(f"{t.name}  {','.join(t.case.impls)}\n" for t in tasks), end="")
        return {"tasks": [task.name for task in tasks]}
    saved = time_grid(tasks, args, extra) if any(not t.memory_only for t in tasks) else None
    records = grid.records(tasks, saved) if saved else []
    records += [compiled_record(t) for t in tasks if t.memory_only]
    checks = goals.check_goals(records, chosen, args.quick)
    found = goals.evaluate_goals(records, backend, checks, quick_goals(chosen, backend))
    device, threads, omp = jax.devices()[0], _threads(), os.environ.get("OMP_WAIT_POLICY")
    meta = {**_meta(args, argv, tasks), "backend": backend, "threads": threads,
            "device": f"{device.platform}: {_device_name(device)}",
            "torch": {"used": torch_note is None, "note": torch_note, "omp_wait_policy": omp},
            "xla_flags": os.environ.get("XLA_FLAGS"), "byte_model": grid.BYTE_MODEL,
            "settings": {"min_repeats": args.repeats or 3, "max_repeats": args.repeats,
                         "check": not args.no_peer_check,
                         "timer": "benchmarks.grid.wait_then_time"},
            "pytest_exit_code": saved["exit_code"] if saved else None,
            "cases": {c.name: {"description": c.description, "impls": list(c.impls)}
                      for c in chosen if selected(c.name, args.filter)},
            "wall_s": time.perf_counter() - started}  # fmt: skip
    v, cpu = meta["versions"], f", {threads} threads" if backend == "cpu" else ""
    peers = f"jax {v['jax']}, optax {v['optax']}"
    peers += f", torch {v['torch']}" if torch_note is None else ""
    title = (f"{meta['device'].split(': ', 1)[-1]}{cpu} (XLA:{backend.upper()}) · {peers} · "
             f"{meta['date'][:10]}{', --quick' if args.quick else ''}")  # fmt: skip
    heading = [f"jaxloss benchmarks, {meta['date']}",
               *textwrap.wrap(title, 100, break_on_hyphens=False),
               f"torch threads {threads}, OMP_WAIT_POLICY={omp}" if torch_note is None
               else f"no torch peers ({torch_note})"]  # fmt: skip
    return _finish(args, ["\n".join(heading), report.format_table(records),
                          "byte model: " + grid.BYTE_MODEL, report.format_goals(found)],
                   meta, records, found, title)  # fmt: skip


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
