"""Smoke test of ``python -m benchmarks`` as a user runs it: a tiny grid, its output and files.

Every run is a subprocess of the interpreter running pytest, in the repository root (the later
run in a directory of its own), and the assertions read what a user reads: the exit status, the
printed table, ``results.json``, ``table.txt`` and the PNGs. The argument parser's answers
(``--help``, bad ``--sizes``) and the report's units are checked in this process, through
``benchmarks.cli`` and ``benchmarks.report``.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import user_environ

from benchmarks import cli

# Subprocesses that time and compile (about 45 s together): the full suite's.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FUNCTIONS = ("cross_entropy", "log_softmax")  # a scalar loss and an array-valued function
GOAL_SIZE = "4096x32768"  # where the README's speed and memory goals are defined
SMALL, LARGER = "128x10", "1024x2048"  # 5 KiB and 8 MiB of logits
TIMEOUT_S = 600


def benchmarks(*args: str, cwd: Path = REPO) -> subprocess.Popen[str]:
    """Starts ``python -m benchmarks ARGS`` in ``cwd``, the repository importable (CPU)."""
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks", *args],
        cwd=cwd, env=user_environ(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO)), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    return proc.returncode, stdout, stderr


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = [
        "--sizes", f"{SMALL},{LARGER}", "--dtypes", "f32", "--repeats", "1", "--no-progress",
        "--filter", "^cross_entropy$,log_softmax", "--out", str(out), "--fail-on-goal",
        "--", "--benchmark-save=smoke", f"--benchmark-storage=file://{out / 'storage'}",
    ]  # fmt: skip
    code, stdout, stderr = finish(benchmarks(*argv))
    assert (out / "results.json").is_file(), f"exit {code}\n{stdout}\n{stderr[-4000:]}"
    return out, (code, stdout, stderr), json.loads((out / "results.json").read_text())


def _records(saved: dict, size: str) -> list[dict]:
    return [r for r in saved["results"] if "x".join(map(str, r["shape"])) == size]


def test_exit_status_is_the_goal_check(smoke):
    """``--fail-on-goal``: exit 1 exactly when a goal FAILs (INCONCLUSIVE and N/A do not)."""
    (code, _, stderr), saved = smoke[1], smoke[2]
    failed = [g["id"] for g in saved["goals"] if g["status"] == "FAIL"]
    assert code == (1 if failed else 0), (failed, stderr[-4000:])


def test_printed_table_fits_100_columns(smoke):
    stdout = smoke[1][1]
    wide = [line for line in stdout.splitlines() if len(line) > 100]
    assert not wide, "\n".join(wide)
    assert "function" in stdout and "goals:" in stdout and "cross_entropy" in stdout


def test_metadata(smoke):
    meta = smoke[2]["meta"]
    for key in ("date", "backend", "device", "versions", "shapes", "dtypes", "settings"):
        assert meta[key], key
    # The device says what it is, not just the platform twice ("cpu: cpu").
    platform_name, _, kind = meta["device"].partition(": ")
    assert kind and kind != platform_name, meta["device"]
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
        r for r in _records(smoke[2], SMALL)
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
        assert entry["rounds"] == 1 and entry["median_s"] > 0 and entry["calls_per_round"] >= 1
        assert entry["elements_per_s"] == pytest.approx(r["elements"] / entry["median_s"])
        assert entry["temp_bytes"] is None or entry["temp_bytes"] >= 0
        assert entry["hlo_ops"] is None or sum(entry["hlo_ops"].values()) >= 1
    # One figure: the ratio is that of the medians printed beside it.
    jl, ox = (r["impls"][k]["median_s"] for k in ("jaxloss", "optax"))
    assert r["ratio_to_optax"]["jaxloss"] == pytest.approx(jl / ox)
    # The peers must compute the same values and gradients, or the timings compare nothing.
    assert r["agrees"], r["agreement"]
    assert set(r["agreement"]) == set(r["impls"]) - {"jaxloss"}
    assert all(0 <= e <= r["tolerance"] for e in r["agreement"].values()), r["agreement"]


def test_medians_are_pytest_benchmarks(smoke):
    """Each time is pytest-benchmark's median of its rounds, divided by nothing: one round of
    ``calls_per_round`` calls is timed as one, and the stats are per call."""
    saved = json.loads((smoke[0] / "pytest-benchmark.json").read_text())
    by_name = {
        (b["extra_info"]["benchmark"], b["extra_info"]["impl"]): b for b in saved["benchmarks"]
    }
    for r in smoke[2]["results"]:
        for impl, entry in r["impls"].items():
            if "median_s" in entry:
                stats = by_name[r["name"], impl]["stats"]
                assert entry["median_s"] == stats["median"] and entry["rounds"] == stats["rounds"]
                assert entry["calls_per_round"] == stats["iterations"]


def test_goal_memory_is_compiled_without_running(smoke):
    memory = [r for r in smoke[2]["results"] if r["memory_only"]]
    assert sorted(r["dtype"] for r in memory) == ["bf16", "f32"]
    for r in memory:
        assert r["case"] == "cross_entropy" and "x".join(map(str, r["shape"])) == GOAL_SIZE
        assert "median_s" not in r["impls"]["jaxloss"] and "torch" not in r["impls"]


def _median_interval(values: list[float]) -> tuple[float, float]:
    """95% order-statistic interval of the median (sign test), written out independently."""
    x, n = sorted(values), len(values)
    k = max(j for j in range(n + 1) if sum(math.comb(n, i) for i in range(j)) / 2**n <= 0.025)
    return x[k - 1], x[n - k]


def test_goals(smoke):
    goals = {g["id"]: g for g in smoke[2]["goals"]}
    assert set(goals) == {
        "ce_vag_f32_vs_optax", "ce_vag_bf16_vs_optax", "ce_vag_bf16_vs_f32",
        "ce_fwd_small_vs_optax", "ce_vag_small_vs_optax", "ce_vag_temp_f32", "ce_vag_temp_bf16",
        "linear_vag_vs_materialised",
    }  # fmt: skip
    # 128x10 is measured on this grid, 4096x32768 is not (memory is compiled regardless).
    for measured in ("ce_fwd_small_vs_optax", "ce_vag_small_vs_optax"):
        g = goals[measured]
        ratios = g["check"]["ratios"]
        assert len(ratios) == g["rounds"] >= 7
        assert g["ratio"] == pytest.approx(statistics.median(ratios))
        lo, hi = g["interval"]
        assert (lo, hi) == pytest.approx(_median_interval(ratios))
        # PASS and FAIL only when the whole interval is on one side of the goal.
        expected = "PASS" if hi <= g["threshold"] else "FAIL" if lo > g["threshold"] else None
        assert g["status"] == (expected or "INCONCLUSIVE"), g
        if g["status"] != "INCONCLUSIVE":
            assert g["status"] == ("PASS" if g["ratio"] <= g["threshold"] else "FAIL")
    assert goals["ce_vag_f32_vs_optax"]["status"] == "N/A"
    assert goals["linear_vag_vs_materialised"]["status"] == "N/A"  # not on this grid
    if goals["ce_vag_temp_f32"]["lhs"] is not None:  # None where XLA has no memory analysis
        assert goals["ce_vag_temp_f32"]["status"] in ("PASS", "FAIL")


def test_files(smoke):
    out = smoke[0]
    pngs = [f"throughput_{f}.png" for f in FUNCTIONS] + ["temp_memory.png", "ratio_to_optax.png"]
    assert json.loads((out / "pytest-benchmark.json").read_text())["benchmarks"]
    for name in pngs:
        data = (out / name).read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC), name
    assert sorted(smoke[2]["meta"]["plots"]) == sorted(pngs)
    table = (out / "table.txt").read_text()
    assert "goals:" in table and "byte model" in table and "cross_entropy" in table


@pytest.fixture(scope="module")
def later_run(smoke, tmp_path_factory):
    """A second run as a user starts one, in a directory of its own without ``--out``: nll and
    cross_entropy forward, compared (arguments after ``--``) with the smoke run's saved rounds."""
    cwd = tmp_path_factory.mktemp("later")
    argv = [
        "--sizes", SMALL, "--dtypes", "f32", "--modes", "fwd", "--repeats", "1", "--no-torch",
        "--no-progress", "--filter", "^cross_entropy$,^nll$",
        "--", f"--benchmark-storage=file://{smoke[0] / 'storage'}", "--benchmark-compare",
        "--benchmark-compare-fail=median:100000%",
    ]  # fmt: skip
    code, _, stderr = finish(benchmarks(*argv, cwd=cwd))
    assert code == 0, stderr[-4000:]
    return cwd, stderr


