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
import numpy as np
from jax.core import ShapedArray
from jax.extend.core import Primitive, jaxpr_as_fun
from jax.interpreters import ad, batching, mlir

from jaxloss import _cross_entropy_pallas, _targets
from jaxloss._cross_entropy_pallas import pallas_tpu

IMPLEMENTATIONS = (None, "xla", "pallas")

# The default per backend, from modelled value_and_grad of cross_entropy's mean (index targets,
# 8192×131072, compile-only: HBM bytes of the optimised program over the copy floor, one read of
# the logits and one write of the gradient; docs/classification.md). TPU v5e, v5p and v6e, f32
# and bf16: the Pallas kernel 1.0002-1.0003x, the XLA form 1.50x (its backward reads the logits
# again). CUDA: no kernel (a 131072-wide row exceeds one SM's shared memory), XLA 1.5x. CPU: the
# XLA form (tests/test_memory.py and the CPU benchmark pin its programs).
#
# linear_cross_entropy on TPU: its Pallas kernels (jaxloss._linear.pallas_tpu, registered in
# LINEAR_KERNELS by jaxloss._linear.api), modelled v5p value_and_grad of the mean at
# 8192x2048x131072 38.55 ms bf16 / 38.64 ms f32 (1.24x / 1.27x the materialised 31.1 / 30.3 ms)
# against the XLA form's 48.2 ms (1.55x), four N·D·V matmuls either way. Taken where the kernels
# take the options (index targets, no bias, no return_stats, hidden and kernel float32 or bf16
# alike) and Mosaic may lower them (one chip, or a fully manual shard_map: the token-sharded
# form, 8 v5p chips 48.59 -> 38.93 ms per chip; the vocabulary-sharded form on an even split,
# tokens over 2 and classes over 4 v5p chips at 8192x2048x32768 per chip, 12.22 -> 9.92 ms): a
# program that XLA partitions over several chips gets the XLA form, forward and backward
# (where_kernel_lowers).
# Everywhere else, and for linear_distillation (no kernel), the XLA forms (jaxloss._blockwise).
# Figures in docs/linear.md.
_XLA_EVERYWHERE = {"tpu": "xla", "cuda": "xla", "rocm": "xla", "cpu": "xla"}
DEFAULTS = {
    "cross_entropy": {"tpu": "pallas", "cuda": "xla", "rocm": "xla", "cpu": "xla"},
    "linear_cross_entropy": {"tpu": "pallas", "cuda": "xla", "rocm": "xla", "cpu": "xla"},
    "linear_distillation": _XLA_EVERYWHERE,
}
# The seam for Pallas kernels of the fused heads: function -> {backend: kernel}. A kernel takes
# the operands of the XLA form it replaces, as the caller passes them to linear_head
# (linear_cross_entropy: ``_linear.api._single_device(problem, options, hyper, chunks)``,
# returning ``(loss, (lse, argmax, entropy))``; linear_distillation:
# ``_distillation._loss(student, teacher, mask, cfg, reduction)``, returning the loss). A kernel
# registers itself here (jaxloss/_linear/api.py: the linear head's TPU kernels); its optional
# ``takes(*operands)`` attribute says whether it takes the case (else ``None`` skips it).
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


