"""Sharded inputs give the unsharded values and gradients; class sharding gathers no logits.

``nll``, ``cross_entropy`` (index and probability targets), ``linear_cross_entropy`` (plain,
partitioned by XLA, and its ``shard_map`` form with ``batch_axis``/``vocab_axis``) and
``linear_distillation`` run under ``jax.jit`` on a 2 × 4 mesh of the eight CPU devices that
``conftest.py`` sets up, with inputs split over the batch, over the classes, and over both. The
checks themselves are in ``sharding_checks.py`` and ``distillation_sharding_checks.py``: each
returns its problems (empty when it passes) and the all-gathers of its compiled program, and is
one test here.

The default run takes one layout of each function and mode (``both``: batch over ``data``,
classes over ``model``, so it checks both splits and the no-gather rule at once) and the error
paths; the other layouts, and the modes that repeat a default check's code path, are ``slow``.
"""

from __future__ import annotations

import distillation_sharding_checks
import pytest
import sharding_checks

CHECKS = {
    **sharding_checks.CHECKS,
    **{f"linear_distillation/{k}": v for k, v in distillation_sharding_checks.CHECKS.items()},
}
# A layout other than `both` (named in the check, e.g. "nll/batch"): slow, unless the check is
# the only one of its kind (an error path, the parsers' self-tests).
OTHER_LAYOUTS = ("/batch/", "/classes/")
# Repeats of a default check's code path: explicit axis types for the plain losses beyond
# cross_entropy's index targets (the same resharding), linear_distillation without a mask and
# its plain call under automatic sharding (XLA partitions it, as linear_cross_entropy's).
REPEATS = {
    "explicit/cross_entropy/probs/both",
    "explicit/nll/both",
    "linear_distillation/shard_map/reverse_kl/both/no_mask",
    "linear_distillation/auto/kl/both",
    # kl's and jsd's code paths (the divergences differ in the per-block formula, which the
    # unsharded tests hold; kl keeps its huge_logits check by default)
    "linear_distillation/shard_map/reverse_kl/both",
    "linear_distillation/shard_map/kl/both",
    # the engine's uneven-vocabulary glue, shared with linear_cross_entropy's default check
    "linear_distillation/shard_map/kl/both/uneven_classes",
    "linear_distillation/shard_map/jsd/both/uneven_classes",
}


def _param(name: str):
    slow = name in REPEATS or any(layout in f"{name}/" for layout in OTHER_LAYOUTS)
    return pytest.param(name, marks=pytest.mark.slow if slow else ())


def _assert_check_passes(name: str, mesh) -> None:
    problems, gathers = CHECKS[name](mesh)
    assert not problems, "\n".join([*problems, f"all-gather result shapes: {gathers}"])


@pytest.mark.parametrize("name", [_param(name) for name in CHECKS])
def test_sharded_matches_unsharded(name, mesh):
    _assert_check_passes(name, mesh)


# The shard_map forms in the GPUs' forms of the recomputing pass, here on CPU: blocks folded in
# one pass, each row's target entry set after the cast (conftest's accelerator_forms). Sharded
# against unsharded, both in those forms: the glue; test_linear_extremes' gpu_fold form holds
# the forms themselves to the materialised reference.
GPU_FORM_CHECKS = (
    "linear_cross_entropy/shard_map/both",
    "linear_cross_entropy/shard_map/both/uneven_classes",
)


@pytest.mark.parametrize("name", GPU_FORM_CHECKS)
def test_sharded_matches_unsharded_in_the_gpus_forms(name, mesh, accelerator_forms):
    accelerator_forms(recompute=True, reductions=True, epilogue=True)
    _assert_check_passes(name, mesh)
