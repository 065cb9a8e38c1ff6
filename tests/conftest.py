"""Test configuration.

- Silent rank promotion is an error, so (N, 1)-vs-(N,) broadcasting bugs cannot hide.
- Under CI (``CI`` set) hypothesis draws a fixed sequence of examples, so that whether a landing
  passes does not depend on the draw; locally every run explores new examples.
"""

import os

import jax
from hypothesis import settings

jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
