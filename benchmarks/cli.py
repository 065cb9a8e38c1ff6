"""``python -m benchmarks``: plan the grid, run it with a progress bar, report and write files."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import jax

from benchmarks import harness, report
from benchmarks.cases import (
    CPU_SIZES,
    DTYPES,
    GOAL_SHAPE,
    GPU_SIZES,
    QUICK_SIZES,
    Case,
    Shape,
    all_cases,
)
from benchmarks.targets import TARGETS

# Where the results go without --out (ignored by git in this repository).
DEFAULT_OUT = Path("bench_out")
# Measured wall times (README.md, Benchmarks): --quick 3 min 44 s and 5 min 31 s with other
# jobs on the machine; the full grid 970 s on an idle 2-core VM (RESULTS.md), 23.6 min shared.
QUICK_MEASURED = "4-6 min on a shared 2-core CPU"
FULL_MEASURED = "16 min idle, 24 shared, and about 7 GB of RAM"


@dataclasses.dataclass(frozen=True)
class Task:
    case: Case
    mode: str
    dtype: str
    shape: Shape
    memory_only: bool = False

    @property
    def name(self) -> str:
        kind = f"{self.mode}-mem" if self.memory_only else self.mode
        return f"{self.case.name}/{kind}/{self.dtype}/{'x'.join(map(str, self.shape))}"


def parse_sizes(text: str) -> list[Shape]:
    """``"128x10,1024x1000"`` -> ``[(128, 10), (1024, 1000)]``."""
    try:
        sizes = [tuple(int(d) for d in item.lower().split("x")) for item in text.split(",") if item]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"sizes look like 128x10,1024x1000; got {text!r}") from err
    if not sizes or any(len(s) != 2 or min(s) < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes look like 128x10,1024x1000; got {text!r}")
    return sizes


def _names(allowed: Sequence[str]):
    def parse(text: str) -> list[str]:
        names = [n for n in text.split(",") if n]
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)}; got {text!r}")
        return names

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Times jaxloss against optax and torch.nn.functional (forward and "
        "value_and_grad), with compiled temp memory, a copy-bandwidth floor and goal checks.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"small grid, few repeats (measured {QUICK_MEASURED}; the full grid took "
        f"{FULL_MEASURED})",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"directory for results.json, table.txt and PNGs (default: ./{DEFAULT_OUT})",
    )
    p.add_argument(
        "--filter",
        default="",
        help="comma-separated patterns (re.search; plain text is a substring) of benchmark "
        "names to keep, e.g. '^cross_entropy$,softmax'",
    )
    p.add_argument("--sizes", type=parse_sizes, help="grid as NxC,NxC (replaces the default)")
    p.add_argument(
        "--dtypes",
        type=_names(tuple(DTYPES)),
        default=list(DTYPES),
        help=f"comma-separated input dtypes to run, from {','.join(DTYPES)} (default: all; "
        "--quick times f32 and one bf16 point, the goal's)",
    )
    p.add_argument(
        "--modes",
        type=_names(("fwd", "vag")),
        default=["fwd", "vag"],
        help="comma-separated modes to run: fwd (the function's forward pass), vag "
        "(jax.value_and_grad w.r.t. its first input; torch: autograd.grad) (default: both)",
    )
    p.add_argument("--repeats", type=int, help="fixed number of timed samples per benchmark")
    p.add_argument(
        "--compile-workers",
        type=int,
        default=_cpu_threads(),
        help="threads compiling a group of benchmarks ahead of timing it (default: cores)",
    )
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch peers")
    p.add_argument(
        "--torch-threads",
        type=int,
        help="torch intra-op threads (default: as many as XLA uses, i.e. the available cores)",
    )
    p.add_argument(
        "--fail-on-goal",
        action="store_true",
        help="exit with status 1 if a goal FAILs (INCONCLUSIVE, too noisy to tell, does not)",
    )
    # The old names of --fail-on-goal and --no-peer-check, kept working but out of --help.
    p.add_argument("--check", dest="fail_on_goal", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-check", dest="no_peer_check", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--memory-only",
        action="store_true",
        help="compile every benchmark for its temporary memory and kernels, time nothing",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the planned benchmarks (and their implementations) and the expected "
        "duration, run nothing",
    )
    p.add_argument(
        "--wide", action="store_true", help="print every column (table.txt always has them)"
    )
    p.add_argument(
        "--target",
        choices=sorted(TARGETS),
        help="compile-only accelerator (benchmarks/targets.py): modelled time (a loop-aware "
        "roofline), HBM bytes, kernels and temporaries from the compiler, no timing",
    )
    p.add_argument(
        "--no-peer-check",
        action="store_true",
        help="do not compare each peer's output with jaxloss's before timing it (saves a "
        "call per implementation; a disagreeing peer is then not flagged !MISMATCH)",
    )
    p.add_argument("--no-plots", action="store_true", help="write JSON and table only, no PNGs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def _selected(case: Case, filters: Sequence[str]) -> bool:
    return not filters or any(re.search(f, case.name) for f in filters)


def plan(args: argparse.Namespace, cases: Sequence[Case], backend: str) -> list[Task]:
    """Every (case, mode, dtype, shape) to run, grouped so that inputs are built once."""
    filters = [f for f in args.filter.split(",") if f]
    modes, dtypes = args.modes, args.dtypes
    if args.sizes:
        grid = [(s, d) for s in args.sizes for d in dtypes]
    elif args.quick:
        # f32 only; the one bf16 point is the goal point added below.
        grid = [(s, "f32") for s in QUICK_SIZES if "f32" in dtypes]
    else:
        grid = [(s, d) for s in (CPU_SIZES if backend == "cpu" else GPU_SIZES) for d in dtypes]
    tasks: list[Task] = []
    for case in cases:
        if not _selected(case, filters):
            continue
        points = case.points(backend, args.quick) if case.points else grid
        for shape, dtype in points:
            if dtype in dtypes:
                tasks += [
                    Task(case, m, dtype, tuple(shape), memory_only=args.memory_only)
                    for m in modes
                    if m in case.modes
                ]
        if case.memory_only:
            tasks += [
                Task(case, "vag", dtype, tuple(shape), memory_only=True)
                for shape, dtype in case.memory_only(backend)
                if dtype in dtypes and "vag" in modes
            ]
    goal_case = next((c for c in cases if c.name == "cross_entropy"), None)
    # --memory-only compiles the grid asked for, nothing else.
    if goal_case is not None and _selected(goal_case, filters) and not args.memory_only:
        timed = {(t.case.name, t.mode, t.dtype, t.shape) for t in tasks}
        for dtype in ("f32", "bf16"):
            point = ("cross_entropy", "vag", dtype, GOAL_SHAPE)
            if point in timed:
                continue
            # --quick times the goal point (vag only); otherwise only its memory is compiled.
            timed_goal = args.quick and not args.sizes and "vag" in modes
            tasks.append(Task(goal_case, "vag", dtype, GOAL_SHAPE, memory_only=not timed_goal))
    # Group by input set; small before big so that the progress bar moves early.
    order = {c.name: i for i, c in enumerate(cases)}
    tasks.sort(
        key=lambda t: (
            t.memory_only, t.case.make_inputs.__name__, _elements(t.shape),
            list(DTYPES).index(t.dtype),
            order[t.case.name], t.mode,
        )
    )  # fmt: skip
    return tasks


def _groups(tasks: Sequence[Task]) -> list[list[Task]]:
    """Consecutive tasks that share one set of inputs (same input builder, shape and dtype)."""
    groups: list[list[Task]] = []
    for task in tasks:
        key = _group_key(task)
        if groups and _group_key(groups[-1][0]) == key:
            groups[-1].append(task)
        else:
            groups.append([task])
    return groups


def _group_key(task: Task) -> tuple:
    return (task.memory_only, task.case.make_inputs, task.shape, task.dtype)


def _compile_async(pool: ThreadPoolExecutor, task: Task) -> dict[str, Future]:
    """Starts compiling every JAX implementation of ``task``; returns futures by name."""
    try:
        specs = harness.abstract_args(task.case, task.mode, task.dtype, task.shape)
    except Exception:  # reported when the benchmark itself runs
        return {}
    return {
        name: pool.submit(harness.compile_jax, task.case, fn, task.mode, specs)
        for name, fn in task.case.impls.items()
        if name != "torch"
    }


def _input_names(task: Task) -> set[str]:
    try:
        return harness.input_plan(task.case, task.mode, task.dtype, task.shape)[1]
    except Exception:  # the task reports its own error when it runs
        return set()


def _work(task: Task) -> int:
    """Rough cost: a compile-bound small benchmark is 1, plus 1 per 4 Mi logits elements."""
    if task.memory_only:
        return 1
    return 1 + _elements(task.case.logits_shape(task.shape)) // 2**22


def _elements(shape: Shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _versions() -> dict[str, str | None]:
    import jaxlib
    import numpy
    import optax

    import jaxloss

    versions: dict[str, str | None] = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "optax": optax.__version__,
        "numpy": numpy.__version__,
        "jaxloss": jaxloss.__version__,
    }
    # Read from the installed metadata: importing torch (seconds) only for its version is waste
    # when --no-torch leaves it out.
    try:
        versions["torch"] = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        versions["torch"] = None
    return versions


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


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


def _setup_torch(backend: str, threads: int | None) -> tuple[bool, int | None, str | None]:
    """Matches torch's intra-op threads to XLA's; returns (use torch, threads, why not)."""
    try:
        import torch
    except ImportError:
        return False, None, "torch not importable"
    if backend == "cpu":
        torch.set_num_threads(threads or _cpu_threads())
        return True, torch.get_num_threads(), None
    if backend in ("gpu", "cuda") and torch.cuda.is_available():
        return True, torch.get_num_threads(), None
    return False, None, f"torch cannot run on the {backend} backend here"


# Seconds per unit of :func:`_work` on a 2-core x86 VM: the full CPU grid (1634 units) took 446 s
# and --quick (110 units) 32 s on a quiet machine; a busy one took up to 1.6x as long.
_SECONDS_PER_WORK = 0.28
_SECONDS_PER_COMPILE_ONLY = 0.6
_BUSY_FACTOR = 1.6


def expected_seconds(tasks: Sequence[Task], quick: bool) -> float:
    """A quiet 2-core machine's wall time for ``tasks``, goal checks and start-up included."""
    timed = sum(_work(t) for t in tasks if not t.memory_only)
    compile_only = sum(_work(t) for t in tasks if t.memory_only)
    # --quick's paired goal checks at 4096x32768 (three goals, 7 or more rounds of two
    # value_and_grad calls each) took ~150 s at a load of 9.4 on 2 cores, ~32 s unloaded.
    goal_checks = 30.0 if quick else 20.0
    return 5.0 + goal_checks + _SECONDS_PER_WORK * timed + _SECONDS_PER_COMPILE_ONLY * compile_only


