"""``swsa bench --detectors``: every detector of the grid timed over all backbones of a
paper-shaped store on a share of each dataset's tasks, extrapolated to all tasks."""

from __future__ import annotations

import os
import time

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from swsa_store import open_store
from swsa_store.references import make_references, read_references

from swsa_engine.core.detectors import parse_detector
from swsa_engine.report.tables import markdown_table
from swsa_engine.run.sweep import run_sweep

__all__ = ["BENCH_REFERENCES", "DETECTOR_GRID", "bench_detectors", "format_detector_bench"]

#: the abnormal-reference split the detector bench makes in memory for NAGL when the store has none
BENCH_REFERENCES = {"source": "cutpaste", "share": 0.25}

#: the detector grid of issue 8, as ``swsa score --detector`` labels
DETECTOR_GRID = (
    "knn(k=1,l2)", "knn(k=3,l2)", "knn(k=5,l2)", "knn(k=10,l2)",
    "knn(k=1,cosine)", "knn(k=3,cosine)", "knn(k=5,cosine)", "knn(k=10,cosine)",
    "mahalanobis", "residual(K=2,mean)", "residual(K=4,mean)", "residual(K=8,mean)",
    "residual(K=2,min)", "residual(K=4,min)", "residual(K=8,min)", "nagl", "pca(n=8)",
)


def bench_detectors(store: str | os.PathLike, detectors: tuple[str, ...] = DETECTOR_GRID, *, task_fraction: float = 0.1,
                    device: str = "cpu", progress: bool = True) -> pd.DataFrame:
    """Time each detector over every backbone of a paper-shaped store on a share of each
    dataset's tasks, extrapolated to all tasks (cost is linear in tasks, see :func:`run_bench`).

    Returns one row per detector: ``detector``, ``tasks_timed``, ``seconds`` (the timed sweep),
    ``read_seconds`` (reading embeddings, paid once whatever the task count),
    ``seconds_all_tasks`` (``read + (seconds - read) × tasks / tasks_timed``), ``candidates``
    and ``status`` ("ok", or why it was not timed). NAGL needs abnormal references: without the
    store's own split (``swsa split-refs``) it is timed on :data:`BENCH_REFERENCES` made in memory.
    """
    if not 0 < task_fraction <= 1:
        raise ValueError(f"task_fraction must be in (0, 1], got {task_fraction}")
    with open_store(store) as s:
        tasks = s.tasks()
        n_backbones = len(s.backbones())
        references = read_references(s)
        images = s.images(columns=["image_id", "kind", "status", "task_id"])
    split, split_note = None, ""  # None: the store's own split
    if references is None or not len(references):  # NAGL is timed on a split made in memory; the store is not written
        source, share = BENCH_REFERENCES["source"], BENCH_REFERENCES["share"]
        try:
            split = make_references(images, source, share, store_path=store)
            split_note = f" (on an in-memory split: {share:g} of each task's {source} anomalies; the store has none)"
        except ValueError as error:
            split_note = f"not timed: the store has no abnormal-reference split and {error}"
    tasks = tasks[tasks["status"] == "ok"]
    sample = np.concatenate([rows["task_id"].to_numpy()[: max(1, int(round(len(rows) * task_fraction)))]
                             for _, rows in tasks.groupby("dataset")])
    out = []
    for label in tqdm(detectors, desc="bench detectors", unit="detector", disable=not progress):
        detector = parse_detector(label)
        row = {"detector": detector.label, "tasks_timed": len(sample), "tasks": len(tasks), "candidates": n_backbones,
               "seconds": np.nan, "read_seconds": np.nan, "seconds_all_tasks": np.nan, "status": "ok"}
        if detector.needs_abnormal and split_note.startswith("not timed"):
            row["status"] = split_note
            out.append(row)
            continue
        started = time.perf_counter()
        cube = run_sweep(store, detectors=[detector], task_ids=sample, save=False, progress=False, device=device,
                         references=split if detector.needs_abnormal else None)
        seconds = time.perf_counter() - started
        read = float(cube.config["read_seconds"])
        row.update(seconds=seconds, read_seconds=read,
                   seconds_all_tasks=read + (seconds - read) * len(tasks) / len(sample))
        if len(cube.skips):
            row["status"] = f"ok ({len(cube.skips)} task × candidate cells skipped: {cube.skips['reason'].iloc[0]})"
        if detector.needs_abnormal:
            row["status"] += split_note
        out.append(row)
    return pd.DataFrame(out)


def format_detector_bench(table: pd.DataFrame, patch: dict | None = None) -> str:
    """The detector bench as a Markdown table (+ the patch-level cost per task)."""
    shown = table[["detector", "tasks_timed", "seconds", "seconds_all_tasks", "status"]]
    lines = [
        f"every detector over {int(table['candidates'].iloc[0])} backbones: timed on {int(table['tasks_timed'].iloc[0])} "
        f"of {int(table['tasks'].iloc[0])} tasks, extrapolated to all",
        markdown_table(shown, {"seconds": ".1f", "seconds_all_tasks": ".0f"}),
    ]
    total = table["seconds_all_tasks"].sum()
    lines.append(f"all timed detectors, all tasks: {total / 60:.1f} min")
    if patch is not None:
        shape = patch["shape"]
        lines.append(f"patch(K={shape['K']}): {patch['ms_per_task']:.0f} ms per task per backbone "
                     f"({shape['queries']} queries × {shape['patches']} patches × {shape['dim']} dims, float16 tokens, "
                     f"{patch['float32_gflop_per_task']:.1f} GFLOP) → {patch['ms_per_task'] * table['tasks'].iloc[0] / 1000 / 60:.1f} min "
                     "per backbone for all tasks")
    return "\n".join(lines)
