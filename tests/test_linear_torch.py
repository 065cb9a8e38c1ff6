"""``jaxloss.torch_linear_cross_entropy`` against PyTorch 2.13's ``F.linear_cross_entropy``.

Values and gradients (in ``input``, ``linear_weight``, ``linear_bias`` and ``weight``) in float64
over PyTorch's options: index and probability targets, class weights, ``ignore_index``, label
smoothing, the three reductions, unbatched input and K-dimensional ``linear_weight``
``(C, d_1, ..., d_K, in_features)``. torch is a test dependency: without it these tests fail.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxloss

N, D, C = 5, 4, 9


@dataclasses.dataclass(frozen=True)
class Case:
    out: tuple[int, ...] = ()  # K-dimensional output positions d_1, ..., d_K
    probabilities: bool = False
    weighted: bool = False
    with_bias: bool = True
    reduction: str = "mean"
    ignore_index: int | None = None
    label_smoothing: float = 0.0
    unbatched: bool = False


CASES = {
    "index-none-weighted-ignore": Case(reduction="none", weighted=True, ignore_index=2),
    "index-sum-smoothing-weighted": Case(reduction="sum", weighted=True, label_smoothing=0.2),
    "index-mean-weighted-ignore-smoothing": Case(
        weighted=True, ignore_index=0, label_smoothing=0.1
    ),
    "index-no-bias": Case(with_bias=False, reduction="none"),
    "probs-mean-weighted-smoothing": Case(probabilities=True, weighted=True, label_smoothing=0.3),
    "probs-none": Case(probabilities=True, reduction="none"),
    "kdim-index-mean-weighted-ignore": Case(out=(2, 3), weighted=True, ignore_index=1),
    "kdim-index-none-smoothing": Case(out=(3,), reduction="none", label_smoothing=0.2),
    "kdim-probs-sum-weighted": Case(out=(2,), probabilities=True, weighted=True, reduction="sum"),
    "unbatched-index": Case(unbatched=True, reduction="none", weighted=True),
    "unbatched-probs": Case(unbatched=True, probabilities=True),
}


def _inputs(case: Case, seed: int = 0) -> dict[str, np.ndarray | None]:
    rng = np.random.default_rng(seed)
    batch = () if case.unbatched else (N,)
    x = rng.standard_normal((*batch, D))
    w = rng.standard_normal((C, *case.out, D)) / math.sqrt(D)
    if case.probabilities:
        t = rng.dirichlet(np.ones(C), (*batch, *case.out))  # (..., *out, C)
        t = np.moveaxis(t, -1, len(batch))  # classes after the batch axis, as PyTorch
    else:
        t = rng.integers(0, C, (*batch, *case.out))
        if case.ignore_index is not None and not case.unbatched:
            t.reshape(-1)[[1, 3]] = case.ignore_index
    return {
        "input": x,
        "linear_weight": w,
        "target": t,
        "linear_bias": rng.standard_normal((C, *case.out)) if case.with_bias else None,
        "weight": rng.uniform(0.3, 2.0, C) if case.weighted else None,
    }


DIFFERENTIABLE = ("input", "linear_weight", "linear_bias", "weight")


def _differentiable(case: Case) -> tuple[str, ...]:
    # torch differentiates the class weight only on its probability-target path (nll_loss has
    # no weight gradient); ours for index targets is checked against cross_entropy instead.
    return DIFFERENTIABLE if case.probabilities else DIFFERENTIABLE[:3]


def _torch(case: Case, arrays: dict, cotangent: np.ndarray):
    tensors = {
        k: None if v is None else torch.tensor(v, requires_grad=k in _differentiable(case))
        for k, v in arrays.items()
    }
    loss = torch.nn.functional.linear_cross_entropy(
        tensors["input"], tensors["linear_weight"], tensors["target"],
        linear_bias=tensors["linear_bias"], weight=tensors["weight"], reduction=case.reduction,
        ignore_index=case.ignore_index, label_smoothing=case.label_smoothing,
    )  # fmt: skip
    loss.backward(torch.tensor(cotangent).reshape(loss.shape))
    grads = {
        k: None if tensors[k] is None else tensors[k].grad.numpy() for k in _differentiable(case)
    }
    return loss.detach().numpy(), grads


def _jax(case: Case, arrays: dict, cotangent: np.ndarray):
    target = jnp.asarray(arrays["target"])
    names = [k for k in DIFFERENTIABLE if arrays[k] is not None]

    def f(*values):
        given = dict(zip(names, values, strict=True))
        return jaxloss.torch_linear_cross_entropy(
            given["input"], given["linear_weight"], target,
            linear_bias=given.get("linear_bias"), weight=given.get("weight"),
            reduction=case.reduction, ignore_index=case.ignore_index,
            label_smoothing=case.label_smoothing,
        )  # fmt: skip

    value, vjp = jax.vjp(f, *(jnp.asarray(arrays[k]) for k in names))
    grads = dict(zip(names, vjp(jnp.asarray(cotangent).reshape(value.shape)), strict=True))
    return np.asarray(value), {k: grads.get(k) for k in DIFFERENTIABLE}


@pytest.mark.parametrize("name", CASES)
def test_matches_torch_linear_cross_entropy(name):
    case = CASES[name]
    with jax.enable_x64(True):
        arrays = _inputs(case)
        size = 1 if case.reduction != "none" else math.prod(_loss_shape(case))
        cotangent = np.random.default_rng(1).standard_normal(size)
        want, want_grads = _torch(case, arrays, cotangent)
        got, got_grads = _jax(case, arrays, cotangent)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
        for k in _differentiable(case):
            if want_grads[k] is None:
                assert got_grads[k] is None, k
                continue
            np.testing.assert_allclose(
                got_grads[k], want_grads[k], rtol=1e-9, atol=1e-12, err_msg=k
            )


def _loss_shape(case: Case) -> tuple[int, ...]:
    return (() if case.unbatched else (N,)) + case.out


def test_kernel_layout_mapping_is_the_transpose():
    """For K = 0, PyTorch's (C, D) weight is the transpose of linear_cross_entropy's kernel."""
    arrays = _inputs(Case(weighted=True, label_smoothing=0.1))
    x, w, t, b = (
        jnp.asarray(arrays[k], jnp.float32)
        for k in ("input", "linear_weight", "target", "linear_bias")
    )
    t = t.astype(jnp.int32)
    torch_layout = jaxloss.torch_linear_cross_entropy(x, w, t, linear_bias=b, reduction="none")
    flax_layout = jaxloss.linear_cross_entropy(x, w.T, t, bias=b, reduction="none")
    np.testing.assert_array_equal(torch_layout, flax_layout)


MISUSE = {
    "3-D input": (dict(input=np.zeros((2, 3, D))), "`input`"),
    "in_features": (dict(linear_weight=np.zeros((C, D + 1))), "`linear_weight`"),
    "bias shape": (dict(linear_bias=np.zeros((C + 1,))), "`linear_bias`"),
    "K-dim unbatched": (
        dict(input=np.zeros((D,)), linear_weight=np.zeros((C, 2, D)), target=np.zeros((2,), int)),
        "batched input",
    ),
    "ignore_index with probabilities": (
        dict(target=np.full((N, C), 1.0 / C), ignore_index=0),
        "`ignore_index`",
    ),
}


@pytest.mark.parametrize("name", MISUSE)
def test_misuse_names_the_argument(name):
    overrides, message = MISUSE[name]
    args = dict(
        input=np.zeros((N, D), np.float32), linear_weight=np.zeros((C, D), np.float32),
        target=np.zeros((N,), np.int32),
    )  # fmt: skip
    ignore_index = overrides.pop("ignore_index", None)
    args.update(
        {
            k: v.astype(np.float32) if v.dtype == np.float64 else v
            for k, v in overrides.items()
            if k != "linear_bias"
        }
    )
    bias = overrides.get("linear_bias")
    with pytest.raises(ValueError, match=message):
        jaxloss.torch_linear_cross_entropy(
            args["input"], args["linear_weight"], args["target"], linear_bias=bias,
            ignore_index=ignore_index,
        )  # fmt: skip
