"""Benchmark suite: jaxloss against optax and torch.nn.functional.

Run ``python -m benchmarks --help``. Modules: :mod:`benchmarks.cases` (what is timed and its
peers; add new entries there), :mod:`benchmarks.harness` (how it is timed, the byte model),
:mod:`benchmarks.report` (table, goals, JSON, plots), :mod:`benchmarks.cli` (the command line).
"""
