"""One set of rules for the arrays the engine accepts: dtypes, shapes, masks and usable rows.

Every public function of the engine checks its inputs with these helpers, so an error reads
the same wherever it arises: what was expected, what arrived, how to fix it.

The rule for a *usable row* (an image the engine may score or use as a reference) is one
rule everywhere: its mask entry is True and every value of its feature row is finite.
Padding is written as -1 in id arrays and as False in masks.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

__all__ = [
    "as_numpy", "as_real_array", "as_bool_mask", "as_index_array", "check_positive_int",
    "finite_rows", "usable_rows", "usable_ids", "check_finite_rows", "zero_unusable_rows",
]

# bool temporaries of the blockwise finiteness check stay under this many bytes
BLOCK_BYTES = 64 * 2**20


def as_numpy(value: Any) -> np.ndarray:
    """An array or a torch tensor (any device) as a NumPy array, without copying a NumPy input."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, without importing torch
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def as_real_array(value: Any, name: str, *, ndim: int | None = None, shape_doc: str = "") -> np.ndarray:
    """``value`` as a real (bool/int/float) array, with ``ndim`` axes when given, else ValueError.

    ``shape_doc`` names the expected shape in the message, e.g. ``"(T, S, D)"``.
    """
    array = as_numpy(value)
    doc = f" of shape {shape_doc}" if shape_doc else ""
    if array.dtype.kind not in "biuf":
        raise ValueError(f"`{name}` must be an array of real numbers{doc}, got dtype {array.dtype}; "
                         f"convert it with np.asarray({name}, dtype=np.float32)")
    if ndim is not None and array.ndim != ndim:
        raise ValueError(f"`{name}` must have {ndim} axes{doc}, got shape {array.shape}; reshape it"
                         + (f" to {shape_doc}" if shape_doc else ""))
    if ndim is None and array.ndim == 0:
        raise ValueError(f"`{name}` must have at least one axis{doc}, got a scalar; pass the values as a 1-d array")
    return array


def as_bool_mask(mask: Any, name: str, shape: tuple[int, ...] | None = None, shape_doc: str = "") -> np.ndarray:
    """``mask`` as a boolean array (True = entry included); ``None`` includes every entry of ``shape``.

    Integer masks are refused rather than cast: an integer array is as likely to be a list of
    indices as a 0/1 mask, and guessing wrong would silently change the result.
    """
    if mask is None:
        if shape is None:
            raise ValueError(f"`{name}` is None but no shape was given to build an all-True mask")
        return np.ones(shape, dtype=bool)
    array = as_numpy(mask)
    if array.dtype != np.bool_:
        raise ValueError(f"`{name}` must be boolean (True = included), got dtype {array.dtype}; convert a 0/1 "
                         f"mask with {name}.astype(bool), build one from indices with np.isin(np.arange(n), indices)")
    if shape is not None and array.shape != tuple(shape):
        doc = f"{shape_doc} = " if shape_doc else ""
        raise ValueError(f"`{name}` must have shape {doc}{tuple(shape)}, got shape {array.shape}")
    if shape is None and array.ndim == 0:
        raise ValueError(f"`{name}` must have at least one axis, got a scalar; leave it None to include every entry")
    return array


def as_index_array(value: Any, name: str, shape: tuple[int, ...], high: int, what: str, shape_doc: str = "") -> np.ndarray:
    """``value`` as int64 of ``shape`` whose entries are -1 (none) or in ``[0, high)``, else ValueError.

    The messages write ``name`` as it is indexed (``exclude[1] = 4 is out of range``), so without
    quotes, and name the expected shape as ``shape_doc`` (e.g. ``"(T, Q)"``) when one is given.
    """
    array = as_numpy(value)
    doc = f"{shape_doc} = " if shape_doc else ""
    if array.dtype.kind not in "iu":
        raise ValueError(f"{name} must be an integer array of shape {shape_doc or tuple(shape)}, got dtype {array.dtype}; "
                         f"pass {name}.astype(np.int64) (use -1 for none)")
    if array.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {doc}{tuple(shape)}, got shape {array.shape}")
    array = array.astype(np.int64, copy=False)
    bad = (array < -1) | (array >= high)
    if bad.any():
        position = tuple(int(i) for i in np.argwhere(bad)[0])
        where = position[0] if len(position) == 1 else position
        raise ValueError(f"{name}[{where}] = {int(array[position])} is out of range: it must be -1 (none) or "
                         f"{what} in [0, {high}); {int(bad.sum())} entries are out of range")
    return array


