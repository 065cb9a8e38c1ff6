"""How things are timed: compile once, warm up, calibrate, then interleave the peers.

Every implementation of a benchmark is compiled once (``jax.jit(f).lower(*args).compile()``,
which also yields the compiled temporary memory), called once to warm up, and calibrated so that
one sample lasts at least ``min_sample_s`` (small shapes run several calls back to back, then
block once). The samples are then taken round-robin: jaxloss, optax, torch, jaxloss, ... so that
a burst of load from other processes hits every peer alike and the ratios hold on a noisy
machine. The reported time is the median sample divided by the calls per sample.

Byte model (the "copy floor"): the least memory traffic of a function is reading each input once
and writing each output once; for forward + backward the outputs include the gradient, so a
cross-entropy forward reads the logits once and its value_and_grad reads them once and writes the
gradient once. The bandwidth comes from a jitted ``x * s`` of the logits (``s`` a runtime scalar,
so XLA can neither elide nor fold it), donated so that it runs in place. A function returning a
fresh logits-sized array (a gradient, softmax's output) also pays for a new buffer: on CPU the
page faults of a fresh 512 MiB output cost about as much as the copy itself, so the same ``x * s``
is timed into a fresh buffer and the difference is charged per fresh output byte. ``floor_s`` is
the resulting speed of light and ``copy_fraction = floor_s / t`` (1.0: as fast as a copy). Both
copies join the round-robin of every benchmark they apply to, so the floor is paired with the
timings like the peers are.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.cases import DTYPES, Case, Shape

BYTE_MODEL = (
    "min_bytes = bytes of every input read once + every output written once (forward reads "
    "the logits (and targets) once; value_and_grad also writes the gradient once). Bandwidth "
    "= 2 x logits_bytes / t(x * s in place, donated; s a runtime scalar so XLA cannot elide "
    "it). A fresh array output (the gradient, softmax's output) also pays t(x * s into a new "
    "buffer) - t(in place) per logits_bytes: page faults on CPU. floor_s = min_bytes / "
    "bandwidth + fresh_output_bytes x that price; copy_fraction = median over rounds of "
    "floor_s / t, both copies timed in the same rounds as the functions (1 = speed of light); "
    "only for logits >= 8 MiB."
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Timing knobs; see :func:`settings_for`."""

    min_sample_s: float  # a sample runs calls back to back until it lasts this long
    max_calls: int  # ... but never more calls than this per sample
    min_repeats: int
    max_repeats: int
    budget_s: float  # target seconds of samples per benchmark, between the repeat bounds
    check: bool = True  # compare every peer's output with jaxloss's before timing


def settings_for(quick: bool, repeats: int | None = None) -> Settings:
    """Full runs take more and longer samples; ``repeats`` pins the repeat count."""
    if quick:
        s = Settings(min_sample_s=0.004, max_calls=2000, min_repeats=3, max_repeats=5, budget_s=0.2)
    else:
        s = Settings(min_sample_s=0.02, max_calls=5000, min_repeats=3, max_repeats=9, budget_s=1.5)
    if repeats is not None:
        s = dataclasses.replace(s, min_repeats=repeats, max_repeats=repeats)
    return s


# ----------------------------------------------------------------------------------------------
# Runners: one per implementation, each a "do `number` calls and wait" function.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Runner:
    """A prepared implementation: ``call()`` runs it once, ``wait(out)`` blocks on its result."""

    name: str
    call: Callable[[], Any]
    wait: Callable[[Any], Any]
    temp_bytes: int | None = None
    compile_s: float | None = None
    hlo_ops: dict[str, int] | None = None
    number: int = 1
    warm: bool = False  # called at least once since compilation
    times: list[float] = dataclasses.field(default_factory=list)

    def sample(self, number: int) -> float:
        """Seconds per call over ``number`` back-to-back calls (one wait at the end)."""
        out = None
        start = time.perf_counter()
        for _ in range(number):
            out = self.call()
        self.wait(out)
        return (time.perf_counter() - start) / number


_HLO_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?:\([^=]*?\)|\S+)\s+([a-z][\w\-]*)\(", re.MULTILINE
)
_FREE_OPS = frozenset(
    {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "copy-start", "copy-done"}
)


