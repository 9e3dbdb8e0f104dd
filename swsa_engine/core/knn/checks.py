"""Input checks and planning shared by the kNN scorers of :mod:`swsa_engine.core.knn`.

Constants (block memory, certificate tolerance, unit roundoffs), the kNN-specific array rules
(feature arrays refuse booleans; their messages name the expected shape), device / precision /
block-size options, support-set sizes, and the logging of block plans.  Dtype-neutral rules
(index arrays, finite rows, positive integers) come from :mod:`swsa_engine.core.validation`.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import numpy as np
import torch

from swsa_engine.core.validation import as_index_array, as_numpy, check_finite_rows

LOG = logging.getLogger(__name__)

__all__ = [
    "BLOCK_BYTES", "EXTRA_CANDIDATES", "U32", "U64", "INF", "as_feature_array", "as_task_mask",
    "resolve_device", "check_block_size", "sq_norms", "f32_safe", "too_small_message", "check_same_dim",
    "drop_if_unused", "check_run_options", "exclusion_array", "distinct_exclusions", "task_exclusions", "check_usable_rows",
    "check_task_rows", "safe_precision", "log_plan",
]


#: memory (bytes) that one block of work may use; blocks are sized from it.
BLOCK_BYTES = 256 * 2**20
#: extra candidates re-computed exactly in the float32 paths (beyond k).
EXTRA_CANDIDATES = 3
# float32 arithmetic is only used when squared norms stay inside this range (no overflow,
# no subnormal underflow); otherwise float64 is used.
_F32_MAX_NORM2 = 1e36
_F32_MIN_NORM2 = 1e-30
#: unit roundoff of float32 and of float64 arithmetic.
U32 = 2.0**-24
U64 = 2.0**-53
INF = float("inf")


def as_feature_array(x: Any, name: str, ndim: int, shape_doc: str) -> np.ndarray:
    """``x`` (array or torch tensor) as a NumPy array of int or float dtype with ``ndim`` axes, else
    ValueError naming ``shape_doc`` (e.g. ``"(Q, D)"``).  Booleans are refused: they are no features."""
    arr = as_numpy(x)
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be a real numeric array of shape {shape_doc}, got dtype {arr.dtype}; "
                         f"convert it with np.asarray({name}, dtype=np.float32)")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have shape {shape_doc} ({ndim} dimensions), got shape {arr.shape}; reshape it to {shape_doc}")
    return arr


def as_task_mask(x: Any, name: str, shape: tuple[int, ...], shape_doc: str) -> np.ndarray:
    """``x`` as a bool array of ``shape`` (True = real row), all True when ``x`` is None; else ValueError.

    The kNN form of :func:`swsa_engine.core.validation.as_bool_mask`: its messages name the
    expected shape ``shape_doc`` (e.g. ``"(T, Q)"``).
    """
    if x is None:
        return np.ones(shape, dtype=bool)
    arr = as_numpy(x)
    if arr.dtype != np.bool_:
        raise ValueError(f"{name} must be a boolean array of shape {shape_doc} (True = real), got dtype {arr.dtype}; pass {name}.astype(bool)")
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape_doc} = {shape}, got shape {arr.shape}")
    return arr


def resolve_device(device: Any) -> torch.device:
    """``device`` ('cpu', 'cuda', 'cuda:0', a torch.device) as a torch.device that exists here, else ValueError."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"device={device!r} is not a valid torch device ({err}); use 'cpu' or 'cuda'") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} was requested but CUDA is not available (torch.cuda.is_available() is False); use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible; use e.g. 'cuda:0'")
        return dev
    raise ValueError(f"device={device!r} is not supported; use 'cpu' or a CUDA device such as 'cuda' / 'cuda:0'")


def _resolve_precision(precision: Any, dev: torch.device) -> str:
    if precision is None:
        return "float64" if dev.type == "cpu" else "float32"
    if precision not in ("float32", "float64"):
        raise ValueError(f"precision must be None, 'float32' or 'float64', got {precision!r}")
    return precision


def check_block_size(block_size: Any, name: str = "block_size") -> int | None:
    """``block_size`` as an int >= 1, or None (sized automatically); else ValueError."""
    if block_size is None:
        return None
    if isinstance(block_size, bool):
        raise ValueError(f"{name} must be a positive integer or None, got {block_size!r}")
    try:
        block_size = operator.index(block_size)
    except TypeError:
        raise ValueError(f"{name} must be a positive integer or None, got {block_size!r}") from None
    if block_size < 1:
        raise ValueError(f"{name} must be >= 1 (or None for automatic), got {block_size}")
    return block_size


