"""Import anomaly scores computed by any tool as a candidate of the AUROC cube.

A score table has one row per (task, image): columns ``task`` (or ``task_id``), ``image_id``
(or ``path``: the image's path as catalogued, or relative to the store's folder) and ``score``
(higher = more anomalous). It is validated completely before anything is written, and stored
under ``/scores/<candidate>`` (``task_id``, ``image_id``, ``score``; attributes: source file,
its sha256, time, row counts). The sweep then scores the candidate like an embedding-based one.

Every validation image of a task (held-out normals, every synthetic anomaly, the real normal
and anomalous test images) needs a score; a task that lacks some is an error naming the first
missing image, or with ``allow_missing`` a recorded skip (the task is left out for this
candidate). Rows for images outside a task's validation set are ignored and counted.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
from pathlib import Path

import numpy as np
import pandas as pd

from swsa_store.locks import writes_store
from swsa_store.store import edit_store, open_store
from swsa_store.tasks import ROLE_HELDOUT, ROLE_REAL_ANOMALY, ROLE_REAL_NORMAL


class ScoreImportError(ValueError):
    """A score table that cannot be imported; the message names the first offending row."""


def read_score_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a CSV or Parquet score table."""
    path = Path(path)
    if not path.exists():
        raise ScoreImportError(f"score file {path} does not exist")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except Exception as error:  # a library's parse error, said in one line (the cause kept for --debug)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ScoreImportError(f"cannot read score file {path}: {first}") from error


def check_candidate_name(candidate) -> str:
    """``candidate`` when it can name a group of the store, else :class:`ScoreImportError`: a
    non-empty string without "/", control characters or surrounding spaces, and not "." or ".."."""
    if not isinstance(candidate, str) or not candidate.strip():
        raise ScoreImportError(f"candidate name {candidate!r} must be a non-empty string")
    if "/" in candidate or candidate in (".", "..") or candidate != candidate.strip() or not candidate.isprintable():
        raise ScoreImportError(f"candidate name {candidate!r} cannot name a candidate: no '/', no control characters, "
                               "no surrounding spaces, not '.' or '..'")
    return candidate


def _show(value) -> str:
    """A cell as the user wrote it: strings quoted, numbers plain."""
    return repr(value) if isinstance(value, str) else str(getattr(value, "item", lambda: value)())


def _row(index: int) -> str:
    return f"row {index + 2}"  # +1 for the header, +1 for 1-based line numbers in a CSV


def validate_scores(store_path: str | os.PathLike, table: pd.DataFrame, *, allow_missing: bool = False) -> dict:
    """Check ``table`` against the store; returns the arrays to store and what was skipped.

    Raises :class:`ScoreImportError` with the first offending row.
    """
    table = table.reset_index(drop=True)
    task_column, id_column = _score_columns(table)
    with open_store(store_path) as store:
        images, tasks, members = store.images(), store.tasks(), store.task_members()
        root = store.path.resolve().parent
    if id_column == "path":
        image_ids = _image_ids_from_paths(table, images, root)
    else:
        image_ids = _image_ids_from_ids(table, n_images=len(images))
    task_ids = _known_task_ids(table, task_column, tasks)
    scores = _finite_scores(table)
    keys = task_ids * len(images) + image_ids  # one int per (task, image) pair
    _check_no_duplicates(keys, task_ids, image_ids)
    needed = _validation_pairs(images, tasks, members)
    needed_keys = needed["task_id"].to_numpy() * len(images) + needed["image_id"].to_numpy()
    skipped = _tasks_missing_scores(needed, np.isin(needed_keys, keys), allow_missing=allow_missing)
    in_validation = np.isin(keys, needed_keys)
    complete = sorted(set(map(int, needed["task_id"])) - {t for t, _ in skipped})
    return {
        "task_id": task_ids[in_validation], "image_id": image_ids[in_validation], "score": scores[in_validation],
        "ignored_rows": int((~in_validation).sum()), "skipped_tasks": skipped, "complete_tasks": complete,
    }