def entry_ops(compiled: Any) -> dict[str, int] | None:
    """Opcode counts of the optimised entry computation (each fusion is one kernel launch on
    CPU, which dominates small shapes); None when the text cannot be read."""
    try:
        text = compiled.as_text()
        entry = text[text.index("ENTRY") :]
        body = entry[entry.index("{") + 1 : entry.index("\n}")]
    except Exception:
        return None
    counts: dict[str, int] = {}
    for op in _HLO_INSTRUCTION.findall(body):
        if op not in _FREE_OPS:
            counts[op] = counts.get(op, 0) + 1
    return counts


def temp_size(compiled: Any) -> int | None:
    """``temp_size_in_bytes`` of a compiled executable, None where the backend has no analysis."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # some backends raise NotImplemented/XlaRuntimeError
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    value = getattr(analysis, "temp_size_in_bytes", None)
    return None if value is None else int(value)


def objective(case: Case, fn: Callable, mode: str, xp: str = "jax") -> Callable:
    """The function timed for ``mode``: the loss itself, or a scalar to differentiate.

    Array-valued functions are differentiated through ``sum(f(x) * cotangent)``, the cotangent
    being the last argument, so their backward pass does the work a real model's would.
    """
    if case.scalar or mode == "fwd":
        return fn
    if xp == "torch":
        return lambda *a: (fn(*a[:-1]) * a[-1]).sum()
    return lambda *a: jnp.sum(fn(*a[:-1]) * a[-1])


def argnums_tuple(case: Case) -> tuple[int, ...]:
    return (case.argnums,) if isinstance(case.argnums, int) else tuple(case.argnums)


def jax_function(case: Case, fn: Callable, mode: str) -> Callable:
    """The jitted-to-be function for a JAX implementation and mode."""
    f = objective(case, fn, mode)
    return f if mode == "fwd" else jax.value_and_grad(f, argnums=case.argnums)


def compile_jax(case: Case, fn: Callable, mode: str, args: Sequence[Any]) -> tuple[Any, float]:
    """Lowers and compiles once; ``args`` may be arrays or ``jax.ShapeDtypeStruct``."""
    start = time.perf_counter()
    compiled = jax.jit(jax_function(case, fn, mode)).lower(*args).compile()
    return compiled, time.perf_counter() - start


def abstract_args(case: Case, mode: str, dtype_name: str, shape: Shape) -> tuple[Any, ...]:
    """``jax.ShapeDtypeStruct`` of the arguments: compiles without allocating anything."""
    return input_plan(case, mode, dtype_name, shape)[0]


def input_plan(
    case: Case, mode: str, dtype_name: str, shape: Shape
) -> tuple[tuple[Any, ...], set[str]]:
    """The abstract arguments and the names of the :class:`Inputs` arrays passed to the case.

    Arrays only derived from (``logits`` for ``log_probs``) are not named: inputs are
    deterministic, so a dropped one is rebuilt identically if it is needed again.
    """
    direct: set[str] = set()

    def build() -> tuple[Any, ...]:
        inputs = case.make_inputs(shape, DTYPES[dtype_name])
        args = bench_args(case, mode, inputs)
        direct.update(inputs.names_of(args))
        return args

    return jax.eval_shape(build), direct


def jax_runner(
    name: str,
    case: Case,
    fn: Callable,
    mode: str,
    args: Sequence[Any],
    precompiled: tuple[Any, float] | None = None,
) -> Runner:
    compiled, compile_s = precompiled or compile_jax(case, fn, mode, args)
    return Runner(
        name,
        lambda: compiled(*args),
        jax.block_until_ready,
        temp_size(compiled),
        compile_s,
        entry_ops(compiled),
    )


def torch_runner(case: Case, fn: Callable, mode: str, args: Sequence[jax.Array]) -> Runner:
    """PyTorch eager on zero-copy DLPack views of the JAX arrays (same device)."""
    import torch

    tensors = [torch.from_dlpack(a) for a in args]
    sync = torch.cuda.synchronize if tensors[0].is_cuda else (lambda: None)

    def wait(_: Any) -> None:
        sync()

    f = objective(case, fn, mode, xp="torch")
    if mode == "fwd":

        def call() -> Any:
            with torch.no_grad():
                return f(*tensors)

        return Runner("torch", call, wait)

    wrt = argnums_tuple(case)
    for i in wrt:
        tensors[i] = tensors[i].detach().requires_grad_(True)

    def call_vag() -> Any:
        loss = f(*tensors)
        return (loss, *torch.autograd.grad(loss, [tensors[i] for i in wrt]))

    return Runner("torch", call_vag, wait)


# ----------------------------------------------------------------------------------------------
# Agreement between implementations (peers must compute the same thing to be compared).
# ----------------------------------------------------------------------------------------------


@jax.jit
def _relative_error(a: jax.Array, b: jax.Array) -> jax.Array:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(b)), jnp.finfo(jnp.float32).tiny)
    return jnp.max(jnp.abs(a - b)) / scale


def _leaves(out: Any) -> list[jax.Array]:
    leaves = []
    for leaf in jax.tree.leaves(out):
        if type(leaf).__module__.startswith("torch"):
            leaf = jnp.from_dlpack(leaf.detach())
        leaves.append(jnp.asarray(leaf))
    return leaves


def relative_error(out: Any, reference: Any) -> float:
    """Largest per-leaf ``max|a - b| / max|b|`` between two outputs of the same structure."""
    a, b = _leaves(out), _leaves(reference)
    if len(a) != len(b):
        return math.inf
    errors = [
        math.inf if x.shape != y.shape else float(_relative_error(x, y))
        for x, y in zip(a, b, strict=True)
    ]
    return max(errors, default=0.0)


# ----------------------------------------------------------------------------------------------
# One benchmark.
# ----------------------------------------------------------------------------------------------


# x * s with s a runtime scalar: XLA can neither elide nor fold it. Donated, it runs in place
# (pure bandwidth); not donated, every call also faults in a fresh output buffer, which on CPU
# costs as much as the copy itself for big arrays.
_SCALE_IN_PLACE = jax.jit(lambda x, s: x * s, donate_argnums=0)
_SCALE = jax.jit(lambda x, s: x * s)


# Below this many logits bytes a copy measures dispatch and caches, not memory: no floor.
COPY_FLOOR_MIN_BYTES = 8 * 2**20


def copy_runners(source: jax.Array) -> list[Runner]:
    """``x * s`` on an array like ``source``: in place (donated) and into a fresh buffer."""
    s = jnp.asarray(1, source.dtype)
    state = {"x": jax.block_until_ready(jnp.ones(source.shape, source.dtype))}

    def in_place() -> jax.Array:
        state["x"] = _SCALE_IN_PLACE(state["x"], s)
        return state["x"]

    return [
        Runner("copy_in_place", in_place, jax.block_until_ready),
        Runner("copy_fresh", lambda: _SCALE(source, s), jax.block_until_ready),
    ]


def floor_per_round(
    in_place: Sequence[float], fresh: Sequence[float], nbytes: int, min_bytes: int, fresh_bytes: int
) -> np.ndarray:
    """The speed-of-light time of each round from that round's two copies (see module doc)."""
    in_place, fresh = np.asarray(in_place), np.asarray(fresh)
    bandwidth = 2 * nbytes / in_place
    fresh_price = np.maximum(fresh - in_place, 0) / nbytes  # seconds per fresh output byte
    return min_bytes / bandwidth + fresh_bytes * fresh_price