def sq_norms(x: np.ndarray, name: str) -> np.ndarray:
    """(...,) squared norms of the rows of ``x`` (..., D) in float64; raise if they overflow."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore"):
        n = np.einsum("...d,...d->...", x, x)
    if not np.isfinite(n).all():
        pos = tuple(int(i) for i in np.argwhere(~np.isfinite(n))[0])
        raise ValueError(f"{name} has a row whose squared norm overflows float64 (at {pos}); rescale the features")
    return n


def f32_safe(*norm_arrays: np.ndarray) -> bool:
    """Whether float32 arithmetic is safe for rows with these squared norms (no overflow, no underflow)."""
    top = max((float(a.max()) for a in norm_arrays if a.size), default=0.0)
    return top <= _F32_MAX_NORM2 and (top == 0.0 or top >= _F32_MIN_NORM2)


def too_small_message(k: int, details: list[tuple[int, int]], tail: str) -> str:
    """The error text for tasks with fewer than k usable rows: ``details`` lists (task, usable rows),
    ``tail`` says how usable rows are counted."""
    shown = ", ".join(f"task {t}: {c}" for t, c in details[:10])
    more = f" (and {len(details) - 10} more)" if len(details) > 10 else ""
    lowest = min(c for _, c in details)
    return (
        f"k={k} is larger than the support set of {len(details)} task(s) (usable rows {tail}: {shown}{more}); "
        f"use k <= {lowest}, or mask out / drop those tasks"
    )


def check_same_dim(dim: int, other_dim: int, other: str) -> None:
    """Raise unless the queries' feature count ``dim`` equals ``other_dim``, that of ``other``."""
    if dim != other_dim:
        raise ValueError(
            f"queries have D={dim} features per row but {other} have D={other_dim}; "
            f"both must come from the same backbone / feature layer"
        )


def drop_if_unused(excl: np.ndarray) -> np.ndarray | None:
    """``excl``, or None when it excludes nothing (the kernels then skip the exclusion work)."""
    return excl if (excl >= 0).any() else None


def check_run_options(block_size: Any, device: Any, precision: Any, default_precision: str | None = None
                      ) -> tuple[int | None, torch.device, str]:
    """Validated ``(block_size, device, precision)``; ``precision=None`` means ``default_precision``,
    or, when that is None too, float64 on CPU and float32 on CUDA."""
    block_size = check_block_size(block_size)
    dev = resolve_device(device)
    if precision is None and default_precision is not None:
        return block_size, dev, default_precision
    return block_size, dev, _resolve_precision(precision, dev)


def exclusion_array(exclude: Any, shape: tuple[int, int], high: int, what: str, shape_doc: str) -> np.ndarray:
    """``exclude`` validated as (T, Q, E) int64: E bank positions per query, -1 = none.

    Takes (T, Q) (one position per query: it is E = 1) or (T, Q, E); ``shape`` is (T, Q),
    ``shape_doc`` its name (e.g. ``"(T, Q)"``, ``"(T, Q, E)"`` for the 3-axis form).  Entries
    must be -1 or in ``[0, high)``; the messages are those of
    :func:`~swsa_engine.core.validation.as_index_array`.
    """
    arr = as_numpy(exclude)
    if arr.ndim == 3:
        full, doc = (*shape, arr.shape[2]), shape_doc[:-1] + ", E)"
    else:
        full, doc = tuple(shape), shape_doc
    excl = as_index_array(arr, "exclude", full, high=high, what=what, shape_doc=doc)
    return excl.reshape(*shape, -1)


