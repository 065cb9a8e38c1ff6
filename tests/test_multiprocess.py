"""Many hosts, simulated: two JAX processes form one cluster, and sharded losses still agree.

Each test starts two worker processes (``tests/multiprocess_worker.py``) on 127.0.0.1, each with
2 CPU devices, joined by ``jax.distributed.initialize`` over a free port with gloo collectives:
a real multi-controller JAX runtime, as on a TPU pod slice or a GPU cluster, with a ``(2, 2)``
mesh spanning both processes.

- ``test_case``: every case of the worker (``cross_entropy``, ``nll``, ``bce_with_logits``,
  ``linear_cross_entropy`` automatic and ``shard_map`` forms, ``linear_distillation``, an adamw
  train step) gives the single-process values and gradients in both processes. All cases run in
  one launch; each is one test here, failing with the worker's message.
- ``test_a_dead_peer_fails_the_survivor``: after the cluster works, one worker is killed while the
  other waits in a cross-process all-reduce; the survivor must exit non-zero with JAX's error
  within seconds (``heartbeat_timeout_seconds=5``), never hang.

Every launch has a hard timeout, shows both processes' output on failure, and kills both
process groups when it ends.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Two-process clusters (about 40 s together): the full suite's.
pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("multiprocess_worker.py")
NUM_PROCESSES = 2
CHECKS_TIMEOUT_S = 420  # ~40 s of CPU per process; generous for a loaded 2-core machine
FAULT_TIMEOUT_S = 120
HEARTBEAT_TIMEOUT_S = 5  # how long the fault test's survivor takes to learn its peer is dead
# JAX's fatal-error line when the coordination service declares a task dead (jaxlib's client.h).
FATAL = "Terminating process because the JAX distributed service detected fatal errors"


def _case_names() -> list[str]:
    """The worker's cases (importing it registers them; it starts no cluster)."""
    spec = importlib.util.spec_from_file_location("_multiprocess_worker", WORKER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.CASES)


CASE_NAMES = _case_names()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker_env() -> dict[str, str]:
    """2 CPU devices per process, repo importable; no proxy (gRPC would route 127.0.0.1 to it)."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    root = str(Path(__file__).resolve().parents[1])
    pythonpath = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env | {
        "XLA_FLAGS": " ".join([*flags, "--xla_force_host_platform_device_count=2"]),
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": pythonpath,
        "PYTHONUNBUFFERED": "1",
    }


@dataclass
class Worker:
    process: subprocess.Popen
    stdout: Path
    stderr: Path

    def output(self, limit: int = 4000) -> str:
        """The tail of stdout and stderr (gloo's per-connection chatter dropped)."""
        parts = []
        for name, path in (("stdout", self.stdout), ("stderr", self.stderr)):
            lines = path.read_text(errors="replace").splitlines()
            text = "\n".join(line for line in lines if not line.startswith("[Gloo]"))
            parts.append(f"--- {name} (tail) ---\n{text[-limit:]}")
        return "\n".join(parts)


def describe(workers: list[Worker]) -> str:
    return "\n".join(
        f"=== process {i}: exit status {w.process.poll()} ===\n{w.output()}"
        for i, w in enumerate(workers)
    )


@contextlib.contextmanager
def cluster(directory: Path, *worker_args: str) -> Iterator[list[Worker]]:
    """Two workers, each in its own process group, both killed (with any children) at the end."""
    port = str(_free_port())
    workers: list[Worker] = []
    try:
        for i in range(NUM_PROCESSES):
            stdout, stderr = directory / f"worker{i}.out", directory / f"worker{i}.err"
            with stdout.open("w") as out, stderr.open("w") as err:
                process = subprocess.Popen(
                    [sys.executable, str(WORKER), "--port", port, "--process-id", str(i),
                     *worker_args],
                    env=_worker_env(), stdout=out, stderr=err, start_new_session=True,
                )  # fmt: skip
            workers.append(Worker(process, stdout, stderr))
        yield workers
    finally:
        for worker in workers:
            kill(worker)


def kill(worker: Worker) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker.process.pid, signal.SIGKILL)
    worker.process.wait()


def wait(workers: list[Worker], deadline: float) -> bool:
    """Whether every worker exited before ``deadline`` (a ``time.monotonic()`` instant)."""
    while any(w.process.poll() is None for w in workers):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


