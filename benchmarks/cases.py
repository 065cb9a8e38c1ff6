"""What is benchmarked: one :class:`Case` per function, with its optax and PyTorch peers.

A case names the arrays it reads (built once per shape and dtype by :class:`Inputs`) and gives
one function per implementation of them, all computing the same number (checked before timing).
To add a benchmark, add a row to :func:`all_cases`. A size is ``(N, C)``, or ``(N, D, V)`` for
the linear heads (logits ``hidden @ kernel``, ``N x V``).
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxloss

Shape = tuple[int, ...]
DTYPES: dict[str, Any] = {"f32": jnp.float32, "bf16": jnp.bfloat16}
CPU_SIZES: tuple[Shape, ...] = ((128, 10), (1024, 1000), (4096, 4096), (4096, 32768))
GPU_SIZES: tuple[Shape, ...] = (*CPU_SIZES, (16384, 131072))
QUICK_SIZES: tuple[Shape, ...] = ((128, 10), (1024, 1000))  # f32; plus the goal points
GOAL_SHAPE: Shape = (4096, 32768)
GOAL_SMALL_SHAPE: Shape = (128, 10)
LINEAR_GOAL_SHAPE: Shape = (2048, 512, 32768)
LABEL_SMOOTHING = 0.1
LINEAR, HEADS = "linear_cross_entropy", ("linear_cross_entropy", "linear_distillation")
MATERIALISED = dict(zip(HEADS, ("jaxloss_materialised", "materialised"), strict=True))


def logits_shape(shape: Shape) -> Shape:
    return (shape[0], shape[2]) if len(shape) == 3 else tuple(shape)


def _normal(scale: float = 1.0, dims: Callable[[Shape], Shape] = logits_shape):
    return lambda i, k: (scale * jax.random.normal(k, dims(i.shape))).astype(i.dtype)


# How each named input array is built: ``(inputs, key) -> array``. Logits are scaled so that the
# softmax is neither flat nor one-hot; a linear head's kernel so that its logits have unit scale.
ARRAYS: dict[str, Callable[[Inputs, jax.Array], jax.Array]] = {
    "logits": _normal(3.0),
    "cotangent": _normal(),
    "index_targets": lambda i, k: jax.random.randint(k, i.shape[:1], 0, i.shape[-1], jnp.int32),
    "prob_targets": lambda i, k: jax.nn.softmax(2 * jax.random.normal(k, i.logits)).astype(i.dtype),
    "log_probs": lambda i, k: jax.nn.log_softmax(i["logits"].astype(jnp.float32)).astype(i.dtype),
    "probs": lambda i, k: (
        jax.nn.sigmoid(i["logits"].astype(jnp.float32)).clip(1e-3, 1 - 1e-3).astype(i.dtype)
    ),
    "binary_targets": lambda i, k: jax.random.uniform(k, i.logits).astype(i.dtype),
    "class_weight": lambda i, k: jax.random.uniform(k, i.logits[-1:], jnp.float32, 0.5, 1.5),
    "hidden": _normal(1.0, lambda s: s[:2]),
    "kernel": lambda i, k: (jax.random.normal(k, i.shape[1:]) / np.sqrt(i.shape[1])).astype(
        i.dtype
    ),
    "teacher_hidden": _normal(1.0, lambda s: s[:2]),
    "teacher_kernel": lambda i, k: ARRAYS["kernel"](i, k),
}


class Inputs:
    """The arrays of one size and dtype, each built on first use from a key of its name and
    shared by every case and implementation (PyTorch gets zero-copy DLPack views)."""

    def __init__(self, shape: Shape, dtype: Any, seed: int = 0):
        self.shape, self.dtype, self.logits = tuple(shape), jnp.dtype(dtype), logits_shape(shape)
        self._key, self._cache = jax.random.key(seed), {}

    def __getitem__(self, name: str) -> jax.Array:
        if name not in self._cache:
            key = jax.random.fold_in(self._key, zlib.crc32(name.encode()))
            self._cache[name] = ARRAYS[name](self, key)
        return self._cache[name]

    def keep(self, names: set[str]) -> None:
        """Drops every array not in ``names``: the biggest shapes hold several GB of inputs."""
        self._cache = {k: v for k, v in self._cache.items() if k in names}


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmarked function: ``impls`` maps an implementation to a function of the arrays
    named by ``arrays`` (JAX, but ``"torch"``: ``torch.Tensor`` views); an array-valued one
    (``scalar=False``) is differentiated through ``sum(f(x) * cotangent)``; ``points(backend,
    quick)``: its own ``(shape, dtype)`` points instead of the grid; ``memory_only``: points
    only compiled."""

    name: str
    description: str
    arrays: tuple[str, ...]
    impls: dict[str, Callable[..., Any]]
    scalar: bool = True
    argnums: int | tuple[int, ...] = 0
    modes: tuple[str, ...] = ("fwd", "vag")
    points: Callable[[str, bool], Sequence[tuple[Shape, str]]] | None = None
    memory_only: tuple[tuple[Shape, str], ...] = ()
    tolerance: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: {"f32": 2e-3, "bf16": 6e-2})  # fmt: skip


