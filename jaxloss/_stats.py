"""Per-position statistics of the logits a cross-entropy loss used, returned beside the loss.

What a language-model training loop logs (perplexity, accuracy, confidence) without a second
pass over the logits: the losses that accept ``return_stats=True`` fill this in from the same
pass that computes the loss.
"""

from __future__ import annotations

from typing import NamedTuple

from jaxtyping import Array, Bool, Float, Int


class LogitStats(NamedTuple):
    """Per-position statistics of the logits ``z`` used by the loss (after any soft-cap).

    Every field has the shape of the per-position loss (the index targets' shape). They are
    diagnostics: computed under ``jax.lax.stop_gradient`` (not differentiated).

    Attributes:
      lse: ``log Σ_c exp(z_c)``, the log-partition function.
      correct: whether ``argmax_c z_c`` (ties to the lowest class index, as ``jnp.argmax``)
        equals the target class (for probability targets: the target's own argmax). False at
        ignored positions and at out-of-range targets.
      entropy: ``-Σ_c p_c log p_c`` of ``p = softmax(z)``, in nats: ``lse - Σ_c p_c z_c``.
      argmax: the predicted class ``argmax_c z_c`` (int32; ties to the lowest class index, as
        ``jnp.argmax``, across chunks and shards too): Liger's ``return_predicted_tokens``.
        Defined at ignored positions too; 0 where there are no classes.

    ``lse`` and ``entropy`` are defined at ignored positions too (they depend on the logits
    only); mask them with the targets when averaging.
    """

    lse: Float[Array, "*batch"]
    correct: Bool[Array, "*batch"]
    entropy: Float[Array, "*batch"]
    argmax: Int[Array, "*batch"]
