"""Test configuration: what every test module shares, set once, before JAX starts its backends.

- Eight CPU devices, so that the sharding tests run in this process on a 2 × 4 mesh (everything
  else runs on the first device, as on a one-device machine).
- Silent rank promotion is an error, so (N, 1)-vs-(N,) broadcasting bugs cannot hide.
- The compile-only GPU/TPU targets' environment is set before JAX starts.
- ``x64``: one test in float64; no test may leave float64 switched on for the next.
- ``slow``: examples, benchmark runs, the multi-process cluster, compile-only accelerator targets,
  large compiles and the layouts, dtypes and shapes that repeat a default test's checks. The
  default run (``python -m pytest``) deselects them; ``python -m pytest --full`` runs everything,
  ``-m slow`` only them. ``accel`` tests need the ``accel`` extra and skip without it.
- Programs compile with LLVM at -O0 in this process (``pytest_configure``); the examples and
  benchmark runs, which train and time, start with the user's ``XLA_FLAGS`` (``user_environ``).
- Under CI (``CI`` set) hypothesis draws a fixed sequence of examples, so that whether a landing
  passes does not depend on the draw; locally every run explores new examples.
- numpy's ``assert_allclose``, ``allclose`` and ``isclose`` refuse an infinite or NaN tolerance:
  one scaled by an infinite magnitude accepts anything (a test that cannot fail).
"""

import functools
import importlib.util
import inspect
import os

# For tests/test_accelerators.py, set before JAX starts its backends (any test module may start
# them first). libtpu takes a machine-wide lock unless told that other processes may load it too;
# compiling for a TPU needs no exclusive access to one (there is none). The CUDA plugin checks for
# CUDA libraries when JAX starts unless told not to; without a GPU the check fails and the plugin
# (and with it the compile-only H100) is not registered.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import settings

NUM_CPU_DEVICES = 8
jax.config.update("jax_num_cpu_devices", NUM_CPU_DEVICES)
jax.config.update("jax_numpy_rank_promotion", "raise")


def _refusing_vacuous_tolerances(check):
    signature = inspect.signature(check)

    @functools.wraps(check)
    def checked(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        for name in ("rtol", "atol"):
            value = bound.arguments.get(name, 0.0)
            if not np.all(np.isfinite(np.asarray(value, np.float64))):
                raise AssertionError(f"{check.__name__}: {name}={value} accepts any value")
        return check(*args, **kwargs)

    return checked


np.testing.assert_allclose = _refusing_vacuous_tolerances(np.testing.assert_allclose)
np.allclose = _refusing_vacuous_tolerances(np.allclose)
np.isclose = _refusing_vacuous_tolerances(np.isclose)

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# The compile-only accelerator targets: the CUDA PJRT plugin and libtpu (the `accel` extra).
ACCEL_PLUGINS = ("jax_plugins.xla_cuda12", "libtpu")
INSTALL_ACCEL = 'pip install -e ".[accel]"'


def _accel_missing() -> list[str]:
    missing = []
    for name in ACCEL_PLUGINS:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a parent package (jax_plugins) is absent
            found = False
        if not found:
            missing.append(name)
    return missing


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--full",
        action="store_true",
        help="also run the tests marked slow (deselected by default)",
    )


def _runs_everything(config: pytest.Config) -> bool:
    return bool(config.getoption("--full") or config.option.markexpr)


# XLA_FLAGS as the user set them, kept before pytest_configure adds -O0. An environment variable:
# pytest-xdist's workers start with the controller's environment, -O0 already in XLA_FLAGS.
USER_XLA_FLAGS = "JAXLOSS_TESTS_USER_XLA_FLAGS"


