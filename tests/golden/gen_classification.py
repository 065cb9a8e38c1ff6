"""Generates ``classification.npz``: PyTorch reference values and gradients for nll/cross_entropy.

Run from the repository root with ``python tests/golden/gen_classification.py``. The inputs come
from a fixed NumPy seed (independent of the torch version); PyTorch computes every loss and its
input gradient in float64. For ``reduction="none"`` the stored gradient is that of
``sum(loss * cot)`` with the stored cotangent ``cot``. Everything is stored in PyTorch's
``(N, C, d1, ...)`` layout; the tests move the class axis last themselves.

Key scheme (``__`` separated)::

    {shape}__{name}                                    inputs: logits, targets_m100, targets_1,
                                                       probs, weight, cot
    {fn}__{shape}__{kind}__{w}__{ii}__{red}__{ls}__{value|grad}

with ``fn`` in ``ce``/``nll``, ``kind`` in ``idx``/``prob``, ``w`` in ``w0``/``w1`` (class
weights), ``ii`` in ``iim100``/``ii1``/``iina`` (ignore_index -100, 1, or not applicable for
probability targets), ``red`` a reduction and ``ls`` in ``ls0``/``ls15`` (label smoothing 0 or
0.15).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

OUT = Path(__file__).with_name("classification.npz")

# (N, C), (N, C, d1), (N, C, d1, d2), and a large class count with a small batch.
SHAPES = {"2d": (5, 4), "3d": (3, 4, 5), "4d": (2, 3, 4, 5), "bigc": (2, 1000)}
REDUCTIONS = ("none", "sum", "mean")
SMOOTHINGS = {"ls0": 0.0, "ls15": 0.15}
IGNORE = {"iim100": -100, "ii1": 1}


def grid():
    """Yields ``(fn, kind, w, ii, red, ls)`` for every stored case."""
    for w, ii, red, ls in itertools.product(("w0", "w1"), IGNORE, REDUCTIONS, SMOOTHINGS):
        yield "ce", "idx", w, ii, red, ls
    for w, red, ls in itertools.product(("w0", "w1"), REDUCTIONS, SMOOTHINGS):
        yield "ce", "prob", w, "iina", red, ls
    for w, ii, red in itertools.product(("w0", "w1"), IGNORE, REDUCTIONS):
        yield "nll", "idx", w, ii, red, "ls0"


def make_inputs(shape: tuple[int, ...], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random logits, index targets (with ignored positions), soft targets, weights, cotangent."""
    n, c, *rest = shape
    target_shape = (n, *rest)
    logits = rng.normal(scale=2.0, size=shape)
    targets = rng.integers(0, c, size=target_shape)
    flat = targets.reshape(-1)
    # ignore_index=1 must ignore something and keep something.
    flat[0], flat[-1] = 1, 0
    targets_1 = targets.copy()
    # ignore_index=-100: about a quarter of the positions, at least one, never all.
    m100 = targets.copy().reshape(-1)
    drop = rng.random(m100.size) < 0.25
    drop[0], drop[-1] = True, False
    m100[drop] = -100
    raw = rng.normal(scale=1.5, size=shape)
    probs = np.exp(raw) / np.exp(raw).sum(axis=1, keepdims=True)
    return {
        "logits": logits,
        "targets_m100": m100.reshape(target_shape),
        "targets_1": targets_1,
        "probs": probs,
        "weight": rng.uniform(0.5, 2.0, size=c),
        "cot": rng.normal(size=target_shape),
    }


def torch_case(inputs, fn, kind, w, ii, red, ls):
    """PyTorch's loss value and input gradient for one grid case, float64."""
    # Imported here so that the grid and the input maker load without torch (the tests use them).
    import torch
    import torch.nn.functional as F

    x = torch.tensor(inputs["logits"], dtype=torch.float64, requires_grad=True)
    weight = torch.tensor(inputs["weight"]) if w == "w1" else None
    if kind == "prob":
        target = torch.tensor(inputs["probs"])
        loss = F.cross_entropy(
            x, target, weight=weight, reduction=red, label_smoothing=SMOOTHINGS[ls]
        )
    else:
        target = torch.tensor(inputs["targets_m100" if ii == "iim100" else "targets_1"])
        kwargs = {"weight": weight, "ignore_index": IGNORE[ii], "reduction": red}
        if fn == "ce":
            loss = F.cross_entropy(x, target, label_smoothing=SMOOTHINGS[ls], **kwargs)
        else:
            loss = F.nll_loss(x, target, **kwargs)
    if red == "none":
        loss.backward(torch.tensor(inputs["cot"]))
    else:
        loss.backward()
    return loss.detach().numpy(), x.grad.numpy()


def main() -> None:
    import torch

    rng = np.random.default_rng(20240607)
    arrays: dict[str, np.ndarray] = {"torch_version": np.array(torch.__version__)}
    for name, shape in SHAPES.items():
        inputs = make_inputs(shape, rng)
        arrays.update({f"{name}__{k}": v for k, v in inputs.items()})
        for case in grid():
            fn, kind, w, ii, red, ls = case
            value, grad = torch_case(inputs, *case)
            key = "__".join((fn, name, kind, w, ii, red, ls))
            arrays[f"{key}__value"] = value
            arrays[f"{key}__grad"] = grad
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB, {len(arrays)} arrays)")


if __name__ == "__main__":
    main()
