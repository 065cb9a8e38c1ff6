"""Argument validation: every misuse raises at trace time, naming the function, argument and fix.

Every loss funnels its checks through this module so that a misuse is reported the same way
everywhere. The checks inspect static shapes and dtypes only, so they run once at trace time and
cost nothing inside ``jax.jit``; ``jit`` and ``checked_call`` put PyTorch habits (positional
options, ``dim=``, ``torch.Tensor`` inputs) into words before JAX sees them.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any, Literal, ParamSpec, TypeVar, cast

import chex
import jax
import jax.numpy as jnp
import numpy as np

Reduction = Literal["none", "mean", "sum"]


REDUCTIONS: tuple[str, ...] = ("none", "mean", "sum")


_P = ParamSpec("_P")


_R = TypeVar("_R")


def jit(
    fn: Callable[_P, _R],
    *,
    static_argnames: tuple[str, ...] = (),
    prepare: Callable[[dict[str, Any]], None] | None = None,
) -> Callable[_P, _R]:
    """``jax.jit`` that keeps ``fn``'s signature visible to type checkers and IDEs.

    ``jax.jit`` returns a ``JitWrapped`` typed ``(*args, **kwargs) -> Any``: with it, a misspelt
    keyword in user code is no type error and every loss is ``Any``. At run time this is exactly
    ``jax.jit`` (``.lower``, ``.trace`` and the rest still work; type checkers just don't see them).

    ``prepare(arguments)``, if given, sees every argument by name (defaults applied) before each
    call, outside the compiled function, and may replace them: there concrete data can still
    raise (PyTorch's errors on bad values) and a hyperparameter that is exactly 0 can be dropped
    (no term, and no compilation per value). It must leave traced arguments alone, so that under
    an outer ``jit`` it costs nothing.
    """
    jitted = jax.jit(fn, static_argnames=static_argnames)
    call: Callable = jitted
    if prepare is not None:
        signature = inspect.signature(fn)

        def call(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            prepare(bound.arguments)
            return jitted(*bound.args, **bound.kwargs)

    checked = checked_call(fn, call)
    for name in ("lower", "trace", "eval_shape", "clear_cache"):
        setattr(checked, name, getattr(jitted, name))
    return checked


# What a PyTorch habit passes, and the words that fix it.
_TORCH_KEYWORDS = {
    "dim": "the class axis is `axis=` (PyTorch's (N, C, d1, ...) layout is `axis=1`)",
    "size_average": "use `reduction=` ('mean', 'sum' or 'none'): PyTorch deprecated "
    "`size_average` and `reduce` for it",
    "reduce": "use `reduction=` ('mean', 'sum' or 'none'): PyTorch deprecated "
    "`size_average` and `reduce` for it",
    "target": "the targets are `targets=` (or the second positional argument)",
    "input": "the first argument is positional (or named as in the signature)",
}


def checked_call(fn: Callable[_P, _R], call: Callable | None = None) -> Callable[_P, _R]:
    """``call`` (``fn`` itself by default) behind the checks a PyTorch habit needs first.

    Before JAX sees the arguments (it would answer "unexpected keyword argument", "not marked
    as static" or a hashing error): options passed positionally, PyTorch's keyword names,
    ``torch.Tensor`` inputs and a ``mesh`` that is not one each raise a ``TypeError`` that names
    the function, the argument and the fix. Costs a set comparison per call.
    """
    signature = inspect.signature(fn)
    params = signature.parameters.values()
    positional = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    names = frozenset(signature.parameters)
    target = fn if call is None else call

    @functools.wraps(fn)
    def checked(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        if len(args) > len(positional) or not names.issuperset(kwargs):
            _explain_arguments(fn.__name__, positional, names, args, kwargs)
        for name, value in (*zip(positional, args, strict=False), *kwargs.items()):
            _reject_foreign(fn.__name__, name, value)
        return target(*args, **kwargs)

    return cast(Callable[_P, _R], checked)


def _explain_arguments(fn: str, positional: list[str], names: frozenset, args, kwargs) -> None:
    if len(args) > len(positional):
        options = sorted(names - set(positional))
        raise TypeError(
            f"{fn}: takes {len(positional)} positional argument(s) ({', '.join(positional)}) but "
            f"{len(args)} were given: every option is keyword-only, e.g. "
            f"`{fn}(..., weight=w)` where PyTorch takes `weight` third; options: {options}"
        )
    for name in kwargs:
        if name in names:
            continue
        hint = _TORCH_KEYWORDS.get(name)
        if hint is None:
            close = difflib.get_close_matches(name, sorted(names), n=1)
            hint = f"did you mean `{close[0]}=`?" if close else f"arguments: {sorted(names)}"
        raise TypeError(f"{fn}: got an unexpected keyword argument `{name}`: {hint}")


def _reject_foreign(fn: str, name: str, value: Any) -> None:
    module = type(value).__module__
    if module == "torch" or module.startswith("torch."):
        raise TypeError(
            f"{fn}: `{name}` is a {module}.{type(value).__name__}; jaxloss takes JAX or NumPy "
            f"arrays: convert it first, e.g. `jnp.asarray({name}.detach().cpu().numpy())`"
        )
    if name == "mesh" and value is not None and not isinstance(value, _MESHES):
        raise TypeError(
            f"{fn}: `mesh` must be a jax.sharding.Mesh, got {type(value).__name__}: build one "
            "from the devices, e.g. `jax.make_mesh((jax.device_count(),), ('vocab',))`"
        )


_MESHES = (jax.sharding.Mesh, jax.sharding.AbstractMesh)


def check_flag(fn: str, name: str, value: Any) -> bool:
    """``value`` as a bool; ``TypeError`` otherwise (the string 'False' would act as True)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{fn}: `{name}` must be a bool (True or False), got {value!r}")
    return bool(value)


def hyperparameter(
    fn: str,
    name: str,
    value: Any,
    low: float = 0.0,
    high: float = np.inf,
    *,
    positive: bool = False,
) -> Any | None:
    """A scalar option that may be traced: None where it is absent (None, or exactly 0).

    A Python or concrete value outside ``[low, high]`` (``(low, high]`` when ``positive``; NaN
    and inf never pass) raises ``ValueError``; a traced one passes as it is (check it with
    ``checkify`` if it can go wrong). A present value is passed to the compiled function as
    data, so that a schedule compiles once.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not (
        isinstance(value, (int, float, np.number)) or hasattr(value, "dtype")
    ):
        raise TypeError(
            f"{fn}: `{name}` must be a real scalar (a Python float or a 0-d array), got "
            f"{type(value).__name__}"
        )
    if np.shape(value) != ():
        raise ValueError(f"{fn}: `{name}` must be a scalar, got shape {np.shape(value)}")
    dtype = jnp.result_type(value)
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"{fn}: `{name}` must be real, got dtype {dtype}")
    if not is_concrete(value):
        return value
    number = float(value)
    in_range = (low < number if positive else low <= number) and number <= high
    if not (np.isfinite(number) and in_range):
        if np.isfinite(high):
            rule = f"lie in {'(' if positive else '['}{low:g}, {high:g}]"
        else:
            rule = f"be finite and {'>' if positive else '>='} {low:g}"
        raise ValueError(f"{fn}: `{name}` must {rule}, got {number}")
    return None if number == 0 else value


def is_concrete(x: Any) -> bool:
    """Whether ``x`` holds data this process can read now (not a tracer, not multi-host)."""
    if isinstance(x, jax.core.Tracer):  # pyright: ignore[reportAttributeAccessIssue]
        return False
    return getattr(x, "is_fully_addressable", True)


def as_array(fn: str, name: str, x: Any) -> jax.Array:
    """Converts ``x`` to a JAX array, naming the argument if it cannot be converted."""
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{fn}: `{name}` must be an array, got {type(x).__name__}: {err}") from err


def describe(x: jax.Array) -> str:
    return f"shape {tuple(x.shape)} and dtype {x.dtype}"


def expect(assertion: Callable[..., None], *args: Any, message: str, error: type) -> None:
    """Runs a static chex assertion; on failure raises ``error(message)``.

    chex's own wording ("[Chex] ... input 0 has shape ...") stays attached as the cause; the
    message a user reads first names the function, the argument and the fix.
    """
    try:
        assertion(*args)
    except AssertionError as err:
        raise error(message) from err


def check_floating(fn: str, name: str, x: Any) -> jax.Array:
    """Returns ``x`` as an array, raising ``TypeError`` unless its dtype is real floating."""
    x = as_array(fn, name, x)
    message = f"{fn}: `{name}` must have a floating dtype, got {describe(x)}"
    expect(chex.assert_type, x, float, message=message, error=TypeError)
    return x


def check_integer(fn: str, name: str, x: Any) -> jax.Array:
    """Returns ``x`` as an array, raising ``TypeError`` unless its dtype is integer."""
    x = as_array(fn, name, x)
    message = f"{fn}: `{name}` must have an integer dtype, got {describe(x)}"
    expect(chex.assert_type, x, int, message=message, error=TypeError)
    return x


def check_real(fn: str, name: str, x: Any) -> jax.Array:
    """Returns ``x`` as an array, raising ``TypeError`` unless it is real (integer or floating)."""
    x = as_array(fn, name, x)
    # chex has no "integer or floating" assertion.
    if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
        raise TypeError(f"{fn}: `{name}` must have a real numeric dtype, got {describe(x)}")
    return x


def check_same_shape(fn: str, names: tuple[str, str], a: jax.Array, b: jax.Array) -> None:
    """Raises ``ValueError`` unless ``a`` and ``b`` have identical shapes (no broadcasting)."""
    message = (
        f"{fn}: `{names[1]}` must have the same shape as `{names[0]}` (no broadcasting), "
        f"got `{names[0]}` with {describe(a)} and `{names[1]}` with {describe(b)}"
    )
    expect(chex.assert_equal_shape, (a, b), message=message, error=ValueError)


def check_reduction(fn: str, reduction: str, allowed: Sequence[str] = REDUCTIONS) -> None:
    """Raises ``ValueError`` for a reduction outside ``allowed``."""
    if reduction not in allowed:
        raise ValueError(f"{fn}: `reduction` must be one of {tuple(allowed)}, got {reduction!r}")


def check_unit_interval(fn: str, name: str, value: float) -> float:
    """Returns ``value`` as a Python float, raising ``ValueError`` outside ``[0, 1]``."""
    try:
        value = float(value)
    except TypeError as err:
        raise TypeError(
            f"{fn}: `{name}` must be a Python float, got {type(value).__name__}"
        ) from err
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{fn}: `{name}` must lie in [0, 1], got {value}")
    return value


def class_axis(fn: str, axis: int, ndim: int) -> int:
    """Normalises the class axis to a non-negative index for an array of rank ``ndim``."""
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise TypeError(f"{fn}: `axis` must be an int, got {type(axis).__name__}")
    if ndim == 0:
        raise ValueError(f"{fn}: the input must have a class axis, got a scalar (shape ())")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{fn}: `axis`={axis} is out of range for an input of rank {ndim}")
    return int(axis) % ndim


def without_axis(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    return shape[:axis] + shape[axis + 1 :]


def check_class_weight(fn: str, weight: Any, num_classes: int) -> jax.Array | None:
    """Validates a per-class weight vector of shape ``(num_classes,)``."""
    if weight is None:
        return None
    weight = check_real(fn, "weight", weight)
    message = (
        f"{fn}: `weight` must have shape ({num_classes},), one entry per class, "
        f"got {describe(weight)}"
    )
    expect(chex.assert_shape, weight, (num_classes,), message=message, error=ValueError)
    return weight


def broadcast_like(
    fn: str, name: str, arr: Any, shape: tuple[int, ...], *, boolean: bool = False
) -> jax.Array | None:
    """Broadcasts ``arr`` to ``shape`` with NumPy/PyTorch rules (trailing axes aligned).

    PyTorch lets ``weight`` and ``pos_weight`` broadcast against the input, but never lets them
    enlarge it; the same holds here, and the broadcast is explicit so that it is legal under
    ``jax_numpy_rank_promotion="raise"``.
    """
    if arr is None:
        return None
    # A boolean mask (``where``) has been checked by its caller; weights must be real numbers.
    arr = as_array(fn, name, arr) if boolean else check_real(fn, name, arr)
    try:
        out_shape = np.broadcast_shapes(arr.shape, shape)
    except ValueError:
        out_shape = None
    if out_shape != tuple(shape):
        raise ValueError(
            f"{fn}: `{name}` with {describe(arr)} does not broadcast to the input's shape "
            f"{tuple(shape)}"
        )
    return jnp.broadcast_to(arr, shape)
