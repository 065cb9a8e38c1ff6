"""Test configuration.

- Silent rank promotion is an error, so (N, 1)-vs-(N,) broadcasting bugs cannot hide.
- The compile-only GPU/TPU targets' environment is set before JAX starts.
- Under CI (``CI`` set) hypothesis draws a fixed sequence of examples, so that whether a landing
  passes does not depend on the draw; locally every run explores new examples.
"""

import os

# For tests/test_accelerators.py, set before JAX starts its backends (any test module may start
# them first). libtpu takes a machine-wide lock unless told that other processes may load it too;
# compiling for a TPU needs no exclusive access to one (there is none). The CUDA plugin checks for
# CUDA libraries when JAX starts unless told not to; without a GPU the check fails and the plugin
# (and with it the compile-only H100) is not registered.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

import jax
from hypothesis import settings

jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