def _calibrate(runner: Runner, settings: Settings) -> float:
    """Warms up (unless already called) and sets the calls per sample; returns one call's time."""
    if not runner.warm:
        runner.sample(1)  # page faults, lazy initialisation
    t = runner.sample(1)
    runner.number = int(min(settings.max_calls, max(1, math.ceil(settings.min_sample_s / t))))
    return t


def _time_runners(runners: list[Runner], settings: Settings) -> int:
    """Warm-up, calibration and round-robin sampling; returns the repeat count used."""
    calibration = [_calibrate(r, settings) for r in runners]
    per_round = sum(t * r.number for t, r in zip(calibration, runners, strict=True))
    repeats = int(settings.budget_s / max(per_round, 1e-9))
    repeats = max(settings.min_repeats, min(settings.max_repeats, repeats))
    done = 0
    if all(r.number == 1 for r in runners):
        # Slow calls (big shapes): the calibration round, taken in the same round-robin order
        # after a warm-up, is already the first sample.
        for t, r in zip(calibration, runners, strict=True):
            r.times.append(t)
        done = 1
    for k in range(repeats - done):
        # Rotated order: no implementation always runs right after the same neighbour (whose
        # threads or caches it would otherwise inherit in every round).
        shift = (k + done) % len(runners)
        for r in runners[shift:] + runners[:shift]:
            r.times.append(r.sample(r.number))
    return repeats


