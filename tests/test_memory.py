"""Compiled temporary memory (compile only, nothing runs): no loss needs more than its peer.

``python -m benchmarks --memory-only`` compiles every benchmark case on abstract inputs, as a
user would run it, and ``results.json`` holds ``memory_analysis()`` of each jaxloss executable
beside its optax/jax.nn peer. These are properties of the compiler on the backend that runs the
tests (XLA:CPU in CI), which is why they compare side by side rather than assert absolute sizes,
except for the cross-entropy goal of the speed issue: ``value_and_grad`` temporaries at most the
logits' own bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Two benchmark subprocesses compiling every case: the full suite's.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SHAPE = (512, 8192)  # 16 MiB of float32 logits: big enough that XLA keeps its large-array plan
SIZE = "x".join(map(str, SHAPE))
# Every case the suite has had; a new one is covered without being listed here.
KNOWN_CASES = {
    "cross_entropy", "cross_entropy_probs", "cross_entropy_smooth_weight", "nll",
    "bce_with_logits", "bce", "kl_div", "softmax", "log_softmax", "entropy",
}  # fmt: skip
# A few per-row vectors (denominators, shifts) are not what this guards against: N×C arrays are.
ROW_SLACK = 8 * 8 * SHAPE[0]
LOGITS_BYTES = {"f32": SHAPE[0] * SHAPE[1] * 4, "bf16": SHAPE[0] * SHAPE[1] * 2}
TIMEOUT_S = 600


def compile_only(out: Path, *args: str) -> subprocess.Popen[str]:
    """Starts ``python -m benchmarks --memory-only --sizes 512x8192 ARGS --out OUT``."""
    command = [
        sys.executable, "-m", "benchmarks", "--memory-only", "--sizes", SIZE, "--no-torch",
        "--no-progress", "--no-plots", "--out", str(out), *args,
    ]  # fmt: skip
    return subprocess.Popen(
        command, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def records_of(proc: subprocess.Popen[str], out: Path) -> list[dict]:
    """Waits for a :func:`compile_only` run; the records it wrote, all compile-only."""
    stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{' '.join(map(str, proc.args))}\n{stdout}\n{stderr[-4000:]}"
    records = json.loads((out / "results.json").read_text())["results"]
    assert records and all(r["memory_only"] for r in records), records
    return records


@pytest.fixture(scope="module")
def temps(tmp_path_factory) -> dict[tuple[str, str, str], dict[str, int]]:
    """(case, mode, dtype) -> temp bytes per implementation: every case in f32, the
    cross-entropy goal in bf16. The fused linear cross-entropy has its own shapes and memory
    test (test_linear.py)."""
    f32, bf16 = tmp_path_factory.mktemp("f32"), tmp_path_factory.mktemp("bf16")
    # Both at once: each spends seconds importing on one core before compiling on all.
    runs = [
        (compile_only(f32, "--dtypes", "f32", "--filter", "^(?!linear_cross_entropy$)"), f32),
        (
            compile_only(bf16, "--dtypes", "bf16", "--modes", "vag", "--filter", "^cross_entropy$"),
            bf16,
        ),
    ]
    records = [r for proc, out in runs for r in records_of(proc, out)]
    table = {}
    for r in records:
        assert r["shape"] == list(SHAPE), r["name"]
        entries = {impl: entry.get("temp_bytes") for impl, entry in r["impls"].items()}
        assert all(isinstance(t, int) for t in entries.values()), r
        table[r["case"], r["mode"], r["dtype"]] = entries
    return table


@pytest.mark.parametrize("mode", ["fwd", "vag"])
def test_float32_temporaries_no_larger_than_the_peer(temps, mode):
    compiled = {case for case, m, dtype in temps if (m, dtype) == (mode, "f32")}
    assert compiled >= KNOWN_CASES, f"not compiled: {KNOWN_CASES - compiled}"
    larger = {
        case: t
        for (case, m, dtype), t in temps.items()
        if (m, dtype) == (mode, "f32") and t["jaxloss"] > t["optax"] + ROW_SLACK
    }
    assert not larger, larger


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_cross_entropy_value_and_grad_temporaries_within_the_logits_bytes(temps, dtype):
    t = temps["cross_entropy", "vag", dtype]
    assert t["jaxloss"] <= LOGITS_BYTES[dtype], t


@pytest.mark.parametrize("name", ["cross_entropy", "nll"])
def test_bfloat16_forward_holds_no_float32_copy_of_the_logits(name):
    """A gather of the target logit beside the exp-sum's upcast made XLA:CPU materialise a
    float32 copy of bf16 logits (twice their bytes); float32 needs none."""
    import jax
    import jax.numpy as jnp

    import jaxloss

    z = jax.ShapeDtypeStruct(SHAPE, jnp.bfloat16)
    y = jax.ShapeDtypeStruct(SHAPE[:1], jnp.int32)
    compiled = jax.jit(getattr(jaxloss, name)).lower(z, y).compile()
    temps = compiled.memory_analysis().temp_size_in_bytes  # pyright: ignore[reportOptionalMemberAccess]
    assert temps <= ROW_SLACK, f"{temps} bytes against {LOGITS_BYTES['bf16']} of logits"


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("mode", ["forward", "value_and_grad"])
@pytest.mark.parametrize("weighted", [False, True], ids=["smoothing", "smoothing+weight"])
def test_label_smoothing_holds_no_copy_of_the_logits(dtype, mode, weighted):
    """Label smoothing's sum over the logits beside the exp-sum made XLA:CPU materialise the
    float32 convert of bf16 logits, twice their bytes (issue 19 item 8)."""
    import jax
    import jax.numpy as jnp

    import jaxloss

    z = jax.ShapeDtypeStruct(SHAPE, jnp.dtype(dtype))
    y = jax.ShapeDtypeStruct(SHAPE[:1], jnp.int32)
    w = jax.ShapeDtypeStruct(SHAPE[1:], jnp.float32) if weighted else None

    def loss(z, y, w):
        return jaxloss.cross_entropy(z, y, weight=w, label_smoothing=0.1).astype(jnp.float32)

    f = jax.value_and_grad(loss) if mode == "value_and_grad" else loss
    compiled = jax.jit(f).lower(z, y, w).compile()
    temps = compiled.memory_analysis().temp_size_in_bytes  # pyright: ignore[reportOptionalMemberAccess]
    assert temps <= ROW_SLACK, f"{temps} bytes of temporaries for {z}"
