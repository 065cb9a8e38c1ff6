"""Generates ``elementwise.npz``: PyTorch reference values and gradients for the non-index losses.

Run from the repository root with torch installed::

    python tests/golden/gen_elementwise.py

The output is deterministic (fixed NumPy seed, float64, one torch thread). Every case is stored
under keys ``"{family}__{case}__{field}"``: the inputs, the metadata (``axis``, ``reduction``,
``log_target`` as 0-d arrays), a random cotangent ``ct`` of the output's shape, the output
``out``, and ``grad_{name}`` = the vector-Jacobian product ``ct · ∂out/∂name`` from
``torch.autograd``. The test modules (test_softmax, test_binary, test_divergence) read this file
and need no torch.

Families: ``activation`` (softmax, log_softmax, sigmoid, log_sigmoid; ``fn`` names which),
``bce``, ``bce_with_logits``, ``kl_div``, ``entropy``.

torch is imported inside ``main`` only, so that importing this module (pytest's
``--doctest-modules`` does) neither needs torch nor writes anything.
"""

from __future__ import annotations

import pathlib
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

OUTPUT = pathlib.Path(__file__).with_name("elementwise.npz")
SEED = 20240611


def _softmax_np(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def _dims(shape: tuple[int, ...] | None) -> str:
    """A shape as a name fragment: ``"6x4"``, ``"scalar"`` for ``()``, ``"none"`` for None."""
    return "none" if shape is None else "x".join(map(str, shape)) or "scalar"


class _Writer:
    """Collects the arrays of every case and runs torch to fill in outputs and gradients."""

    def __init__(self, torch: Any) -> None:
        self.torch = torch
        self.rng = np.random.default_rng(SEED)
        self.arrays: dict[str, np.ndarray] = {}

    def case(
        self,
        family: str,
        name: str,
        torch_fn: Callable[..., Any],
        inputs: dict[str, np.ndarray | None],
        grad_names: tuple[str, ...],
        **meta: Any,
    ) -> None:
        """Runs ``torch_fn(**inputs)`` in float64 and stores inputs, meta, ``out``, gradients."""
        torch = self.torch
        tensors = {
            k: None
            if v is None
            else torch.tensor(np.asarray(v, np.float64), requires_grad=k in grad_names)
            for k, v in inputs.items()
        }
        out = torch_fn(**tensors)
        ct = self.rng.normal(size=tuple(out.shape))
        if grad_names:
            (out * torch.tensor(ct)).sum().backward()
        prefix = f"{family}__{name}__"
        assert not any(k.startswith(prefix) for k in self.arrays), f"duplicate case {prefix}"
        for k, v in inputs.items():
            if v is not None:
                self.arrays[prefix + k] = np.asarray(v, np.float64)
        for k, v in meta.items():
            self.arrays[prefix + k] = np.asarray(v)
        self.arrays[prefix + "ct"] = ct
        self.arrays[prefix + "out"] = out.detach().numpy()
        for k in grad_names:
            self.arrays[prefix + "grad_" + k] = tensors[k].grad.numpy()


def _activations(w: _Writer) -> None:
    torch, F = w.torch, w.torch.nn.functional
    rng = w.rng
    for fn_name in ("softmax", "log_softmax"):
        torch_fn = getattr(F, fn_name)
        shapes_axes = [
            ((5, 7), -1),
            ((5, 7), 0),
            ((6,), 0),
            ((3, 4, 5), 1),
            ((3, 4, 5), -1),
            ((3, 4, 5), 0),
            ((2, 3, 4, 5), 1),
            ((2, 3, 4, 5), -2),
        ]
        for shape, axis in shapes_axes:
            x = rng.normal(scale=3.0, size=shape)
            w.case(
                "activation",
                f"{fn_name}_{_dims(shape)}_axis{axis}",
                lambda x, f=torch_fn, a=axis: f(x, dim=a),
                {"x": x},
                ("x",),
                fn=fn_name,
                axis=axis,
            )
        # Magnitudes where a naive exp overflows.
        x = rng.normal(scale=1e3, size=(3, 5))
        w.case(
            "activation",
            f"{fn_name}_large",
            lambda x, f=torch_fn: f(x, dim=-1),
            {"x": x},
            ("x",),
            fn=fn_name,
            axis=-1,
        )
        # -inf entries (never a whole row): probability 0, finite gradients.
        x = rng.normal(size=(4, 6))
        x[0, 1] = x[1, 0] = x[1, 5] = x[3, 2] = -np.inf
        w.case(
            "activation",
            f"{fn_name}_neginf",
            lambda x, f=torch_fn: f(x, dim=-1),
            {"x": x},
            ("x",),
            fn=fn_name,
            axis=-1,
        )
    wide = np.concatenate(
        [np.linspace(-40.0, 40.0, 41), rng.normal(scale=5.0, size=20), [-1e4, -1e2, 0.0, 1e2, 1e4]]
    )
    for fn_name, torch_fn in (("sigmoid", torch.sigmoid), ("log_sigmoid", F.logsigmoid)):
        w.case("activation", f"{fn_name}_wide", torch_fn, {"x": wide}, ("x",), fn=fn_name)
        x = rng.normal(scale=3.0, size=(2, 3, 4))
        w.case("activation", f"{fn_name}_2x3x4", torch_fn, {"x": x}, ("x",), fn=fn_name)


def _bce(w: _Writer) -> None:
    F = w.torch.nn.functional
    rng = w.rng

    def bce(reduction):
        return lambda probs, targets, weight=None: F.binary_cross_entropy(
            probs, targets, weight=weight, reduction=reduction
        )

    def probs(shape):
        return rng.uniform(0.02, 0.98, size=shape)

    def hard(shape):
        return rng.integers(0, 2, size=shape).astype(np.float64)

    # (shape, weight shape or None, reduction, soft targets)
    configs = [
        ((6, 4), None, "none", False),
        ((6, 4), None, "sum", False),
        ((6, 4), None, "mean", False),
        ((6, 4), (4,), "mean", False),
        ((6, 4), (6, 1), "sum", True),
        ((6, 4), (6, 4), "none", True),
        ((6, 4), (), "mean", True),
        ((3, 4, 5), (4, 1), "mean", True),
        ((3, 4, 5), (5,), "none", False),
        ((3, 4, 5), (3, 1, 1), "sum", True),
    ]
    for shape, wshape, reduction, soft in configs:
        p = probs(shape)
        y = rng.uniform(size=shape) if soft else hard(shape)
        weight = None if wshape is None else rng.uniform(0.1, 2.0, size=wshape)
        name = f"{_dims(shape)}_w{_dims(wshape)}_{reduction}"
        w.case(
            "bce",
            name,
            bce(reduction),
            {"probs": p, "targets": y, "weight": weight},
            ("probs", "targets"),
            reduction=reduction,
        )
    # The clamp: p = 0 or 1 (loss capped at 100) and p(1-p) below 1e-12 (gradient denominator).
    p = np.array([0.0, 1.0, 0.0, 1.0, 1e-15, 1 - 1e-15, 1e-15, 0.5, 1e-50, 1.0])
    y = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.25])
    for reduction in ("none", "sum"):
        w.case(
            "bce",
            f"clamp_{reduction}",
            bce(reduction),
            {"probs": p, "targets": y},
            ("probs",),
            reduction=reduction,
        )


