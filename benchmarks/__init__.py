"""Benchmark suite: jaxloss against optax and torch.nn.functional (``python -m benchmarks --help``).

:mod:`benchmarks.cases` (what is timed, its peers), :mod:`benchmarks.grid` (the pytest-benchmark
tests), :mod:`benchmarks.cli` (the command line), :mod:`benchmarks.goals` (goals and verdicts),
:mod:`benchmarks.report` (tables, JSON, plots), :mod:`benchmarks.targets` and
:mod:`benchmarks.hlo` (``--target``: compile-only accelerators, their optimised programs priced).
"""