def test_a_run_compares_with_the_saved_one(later_run):
    """Arguments after ``--`` go to pytest-benchmark: a later run compares with the smoke run's
    saved rounds (``--benchmark-compare``; past the threshold it exits 1)."""
    stderr = later_run[1]
    assert "0001_smoke" in stderr and "(NOW)" in stderr, stderr[-4000:]


@pytest.fixture(scope="module")
def quick_plan() -> list[tuple[str, list[str]]]:
    """``(benchmark name, implementations)`` per line of ``--quick --dry-run --no-torch``."""
    code, stdout, stderr = finish(benchmarks("--quick", "--dry-run", "--no-torch"))
    assert code == 0, stderr[-4000:]
    lines = [line.split() for line in stdout.splitlines() if line.count("/") == 3]
    assert lines, stdout
    return [(name, impls.split(",")) for name, impls in lines]


def test_quick_plan_has_the_goal_point_and_one_bf16_point(quick_plan):
    bf16 = [name for name, _ in quick_plan if name.split("/")[2] == "bf16"]
    # Timed (mode "vag", not "vag-mem"): --quick measures the goal point itself.
    assert bf16 == [f"cross_entropy/vag/bf16/{GOAL_SIZE}"]
    assert any(name.endswith(f"/f32/{GOAL_SIZE}") for name, _ in quick_plan)
    assert {name.split("/")[0] for name, _ in quick_plan} >= {
        "cross_entropy", "nll", "bce", "kl_div", "entropy"
    }  # fmt: skip