def _fmt_duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 100 else f"{seconds / 60:.0f} min"


def _announce(tasks: Sequence[Task], args: argparse.Namespace) -> None:
    """The plan's size and expected duration, on stderr before anything runs."""
    timed = sum(not t.memory_only for t in tasks)
    seconds = expected_seconds(tasks, args.quick)
    line = (
        f"{timed} benchmarks to time and {len(tasks) - timed} to compile only: expected "
        f"{_fmt_duration(seconds)} to {_fmt_duration(_BUSY_FACTOR * seconds)} on a 2-core CPU "
        "(quiet to busy)."
    )
    load, threads = _load_average(), _cpu_threads()
    if load is not None and load > threads:
        # Every process shares the cores: a 6x oversubscribed machine runs it about 6x slower.
        line += (
            f" The machine is busy now (1-min load {load:.1f} on {threads} cores): more like "
            f"{_fmt_duration(seconds * load / threads)}."
        )
    if not args.quick and not args.memory_only:
        line += f" For a first look, --quick took {QUICK_MEASURED}."
    print(line, file=sys.stderr, flush=True)


def _run_grid(
    tasks: Sequence[Task], settings: harness.Settings, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Compiles each group of tasks in parallel, then times its tasks one at a time."""
    from tqdm import tqdm

    records: list[dict[str, Any]] = []
    # Progress in units of estimated work, so that the ETA accounts for the big shapes at the end.
    bar = tqdm(
        total=sum(_work(t) for t in tasks),
        file=sys.stderr,
        disable=args.no_progress,
        bar_format="{l_bar}{bar}| [{elapsed}<{remaining}]{postfix}",
    )
    done = 0
    with ThreadPoolExecutor(max(1, min(args.compile_workers, 8))) as pool:
        for group in _groups(tasks):
            # Compile the whole group in parallel on abstract inputs (XLA releases the GIL),
            # then time it with nothing else running.
            compiling = {task.name: _compile_async(pool, task) for task in group}
            wait([f for futures in compiling.values() for f in futures.values()])
            # The input arrays each task reads, so that the ones no later task needs are freed.
            needs = [_input_names(task) for task in group]
            inputs = None
            for i, task in enumerate(group):
                done += 1
                bar.set_postfix_str(f"{done}/{len(tasks)} {task.name}", refresh=True)
                compiled = {k: f.result for k, f in compiling.pop(task.name).items()}
                if task.memory_only:
                    records.append(
                        harness.memory_only(task.case, task.mode, task.dtype, task.shape, compiled)
                    )
                    bar.update(_work(task))
                    continue
                if inputs is None:
                    inputs = task.case.make_inputs(task.shape, DTYPES[task.dtype])
                inputs.keep(set().union(*needs[i:]))
                record = harness.run_one(
                    task.case, task.mode, task.dtype, task.shape, inputs, settings, compiled
                )
                records.append(record)
                bar.update(_work(task))
            if inputs is not None:
                inputs.clear()  # the biggest shapes hold several arrays of 512 MiB
            del inputs
            gc.collect()
    bar.close()
    return records


def _goal_runner(case: Case, impl: str, dtype: str, *, goal: report.SpeedGoal) -> harness.Runner:
    inputs = case.make_inputs(goal.shape, DTYPES[dtype])
    args = jax.block_until_ready(harness.bench_args(case, goal.mode, inputs))
    runner = harness.jax_runner(f"{impl} {dtype}", case, case.impls[impl], goal.mode, args)
    runner.sample(1)  # compile-time effects and page faults out of the first sample
    runner.warm = True
    return runner


def quick_goals(cases: Sequence[Case], backend: str) -> set[str]:
    """The speed goals whose both sides a plain ``--quick`` run times (the rest need the full
    grid): what an N/A goal's note tells the user to run."""
    quick = build_parser().parse_args(["--quick"])
    timed = {
        (t.case.name, t.mode, t.dtype, t.shape)
        for t in plan(quick, cases, backend)
        if not t.memory_only
    }
    return {
        goal.id
        for goal in report.speed_goals()
        if all(
            (goal.case, goal.mode, dtype, goal.shape) in timed
            for _, dtype in (goal.numerator, goal.denominator)
        )
    }


def check_goals(
    records: Sequence[dict[str, Any]], cases: Sequence[Case], quick: bool
) -> dict[str, dict[str, Any]]:
    """A paired measurement, until its verdict is clear, of every speed goal the grid timed."""
    settings = harness.CheckSettings(
        max_rounds=15 if quick else 41, budget_s=4.0 if quick else 20.0
    )
    by_name = {c.name: c for c in cases}
    checks: dict[str, dict[str, Any]] = {}
    for goal in report.speed_goals():
        if goal.case not in by_name or not report.timed(records, goal):
            continue
        print(f"goal check: {goal.description}", file=sys.stderr, flush=True)
        case = by_name[goal.case]
        numerator = _goal_runner(case, *goal.numerator, goal=goal)
        denominator = _goal_runner(case, *goal.denominator, goal=goal)
        checks[goal.id] = harness.compare_until_clear(
            numerator, denominator, goal.threshold, settings
        )
        del numerator, denominator
        gc.collect()
    return checks


def _device_name(device: Any) -> str:
    """The processor model on CPU (XLA says only "cpu"), the device kind elsewhere."""
    if device.platform != "cpu":
        return device.device_kind
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _metadata(
    args: argparse.Namespace,
    argv: Sequence[str] | None,
    tasks: Sequence[Task],
    cases: Sequence[Case],
    torch_state: tuple[bool, int | None, str | None],
    settings: harness.Settings,
    load_before: float | None,
) -> dict[str, Any]:
    use_torch, torch_threads, torch_note = torch_state
    device = jax.devices()[0]
    filters = [f for f in args.filter.split(",") if f]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": jax.default_backend(),
        "device": f"{device.platform}: {_device_name(device)}",
        "device_kind": device.device_kind,
        "devices": [str(d) for d in jax.devices()],
        "host": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "cpu_threads_available": _cpu_threads(),
        },
        "versions": _versions(),
        "git_commit": _git_commit(),
        "argv": list(sys.argv[1:] if argv is None else argv),
        "quick": args.quick,
        "torch": {
            "used": use_torch,
            "num_threads": torch_threads,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "note": torch_note,
        },
        "xla_flags": os.environ.get("XLA_FLAGS"),
        # Other processes on the machine skew absolute timings (ratios less so: interleaved).
        "load_average_1min": {"start": load_before, "end": _load_average()},
        "settings": dataclasses.asdict(settings),
        "shapes": sorted({tuple(t.shape) for t in tasks}, key=_elements),
        "dtypes": sorted({t.dtype for t in tasks}),
        "byte_model": harness.BYTE_MODEL,
        "cases": {
            c.name: {"description": c.description, "peers": c.peer_note, "impls": list(c.impls)}
            for c in cases
            if _selected(c, filters)
        },
    }


