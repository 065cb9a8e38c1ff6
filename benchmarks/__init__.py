"""Benchmark suite: jaxloss against optax and torch.nn.functional.

Run ``python -m benchmarks --help``. Modules: :mod:`benchmarks.cases` (what is timed and its
peers), :mod:`benchmarks.grid` (the pytest-benchmark tests that time it), :mod:`benchmarks.cli`
(the command line, goal checks), :mod:`benchmarks.report` (table, goals, JSON, plots),
:mod:`benchmarks.compiled` (``--target``: compile-only accelerators), :mod:`benchmarks.hlo` and
:mod:`benchmarks.roofline` (reading and pricing optimised programs).
"""
