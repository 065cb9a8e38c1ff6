"""One process of a two-process JAX cluster on this machine, run by ``tests/test_multiprocess.py``.

Each process owns 2 CPU devices; ``jax.distributed`` joins them into one 4-device runtime with
gloo collectives, and a ``(2, 2)`` mesh (axes ``data`` × ``model``) spans both processes::

    XLA_FLAGS=--xla_force_host_platform_device_count=2 \
        python tests/multiprocess_worker.py --port PORT --process-id I [CASE ...]

``--mode checks`` (default) runs every case in ``CASES``: each builds global arrays with
``jax.make_array_from_callback`` (every process fills only its own shards), runs a jitted
value-and-gradient function on them, gathers the results with ``process_allgather`` and compares
them with the same function run unsharded on this process's first device. One JSON line per case
(``case``, ``process``, ``ok``, ``message``), all cases in one launch.

``--mode fault --fault-victim K`` prints ``READY`` once the cluster has run a collective; then
process K sleeps (the harness kills it) while the other waits in a cross-process all-reduce that
cannot complete.

Layouts on the mesh: ``batch`` splits rows over all 4 devices (both processes), ``classes``
splits the class axis over all 4 devices, ``both`` splits rows over ``data`` (across processes)
and classes over ``model`` (within a process).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import traceback
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from distillation_sharding_checks import DISTILLATION_KINDS, distillation_data, distillation_fn
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from sharding_problems import (
    AXES,
    LAYOUTS,
    LINEAR_KINDS,
    D,
    N,
    V,
    bce_with_logits,
    compare,
    cross_entropy_index,
    cross_entropy_probs,
    global_array,
    linear_args,
    linear_axes,
    linear_fn,
    nll,
    sharded,
    unsharded,
)

import jaxloss
from benchmarks.hlo import all_gather_shapes

NUM_PROCESSES = 2
LOCAL_DEVICES = 2
# A process that sends no heartbeat this long is declared dead (JAX's default: 100 s). Not too
# short for the checks: on a loaded machine a starved but healthy process must not be killed.
HEARTBEAT_TIMEOUT_S = 30


def to_host(tree):
    """Every leaf as a full numpy array on every process (gathering non-addressable shards)."""
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def on_host(mesh: Mesh, layout: str, fn: Callable, args: dict, kinds: dict) -> tuple:
    """``sharding_problems.sharded``, its outputs gathered to numpy on every process."""
    got, hlo = sharded(mesh, layout, fn, args, kinds)
    return to_host(got), hlo


# ----------------------------------------------------------------------------------------------
# Cases: name -> fn(mesh) returning a list of problems (empty: passed)
# ----------------------------------------------------------------------------------------------

CASES: dict[str, Callable[[Mesh], list[str]]] = {}


def loss_case(name: str, make: Callable[[], tuple[Callable, dict, dict]]) -> None:
    """Registers ``name/layout`` for every layout: values and gradients against unsharded."""
    reference = functools.cache(lambda: unsharded(*make()[:2]))  # one compile for all layouts
    for layout in LAYOUTS:

        def run(mesh: Mesh, layout=layout) -> list[str]:
            got, _ = on_host(mesh, layout, *make())
            return compare(got, reference(), f"{name} sharded over {layout}")

        CASES[f"{name}/{layout}"] = run


loss_case("cross_entropy/index", cross_entropy_index)
loss_case("cross_entropy/probs", cross_entropy_probs)
loss_case("nll", nll)
loss_case("bce_with_logits", bce_with_logits)

# The plain call on one device (itself checked against cross_entropy in test_linear.py).
linear_reference = functools.cache(lambda: unsharded(linear_fn(), linear_args()))


def no_all_gather(hlo: str) -> list[str]:
    """The shard_map forms exchange only per-token statistics: no all-gather in the program."""
    gathers = all_gather_shapes(hlo)
    return [f"the shard_map form all-gathers arrays of shapes {gathers}"] if gathers else []


def linear_case(mode: str, layout: str) -> None:
    def run(mesh: Mesh) -> list[str]:
        axes = dict(mesh=mesh, **linear_axes(layout)) if mode == "shard_map" else {}
        got, hlo = on_host(mesh, layout, linear_fn(**axes), linear_args(), LINEAR_KINDS)
        problems = compare(got, linear_reference(), f"{mode} over {layout}")
        return problems + (no_all_gather(hlo) if mode == "shard_map" else [])

    CASES[f"linear_cross_entropy/{mode}/{layout}"] = run


# Automatic sharding (XLA partitions the blockwise loops) once, on the layout using both mesh
# axes: compiling it costs twice the shard_map form, and tests/test_sharding.py covers the rest.
linear_case("auto", "both")
for _layout in LAYOUTS:
    linear_case("shard_map", _layout)


def linear_distillation_case(mesh: Mesh) -> list[str]:
    """The shard_map form with the vocabulary split over both processes."""
    layout = "classes"
    fn = distillation_fn("kl", mesh=mesh, **linear_axes(layout))
    got, hlo = on_host(mesh, layout, fn, distillation_data(), DISTILLATION_KINDS)
    want = unsharded(distillation_fn("kl"), distillation_data())
    return compare(got, want, f"shard_map over {layout}") + no_all_gather(hlo)


if hasattr(jaxloss, "linear_distillation"):  # added to jaxloss alongside these tests
    CASES["linear_distillation/shard_map/classes"] = linear_distillation_case


# ----------------------------------------------------------------------------------------------
# A sharded train step: plain JAX + optax, batch over "data" (across processes), vocab over "model"
# ----------------------------------------------------------------------------------------------

TRAIN_STEPS = 3
FEATURES = 5


def train_problem() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(5)
    params = {
        "trunk": (rng.standard_normal((FEATURES, D)) / np.sqrt(FEATURES)).astype(np.float32),
        "trunk_bias": np.zeros(D, np.float32),
        "head": (rng.standard_normal((D, V)) / np.sqrt(D)).astype(np.float32),
        "head_bias": np.zeros(V, np.float32),
    }
    batch = {
        "x": rng.standard_normal((TRAIN_STEPS, N, FEATURES)).astype(np.float32),
        "y": rng.integers(0, V, (TRAIN_STEPS, N)).astype(np.int32),
    }
    return params, batch


def train(mesh: Mesh | None, params: dict, batch: dict) -> tuple[dict, list]:
    """``TRAIN_STEPS`` adamw steps; with a mesh, the head's loss runs in its shard_map form."""
    optimizer = optax.adamw(1e-2)
    axes = {} if mesh is None else dict(mesh=mesh, batch_axis="data", vocab_axis="model")

    def loss_fn(params, x, y):
        hidden = jnp.tanh(x @ params["trunk"] + params["trunk_bias"][None, :])
        return jaxloss.linear_cross_entropy(
            hidden, params["head"], y, bias=params["head_bias"], label_smoothing=0.1,
            token_chunk=4, vocab_chunk=4, **axes,
        )  # fmt: skip

    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    if mesh is None:
        init, step = jax.jit(optimizer.init), jax.jit(step)
    else:
        # Fixed shardings for params and optimizer state (adamw's moments like their params),
        # so that the step compiles once and its state never leaves the mesh.
        replicated = NamedSharding(mesh, P())
        param_shardings = jax.tree.map(lambda a: a.sharding, params)
        opt_shardings = optax.tree_map_params(
            optimizer, lambda _, sharding: sharding, jax.eval_shape(optimizer.init, params),
            param_shardings, transform_non_params=lambda _: replicated,
        )  # fmt: skip
        init = jax.jit(optimizer.init, out_shardings=opt_shardings)
        step = jax.jit(step, out_shardings=(param_shardings, opt_shardings, replicated))
    opt_state = init(params)
    losses = []
    for x, y in zip(batch["x"], batch["y"], strict=True):
        params, opt_state, loss = step(params, opt_state, x, y)
        losses.append(loss)
    return params, losses


