"""``linear_cross_entropy``: cross-entropy of a linear layer's logits without materialising them.

By concern: :mod:`.api` (the public function and its checks), :mod:`.chunked` (the linear
head's block rules on the shared blockwise engine, :mod:`jaxloss._blockwise`), :mod:`.sharded`
(the ``shard_map`` form), :mod:`.assembly` (the per-token loss and reduction from per-token
statistics), :mod:`.reference` (the materialised definition), :mod:`.torch_api` (PyTorch's
``F.linear_cross_entropy`` signature and layout). Other blockwise losses import the engine,
not this package's modules.
"""

from jaxloss._linear.api import linear_cross_entropy
from jaxloss._linear.torch_api import torch_linear_cross_entropy

__all__ = ["linear_cross_entropy", "torch_linear_cross_entropy"]
