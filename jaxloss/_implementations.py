"""Which implementation each backend gets, and the dispatch between them (issue 17 item 3).

``implementation=None`` is resolved when the program is lowered (``jax.lax.platform_dependent``),
so a program compiled here for a TPU gets the TPU form; ``"xla"`` forces the portable XLA form,
``"pallas"`` the kernel (an error where there is none).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jaxloss import _cross_entropy_pallas, _targets

IMPLEMENTATIONS = (None, "xla", "pallas")

# The default per backend, from modelled value_and_grad of cross_entropy's mean (index targets,
# 8192×131072, compile-only: HBM bytes of the optimised program over the copy floor, one read of
# the logits and one write of the gradient; docs/classification.md). TPU v5e, v5p and v6e, f32
# and bf16: the Pallas kernel 1.0002-1.0003x, the XLA form 1.50x (its backward reads the logits
# again). CUDA: no kernel (a 131072-wide row exceeds one SM's shared memory), XLA 1.5x. CPU: the
# XLA form (tests/test_memory.py and the CPU benchmark pin its programs).
#
# The fused linear heads: the XLA forms (jaxloss._blockwise) on every backend. linear_cross_entropy
# has Pallas TPU kernels (registered in LINEAR_KERNELS by jaxloss._linear.api; modelled v5p
# value_and_grad 38.6 ms against the XLA form's 51.6 ms and the materialised 31.1 ms, bf16
# 8192x2048x131072), taken with implementation="pallas" only: Mosaic kernels cannot be partitioned
# by XLA, and the head has no lowering-time fallback yet (as cross_entropy's kernel has) for
# programs spread over several chips without shard_map. Figures in docs/linear.md.
_XLA_EVERYWHERE = {"tpu": "xla", "cuda": "xla", "rocm": "xla", "cpu": "xla"}
DEFAULTS = {
    "cross_entropy": {"tpu": "pallas", "cuda": "xla", "rocm": "xla", "cpu": "xla"},
    "linear_cross_entropy": _XLA_EVERYWHERE,
    "linear_distillation": _XLA_EVERYWHERE,
}
# The seam for Pallas kernels of the fused heads: function -> {backend: kernel}. A kernel takes
# the operands of the XLA form it replaces, as the caller passes them to linear_head
# (linear_cross_entropy: ``_linear.api._single_device(problem, options, hyper, chunks)``,
# returning ``(loss, (lse, argmax, entropy))``; linear_distillation:
# ``_distillation._loss(student, teacher, mask, cfg, reduction)``, returning the loss). A kernel
# registers itself here (jaxloss/_linear/api.py: the linear head's TPU kernels).
LINEAR_KERNELS: dict[str, dict[str, Callable[..., Any]]] = {
    "linear_cross_entropy": {},
    "linear_distillation": {},
}
# torch_linear_cross_entropy runs linear_cross_entropy's implementations.
_SAME_KERNELS = {"torch_linear_cross_entropy": "linear_cross_entropy"}


def check(fn: str, implementation: Any) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"{fn}: `implementation` must be None (each backend's default), 'xla' or 'pallas' "
            f"(the TPU kernel); got {implementation!r}"
        )


def _kernels_everywhere() -> str:
    found = [
        f"{fn} on {platform}"
        for fn, table in DEFAULTS.items()
        for platform in (*table, *LINEAR_KERNELS.get(fn, {}))
        if table.get(platform) == "pallas" or platform in LINEAR_KERNELS.get(fn, {})
    ]
    return ", ".join(dict.fromkeys(found)) or "none"


def check_linear(fn: str, implementation: Any) -> None:
    """``implementation`` of a fused linear head, checked at call time: ``"pallas"`` raises a
    ``ValueError`` where no backend has a kernel of the head (naming what exists)."""
    check(fn, implementation)
    kernels = LINEAR_KERNELS[_SAME_KERNELS.get(fn, fn)]
    if implementation == "pallas" and not kernels:
        raise ValueError(
            f"{fn}: implementation='pallas' has no kernel on the {jax.default_backend()} "
            f"backend, nor on any other: {fn} has only its XLA form so far (Pallas kernels exist "
            f"for: {_kernels_everywhere()}). Use implementation=None (each backend's default, "
            "the XLA form everywhere) or 'xla'"
        )


def linear_head(fn: str, implementation: Any, xla: Callable[..., Any], *operands) -> Any:
    """``fn``'s outputs by ``implementation``: ``xla(*operands)`` (the XLA form), or a kernel
    of :data:`LINEAR_KERNELS` on the operands, chosen per backend when the program is lowered
    (``None``: where :data:`DEFAULTS` names it; ``"pallas"``: wherever one exists, an error
    where none does)."""
    kernels = LINEAR_KERNELS[fn]
    chosen = {
        platform: kernel
        for platform, kernel in kernels.items()
        if implementation == "pallas" or DEFAULTS[fn].get(platform) == "pallas"
    }
    if implementation == "xla" or not chosen:
        return xla(*operands)
    default = lambda: xla(*operands)
    if implementation == "pallas":
        default = lambda: jax.tree.map(lambda x: _no_kernel(fn, x), xla(*operands))
    branches = {
        platform: functools.partial(kernel, *operands) for platform, kernel in chosen.items()
    }
    return jax.lax.platform_dependent(default=default, **branches)


def refuse_pallas(fn: str, implementation: Any, case: str) -> None:
    """A ``ValueError`` at trace time for ``"pallas"`` where the kernel does not take the case."""
    if implementation == "pallas":
        raise ValueError(
            f"{fn}: implementation='pallas' has no kernel for {case}; the Pallas TPU kernel "
            "takes index targets with the classes on the last axis, float32/bfloat16/float16 "
            "logits whose row fits VMEM. Use implementation=None or 'xla' (the XLA form)"
        )


def _unsupported_case(z: jax.Array, axis: int) -> str | None:
    if axis != z.ndim - 1:
        return f"the class axis {axis} of logits with shape {tuple(z.shape)} (not the last)"
    if z.size == 0:
        return f"empty logits of shape {tuple(z.shape)}"
    if any(_targets.explicit_spec(z)):
        # The kernel's row inputs are stacked into one array, which explicit sharding types
        # per operand; the XLA form is partitioned by XLA instead.
        return f"explicitly sharded logits ({_targets.explicit_spec(z)})"
    rows = int(jnp.size(z)) // max(z.shape[-1], 1)
    if not _cross_entropy_pallas.supported(rows, z.shape[-1], z.dtype):
        return f"logits of {z.dtype} with {z.shape[-1]} classes (a row block must fit VMEM)"
    return None


def index_cross_entropy(implementation, xla, axis: int, z, d, reduction: str) -> jax.Array:
    """Reduced index cross-entropy by ``implementation``; ``xla(axis, z, d, reduction)`` is the
    XLA form, ``d`` the ``_classification._Index`` data. Float32 (the caller casts)."""
    fn = "cross_entropy"
    unsupported = _unsupported_case(z, axis)
    if implementation == "xla" or (implementation is None and unsupported):
        return xla(axis, z, d, reduction)
    if unsupported:
        refuse_pallas(fn, implementation, unsupported)

    def pallas(z, d):
        flat = jax.tree.map(lambda a: a.reshape(-1), (d.targets, d.idx))
        out = _cross_entropy_pallas.index_cross_entropy(
            z.reshape(-1, z.shape[-1]),
            d._replace(targets=flat[0], idx=flat[1]),
            reduction,
            fallback=implementation is None,
        )
        return out.reshape(z.shape[:-1]) if reduction == "none" else out

    if implementation == "pallas" and _cross_entropy_pallas.INTERPRET:
        return pallas(z, d)  # tests: the kernel in interpret mode on any backend
    if implementation is None:
        default = lambda z, d: xla(axis, z, d, reduction)
    else:
        default = lambda z, d: _no_kernel(fn, xla(axis, z, d, reduction))
    kernels = {p: pallas for p, impl in DEFAULTS[fn].items() if impl == "pallas"}
    return jax.lax.platform_dependent(z, d, default=default, **kernels)


# "pallas" on a backend without a kernel: the backend is known only when the program is lowered
# (platform_dependent traces every branch), so the refusal is a primitive whose lowering raises.
_no_kernel_p = Primitive("jaxloss_no_pallas_kernel")
_no_kernel_p.def_abstract_eval(lambda x, **_: x)
ad.primitive_jvps[_no_kernel_p] = lambda p, t, **kw: (_no_kernel_p.bind(*p, **kw), t[0])
batching.primitive_batchers[_no_kernel_p] = lambda a, d, **kw: (_no_kernel_p.bind(*a, **kw), d[0])


def _no_kernel(fn: str, x: jax.Array) -> jax.Array:
    return _no_kernel_p.bind(x, fn=fn)


def _refuse_lowering(ctx, x, *, fn):
    platforms = ", ".join(ctx.module_context.platforms)
    kernels = [p for p, impl in DEFAULTS[fn].items() if impl == "pallas"]
    kernels += [p for p in LINEAR_KERNELS.get(fn, {}) if p not in kernels]
    raise ValueError(
        f"{fn}: implementation='pallas' has no kernel for the {platforms} backend (Pallas "
        f"kernels exist for: {', '.join(kernels)}). Use implementation=None (each backend's "
        "default) or 'xla'"
    )


mlir.register_lowering(_no_kernel_p, _refuse_lowering)
