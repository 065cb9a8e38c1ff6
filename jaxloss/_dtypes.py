"""Dtype policy: half-precision inputs accumulate in float32; results keep the input dtype."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def compute_dtype(dtype: Any) -> jnp.dtype:
    """Accumulation dtype: float32 for half-precision inputs, the input's own dtype otherwise."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if jnp.finfo(dtype).bits < 32 else dtype


def upcast(x: jax.Array) -> jax.Array:
    """Upcasts a half-precision array to float32 once, so every accumulation runs in float32."""
    return x.astype(compute_dtype(x.dtype))
