"""What is benchmarked: one :class:`Case` per function, with its optax and PyTorch peers.

A case names the arrays it needs (built once per shape and dtype by :class:`Inputs`) and gives
one loss function per implementation. Every implementation of a case receives the same arrays in
the same order and must compute the same number; the harness checks that before it times them.

To add a benchmark, append a :class:`Case` to the list that :func:`all_cases` returns. A case may
bring its own shapes (``points``), its own inputs and its own notion of "logits bytes" (the
denominator of the temporary-memory ratio); the fused ``linear_cross_entropy`` entry at the
bottom is the example, registered only when ``jaxloss`` provides the function.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxloss

Shape = tuple[int, ...]

DTYPES: dict[str, Any] = {"f32": jnp.float32, "bf16": jnp.bfloat16}

# The (batch, classes) grids of the spec. The GPU grid adds the LLM-vocabulary point.
CPU_SIZES: tuple[Shape, ...] = ((128, 10), (1024, 1000), (4096, 4096), (4096, 32768))
GPU_SIZES: tuple[Shape, ...] = (*CPU_SIZES, (16384, 131072))
# --quick: f32 on these sizes; its one bf16 point is the goal point (see cli.plan).
QUICK_SIZES: tuple[Shape, ...] = ((128, 10), (1024, 1000))
# Where the goals are defined (the biggest CPU shape).
GOAL_SHAPE: Shape = (4096, 32768)
GOAL_SMALL_SHAPE: Shape = (128, 10)

LABEL_SMOOTHING = 0.1


class Inputs:
    """Lazily built benchmark arrays for one ``(batch, classes)`` shape and dtype.

    Each array is generated on the default device once and shared by every case and
    implementation that asks for it; PyTorch gets zero-copy DLPack views of the same buffers.
    """

    def __init__(self, shape: Shape, dtype: Any, seed: int = 0):
        self.shape = tuple(shape)
        self.dtype = jnp.dtype(dtype)
        self._key = jax.random.key(seed)
        self._cache: dict[str, jax.Array] = {}

    def _get(self, name: str, build: Callable[[jax.Array], jax.Array]) -> jax.Array:
        # Not blocked here: under jax.eval_shape (memory-only runs) these are tracers.
        if name not in self._cache:
            self._cache[name] = build(jax.random.fold_in(self._key, zlib.crc32(name.encode())))
        return self._cache[name]

    @property
    def num_classes(self) -> int:
        return self.shape[-1]

    def logits(self) -> jax.Array:
        """Standard-normal logits scaled by 3, so the softmax is neither flat nor one-hot."""
        return self._get(
            "logits", lambda k: (3 * jax.random.normal(k, self.shape)).astype(self.dtype)
        )

    def index_targets(self) -> jax.Array:
        """Uniform int32 class indices, shape ``shape[:-1]``."""
        return self._get(
            "index_targets",
            lambda k: jax.random.randint(k, self.shape[:-1], 0, self.num_classes, jnp.int32),
        )

    def prob_targets(self) -> jax.Array:
        """Rows of a softmax of random logits: strictly positive probabilities."""
        return self._get(
            "prob_targets",
            lambda k: jax.nn.softmax(2 * jax.random.normal(k, self.shape)).astype(self.dtype),
        )

    def log_probs(self) -> jax.Array:
        """Log-softmax of :meth:`logits` (the input of nll and kl_div)."""
        return self._get(
            "log_probs",
            lambda k: jax.nn.log_softmax(self.logits().astype(jnp.float32)).astype(self.dtype),
        )

    def probs(self) -> jax.Array:
        """Sigmoid of :meth:`logits`, kept away from 0 and 1 (the input of bce)."""
        return self._get(
            "probs",
            lambda k: jnp.clip(
                jax.nn.sigmoid(self.logits().astype(jnp.float32)), 1e-3, 1 - 1e-3
            ).astype(self.dtype),
        )

    def binary_targets(self) -> jax.Array:
        """Soft binary targets, uniform in ``[0, 1)``."""
        return self._get(
            "binary_targets", lambda k: jax.random.uniform(k, self.shape).astype(self.dtype)
        )

    def class_weight(self) -> jax.Array:
        """Positive per-class weights in ``[0.5, 1.5)``, float32 (as PyTorch users pass them)."""
        return self._get(
            "class_weight",
            lambda k: jax.random.uniform(k, (self.num_classes,), jnp.float32, 0.5, 1.5),
        )

    def cotangent(self) -> jax.Array:
        """Random output cotangent, for the backward pass of array-valued functions."""
        return self._get("cotangent", lambda k: jax.random.normal(k, self.shape).astype(self.dtype))

    def names_of(self, arrays: Sequence[Any]) -> set[str]:
        """The names under which ``arrays`` (the very objects) are cached."""
        return {name for name, v in self._cache.items() if any(v is a for a in arrays)}

    def keep(self, names: set[str]) -> None:
        """Drops every array not in ``names``: the biggest shapes hold several GB of inputs."""
        for name in set(self._cache) - names:
            del self._cache[name]

    def clear(self) -> None:
        """Drops every array."""
        self._cache.clear()


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmarked function and its peers.

    Attributes:
      name: benchmark name (``--filter`` matches substrings of it).
      description: one line for the table legend and the JSON.
      peer_note: how the optax (and PyTorch) peers are built, for the JSON and the legend.
      inputs: builds the argument tuple from an :class:`Inputs`; the first argument is the one
        differentiated (``argnums`` may add more).
      impls: implementation name -> function of the arguments (JAX for every name but
        ``"torch"``, whose function takes ``torch.Tensor`` views of the same arrays). Returns a
        scalar loss, or an array when ``scalar`` is False.
      scalar: whether the functions return a scalar. Array-valued functions (softmax) are
        differentiated through ``sum(f(x) * cotangent)``, with the cotangent as an extra input.
      argnums: the arguments ``value_and_grad`` differentiates.
      modes: which of ``"fwd"`` and ``"vag"`` (forward + backward) to run.
      points: the case's own ``(shape, dtype name)`` points for a backend and quick flag,
        instead of the global grid (``--dtypes`` still filters them).
      memory_only: ``(shape, dtype name)`` pairs, for a backend, that are compiled for the
        temp-memory report but never run (they need not fit in memory).
      logits_shape: the shape of the logits this case reads or would materialise (the unit of
        the temp-memory ratio and of the copy floor); the input shape by default.
      memory_bound: whether the copy-of-the-logits floor is a meaningful bound for this case
        (not for nll, whose forward gathers one entry per row and whose gradient does not
        depend on the input's values, nor for the matmul-bound linear cross-entropy).
      shape_names: the names of the dimensions of a size, for the table.
      tolerance: relative agreement required between implementations, per dtype name.
    """

    name: str
    description: str
    peer_note: str
    inputs: Callable[[Inputs], tuple[jax.Array, ...]]
    impls: dict[str, Callable[..., Any]]
    scalar: bool = True
    argnums: int | tuple[int, ...] = 0
    modes: tuple[str, ...] = ("fwd", "vag")
    points: Callable[[str, bool], Sequence[tuple[Shape, str]]] | None = None
    memory_only: Callable[[str], Sequence[tuple[Shape, str]]] | None = None
    make_inputs: Callable[[Shape, Any], Inputs] = Inputs
    logits_shape: Callable[[Shape], Shape] = lambda shape: shape
    memory_bound: bool = True
    shape_names: tuple[str, ...] = ("N", "C")
    tolerance: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"f32": 2e-3, "bf16": 6e-2}
    )


