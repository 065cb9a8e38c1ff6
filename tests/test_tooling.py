"""Repository hygiene as tests: lint, format, types, typed public API, docs build, docs code.

Each tool runs as a subprocess of the interpreter running pytest (``python -m <tool>``), so it is
the one installed in the same environment. A missing tool FAILS its test (never skips): the
``test`` extra installs all of them, and a check that silently disappears checks nothing.
"""

from __future__ import annotations

import doctest
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxloss

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
TIMEOUT_S = 600

# Public callables: every one must be documented and keep its signature for type checkers.
PUBLIC_FUNCTIONS = sorted(name for name in jaxloss.__all__ if callable(getattr(jaxloss, name)))


def run_tool(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Runs ``python -m <args>`` in the repository root; never raises on a non-zero exit."""
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def assert_clean(proc: subprocess.CompletedProcess[str], tool: str) -> None:
    output = f"{proc.stdout}\n{proc.stderr}"
    assert "No module named" not in proc.stderr, (
        f"{tool} is not installed in this environment; install the `test` extra "
        f'(pip install -e ".[test]").\n{output}'
    )
    assert proc.returncode == 0, f"{tool} reported problems (exit {proc.returncode}):\n{output}"


# ----------------------------------------------------------------------------------------------
# Lint, format, types
# ----------------------------------------------------------------------------------------------


def test_ruff_check_is_clean() -> None:
    assert_clean(run_tool("ruff", "check", "--no-cache", "."), "ruff check")


def test_ruff_format_is_clean() -> None:
    assert_clean(run_tool("ruff", "format", "--check", "--no-cache", "."), "ruff format --check")


def test_pyright_is_clean() -> None:
    """pyright (settings in pyproject's [tool.pyright]) on the package and the examples.

    ``--pythonpath`` points pyright at this interpreter's site-packages, so jax, flax and the
    rest resolve even when the virtual environment is not activated.
    """
    proc = run_tool("pyright", "--pythonpath", sys.executable, "jaxloss", "examples")
    assert_clean(proc, "pyright")


def test_public_api_signatures_are_visible_to_type_checkers(tmp_path: Path) -> None:
    """A misspelt keyword argument must be a type error, and losses must return ``Array``.

    ``jax.jit`` on its own returns a wrapper typed ``(*args, **kwargs) -> Any``, which hides
    every parameter from pyright, mypy and IDE completion; the public functions must keep their
    signatures.
    """
    lines = ["import jax.numpy as jnp", "import jaxloss", ""]
    for name in PUBLIC_FUNCTIONS:
        lines.append(f"jaxloss.{name}(definitely_not_a_parameter=1)")
    lines.append("reveal_type(jaxloss.cross_entropy(jnp.zeros((2, 3)), jnp.array([0, 1])))")
    user_code = tmp_path / "user_code.py"
    user_code.write_text("\n".join(lines) + "\n")
    proc = run_tool("pyright", "--pythonpath", sys.executable, "--outputjson", str(user_code))
    assert "No module named" not in proc.stderr, proc.stderr
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"pyright did not produce a JSON report:\n{proc.stdout}\n{proc.stderr}")
    messages: dict[int, list[str]] = {}
    for diagnostic in report["generalDiagnostics"]:
        line = diagnostic["range"]["start"]["line"]
        messages.setdefault(line, []).append(diagnostic["message"])
    hidden = [
        name
        for line, name in enumerate(PUBLIC_FUNCTIONS, start=3)
        if not any(
            'No parameter named "definitely_not_a_parameter"' in m for m in messages.get(line, [])
        )
    ]
    assert not hidden, f"pyright cannot see the signature of: {hidden}"
    revealed = messages.get(3 + len(PUBLIC_FUNCTIONS), [])
    assert any(m.endswith('is "Array"') for m in revealed), revealed


# ----------------------------------------------------------------------------------------------
# Documentation
# ----------------------------------------------------------------------------------------------


def test_mkdocs_build_strict_documents_every_public_function(tmp_path: Path) -> None:
    """The site builds with no warning (broken links, anchors, docstrings), offline."""
    site = tmp_path / "site"
    proc = run_tool(
        "mkdocs", "build", "--strict", "-d", str(site), env={"NO_MKDOCS_2_WARNING": "1"}
    )
    assert_clean(proc, "mkdocs build --strict")
    html = "\n".join(page.read_text(encoding="utf-8") for page in site.rglob("*.html"))
    missing = [name for name in PUBLIC_FUNCTIONS if f'id="jaxloss.{name}"' not in html]
    assert not missing, f"no API entry (::: jaxloss.NAME) in docs/ for: {missing}"


# ```pycon blocks (possibly indented inside list items) are doctests; ```python blocks must parse.
_FENCE = re.compile(
    r"^(?P<indent>[ ]*)```(?P<lang>pycon|python)\n(?P<body>.*?)^(?P=indent)```", re.S | re.M
)
DOC_PAGES = sorted(DOCS.glob("*.md"))


def _blocks(page: Path, lang: str) -> list[tuple[int, str]]:
    text = page.read_text(encoding="utf-8")
    return [
        (text[: m.start()].count("\n") + 1, textwrap.dedent(m.group("body")))
        for m in _FENCE.finditer(text)
        if m.group("lang") == lang
    ]


def test_docs_have_pages() -> None:
    names = {page.name for page in DOC_PAGES}
    expected = {"index.md", "softmax.md", "classification.md", "binary.md", "divergence.md"}
    assert expected <= names, f"missing docs pages: {expected - names}"


@pytest.mark.parametrize("page", DOC_PAGES, ids=lambda p: p.name)
def test_docs_pycon_examples_run(page: Path) -> None:
    """Every ``>>>`` example in the docs prints what it shows; a page's blocks share names."""
    blocks = _blocks(page, "pycon")
    if page.name != "examples.md":  # The examples page shows shell commands only.
        assert blocks, f"{page.name} has no ```pycon example"
    namespace: dict[str, object] = {}
    parser = doctest.DocTestParser()
    failures = []
    # The docs show a user's default JAX configuration (the test suite's conftest raises on rank
    # promotion) and set NumPy print options themselves; restore both afterwards.
    with jax.numpy_rank_promotion("allow"), np.printoptions():
        for line, body in blocks:
            test = parser.get_doctest(body, namespace, f"{page.name}:{line}", str(page), line)
            runner = doctest.DocTestRunner(
                optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
            )
            output: list[str] = []
            result = runner.run(test, out=output.append, clear_globs=False)
            namespace.update(test.globs)
            if result.failed:
                failures.append("".join(output))
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("page", DOC_PAGES, ids=lambda p: p.name)
def test_docs_python_blocks_parse(page: Path) -> None:
    for line, body in _blocks(page, "python"):
        compile(body, f"{page.name}:{line}", "exec")
