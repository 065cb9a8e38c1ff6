"""jaxloss: PyTorch-exact classification losses as pure, jitted JAX functions."""

from jaxloss._binary import bce, bce_with_logits
from jaxloss._classification import cross_entropy, nll
from jaxloss._distillation import linear_distillation
from jaxloss._divergence import entropy, kl_div
from jaxloss._linear import linear_cross_entropy, torch_linear_cross_entropy
from jaxloss._softmax import log_sigmoid, log_softmax, sigmoid, softmax
from jaxloss._stats import LogitStats
from jaxloss._targets import check_hyperparameters, check_targets

__version__ = "0.1.0"

__all__ = [
    "LogitStats",
    "bce",
    "bce_with_logits",
    "check_hyperparameters",
    "check_targets",
    "cross_entropy",
    "entropy",
    "kl_div",
    "linear_cross_entropy",
    "linear_distillation",
    "log_sigmoid",
    "log_softmax",
    "nll",
    "sigmoid",
    "softmax",
    "torch_linear_cross_entropy",
]