def train_step_case(mesh: Mesh) -> list[str]:
    """Parameters and losses after a few adamw steps equal the single-process run's."""
    params, batch = train_problem()
    specs = {"trunk": P(), "trunk_bias": P(), "head": P(None, "model"), "head_bias": P("model")}
    placed = {k: global_array(mesh, specs[k], v) for k, v in params.items()}
    placed_batch = {
        "x": [global_array(mesh, P("data", None), x) for x in batch["x"]],
        "y": [global_array(mesh, P("data"), y) for y in batch["y"]],
    }
    got = to_host(train(mesh, placed, placed_batch))
    want = jax.device_get(train(None, jax.tree.map(jnp.asarray, params), batch))
    return compare(got, want, f"params and losses after {TRAIN_STEPS} steps")


CASES["train_step/linear_cross_entropy+adamw"] = train_step_case


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def start_cluster(port: int, process_id: int, heartbeat_timeout_s: int) -> Mesh:
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        f"127.0.0.1:{port}",
        num_processes=NUM_PROCESSES,
        process_id=process_id,
        initialization_timeout=60,
        heartbeat_timeout_seconds=heartbeat_timeout_s,
    )
    if jax.local_device_count() != LOCAL_DEVICES or jax.device_count() != 4:
        raise RuntimeError(
            f"expected {LOCAL_DEVICES} local and 4 global devices, got {jax.local_device_count()}"
            f" and {jax.device_count()}: set XLA_FLAGS=--xla_force_host_platform_device_count="
            f"{LOCAL_DEVICES} before JAX starts"
        )
    mesh = jax.make_mesh((NUM_PROCESSES, LOCAL_DEVICES), AXES, axis_types=(AxisType.Auto,) * 2)
    owners = [[d.process_index for d in row] for row in mesh.devices]
    if owners != [[0, 0], [1, 1]]:
        raise RuntimeError(f"expected `data` across processes, `model` within; owners {owners}")
    return mesh


