"""Validation protocols: which bank rows each synthetic validation query is scored without.

A detector that keeps a bank (the task's support images) scores a validation query by comparing it
with that bank. When the query *is* a bank image, or was *made from* bank images, its own rows
make it look normal: a held-out normal finds itself at distance 0, and a subtle synthetic anomaly
(a thin scar pasted on a seed) finds its parent seed a hair away. Which rows are left out is the
protocol, named in :data:`PROTOCOLS` and stored with the cube (``cube.config["protocol"]``; a cube
without it was made by the paper's protocol, :func:`cube_protocol`):

* ``"leak-free"`` (:data:`LEAK_FREE`, the default): every validation query is scored against the
  bank minus its *origins* — a held-out normal without itself, a synthetic anomaly without every
  image it was made from (its ``parent_ids``: CutPaste, scar, Perlin: the seed; DiffStyle: the
  content and the style image). Normals and anomalies are treated alike, so neither side gets the
  distance-0 neighbour the other lacks.
* ``"paper"`` (:data:`PAPER`): the SWSA paper's literal protocol — held-out normals leave-one-out,
  synthetic anomalies against the whole bank (parents included).

Real validation images are never bank images; nothing is left out for them under either protocol.

The functions here are pure arrays (ids are catalog image ids, ``-1`` = padding; ``T`` tasks,
``W`` queries, ``S`` bank slots, ``E`` origins per query): :func:`query_origins` gives each
synthetic validation query its origins, :func:`origin_positions` turns them into the bank
positions a scorer leaves out (``exclude`` (T, W, E)), :func:`shares_parents` finds the anomalies
made from the same images as a detector's abnormal references (self-validation, see
:mod:`swsa_engine.run.detector_sweep`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["LEAK_FREE", "PAPER", "DEFAULT_PROTOCOL", "PROTOCOLS", "check_protocol", "cube_protocol", "protocol_line",
           "query_origins", "origin_positions", "shares_parents", "exclusion_counts"]

LEAK_FREE = "leak-free"
PAPER = "paper"
DEFAULT_PROTOCOL = LEAK_FREE
#: protocol name → what it leaves out, in words (for help texts and reports)
PROTOCOLS = {
    LEAK_FREE: "each validation query is scored without its origins: a held-out normal without itself, "
               "a synthetic anomaly without every image it was made from (its parents)",
    PAPER: "the SWSA paper's protocol: held-out normals scored leave-one-out, synthetic anomalies against "
           "the whole bank (their parents included)",
}


def check_protocol(name: str) -> str:
    """``name`` if it is a protocol of :data:`PROTOCOLS`, else a one-line ValueError listing them."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown validation protocol {name!r}; use one of {', '.join(PROTOCOLS)} "
                         f"(default {DEFAULT_PROTOCOL})")
    return name


def cube_protocol(config: dict) -> str:
    """The protocol a cube was scored with: ``config["protocol"]``, or ``"paper"`` for a cube from
    before protocols were recorded (those were all scored with the paper's protocol)."""
    return str(config.get("protocol", PAPER))


def protocol_line(config: dict) -> str:
    """One sentence naming a cube's validation protocol and what it leaves out, for reports."""
    name = cube_protocol(config)
    return f"Validation protocol: {name} ({PROTOCOLS.get(name, 'unknown protocol')})."


def query_origins(queries: np.ndarray, widths: list[int], parents: list[np.ndarray], protocol: str) -> np.ndarray:
    """(T, W, E) the origins of each synthetic validation query, -1 padded (E ≥ 1).

    Parameters
    ----------
    queries : (T, W) image ids, -1 padded: held-out normals (the first ``widths[0]`` columns),
        then each source's anomalies (``widths[1:]``), as
        :func:`swsa_engine.run.group_scoring.synthetic_queries` lays them out.
    parents : one (T, widths[i + 1], E_i) array per source: the ids each anomaly was made from
        (-1 padded; E_i may be 0 when no parents are recorded).
    protocol : :data:`LEAK_FREE` (held-out normals: themselves; anomalies: their parents) or
        :data:`PAPER` (held-out normals: themselves; anomalies: none).

    Padding queries (-1) have no origins.
    """
    check_protocol(protocol)
    queries = np.asarray(queries, dtype=np.int64)
    if len(parents) != len(widths) - 1:
        raise ValueError(f"query_origins needs one parents array per source: {len(widths) - 1} sources, "
                         f"{len(parents)} arrays")
    n_tasks = queries.shape[0]
    depth = max([1] + [int(np.shape(p)[2]) for p in parents]) if protocol == LEAK_FREE else 1
    origins = np.full(queries.shape + (depth,), -1, dtype=np.int64)
    origins[:, : widths[0], 0] = queries[:, : widths[0]]
    if protocol == LEAK_FREE:
        start = widths[0]
        for width, part in zip(widths[1:], parents):
            part = np.asarray(part, dtype=np.int64)
            if part.shape[:2] != (n_tasks, width):
                raise ValueError(f"parents of shape {part.shape} do not match their queries ({n_tasks}, {width})")
            origins[:, start : start + width, : part.shape[2]] = part
            start += width
    return np.where(queries[..., None] >= 0, origins, -1)