def _score_columns(table: pd.DataFrame) -> tuple[str, str]:
    """The names of the task and the image column ``table`` uses; raises when one is missing."""
    task_column = "task" if "task" in table else "task_id" if "task_id" in table else None
    id_column = "image_id" if "image_id" in table else "path" if "path" in table else None
    if task_column is None or id_column is None or "score" not in table:
        raise ScoreImportError(
            f"a score table needs columns task (or task_id), image_id (or path) and score; got {list(table.columns)}"
        )
    if len(table) == 0:
        raise ScoreImportError("the score table has no rows")
    return task_column, id_column


def _image_ids_from_paths(table: pd.DataFrame, images: pd.DataFrame, root: Path) -> np.ndarray:
    """``(len(table),)`` image ids of the ``path`` column: paths as catalogued or relative to ``root``."""
    known = {p: i for i, p in enumerate(images["path"])}
    known.update({str(Path(p).resolve().relative_to(root)): i for i, p in enumerate(images["path"])
                  if p and Path(p).resolve().is_relative_to(root)})
    image_ids = np.array([known.get(str(p), -1) for p in table["path"]], dtype=np.int64)
    bad = np.flatnonzero(image_ids < 0)
    if bad.size:
        raise ScoreImportError(f"{_row(bad[0])}: unknown image path {_show(table['path'].iloc[bad[0]])} (not in the catalog)")
    return image_ids


#: Integer ids beyond this magnitude are refused before any cast (no int64 overflow).
_MAX_ID = 2**53


def _integer_ids(table: pd.DataFrame, column: str) -> np.ndarray:
    """``(len(table),)`` int64 values of ``column``; a cell that is not an integer (1.7, "x", empty,
    True, beyond ±2**53) is an error naming its row and its value as written — never truncated."""
    values = table[column]
    raw = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    ok = np.isfinite(raw) & (np.abs(np.nan_to_num(raw)) <= _MAX_ID)
    ok &= np.where(ok, raw, 0.0) % 1 == 0
    if values.dtype == bool:
        ok[:] = False
    elif values.dtype == object:  # True/False cells among numbers are no ids either
        ok &= ~values.map(lambda v: isinstance(v, (bool, np.bool_))).to_numpy(dtype=bool)
    bad = np.flatnonzero(~ok)
    if bad.size:
        raise ScoreImportError(f"{_row(bad[0])}: {column} {_show(values.iloc[bad[0]])} is not an integer")
    return raw.astype(np.int64)


def _image_ids_from_ids(table: pd.DataFrame, *, n_images: int) -> np.ndarray:
    """``(len(table),)`` image ids of the ``image_id`` column, each an integer id of the catalog."""
    image_ids = _integer_ids(table, "image_id")
    bad = np.flatnonzero((image_ids < 0) | (image_ids >= n_images))
    if bad.size:
        raise ScoreImportError(f"{_row(bad[0])}: unknown image_id {_show(table['image_id'].iloc[bad[0]])} "
                               f"(the catalog has ids 0..{n_images - 1})")
    return image_ids


def _known_task_ids(table: pd.DataFrame, task_column: str, tasks: pd.DataFrame) -> np.ndarray:
    """``(len(table),)`` task ids, each one of the store's tasks."""
    task_ids = _integer_ids(table, task_column)
    bad = np.flatnonzero(~np.isin(task_ids, tasks["task_id"].to_numpy()))
    if bad.size:
        raise ScoreImportError(f"{_row(bad[0])}: unknown task {_show(table[task_column].iloc[bad[0]])}")
    return task_ids