def _nbytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def bench_args(case: Case, mode: str, inputs: Any) -> tuple[Any, ...]:
    """The arguments of ``case`` in ``mode`` (array-valued functions add a cotangent)."""
    args = tuple(case.inputs(inputs))
    if mode == "vag" and not case.scalar:
        args = (*args, inputs.cotangent())
    return args


def run_one(
    case: Case,
    mode: str,
    dtype_name: str,
    shape: Shape,
    inputs: Any,
    settings: Settings,
    compiled: dict[str, Callable[[], tuple[Any, float]]] | None = None,
) -> dict[str, Any]:
    """Compiles, checks and times every implementation of ``case`` at one point of the grid.

    ``compiled`` maps implementation names to thunks returning ``(executable, compile seconds)``
    (e.g. ``Future.result`` of a compilation started in parallel); the rest compile here.
    """
    started = time.perf_counter()
    compiled = compiled or {}
    args = jax.block_until_ready(bench_args(case, mode, inputs))
    record = base_record(case, mode, dtype_name, shape)
    outputs = jax.eval_shape(jax_function(case, case.impls["jaxloss"], mode), *args)
    record["min_bytes"] = _nbytes(args) + _nbytes(outputs)
    record["fresh_output_bytes"] = _nbytes([x for x in jax.tree.leaves(outputs) if x.ndim])
    runners: list[Runner] = []
    reference = None
    for name, fn in case.impls.items():
        entry = record["impls"].setdefault(name, {})
        try:
            if name == "torch":
                runner = torch_runner(case, fn, mode, args)
            else:
                pre = compiled[name]() if name in compiled else None
                runner = jax_runner(name, case, fn, mode, args, pre)
            out = runner.call()
            runner.wait(out)
            runner.warm = True
        except Exception as err:  # a peer that cannot run is reported, not fatal
            entry["error"] = f"{type(err).__name__}: {err}"[:300]
            continue
        entry.update(
            temp_bytes=runner.temp_bytes, compile_s=runner.compile_s, hlo_ops=runner.hlo_ops
        )
        if settings.check:
            if reference is None:
                reference = out
            else:
                record["agreement"][name] = relative_error(out, reference)
        del out
        runners.append(runner)
    del reference
    tolerance = case.tolerance.get(dtype_name, 1e-2)
    record["agrees"] = all(e <= tolerance for e in record["agreement"].values())
    record["tolerance"] = tolerance
    # The copy floor runs in the same rounds as the implementations, so that a change of load
    # on the machine moves the floor and the timings together.
    floor_runners = []
    if runners and case.memory_bound and record["logits_bytes"] >= COPY_FLOOR_MIN_BYTES:
        source = args[0] if args[0].shape == case.logits_shape(shape) else None
        if source is not None:
            floor_runners = copy_runners(source)
    record["repeats"] = _time_runners(runners + floor_runners, settings) if runners else 0
    floor = _record_floor(record, floor_runners)
    record["floor_s"] = None if floor is None else float(np.median(floor))
    _record_times(record, runners, floor)
    finish_record(record)
    record["wall_s"] = time.perf_counter() - started
    return record


def _record_times(
    record: dict[str, Any], runners: Sequence[Runner], floor: np.ndarray | None
) -> None:
    """Each implementation's samples, their median and its rates and copy fraction."""
    for runner in runners:
        median = float(np.median(runner.times))
        entry = record["impls"][runner.name]
        entry.update(
            median_s=median,
            min_s=float(np.min(runner.times)),
            times_s=[float(t) for t in runner.times],
            calls_per_sample=runner.number,
            elements_per_s=record["elements"] / median,
            bytes_per_s=record["min_bytes"] / median,
            copy_fraction=(
                None if floor is None else float(np.median(floor / np.asarray(runner.times)))
            ),
        )