def origin_positions(support: np.ndarray, origins: np.ndarray) -> np.ndarray:
    """(T, W, E) the bank positions of ``origins`` (T, W, E) in each task's ``support`` (T, S).

    An origin that is padding or not in the task's bank gives -1; an origin named twice for one
    query is left out once; each query's positions come first, in the order of its origins, then
    -1. The bank's real ids must be distinct within a task (they are: support = seeds ∪ held-out).
    """
    support = np.asarray(support, dtype=np.int64)
    origins = np.asarray(origins, dtype=np.int64)
    n_tasks, n_slots = support.shape
    if origins.ndim != 3 or origins.shape[0] != n_tasks:
        raise ValueError(f"origins must be (T, W, E) with T = {n_tasks} tasks, got shape {origins.shape}")
    if origins.size == 0 or n_slots == 0:
        return np.full(origins.shape, -1, dtype=np.int64)
    # one sorted key per (task, bank id): key = task * span + id + 1 keeps every task's keys apart
    span = int(max(support.max(initial=-1), origins.max(initial=-1))) + 2
    order = np.argsort(support, axis=1, kind="stable")
    keys = (np.arange(n_tasks)[:, None] * span + np.take_along_axis(support, order, axis=1) + 1).ravel()
    wanted = np.arange(n_tasks)[:, None, None] * span + origins + 1
    found = np.clip(np.searchsorted(keys, wanted), 0, keys.size - 1)
    hit = (keys[found] == wanted) & (origins >= 0)
    positions = np.where(hit, order.ravel()[found], -1)
    # a position named twice for one query: keep the first
    depth = positions.shape[2]
    twice = (positions[..., :, None] == positions[..., None, :]) & np.tri(depth, k=-1, dtype=bool)  # [e, e'], e' < e
    positions = np.where(twice.any(axis=3) | (positions < 0), -1, positions)
    # compact: valid positions first, in origin order
    first = np.argsort(positions < 0, axis=2, kind="stable")
    return np.take_along_axis(positions, first, axis=2)


def exclusion_counts(exclude: np.ndarray) -> np.ndarray:
    """(T, W) how many bank rows each query of ``exclude`` (T, W, E) leaves out."""
    return (np.asarray(exclude) >= 0).sum(axis=2)


def shares_parents(parents: np.ndarray, references: np.ndarray) -> np.ndarray:
    """(T, W) bool: whether any parent of each anomaly (``parents`` (T, W, E)) is also a parent of
    one of the task's abnormal references (``references`` (T, R, F) their parents), -1 padded."""
    parents = np.asarray(parents, dtype=np.int64)
    references = np.asarray(references, dtype=np.int64)
    n_tasks = parents.shape[0]
    pool = np.sort(references.reshape(n_tasks, -1), axis=1)  # (T, R*F), -1 first
    if pool.shape[1] == 0 or parents.shape[2] == 0:
        return np.zeros(parents.shape[:2], dtype=bool)
    span = int(max(pool.max(initial=-1), parents.max(initial=-1))) + 2
    keys = (np.arange(n_tasks)[:, None] * span + pool + 1).ravel()
    wanted = np.arange(n_tasks)[:, None, None] * span + parents + 1
    found = np.clip(np.searchsorted(keys, wanted), 0, keys.size - 1)
    return ((keys[found] == wanted) & (parents >= 0)).any(axis=2)