def objective(case: Case, fn: Callable, mode: str) -> Callable:
    """The function timed in ``mode``: the loss, or for ``vag`` a scalar to differentiate."""
    if case.scalar or mode == "fwd":
        return fn
    return lambda *a: (fn(*a[:-1]) * a[-1]).sum()


def jax_function(case: Case, fn: Callable, mode: str) -> Callable:
    f = objective(case, fn, mode)
    return f if mode == "fwd" else jax.value_and_grad(f, argnums=case.argnums)


def arg_names(case: Case, mode: str) -> tuple[str, ...]:
    return case.arrays + (("cotangent",) if mode == "vag" and not case.scalar else ())


def abstract_args(case: Case, mode: str, dtype: str, shape: Shape) -> tuple[Any, ...]:
    """``jax.ShapeDtypeStruct`` of the arguments: compiles without allocating anything."""
    inputs = Inputs(shape, DTYPES[dtype])
    return jax.eval_shape(lambda: tuple(inputs[n] for n in arg_names(case, mode)))


# Peers, written with explicit broadcasts (the tests run with rank promotion = "raise").


def _optax_smoothed_weighted(x, y, w):
    """PyTorch's label smoothing and class weights from optax parts: the target term carries
    ``w_y``, the smoothing term ``w_c``; the mean divides by ``sum_n w_{y_n}``."""
    t = optax.smooth_labels(jax.nn.one_hot(y, x.shape[-1], dtype=x.dtype), LABEL_SMOOTHING)
    per_row = optax.softmax_cross_entropy(x, t * w[None, :].astype(x.dtype))
    return per_row.sum() / w[y].sum().astype(per_row.dtype)


def _bce_peer(p, t):
    log_p, log_1mp = jnp.maximum(jnp.log(p), -100), jnp.maximum(jnp.log1p(-p), -100)
    return -(t * log_p + (1 - t) * log_1mp).mean()


def _torch_peers() -> dict[str, Callable[..., Any]]:
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return {}
    return {
        "cross_entropy": lambda x, y: F.cross_entropy(x, y.long()),
        "cross_entropy_probs": F.cross_entropy,
        "cross_entropy_smooth_weight": lambda x, y, w: F.cross_entropy(
            x, y.long(), weight=w.to(x.dtype), label_smoothing=LABEL_SMOOTHING
        ),
        "nll": lambda lp, y: F.nll_loss(lp, y.long()),
        "bce_with_logits": F.binary_cross_entropy_with_logits,
        "bce": F.binary_cross_entropy,
        "kl_div": lambda lq, t: F.kl_div(lq, t, reduction="batchmean"),
        "softmax": lambda x: torch.softmax(x, -1),
        "log_softmax": lambda x: torch.log_softmax(x, -1),
        "entropy": lambda p: torch.special.entr(p).sum(-1).mean(),
        "linear_cross_entropy": lambda h, k, y: F.cross_entropy(h @ k, y.long()),
    }


def _linear_points(backend: str, quick: bool) -> list[tuple[Shape, str]]:
    # bf16 matmuls are emulated (slow) on most CPUs: f32 only there.
    if backend == "cpu":
        full = [(512, 256, 8192), (1024, 512, 16384), LINEAR_GOAL_SHAPE]
        return [(s, "f32") for s in ([(256, 128, 4096), (512, 256, 8192)] if quick else full)]
    big = (8192, 2048, 131072)
    return [(LINEAR_GOAL_SHAPE, "f32")] if quick else [(big, "f32"), (big, "bf16")]


def _distillation_materialised(h, k, th, tk):
    teacher = jax.lax.stop_gradient(jax.nn.log_softmax(th @ tk, axis=-1))
    student = jax.nn.log_softmax(h @ k, axis=-1)
    return jaxloss.kl_div(student, teacher, reduction="batchmean", log_target=True)


