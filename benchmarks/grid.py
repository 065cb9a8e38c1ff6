"""The timed grid as pytest-benchmark tests, one per (benchmark, implementation).

``python -m benchmarks`` sets :data:`PLAN` and runs this module through pytest: pytest-benchmark
calibrates, takes the rounds, computes the statistics and writes ``pytest-benchmark.json``; its
options after ``--`` (``--benchmark-save``, ``--benchmark-compare``) compare with a saved run.
``python -m pytest benchmarks/grid.py -o addopts=`` runs the ``--quick`` grid. Each
implementation is compiled first (temporaries and kernels read) and checked against jaxloss.
The timer (:func:`wait_then_time`) waits for the work dispatched so far, then reads the clock:
a round of ``n`` calls is ``n`` asynchronous dispatches and one wait, as in a training loop.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import pytest

from benchmarks import cases, hlo

BYTE_MODEL = "min_bytes = bytes of every input read once + every output written once."


@dataclasses.dataclass(frozen=True)
class Task:
    case: cases.Case
    mode: str
    dtype: str
    shape: cases.Shape
    memory_only: bool = False  # compiled for its temporaries and kernels, not timed

    @property
    def name(self) -> str:
        kind = f"{self.mode}-mem" if self.memory_only else self.mode
        return f"{self.case.name}/{kind}/{self.dtype}/{'x'.join(map(str, self.shape))}"

    @property
    def logits_bytes(self) -> int:
        return self.shape[0] * self.shape[-1] * jnp.dtype(cases.DTYPES[self.dtype]).itemsize


PLAN: list[Task] = []  # set by benchmarks.cli; empty: the --quick grid
CHECK = True  # compare every peer's output with jaxloss's before timing it
ERRORS: dict[tuple[str, str], str] = {}  # (benchmark, implementation) -> why it did not run
_pending: list[Any] = [None]
_state: dict[str, Any] = {}


def wait_then_time() -> float:
    """pytest-benchmark's timer: see the module doc."""
    jax.block_until_ready(_pending[0])
    return time.perf_counter()


pytestmark = pytest.mark.benchmark(timer=wait_then_time)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if not PLAN:
        from benchmarks import cli

        PLAN[:] = cli.plan(cli.parse(["--quick"])[0], jax.default_backend())
    found = [(t, impl) for t in PLAN if not t.memory_only for impl in t.case.impls]
    metafunc.parametrize(("task", "impl"), found, ids=[f"{t.name}/{i}" for t, i in found])


def _inputs(task: Task) -> cases.Inputs:
    """The current size's arrays, less those no later benchmark of that size reads."""
    if _state.get("group") != (task.shape, task.dtype):
        _state.clear()
        inputs = cases.Inputs(task.shape, cases.DTYPES[task.dtype])
        _state.update(group=(task.shape, task.dtype), inputs=inputs)
    later = [t for t in PLAN[PLAN.index(task) :] if (t.shape, t.dtype) == _state["group"]]
    _state["inputs"].keep(set().union(*(cases.arg_names(t.case, t.mode) for t in later)))
    return _state["inputs"]


def _torch_call(task: Task, fn: Callable, args: tuple) -> Callable[[], Any]:
    """PyTorch eager on zero-copy DLPack views of the JAX arrays."""
    import torch

    tensors, f = [torch.from_dlpack(a) for a in args], cases.objective(task.case, fn, task.mode)
    if task.mode == "fwd":
        return lambda: f(*tensors)
    wrt = (task.case.argnums,) if isinstance(task.case.argnums, int) else task.case.argnums
    for i in wrt:
        tensors[i] = tensors[i].detach().requires_grad_(True)

    def call() -> Any:
        loss = f(*tensors)
        return (loss, *torch.autograd.grad(loss, [tensors[i] for i in wrt]))

    return call


def compile_info(compiled: Any) -> dict[str, Any]:
    """Temporary bytes (``memory_analysis()``) and entry kernels of an executable."""
    try:
        temp = int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # a backend without the analysis
        temp = None
    return {"temp_bytes": temp, "hlo_ops": hlo.entry_traffic(compiled.as_text()).ops}


@jax.jit
def _relative_error(a: jax.Array, b: jax.Array) -> jax.Array:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), jnp.finfo(jnp.float32).tiny)


def relative_error(out: Any, reference: Any) -> float:
    """Largest per-leaf ``max|a - b| / max|b|`` between two outputs of the same structure."""
    to_jax = lambda x: jnp.from_dlpack(x.detach()) if hasattr(x, "detach") else jnp.asarray(x)
    a, b = (list(map(to_jax, jax.tree.leaves(o))) for o in (out, reference))
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b, strict=True)):
        return math.inf
    return max((float(_relative_error(x, y)) for x, y in zip(a, b, strict=True)), default=0.0)


