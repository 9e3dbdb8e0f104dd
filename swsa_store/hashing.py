"""Seeded, order-free uniform numbers from integer keys (a splitmix64 chain); pure NumPy, no files.

The abnormal-reference split (:mod:`swsa_store.references`) and the few-shot residual's
reference draw (:class:`swsa_engine.core.detectors.ResidualDetector`) both draw with
:func:`hash_uniform`, so a draw depends only on its seed and keys.
"""

from __future__ import annotations

import numpy as np

__all__ = ["hash_uniform"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise over uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def hash_uniform(seed: int, *keys) -> np.ndarray:
    """Uniform numbers in ``[0, 1)`` from a seeded hash of integer ``keys`` (arrays broadcast).

    The value for one combination of keys depends on nothing else (not on array order or on the
    other entries), and is the same on every machine and Python run.
    """
    state = _splitmix64(np.asarray(np.int64(seed)).astype(np.uint64))
    for key in keys:
        key = np.asarray(key, dtype=np.int64).astype(np.uint64)
        state = _splitmix64(state ^ _splitmix64(key))
    return (state >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)  # 53 bits