def linear_head(
    fn: str, implementation: Any, xla: Callable[..., Any], *operands,
    kernels: dict[str, Callable[..., Any]] | None = None, platform: str | None = None,
) -> Any:  # fmt: skip
    """``fn``'s outputs by ``implementation``: ``xla(*operands)`` (the XLA form), or a kernel
    of :data:`LINEAR_KERNELS` on the operands, chosen per backend when the program is lowered
    (``None``: where :data:`DEFAULTS` names it and the kernel takes the operands, and only
    where Mosaic may lower it, :func:`where_kernel_lowers`; ``"pallas"``: wherever one exists,
    an error where none does or where the program is partitioned by XLA). ``kernels``: in place
    of ``fn``'s row of :data:`LINEAR_KERNELS` (the same backends), for another form of ``fn``.
    ``platform``: the backend, where the caller knows it when tracing (a ``shard_map`` form's
    mesh): chosen then, with no ``platform_dependent`` (whose one-branch conditional XLA keeps
    around the collectives of a ``shard_map`` body)."""
    kernels = LINEAR_KERNELS[fn] if kernels is None else kernels
    chosen = {
        platform: kernel
        for platform, kernel in kernels.items()
        if implementation == "pallas"
        or (DEFAULTS[fn].get(platform) == "pallas" and _takes(kernel, operands))
    }
    if implementation == "xla" or not chosen:
        return xla(*operands)
    default = lambda: xla(*operands)
    if implementation == "pallas":
        default = lambda: jax.tree.map(lambda x: _no_kernel(fn, x), xla(*operands))

    def branch(kernel):
        run = functools.partial(kernel, *operands)
        if implementation is None:
            return lambda: where_kernel_lowers(run, default)
        return lambda: jax.tree.map(lambda x: _one_device(fn, x), run())

    if platform is not None:
        return branch(chosen[platform])() if platform in chosen else default()
    branches = {name: branch(kernel) for name, kernel in chosen.items()}
    return jax.lax.platform_dependent(default=default, **branches)


def _takes(kernel: Callable[..., Any], operands) -> bool:
    """Whether ``kernel`` takes these operands (its ``takes`` predicate; else it falls back to
    the XLA form by itself, and would only be traced twice)."""
    takes = getattr(kernel, "takes", None)
    return takes is None or takes(*operands)


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
            z.reshape(-1, z.shape[-1]), d._replace(targets=flat[0], idx=flat[1]), reduction
        )
        out = out.reshape(z.shape[:-1]) if reduction == "none" else out
        # Where XLA partitions the program the kernel falls back to its formulas in jnp; asked
        # for by name, it raises there instead (ours, not Mosaic's NotImplementedError).
        return out if implementation is None else _one_device(fn, out)

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
def _lowering_check(name: str, lowering: Callable[..., Any]) -> Callable[[str, jax.Array], Any]:
    """``check(fn, x)``: the identity on ``x`` (through autodiff and vmap) whose lowering rule
    ``lowering(ctx, x, fn=fn)`` may raise, once the backend and partitioning are known."""
    prim = Primitive(name)
    prim.def_abstract_eval(lambda x, **_: x)
    ad.primitive_jvps[prim] = lambda p, t, **kw: (prim.bind(*p, **kw), t[0])
    batching.primitive_batchers[prim] = lambda a, d, **kw: (prim.bind(*a, **kw), d[0])
    mlir.register_lowering(prim, lowering)
    return lambda fn, x: prim.bind(x, fn=fn)


def _refuse_lowering(ctx, x, *, fn):
    platforms = ", ".join(ctx.module_context.platforms)
    kernels = [p for p, impl in DEFAULTS[fn].items() if impl == "pallas"]
    kernels += [p for p in LINEAR_KERNELS.get(fn, {}) if p not in kernels]
    raise ValueError(
        f"{fn}: implementation='pallas' has no kernel for the {platforms} backend (Pallas "
        f"kernels exist for: {', '.join(kernels)}). Use implementation=None (each backend's "
        "default) or 'xla'"
    )


_no_kernel = _lowering_check("jaxloss_no_pallas_kernel", _refuse_lowering)


# ----------------------------------------------------------------------------------------------
# Where Mosaic may lower a kernel: decided when the program is lowered, as cross_entropy's
# kernel decides (``_cross_entropy_pallas.pallas_tpu.kernel_may_lower``): on one device or in a
# fully manual shard_map, not in a program XLA partitions over several devices.
# ----------------------------------------------------------------------------------------------

_kernel_lowers_p = Primitive("jaxloss_kernel_lowers")
_kernel_lowers_p.def_abstract_eval(lambda: ShapedArray((), jnp.int32))
mlir.register_lowering(
    _kernel_lowers_p,
    lambda ctx: [mlir.ir_constant(np.int32(pallas_tpu.kernel_may_lower(ctx)))],
)


