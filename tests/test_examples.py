"""The examples run end to end as a user would run them, and reach the promised quality.

Each example runs as a subprocess (``python examples/X.py --out DIR``) so that its imports,
argument parsing and ``__main__`` block are exercised exactly as documented. They need the
``examples`` dependencies (flax, scikit-learn, matplotlib, tqdm): a missing one fails the test
rather than skipping it, since the examples are part of what the package promises.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import user_environ

# Subprocesses that train (about a minute and a half together): the full suite's.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Generous: each example takes ~10 s on an idle 2-core CPU, including JAX start-up.
TIMEOUT_S = 300


def run_example(name: str, out_dir: Path, *flags: str, xla_flags: str = "") -> str:
    """Runs ``examples/<name> --out out_dir [flags]``; returns stdout, failing on exit != 0."""
    env = user_environ(MPLBACKEND="Agg")
    if xla_flags:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {xla_flags}".strip()
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / name), "--out", str(out_dir), *flags],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, (
        f"{name} exited with {proc.returncode}\n--- stdout ---\n{proc.stdout}\n"
        f"--- stderr ---\n{proc.stderr[-4000:]}"
    )
    return proc.stdout


def assert_png(path: Path) -> None:
    assert path.is_file(), f"missing figure {path}"
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC), f"{path} is not a PNG"
    assert len(data) > 5_000, f"{path} is suspiciously small ({len(data)} bytes): empty figure?"


def test_train_digits_reaches_95_percent(tmp_path: Path) -> None:
    stdout = run_example("train_digits.py", tmp_path)
    match = re.search(r"^test accuracy: (\d\.\d+)$", stdout, re.MULTILINE)
    assert match, f"no 'test accuracy: 0.xx' line in:\n{stdout}"
    assert float(match.group(1)) >= 0.95, stdout
    assert_png(tmp_path / "digits_curves.png")


def test_multilabel_prints_f1_per_label(tmp_path: Path) -> None:
    stdout = run_example("multilabel.py", tmp_path)
    for label in ("is_even", "gt_4", "has_loop"):
        match = re.search(rf"^F1 {label}: (\d\.\d+)$", stdout, re.MULTILINE)
        assert match, f"no F1 line for {label} in:\n{stdout}"
        # Seed 0 gives about 0.97-0.98; 0.9 leaves room for other JAX versions and BLAS.
        assert float(match.group(1)) >= 0.9, stdout
    # The softmax contrast must show its structural failure, and the script explains why.
    assert re.search(r"by the multi-label model and 0% by softmax CE", stdout), stdout
    assert "Why: softmax CE models ONE categorical variable" in stdout
    assert_png(tmp_path / "multilabel_curves.png")


def test_per_example_matches_batched_forms(tmp_path: Path) -> None:
    stdout = run_example("per_example.py", tmp_path)
    # The script asserts every agreement itself; check that each check ran and reported a match.
    matches = re.findall(r"^  .+: match \(max \|difference\| \S+\)$", stdout, re.MULTILINE)
    assert len(matches) == 9, stdout
    assert "hardest test images" in stdout
    assert_png(tmp_path / "per_example_grad_norms.png")


# The language-model examples at a reduced size (their full runs take minutes): every stage runs,
# learns and reports; the full-size figures are in docs/examples.md. These runs are compile-bound,
# so XLA:CPU compiles without its LLVM optimisations (about half the compile time).
LM_SMOKE = (
    "--vocab-size", "1024", "--max-files", "12", "--seq-len", "16", "--batch-size", "4",
    "--heads", "2", "--valid-windows", "8", "--log-every", "2",
)  # fmt: skip
FAST_COMPILE = "--xla_backend_optimization_level=0"


def _untrained_perplexities(stdout: str) -> dict[str, float]:
    """``run -> validation perplexity at step 0`` (before training) from an example's output."""
    start = re.findall(r"^(.+): validation perplexity at step 0: ([\d.]+)$", stdout, re.M)
    return {run: float(value) for run, value in start}


def test_lm_linear_head_trains_and_reports_memory(tmp_path: Path) -> None:
    flags = ("--steps", "4", "--dim", "16", "--layers", "1")
    stdout = run_example("lm_linear_head.py", tmp_path, *LM_SMOKE, *flags, xla_flags=FAST_COMPILE)
    vocabulary = re.search(r"vocabulary (\d+) words", stdout)
    assert vocabulary and int(vocabulary.group(1)) == 1024, stdout
    memory = re.search(r"temporaries .*: fused ([\d.]+) MiB, materialised ([\d.]+) MiB", stdout)
    assert memory, f"no head memory report in:\n{stdout}"
    start = _untrained_perplexities(stdout)["lm"]
    final = re.search(r"^validation perplexity: ([\d.]+)$", stdout, re.MULTILINE)
    assert final, f"no 'validation perplexity: X' line in:\n{stdout}"
    assert 1.0 < float(final.group(1)) < start, f"no better than the untrained model:\n{stdout}"
    assert_png(tmp_path / "lm_linear_head_curves.png")


