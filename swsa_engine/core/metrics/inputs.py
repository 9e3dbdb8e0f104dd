"""Input checks and warnings shared by the batched ranking metrics (:mod:`swsa_engine.core.metrics`).

Arrays are described as ``(..., n)``: the metric works along the last axis and broadcasts over
the leading ones.  Dtype and mask rules come from :mod:`swsa_engine.core.validation`; these
helpers add what the metrics need beyond them (shapes that must agree on n, NaN among included
entries, one warning per call for undefined rows).
"""

from __future__ import annotations

import warnings

import numpy as np

__all__ = ["UndefinedMetricWarning", "broadcast_shape", "reject_nan_or_nonfinite", "warn_undefined"]


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for some rows (e.g. a single class); NaN was returned there."""


def broadcast_shape(function: str, arrays: dict[str, np.ndarray | None]) -> tuple[int, ...]:
    """Common shape (..., n) of the named arrays, or ValueError naming the culprit.

    The last axis must have the same length n everywhere (it indexes the same entries);
    leading axes broadcast with numpy rules, so e.g. labels of shape (n,) serve every row.
    """
    present = {name: array for name, array in arrays.items() if array is not None}
    (first_name, first), *others = present.items()
    n = first.shape[-1]
    for name, array in others:
        if array.shape[-1] != n:
            raise ValueError(
                f"{function}: `{name}` has {array.shape[-1]} entries along its last axis "
                f"(shape {array.shape}) but `{first_name}` has {n} (shape {first.shape}); "
                f"both must describe the same n entries. Check that they come from the "
                f"same task, or pad ragged rows and pass a `mask`."
            )
    try:
        return np.broadcast_shapes(*(array.shape for array in present.values()))
    except ValueError:
        shapes = ", ".join(f"`{name}` {array.shape}" for name, array in present.items())
        raise ValueError(
            f"{function}: shapes {shapes} do not broadcast. Leading axes must be equal or "
            f"1 (or missing): e.g. scores (tasks, n) with labels (tasks, n) or (n,)."
        ) from None


def _format_index(name: str, index: tuple[int, ...]) -> str:
    return f"{name}[{', '.join(str(int(i)) for i in index)}]"


def reject_nan_or_nonfinite(
    function: str, name: str, values: np.ndarray, included: np.ndarray | None, *, allow_inf: bool,
    how_to_exclude: str = "exclude those entries with `mask` (False = excluded)",
) -> None:
    """Raise ValueError if an entry of ``values`` (..., n) that ``included`` (..., n; None = all) marks is
    NaN (or, unless ``allow_inf``, infinite); the message names ``function``, ``name``, the first one
    and ``how_to_exclude`` such entries."""
    if values.dtype.kind != "f":
        return  # integers and booleans are always finite
    bad = np.isnan(values) if allow_inf else ~np.isfinite(values)
    if included is not None:
        bad &= included
    bad_count = int(np.count_nonzero(bad))
    if bad_count == 0:
        return
    first = tuple(np.argwhere(bad)[0])
    what = "NaN" if allow_inf else "non-finite (NaN or infinite)"
    raise ValueError(
        f"{function}: `{name}` contains {bad_count} {what} value(s) among included entries; "
        f"the first is {_format_index(name, first)} = {values[first]}. Fix the values that "
        f"produced them, or {how_to_exclude}."
    )


def warn_undefined(function: str, undefined: np.ndarray, reason: str) -> None:
    """One :class:`UndefinedMetricWarning` saying for how many rows of ``undefined`` (...) bool
    ``function`` returned NaN, and ``reason``; nothing when no row is undefined."""
    undefined_count = int(np.count_nonzero(undefined))
    if undefined_count:
        warnings.warn(
            f"{function} is undefined for {undefined_count} of {undefined.size} row(s) "
            f"because {reason}; NaN was returned for those rows.",
            UndefinedMetricWarning,
            stacklevel=3,
        )
