"""Per-example losses, gradients and gradient norms with ``vmap``/``grad``, and the batched forms.

Per-example quantities are what you need for data debugging (which training images does the
model find hardest?), for differentially private SGD (clip each example's gradient) and for
importance sampling. JAX gets them by composing transformations of a single-example loss::

    per_example_grads = jax.vmap(jax.grad(loss_one), in_axes=(None, 0, 0))(params, x, y)

This script trains a small MLP on the digits and computes, in two independent ways each:

1. per-example losses: ``cross_entropy(..., reduction="none")`` on the batch, and ``vmap`` of the
   loss of one example (rank-1 logits and a scalar target);
2. per-example gradients: ``vmap(grad(...))``, whose mean must equal ``grad`` of the batch mean;
3. per-example gradient norms: from the ``vmap``-ed gradients, and from ONE batched backward pass
   without materialising any per-example gradient (Goodfellow, 2015: a dense layer's weight
   gradient for example n is the outer product ``a_n ⊗ g_n`` of its input and its backpropagated
   signal, so its norm is ``|a_n|·|g_n|``);

and asserts that they agree. It also shows a pitfall of class weights: ``reduction="mean"`` is
``Σ w[y_n]·ℓ_n / Σ w[y_n]``, not the mean of the ``"none"`` losses, and ``vmap`` of a weighted
*mean* over single examples silently drops the weights (``w·ℓ / w = ℓ``).

Runs on CPU in a few seconds::

    python examples/per_example.py --out examples_out

Writes ``per_example_grad_norms.png`` (histogram and the hardest test images) to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import jaxloss

if "MPLBACKEND" not in os.environ:
    matplotlib.use("Agg")  # No display needed: the figure only goes to a file.
import matplotlib.pyplot as plt

NUM_CLASSES = 10
LABEL_SMOOTHING = 0.1
Params = dict[str, jax.Array]


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


def init_params(key: jax.Array, num_features: int, hidden: int) -> Params:
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (num_features, hidden)) / np.sqrt(num_features),
        "b1": jnp.zeros(hidden),
        "w2": jax.random.normal(k2, (hidden, NUM_CLASSES)) / np.sqrt(hidden),
        "b2": jnp.zeros(NUM_CLASSES),
    }


def forward(params: Params, x: jax.Array, probes: tuple[jax.Array, jax.Array] | None = None):
    """Logits of a one-hidden-layer MLP; works for one example ``(F,)`` or a batch ``(N, F)``.

    ``probes`` are zeros added to each layer's pre-activation. They change nothing, but the
    gradient of a summed loss with respect to them is each example's backpropagated signal
    ``g_n`` at that layer, for the whole batch in one backward pass.
    """
    pre1 = x @ params["w1"] + params["b1"]
    if probes is not None:
        pre1 = pre1 + probes[0]
    hidden = jnp.tanh(pre1)
    logits = hidden @ params["w2"] + params["b2"]
    if probes is not None:
        logits = logits + probes[1]
    return logits, hidden


def loss_one(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    """The loss of ONE example: logits of shape (10,) and a scalar class index."""
    logits, _ = forward(params, x)
    return jaxloss.cross_entropy(logits, y, label_smoothing=LABEL_SMOOTHING)


def loss_batch(params: Params, x: jax.Array, y: jax.Array, reduction: str = "mean") -> jax.Array:
    logits, _ = forward(params, x)
    return jaxloss.cross_entropy(logits, y, label_smoothing=LABEL_SMOOTHING, reduction=reduction)


# --- per-example, the vmap way --------------------------------------------------------------


@jax.jit
def per_example_losses_vmap(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    return jax.vmap(loss_one, in_axes=(None, 0, 0))(params, x, y)


@jax.jit
def per_example_grads_vmap(params: Params, x: jax.Array, y: jax.Array) -> Params:
    """One gradient per example: every leaf gets a leading axis of size N."""
    return jax.vmap(jax.grad(loss_one), in_axes=(None, 0, 0))(params, x, y)


def grad_norms(per_example_grads: Params) -> jax.Array:
    """The global L2 norm of each example's gradient over all parameters."""
    squares = [jnp.sum(g.reshape(g.shape[0], -1) ** 2, -1) for g in per_example_grads.values()]
    return jnp.sqrt(sum(squares))


# --- per-example, the batched way -----------------------------------------------------------