def _record_floor(record: dict[str, Any], floor_runners: Sequence[Runner]) -> np.ndarray | None:
    """The copy floor of each timed round (None without copies); records the copies' times."""
    if not floor_runners:
        return None
    in_place, fresh = (r.times for r in floor_runners)
    record["copy"] = {
        "in_place_s": float(np.median(in_place)),
        "fresh_output_s": float(np.median(fresh)),
        "bytes_per_s": 2 * record["logits_bytes"] / float(np.median(in_place)),
        # Per round, in the rounds of the implementations' ``times_s``: floor_s and each
        # copy_fraction can be recomputed from the JSON alone.
        "in_place_times_s": [float(t) for t in in_place],
        "fresh_output_times_s": [float(t) for t in fresh],
    }
    return floor_per_round(
        in_place, fresh, record["logits_bytes"], record["min_bytes"], record["fresh_output_bytes"]
    )


def base_record(case: Case, mode: str, dtype_name: str, shape: Shape) -> dict[str, Any]:
    logits_shape = case.logits_shape(shape)
    itemsize = jnp.dtype(DTYPES[dtype_name]).itemsize
    return {
        "name": f"{case.name}/{mode}/{dtype_name}/{'x'.join(map(str, shape))}",
        "case": case.name,
        "mode": mode,
        "dtype": dtype_name,
        "shape": list(shape),
        "shape_names": list(case.shape_names),
        "elements": int(np.prod(logits_shape)),
        "logits_bytes": int(np.prod(logits_shape)) * itemsize,
        "memory_only": False,
        "impls": {name: {} for name in case.impls},
        "agreement": {},
    }


def paired_ratio(times: Sequence[float], base: Sequence[float]) -> float:
    """Median over rounds of ``times[i] / base[i]``: both were sampled in the same round, so a
    burst of load from other processes cancels out of each ratio."""
    return float(np.median(np.asarray(times) / np.asarray(base)))


def finish_record(record: dict[str, Any]) -> None:
    """Adds the temp-memory ratios and the time ratios to optax."""
    for entry in record["impls"].values():
        temp = entry.get("temp_bytes")
        entry["temp_ratio"] = None if temp is None else temp / record["logits_bytes"]
    jl = record["impls"].get("jaxloss", {})
    # jaxloss against every other implementation (e.g. the materialised linear cross-entropy).
    record["jaxloss_ratio_to"] = {
        name: paired_ratio(jl["times_s"], e["times_s"])
        for name, e in record["impls"].items()
        if name != "jaxloss"
        and jl.get("times_s")
        and len(e.get("times_s", ())) == len(jl["times_s"])
    }
    base = record["impls"].get("optax", {})
    record["ratio_to_optax"], record["ratio_of_medians"] = {}, {}
    for name, e in record["impls"].items():
        if name == "optax" or not e.get("median_s") or not base.get("median_s"):
            continue
        record["ratio_of_medians"][name] = e["median_s"] / base["median_s"]
        paired = len(e["times_s"]) == len(base["times_s"])
        record["ratio_to_optax"][name] = (
            paired_ratio(e["times_s"], base["times_s"])
            if paired
            else record["ratio_of_medians"][name]
        )


def memory_only(
    case: Case,
    mode: str,
    dtype_name: str,
    shape: Shape,
    compiled: dict[str, Callable[[], tuple[Any, float]]] | None = None,
) -> dict[str, Any]:
    """Compiles every JAX implementation on abstract inputs (nothing allocated) for temp memory."""
    started = time.perf_counter()
    compiled = compiled or {}
    specs = abstract_args(case, mode, dtype_name, shape)
    record = base_record(case, mode, dtype_name, shape)
    record["memory_only"] = True
    for name, fn in case.impls.items():
        if name == "torch":
            record["impls"].pop(name)
            continue
        entry = record["impls"][name]
        try:
            executable, compile_s = (
                compiled[name]() if name in compiled else compile_jax(case, fn, mode, specs)
            )
        except Exception as err:
            entry["error"] = f"{type(err).__name__}: {err}"[:300]
            continue
        entry.update(
            temp_bytes=temp_size(executable), compile_s=compile_s, hlo_ops=entry_ops(executable)
        )
    finish_record(record)
    record["wall_s"] = time.perf_counter() - started
    return record


