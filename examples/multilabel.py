"""Multi-label classification on the digits with ``jaxloss.bce_with_logits`` and ``pos_weight``.

Each image gets three yes/no labels derived from its digit:

* ``is_even``   0, 2, 4, 6, 8
* ``gt_4``      5, 6, 7, 8, 9  (the digit is greater than 4)
* ``has_loop``  0, 6, 8, 9

The labels are not mutually exclusive (an 8 has all three, a 1 has none), so this is a
multi-label problem: one independent Bernoulli per label, a sigmoid per output and binary
cross-entropy summed over labels. ``pos_weight`` (PyTorch's argument of the same name) multiplies
the loss of the positive examples of each label; ``n_negative / n_positive``, computed from the
training labels, gives a label's positives and negatives the same total weight.

For contrast the script trains the same network with softmax cross-entropy over the labels (plus
a ``none`` class, since softmax needs every example to have some class). Softmax cross-entropy is
the right loss for a multi-class, single-label problem: exactly one of ``C`` classes is true
(``train_digits.py``, the digit itself). Here its probabilities must sum to 1, so at most one label
can exceed 0.5: it cannot say "even AND has a loop", and the script checks that it never does.

Runs on CPU in a few seconds::

    python examples/multilabel.py --out examples_out

It prints one ``F1 <label>: 0.xx`` line per label and writes ``multilabel_curves.png``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import jaxloss

if "MPLBACKEND" not in os.environ:
    matplotlib.use("Agg")  # No display needed: the figure only goes to a file.
import matplotlib.pyplot as plt

LABEL_NAMES = ("is_even", "gt_4", "has_loop")
LOOP_DIGITS = (0, 6, 8, 9)

LossFn = Callable[[jax.Array, jax.Array], jax.Array]


class MLP(nnx.Module):
    """One hidden layer with GELU; 64 pixel intensities in, one logit per output."""

    def __init__(self, num_features: int, hidden: int, num_outputs: int, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(num_features, hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, num_outputs, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(nnx.gelu(self.hidden(x)))


def load_split(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits scaled to [0, 1], split 75/25 stratified by digit.

    Returns ``(x_train, digit_train, x_test, digit_test)`` as plain NumPy arrays.
    """
    images, digits = load_digits(return_X_y=True)
    x = (np.asarray(images) / 16.0).astype(np.float32)
    y = np.asarray(digits, dtype=np.int32)
    parts = train_test_split(x, y, test_size=0.25, stratify=y, random_state=seed)
    x_train, x_test, y_train, y_test = (np.asarray(part) for part in parts)
    return x_train, y_train, x_test, y_test


def digit_labels(digits: np.ndarray) -> np.ndarray:
    """The three binary labels of each digit, shape ``(N, 3)``, float32 (BCE takes floats)."""
    labels = np.stack([digits % 2 == 0, digits > 4, np.isin(digits, LOOP_DIGITS)], axis=-1)
    return labels.astype(np.float32)


def balanced_pos_weight(labels: np.ndarray) -> np.ndarray:
    """``n_negative / n_positive`` per label: positives and negatives weigh the same in total."""
    positives = labels.sum(0)
    if np.any(positives == 0) or np.any(positives == len(labels)):
        raise ValueError(f"every label needs positives and negatives, got {positives.tolist()}")
    return ((len(labels) - positives) / positives).astype(np.float32)


def per_label(values: np.ndarray | jax.Array) -> str:
    """``is_even=0.50 gt_4=0.50 has_loop=0.40``: one rounded number per label."""
    return " ".join(f"{name}={float(v):.2f}" for name, v in zip(LABEL_NAMES, values, strict=True))


def f1_scores(predicted: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """F1 of each label column (2·TP / (2·TP + FP + FN)); 0 where a label is never predicted."""
    predicted, labels = predicted.astype(bool), labels.astype(bool)
    tp = np.sum(predicted & labels, 0)
    fp = np.sum(predicted & ~labels, 0)
    fn = np.sum(~predicted & labels, 0)
    denominator = 2 * tp + fp + fn
    return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)


def softmax_targets(labels: np.ndarray) -> np.ndarray:
    """What softmax CE needs: one distribution per example over the labels and ``none``.

    An example with k > 0 labels gets 1/k on each of them; one with no label gets all its mass
    on ``none``. The best a softmax can then do for an 8 is 1/3 per label.
    """
    with_none = np.concatenate([labels, (labels.sum(-1, keepdims=True) == 0)], -1)
    return (with_none / with_none.sum(-1, keepdims=True)).astype(np.float32)


