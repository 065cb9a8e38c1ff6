"""Compiled temporary memory (compile only, nothing runs): no loss needs more than its peer.

Each benchmark case is compiled on abstract inputs, exactly as ``python -m benchmarks`` does, and
``memory_analysis()`` of the jaxloss executable is held against the optax/jax.nn one. These are
properties of the compiler on the backend that runs the tests (XLA:CPU in CI), which is why they
compare side by side rather than assert absolute sizes, except for the cross-entropy goal of the
speed issue: ``value_and_grad`` temporaries at most the logits' own bytes.
"""

from __future__ import annotations

import pytest

from benchmarks import harness
from benchmarks.cases import all_cases

SHAPE = (512, 8192)  # 16 MiB of float32 logits: big enough that XLA keeps its large-array plan
# The fused linear cross-entropy has its own shapes and memory test (test_linear.py).
CASES = {c.name: c for c in all_cases(include_torch=False) if c.name != "linear_cross_entropy"}
# A few per-row vectors (denominators, shifts) are not what this guards against: N×C arrays are.
ROW_SLACK = 8 * 8 * SHAPE[0]
LOGITS_BYTES = {"f32": SHAPE[0] * SHAPE[1] * 4, "bf16": SHAPE[0] * SHAPE[1] * 2}


def _temps(name: str, mode: str, dtype: str) -> dict[str, int]:
    record = harness.memory_only(CASES[name], mode, dtype, SHAPE)
    temps = {impl: entry.get("temp_bytes") for impl, entry in record["impls"].items()}
    assert all(isinstance(t, int) for t in temps.values()), record
    return temps


@pytest.mark.parametrize("mode", ["fwd", "vag"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_float32_temporaries_no_larger_than_the_peer(name, mode):
    temps = _temps(name, mode, "f32")
    assert temps["jaxloss"] <= temps["optax"] + ROW_SLACK, temps


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_cross_entropy_value_and_grad_temporaries_within_the_logits_bytes(dtype):
    temps = _temps("cross_entropy", "vag", dtype)
    assert temps["jaxloss"] <= LOGITS_BYTES[dtype], temps