def user_environ(**extra: str) -> dict[str, str]:
    """``os.environ`` with the user's ``XLA_FLAGS``, and ``extra``: for a subprocess that
    trains or times (an example, a benchmark run) as users run it."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", USER_XLA_FLAGS)}
    user = os.environ.get(USER_XLA_FLAGS, os.environ.get("XLA_FLAGS", ""))
    return env | ({"XLA_FLAGS": user} if user else {}) | extra


def pytest_configure(config: pytest.Config) -> None:
    # The tests' (small) programs compile with LLVM at -O0: the optimised HLO, the buffers, the
    # float semantics and the compile-only GPU/TPU programs are XLA's and unchanged (the v5p and
    # H100 linear heads' optimised HLO is byte-identical), and compiles are shorter (the default
    # run 4:41 against 5:04-5:17, test_sharding's slow checks 73 s against 87 s). Set before JAX
    # starts its backends (at collection).
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ.setdefault(USER_XLA_FLAGS, flags)  # a worker finds the controller's
    if "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()


# pytest-xdist's --dist loadscope hands each worker whole modules, two at a time; a long module
# handed out last leaves the other worker idle. These go first, longest first (seconds of the
# default and the slow run together, measured 2026-12-05: 226, 153, 108, ...); the rest follow
# in collection order.
LONGEST_MODULES = (
    "test_linear_pallas", "test_sharding", "test_classification", "test_distillation",
    "test_linear_extremes", "test_examples", "test_linear", "test_accelerators",
    "test_linear_pallas_tpu", "test_multiprocess", "test_benchmarks", "test_pod",
    "test_cross_entropy_pallas",
)  # fmt: skip


def _longest_first(item: pytest.Item) -> int:
    name = item.path.stem
    return LONGEST_MODULES.index(name) if name in LONGEST_MODULES else len(LONGEST_MODULES)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=_longest_first)  # stable: each module's tests keep their order
    missing = _accel_missing()
    if missing:
        skip = pytest.mark.skip(
            reason=f"compile-only accelerator plugins {missing} not installed: {INSTALL_ACCEL}"
        )
        for item in items:
            if "accel" in item.keywords:
                item.add_marker(skip)
    if _runs_everything(config):
        return
    kept = [item for item in items if "slow" not in item.keywords]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[i for i in items if "slow" in i.keywords])
        items[:] = kept


@pytest.fixture
def x64():
    """Runs one test with float64 enabled, restoring the previous setting afterwards."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(autouse=True)
def _x64_does_not_leak():
    yield
    assert jnp.asarray(1.0).dtype == jnp.float32, "jax_enable_x64 leaked out of a test"


@pytest.fixture
def accelerator_forms(monkeypatch: pytest.MonkeyPatch):
    """``use(recompute=, carry=, reductions=, epilogue=)`` switches this CPU to forms of the
    fused heads that GPUs and TPUs take, for one test (the caches of jitted programs cleared on
    the way in and out, so that no trace of either backend's forms is reused):

    - ``recompute``: linear_cross_entropy's recomputing pass for ``"sum"``/``"mean"``, not the
      fused gradient pass (``api.FUSED_PLATFORMS``);
    - ``carry``: with the hidden gradient carried through the kernel pass
      (``passes.CARRY_PLATFORMS``: four N·D·V matmuls);
    - ``reductions``: each block's max and sums folded in one variadic reduction
      (``online.fold_blocks``), and two row sums taken as one complex sum (``online.row_sums``);
    - ``epilogue``: the recomputing pass sets each row's target entry apart, after the cast
      (``passes.EPILOGUE_PLATFORMS``).
    """
    from jaxloss._blockwise import online, passes
    from jaxloss._linear import api

    def use(
        *, recompute: bool = False, carry: bool = False, reductions: bool = False,
        epilogue: bool = False,
    ) -> None:  # fmt: skip
        if recompute or carry or epilogue:
            monkeypatch.setattr(api, "FUSED_PLATFORMS", ())
        if carry:
            monkeypatch.setattr(passes, "CARRY_PLATFORMS", ("cpu",))
        if epilogue:
            monkeypatch.setattr(passes, "EPILOGUE_PLATFORMS", ("cpu",))
        if reductions:
            monkeypatch.setattr(online, "fold_blocks", online._fold_in_one_pass)
            monkeypatch.setattr(online, "row_sums", online._sums_as_one)
        jax.clear_caches()

    yield use
    jax.clear_caches()


@pytest.fixture(scope="session")
def mesh() -> jax.sharding.Mesh:
    """The eight CPU devices as a 2 × 4 mesh, axes ``data`` and ``model``."""
    devices = jax.devices()
    assert len(devices) == NUM_CPU_DEVICES, (
        f"expected {NUM_CPU_DEVICES} CPU devices, got {devices}: a JAX backend started before "
        "tests/conftest.py set jax_num_cpu_devices"
    )
    return jax.sharding.Mesh(np.array(devices).reshape(2, 4), ("data", "model"))