def where_kernel_lowers(kernel: Callable[[], Any], xla: Callable[[], Any]) -> Any:
    """``kernel()`` where Mosaic may lower it, else ``xla()`` (same outputs).

    Inside ``shard_map`` that is known when tracing (the kernel where every mesh axis is
    manual). Elsewhere, a ``lax.switch`` on an index that lowers to a constant: XLA removes
    the branch not taken. Autodiff makes the backward pass switch on the same index (a residual
    of the forward), so a kernel's forward and backward are taken together. (Inside
    ``shard_map`` that residual would cross the manual region's boundary, where XLA no longer
    sees a constant and keeps both branches.) The kernels guard themselves too
    (:func:`guarded`), for a backward pass lowered apart from its forward pass."""
    mesh = jax.sharding.get_abstract_mesh()
    manual = set(getattr(mesh, "manual_axes", ()))
    if manual:
        return kernel() if manual == set(mesh.axis_names) else xla()
    return jax.lax.switch(_kernel_lowers_p.bind(), [xla, kernel])


# What to do instead of a program XLA partitions, per function (the heads' by default).
_SHARDED_FORM = {"cross_entropy": "call it inside jax.shard_map (each device its own rows)"}
_LINEAR_SHARDED_FORM = "name the mesh axes (mesh=, batch_axis=, vocab_axis=: the shard_map form)"


# The check of implementation="pallas": Mosaic's own error, "cannot be automatically
# partitioned", reached through the kernels' guards, which fall back instead; so an identity on
# the kernel's outputs raises ours when lowered where the kernel cannot be.
def _one_device_lowering(ctx, x, *, fn):
    if not pallas_tpu.kernel_may_lower(ctx):
        sharded = _SHARDED_FORM.get(fn, _LINEAR_SHARDED_FORM)
        raise ValueError(
            f"{fn}: implementation='pallas': the Pallas TPU kernels cannot be partitioned by "
            f"XLA over the several devices of this program; {sharded}, or use "
            "implementation=None (the kernels on one device, the XLA form where XLA partitions "
            "the program) or 'xla'"
        )
    return [x]


_one_device = _lowering_check("jaxloss_pallas_needs_one_device", _one_device_lowering)

# A TPU kernel with its reference: ``kernel(*args)`` lowered where Mosaic may lower it (for a
# TPU, one device or a fully manual shard_map), ``reference(*args)`` (the same outputs in jnp)
# elsewhere. Not differentiable (the kernels sit inside custom_vjp rules); under vmap both
# functions are vmapped. (Interpret-mode kernels, with their callbacks' effects, are called
# directly, not through it.)
_guarded_p = Primitive("jaxloss_guarded_kernel")
_guarded_p.multiple_results = True
_guarded_p.def_abstract_eval(lambda *args, kernel, reference: reference.out_avals)


def guarded(kernel: Callable[..., Any], reference: Callable[..., Any], *args) -> list[jax.Array]:
    """``kernel(*args)`` (a list of arrays) where Mosaic may lower it on a TPU, else
    ``reference(*args)``; both must give the same shapes and dtypes. Both are held as jaxprs
    (the benchmarks price a ``pallas_call`` from its grid, found in the traced program)."""
    kernel_jaxpr, reference_jaxpr = (jax.make_jaxpr(f)(*args) for f in (kernel, reference))
    return _guarded_p.bind(*args, kernel=kernel_jaxpr, reference=reference_jaxpr)


def _guarded_lowering(ctx, *args, kernel, reference):
    on_tpu = set(ctx.module_context.platforms) == {"tpu"}
    chosen = kernel if on_tpu and pallas_tpu.kernel_may_lower(ctx) else reference
    return mlir.lower_fun(jaxpr_as_fun(chosen), multiple_results=True)(ctx, *args)


def _guarded_batched(args, dims, *, kernel, reference):
    moved = [a if d is None else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims, strict=True)]
    axes = [None if d is None else 0 for d in dims]
    batched = lambda jaxpr: jax.vmap(jaxpr_as_fun(jaxpr), in_axes=axes)
    out = guarded(batched(kernel), batched(reference), *moved)
    return out, [0] * len(out)


mlir.register_lowering(_guarded_p, _guarded_lowering)
batching.primitive_batchers[_guarded_p] = _guarded_batched
