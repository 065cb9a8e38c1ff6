"""Sharded inputs give the unsharded values and gradients; class sharding gathers no logits.

``nll``, ``cross_entropy`` (index and probability targets) and ``linear_cross_entropy`` (plain,
partitioned by XLA, and its ``shard_map`` form with ``batch_axis``/``vocab_axis``) run under
``jax.jit`` on a 2 × 4 mesh of CPU devices with inputs split over the batch, over the classes,
and over both. The device count must be fixed before JAX initialises, so every check runs in
one subprocess (``tests/sharding_checks.py`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``), which prints one JSON verdict per
check; each check is one test here, failing with the script's own message.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("sharding_checks.py")
TIMEOUT_S = 600


def _check_names() -> list[str]:
    """The checks the script defines (importing it registers them; JAX is not initialised)."""
    spec = importlib.util.spec_from_file_location("_sharding_checks", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.CHECKS)


CHECK_NAMES = _check_names()


def _xla_flags() -> str:
    kept = [
        flag
        for flag in os.environ.get("XLA_FLAGS", "").split()
        if not flag.startswith("--xla_force_host_platform_device_count")
    ]
    return " ".join([*kept, "--xla_force_host_platform_device_count=8"])


@pytest.fixture(scope="module")
def verdicts() -> tuple[subprocess.CompletedProcess[str], dict[str, dict]]:
    env = {**os.environ, "XLA_FLAGS": _xla_flags(), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    records = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            records[record["name"]] = record
    return proc, records


def _context(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit status {proc.returncode}\n--- stderr (tail) ---\n{proc.stderr[-3000:]}"


def test_all_checks_ran(verdicts):
    proc, records = verdicts
    assert "setup" not in records, records["setup"]["message"]
    missing = [name for name in CHECK_NAMES if name not in records]
    assert not missing, f"checks that reported nothing: {missing}\n{_context(proc)}"
    failed = [name for name, record in records.items() if not record["ok"]]
    assert (proc.returncode == 0) == (not failed), _context(proc)


@pytest.mark.parametrize("name", CHECK_NAMES)
def test_sharded_matches_unsharded(name, verdicts):
    proc, records = verdicts
    assert name in records, f"{name} reported nothing\n{_context(proc)}"
    record = records[name]
    assert record["ok"], f"{record['message']}\nall-gather result shapes: {record['all_gathers']}"