def plot_title(meta: dict[str, Any]) -> str:
    """What ran where: device model, threads, versions, date (the plots and the table say it)."""
    versions = meta["versions"]
    device = meta["device"].split(": ", 1)[-1]
    if meta["backend"] == "cpu":
        device += f", {meta['host']['cpu_threads_available']} threads"
    peers = f"jax {versions['jax']}, optax {versions['optax']}"
    if meta["torch"]["used"]:
        peers += f", torch {versions['torch']}"
    quick = ", --quick" if meta["quick"] else ""
    return f"{device} (XLA:{meta['backend'].upper()}) · {peers} · {meta['date'][:10]}{quick}"


def _text(meta: dict[str, Any], records: Sequence[dict], goals: Sequence[dict], wide: bool) -> str:
    torch = meta["torch"]
    title = "\n".join(textwrap.wrap(plot_title(meta), 100, break_on_hyphens=False))
    heading = f"jaxloss benchmarks, {meta['date']}\n{title}\n" + (
        f"torch threads {torch['num_threads']}, OMP_WAIT_POLICY={torch['omp_wait_policy']}"
        if torch["used"]
        else f"no torch peers ({torch['note']})"
    )
    parts = [heading, report.format_table(records, wide=wide)]
    if wide:
        parts += ["byte model: " + harness.BYTE_MODEL, report.format_copy_floors(records)]
    text = "\n\n".join([*parts, report.format_goals(goals)])
    loads = [v for v in meta["load_average_1min"].values() if v is not None]
    busiest = max(loads, default=0.0)
    threads = meta["host"]["cpu_threads_available"]
    if meta["backend"] == "cpu" and busiest > 0.5 * threads:
        text += (
            f"\n\nnote: the machine was busy (1-min load average up to {busiest:.1f} on "
            f"{threads} cores): absolute times are\ninflated and noisy (ratios less so: paired "
            "rounds); multi-threaded torch suffers most."
        )
    return text + f"\n\nwall time {meta['wall_s']:.1f} s\n"


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the suite and returns the results payload (also printed and written)."""
    args = build_parser().parse_args(argv)
    if args.target:
        from benchmarks import compiled

        return compiled.run(args, argv)
    started = time.perf_counter()
    load_before = _load_average()
    backend = jax.default_backend()
    torch_state = (
        (False, None, "--no-torch") if args.no_torch else _setup_torch(backend, args.torch_threads)
    )
    cases = all_cases(include_torch=torch_state[0])
    tasks = plan(args, cases, backend)
    _announce(tasks, args)
    if args.dry_run:
        for task in tasks:
            print(f"{task.name}  {','.join(task.case.impls)}")
        seconds = expected_seconds(tasks, args.quick)
        print(f"expected: {_fmt_duration(seconds)} to {_fmt_duration(_BUSY_FACTOR * seconds)}")
        return {"tasks": [task.name for task in tasks]}
    settings = harness.settings_for(args.quick, args.repeats)
    if args.no_peer_check:
        settings = dataclasses.replace(settings, check=False)
    records = _run_grid(tasks, settings, args)
    checks = check_goals(records, cases, args.quick)
    goals = report.evaluate_goals(records, backend, checks, quick_times=quick_goals(cases, backend))
    meta = _metadata(args, argv, tasks, cases, torch_state, settings, load_before)
    payload = {"meta": meta, "results": records, "goals": goals}
    meta["wall_s"] = time.perf_counter() - started
    print(_text(meta, records, goals, wide=args.wide))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.txt").write_text(_text(meta, records, goals, wide=True))
    if not args.no_plots:
        plots = report.write_plots(args.out, records, plot_title(meta))
        meta["plots"] = [p.name for p in plots]
    report.write_json(args.out / "results.json", payload)
    written = "results.json and table.txt (every column)"
    if meta.get("plots"):
        written = f"results.json, table.txt (every column) and {len(meta['plots'])} PNG plots"
    print(f"wrote {written} to {args.out}/ (--out DIR to change)", file=sys.stderr)
    return payload


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks``; with ``--fail-on-goal``, exit status 1 when a goal FAILs."""
    args = build_parser().parse_args(argv)
    payload = run(argv)
    failed = [g["id"] for g in payload.get("goals", ()) if g["status"] == "FAIL"]
    if args.fail_on_goal and failed:
        print(f"--fail-on-goal: goals failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
