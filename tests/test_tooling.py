"""What a user of the public API and of the docs relies on: typed signatures, docs code that runs.

Lint, format, the type check of the code base and the strict docs build are not tests: .ci/run
and .pre-commit-config.yaml run them. What stays here are properties of the package a user sees:
a type checker sees every public signature, every public function has a docs entry, and every
example in the docs prints what it shows. pyright runs as ``python -m pyright`` of the
interpreter running pytest; a missing pyright FAILS (the ``test`` extra installs it).
"""

from __future__ import annotations

import doctest
import json
import re
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import jax
import jaxtyping
import numpy as np
import pytest

import jaxloss

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
TIMEOUT_S = 600

# Public callables: every one must be documented and keep its signature for type checkers.
PUBLIC_FUNCTIONS = sorted(name for name in jaxloss.__all__ if callable(getattr(jaxloss, name)))


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    """Runs ``python -m <args>`` in the repository root; never raises on a non-zero exit."""
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


# ----------------------------------------------------------------------------------------------
# The public API as a type checker sees it
# ----------------------------------------------------------------------------------------------


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
    call = "jaxloss.cross_entropy(jnp.zeros((2, 3)), jnp.array([0, 1]), return_stats=True)"
    lines.append(f"reveal_type({call})")
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
            'No parameter named "definitely_not_a_parameter"' in m
            # an overloaded signature (cross_entropy's return_stats) words the same error so
            or f'No overloads for "{name}" match the provided arguments' in m
            for m in messages.get(line, [])
        )
    ]
    assert not hidden, f"pyright cannot see the signature of: {hidden}"
    revealed = messages.get(3 + len(PUBLIC_FUNCTIONS), [])
    assert any(m.endswith('is "Array"') for m in revealed), revealed
    revealed = messages.get(4 + len(PUBLIC_FUNCTIONS), [])
    assert any(m.endswith('is "tuple[Array, LogitStats]"') for m in revealed), revealed


# ----------------------------------------------------------------------------------------------
# Documentation
# ----------------------------------------------------------------------------------------------


def test_every_public_function_has_an_api_entry() -> None:
    """Each public function is rendered on some docs page (``::: jaxloss.NAME``).

    ``mkdocs build --strict`` (run by .ci/run and pre-commit) renders those entries and fails on
    a broken one; what it cannot notice is a function no page mentions.
    """
    text = "\n".join(page.read_text(encoding="utf-8") for page in DOCS.glob("*.md"))
    entries = set(re.findall(r"^:::[ ]+jaxloss\.(\w+)[ ]*$", text, re.MULTILINE))
    missing = [name for name in PUBLIC_FUNCTIONS if name not in entries]
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


# The pages with a linear head or many examples take 15-25 s each: the full suite's.
SLOW_PAGES = {"linear.md", "classification.md", "distillation.md"}


@pytest.mark.parametrize(
    "page",
    [pytest.param(p, marks=pytest.mark.slow) if p.name in SLOW_PAGES else p for p in DOC_PAGES],
    ids=lambda p: p.name,
)
def test_docs_pycon_examples_run(page: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ``>>>`` example in the docs prints what it shows; a page's blocks share names."""
    # The docs show what a user sees: jaxloss's own errors, not the suite's runtime type checks.
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)
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


@pytest.mark.parametrize("name", PUBLIC_FUNCTIONS)
def test_annotations_evaluate(name: str) -> None:
    """Valid jaxtyping (one variadic dimension per annotation): the hints evaluate."""
    fn = getattr(jaxloss, name)
    hints = typing.get_type_hints(getattr(fn, "__wrapped__", fn))
    assert "return" in hints or isinstance(fn, type), hints


@pytest.mark.parametrize("name", ["cross_entropy", "log_softmax", "bce_with_logits"])
def test_a_transformed_loss_lowers_as_transformed(name: str) -> None:
    """``jax.value_and_grad`` copies a function's attributes (``functools.wraps``): ``lower``
    set on the loss made ``jax.jit(jax.value_and_grad(loss)).lower`` lower the loss alone."""
    import jax
    import jax.numpy as jnp

    import jaxloss

    loss = getattr(jaxloss, name)
    x = jnp.linspace(-1.0, 1.0, 20).reshape(4, 5)
    second = {"cross_entropy": jnp.arange(4), "bce_with_logits": jnp.full((4, 5), 0.5)}
    args = (x, second[name]) if name in second else (x,)

    def total(*a):
        return jnp.sum(loss(*a))

    out = jax.jit(jax.value_and_grad(total)).lower(*args).out_info
    value, grad = out
    assert value.shape == () and grad.shape == x.shape
    direct = jax.jit(jax.value_and_grad(loss if name != "log_softmax" else total)).lower(*args)
    assert len(direct.out_info) == 2, direct.out_info
    assert loss.lower(*args).out_info.shape == jax.eval_shape(loss, *args).shape


@pytest.mark.parametrize("check", ["assert_allclose", "allclose", "isclose"])
def test_an_infinite_tolerance_is_refused(check):
    """conftest.py: a tolerance scaled by an infinite magnitude would accept anything."""
    fn = np.testing.assert_allclose if check == "assert_allclose" else getattr(np, check)
    with pytest.raises(AssertionError, match="accepts any value"):
        fn(1.0, 2.0, atol=np.inf)
    with pytest.raises(AssertionError, match="accepts any value"):
        fn(1.0, 2.0, 1e-6, np.nan)