def check_positive_int(value: Any, name: str, example: str) -> int:
    """``value`` as a Python int >= 1 (bools refused), else ValueError; ``example`` shows a valid call."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a positive integer, got {value!r}; pass e.g. {example}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a positive integer, got {value!r} ({type(value).__name__}); "
                         f"pass e.g. {example}") from None
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {name}={value}; pass e.g. {example}")
    return value


def finite_rows(features: np.ndarray) -> np.ndarray:
    """(...,) True where every value of the feature row ``features[..., :]`` is finite.

    Rows of float32 (or narrower) are summed in float64: a sum of finite such values cannot
    overflow float64, and NaN or inf makes it non-finite, so the test is exact and one pass over
    memory (about 5× faster than ``isfinite(...).all()`` on the sweep's matrices).
    """
    if features.dtype.kind in "biu":
        return np.ones(features.shape[:-1], dtype=bool)
    if features.dtype.kind == "f" and features.dtype.itemsize <= 4 and features.shape[-1] < 2**40:
        with np.errstate(invalid="ignore", over="ignore"):
            return np.isfinite(np.add.reduce(features, axis=-1, dtype=np.float64))
    return np.isfinite(features).all(axis=-1)


def usable_rows(features: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """(...,) the one rule for a usable row: included by ``mask`` (if given) and finite throughout."""
    usable = finite_rows(features)
    return usable if mask is None else usable & mask


def usable_ids(ids: np.ndarray, usable: np.ndarray) -> np.ndarray:
    """``ids`` (any shape, -1 padded) with the ids that ``usable`` (N,) marks False set to -1."""
    ids = np.asarray(ids)
    return np.where((ids >= 0) & usable[np.maximum(ids, 0)], ids, -1)


def check_finite_rows(array: np.ndarray, name: str, row_ok: np.ndarray | None = None,
                      labels: tuple[str, ...] = ("row",)) -> None:
    """Raise ValueError if a row of ``array`` (..., D) that ``row_ok`` (...,) includes holds NaN or inf.

    Works in blocks of the leading axis so the check never allocates more than ``BLOCK_BYTES``;
    the message names the first bad row (with ``labels`` naming the leading axes) and the count.
    """
    if array.size == 0 or array.dtype.kind in "biu":
        return
    per_block = max(1, int(BLOCK_BYTES // max(1, array[0].size)))
    first, n_bad = None, 0
    for start in range(0, array.shape[0], per_block):
        bad = ~finite_rows(array[start:start + per_block])
        if row_ok is not None:
            bad &= row_ok[start:start + per_block]
        if bad.any():
            n_bad += int(bad.sum())
            if first is None:
                position = tuple(int(i) for i in np.argwhere(bad)[0])
                first = (position[0] + start,) + position[1:]
    if first is not None:
        where = ", ".join(f"{label} {i}" for label, i in zip(labels, first))
        raise ValueError(f"{name} contains NaN or inf at {where} (first bad row; {n_bad} bad row(s) in all); "
                         f"re-embed or drop those rows (mask them out where a mask is accepted)")


def zero_unusable_rows(features: np.ndarray, mask: np.ndarray, name: str) -> np.ndarray:
    """``features`` (..., D) with rows outside ``mask`` (...,) set to 0; raises on a non-finite row inside it."""
    bad = mask & ~finite_rows(features)
    if bad.any():
        raise ValueError(f"{name} holds {int(bad.sum())} non-finite rows that its mask marks as real; mask those "
                         "images out (they are unusable) or re-embed them")
    return np.where(mask[..., None], features, 0.0)
