"""Train a small Flax NNX language model whose head is ``jaxloss.linear_cross_entropy``.

What this shows:

* A word-level language model on text every Python install ships: the standard library's own
  source files (``sysconfig.get_paths()["stdlib"]``; about 1.1 M word and punctuation tokens,
  a 16384-word vocabulary covering ~99 % of them). Every tenth file is held out for validation.
* The head's loss without its logits: ``jaxloss.linear_cross_entropy(hidden, kernel, targets)``
  walks over token × vocabulary blocks and never materialises the ``[tokens, vocabulary]``
  logits or their gradient. With PaLM's z-loss, and — where this jaxloss has them — Gemma-2's
  logit soft-capping and per-token statistics (``return_stats=True``: log-sum-exp, whether the
  argmax is the target, the predicted distribution's entropy), all from the same blocked pass.
* What that saves: the compiled temporaries (``memory_analysis()``, nothing run) of the fused
  head's ``value_and_grad`` against the materialised ``cross_entropy(hidden @ kernel, ...)``
  at this run's shapes, printed before training.
* A causal transformer in Flax NNX (token and position embeddings, pre-norm attention and MLP
  blocks), trained with optax's AdamW in a jitted step over ``nnx.split`` state.

Runs on a CPU in a few minutes::

    python examples/lm_linear_head.py --out examples_out

It prints ``validation perplexity: X`` last and writes ``lm_linear_head_curves.png`` to
``--out``. ``examples/lm_distillation.py`` reuses its data and model.
"""

from __future__ import annotations

import argparse
import collections
import functools
import inspect
import os
import re
import sysconfig
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import matplotlib
import matplotlib.ticker
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import jaxloss

if "MPLBACKEND" not in os.environ:
    matplotlib.use("Agg")  # No display needed: the figure only goes to a file.
import matplotlib.pyplot as plt

UNK = "<unk>"
# Identifiers, numbers, newlines and single punctuation characters: a word-level vocabulary.
TOKEN = re.compile(r"[A-Za-z_][A-Za-z_0-9]*|\d+|\n|[^\sA-Za-z_0-9]")
_LCE_PARAMETERS = inspect.signature(jaxloss.linear_cross_entropy).parameters
HAS_SOFT_CAP = "soft_cap" in _LCE_PARAMETERS
HAS_STATS = "return_stats" in _LCE_PARAMETERS


# ----------------------------------------------------------------------------------------------
# Data: the standard library's source, tokenised into words
# ----------------------------------------------------------------------------------------------


class Corpus(NamedTuple):
    train: np.ndarray  # int32 token ids
    valid: np.ndarray
    vocabulary: list[str]  # id -> word; id 0 is UNK