def _bce_with_logits(w: _Writer) -> None:
    F = w.torch.nn.functional
    rng = w.rng

    def bcel(reduction):
        return lambda logits, targets, weight=None, pos_weight=None: (
            F.binary_cross_entropy_with_logits(
                logits, targets, weight=weight, pos_weight=pos_weight, reduction=reduction
            )
        )

    # (shape, weight shape, pos_weight shape, reduction, soft targets)
    configs = [
        ((6, 4), None, None, "none", False),
        ((6, 4), None, None, "sum", False),
        ((6, 4), None, None, "mean", False),
        ((6, 4), None, (4,), "mean", False),
        ((6, 4), (4,), (4,), "none", True),
        ((6, 4), (6, 1), (1, 4), "sum", False),
        ((6, 4), None, (6, 4), "mean", True),
        ((6, 4), (), (), "mean", False),
        ((3, 4, 5), None, (4, 1), "mean", False),
        ((3, 4, 5), (3, 1, 1), (5,), "none", True),
        ((3, 4, 5), (4, 5), None, "sum", True),
    ]

    for shape, wshape, pshape, reduction, soft in configs:
        x = rng.normal(scale=3.0, size=shape)
        y = rng.uniform(size=shape) if soft else rng.integers(0, 2, size=shape).astype(float)
        weight = None if wshape is None else rng.uniform(0.1, 2.0, size=wshape)
        pos_weight = None if pshape is None else rng.uniform(0.2, 5.0, size=pshape)
        name = f"{_dims(shape)}_w{_dims(wshape)}_pw{_dims(pshape)}_{reduction}"
        w.case(
            "bce_with_logits",
            name,
            bcel(reduction),
            {"logits": x, "targets": y, "weight": weight, "pos_weight": pos_weight},
            ("logits", "targets"),
            reduction=reduction,
        )
    # Logits far beyond where exp overflows, with and without pos_weight.
    x = np.repeat([[-1e30, -1e4, -50.0, 0.0, 50.0, 1e4, 1e30]], 3, axis=0)
    y = np.broadcast_to([[0.0], [1.0], [0.5]], x.shape).copy()
    w.case(
        "bce_with_logits",
        "extreme_none",
        bcel("none"),
        {"logits": x, "targets": y},
        ("logits", "targets"),
        reduction="none",
    )
    w.case(
        "bce_with_logits",
        "extreme_pw_none",
        bcel("none"),
        {"logits": x, "targets": y, "pos_weight": np.full((7,), 3.0)},
        ("logits", "targets"),
        reduction="none",
    )