def all_cases(include_torch: bool = True) -> list[Case]:
    """Every benchmark, in table order, with its optax (or jax.nn) peer and PyTorch's."""
    tp = _torch_peers() if include_torch else {}
    xy, xt, lp = ("logits", "index_targets"), ("logits", "prob_targets"), ("log_probs",)
    ce_int, ce = optax.softmax_cross_entropy_with_integer_labels, optax.softmax_cross_entropy
    smooth = f"label_smoothing={LABEL_SMOOTHING}"
    # name, description (and what the peer is, where not the same name), arrays, jaxloss, peer
    rows: list[tuple[str, str, tuple[str, ...], Callable, Callable, dict[str, Any]]] = [
        ("cross_entropy", "cross_entropy, int32 index targets, mean", xy, jaxloss.cross_entropy,
         lambda x, y: ce_int(x, y).mean(), {}),
        ("cross_entropy_probs", "cross_entropy, probability targets, mean", xt,
         jaxloss.cross_entropy, lambda x, t: ce(x, t).mean(), {}),
        ("cross_entropy_smooth_weight", f"cross_entropy, index targets, {smooth}, class weights",
         (*xy, "class_weight"),
         lambda x, y, w: jaxloss.cross_entropy(x, y, weight=w, label_smoothing=LABEL_SMOOTHING),
         _optax_smoothed_weighted, {}),
        ("nll", "nll on log-probabilities, index targets, mean (peer: -take_along_axis)",
         (*lp, "index_targets"), jaxloss.nll,
         lambda lp, y: -jnp.take_along_axis(lp, y[:, None], axis=-1).mean(), {}),
        ("bce_with_logits", "bce_with_logits, soft targets, mean", ("logits", "binary_targets"),
         jaxloss.bce_with_logits, lambda x, t: optax.sigmoid_binary_cross_entropy(x, t).mean(), {}),
        ("bce", "bce on probabilities, soft targets, mean (peer: hand-written jnp)",
         ("probs", "binary_targets"), jaxloss.bce, _bce_peer, {}),
        ("kl_div", "kl_div(log_q, t), reduction=batchmean", (*lp, "prob_targets"),
         lambda lq, t: jaxloss.kl_div(lq, t, reduction="batchmean"),
         lambda lq, t: optax.kl_divergence(lq, t).mean(), {}),
        ("softmax", "softmax over the last axis (array output)", ("logits",), jaxloss.softmax,
         jax.nn.softmax, {"scalar": False}),
        ("log_softmax", "log_softmax over the last axis (array output)", ("logits",),
         jaxloss.log_softmax, jax.nn.log_softmax, {"scalar": False}),
        ("entropy", "entropy of probability rows, mean over rows (peer: jax.scipy entr)",
         ("prob_targets",), lambda p: jaxloss.entropy(p).mean(),
         lambda p: jax.scipy.special.entr(p).sum(-1).mean(), {}),
        (LINEAR, "fused linear_cross_entropy(hidden, kernel, y) vs materialised "
         "cross_entropy(hidden @ kernel, y) in jaxloss, optax and torch",
         ("hidden", "kernel", "index_targets"), jaxloss.linear_cross_entropy,
         lambda h, k, y: ce_int(h @ k, y).mean(),
         {"argnums": (0, 1), "points": _linear_points, "tolerance": {"f32": 2e-3, "bf16": 1e-1},
          "memory_only": (((8192, 2048, 131072), "f32"),)}),
    ]  # fmt: skip
    materialised = {"jaxloss_materialised": lambda h, k, y: jaxloss.cross_entropy(h @ k, y)}
    return [Case(name, desc, arrays, {"jaxloss": ours, "optax": peer}
                 | (materialised if name == LINEAR else {})
                 | ({"torch": tp[name]} if name in tp else {}), **extra)
            for name, desc, arrays, ours, peer, extra in rows]  # fmt: skip


def distillation_case() -> Case:
    """``linear_distillation`` (KL, mean, a teacher of the student's size) against the
    ``kl_div`` of both materialised ``log_softmax``es: compiled for the targets only."""
    return Case(HEADS[1], "fused linear_distillation(h, k, h_t, k_t) vs kl_div of the "
                "materialised log-softmaxes", ("hidden", "kernel", "teacher_hidden",
                "teacher_kernel"), {"jaxloss": jaxloss.linear_distillation,
                "materialised": _distillation_materialised},
                argnums=(0, 1), modes=("vag",))  # fmt: skip
