"""The custom-VJP plumbing every blockwise op shares.

An op is a hashable object (its static options) with two methods:

- ``forward(diff, data) -> (outputs, saved)``: the outputs and what the backward pass needs
  beyond the inputs (``O(N)`` statistics, or gradients already formed); optionally
  ``primal(diff, data) -> outputs`` for calls that are not differentiated;
- ``backward(diff, data, saved, cotangents) -> cotangents of diff`` (a pytree like ``diff``,
  ``None`` where zero).

``diff`` holds the differentiated arrays (``None`` where absent), ``data`` the rest (targets,
hyperparameters, a constant teacher): it gets no cotangent. What this buys every op: the
backward pass recomputes logit blocks (or scales gradients formed in the forward pass) instead
of storing ``[N, V]`` logits.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol, runtime_checkable

import jax


@runtime_checkable
class Op(Protocol):
    def forward(self, diff: Any, data: Any) -> tuple[Any, Any]: ...

    def backward(self, diff: Any, data: Any, saved: Any, cotangents: Any) -> Any: ...


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def apply(op: Op, diff: Any, data: Any) -> Any:
    """``op``'s outputs, differentiable (reverse mode) in ``diff`` through ``op.backward``.

    Undifferentiated calls run ``op.primal(diff, data)`` where the op has one (a forward rule
    that forms gradients would waste work there), else ``op.forward``'s outputs."""
    primal = getattr(op, "primal", None)
    return op.forward(diff, data)[0] if primal is None else primal(diff, data)


def _apply_fwd(op: Op, diff, data):
    outputs, saved = op.forward(diff, data)
    return outputs, (diff, data, saved)


def _apply_bwd(op: Op, residuals, cotangents):
    diff, data, saved = residuals
    return op.backward(diff, data, saved, cotangents), None


apply.defvjp(_apply_fwd, _apply_bwd)
