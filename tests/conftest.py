"""Test configuration: silent rank promotion is an error, so (N, 1)-vs-(N,) bugs cannot hide."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