@jax.jit
def per_example_grad_norms_batched(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    """Per-example gradient norms from one batched backward pass (no per-example gradients).

    With ``reduction="sum"`` example n's loss depends only on row n, so the gradient of the sum
    with respect to the probes is, row by row, each example's own signal ``g_n``. Then
    ``|∂ℓ_n/∂W|² = |a_n|²·|g_n|²`` (outer product) and ``|∂ℓ_n/∂b|² = |g_n|²``.
    """
    n = x.shape[0]
    probes = (jnp.zeros((n, params["b1"].shape[0])), jnp.zeros((n, NUM_CLASSES)))

    def summed(probes):
        logits, hidden = forward(params, x, probes)
        loss = jaxloss.cross_entropy(logits, y, label_smoothing=LABEL_SMOOTHING, reduction="sum")
        return loss, hidden

    (g1, g2), hidden = jax.grad(summed, has_aux=True)(probes)
    sq_norm = lambda v: jnp.sum(v**2, -1)
    layer1 = sq_norm(x) * sq_norm(g1) + sq_norm(g1)  # w1 (input x_n) and b1
    layer2 = sq_norm(hidden) * sq_norm(g2) + sq_norm(g2)  # w2 (input hidden_n) and b2
    return jnp.sqrt(layer1 + layer2)


def check_close(name: str, actual, expected, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    """Asserts agreement and prints the largest difference, so the match is visible."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=name)
    print(f"  {name}: match (max |difference| {np.max(np.abs(actual - expected)):.1e})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("examples_out"), help="PNG directory")
    parser.add_argument("--steps", type=int, default=300, help="full-batch Adam steps")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def train(params: Params, x: jax.Array, y: jax.Array, steps: int) -> Params:
    """Full-batch Adam on the batch mean loss."""
    optimizer = optax.adam(3e-3)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_batch)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    for _ in (bar := tqdm(range(steps), desc="training", unit="step")):
        params, opt_state, loss = train_step(params, opt_state)
        bar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)
    return params


def check_per_example(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    """Checks 1-3 of the module doc; returns the per-example gradient norms."""
    print("1. per-example losses on the test set")
    losses_none = loss_batch(params, x, y, reduction="none")
    check_close(
        "reduction='none' vs vmap(loss of one example)",
        losses_none,
        per_example_losses_vmap(params, x, y),
    )
    check_close(
        "mean of per-example losses vs reduction='mean'",
        jnp.mean(losses_none),
        loss_batch(params, x, y),
    )

    print("2. per-example gradients")
    per_example = per_example_grads_vmap(params, x, y)
    batch_grad = jax.grad(loss_batch)(params, x, y)
    for leaf in ("w1", "b1", "w2", "b2"):
        check_close(
            f"mean over examples of d loss_n / d {leaf} vs grad of the mean",
            jnp.mean(per_example[leaf], 0),
            batch_grad[leaf],
        )

    print("3. per-example gradient norms")
    norms_vmap = grad_norms(per_example)
    norms_batched = per_example_grad_norms_batched(params, x, y)
    check_close("norms from vmap(grad) vs one batched backward pass", norms_batched, norms_vmap)
    return norms_vmap


def check_class_weights(logits: jax.Array, y: jax.Array) -> None:
    """Check 4: the weighted mean is not the mean of the per-example losses."""
    print("4. class weights: the weighted mean is not the mean of the per-example losses")
    weight = jnp.linspace(0.5, 2.0, NUM_CLASSES)
    weighted_none = jaxloss.cross_entropy(logits, y, weight=weight, reduction="none")
    weighted_mean = jaxloss.cross_entropy(logits, y, weight=weight)
    check_close(
        "sum('none') / sum(weight[y]) vs reduction='mean'",
        jnp.sum(weighted_none) / jnp.sum(weight[y]),
        weighted_mean,
    )
    vmapped_mean = jax.vmap(lambda z, t: jaxloss.cross_entropy(z, t, weight=weight))(logits, y)
    unweighted = jaxloss.cross_entropy(logits, y, reduction="none")
    check_close(
        "vmap of a weighted 'mean' over single examples == UNweighted losses",
        vmapped_mean,
        unweighted,
    )
    print(
        f"  mean('none') = {float(jnp.mean(weighted_none)):.4f} but "
        f"reduction='mean' = {float(weighted_mean):.4f}: use reduction='none' per example."
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    x_train, y_train, x_test, y_test = map(jnp.asarray, load_split(args.seed))
    params = init_params(jax.random.key(args.seed), x_train.shape[1], args.hidden)
    params = train(params, x_train, y_train, args.steps)
    norms = check_per_example(params, x_test, y_test)
    logits, _ = forward(params, x_test)
    check_class_weights(logits, y_test)

    args.out.mkdir(parents=True, exist_ok=True)
    figure_path = args.out / "per_example_grad_norms.png"
    hardest = np.argsort(-np.asarray(norms))[:8]
    predicted = np.asarray(jnp.argmax(logits, -1))
    print("hardest test images (largest gradient norm):")
    for i in hardest:
        print(f"  #{i}: label {y_test[i]}, predicted {predicted[i]}, |grad| {norms[i]:.3f}")
    save_figure(np.asarray(norms), x_test, y_test, predicted, hardest, figure_path)
    print(f"saved {figure_path}")
    print(f"elapsed: {time.perf_counter() - start:.1f} s")


def save_figure(norms, images, labels, predicted, hardest, path: Path) -> None:
    fig = plt.figure(figsize=(10, 4))
    ax = fig.add_subplot(1, 2, 1)
    ax.hist(norms, bins=50, log=True)
    ax.set(xlabel="per-example gradient norm", ylabel="test images", title="|∇ℓ_n|")
    for k, i in enumerate(hardest):
        ax_img = fig.add_subplot(2, 8, 5 + k + (k // 4) * 4)
        ax_img.imshow(images[i].reshape(8, 8), cmap="gray_r")
        ax_img.set_title(f"y={labels[i]} ŷ={predicted[i]}", fontsize=8)
        ax_img.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
