"""Smoke test of the benchmark harness: a tiny grid, run in-process, and its output files."""

from __future__ import annotations

import json
import statistics

import pytest

from benchmarks import cli, harness
from benchmarks.cases import GOAL_SHAPE, all_cases

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FUNCTIONS = ("cross_entropy", "log_softmax")  # a scalar loss and an array-valued function


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = [
        "--sizes", "128x10", "--dtypes", "f32", "--repeats", "1", "--no-progress",
        "--filter", "^cross_entropy$,log_softmax", "--out", str(out),
    ]  # fmt: skip
    payload = cli.run(argv)
    return out, payload, json.loads((out / "results.json").read_text())


def test_json_matches_the_returned_payload(smoke):
    _, payload, saved = smoke
    assert [r["name"] for r in saved["results"]] == [r["name"] for r in payload["results"]]
    assert [g["status"] for g in saved["goals"]] == [g["status"] for g in payload["goals"]]


def test_metadata(smoke):
    meta = smoke[2]["meta"]
    for key in ("date", "backend", "device", "versions", "shapes", "dtypes", "settings"):
        assert meta[key], key
    for package in ("jax", "jaxlib", "optax", "numpy", "python", "torch"):
        assert package in meta["versions"], package
    assert meta["settings"]["min_repeats"] == meta["settings"]["max_repeats"] == 1
    assert [128, 10] in meta["shapes"]
    assert "min_bytes" in meta["byte_model"]
    assert set(meta["cases"]) == set(FUNCTIONS)


@pytest.mark.parametrize("function", FUNCTIONS)
@pytest.mark.parametrize("mode", ["fwd", "vag"])
def test_timed_record(smoke, function, mode):
    records = [
        r for r in smoke[2]["results"]
        if (r["case"], r["mode"], r["memory_only"]) == (function, mode, False)
    ]  # fmt: skip
    assert len(records) == 1
    r = records[0]
    assert r["shape"] == [128, 10] and r["dtype"] == "f32" and r["repeats"] == 1
    assert r["elements"] == 1280 and r["logits_bytes"] == 1280 * 4
    assert r["min_bytes"] >= r["logits_bytes"]
    for impl in ("jaxloss", "optax"):
        entry = r["impls"][impl]
        assert "error" not in entry, entry.get("error")
        assert len(entry["times_s"]) == 1 and entry["median_s"] > 0
        assert entry["elements_per_s"] == pytest.approx(r["elements"] / entry["median_s"])
        assert entry["temp_bytes"] is None or entry["temp_bytes"] >= 0
        assert entry["hlo_ops"] is None or sum(entry["hlo_ops"].values()) >= 1
    # Ratios pair the samples of one round (interleaved), then take the median.
    jl, ox = (r["impls"][k]["times_s"] for k in ("jaxloss", "optax"))
    paired = [a / b for a, b in zip(jl, ox, strict=True)]
    assert r["ratio_to_optax"]["jaxloss"] == pytest.approx(statistics.median(paired))
    assert r["ratio_of_medians"]["jaxloss"] == pytest.approx(
        r["impls"]["jaxloss"]["median_s"] / r["impls"]["optax"]["median_s"]
    )
    # 5 KiB of logits: a copy would time dispatch and caches, so no floor is claimed.
    assert r["floor_s"] is None and r["impls"]["jaxloss"]["copy_fraction"] is None
    # The peers must compute the same values and gradients, or the timings compare nothing.
    assert r["agrees"], r["agreement"]
    assert set(r["agreement"]) == set(r["impls"]) - {"jaxloss"}


def test_goal_memory_is_compiled_without_running(smoke):
    memory = [r for r in smoke[2]["results"] if r["memory_only"]]
    assert sorted(r["dtype"] for r in memory) == ["bf16", "f32"]
    for r in memory:
        assert r["case"] == "cross_entropy" and r["shape"] == list(GOAL_SHAPE)
        assert "median_s" not in r["impls"]["jaxloss"] and "torch" not in r["impls"]


def test_goals(smoke):
    goals = {g["id"]: g for g in smoke[2]["goals"]}
    assert set(goals) == {
        "ce_vag_f32_vs_optax", "ce_vag_bf16_vs_f32", "ce_fwd_small_vs_optax",
        "ce_vag_small_vs_optax", "ce_vag_temp_f32", "ce_vag_temp_bf16",
    }  # fmt: skip
    # 128x10 is measured on this grid, 4096x32768 is not (memory is compiled regardless).
    for measured in ("ce_fwd_small_vs_optax", "ce_vag_small_vs_optax"):
        g = goals[measured]
        assert g["status"] == ("PASS" if g["ratio"] <= g["threshold"] else "FAIL")
    assert goals["ce_vag_f32_vs_optax"]["status"] == "N/A"
    if goals["ce_vag_temp_f32"]["lhs"] is not None:  # None where XLA has no memory analysis
        assert goals["ce_vag_temp_f32"]["status"] in ("PASS", "FAIL")


def test_files(smoke):
    out = smoke[0]
    pngs = [f"throughput_{f}.png" for f in FUNCTIONS] + ["temp_memory.png", "ratio_to_optax.png"]
    for name in pngs:
        data = (out / name).read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC), name
    assert sorted(smoke[2]["meta"]["plots"]) == sorted(pngs)
    table = (out / "table.txt").read_text()
    assert "goals:" in table and "byte model" in table and "cross_entropy" in table


def test_quick_plan_has_the_goal_point_and_one_bf16_point():
    args = cli.build_parser().parse_args(["--quick"])
    tasks = cli.plan(args, all_cases(include_torch=False), "cpu")
    bf16 = [t for t in tasks if t.dtype == "bf16"]
    assert [(t.case.name, t.mode, t.shape, t.memory_only) for t in bf16] == [
        ("cross_entropy", "vag", GOAL_SHAPE, False)
    ]
    assert any(t.shape == GOAL_SHAPE and t.dtype == "f32" for t in tasks)
    assert {t.case.name for t in tasks} >= {"cross_entropy", "nll", "bce", "kl_div", "entropy"}


def test_floor_charges_bandwidth_and_fresh_buffers():
    # Copying 100 B in place takes 1 s (200 B/s moved); into a fresh buffer 3 s, so a fresh
    # output byte costs 0.02 s more. Reading 200 B takes 1 s; writing 100 fresh bytes adds 2 s.
    floor = harness.floor_per_round([1.0, 2.0], [3.0, 2.0], 100, 200, 100)
    assert floor.tolist() == pytest.approx([3.0, 2.0])


def test_no_torch_cases_have_no_torch_peer():
    assert all("torch" not in c.impls for c in all_cases(include_torch=False))


@pytest.mark.parametrize("bad", ["128", "128x", "0x10", "ax3", "1x2x3"])
def test_bad_sizes_are_rejected(bad):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--sizes", bad])
