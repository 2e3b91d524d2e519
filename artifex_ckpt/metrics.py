"""Turning metric values (Python, numpy or JAX scalars) into the floats Orbax stores as JSON."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, SupportsFloat, cast

import jax
import numpy as np

from artifex_ckpt.errors import MetricError

__all__ = [
    "is_scalar",
    "jsonable",
    "monitored_value",
    "normalise_metrics",
    "standard_json",
    "to_float",
]

# numpy dtype kinds of real numbers: signed and unsigned integers, floats.
_REAL_KINDS = ("i", "u", "f")


def to_float(name: str, value: object) -> float:
    """`value` as a Python float; numpy and JAX scalars (and size-1 arrays) are accepted.

    Raises `MetricError` naming `name` for strings, None, booleans and arrays of size > 1.
    """
    if isinstance(value, float):
        return float(value)
    # The common case first, a 0-d JAX or numpy array: read as a numpy array (one device
    # sync), whose dtype is cheap to check; float() of a JAX array costs 4x more (B1).
    if getattr(value, "ndim", None) == 0:
        try:
            array = np.asarray(value)
        except Exception as err:
            raise MetricError(
                f"metric {name!r} ({type(value).__name__}) cannot be read: "
                f"{type(err).__name__}: {err}; a real number is needed"
            ) from err
        if array.dtype.kind in _REAL_KINDS:
            return float(array)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if is_scalar(value):
        if getattr(value, "ndim", 0) == 0:
            # float() reads a 0-d numpy or JAX array directly (one device sync).
            return float(cast(SupportsFloat, value))
        return float(np.asarray(value).reshape(()))
    if isinstance(value, bool | str | bytes) or value is None:
        raise MetricError(
            f"metric {name!r} is {value!r} ({type(value).__name__}); "
            "a real number is needed (float, int, numpy or JAX scalar)"
        )
    shape = getattr(value, "shape", None)
    raise MetricError(
        f"metric {name!r} is a {type(value).__name__}"
        + (f" of shape {tuple(shape)}" if shape is not None else "")
        + "; a real scalar is needed (float, int, numpy or JAX scalar, or an array of size 1)"
    )


def is_scalar(value: object) -> bool:
    """Whether `to_float` accepts `value`; decided without reading a device array."""
    if isinstance(value, bool | str | bytes) or value is None:
        return False
    if isinstance(value, numbers.Real):
        return True
    dtype = getattr(value, "dtype", None)
    if dtype is None or getattr(value, "size", None) != 1:
        return False
    # Integer, unsigned or float kinds: bool and complex are not real metrics. ml_dtypes'
    # bfloat16 and float8 report kind "V", so they take JAX's slower check.
    kind = getattr(dtype, "kind", None)
    if kind == "V":
        return bool(jax.dtypes.issubdtype(dtype, np.floating))
    return kind in _REAL_KINDS


def normalise_metrics(
    metrics: Mapping[str, object] | None, monitor: str | None
) -> dict[str, float] | None:
    """Every metric as a float; `monitor` (if any) must be among them unless `metrics` is
    None."""
    if metrics is None:
        return None
    if not isinstance(metrics, Mapping):
        raise MetricError(f"metrics={metrics!r} is not a mapping; pass a dict of name -> number")
    if monitor is not None:
        monitored_value(metrics, monitor)
    return {str(name): to_float(str(name), value) for name, value in metrics.items()}


def monitored_value(metrics: Mapping[str, object], monitor: str) -> object:
    """`metrics[monitor]`, or a `MetricError` naming the monitor and the keys present."""
    if monitor not in metrics:
        raise MetricError(
            f"monitored metric {monitor!r} is missing; metrics given: {sorted(metrics)}"
        )
    return metrics[monitor]


def jsonable(tree: Any) -> Any:
    """A copy of `tree` with numpy/JAX scalars as Python numbers, so `json.dumps` takes it."""
    if isinstance(tree, Mapping):
        return {str(k): jsonable(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [jsonable(v) for v in tree]
    if isinstance(tree, bool | int | float | str) or tree is None:
        return tree
    if getattr(tree, "size", None) == 1:
        return np.asarray(tree).reshape(()).item()
    if hasattr(tree, "tolist"):
        return tree.tolist()
    return tree


def standard_json(metrics: Mapping[str, float] | None) -> dict[str, float | str] | None:
    """`metrics` with NaN and infinities as the strings "nan", "inf" and "-inf": JSON has no
    such numbers, and `float()` reads the strings back."""
    if metrics is None:
        return None
    return {k: v if math.isfinite(v) else str(v) for k, v in metrics.items()}
