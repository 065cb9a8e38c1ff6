"""The blockwise engine shared by the fused linear heads (``linear_cross_entropy``,
``linear_distillation``): logits ``hidden @ kernel + bias`` produced one ``token_chunk ×
vocab_chunk`` block at a time and never materialised.

By concern: :mod:`.blocks` (chunks, the slid-back last chunk, the block operands, the matmul),
:mod:`.online` (the online log-sum-exp and its merge over vocabulary shards), :mod:`.passes`
(the forward sweep and the recomputing backward pass), :mod:`.vjp` (the custom-VJP plumbing)
and :mod:`.sharding` (the ``shard_map`` glue). An op supplies its block rules and its
assembly; everything that walks blocks lives here once.
"""