# ----------------------------------------------------------------------------------------------
# Sharded losses across processes equal the single-process results
# ----------------------------------------------------------------------------------------------


@dataclass
class Reports:
    finished: bool
    seconds: float
    returncodes: list[int | None]
    records: dict[str, list[dict]]  # case -> one record per process that reported it
    output: str


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> Reports:
    directory = tmp_path_factory.mktemp("multiprocess")
    start = time.monotonic()
    with cluster(directory) as workers:
        finished = wait(workers, start + CHECKS_TIMEOUT_S)
        output = describe(workers)
    records: dict[str, list[dict]] = {}
    for worker in workers:
        for line in worker.stdout.read_text().splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                records.setdefault(record["case"], []).append(record)
    returncodes = [w.process.returncode if finished else None for w in workers]
    return Reports(finished, time.monotonic() - start, returncodes, records, output)


def test_cluster_ran_every_case(reports: Reports):
    assert reports.finished, f"no exit within {CHECKS_TIMEOUT_S} s\n{reports.output}"
    missing = [name for name in CASE_NAMES if len(reports.records.get(name, [])) != NUM_PROCESSES]
    assert not missing, f"cases not reported by both processes: {missing}\n{reports.output}"
    all_ok = all(r["ok"] for records in reports.records.values() for r in records)
    assert (reports.returncodes == [0, 0]) == all_ok, reports.output


@pytest.mark.parametrize("name", CASE_NAMES)
def test_case(name: str, reports: Reports):
    records = reports.records.get(name, [])
    assert len(records) == NUM_PROCESSES, (
        f"{name}: reported by processes {[r['process'] for r in records]} of {NUM_PROCESSES} "
        f"(finished: {reports.finished})\n{reports.output}"
    )
    failures = [f"process {r['process']}: {r['message']}" for r in records if not r["ok"]]
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------------------------
# A dead peer: the survivor exits with JAX's error instead of waiting forever
# ----------------------------------------------------------------------------------------------

# What the survivor prints, by which process died (measured with jax 0.10.2; see docs/multihost.md).
SURVIVOR_SEES = {
    # Process 1 died: the coordination service (in process 0) declares it dead after the
    # heartbeat timeout. Process 0's all-reduce may fail before that (gloo: "Connection closed
    # by peer"), raising a JaxRuntimeError, but it is the heartbeat that ends the process.
    1: ("The following tasks are unhealthy (stopped sending heartbeats):\n1", FATAL),
    # Process 0 died, and with it the coordination service: process 1 loses its connection.
    0: ("leader task was preempted/died", FATAL),
}


def _wait_for_ready(workers: list[Worker], deadline: float) -> None:
    while not all("READY" in w.stdout.read_text() for w in workers):
        running = all(w.process.poll() is None for w in workers)
        assert running and time.monotonic() < deadline, (
            f"the cluster never became ready\n{describe(workers)}"
        )
        time.sleep(0.1)


@pytest.mark.parametrize("victim", sorted(SURVIVOR_SEES))
def test_a_dead_peer_fails_the_survivor(victim: int, tmp_path: Path):
    survivor_id = 1 - victim
    start = time.monotonic()
    fault = ("--mode", "fault", "--fault-victim", str(victim))
    with cluster(tmp_path, *fault, "--heartbeat-timeout-s", str(HEARTBEAT_TIMEOUT_S)) as workers:
        _wait_for_ready(workers, start + FAULT_TIMEOUT_S)
        time.sleep(1.0)  # the survivor is now blocked in its all-reduce
        kill(workers[victim])
        killed = time.monotonic()
        survivor = workers[survivor_id]
        exited = wait([survivor], killed + FAULT_TIMEOUT_S / 2)
        seconds = time.monotonic() - killed
        output = describe(workers)
    assert exited, f"the survivor still runs {seconds:.0f} s after its peer died\n{output}"
    assert survivor.process.returncode != 0, output
    stderr = survivor.stderr.read_text(errors="replace")
    missing = [text for text in SURVIVOR_SEES[victim] if text not in stderr]
    assert not missing, f"survivor's stderr lacks {missing} ({seconds:.1f} s)\n{output}"
    assert "all-reduce with a dead peer returned" not in survivor.stdout.read_text(), output
