"""``linear_cross_entropy``: cross-entropy of a linear layer's logits without materialising them.

By concern: :mod:`.api` (the public function and its checks), :mod:`.chunked` (the blocked
kernel and its ``custom_vjp``), :mod:`.sharded` (the ``shard_map`` form), :mod:`.assembly` (the
per-token loss and reduction from per-token statistics), :mod:`.reference` (the materialised
definition), :mod:`.torch_api` (PyTorch's ``F.linear_cross_entropy`` signature and
layout). Helpers other blockwise losses may import: ``ChunkConfig``, ``chunk``,
``num_chunks``, ``dot`` and ``vary`` from :mod:`.chunked`.
"""

from jaxloss._linear.api import linear_cross_entropy
from jaxloss._linear.chunked import (
    DEFAULT_TOKEN_CHUNK,
    DEFAULT_VOCAB_CHUNK,
    ChunkConfig,
    chunk,
    dot,
    num_chunks,
    vary,
)
from jaxloss._linear.torch_api import torch_linear_cross_entropy

__all__ = [
    "DEFAULT_TOKEN_CHUNK",
    "DEFAULT_VOCAB_CHUNK",
    "ChunkConfig",
    "chunk",
    "dot",
    "linear_cross_entropy",
    "num_chunks",
    "torch_linear_cross_entropy",
    "vary",
]