def load_corpus(vocab_size: int, max_files: int | None = None) -> Corpus:
    """Word-tokenised stdlib sources; every tenth file (sorted by name) is validation text."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:max_files]
    texts = [TOKEN.findall(f.read_text(encoding="utf-8", errors="replace")) for f in files]
    train_words = [w for i, words in enumerate(texts) if i % 10 != 5 for w in words]
    valid_words = [w for i, words in enumerate(texts) if i % 10 == 5 for w in words]
    counts = collections.Counter(train_words)
    vocabulary = [UNK, *(w for w, _ in counts.most_common(vocab_size - 1))]
    index = {w: i for i, w in enumerate(vocabulary)}

    def encode(words):
        return np.fromiter((index.get(w, 0) for w in words), np.int32, len(words))

    return Corpus(encode(train_words), encode(valid_words), vocabulary)


def batches(tokens: np.ndarray, batch_size: int, seq_len: int, rng: np.random.Generator):
    """Endless random windows: inputs ``(B, T)`` and next-token targets ``(B, T)``."""
    while True:
        starts = rng.integers(0, len(tokens) - seq_len - 1, batch_size)
        window = tokens[starts[:, None] + np.arange(seq_len + 1)]
        yield window[:, :-1], window[:, 1:]


def validation_windows(tokens: np.ndarray, seq_len: int, limit: int) -> tuple[np.ndarray, ...]:
    """Consecutive non-overlapping windows of the validation text (at most ``limit``)."""
    count = min(limit, (len(tokens) - 1) // seq_len)
    idx = np.arange(count)[:, None] * seq_len + np.arange(seq_len + 1)
    window = tokens[idx]
    return window[:, :-1], window[:, 1:]


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


class Block(nnx.Module):
    """Pre-norm causal self-attention and a GELU MLP, each with a residual connection."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            num_heads=heads, in_features=dim, decode=False, rngs=rngs
        )
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.up = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.down = nnx.Linear(4 * dim, dim, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attention(self.norm1(x), mask=mask)
        return x + self.down(nnx.gelu(self.up(self.norm2(x))))


class LanguageModel(nnx.Module):
    """Token + position embeddings, ``layers`` blocks, a final norm and a ``(dim, vocab)`` head.

    ``hidden`` returns the features the head consumes; the head's kernel is read directly by the
    fused loss, so the logits are never formed in training.
    """

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, seq_len: int, *, rngs):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.position = nnx.Param(0.02 * jax.random.normal(rngs.params(), (seq_len, dim)))
        self.blocks = nnx.List([Block(dim, heads, rngs=rngs) for _ in range(layers)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, vocab, use_bias=False, rngs=rngs)

    def hidden(self, tokens: jax.Array) -> jax.Array:
        seq_len = tokens.shape[-1]
        x = self.embed(tokens) + self.position[...][:seq_len]
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def kernel(self) -> jax.Array:
        return self.head.kernel[...]


# ----------------------------------------------------------------------------------------------
# Loss, metrics, memory report
# ----------------------------------------------------------------------------------------------


def head_options(z_loss: float, soft_cap: float, grad_token_chunk: int = 0) -> dict:
    """The fused head's options this jaxloss supports (soft_cap only where it exists).

    ``grad_token_chunk`` > 0 sets the rows per block of the fused gradient pass; 0 keeps
    jaxloss's default (``2**24 // V`` rows, a 64 MiB float32 block of logits).
    """
    options: dict = {"z_loss": z_loss}
    if HAS_SOFT_CAP and soft_cap > 0:
        options["soft_cap"] = soft_cap
    if grad_token_chunk > 0:
        options["grad_token_chunk"] = grad_token_chunk
    return options


def lm_loss(hidden, kernel, targets, options):
    """Mean cross-entropy of the head (plus z-loss) and per-batch metrics as sums."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1)
    metrics = {}
    if HAS_STATS:
        loss, stats = jaxloss.linear_cross_entropy(h, kernel, y, return_stats=True, **options)
        metrics["accuracy"] = jnp.mean(stats.correct.astype(jnp.float32))
        metrics["entropy"] = jnp.mean(stats.entropy)
    else:
        loss = jaxloss.linear_cross_entropy(h, kernel, y, **options)
    return loss, metrics


def temporaries_mib(loss_fn, n: int, d: int, v: int) -> float:
    """Compiled temporaries of ``value_and_grad`` in (hidden, kernel); compile only."""
    args = (
        jax.ShapeDtypeStruct((n, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )
    compiled = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1))).lower(*args).compile()
    memory = compiled.memory_analysis()
    assert memory is not None, "this backend reports no compiled memory"
    return memory.temp_size_in_bytes / 2**20


def report_head_memory(n: int, d: int, v: int, options: dict) -> tuple[float, float]:
    """Prints and returns the fused and materialised heads' temporaries (MiB) at these shapes.

    With ``grad_token_chunk`` in ``options`` it also prints the fused head's figure with
    jaxloss's default gradient block, which at small ``N·V`` covers every token at once and
    so holds as much as the materialised logits and their gradient.
    """

    def fused_head(head: dict):
        return lambda h, k, y: jaxloss.linear_cross_entropy(h, k, y, **head)

    fused = temporaries_mib(fused_head(options), n, d, v)
    dense_options = {k: val for k, val in options.items() if k == "z_loss"}

    def materialised(h, k, y):
        logits = h @ k
        if "soft_cap" in options:
            logits = options["soft_cap"] * jnp.tanh(logits / options["soft_cap"])
        return jaxloss.cross_entropy(logits, y, **dense_options)

    dense = temporaries_mib(materialised, n, d, v)
    print(
        f"head value_and_grad temporaries at {n} tokens x {d} features x {v} words: "
        f"fused {fused:.1f} MiB, materialised {dense:.1f} MiB ({dense / fused:.1f}x)"
    )
    if "grad_token_chunk" in options:
        default_options = {k: val for k, val in options.items() if k != "grad_token_chunk"}
        default = temporaries_mib(fused_head(default_options), n, d, v)
        rows = max(1, 2**24 // v)  # linear_cross_entropy's documented default block
        cover = "the whole batch" if rows >= n else f"{-(-n // rows)} blocks of the {n} tokens"
        print(
            f"  (gradient blocks of {options['grad_token_chunk']} tokens; jaxloss's default "
            f"block, 2**24 // {v} = {rows} tokens ({cover}), would hold {default:.1f} MiB)"
        )
    return fused, dense


class Trainer:
    """Jitted AdamW training of a ``LanguageModel`` under an arbitrary ``loss(model, x, y)``."""

    def __init__(self, model, loss, lr: float, steps: int):
        self.graphdef, self.params = nnx.split(model, nnx.Param)
        schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps)
        self.optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, 0.1))
        self.opt_state = self.optimizer.init(self.params)
        graphdef, optimizer = self.graphdef, self.optimizer

        @jax.jit
        def step(params, opt_state, x, y):
            def objective(params):
                return loss(nnx.merge(graphdef, params), x, y)

            (value, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, value, metrics

        self._step = step

    def step(self, x, y):
        self.params, self.opt_state, value, metrics = self._step(self.params, self.opt_state, x, y)
        return value, metrics

    def model(self):
        return nnx.merge(self.graphdef, self.params)


@functools.partial(jax.jit, static_argnames=("graphdef", "ce_options"))
def _validation_sum(params, x, y, *, graphdef, ce_options):
    # Module level with the structure static: models of one shape share one compiled program.
    model = nnx.merge(graphdef, params)
    h = model.hidden(x)
    return jaxloss.linear_cross_entropy(
        h.reshape(-1, h.shape[-1]),
        model.kernel(),
        y.reshape(-1),
        reduction="sum",
        **dict(ce_options),
    )


class Evaluator:
    """Validation perplexity: ``exp`` of the mean next-token cross-entropy (no z-loss)."""

    def __init__(self, graphdef, windows, batch_size: int, options: dict):
        self.windows, self.batch_size, self.graphdef = windows, batch_size, graphdef
        self.ce_options = tuple(sorted((k, v) for k, v in options.items() if k != "z_loss"))

    def __call__(self, params) -> float:
        inputs, targets = self.windows
        b = self.batch_size
        sums = [
            _validation_sum(
                params,
                inputs[i : i + b],
                targets[i : i + b],
                graphdef=self.graphdef,
                ce_options=self.ce_options,
            )
            for i in range(0, len(inputs) - b + 1, b)
        ]
        return float(np.exp(np.sum(jax.device_get(sums)) / (len(sums) * b * inputs.shape[1])))


def train_language_model(model, corpus, args, loss, desc: str, windows):
    """Trains ``model`` for ``args.steps``; returns the trainer and the logged history."""
    trainer = Trainer(model, loss, args.lr, args.steps)
    evaluate = Evaluator(trainer.graphdef, windows, args.batch_size, args.options)
    data = batches(corpus.train, args.batch_size, args.seq_len, np.random.default_rng(args.seed))
    history: dict[str, list[float]] = collections.defaultdict(list)
    history["valid_step"].append(0)
    history["valid_ppl"].append(evaluate(trainer.params))
    print(f"{desc}: validation perplexity at step 0: {history['valid_ppl'][0]:.2f}")
    bar = tqdm(range(1, args.steps + 1), desc=desc, unit="step")
    pending = []
    for step in bar:
        pending.append(trainer.step(*next(data)))
        if step % args.log_every == 0 or step == args.steps:
            # Means over the steps since the last log: one batch alone is a noisy estimate.
            logged = jax.device_get(pending)
            values = float(np.mean([v for v, _ in logged]))
            metrics = {k: float(np.mean([m[k] for _, m in logged])) for k in logged[0][1]}
            history["step"].append(step)
            history["loss"].append(values)
            for key, value in metrics.items():
                history[key].append(value)
            history["valid_step"].append(step)
            history["valid_ppl"].append(evaluate(trainer.params))
            bar.set_postfix(loss=f"{values:.3f}", valid_ppl=f"{history['valid_ppl'][-1]:.1f}")
            pending = []
    return trainer, dict(history)


# ----------------------------------------------------------------------------------------------
# Script
# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("examples_out"), help="PNG directory")
    add_common_arguments(parser)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument(
        "--grad-token-chunk",
        type=int,
        default=256,
        help="tokens per block of the fused head's gradient pass, which holds [tokens, "
        "vocabulary] logits and their gradient (default 256: a quarter of the 1024 tokens of a "
        "batch); 0 takes jaxloss's default, 2**24 // vocabulary tokens (at the default sizes "
        "the whole batch, as much memory as the materialised logits)",
    )
    return parser.parse_args(argv)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vocab-size", type=int, default=16384)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--z-loss", type=float, default=1e-4)
    parser.add_argument("--soft-cap", type=float, default=30.0, help="0 disables it")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--valid-windows", type=int, default=256)
    parser.add_argument("--max-files", type=int, default=None, help="fewer stdlib files (tests)")
    parser.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> float:
    args = parse_args(argv)
    start = time.perf_counter()
    corpus = load_corpus(args.vocab_size, args.max_files)
    args.options = head_options(args.z_loss, args.soft_cap, args.grad_token_chunk)
    print(
        f"stdlib corpus: {len(corpus.train)} training and {len(corpus.valid)} validation tokens, "
        f"vocabulary {len(corpus.vocabulary)} words"
    )
    print(f"head options: {args.options}; per-token stats: {'yes' if HAS_STATS else 'no'}")
    report_head_memory(
        args.batch_size * args.seq_len, args.dim, len(corpus.vocabulary), args.options
    )
    model = LanguageModel(
        len(corpus.vocabulary),
        args.dim,
        args.layers,
        args.heads,
        args.seq_len,
        rngs=nnx.Rngs(args.seed),
    )
    windows = validation_windows(corpus.valid, args.seq_len, args.valid_windows)

    def loss(model, x, y):
        return lm_loss(model.hidden(x), model.kernel(), y, args.options)

    _, history = train_language_model(model, corpus, args, loss, "lm", windows)
    args.out.mkdir(parents=True, exist_ok=True)
    figure_path = args.out / "lm_linear_head_curves.png"
    save_curves(history, figure_path, args)
    print(f"saved {figure_path}")
    print(f"elapsed: {time.perf_counter() - start:.1f} s")
    final = history["valid_ppl"][-1]
    print(f"validation perplexity: {final:.2f}")
    return final


def label_log_axis(ax, values) -> None:
    """A log y-axis with several plain-number tick labels across ``values``' range.

    Matplotlib's default labels only powers of ten (and ``5×10¹``-style minor ticks), so a
    perplexity curve spanning less than a decade gets one or two labels; this picks the
    coarsest of ``1-2-5``, ``1-2-3-5-7`` and every integer multiple that puts four or more
    ticks inside the data's range.
    """
    ax.set_yscale("log")
    low, high = min(values), max(values)
    decades = range(int(np.floor(np.log10(low))), int(np.ceil(np.log10(high))) + 1)
    for multiples in ((1, 2, 5), (1, 2, 3, 5, 7), (1, 1.5, 2, 3, 4, 5, 6, 7, 8, 9)):
        ticks = [m * 10.0**e for e in decades for m in multiples if low <= m * 10.0**e <= high]
        if len(ticks) >= 4:
            break
    if len(ticks) < 2:  # a range too narrow for round numbers: label its ends
        ticks = sorted({float(f"{low:.3g}"), float(f"{high:.3g}")})
    ax.yaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())


# Panel key -> axis label; entropy is natural-log based (jaxloss's LogitStats.entropy).
PANEL_LABELS = {
    "loss": "training loss (CE + z-loss, nats)",
    "valid_ppl": "validation perplexity",
    "accuracy": "training accuracy (top-1)",
    "entropy": "training entropy (nats)",
}


def save_curves(history: dict[str, list[float]], path: Path, args) -> None:
    panels = [key for key in PANEL_LABELS if key in history]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, key in zip(np.atleast_1d(axes), panels, strict=True):
        steps, values = history["step"], history[key]
        if key == "valid_ppl":  # after step 0: the untrained model's would flatten a log axis
            steps, values = history["valid_step"][1:], values[1:]
        ax.plot(steps, values, marker="o", markersize=3)
        ax.set(xlabel="step", ylabel=PANEL_LABELS[key], title=PANEL_LABELS[key].split(" (")[0])
        if key == "valid_ppl":
            label_log_axis(ax, values)
    cap = f", soft-cap {args.soft_cap:g}" if "soft_cap" in args.options else ""
    fig.suptitle(f"stdlib word LM, linear_cross_entropy head (z-loss {args.z_loss:g}{cap})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
