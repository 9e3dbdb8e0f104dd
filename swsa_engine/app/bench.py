"""``swsa bench``: the engine at the paper's scale, against per-task reference loops.

:func:`~swsa_engine.app.bench_store.make_paper_store` writes a store with the real *shape* of the
SWSA benchmark (329 tasks of CUB-200-2011, Oxford Flowers-102, MVTec-AD and VisA, ten backbones
with their true feature sizes) filled with seeded, class-structured random embeddings.
:func:`run_bench` then times, on one machine, the full sweep, re-evaluating a new strategy over
the cached cube, and a naive reference (:mod:`swsa_engine.app.bench_reference`: scikit-learn
``NearestNeighbors`` and ``roc_auc_score``, ``scipy.stats.kendalltau``, one task at a time) on a
sample of tasks, extrapolated; it checks both give the same AUROCs.

The other benches: :mod:`~swsa_engine.app.bench_detectors` (every detector of the grid),
:mod:`~swsa_engine.app.bench_ingest` (the ingest pipeline) and :mod:`~swsa_engine.app.bench_clip`
(prompt and BLISS re-scoring). Their public names are importable from here too.

``python -m swsa_engine.app.bench --_sweep STORE`` runs one sweep in a fresh process and prints
its figures as JSON (how :func:`run_bench` measures the sweep's own peak memory).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from swsa_store import open_store

from swsa_engine.app.bench_detectors import BENCH_REFERENCES, DETECTOR_GRID, bench_detectors, format_detector_bench
from swsa_engine.app.bench_ingest import bench_ingest, format_ingest
from swsa_engine.app.bench_reference import extrapolate_reference, reference_kendall, reference_sweep
from swsa_engine.app.bench_store import (CENTRE_RANK, CENTRE_SPREAD, MVTEC, PAPER_BACKBONES, SOURCES, VISA, ClassShape,
                                         DatasetShape, make_paper_store, paper_catalog_tables, paper_shapes)
from swsa_engine.core.metrics import kendall_tau
from swsa_engine.core.selection import STRATEGIES, register_strategy, selection_table
from swsa_engine.run.cube_io import load_cube
from swsa_engine.run.sweep import run_sweep

__all__ = [
    "run_bench", "format_figures", "matmul_peak_gflops", "gemm_floor",
    # re-exported from the bench modules
    "PAPER_BACKBONES", "SOURCES", "MVTEC", "VISA", "ClassShape", "DatasetShape", "CENTRE_RANK", "CENTRE_SPREAD",
    "paper_shapes", "paper_catalog_tables", "make_paper_store", "reference_sweep", "extrapolate_reference",
    "reference_kendall", "BENCH_REFERENCES", "DETECTOR_GRID", "bench_detectors", "format_detector_bench",
    "bench_ingest", "format_ingest",
]


# --------------------------------------------------------------------------- timing helpers


def matmul_peak_gflops(dtype: str = "float64", n: int | None = None, repeats: int = 3, device: str = "cpu") -> float:
    """The measured matrix-multiply rate (best of ``repeats``) of ``device`` in GFLOP/s, under this
    process's precision settings (so on CUDA float32 means what the kNN kernels get: no TF32 unless
    the user turned it on). ``n`` (the square size) defaults to 2048 on the CPU and 8192 on a GPU,
    large enough to reach its peak."""
    dev = torch.device(device)
    n = n or (8192 if dev.type == "cuda" else 2048)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    a = torch.randn(n, n, dtype=getattr(torch, dtype), device=dev)
    b = torch.randn(n, n, dtype=getattr(torch, dtype), device=dev)
    torch.matmul(a, b)
    sync()
    best = np.inf
    for _ in range(repeats):
        started = time.perf_counter()
        torch.matmul(a, b)
        sync()
        best = min(best, time.perf_counter() - started)
    return 2.0 * n ** 3 / best / 1e9


def _sweep_subprocess(store: Path, task_fraction: float | None, device: str) -> dict:
    """Run the sweep in a fresh process, so its peak memory is its own."""
    command = [sys.executable, "-m", "swsa_engine.app.bench", "--_sweep", str(store), "--device", device]
    if task_fraction is not None:
        command += ["--task-fraction", str(task_fraction)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"sweep subprocess failed: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _sweep_worker(store: str, task_fraction: float | None, device: str) -> None:
    task_ids = None
    if task_fraction is not None:
        with open_store(store) as s:
            tasks = s.tasks()
        # the same fraction of every dataset's tasks
        task_ids = np.concatenate([rows["task_id"].to_numpy()[: max(1, int(round(len(rows) * task_fraction)))]
                                   for _, rows in tasks.groupby("dataset")])
    started = time.perf_counter()
    cube = run_sweep(store, device=device, progress=False, save=task_fraction is None, task_ids=task_ids)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "sweep_seconds": cube.config["seconds"], "read_seconds": cube.config["read_seconds"],
                      "knn_flops": cube.config["knn_flops"], "refine_flops": cube.config.get("refine_flops", 0.0),
                      "refined_scores": cube.config.get("refined_scores", 0),
                      "stage_seconds": cube.config.get("stage_seconds", {}), "peak_rss_bytes": peak, "tasks": len(cube.tasks)}))


def _prepare_bench_store(store: Path, make: bool, task_fraction: float, image_fraction: float, progress: bool) -> dict:
    """Make the paper-shaped ``store`` if it is missing (and ``make``), then read it once so that
    the page cache is warm; returns ``make_store`` (when made) and ``store_bytes`` figures."""
    figures = {}
    if not store.exists():
        if not make:
            raise FileNotFoundError(f"bench store {store} does not exist; run `swsa bench --make-store {store}`")
        figures["make_store"] = make_paper_store(store, task_fraction=task_fraction, image_fraction=image_fraction,
                                                 progress=progress)
    figures["store_bytes"] = store.stat().st_size
    with open(store, "rb") as handle:  # warm the page cache: the targets are for a warm store
        while handle.read(64 << 20):
            pass
    return figures


def _time_selection(cube) -> tuple[dict, pd.DataFrame]:
    """Milliseconds to evaluate a new strategy, and the whole Table 1, over the cached ``cube``;
    returns those figures and Table 1."""
    if "bench_median_synthetic" not in STRATEGIES:
        @register_strategy("bench_median_synthetic")
        def _median(**_):
            return lambda ctx: np.nanmedian(ctx.synthetic_base, axis=2).argmax(axis=1)
    figures = {}
    started = time.perf_counter()
    table = selection_table(cube, [("median of sources", "bench_median_synthetic", {})])
    figures["new_strategy_ms"] = 1000 * (time.perf_counter() - started)
    figures["new_strategy_rows"] = len(table)
    started = time.perf_counter()
    full = selection_table(cube)
    figures["table1_ms"] = 1000 * (time.perf_counter() - started)
    return figures, full


def _reference_figures(store: Path, cube, reference_tasks: int, progress: bool) -> dict:
    """The naive reference on ``reference_tasks`` tasks per dataset: its cost, extrapolated to
    every task, and its largest differences from the cube's AUROCs and Kendall taus."""
    sample = np.concatenate([rows["task_id"].to_numpy()[:reference_tasks] for _, rows in cube.tasks.groupby("dataset")])
    if progress:
        print(f"[bench] reference loops on {len(sample)} tasks ...", flush=True)
    reference = reference_sweep(store, list(map(int, sample)), k=cube.config["k"], hardest=tuple(cube.config["hardest"]))
    row_of = {int(t): i for i, t in enumerate(cube.tasks["task_id"])}
    names = cube.candidate_names
    max_diff = 0.0
    for (task_id, name), ref in reference["results"].items():
        t, c = row_of[task_id], names.index(name)
        max_diff = max(max_diff, float(np.max(np.abs(np.array(ref["real"]) - cube.real[t, c]))))
        for source, value in ref["synthetic"].items():
            max_diff = max(max_diff, abs(value - cube.synthetic[t, c, cube.sources.index(source)]))
    rows = np.array([row_of[int(t)] for t in sample])
    ref_tau, kendall_seconds = reference_kendall(cube, rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant AUROC rows: NaN in both implementations
        ours_tau, _ = kendall_tau(cube.synthetic[rows].transpose(0, 2, 1), np.broadcast_to(cube.real[rows, :, 0][:, None, :], (len(rows), len(cube.sources), len(names))))
    return {
        "tasks_sampled": int(len(sample)), "seconds": reference["seconds"] + kendall_seconds,
        **extrapolate_reference(reference, kendall_seconds, cube.tasks),
        "max_abs_auroc_difference": max_diff, "max_abs_tau_difference": float(np.nanmax(np.abs(ref_tau - ours_tau))),
    }


def run_bench(
    store: str | os.PathLike,
    *,
    make: bool = True,
    task_fraction: float = 1.0,
    image_fraction: float = 1.0,
    reference_tasks: int = 2,
    device: str = "cpu",
    out: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Build (or reuse) a paper-shaped store and time the sweep, a new strategy and the reference.

    ``reference_tasks`` tasks per dataset are recomputed naively; their cost is extrapolated to
    all tasks. Returns the figures (also written as JSON to ``out`` when given).
    """
    store = Path(store)
    figures: dict = {"machine": {"cpu_count": os.cpu_count()}}
    figures.update(_prepare_bench_store(store, make, task_fraction, image_fraction, progress))
    if progress:
        print("[bench] full sweep ...", flush=True)
    figures["sweep"] = _sweep_subprocess(store, None, device)
    if progress:
        print("[bench] half of the tasks ...", flush=True)
    figures["sweep_half_tasks"] = _sweep_subprocess(store, 0.5, device)
    cube = load_cube(store)
    largest_dim = max(int(d) for d in cube.candidates["feature_dim"])
    figures["largest_matrix_bytes"] = int(largest_dim * _n_images(store) * 4)
    figures["memory_budget_bytes"] = 2 * figures["largest_matrix_bytes"] + (1 << 30)
    selection_figures, full = _time_selection(cube)  # a new strategy over the cached cube
    figures.update(selection_figures)
    figures["reference"] = _reference_figures(store, cube, reference_tasks, progress)
    sweep_seconds = figures["sweep"]["seconds"]
    figures["speedup"] = figures["reference"]["extrapolated_seconds"] / sweep_seconds
    figures["knn_gflops"] = figures["sweep"]["knn_flops"] / max(1e-9, sweep_seconds - figures["sweep"]["read_seconds"]) / 1e9
    # the floor of a sweep is the matrix multiply of the device it ran on
    figures["matmul_peak_gflops"] = {dtype: matmul_peak_gflops(dtype, device=device) for dtype in ("float64", "float32")}
    figures["matmul_device"] = device
    figures.update(gemm_floor(figures["sweep"], figures["matmul_peak_gflops"]["float32"]))
    figures["tasks"] = len(cube.tasks)
    figures["candidates"] = len(cube.candidate_names)
    figures["sources"] = len(cube.sources)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(figures, indent=2, default=float))
        full.to_csv(out / "table1.csv", index=False)
    return figures


def gemm_floor(sweep: dict, float32_gflops: float) -> dict:
    """The headline: the sweep's first-tier kNN products (``knn_flops``) at the float32 matrix-multiply
    peak measured in the same run — the time no kNN sweep can beat — and the sweep's time over it,
    whole and without the ensembles stage (the AUROC cube of the single candidates)."""
    floor = sweep["knn_flops"] / (float32_gflops * 1e9)
    stages = sweep.get("stage_seconds", {})
    without_ensembles = sweep["seconds"] - stages.get("ensembles", 0.0)
    return {"gemm_floor_seconds": floor, "sweep_over_gemm": sweep["seconds"] / floor,
            "cube_over_gemm": without_ensembles / floor}


def _n_images(store: Path) -> int:
    with open_store(store) as s:
        return s.n_images


def format_figures(figures: dict) -> str:
    """The bench result as a short, human-readable table."""
    gib = 1 << 30
    sweep, half, ref = figures["sweep"], figures["sweep_half_tasks"], figures["reference"]
    stages = sweep.get("stage_seconds", {})
    lines = [
        f"HEADLINE sweep / GEMM floor: {figures['sweep_over_gemm']:.2f}× ({sweep['seconds']:.1f} s vs "
        f"{figures['gemm_floor_seconds']:.1f} s = {sweep['knn_flops'] / 1e12:.2f} TFLOP of kNN products at the measured "
        f"float32 peak {figures['matmul_peak_gflops']['float32']:.0f} GFLOP/s of {figures.get('matmul_device', 'cpu')}); without the ensembles stage "
        f"{figures['cube_over_gemm']:.2f}×",
        "stages (s): " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in stages.items())
        + f"; other {sweep['seconds'] - sum(v for k, v in stages.items() if k != 'save'):.1f}",
        f"tasks {figures['tasks']} × candidates {figures['candidates']} × synthetic sources {figures['sources']} (+ real, 2 settings)",
        f"full sweep (warm store, fresh process): {sweep['seconds']:.1f} s  (reading embeddings {sweep['read_seconds']:.1f} s)",
        f"half of the tasks ({half['tasks']}):        {half['seconds']:.1f} s  → cost per task {sweep['seconds'] / sweep['tasks'] * 1000:.0f} ms (full) vs {half['seconds'] / half['tasks'] * 1000:.0f} ms (half)",
        f"new strategy over the cached cube: {figures['new_strategy_ms']:.1f} ms for {figures['tasks']} tasks (whole Table 1: {figures['table1_ms']:.0f} ms)",
        f"reference loops on {ref['tasks_sampled']} sampled tasks, s per task: "
        + ", ".join(f"{d} {v:.2f} (× {ref['tasks_by_dataset'][d]})" for d, v in ref["seconds_per_task_by_dataset"].items())
        + f"; reading {ref['read_seconds']:.1f} s once → {ref['extrapolated_seconds'] / 60:.1f} min extrapolated; "
        f"speed-up {figures['speedup']:.0f}×",
        f"same numbers: max |AUROC difference| {ref['max_abs_auroc_difference']:.2e}, max |tau difference| {ref['max_abs_tau_difference']:.2e}",
        f"kNN: {figures['knn_gflops']:.1f} GFLOP/s vs measured matmul peak {figures['matmul_peak_gflops']['float64']:.1f} GFLOP/s (float64), "
        f"{figures['matmul_peak_gflops']['float32']:.1f} (float32); scores in float32 with error bounds, "
        f"{sweep.get('refined_scores', 0):,} of them recomputed exactly where a bound could change an AUROC",
        f"peak memory of the sweep: {sweep['peak_rss_bytes'] / gib:.2f} GiB (budget 2 × largest matrix + 1 GiB = "
        f"{figures['memory_budget_bytes'] / gib:.2f} GiB)",
    ]
    return "\n".join(lines)


def _main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--_sweep", dest="sweep_store")
    parser.add_argument("--task-fraction", type=float, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    _sweep_worker(args.sweep_store, args.task_fraction, args.device)


if __name__ == "__main__":
    _main()
