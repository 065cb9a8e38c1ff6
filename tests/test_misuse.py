"""Every misuse a user can make, and the words the error must say.

One table for the whole public API: each row is a call, the exception type, and the phrases a
user needs to fix the call (the function, the argument, the shapes and dtypes involved, the hint).
Every phrase is a regular expression that must occur in the message.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

import jaxloss


class Misuse(NamedTuple):
    call: Callable[[], object]
    error: type[Exception]
    words: tuple[str, ...]


Z43 = np.zeros((4, 3), np.float32)
P43 = np.full((4, 3), 1 / 3, np.float32)
Y4 = np.array([0, 1, 2, 0], np.int32)
X23 = np.ones((2, 3), np.float32)
HALF = np.full((4, 5), 0.5, np.float32)

CLASSIFICATION = {
    "ce_targets_extra_axis": Misuse(
        lambda: jaxloss.cross_entropy(Z43, Y4[:, None]),
        ValueError,
        (r"cross_entropy", r"`targets`", r"\(4, 1\)", r"int32", r"\(4, 3\)", r"float32", r"\(4,\)"),
    ),
    "nll_targets_extra_axis": Misuse(
        lambda: jaxloss.nll(Z43, Y4[:, None]), ValueError, (r"nll", r"`targets`", r"`log_probs`")
    ),
    "ce_targets_wrong_batch": Misuse(
        lambda: jaxloss.cross_entropy(Z43, Y4[:3]), ValueError, (r"`targets`", r"\(3,\)")
    ),
    "ce_targets_wrong_batch_axis1": Misuse(
        lambda: jaxloss.cross_entropy(np.zeros((4, 3, 2), np.float32), Y4, axis=1),
        ValueError,
        (r"`targets`", r"\(4, 2\)", r"\(4, 3, 2\)"),
    ),
    "ce_pytorch_layout_without_axis": Misuse(
        lambda: jaxloss.cross_entropy(np.zeros((4, 3, 5), np.float32), np.zeros((4, 5), np.int32)),
        ValueError,
        (r"`targets`", r"\(4, 5\)", r"\(4, 3, 5\)", r"pass `axis=1`"),
    ),
    "ce_float_targets_of_index_shape": Misuse(
        lambda: jaxloss.cross_entropy(Z43, Y4.astype(np.float32)),
        TypeError,
        (r"`targets`", r"class probabilities", r"\(4, 3\)", r"\(4,\)", r"integer dtype"),
    ),
    "ce_probability_targets_wrong_shape": Misuse(
        lambda: jaxloss.cross_entropy(Z43, np.full((4, 2), 0.5, np.float32)),
        ValueError,
        (r"`targets`", r"same shape as `logits`", r"\(4, 2\)", r"\(4, 3\)"),
    ),
    "ce_probability_targets_ignore_index": Misuse(
        lambda: jaxloss.cross_entropy(Z43, P43, ignore_index=1),
        ValueError,
        (r"`ignore_index`=1", r"floating point", r"index targets"),
    ),
    "ce_out_of_range_target": Misuse(
        lambda: jaxloss.cross_entropy(Z43, np.array([0, 1, 3, 0])),
        ValueError,
        (r"class index 3", r"position \(2,\)", r"\[0, 3\)", r"ignore_index=-100", "check_targets"),
    ),
    "nll_negative_target": Misuse(
        lambda: jaxloss.nll(Z43, np.array([0, -1, 2, 0])),
        ValueError,
        (r"nll", r"class index -1", r"position \(1,\)", r"`log_probs`"),
    ),
    "ce_single_class_binary_task": Misuse(
        lambda: jaxloss.cross_entropy(np.zeros((4, 1), np.float32), np.array([0, 1, 1, 0])),
        ValueError,
        (r"single class", r"bce_with_logits"),
    ),
    "ce_bool_targets": Misuse(
        lambda: jaxloss.cross_entropy(Z43, Y4.astype(bool)),
        TypeError,
        (r"`targets`", r"integer class indices or floating probabilities", r"bool"),
    ),
    "nll_float_targets": Misuse(
        lambda: jaxloss.nll(Z43, Y4.astype(np.float32)), TypeError, (r"`targets`", r"integer")
    ),
    "ce_reduction": Misuse(
        lambda: jaxloss.cross_entropy(Z43, Y4, reduction="batchmean"),
        ValueError,
        (r"`reduction`", r"'none', 'mean', 'sum'", r"'batchmean'"),
    ),
    "nll_reduction": Misuse(
        lambda: jaxloss.nll(Z43, Y4, reduction="avg"), ValueError, (r"`reduction`",)
    ),
    "ce_probs_reduction": Misuse(
        lambda: jaxloss.cross_entropy(Z43, P43, reduction="x"), ValueError, (r"`reduction`",)
    ),
    "ce_label_smoothing_negative": Misuse(
        lambda: jaxloss.cross_entropy(Z43, Y4, label_smoothing=-0.1),
        ValueError,
        (r"`label_smoothing`", r"\[0, 1\]", r"-0.1"),
    ),
    "ce_label_smoothing_above_one": Misuse(
        lambda: jaxloss.cross_entropy(Z43, Y4, label_smoothing=1.5),
        ValueError,
        (r"`label_smoothing`", r"1.5"),
    ),
    "ce_label_smoothing_nan": Misuse(
        lambda: jaxloss.cross_entropy(Z43, Y4, label_smoothing=float("nan")),
        ValueError,
        (r"`label_smoothing`", r"nan"),
    ),
    "ce_z_loss_negative": Misuse(
        lambda: jaxloss.cross_entropy(Z43, Y4, z_loss=-1e-3),
        ValueError,
        (r"`z_loss`", r">= 0", r"-0.001"),
    ),
    "ce_weight_too_long": Misuse(
        lambda: jaxloss.cross_entropy(Z43, Y4, weight=np.ones(4, np.float32)),
        ValueError,
        (r"`weight`", r"\(3,\)", r"one entry per class", r"\(4,\)"),
    ),
    "nll_weight_too_short": Misuse(
        lambda: jaxloss.nll(Z43, Y4, weight=np.ones(2)), ValueError, (r"`weight`", r"\(2,\)")
    ),
    "ce_weight_2d": Misuse(
        lambda: jaxloss.cross_entropy(Z43, Y4, weight=np.ones((1, 3))),
        ValueError,
        (r"`weight`", r"\(1, 3\)"),
    ),
    "ce_probs_weight": Misuse(
        lambda: jaxloss.cross_entropy(Z43, P43, weight=np.ones(4)), ValueError, (r"`weight`",)
    ),
    "ce_integer_logits": Misuse(
        lambda: jaxloss.cross_entropy(Z43.astype(np.int32), Y4),
        TypeError,
        (r"`logits`", r"floating dtype", r"int32", r"\(4, 3\)"),
    ),
    "nll_integer_log_probs": Misuse(
        lambda: jaxloss.nll(Z43.astype(np.int32), Y4), TypeError, (r"`log_probs`", r"int32")
    ),
    "ce_axis_out_of_range": Misuse(
        lambda: jaxloss.cross_entropy(Z43, Y4, axis=2),
        ValueError,
        (r"`axis`=2", r"out of range", r"rank 2"),
    ),
    "nll_axis_out_of_range_negative": Misuse(
        lambda: jaxloss.nll(Z43, Y4, axis=-3), ValueError, (r"`axis`=-3",)
    ),
    "ce_axis_not_int": Misuse(
        lambda: jaxloss.cross_entropy(Z43, Y4, axis=1.0), TypeError, (r"`axis`", r"int", r"float")
    ),
    "ce_ignore_index_float": Misuse(
        lambda: jaxloss.cross_entropy(Z43, Y4, ignore_index=1.5),
        TypeError,
        (r"`ignore_index`", r"int", r"1.5"),
    ),
    "nll_ignore_index_bool": Misuse(
        lambda: jaxloss.nll(Z43, Y4, ignore_index=True), TypeError, (r"`ignore_index`",)
    ),
    "ce_ignore_index_str": Misuse(
        lambda: jaxloss.cross_entropy(Z43, Y4, ignore_index="-100"),
        TypeError,
        (r"`ignore_index`",),
    ),
    "ce_scalar_logits": Misuse(
        lambda: jaxloss.cross_entropy(np.float32(1.0), np.int32(0)),
        ValueError,
        (r"cross_entropy", r"class axis", r"shape \(\)"),
    ),
    "check_targets_float": Misuse(
        lambda: jaxloss.check_targets(np.zeros(3, np.float32), 3),
        TypeError,
        (r"check_targets", r"`targets`", r"integer", r"float32"),
    ),
    "check_hyperparameters_outside_checkify": Misuse(
        lambda: jax.jit(lambda e: jaxloss.check_hyperparameters(label_smoothing=e))(0.1),
        ValueError,
        (r"check_hyperparameters", r"checkify\.checkify"),
    ),
    "ce_label_smoothing_not_scalar": Misuse(
        lambda: jaxloss.cross_entropy(Z43, Y4, label_smoothing=np.ones(2)),
        ValueError,
        (r"cross_entropy", r"`label_smoothing` must be a scalar", r"\(2,\)"),
    ),
    "ce_z_loss_string": Misuse(
        lambda: jaxloss.cross_entropy(Z43, Y4, z_loss="0.1"),
        TypeError,
        (r"cross_entropy", r"`z_loss` must be a real scalar", r"str"),
    ),
    "check_targets_outside_checkify": Misuse(
        lambda: jax.jit(lambda y: jaxloss.check_targets(y, 3))(Y4),
        ValueError,
        (r"check_targets", r"checkify\.checkify", r"err\.throw\(\)"),
    ),
}

SOFTMAX = {
    **{
        f"{name}_{dtype.__name__}_input": Misuse(
            lambda name=name, dtype=dtype: getattr(jaxloss, name)(np.ones((2, 3), dtype)),
            TypeError,
            (name, r"`x`", r"floating dtype", np.dtype(dtype).name, r"\(2, 3\)"),
        )
        for name in ("softmax", "log_softmax", "sigmoid", "log_sigmoid")
        for dtype in (np.int32, np.bool_)
    },
    **{
        f"{name}_axis_{axis}": Misuse(
            lambda name=name, axis=axis: getattr(jaxloss, name)(X23, axis),
            ValueError,
            (name, rf"`axis`={axis}", r"rank 2"),
        )
        for name in ("softmax", "log_softmax")
        for axis in (2, -3, 5)
    },
    **{
        f"{name}_axis_{axis!r}": Misuse(
            lambda name=name, axis=axis: getattr(jaxloss, name)(X23, axis),
            TypeError,
            (name, r"`axis`", r"int"),
        )
        for name in ("softmax", "log_softmax")
        for axis in (1.0, True, "1")
    },
    **{
        f"{name}_scalar_axis_{axis}": Misuse(
            lambda name=name, axis=axis: getattr(jaxloss, name)(np.float32(1.0), axis),
            ValueError,
            (name, rf"`axis`={axis}", r"0-d `x`", r"-1 or 0"),
        )
        for name in ("softmax", "log_softmax")
        for axis in (1, -2)
    },
    **{
        f"{name}_where_{kind}": Misuse(
            lambda name=name, dtype=dtype: getattr(jaxloss, name)(
                X23, where=np.ones((2, 3), dtype)
            ),
            TypeError,
            (name, r"`where`", r"boolean", np.dtype(dtype).name),
        )
        for name in ("softmax", "log_softmax")
        for kind, dtype in (("int", np.int32), ("float", np.float32))
    },
    **{
        f"{name}_where_shape_{shape}": Misuse(
            lambda name=name, shape=shape: getattr(jaxloss, name)(X23, where=np.ones(shape, bool)),
            ValueError,
            (name, r"`where`", r"does not broadcast", r"\(2, 3\)"),
        )
        for name in ("softmax", "log_softmax")
        for shape in ((2,), (3, 3), (4, 2, 3))
    },
}

BINARY_INPUT = {"bce": "probs", "bce_with_logits": "logits"}
WEIGHT_ARGUMENTS = (
    ("bce", "weight"),
    ("bce_with_logits", "weight"),
    ("bce_with_logits", "pos_weight"),
)
BINARY = {
    **{
        f"{name}_shapes_{a}_{b}": Misuse(
            lambda name=name, a=a, b=b: getattr(jaxloss, name)(np.full(a, 0.5), np.ones(b)),
            ValueError,
            (name, r"`targets`", rf"`{BINARY_INPUT[name]}`", r"same shape"),
        )
        for name in BINARY_INPUT
        for a, b in (((4, 3), (4, 1)), ((4, 3), (3, 4)), ((4,), (4, 1)))
    },
    **{
        f"{name}_{argument}_{shape}": Misuse(
            lambda name=name, argument=argument, shape=shape: getattr(jaxloss, name)(
                HALF, np.ones((4, 5)), **{argument: np.ones(shape)}
            ),
            ValueError,
            (name, rf"`{argument}`", r"does not broadcast", r"\(4, 5\)"),
        )
        for name, argument in WEIGHT_ARGUMENTS
        for shape in ((3,), (4,), (4, 1, 5), (2, 4, 5))
    },
    **{
        f"{name}_{which}_{dtype.__name__}": Misuse(
            lambda name=name, which=which, dtype=dtype: getattr(jaxloss, name)(
                *(
                    (np.ones((2, 3), dtype), np.full((2, 3), 0.5))
                    if which == "input"
                    else (np.full((2, 3), 0.5), np.ones((2, 3), dtype))
                )
            ),
            TypeError,
            (name, rf"`{BINARY_INPUT[name] if which == 'input' else 'targets'}`", r"floating"),
        )
        for name in BINARY_INPUT
        for which in ("input", "targets")
        for dtype in (np.int32, np.bool_)
    },
    **{
        f"{name}_bool_{argument}": Misuse(
            lambda name=name, argument=argument: getattr(jaxloss, name)(
                np.full((2, 3), 0.5), np.ones((2, 3)), **{argument: np.ones(3, bool)}
            ),
            TypeError,
            (name, rf"`{argument}`", r"real numeric", r"bool"),
        )
        for name, argument in WEIGHT_ARGUMENTS
    },
    **{
        f"{name}_reduction_{reduction}": Misuse(
            lambda name=name, reduction=reduction: getattr(jaxloss, name)(
                np.full((2, 3), 0.5), np.ones((2, 3)), reduction=reduction
            ),
            ValueError,
            (name, r"`reduction`"),
        )
        for name in BINARY_INPUT
        for reduction in ("batchmean", "avg", "Mean", "elementwise_mean", None)
    },
}

DIVERGENCE = {
    **{
        f"kl_div_shapes_{a}_{b}": Misuse(
            lambda a=a, b=b: jaxloss.kl_div(np.zeros(a, np.float32), np.ones(b, np.float32)),
            ValueError,
            (r"kl_div", r"`target`", r"`log_q`", r"same shape"),
        )
        for a, b in (((4, 3), (4, 1)), ((4, 3), (3, 4)), ((3,), (1, 3)))
    },
    **{
        f"kl_div_{which}_{dtype.__name__}": Misuse(
            lambda which=which, dtype=dtype: jaxloss.kl_div(
                *(
                    (np.zeros((2, 3), dtype), X23)
                    if which == "log_q"
                    else (X23, np.zeros((2, 3), dtype))
                )
            ),
            TypeError,
            (r"kl_div", rf"`{which}`", r"floating", np.dtype(dtype).name),
        )
        for which in ("log_q", "target")
        for dtype in (np.int32, np.bool_)
    },
    **{
        f"kl_div_reduction_{reduction}": Misuse(
            lambda reduction=reduction: jaxloss.kl_div(X23, X23, reduction=reduction),
            ValueError,
            (r"kl_div", r"`reduction`", r"'batchmean'"),
        )
        for reduction in ("batch_mean", "avg", "Mean", None)
    },
    **{
        f"entropy_{dtype.__name__}": Misuse(
            lambda dtype=dtype: jaxloss.entropy(np.ones((2, 3), dtype)),
            TypeError,
            (r"entropy", r"`probs`", np.dtype(dtype).name),
        )
        for dtype in (np.int32, np.bool_)
    },
    **{
        f"entropy_axis_{axis}": Misuse(
            lambda axis=axis: jaxloss.entropy(P43, axis=axis), ValueError, (r"entropy", r"`axis`")
        )
        for axis in (2, -3)
    },
    "entropy_axis_float": Misuse(
        lambda: jaxloss.entropy(P43, axis=1.0), TypeError, (r"entropy", r"`axis`")
    ),
    "entropy_scalar": Misuse(
        lambda: jaxloss.entropy(np.float32(1.0)), ValueError, (r"entropy", r"class axis")
    ),
}


class _Tensor:
    """Stands for a torch.Tensor (its type's module is what the check reads)."""


_Tensor.__module__ = "torch"
H24, K45 = np.ones((2, 4), np.float32), np.ones((4, 5), np.float32)

PYTORCH_HABITS = {
    "kl_div_log_target_string": Misuse(
        lambda: jaxloss.kl_div(Z43, P43, log_target="False"),
        TypeError,
        (r"kl_div", r"`log_target`", r"bool", r"'False'"),
    ),
    "ce_return_stats_string": Misuse(
        lambda: jaxloss.cross_entropy(Z43, Y4, return_stats="yes"),
        TypeError,
        (r"cross_entropy", r"`return_stats`", r"bool"),
    ),
    "ce_dim": Misuse(
        lambda: jaxloss.cross_entropy(Z43, Y4, dim=1),  # type: ignore[call-arg]
        TypeError,
        (r"cross_entropy", r"`dim`", r"`axis=`", r"axis=1"),
    ),
    **{
        f"ce_{name}": Misuse(
            lambda name=name: jaxloss.cross_entropy(Z43, Y4, **{name: False}),
            TypeError,
            (r"cross_entropy", f"`{name}`", r"`reduction=`", r"'mean'"),
        )
        for name in ("size_average", "reduce")
    },
    "ce_misspelt_keyword": Misuse(
        lambda: jaxloss.cross_entropy(Z43, Y4, label_smothing=0.1),  # type: ignore[call-arg]
        TypeError,
        (r"cross_entropy", r"`label_smothing`", r"`label_smoothing=`"),
    ),
    "ce_weight_positional": Misuse(
        lambda: jaxloss.cross_entropy(Z43, Y4, np.ones(3, np.float32)),  # type: ignore[misc]
        TypeError,
        (r"cross_entropy", r"2 positional", r"3 were given", r"weight=", r"keyword-only"),
    ),
    "nll_weight_positional": Misuse(
        lambda: jaxloss.nll(Z43, Y4, np.ones(3, np.float32)),  # type: ignore[misc]
        TypeError,
        (r"nll", r"weight=", r"keyword-only"),
    ),
    "ce_torch_tensor": Misuse(
        lambda: jaxloss.cross_entropy(_Tensor(), Y4),  # type: ignore[arg-type]
        TypeError,
        (r"cross_entropy", r"`logits`", r"torch", r"jnp\.asarray\(logits\.detach\(\)"),
    ),
    "bce_torch_tensor_keyword": Misuse(
        lambda: jaxloss.bce_with_logits(HALF, HALF, weight=_Tensor()),  # type: ignore[arg-type]
        TypeError,
        (r"bce_with_logits", r"`weight`", r"torch", r"jnp\.asarray"),
    ),
    "linear_torch_tensor": Misuse(
        lambda: jaxloss.linear_cross_entropy(_Tensor(), K45, Y4[:2]),  # type: ignore[arg-type]
        TypeError,
        (r"linear_cross_entropy", r"`hidden`", r"torch", r"jnp\.asarray"),
    ),
    "linear_mesh_device_list": Misuse(
        lambda: jaxloss.linear_cross_entropy(
            H24,
            K45,
            Y4[:2],
            mesh=jax.devices(),
            vocab_axis="v",  # type: ignore[arg-type]
        ),
        TypeError,
        (r"linear_cross_entropy", r"`mesh`", r"jax\.sharding\.Mesh", r"list", r"make_mesh"),
    ),
    "distillation_mesh_device_list": Misuse(
        lambda: jaxloss.linear_distillation(
            H24,
            K45,
            H24,
            K45,
            mesh=jax.devices(),
            vocab_axis="v",  # type: ignore[arg-type]
        ),
        TypeError,
        (r"linear_distillation", r"`mesh`", r"jax\.sharding\.Mesh", r"make_mesh"),
    ),
    "torch_linear_dim": Misuse(
        lambda: jaxloss.torch_linear_cross_entropy(H24, K45.T, Y4[:2], dim=1),  # type: ignore
        TypeError,
        (r"torch_linear_cross_entropy", r"`dim`"),
    ),
}

TABLE = {**CLASSIFICATION, **SOFTMAX, **BINARY, **DIVERGENCE, **PYTORCH_HABITS}


@pytest.fixture(autouse=True)
def _package_errors_only():
    """These tests read jaxloss's own messages, which a user without runtime type checking gets;
    the suite's jaxtyping hook (when on) would raise its own TypeCheckError first."""
    before = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    yield
    jaxtyping.config.update("jaxtyping_disable", before)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_misuse_raises_with_the_words_a_user_needs(name):
    case = TABLE[name]
    with pytest.raises(case.error) as info:
        case.call()
    message = str(info.value)
    missing = [word for word in case.words if not re.search(word, message)]
    assert not missing, f"{name}: {missing} not in: {message}"


@pytest.mark.parametrize("name", ["ce_targets_extra_axis", "ce_probability_targets_ignore_index"])
def test_misuse_is_reported_at_trace_time_under_an_outer_jit(name):
    """Shape and option errors need no data: they surface when an outer ``jit`` traces."""
    calls = {
        "ce_targets_extra_axis": lambda z, y: jaxloss.cross_entropy(z, y[:, None]),
        "ce_probability_targets_ignore_index": lambda z, t: jaxloss.cross_entropy(
            z, t, ignore_index=0
        ),
    }
    args = (Z43, Y4) if name == "ce_targets_extra_axis" else (Z43, P43)
    with pytest.raises(TABLE[name].error):
        jax.jit(calls[name]).trace(*args)


def test_every_public_function_has_a_row():
    covered = {word for case in TABLE.values() for word in case.words}
    functions = [n for n in jaxloss.__all__ if not inspect.isclass(getattr(jaxloss, n))]
    assert {"cross_entropy", "softmax", "kl_div"} <= set(functions)
    for name in functions:
        if "linear" in name:
            continue  # the fused heads have their own tables (tests/test_linear*.py)
        assert any(name == word for word in covered), name


def test_jnp_inputs_behave_as_numpy_ones():
    with pytest.raises(ValueError, match=r"class index 3"):
        jaxloss.cross_entropy(jnp.asarray(Z43), jnp.asarray([0, 1, 3, 0]))