# ----------------------------------------------------------------------------------------------
# Goal checks: a paired comparison sampled until its verdict is clear.
# ----------------------------------------------------------------------------------------------


def median_interval(
    values: Sequence[float], confidence: float = 0.95
) -> tuple[float, float] | None:
    """Distribution-free interval for the median: order statistics ``x_(k)``, ``x_(n+1-k)``.

    ``k`` is the largest rank with ``P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2``, so the
    interval holds the true median with at least ``confidence`` whatever the noise distribution
    (a sign test; load bursts give heavy tails that a normal interval would understate). None
    when ``n`` is too small for any such interval (n < 6 at 95 %).
    """
    x = sorted(values)
    n = len(x)
    tail, k = 0.0, 0
    for j in range(n + 1):
        tail += math.comb(n, j) / 2**n
        if tail > (1 - confidence) / 2:
            break
        k = j + 1
    return None if k == 0 else (x[k - 1], x[n - k])


@dataclasses.dataclass(frozen=True)
class CheckSettings:
    """How long a goal check may sample: see :func:`compare_until_clear`."""

    min_sample_s: float = 0.05  # long samples average a microsecond call over many calls
    min_rounds: int = 7
    max_rounds: int = 41
    budget_s: float = 20.0


def _calibrate_long(runner: Runner, min_sample_s: float) -> None:
    """Calls per sample such that one sample lasts ``min_sample_s``, measured on whole samples
    (a single call's time includes the dispatch that back-to-back calls overlap)."""
    runner.number = 1
    while (elapsed := runner.sample(runner.number) * runner.number) < min_sample_s:
        runner.number = max(
            runner.number + 1, math.ceil(1.2 * runner.number * min_sample_s / elapsed)
        )


def compare_until_clear(
    numerator: Runner, denominator: Runner, threshold: float, settings: CheckSettings
) -> dict[str, Any]:
    """Samples ``numerator / denominator`` in paired rounds until the goal's verdict is clear.

    Each round times both runners back to back (alternating which goes first) and records their
    ratio, so load from other processes hits both. After ``min_rounds``, and after every round
    from then on, the 95 % interval of the median ratio (:func:`median_interval`) is compared
    with ``threshold``: wholly below is PASS, wholly above is FAIL. A ratio near the threshold
    keeps sampling until ``max_rounds`` or ``budget_s``, then is INCONCLUSIVE: a verdict that
    the noise cannot flip, rather than a coin toss.
    """
    for runner in (numerator, denominator):
        _calibrate_long(runner, settings.min_sample_s)
    started = time.perf_counter()
    times: dict[str, list[float]] = {"numerator": [], "denominator": []}
    verdict, interval = "INCONCLUSIVE", None
    for k in range(settings.max_rounds):
        pair = [("numerator", numerator), ("denominator", denominator)]
        for key, runner in pair if k % 2 == 0 else pair[::-1]:
            times[key].append(runner.sample(runner.number))
        ratios = [a / b for a, b in zip(times["numerator"], times["denominator"], strict=True)]
        if k + 1 < settings.min_rounds:
            continue
        interval = median_interval(ratios)
        if interval is not None and interval[1] <= threshold:
            verdict = "PASS"
        elif interval is not None and interval[0] > threshold:
            verdict = "FAIL"
        if verdict != "INCONCLUSIVE" or time.perf_counter() - started > settings.budget_s:
            break
    ratios = [a / b for a, b in zip(times["numerator"], times["denominator"], strict=True)]
    return {
        "verdict": verdict,
        "ratio": float(np.median(ratios)),
        "interval": None if interval is None else [float(interval[0]), float(interval[1])],
        "rounds": len(ratios),
        "ratios": [float(r) for r in ratios],
        "numerator_s": float(np.median(times["numerator"])),
        "denominator_s": float(np.median(times["denominator"])),
        "calls_per_sample": [numerator.number, denominator.number],
        "seconds": time.perf_counter() - started,
    }