def test_lm_distillation_runs_teacher_and_both_students(tmp_path: Path) -> None:
    flags = (
        "--teacher-steps", "4", "--steps", "3", "--teacher-dim", "16", "--teacher-layers", "1",
        "--student-dim", "8",
    )  # fmt: skip
    stdout = run_example("lm_distillation.py", tmp_path, *LM_SMOKE, *flags, xla_flags=FAST_COMPILE)
    line = re.search(
        r"^student validation perplexity: alone ([\d.]+), distilled ([\d.]+) "
        r"\(teacher ([\d.]+)\)$",
        stdout,
        re.MULTILINE,
    )
    assert line, f"no final perplexity line in:\n{stdout}"
    start = _untrained_perplexities(stdout)
    assert set(start) == {"teacher", "student alone", "student distilled"}, stdout
    runs = ("student alone", "student distilled", "teacher")
    for run, final in zip(runs, line.groups(), strict=True):
        assert 1.0 < float(final) < start[run], f"{run} did not learn:\n{stdout}"
    assert_png(tmp_path / "lm_distillation_curves.png")


@pytest.mark.parametrize(
    "name",
    ["train_digits.py", "multilabel.py", "per_example.py", "lm_linear_head.py",
     "lm_distillation.py"],
)  # fmt: skip
def test_example_has_help(name: str, capsys) -> None:
    """``--help`` works and documents ``--out`` (the flag the docs tell users to pass): the
    example's own parser, in this process (the runs above start each as a user would)."""
    with pytest.raises(SystemExit) as exited:
        _load_example(name).parse_args(["--help"])
    assert exited.value.code == 0
    assert "--out" in capsys.readouterr().out


def _load_example(name: str):
    """Imports ``examples/<name>.py`` as a module (the examples import each other by name)."""
    sys.path.insert(0, str(REPO / "examples"))
    try:
        spec = importlib.util.spec_from_file_location(f"example_{name}", REPO / "examples" / name)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "examples"))
    return module


def test_lm_linear_head_fused_memory_is_at_most_half_and_documented(capsys) -> None:
    """At the example's default shapes (1024 tokens x 128 x 16384) the fused head it trains holds
    at most half the materialised head's compiled temporaries, and docs/examples.md quotes the
    line the example prints (compile only: memory_analysis is deterministic)."""
    lm = _load_example("lm_linear_head.py")
    args = lm.parse_args([])
    n, d, v = args.batch_size * args.seq_len, args.dim, args.vocab_size
    assert (n, d, v) == (1024, 128, 16384)
    options = lm.head_options(args.z_loss, args.soft_cap, args.grad_token_chunk)
    fused, dense = lm.report_head_memory(n, d, v, options)
    assert fused <= 0.5 * dense, (fused, dense)
    printed = capsys.readouterr().out
    docs = " ".join((REPO / "docs" / "examples.md").read_text().split())
    for line in printed.strip().splitlines():
        assert " ".join(line.split()) in docs, f"docs/examples.md does not show:\n{line}"


def test_lm_perplexity_log_axis_has_plain_labels() -> None:
    """A perplexity curve spanning less than a decade gets several plain-number tick labels on
    its log axis (matplotlib's default labels powers of ten only)."""
    lm = _load_example("lm_linear_head.py")
    fig, ax = lm.plt.subplots()
    values = [106.0, 80.0, 60.0, 47.6]
    ax.plot(range(4), values)
    lm.label_log_axis(ax, values)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    lm.plt.close(fig)
    assert labels == ["50", "60", "70", "80", "90", "100"], labels


def test_digits_accuracy_axis_shows_where_accuracy_settles() -> None:
    """The accuracy panel's y-range follows the data from epoch 2 on, not 0 to 1."""
    digits = _load_example("train_digits.py")
    history = {"train_acc": [0.70, 0.93, 0.99, 1.0], "test_acc": [0.89, 0.927, 0.98, 0.996]}
    low, high = digits.accuracy_limits(history)
    assert 0.9 <= low <= 0.927 and 1.0 <= high < 1.01, (low, high)