def run_checks(mesh: Mesh, process_id: int, names: list[str]) -> int:
    failed = 0
    for name in names:
        case = CASES[name]
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            problems = case(mesh)
        except Exception:  # A crash is a failed case, reported with its traceback.
            problems = [traceback.format_exc(limit=-6)]
        failed += bool(problems)
        record = {"case": name, "process": process_id, "ok": not problems}
        record |= {
            "message": "\n".join(problems),
            "seconds": round(time.perf_counter() - start, 2),
            "cpu_seconds": round(time.process_time() - cpu_start, 2),
        }
        print(json.dumps(record), flush=True)
        # Both processes enter each case together, even after one raised in the previous one.
        multihost_utils.sync_global_devices(name)
    return 1 if failed else 0


def wait_for_the_dead(mesh: Mesh, process_id: int, victim: int) -> int:
    """Signals READY after one collective, then the victim sleeps and the other all-reduces."""
    ones = global_array(mesh, P(AXES), np.ones(4, np.float32))
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))
    print(f"collective ok: {float(total(ones))}", flush=True)
    print("READY", flush=True)
    if process_id == victim:
        time.sleep(600)  # the harness kills this process now
        return 0
    print(f"all-reduce with a dead peer returned {float(total(ones))}", flush=True)
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--mode", choices=("checks", "fault"), default="checks")
    parser.add_argument("--fault-victim", type=int, default=1)
    parser.add_argument("--heartbeat-timeout-s", type=int, default=HEARTBEAT_TIMEOUT_S)
    parser.add_argument("cases", nargs="*", help=f"default: all of {list(CASES)}")
    args = parser.parse_args(argv)
    unknown = [name for name in args.cases if name not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {list(CASES)}")
    mesh = start_cluster(args.port, args.process_id, args.heartbeat_timeout_s)
    if args.mode == "fault":
        return wait_for_the_dead(mesh, args.process_id, args.fault_victim)
    return run_checks(mesh, args.process_id, args.cases or list(CASES))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