def fit(
    name: str,
    loss_fn: LossFn,
    num_outputs: int,
    data: tuple[np.ndarray, np.ndarray],
    args: argparse.Namespace,
) -> tuple[MLP, list[float]]:
    """Adam on mini-batches with a jitted step; returns the trained model and per-epoch loss."""
    x_train, targets = data
    model = MLP(x_train.shape[1], args.hidden, num_outputs, rngs=nnx.Rngs(args.seed))
    graphdef, params = nnx.split(model, nnx.Param)
    optimizer = optax.adam(args.lr)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, x, t):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p)(x), t))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(args.seed)
    steps_per_epoch = len(x_train) // args.batch_size
    history = []
    for _ in tqdm(range(args.epochs), desc=name, unit="epoch"):
        order = rng.permutation(len(x_train))
        losses = []
        for step in range(steps_per_epoch):
            batch = order[step * args.batch_size : (step + 1) * args.batch_size]
            params, opt_state, loss = train_step(params, opt_state, x_train[batch], targets[batch])
            losses.append(loss)
        history.append(float(np.mean(jax.device_get(losses))))
    return nnx.merge(graphdef, params), history


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("examples_out"), help="PNG directory")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def compare(
    bce_model, ce_model, x_test: np.ndarray, y_test: np.ndarray, d_test: np.ndarray
) -> np.ndarray:
    """Prints both models' per-label F1, where they differ and why; returns the multi-label
    model's F1 per label."""
    bce_probs = np.asarray(jaxloss.sigmoid(bce_model(jnp.asarray(x_test))))
    ce_probs = np.asarray(jaxloss.softmax(ce_model(jnp.asarray(x_test))))[:, :3]
    bce_predicted, ce_predicted = bce_probs > 0.5, ce_probs > 0.5
    bce_f1, ce_f1 = f1_scores(bce_predicted, y_test), f1_scores(ce_predicted, y_test)

    print("\nper-label F1 on the test set, multi-label model (bce_with_logits + pos_weight):")
    for name, score in zip(LABEL_NAMES, bce_f1, strict=True):
        print(f"F1 {name}: {score:.4f}")
    print("for contrast, softmax cross-entropy over the same labels (threshold 0.5):")
    for name, score in zip(LABEL_NAMES, ce_f1, strict=True):
        print(f"  softmax F1 {name}: {score:.4f}")

    both = (y_test[:, 0] == 1) & (y_test[:, 2] == 1)  # Digits 0, 6 and 8.
    bce_both = np.mean(bce_predicted[both, 0] & bce_predicted[both, 2])
    ce_both = np.mean(ce_predicted[both, 0] & ce_predicted[both, 2])
    # Two softmax probabilities that sum to at most 1 cannot both exceed 0.5.
    assert ce_both == 0.0, "softmax probabilities sum to 1: two labels can never both pass 0.5"
    eight = int(np.flatnonzero(d_test == 8)[0])
    print(
        f"\n'even AND has a loop' ({both.sum()} test images: digits 0, 6, 8) predicted for "
        f"{bce_both:.0%} of them by the multi-label model and {ce_both:.0%} by softmax CE."
    )
    print(f"a test 8 (all three labels true): sigmoid {per_label(bce_probs[eight])}")
    print(f"                                  softmax {per_label(ce_probs[eight])}")
    print(
        "Why: softmax CE models ONE categorical variable (exactly one class is true), so its\n"
        "probabilities compete and sum to 1. That fits the digit itself (one of 10, see\n"
        "train_digits.py). These labels are separate yes/no questions that can all be true at\n"
        "once: one sigmoid + BCE per label models each as its own Bernoulli, and pos_weight\n"
        "rebalances each label's positives and negatives independently."
    )
    exact = np.mean(np.all(bce_predicted == y_test.astype(bool), -1))
    print(
        f"exact-match accuracy (all 3 labels right): multi-label {exact:.4f}, softmax "
        f"{np.mean(np.all(ce_predicted == y_test.astype(bool), -1)):.4f}"
    )
    return bce_f1


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    start = time.perf_counter()
    x_train, d_train, x_test, d_test = load_split(args.seed)
    y_train, y_test = digit_labels(d_train), digit_labels(d_test)

    pos_weight = jnp.asarray(balanced_pos_weight(y_train))
    print("label frequency (train):", per_label(y_train.mean(0)))
    print("pos_weight = n_neg / n_pos:", per_label(pos_weight))

    # Multi-label: an independent sigmoid + BCE per label. pos_weight has shape (3,) and
    # broadcasts against the (batch, 3) logits, one entry per label, as in PyTorch.
    def multilabel_loss(logits, targets):
        return jaxloss.bce_with_logits(logits, targets, pos_weight=pos_weight)

    # Single-label view of the same labels: softmax over (labels + none), probability targets.
    def softmax_loss(logits, targets):
        return jaxloss.cross_entropy(logits, targets)

    bce_model, bce_history = fit("bce_with_logits", multilabel_loss, 3, (x_train, y_train), args)
    ce_model, ce_history = fit(
        "softmax CE", softmax_loss, 4, (x_train, softmax_targets(y_train)), args
    )

    bce_f1 = compare(bce_model, ce_model, x_test, y_test, d_test)

    args.out.mkdir(parents=True, exist_ok=True)
    figure_path = args.out / "multilabel_curves.png"
    save_curves(bce_history, ce_history, figure_path)
    print(f"saved {figure_path}")
    print(f"elapsed: {time.perf_counter() - start:.1f} s")
    return dict(zip(LABEL_NAMES, bce_f1.tolist(), strict=True))


def save_curves(bce_history: list[float], ce_history: list[float], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(np.arange(1, len(bce_history) + 1), bce_history, label="bce_with_logits (pos_weight)")
    ax.plot(np.arange(1, len(ce_history) + 1), ce_history, label="softmax cross_entropy")
    ax.set(xlabel="epoch", ylabel="training loss", title="multi-label digits")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