def _kl_div(w: _Writer) -> None:
    F = w.torch.nn.functional
    rng = w.rng

    def kl(reduction, log_target):
        return lambda log_q, target: F.kl_div(
            log_q, target, reduction=reduction, log_target=log_target
        )

    for shape, reductions in (
        ((5, 6), ("none", "sum", "mean", "batchmean")),
        ((3, 4, 5), ("none", "mean", "batchmean")),
    ):
        for reduction in reductions:
            for log_target in (False, True):
                log_q = np.log(_softmax_np(rng.normal(size=shape), -1))
                t = _softmax_np(rng.normal(scale=2.0, size=shape), -1)
                target = np.log(t) if log_target else t
                w.case(
                    "kl_div",
                    f"{_dims(shape)}_{reduction}_lt{int(log_target)}",
                    kl(reduction, log_target),
                    {"log_q": log_q, "target": target},
                    ("log_q", "target"),
                    reduction=reduction,
                    log_target=log_target,
                )
    # Zero-probability targets (finite log_q): torch's target gradient there is NaN (xlogy), so
    # the tests compare it only where target > 0.
    log_q = np.log(_softmax_np(rng.normal(size=(4, 6)), -1))
    t = _softmax_np(rng.normal(size=(4, 6)), -1)
    t[0, 0] = t[2, 3] = t[2, 4] = 0.0
    t /= t.sum(-1, keepdims=True)
    w.case(
        "kl_div",
        "zeros_batchmean_lt0",
        kl("batchmean", False),
        {"log_q": log_q, "target": t},
        ("log_q", "target"),
        reduction="batchmean",
        log_target=False,
    )


def _entropy(w: _Writer) -> None:
    torch = w.torch
    rng = w.rng

    def direct(axis):
        # Elementwise -p log p: its gradient is the unprojected -(log p + 1).
        return lambda probs: torch.special.entr(probs).sum(axis)

    def categorical(axis):
        return lambda probs: torch.distributions.Categorical(
            probs=probs.movedim(axis, -1)
        ).entropy()

    for shape, axis, zeros in (
        ((5, 6), -1, False),
        ((3, 4, 5), 1, False),
        ((4, 6), -1, True),
        ((6, 2, 3), 0, True),
    ):
        p = _softmax_np(rng.normal(scale=1.5, size=shape), axis)
        if zeros:
            p = np.moveaxis(p, axis, -1).copy()
            p[0, ..., 0] = 0.0
            p[-1, ..., 1:] = 0.0  # a one-hot distribution: entropy exactly 0
            p /= p.sum(-1, keepdims=True)
            p = np.moveaxis(p, -1, axis)
        name = f"{_dims(shape)}_axis{axis}{'_zeros' if zeros else ''}"
        w.case("entropy", name, direct(axis), {"probs": p}, ("probs",), axis=axis, reference="entr")
        if not zeros:
            # Categorical normalises probs, so its gradient is the direct one projected onto the
            # simplex; at p = 0 it is an artefact of a finfo.min clamp and is not stored.
            w.case(
                "entropy",
                name + "_categorical",
                categorical(axis),
                {"probs": p},
                ("probs",),
                axis=axis,
                reference="categorical",
            )
        else:
            w.case(
                "entropy",
                name + "_categorical_value",
                categorical(axis),
                {"probs": p},
                (),
                axis=axis,
                reference="categorical",
            )


def main() -> None:
    import torch  # only the generator needs torch

    torch.set_num_threads(1)
    # kl_div's FutureWarning about reduction="mean"; "mean" is still what 2.x computes.
    warnings.filterwarnings("ignore", message="reduction: 'mean' divides", category=UserWarning)
    writer = _Writer(torch)
    _activations(writer)
    _bce(writer)
    _bce_with_logits(writer)
    _kl_div(writer)
    _entropy(writer)
    np.savez_compressed(OUTPUT, **writer.arrays)
    cases = {k.rsplit("__", 1)[0] for k in writer.arrays}
    print(
        f"wrote {OUTPUT} ({OUTPUT.stat().st_size} bytes, {len(cases)} cases, torch "
        f"{torch.__version__})"
    )


if __name__ == "__main__":
    main()