def _finite_scores(table: pd.DataFrame) -> np.ndarray:
    """``(len(table),)`` float64 scores, all finite."""
    scores = pd.to_numeric(table["score"], errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise ScoreImportError(f"{_row(bad[0])}: score {_show(table['score'].iloc[bad[0]])} is not a finite number")
    return scores


def _check_no_duplicates(keys: np.ndarray, task_ids: np.ndarray, image_ids: np.ndarray) -> None:
    duplicated = pd.Series(keys).duplicated().to_numpy()
    if duplicated.any():
        first = int(np.flatnonzero(duplicated)[0])
        original = int(np.flatnonzero(keys == keys[first])[0])
        raise ScoreImportError(f"{_row(first)}: duplicate score for task {task_ids[first]}, image {image_ids[first]} "
                               f"(first given in {_row(original)})")


def _validation_pairs(images: pd.DataFrame, tasks: pd.DataFrame, members: pd.DataFrame) -> pd.DataFrame:
    """``(task_id, image_id)`` of every usable validation image of every scoreable task."""
    needed = members[members["role"].isin([ROLE_HELDOUT, ROLE_REAL_NORMAL, ROLE_REAL_ANOMALY])][["task_id", "image_id"]]
    synthetic = images.loc[(images["kind"] != "real") & (images["task_id"] >= 0), ["task_id", "image_id"]]
    needed = pd.concat([needed, synthetic], ignore_index=True).drop_duplicates()
    ok_images = images["status"].to_numpy() == "ok"
    needed = needed[ok_images[needed["image_id"].to_numpy()]]
    return needed[needed["task_id"].isin(tasks.loc[tasks["status"] == "ok", "task_id"])]


def _tasks_missing_scores(needed: pd.DataFrame, given: np.ndarray, *, allow_missing: bool) -> list[tuple[int, str]]:
    """``[(task_id, reason)]`` of the tasks with unscored validation images (``given``: per row of
    ``needed``); without ``allow_missing`` the first such task is an error."""
    if given.all():
        return []
    missing = needed[~given]
    per_task = missing.groupby("task_id")["image_id"].agg(["size", "first"])
    if not allow_missing:
        task_id = int(per_task.index[0])
        total = int((needed["task_id"] == task_id).sum())
        raise ScoreImportError(
            f"task {task_id} lacks scores for {int(per_task['size'].iloc[0])} of its {total} validation images "
            f"(first: image {int(per_task['first'].iloc[0])}); score every one, or pass --allow-missing to skip such tasks"
        )
    return [(int(t), f"imported scores miss {int(r['size'])} validation images (first: image {int(r['first'])})")
            for t, r in per_task.iterrows()]


@writes_store("swsa import-scores")
def import_scores(
    store_path: str | os.PathLike,
    candidate: str,
    table: pd.DataFrame | str | os.PathLike,
    *,
    allow_missing: bool = False,
    replace: bool = False,
    wait: float | None = 0.0,
) -> dict:
    """Validate ``table`` (a DataFrame or a CSV/Parquet path) and store it as ``candidate``.

    Nothing in the store changes unless the whole table is valid. Returns a summary. The whole call
    holds the store's writer lock (:func:`swsa_store.locks.writes_store`): another writer makes it
    fail at once, or wait ``wait`` seconds (None: as long as it takes). With ``replace``, the
    skips recorded by the earlier import of ``candidate`` are replaced by this import's.
    """
    check_candidate_name(candidate)
    source, digest = "DataFrame", ""
    if not isinstance(table, pd.DataFrame):
        source = str(Path(table).resolve())
        frame = read_score_table(table)  # a missing or unreadable file: one line, before anything else
        digest = hashlib.sha256(Path(table).read_bytes()).hexdigest()
        table = frame
    with open_store(store_path) as store:
        if candidate in store.backbones():
            raise ScoreImportError(f"candidate {candidate!r} is already an embedding matrix in the store; choose another name")
        if candidate in store.score_sets() and not replace:
            raise ScoreImportError(f"the store already holds imported scores {candidate!r}; pass --replace to overwrite them")
    checked = validate_scores(store_path, table, allow_missing=allow_missing)
    with edit_store(store_path) as store:
        store.write_score_set(candidate, checked["task_id"], checked["image_id"], checked["score"], checked["complete_tasks"], {
            "source": source, "sha256": digest, "rows": int(len(table)), "ignored_rows": checked["ignored_rows"],
            "imported_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "complete_tasks": len(checked["complete_tasks"]),
        })
        if replace:  # the earlier import's skips of this candidate no longer hold
            skips = store.skips()
            store.replace_table("skips", skips[~((skips["stage"] == "import") & (skips["backbone"] == candidate))]
                                .reset_index(drop=True))
        if checked["skipped_tasks"]:
            store.append_skips(pd.DataFrame([
                {"stage": "import", "image_id": -1, "task_id": t, "backbone": candidate, "reason": r}
                for t, r in checked["skipped_tasks"]]))
    return {"candidate": candidate, "rows": int(len(table)), "scored": int(len(checked["score"])),
            "ignored_rows": checked["ignored_rows"], "tasks": len(checked["complete_tasks"]),
            "skipped_tasks": len(checked["skipped_tasks"])}
