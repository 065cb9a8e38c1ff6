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


def test_license_file_ships_with_the_declared_license() -> None:
    """pyproject.toml declares Apache-2.0 and names LICENSE, which holds that license's full
    standard text (so the wheel carries it as License-File)."""
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'^license = "Apache-2.0"$', pyproject, re.M), "license is not Apache-2.0"
    files = re.search(r"^license-files = \[(.*)\]$", pyproject, re.M)
    assert files and '"LICENSE"' in files.group(1), "pyproject.toml does not name LICENSE"
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License\n                           Version 2.0, January 2004" in text
    for clause in ("1. Definitions.", "4. Redistribution.", "9. Accepting Warranty or Additional"):
        assert clause in text, clause
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX: How to apply" in text


def test_docs_build_is_a_static_site_and_formats_signatures() -> None:
    """The README promises a static copy that works offline: pages must be ``page.html`` (with
    directory URLs a browser on file:// shows a directory listing per page) and the search index
    a script (the ``offline`` plugin). mkdocstrings formats the separate signatures with Black or
    Ruff and says it cannot when neither is installed: the ``docs`` extra brings Ruff."""
    config = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    assert re.search(r"^use_directory_urls: false$", config, re.M), "directory URLs are on"
    plugins = re.search(r"^plugins:\n((?:[ #].*\n)+)", config, re.M)
    assert plugins and re.search(r"^  - offline$", plugins.group(1), re.M), "no offline plugin"
    assert re.search(r"^ +separate_signature: true$", config, re.M)
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    docs_extra = re.search(r"^docs = \[(.*?)\]$", pyproject, re.M | re.S)
    assert docs_extra and re.search(r'"(ruff|black)\b', docs_extra.group(1)), docs_extra


def test_install_block_has_every_extra_the_readme_runs() -> None:
    """Each ``pip install -e ".[extra]"`` of a README command (Quick start's ``.[test]`` among
    them) is in the Install block, which says what it brings."""
    install = "\n".join(code_blocks(section("Install"), "bash"))
    listed = set(re.findall(r'pip install -e "\.\[([\w,]+)\]"', install))
    used = set(re.findall(r'pip install -e "\.\[([\w,]+)\]"', README))
    assert used <= listed, f"not in the Install block: {sorted(used - listed)}"


def test_readme_benchmark_flags_exist_and_its_times_are_the_measured_ones() -> None:
    """Every ``--flag`` the README gives ``python -m benchmarks`` is one of its listed flags (the
    goal exit status was renamed from --check), the README states the memory the full grid
    needs, and it quotes the --quick and full-grid times ``--help`` gives, not 'a minute'."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--help"], cwd=REPO, capture_output=True,
        text=True, timeout=TIMEOUT_S, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    flags = set(re.findall(r"(--[a-z][a-z-]+)", proc.stdout))
    text = section("Quick start") + section("Benchmarks")
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    spans = re.findall(r"`([^`]+)`", prose)
    mentioned = {
        flag
        for span in spans
        if "python -m benchmarks" in span or span.startswith("--")
        for flag in re.findall(r"(--[a-z][a-z-]+)", span)
    }
    assert mentioned and mentioned <= flags, f"not flags of the CLI: {sorted(mentioned - flags)}"
    assert "about a minute" not in text and "0.6× optax" not in README
    help_text, quick_start = " ".join(proc.stdout.split()), " ".join(section("Quick start").split())
    assert "7 GB of RAM" in quick_start and "7 GB of RAM" in help_text
    assert "2-5 min on a shared 2-core CPU" in help_text
    assert "2 to 5 minutes on a shared 2-core CPU" in " ".join(section("Benchmarks").split())