def distinct_exclusions(excl: np.ndarray, query_mask: np.ndarray, bank_mask: np.ndarray) -> np.ndarray:
    """(T, Q, E') int64: per query the distinct *real* bank rows of ``excl`` (T, Q, E), then -1.

    Positions that name a padding row (``bank_mask`` (T, S) False), positions of a masked query
    (``query_mask`` (T, Q) False) and repeats of a position within one query become -1; the
    rows left come first, so ``(out >= 0).sum(-1)`` counts each query's distinct excluded real
    rows and E' = max(1, the largest such count).  E = 1 is returned as it is (masked to -1).
    """
    n_t, n_q, n_e = excl.shape
    if n_e == 0 or bank_mask.shape[1] == 0:
        return np.full((n_t, n_q, 1), -1, dtype=np.int64)
    real = bank_mask[np.arange(n_t)[:, None, None], np.maximum(excl, 0)]
    out = np.where(query_mask[:, :, None] & (excl >= 0) & real, excl, -1).astype(np.int64, copy=False)
    if n_e == 1:
        return out
    out = -np.sort(-out, axis=2)  # descending: real rows first, equal positions side by side
    repeat = np.zeros(out.shape, dtype=bool)
    repeat[:, :, 1:] = out[:, :, 1:] == out[:, :, :-1]
    out = -np.sort(-np.where(repeat, -1, out), axis=2)
    width = max(1, int((out >= 0).sum(axis=2).max(initial=0)))
    return np.ascontiguousarray(out[:, :, :width])


def task_exclusions(exclude: Any, query_mask: np.ndarray, bank_mask: np.ndarray) -> np.ndarray:
    """Validated per-task exclusions (T, Q) or (T, Q, E) as :func:`distinct_exclusions` (T, Q, E'):
    excluding for a masked query, a padding row, or a row twice is a no-op (-1)."""
    excl = exclusion_array(exclude, query_mask.shape, bank_mask.shape[1], "a row of that task's bank", "(T, Q)")
    return distinct_exclusions(excl, query_mask, bank_mask)


def check_usable_rows(k: int, query_mask: np.ndarray, bank_mask: np.ndarray, excl: np.ndarray | None) -> None:
    """Raise unless every real query (T, Q) keeps >= k usable rows: its task's real bank rows
    (``bank_mask`` (T, S)) minus its distinct excluded real rows (``excl`` (T, Q, E) from
    :func:`distinct_exclusions`, or None)."""
    n_real = bank_mask.sum(axis=1)[:, None]
    n_excl = (excl >= 0).sum(axis=2) if excl is not None else np.zeros(query_mask.shape, dtype=np.int64)
    usable = n_real - n_excl
    short = query_mask & (usable < k)
    if not short.any():
        return
    tasks = np.flatnonzero(short.any(axis=1))
    low = np.where(query_mask, usable, np.iinfo(np.int64).max).min(axis=1)
    if excl is None or excl.shape[2] == 1:
        tail = "= real bank rows minus an excluded row"
        raise ValueError(too_small_message(k, [(int(t), int(low[t])) for t in tasks], tail))
    worst = np.where(short, usable, np.iinfo(np.int64).max).argmin(axis=1)
    shown = ", ".join(f"task {t}: {int(n_real[t, 0])} real - {int(n_excl[t, worst[t]])} excluded = {int(low[t])} "
                      f"(query {int(worst[t])})" for t in tasks[:10])
    more = f" (and {tasks.size - 10} more)" if tasks.size > 10 else ""
    raise ValueError(
        f"k={k} is larger than the usable bank rows of {tasks.size} task(s) (usable rows = real bank rows minus the "
        f"query's distinct excluded rows: {shown}{more}); use k <= {int(low[tasks].min())}, or mask out / drop those tasks"
    )


def check_task_rows(k: int, q: np.ndarray, b: np.ndarray, query_mask: np.ndarray, bank_mask: np.ndarray,
                    excl: np.ndarray | None) -> None:
    """Raise unless every real query (T, Q) keeps >= k usable rows of its bank (``excl`` (T, Q, E)
    from :func:`distinct_exclusions`, or None) and every real row is finite."""
    check_usable_rows(k, query_mask, bank_mask, excl)
    check_finite_rows(q, "queries", query_mask, ("task", "row"))
    check_finite_rows(b, "banks", bank_mask, ("task", "row"))


def safe_precision(mode: str, *norm_arrays: np.ndarray, caller: str | None = None) -> str:
    """``mode``, or float64 where float32 would overflow or underflow on these squared norms
    (said at DEBUG level when ``caller`` names the public function)."""
    if mode == "float32" and not f32_safe(*norm_arrays):
        if caller:
            LOG.debug("%s: squared norms outside the float32-safe range; using float64", caller)
        return "float64"
    return mode


def log_plan(work: float, message: str, *args: Any) -> None:
    """Say how the work is split into blocks: at INFO level when it is big enough to take a while."""
    (LOG.info if work > 2e9 else LOG.debug)(message, *args)