def test_time(benchmark: Any, task: Task, impl: str) -> None:
    """Compiles (compile time, temporaries, kernels), checks against jaxloss, then times."""
    try:
        names = cases.arg_names(task.case, task.mode)
        args = jax.block_until_ready(tuple(_inputs(task)[n] for n in names))
        fn, info = task.case.impls[impl], {}
        if impl == "torch":
            call = _torch_call(task, fn, args)
        else:
            started = time.perf_counter()
            compiled = jax.jit(cases.jax_function(task.case, fn, task.mode)).lower(*args).compile()
            info = {"compile_s": time.perf_counter() - started, **compile_info(compiled)}
            call = lambda: compiled(*args)
        out = jax.block_until_ready(call())  # the first call also pays page faults: not timed
    except Exception as err:
        ERRORS[task.name, impl] = f"{type(err).__name__}: {err}"[:300]
        raise
    if impl == "jaxloss":
        _state["reference"] = out
    elif CHECK and "reference" in _state:
        info["agreement"] = relative_error(out, _state["reference"])
    benchmark.group = task.name
    benchmark.extra_info.update(benchmark=task.name, impl=impl, **info)

    def timed() -> None:
        _pending[0] = call()

    benchmark(timed)
    _pending[0] = None


def _nbytes(tree: Any) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def base_record(task: Task) -> dict[str, Any]:
    case, shape = task.case, task.shape
    specs = cases.abstract_args(case, task.mode, task.dtype, shape)
    outputs = jax.eval_shape(cases.jax_function(case, case.impls["jaxloss"], task.mode), *specs)
    return {
        "name": task.name.replace("-mem", ""), "case": case.name, "mode": task.mode,
        "dtype": task.dtype, "shape": list(shape),
        "shape_names": ["N", "D", "V"] if len(shape) == 3 else ["N", "C"],
        "elements": shape[0] * shape[-1], "logits_bytes": task.logits_bytes,
        "memory_only": task.memory_only, "min_bytes": _nbytes(specs) + _nbytes(outputs),
        "impls": {name: {} for name in case.impls}, "agreement": {},
    }  # fmt: skip


def records(plan: list[Task], saved: dict[str, Any]) -> list[dict[str, Any]]:
    """results.json's records of the timed tasks from pytest-benchmark's JSON and :data:`ERRORS`."""
    stats = {(b["extra_info"]["benchmark"], b["extra_info"]["impl"]): b
             for b in saved["benchmarks"]}  # fmt: skip
    found = []
    for task in (t for t in plan if not t.memory_only):
        record = base_record(task)
        for impl, entry in record["impls"].items():
            if (task.name, impl) in ERRORS:
                entry["error"] = ERRORS[task.name, impl]
            if (b := stats.get((task.name, impl))) is not None:
                info = {k: v for k, v in b["extra_info"].items() if k not in ("benchmark", "impl")}
                if "agreement" in info:
                    record["agreement"][impl] = info.pop("agreement")
                st = b["stats"]
                entry.update(info, median_s=st["median"], min_s=st["min"], iqr_s=st["iqr"],
                             rounds=st["rounds"], calls_per_round=st["iterations"],
                             elements_per_s=record["elements"] / st["median"],
                             bytes_per_s=record["min_bytes"] / st["median"])  # fmt: skip
        record["tolerance"] = task.case.tolerance.get(task.dtype, 1e-2)
        record["agrees"] = all(e <= record["tolerance"] for e in record["agreement"].values())
        finish_record(record)
        found.append(record)
    return found


def finish_record(record: dict[str, Any]) -> None:
    """Temporaries over logits bytes; time ratios (of medians) to optax and of jaxloss to the
    other implementations."""
    impls = record["impls"]
    for entry in impls.values():
        temp = entry.get("temp_bytes")
        entry["temp_ratio"] = None if temp is None else temp / record["logits_bytes"]
    medians = {k: e["median_s"] for k, e in impls.items() if e.get("median_s")}
    jl, ox = medians.get("jaxloss"), medians.get("optax")
    record["ratio_to_optax"] = {k: t / ox for k, t in medians.items() if ox and k != "optax"}
    record["jaxloss_ratio_to"] = {k: jl / t for k, t in medians.items() if jl and k != "jaxloss"}
    record["repeats"] = min((e.get("rounds", 0) for e in impls.values()), default=0)
