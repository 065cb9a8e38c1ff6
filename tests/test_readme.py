"""The README works as written: its train step runs, and CI runs its test line verbatim."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
TIMEOUT_S = 300


def section(heading: str) -> str:
    """The README's text from ``## heading`` to the next ``## ``."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", README, re.M | re.S)
    assert match, f"README.md has no '## {heading}' section"
    return match.group(1)


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.M | re.S)


@pytest.mark.slow  # a subprocess that trains, as the examples
def test_flax_nnx_train_step_runs_as_shown(tmp_path: Path) -> None:
    """The snippet, saved as a file and run as a script a user would paste, trains."""
    (block,) = code_blocks(section("In a Flax NNX train step"), "python")
    for nnx_api in ("nnx.Module", "nnx.Optimizer", "nnx.value_and_grad", "nnx.jit"):
        assert nnx_api in block, f"the README's train step should show {nnx_api}"
    script = tmp_path / "train_step.py"
    script.write_text(block)
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-4000:]}"
    match = re.search(r"^loss: (\d+\.\d+) -> (\d+\.\d+)$", proc.stdout, re.M)
    assert match, proc.stdout
    first, last = map(float, match.groups())
    assert last < 0.6 * first, (first, last)  # 50 steps of adamw on a separable toy problem


def test_docs_overview_shows_the_same_train_step() -> None:
    """docs/index.md repeats the block; only the README's is run, so they must not drift."""
    (readme_block,) = code_blocks(section("In a Flax NNX train step"), "python")
    docs = (REPO / "docs" / "index.md").read_text(encoding="utf-8")
    assert f"```python\n{readme_block}```" in docs


def test_ci_runs_the_readme_test_line_verbatim() -> None:
    """A newcomer's test command is CI's: the README's line is in .ci/run, character for
    character, and both Quick-start lines create the venv and install from this checkout."""
    blocks = code_blocks(section("Quick start"), "bash")
    lines = [line for block in blocks for line in block.splitlines() if line.strip()]
    assert len(lines) == 2, lines
    bench, test = lines
    assert bench.endswith("python -m benchmarks") and 'pip install -e ".[bench]"' in bench
    assert test.endswith("python -m pytest") and 'pip install -e ".[test]"' in test
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert test in ci, "the README's test line is not a line of .ci/run"