# ----------------------------------------------------------------------------------------------
# Peers. Written with explicit broadcasts: the test suite runs with rank promotion = "raise".
# ----------------------------------------------------------------------------------------------


def _optax_smoothed_weighted_ce(logits, targets, weight):
    """PyTorch's label smoothing + class weights built from optax parts.

    PyTorch's per-position loss is ``-sum_c w_c t'_c log p_c`` with ``t' = (1-ε) onehot + ε/C``
    (``optax.smooth_labels``): the target term carries ``w_y``, the smoothing term ``w_c``. The
    mean divides by the total weight of the targets, ``sum_n w_{y_n}``.
    """
    num_classes = logits.shape[-1]
    smoothed = optax.smooth_labels(
        jax.nn.one_hot(targets, num_classes, dtype=logits.dtype), LABEL_SMOOTHING
    )
    weighted = smoothed * weight[None, :].astype(logits.dtype)
    per_position = optax.softmax_cross_entropy(logits, weighted)
    return per_position.sum() / weight[targets].sum().astype(per_position.dtype)


def _nll_peer(log_probs, targets):
    return -jnp.take_along_axis(log_probs, targets[:, None], axis=-1).mean()


def _bce_peer(probs, targets):
    log_p = jnp.maximum(jnp.log(probs), -100)
    log_1mp = jnp.maximum(jnp.log1p(-probs), -100)
    return -(targets * log_p + (1 - targets) * log_1mp).mean()


def _entropy_peer(probs):
    return jax.scipy.special.entr(probs).sum(-1).mean()