def test_no_torch_cases_have_no_torch_peer(quick_plan, smoke):
    assert all("torch" not in impls and "jaxloss" in impls for _, impls in quick_plan)
    # ... while the same cases have one when torch is in (the test extra installs it).
    assert all("torch" in case["impls"] for case in smoke[2]["meta"]["cases"].values())


def test_expected_duration_and_quick_are_announced(smoke):
    stderr = smoke[1][2]
    assert "expected" in stderr and "--quick" in stderr, stderr[-2000:]


BAD_SIZES = ["128", "128x", "0x10", "ax3", "1x2x3"]


@pytest.mark.parametrize("bad", BAD_SIZES)
def test_bad_sizes_are_rejected(bad, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.parse(["--sizes", bad, "--dry-run"])
    stderr = capsys.readouterr().err
    assert exited.value.code == 2 and "sizes look like 128x10,1024x1000" in stderr, stderr


# ----------------------------------------------------------------------------------------------
# What a first run reads: flag help, where the files go, the units and ratios it shows (the
# report fed records whose figures are known).
# ----------------------------------------------------------------------------------------------


def test_help_explains_every_flag_and_old_names_still_work(capsys):
    """``--dtypes`` and ``--modes`` have help; the goal exit status and the peer agreement check
    have names that say which is which (``--check``/``--no-check`` still parse, unlisted)."""
    with pytest.raises(SystemExit) as exited:
        cli.parse(["--help"])
    assert exited.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--dtypes DTYPES comma-separated input dtypes" in help_text, help_text
    assert "--modes MODES comma-separated modes to run: fwd" in help_text, help_text
    assert "--fail-on-goal exit with status 1 if a goal FAILs" in help_text, help_text
    assert "--no-peer-check do not compare each peer's output" in help_text, help_text
    assert "--check" not in help_text and "--no-check" not in help_text, help_text
    assert "default: ./bench_out" in help_text, help_text
    old, _ = cli.parse(["--check", "--no-check", "--dry-run", "--quick", "--no-torch"])
    assert old.fail_on_goal and old.no_peer_check and old.dry_run


def test_results_go_to_bench_out_without_out_and_nll_counts_rows(later_run):
    """Without ``--out`` a run writes ``./bench_out`` and says where; nll's throughput (a gather:
    one element read per row) is in rows per second, not logits elements per second."""
    cwd, stderr = later_run
    out = cwd / "bench_out"
    assert "to bench_out/ (--out DIR to change)" in stderr, stderr[-2000:]
    assert (out / "table.txt").is_file() and (out / "throughput_nll.png").is_file()
    results = json.loads((out / "results.json").read_text())["results"]
    (record,) = [r for r in results if r["case"] == "nll"]

    from benchmarks import report

    assert report.throughput_unit("nll") == "rows (one target each)"
    assert report.throughput_unit("cross_entropy") == "logits elements"
    median = record["impls"]["jaxloss"]["median_s"]
    assert report.throughput(record, "jaxloss") == pytest.approx(128 / median)
    ce_record = {**record, "case": "cross_entropy"}
    assert report.throughput(ce_record, "jaxloss") == pytest.approx(1280 / median)


def test_table_ratio_is_the_ratio_of_the_medians_it_shows():
    """jl/ox is jaxloss's median over optax's, the two times printed beside it (issue 19 item
    14: 955 ms beside 479 ms once read 0.86, a median of per-round ratios)."""
    from benchmarks import grid, report

    record = {
        "case": "cross_entropy", "mode": "vag", "dtype": "f32", "shape": [4096, 32768],
        "shape_names": ["N", "C"], "memory_only": False, "agrees": True, "agreement": {},
        "elements": 4096 * 32768, "logits_bytes": 4096 * 32768 * 4,
        "impls": {"jaxloss": {"median_s": 0.955}, "optax": {"median_s": 0.479}},
    }  # fmt: skip
    grid.finish_record(record)
    assert record["ratio_to_optax"]["jaxloss"] == pytest.approx(0.955 / 0.479)
    row = next(line for line in report.format_table([record]).splitlines()
               if line.startswith("cross_entropy"))  # fmt: skip
    assert row.split()[2:6] == ["955ms", "479ms", "-", "1.99"], row


def test_untimed_goal_notes_name_the_run_that_times_them(quick_plan):
    """--quick times the cross_entropy goals but not the linear one (its grid stops short of
    2048x512x32768): each N/A note says which run would time the goal."""
    from benchmarks import cli, goals
    from benchmarks.cases import all_cases

    quick = cli.quick_goals(all_cases(include_torch=False), "cpu")
    speed_ids = {g.id for g in goals.speed_goals()}
    assert quick == speed_ids - {"linear_vag_vs_materialised"}, quick
    assert not any(name.startswith("linear_cross_entropy/vag/f32/2048x512x32768")
                   for name, _ in quick_plan)  # fmt: skip
    notes = {g["id"]: g["note"] for g in goals.evaluate_goals([], "cpu", {}, quick_times=quick)}
    assert "--quick leaves out 2048x512x32768" in notes["linear_vag_vs_materialised"]
    assert "--filter '^linear_cross_entropy$'" in notes["linear_vag_vs_materialised"]
    expected = "not timed in this run (the full grid and --quick time it)"
    assert notes["ce_vag_f32_vs_optax"] == expected
