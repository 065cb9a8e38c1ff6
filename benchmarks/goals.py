"""The goals and their verdicts: PASS, FAIL, INCONCLUSIVE (timing too noisy to tell) or N/A.

A CPU time goal is judged on its own paired measurement after the grid
(:func:`compare_until_clear`); memory goals and a compile-only target's goals (modelled time and
bytes, :mod:`benchmarks.hlo`) are exact compiler figures (:func:`goal`).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from benchmarks import cases
from benchmarks.cases import GOAL_SHAPE, HEADS, LINEAR, MATERIALISED, Case, Inputs
from benchmarks.report import count, find, fmt_bytes, size
from benchmarks.targets import Target

MODE_LABELS = {"fwd": "forward", "vag": "value_and_grad"}


def goal(goal_id: str, description: str, kind: str, lhs, rhs, threshold: float, lhs_label: str,
         rhs_label: str, note: str = "", slack: float = 0.0) -> dict:  # fmt: skip
    """``lhs <= threshold * rhs + slack``: a compiler figure (bytes, modelled time), exact."""
    result = {"id": goal_id, "description": description, "kind": kind, "lhs_label": lhs_label,
              "lhs": lhs, "rhs_label": rhs_label, "rhs": rhs, "threshold": threshold,
              "interval": None, "rounds": 0, "note": note}  # fmt: skip
    if lhs is None or not rhs:
        return {**result, "status": "N/A", "ratio": None, "note": note or "not compiled"}
    return {**result, "status": "PASS" if lhs <= threshold * rhs + slack else "FAIL",
            "ratio": lhs / rhs}  # fmt: skip


# CPU: speed goals judged by paired measurements, memory goals from the compiler


class SpeedGoal(NamedTuple):
    """``time(numerator) / time(denominator) <= threshold``, each side ``(impl, dtype)``."""

    id: str
    description: str
    mode: str
    shape: tuple[int, ...]
    numerator: tuple[str, str]
    denominator: tuple[str, str]
    threshold: float
    case: str = "cross_entropy"


def speed_goals() -> list[SpeedGoal]:
    big, small, at = tuple(GOAL_SHAPE), tuple(cases.GOAL_SMALL_SHAPE), f"at {size(GOAL_SHAPE)}"
    jl32, jl16, ox32 = ("jaxloss", "f32"), ("jaxloss", "bf16"), ("optax", "f32")
    ce = "cross_entropy value_and_grad"
    return [
        SpeedGoal("ce_vag_f32_vs_optax", f"f32 {ce} {at}: jaxloss <= 1.05x optax", "vag", big,
                  jl32, ox32, 1.05),
        SpeedGoal("ce_vag_bf16_vs_optax", f"bf16 {ce} {at}: jaxloss <= 0.5x optax bf16", "vag",
                  big, jl16, ("optax", "bf16"), 0.5),
        SpeedGoal("ce_vag_bf16_vs_f32", f"bf16 {ce} {at}: jaxloss bf16 <= jaxloss f32", "vag",
                  big, jl16, jl32, 1.0),
        SpeedGoal("linear_vag_vs_materialised", "f32 linear_cross_entropy value_and_grad at "
                  f"{size(cases.LINEAR_GOAL_SHAPE)}: <= 1.0x materialised", "vag",
                  tuple(cases.LINEAR_GOAL_SHAPE), jl32, ("jaxloss_materialised", "f32"), 1.0,
                  "linear_cross_entropy"),
        *[SpeedGoal(f"ce_{m}_small_vs_optax", f"f32 cross_entropy {MODE_LABELS[m]} at "
                    f"{size(small)}: jaxloss <= 1.1x optax", m, small, jl32, ox32, 1.1)
          for m in ("fwd", "vag")],
    ]  # fmt: skip


def timed(records: Sequence[dict], g: SpeedGoal) -> bool:
    """Whether the grid timed both sides of ``g`` (then it gets its own paired check)."""
    found = [(find(records, g.case, g.mode, d, g.shape, False), i)
             for i, d in (g.numerator, g.denominator)]  # fmt: skip
    return all(r is not None and r["impls"].get(i, {}).get("median_s") for r, i in found)


def median_interval(values: Sequence[float],
                    confidence: float = 0.95) -> tuple[float, float] | None:  # fmt: skip
    """Distribution-free interval of the median, ``x_(k)``, ``x_(n+1-k)``, ``k`` the largest
    rank with ``P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2`` (a sign test: load bursts give
    heavy tails that a normal interval would understate); None when ``n`` is too small."""
    x, n, tail, k = sorted(values), len(values), 0.0, 0
    for j in range(n + 1):
        tail += math.comb(n, j) / 2**n
        if tail > (1 - confidence) / 2:
            break
        k = j + 1
    return None if k == 0 else (x[k - 1], x[n - k])


def _sampler(case: Case, impl: str, dtype: str, g: SpeedGoal) -> Callable[[int], float]:
    """Seconds per call over ``n`` back-to-back calls of one side of a goal, warmed up."""
    inputs = Inputs(g.shape, cases.DTYPES[dtype])
    args = jax.block_until_ready(tuple(inputs[n] for n in cases.arg_names(case, g.mode)))
    compiled = jax.jit(cases.jax_function(case, case.impls[impl], g.mode)).lower(*args).compile()
    jax.block_until_ready(compiled(*args))

    def sample(n: int) -> float:
        start, out = time.perf_counter(), None
        for _ in range(n):
            out = compiled(*args)
        jax.block_until_ready(out)
        return (time.perf_counter() - start) / n

    return sample


def _calls_for(sample: Callable[[int], float], min_sample_s: float = 0.05) -> int:
    """Calls per sample such that one sample lasts ``min_sample_s``, measured on whole samples."""
    n = 1
    while (elapsed := sample(n) * n) < min_sample_s:
        n = max(n + 1, math.ceil(1.2 * n * min_sample_s / elapsed))
    return n


def compare_until_clear(numerator: Callable[[int], float], denominator: Callable[[int], float],
                        threshold: float, max_rounds: int,
                        budget_s: float) -> dict[str, Any]:  # fmt: skip
    """Samples ``numerator / denominator`` in paired rounds (alternating which goes first) until
    the 95 % interval of the median ratio lies wholly below ``threshold`` (PASS) or above it
    (FAIL), from 7 rounds on; INCONCLUSIVE when ``max_rounds`` or ``budget_s`` run out first."""
    calls = [_calls_for(numerator), _calls_for(denominator)]
    started, times = time.perf_counter(), ([], [])
    verdict, interval = "INCONCLUSIVE", None
    for k in range(max_rounds):
        for side in (0, 1) if k % 2 == 0 else (1, 0):
            times[side].append((numerator, denominator)[side](calls[side]))
        if k + 1 < 7:
            continue
        interval = median_interval([a / b for a, b in zip(*times, strict=True)])
        if interval is not None and interval[1] <= threshold:
            verdict = "PASS"
        elif interval is not None and interval[0] > threshold:
            verdict = "FAIL"
        if verdict != "INCONCLUSIVE" or time.perf_counter() - started > budget_s:
            break
    ratios = [a / b for a, b in zip(*times, strict=True)]
    return {
        "verdict": verdict, "ratio": float(np.median(ratios)), "rounds": len(ratios),
        "interval": None if interval is None else [float(interval[0]), float(interval[1])],
        "ratios": ratios, "numerator_s": float(np.median(times[0])),
        "denominator_s": float(np.median(times[1])), "calls_per_sample": calls,
        "seconds": time.perf_counter() - started,
    }  # fmt: skip


def check_goals(records: Sequence[dict], chosen: Sequence[Case], quick: bool) -> dict[str, dict]:
    """The paired check of every speed goal whose both sides the grid timed."""
    by_name, checks = {c.name: c for c in chosen}, {}
    for g in speed_goals():
        if g.case in by_name and timed(records, g):
            print(f"goal check: {g.description}", file=sys.stderr, flush=True)
            top, bottom = (_sampler(by_name[g.case], *s, g) for s in (g.numerator, g.denominator))
            rounds, budget = (15, 4.0) if quick else (41, 20.0)
            checks[g.id] = compare_until_clear(top, bottom, g.threshold, rounds, budget)
    return checks


def evaluate_goals(records: Sequence[dict], backend: str, checks: dict[str, dict] | None = None,
                   quick_times: set[str] | None = None) -> list[dict]:  # fmt: skip
    """Every CPU goal. ``checks``: the paired check of each speed goal by id; ``quick_times``:
    the speed goals ``--quick`` times (default all)."""
    found = []
    for g in speed_goals():
        note = "" if backend == "cpu" else f"goal is defined for CPU; measured on {backend}"
        lhs, rhs = (" ".join(side) + " s" for side in (g.numerator, g.denominator))
        result = {**goal(g.id, g.description, "time", None, None, g.threshold, lhs, rhs),
                  "note": note}  # fmt: skip
        if (check := (checks or {}).get(g.id)) is not None:
            result.update(status=check["verdict"], lhs=check["numerator_s"], ratio=check["ratio"],
                          rhs=check["denominator_s"], interval=check["interval"],
                          rounds=check["rounds"], check=check)  # fmt: skip
        elif quick_times is None or g.id in quick_times:
            result["note"] = "not timed in this run (the full grid and --quick time it)"
        else:
            result["note"] = (f"not timed in this run: --quick leaves out {size(g.shape)}; the "
                              f"full grid times it (this goal's function alone: python -m "
                              f"benchmarks --filter '^{g.case}$')")  # fmt: skip
        found.append(result)
    for dtype in ("f32", "bf16"):
        r = find(records, "cross_entropy", "vag", dtype, GOAL_SHAPE) or {"impls": {}}
        mine, theirs = (r["impls"].get(k, {}).get("temp_bytes") for k in ("jaxloss", "optax"))
        why = "no memory analysis from XLA" if r.get("logits_bytes") else "not compiled in this run"
        found.append(goal(f"ce_vag_temp_{dtype}", f"{dtype} cross_entropy value_and_grad "
                          f"temporaries at {size(GOAL_SHAPE)} <= 1x logits bytes", "bytes", mine,
                          r.get("logits_bytes"), 1.0, "jaxloss temp bytes", "logits bytes",
                          why if mine is None else f"optax: {fmt_bytes(theirs)}"))  # fmt: skip
    return found


# Compile-only targets: modelled time and bytes (issues 8 and 17)

# linear_cross_entropy value_and_grad temporaries (issue 8; on the H100 256 MiB since the carried
# float32 hidden gradient, N·D·4 = 128 MiB, removed a fifth N·D·V matmul: 66.4 -> 42.5 ms
# modelled, within issue 17's 512 MiB): (shape, dtype, MiB) per target.
LINEAR_GOALS = {"h100": ((8192, 4096, 131072), "bf16", 256),
                "tpu-v5p": ((8192, 2048, 131072), "f32", 256)}  # fmt: skip
# Issue 17, item 4: modelled time <= 1.0x the materialised formula, temporaries <= 512 MiB.
HEAD_GOALS = {
    "h100": ((LINEAR, (8192, 4096, 131072), "bf16"), (HEADS[1], (8192, 4096, 131072), "bf16")),
    "tpu-v5p": ((LINEAR, (8192, 2048, 131072), "bf16"), (LINEAR, (8192, 2048, 131072), "f32")),
}
HEAD_TEMP_MIB = 512
# cross_entropy value_and_grad, modelled bytes over the copy floor: issue 17 asks TPUs for
# 1.05x (one read of the logits, one write of the gradient); GPUs keep issue 8's 1.5x.
CE_COPY_GOAL = {"tpu": 1.05, "cuda": 1.5}
# Per-row vectors (max, sum, weights, the loss) are N-sized: goals on N×C traffic allow this
# much of the logits' bytes for them.
ROW_SLACK = 1e-3
ROW_NOTE = "judged within N-sized vectors: 0.1% of the logits' bytes"


# fmt: off
def target_goals(target: Target, records: Sequence[dict]) -> list[dict]:
    """The modelled goals of issues 8 and 17 for one target (compiler figures, exact)."""
    shape, empty = target.sizes[-1], dict[str, Any](impls={})
    at, copy_goal = size(shape), CE_COPY_GOAL[target.platform]
    get = lambda case, dtype, s, mode="vag": find(records, case, mode, dtype, s) or empty
    ours = lambda r, key: r["impls"].get("jaxloss", {}).get(key)
    goals = []
    for dtype in ("f32", "bf16"):
        vag, fwd = get("cross_entropy", dtype, shape), get("cross_entropy", dtype, shape, "fwd")
        goals += [
            goal(f"ce_vag_hbm_{dtype}", f"{dtype} cross_entropy value_and_grad at {at}: modelled "
                 f"HBM <= {copy_goal}x copy", "bytes", ours(vag, "hbm_bytes"), vag.get("min_bytes"),
                 copy_goal, "jaxloss bytes", "copy bytes", ROW_NOTE,
                 ROW_SLACK * vag.get("logits_bytes", 0)),
            goal(f"ce_fwd_hbm_{dtype}", f"{dtype} cross_entropy forward at {at}: modelled HBM <= "
                 "1.05x the logits", "bytes", ours(fwd, "hbm_bytes"), fwd.get("logits_bytes"), 1.05,
                 "jaxloss bytes", "logits bytes", ROW_NOTE, ROW_SLACK * fwd.get("logits_bytes", 0)),
            _peer_goal(records, dtype, shape),
        ]
    if target.name in LINEAR_GOALS:
        lshape, dtype, mib = LINEAR_GOALS[target.name]
        r, what = get(LINEAR, dtype, lshape), (f"{dtype} linear_cross_entropy value_and_grad "
                                               f"temporaries at {size(lshape)} <= {mib} MiB")
        f32_matmuls = ours(r, "temp_bytes_f32_matmuls")
        note = "DEFAULT matmul precision: on TPU, XLA's bf16 copy of a float32 kernel included"
        goals.append(goal(f"linear_ce_temp_{dtype}", what, "bytes", ours(r, "temp_bytes"),
                          mib * 2**20, 1.0, "jaxloss temp bytes", f"{mib} MiB",
                          note if f32_matmuls is not None else ""))
        if f32_matmuls is not None:
            goals.append(goal(f"linear_ce_temp_{dtype}_f32_matmuls", what + " (float32 matmul "
                              "precision)", "bytes", f32_matmuls, mib * 2**20, 1.0,
                              "jaxloss temp bytes", f"{mib} MiB",
                              'under jax.default_matmul_precision("float32")'))
    for case, hshape, dtype in HEAD_GOALS.get(target.name, ()):
        r = get(case, dtype, hshape)
        fused, mat = r["impls"].get("jaxloss", {}), r["impls"].get(MATERIALISED[case], {})
        at_head = f"{dtype} {case} value_and_grad at {size(hshape)}"
        matmuls = "" if "matmuls" not in fused else (
            f"N·D·V matmuls {count(fused['matmuls'])} (materialised "
            f"{count(mat.get('matmuls', 0))}); compute-bound kernels "
            f"{fused['compute_bound_s'] * 1e3:.1f} ms of the fused time")
        goals += [
            goal(f"{case}_time_{dtype}", f"{at_head}: modelled time <= 1.0x materialised",
                 "modelled", fused.get("roofline_s"), mat.get("roofline_s"), 1.0,
                 "fused modelled time", "materialised modelled time", matmuls),
            goal(f"{case}_temp_512_{dtype}", f"{at_head}: temporaries <= {HEAD_TEMP_MIB} MiB",
                 "bytes", fused.get("temp_bytes"), HEAD_TEMP_MIB * 2**20, 1.0, "fused temp bytes",
                 f"{HEAD_TEMP_MIB} MiB"),
        ]
    return goals


def _peer_goal(records: Sequence[dict], dtype: str, shape: tuple[int, ...]) -> dict:
    """Every other function at ``shape``, both modes: jaxloss's bytes <= its peer's, judged
    within 0.1 % of the larger of the peer's and the logits' bytes (the ratio shown is the one
    judged: jaxloss's bytes over the peer's plus that slack)."""
    compared = {
        f"{r['case']} {r['mode']}": (r["impls"]["jaxloss"]["hbm_bytes"],
                                     ox := r["impls"]["optax"]["hbm_bytes"],
                                     ROW_SLACK * max(ox, r["logits_bytes"]))
        for r in records
        if r["case"] not in ("cross_entropy", *HEADS) and r["dtype"] == dtype
        and tuple(r["shape"]) == tuple(shape) and r.get("ratio_to_optax")
    }
    over = sorted(k for k, (jl, ox, slack) in compared.items() if jl > ox + slack)
    worst = max(compared, key=lambda k: compared[k][0] / sum(compared[k][1:]), default=None)
    description = (f"{dtype} every other function at {size(shape)}, fwd and vag: modelled "
                   "HBM <= its optax/jax.nn peer's")
    if worst is None:
        note = "not compiled in this run (the full grid has it; --quick does not)"
        return goal(f"peers_hbm_{dtype}", description, "bytes", None, None, 1.0, "", "", note)
    jl, ox, slack = compared[over[0] if over else worst]
    note = f"{len(compared)} compared; " + (f"over: {', '.join(over)}" if over else
                                            f"largest ratio: {worst}")
    note += "; judged within 0.1% of the larger of the peer's and the logits' bytes"
    result = goal(f"peers_hbm_{dtype}", description, "bytes", jl, ox + slack, 1.0,
                  "jaxloss bytes", "peer bytes + slack", note)
    return {**result, "status": "FAIL" if over else "PASS"}
# fmt: on