def _torch_cases() -> dict[str, Callable[..., Any]]:
    """PyTorch peers by case name (empty when torch is not importable)."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return {}
    return {
        "cross_entropy": lambda x, y: F.cross_entropy(x, y.long()),
        "cross_entropy_probs": lambda x, t: F.cross_entropy(x, t),
        "cross_entropy_smooth_weight": lambda x, y, w: F.cross_entropy(
            x, y.long(), weight=w.to(x.dtype), label_smoothing=LABEL_SMOOTHING
        ),
        "nll": lambda lp, y: F.nll_loss(lp, y.long()),
        "bce_with_logits": lambda x, t: F.binary_cross_entropy_with_logits(x, t),
        "bce": lambda p, t: F.binary_cross_entropy(p, t),
        "kl_div": lambda lq, t: F.kl_div(lq, t, reduction="batchmean"),
        "softmax": lambda x: torch.softmax(x, -1),
        "log_softmax": lambda x: torch.log_softmax(x, -1),
        "entropy": lambda p: torch.special.entr(p).sum(-1).mean(),
    }


def _with_torch(name: str, impls: dict[str, Callable], torch_peers: dict) -> dict:
    if name in torch_peers:
        return {**impls, "torch": torch_peers[name]}
    return impls


def all_cases(include_torch: bool = True) -> list[Case]:
    """Every registered benchmark, in table order."""
    tp = _torch_cases() if include_torch else {}
    cases = [
        Case(
            "cross_entropy",
            "cross_entropy, int32 index targets, mean",
            "optax.softmax_cross_entropy_with_integer_labels(x, y).mean(); F.cross_entropy",
            lambda i: (i.logits(), i.index_targets()),
            _with_torch(
                "cross_entropy",
                {
                    "jaxloss": lambda x, y: jaxloss.cross_entropy(x, y),
                    "optax": lambda x, y: optax.softmax_cross_entropy_with_integer_labels(
                        x, y
                    ).mean(),
                },
                tp,
            ),
        ),
        Case(
            "cross_entropy_probs",
            "cross_entropy, probability targets, mean",
            "optax.softmax_cross_entropy(x, t).mean(); F.cross_entropy",
            lambda i: (i.logits(), i.prob_targets()),
            _with_torch(
                "cross_entropy_probs",
                {
                    "jaxloss": lambda x, t: jaxloss.cross_entropy(x, t),
                    "optax": lambda x, t: optax.softmax_cross_entropy(x, t).mean(),
                },
                tp,
            ),
        ),
        Case(
            "cross_entropy_smooth_weight",
            f"cross_entropy, index targets, label_smoothing={LABEL_SMOOTHING}, class weights",
            "optax.softmax_cross_entropy(x, optax.smooth_labels(one_hot(y), eps) * w).sum() "
            "/ w[y].sum() (PyTorch's weighted mean); F.cross_entropy(weight, label_smoothing)",
            lambda i: (i.logits(), i.index_targets(), i.class_weight()),
            _with_torch(
                "cross_entropy_smooth_weight",
                {
                    "jaxloss": lambda x, y, w: jaxloss.cross_entropy(
                        x, y, weight=w, label_smoothing=LABEL_SMOOTHING
                    ),
                    "optax": _optax_smoothed_weighted_ce,
                },
                tp,
            ),
        ),
        Case(
            "nll",
            "nll on log-probabilities, index targets, mean",
            "hand-written -take_along_axis(lp, y).mean(); F.nll_loss",
            lambda i: (i.log_probs(), i.index_targets()),
            _with_torch(
                "nll",
                {
                    "jaxloss": lambda lp, y: jaxloss.nll(lp, y),
                    "optax": _nll_peer,
                },
                tp,
            ),
            memory_bound=False,
        ),
        Case(
            "bce_with_logits",
            "bce_with_logits, soft targets, mean",
            "optax.sigmoid_binary_cross_entropy(x, t).mean(); F.binary_cross_entropy_with_logits",
            lambda i: (i.logits(), i.binary_targets()),
            _with_torch(
                "bce_with_logits",
                {
                    "jaxloss": lambda x, t: jaxloss.bce_with_logits(x, t),
                    "optax": lambda x, t: optax.sigmoid_binary_cross_entropy(x, t).mean(),
                },
                tp,
            ),
        ),
        Case(
            "bce",
            "bce on probabilities, soft targets, mean",
            "hand-written jnp -(t max(log p, -100) + (1-t) max(log1p(-p), -100)).mean(); "
            "F.binary_cross_entropy",
            lambda i: (i.probs(), i.binary_targets()),
            _with_torch(
                "bce",
                {
                    "jaxloss": lambda p, t: jaxloss.bce(p, t),
                    "optax": _bce_peer,
                },
                tp,
            ),
        ),
        Case(
            "kl_div",
            "kl_div(log_q, t), reduction=batchmean",
            "optax.kl_divergence(log_q, t).mean(); F.kl_div(reduction='batchmean')",
            lambda i: (i.log_probs(), i.prob_targets()),
            _with_torch(
                "kl_div",
                {
                    "jaxloss": lambda lq, t: jaxloss.kl_div(lq, t, reduction="batchmean"),
                    "optax": lambda lq, t: optax.kl_divergence(lq, t).mean(),
                },
                tp,
            ),
        ),
        Case(
            "softmax",
            "softmax over the last axis (array output)",
            "jax.nn.softmax; torch.softmax",
            lambda i: (i.logits(),),
            _with_torch("softmax", {"jaxloss": jaxloss.softmax, "optax": jax.nn.softmax}, tp),
            scalar=False,
        ),
        Case(
            "log_softmax",
            "log_softmax over the last axis (array output)",
            "jax.nn.log_softmax; torch.log_softmax",
            lambda i: (i.logits(),),
            _with_torch(
                "log_softmax", {"jaxloss": jaxloss.log_softmax, "optax": jax.nn.log_softmax}, tp
            ),
            scalar=False,
        ),
        Case(
            "entropy",
            "entropy of probability rows, mean over rows",
            "jax.scipy.special.entr(p).sum(-1).mean(); torch.special.entr",
            lambda i: (i.prob_targets(),),
            _with_torch(
                "entropy",
                {
                    "jaxloss": lambda p: jaxloss.entropy(p).mean(),
                    "optax": _entropy_peer,
                },
                tp,
            ),
        ),
    ]
    linear = _linear_cross_entropy_case(tp != {})
    if linear is not None:
        cases.append(linear)
    return cases


# ----------------------------------------------------------------------------------------------
# Hook: fused linear cross-entropy (hidden @ kernel never materialised), when jaxloss has it.
# ----------------------------------------------------------------------------------------------


class LinearInputs(Inputs):
    """Inputs of a fused linear cross-entropy for a size ``(N, D, V)``."""

    def __init__(self, shape: Shape, dtype: Any, seed: int = 0):
        super().__init__(shape, dtype, seed)
        self.n, self.d, self.v = shape

    @property
    def num_classes(self) -> int:
        return self.v

    def hidden(self) -> jax.Array:
        return self._get(
            "hidden", lambda k: jax.random.normal(k, (self.n, self.d)).astype(self.dtype)
        )

    def kernel(self) -> jax.Array:
        # Scaled so the logits have unit variance.
        return self._get(
            "kernel",
            lambda k: (jax.random.normal(k, (self.d, self.v)) / np.sqrt(self.d)).astype(self.dtype),
        )

    def index_targets(self) -> jax.Array:
        return self._get(
            "index_targets", lambda k: jax.random.randint(k, (self.n,), 0, self.v, jnp.int32)
        )


def _linear_cross_entropy_case(with_torch: bool) -> Case | None:
    fused = getattr(jaxloss, "linear_cross_entropy", None)
    if fused is None:
        return None
    impls: dict[str, Callable] = {
        "jaxloss": lambda h, k, y: fused(h, k, y),
        "optax": lambda h, k, y: optax.softmax_cross_entropy_with_integer_labels(h @ k, y).mean(),
        "jaxloss_materialised": lambda h, k, y: jaxloss.cross_entropy(h @ k, y),
    }
    if with_torch:
        import torch.nn.functional as F

        impls["torch"] = lambda h, k, y: F.cross_entropy(h @ k, y.long())

    def points(backend: str, quick: bool) -> list[tuple[Shape, str]]:
        # bf16 matmuls are emulated (slow) on most CPUs: f32 only there. Several sizes, so
        # that its plot shows how the fused path scales.
        if backend == "cpu":
            sizes = [(256, 128, 4096), (512, 256, 8192)]
            if not quick:
                sizes = [(512, 256, 8192), (1024, 512, 16384), (2048, 512, 32768)]
            return [(size, "f32") for size in sizes]
        return (
            [((2048, 512, 32768), "f32")]
            if quick
            else [((8192, 2048, 131072), "f32"), ((8192, 2048, 131072), "bf16")]
        )

    return Case(
        "linear_cross_entropy",
        "fused linear_cross_entropy(hidden, kernel, y) vs cross_entropy(hidden @ kernel, y)",
        "materialised: cross_entropy(h @ k, y) in jaxloss, optax and torch",
        lambda i: (i.hidden(), i.kernel(), i.index_targets()),
        impls,
        argnums=(0, 1),
        points=points,
        memory_only=lambda backend: [((8192, 2048, 131072), "f32")],
        make_inputs=LinearInputs,
        logits_shape=lambda shape: (shape[0], shape[2]),
        memory_bound=False,
        shape_names=("N", "D", "V"),
        tolerance={"f32": 2e-3, "bf16": 1e-1},
    )
