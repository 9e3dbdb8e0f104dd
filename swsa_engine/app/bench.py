"""``swsa bench``: the engine at the paper's scale, against per-task reference loops.

:func:`make_paper_store` writes a store with the real *shape* of the SWSA benchmark — CUB-200-2011,
Oxford Flowers-102, MVTec-AD and VisA, 329 tasks, 100 CutPaste + 100 diffusion + 100 auxiliary
synthetic images per task (Flowers: 25 each), the ten backbones with their true feature sizes —
filled with seeded, class-structured random embeddings (a Gaussian cluster per class; defect
types as offsets from their product's cluster; synthetic anomalies between or near clusters).
No image files exist; only embeddings. :func:`run_bench` then times, on one machine, the full
sweep, re-evaluating a new strategy over the cached cube, and a naive reference (scikit-learn
``NearestNeighbors`` and ``roc_auc_score``, ``scipy.stats.kendalltau``, one task at a time) on a
sample of tasks, extrapolated; it checks both give the same AUROCs.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

# feature size and parameter count of the paper's ten candidates
PAPER_BACKBONES = {
    "resnet18": (512, 11_689_512), "resnet34": (512, 21_797_672), "resnet50": (2048, 25_557_032),
    "resnet101": (2048, 44_549_160), "resnet152": (2048, 60_192_808), "vit_b_16": (768, 86_567_656),
    "vit_b_32": (768, 88_224_232), "vit_l_16": (1024, 304_326_632), "vit_l_32": (1024, 306_535_400),
    "vit_h_14": (1280, 632_045_800),
}
SOURCES = ("cutpaste", "diffusion", "tinyimagenet")

# MVTec-AD: product → (train good, test good, test defective, defect types)
MVTEC = {
    "bottle": (209, 20, 63, 3), "cable": (224, 58, 92, 8), "capsule": (219, 23, 109, 5), "carpet": (280, 28, 89, 5),
    "grid": (264, 21, 57, 5), "hazelnut": (391, 40, 70, 4), "leather": (245, 32, 92, 5), "metal_nut": (220, 22, 93, 4),
    "pill": (267, 26, 141, 7), "screw": (320, 41, 119, 5), "tile": (230, 33, 84, 5), "toothbrush": (60, 12, 30, 1),
    "transistor": (213, 60, 40, 4), "wood": (247, 19, 60, 5), "zipper": (240, 32, 119, 7),
}
# VisA (1cls split: 90 % of the normal images train, the rest + every anomaly test)
VISA = {
    "candle": (900, 100, 100, 8), "capsules": (542, 60, 100, 5), "cashew": (450, 50, 100, 9),
    "chewinggum": (453, 50, 100, 6), "fryum": (450, 50, 100, 7), "macaroni1": (900, 100, 100, 7),
    "macaroni2": (900, 100, 100, 7), "pcb1": (904, 100, 100, 4), "pcb2": (901, 100, 100, 4),
    "pcb3": (905, 101, 101, 4), "pcb4": (904, 101, 100, 7), "pipe_fryum": (450, 50, 100, 6),
}


@dataclass(frozen=True)
class ClassShape:
    name: str
    n_train: int
    n_test_normal: int
    defects: tuple[int, ...] = ()  # test images per defect type (defect datasets only)


@dataclass(frozen=True)
class DatasetShape:
    name: str
    protocol: str  # "multi-class" (other classes are anomalies) or "defect"
    classes: tuple[ClassShape, ...]
    synthetic_per_source: int


def _spread(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def paper_shapes(task_fraction: float = 1.0, image_fraction: float = 1.0, synthetic: int | None = None) -> list[DatasetShape]:
    """The four datasets' shapes; fractions shrink classes and images for tests."""
    if not (0 < task_fraction <= 1 and 0 < image_fraction <= 1):
        raise ValueError(f"task_fraction and image_fraction must be in (0, 1], got {task_fraction}, {image_fraction}")

    def n_classes(total, minimum):
        return max(minimum, int(round(total * task_fraction)))

    def scaled(n, minimum=1):
        return max(minimum, int(round(n * image_fraction)))

    shapes = []
    n = n_classes(200, 2)
    shapes.append(DatasetShape("cub", "multi-class", tuple(
        ClassShape(f"{i + 1:03d}.bird_{i + 1:03d}", scaled(tr, 4), scaled(te))
        for i, (tr, te) in enumerate(zip(_spread(5994, 200)[:n], _spread(5794, 200)[:n]))), synthetic or 100))
    n = n_classes(102, 2)
    shapes.append(DatasetShape("flowers", "multi-class", tuple(
        ClassShape(f"flower_{i + 1:03d}", 10, scaled(te)) for i, te in enumerate(_spread(7169, 102)[:n])),
        synthetic or 25))
    for name, table in (("mvtec", MVTEC), ("visa", VISA)):
        products = list(table.items())[: n_classes(len(table), 1)]
        shapes.append(DatasetShape(name, "defect", tuple(
            ClassShape(product, scaled(tr, 4), scaled(good), tuple(scaled(d) for d in _spread(bad, types)))
            for product, (tr, good, bad, types) in products), synthetic or 100))
    return shapes


def paper_catalog_tables(shapes: list[DatasetShape], n_seed: int, seed: int):
    """Images, tasks and members tables for the shapes (no files; paths are empty)."""
    from swsa_store.catalog import _normalise
    from swsa_store.tasks import build_tasks

    image_parts, task_parts, member_parts = [], [], []
    next_id = next_task = 0
    layout = {}  # dataset → dict of arrays describing each image (class index, defect index)
    for shape in shapes:
        cls, split, defect = [], [], []
        for c, klass in enumerate(shape.classes):
            cls += [c] * (klass.n_train + klass.n_test_normal + sum(klass.defects))
            split += ["train"] * klass.n_train + ["test"] * (klass.n_test_normal + sum(klass.defects))
            defect += [-1] * (klass.n_train + klass.n_test_normal)
            for d, count in enumerate(klass.defects):
                defect += [d] * count
        cls, defect = np.array(cls), np.array(defect)
        names = np.array([k.name for k in shape.classes], dtype=object)
        rows = pd.DataFrame({"dataset": shape.name, "class_name": names[cls], "split": split, "path": "",
                             "source_index": np.arange(len(cls)),
                             "defect": np.where(defect >= 0, np.char.add("defect_", defect.astype(str)), "good").astype(object)
                             if shape.protocol == "defect" else ""})
        rows = _normalise(rows, next_id)
        image_ids = rows["image_id"].to_numpy()
        tasks, members = build_tasks(rows, shape.name, n_seed=n_seed, seed=seed, first_task_id=next_task,
                                     protocol="multiclass" if shape.protocol == "multi-class" else "defect")
        next_id += len(rows)
        # synthetic images: per task, per source
        synth_rows = []
        for task in tasks.itertuples():
            for source in SOURCES:
                synth_rows.append(pd.DataFrame({
                    "dataset": shape.name, "class_name": task.normal_class, "split": "synthetic", "kind": source, "path": "",
                    "task_id": task.task_id, "seed": seed, "source_index": np.arange(shape.synthetic_per_source)}))
        synth = _normalise(pd.concat(synth_rows, ignore_index=True), next_id)
        next_id += len(synth)
        next_task += len(tasks)
        image_parts += [rows, synth]
        task_parts.append(tasks)
        member_parts.append(members)
        layout[shape.name] = {"real_ids": image_ids, "class": cls, "defect": defect, "synth": synth}
    return (pd.concat(image_parts, ignore_index=True), pd.concat(task_parts, ignore_index=True),
            pd.concat(member_parts, ignore_index=True), layout)


#: rank of the subspace the class centres span, and their spread relative to the noise: chosen
#: so that one-vs-rest AUROCs fall roughly in 0.75–0.99 and differ between backbones, as in the
#: paper, rather than every candidate separating every class perfectly.
CENTRE_RANK = 32
CENTRE_SPREAD = 2.0


def _embeddings_for(shape: DatasetShape, info: dict, tasks: pd.DataFrame, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Class-structured random features for one dataset: real rows, then synthetic rows.

    Every image is its class centre plus unit Gaussian noise in all ``dim`` dimensions. Centres
    lie in a random ``CENTRE_RANK``-dimensional subspace with a squared spread of
    ``CENTRE_SPREAD · quality · sqrt(2 dim) / CENTRE_RANK`` — comparable to the spread of
    squared noise distances, so classes overlap the way real embeddings do; ``quality`` (per
    backbone and dataset, times a per-class factor) is how well this backbone separates them.
    """
    n_classes = len(shape.classes)
    basis = np.linalg.qr(rng.standard_normal((dim, CENTRE_RANK)))[0].astype(np.float32)  # (dim, rank)
    quality = rng.uniform(0.4, 1.6) * rng.uniform(0.7, 1.3, size=n_classes)
    scale = np.sqrt(CENTRE_SPREAD * quality * np.sqrt(2.0 * dim) / CENTRE_RANK).astype(np.float32)
    centers = (scale[:, None] * rng.standard_normal((n_classes, CENTRE_RANK), dtype=np.float32)) @ basis.T
    cls, defect = info["class"], info["defect"]
    real = centers[cls] + rng.standard_normal((len(cls), dim), dtype=np.float32)
    if shape.protocol == "defect":
        directions = rng.standard_normal((max(1, max(len(k.defects) for k in shape.classes)), dim), dtype=np.float32)
        strength = rng.uniform(0.3, 0.9, size=directions.shape[0]).astype(np.float32)
        bad = defect >= 0
        real[bad] += strength[defect[bad], None] * directions[defect[bad]]
    synth = info["synth"]
    class_index = {k.name: c for c, k in enumerate(shape.classes)}
    task_class = {t: class_index[name] for t, name in zip(tasks["task_id"], tasks["normal_class"])}
    own = np.array([task_class[t] for t in synth["task_id"]])
    kind = synth["kind"].to_numpy()
    fake = centers[own] + rng.standard_normal((len(synth), dim), dtype=np.float32)
    cut = kind == "cutpaste"  # a local change: extra noise of a random strength
    fake[cut] += rng.uniform(0.1, 0.5, size=(int(cut.sum()), 1)).astype(np.float32) * rng.standard_normal((int(cut.sum()), dim), dtype=np.float32)
    dif = kind == "diffusion"  # near-distribution: part of the way towards another class
    other = (own[dif] + rng.integers(1, max(2, n_classes), size=int(dif.sum()))) % n_classes
    alpha = rng.uniform(0.2, 0.6, size=(int(dif.sum()), 1)).astype(np.float32)
    fake[dif] += alpha * (centers[other] - centers[own[dif]])
    aux = kind == "tinyimagenet"  # other images: a random class's direction, wider noise
    fake[aux] = 0.5 * centers[rng.integers(0, n_classes, size=int(aux.sum()))] + 1.1 * rng.standard_normal((int(aux.sum()), dim), dtype=np.float32)
    return np.concatenate([real, fake])


def make_paper_store(
    path: str | os.PathLike,
    *,
    task_fraction: float = 1.0,
    image_fraction: float = 1.0,
    synthetic: int | None = None,
    backbones: dict[str, tuple[int, int]] | None = None,
    n_seed: int = 20,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Write a paper-shaped store of random, class-structured embeddings (see module docstring).

    Returns a summary (images, tasks, bytes of embeddings, seconds).
    """
    from tqdm.auto import tqdm

    from swsa_store import create_store, edit_store
    from swsa_store.store import EmbeddingRowWriter, writer_lock
    from swsa_store.tasks import VALIDATION_RULE, stable_seed

    started = time.perf_counter()
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; remove it or pass another path")
    backbones = backbones or PAPER_BACKBONES
    shapes = paper_shapes(task_fraction, image_fraction, synthetic)
    images, tasks, members, layout = paper_catalog_tables(shapes, n_seed, seed)
    create_store(path)
    with edit_store(path) as store:
        store.replace_table("images", images)
        store.replace_table("tasks", tasks, attrs={"validation_rule": VALIDATION_RULE, "benchmark": "paper-shaped random embeddings"})
        store.replace_table("task_members", members)
        for name, (dim, n_params) in backbones.items():
            config = {"backbone": name, "feature_dim": dim, "n_params": n_params, "weights_kind": "synthetic-benchmark",
                      "family": "resnet" if name.startswith("resnet") else "vit", "dtype": "float32"}
            store.create_embeddings(name, dim, {"config": json.dumps(config), "weights_kind": "synthetic-benchmark"})
    with writer_lock(path):
        for name, (dim, _) in tqdm(list(backbones.items()), desc="make store", unit="backbone", disable=not progress):
            with EmbeddingRowWriter(path, name) as writer:
                for shape in shapes:
                    info = layout[shape.name]
                    rng = np.random.default_rng(stable_seed(seed, shape.name, name))
                    features = _embeddings_for(shape, info, tasks[tasks["dataset"] == shape.name], dim, rng)
                    ids = np.concatenate([info["real_ids"], info["synth"]["image_id"].to_numpy()])
                    writer.write(ids, features, np.ones(len(ids), np.uint8))
    n_bytes = sum(len(images) * dim * 4 for dim, _ in backbones.values())
    return {"images": len(images), "tasks": len(tasks), "embedding_bytes": n_bytes,
            "largest_matrix_bytes": len(images) * max(d for d, _ in backbones.values()) * 4,
            "seconds": round(time.perf_counter() - started, 2)}


# --------------------------------------------------------------------------- reference


def reference_sweep(store_path: str | os.PathLike, task_ids: list[int], k: int = 3, hardest=(10, 5),
                    normalise: bool = False) -> dict:
    """The same AUROCs as the sweep, computed the plain way, one task and candidate at a time:
    scikit-learn ``NearestNeighbors`` for the kNN scores (leave-one-out: k + 1 neighbours, the
    query's own row dropped), ``roc_auc_score`` for every AUROC, per out-class pair. Returns
    ``{"results": {(task_id, candidate): {"real": [rest, closest], "synthetic": {source: auroc}}},
    "seconds": total, "read_seconds": reading embeddings, "task_seconds": {task_id: seconds}}``:
    ``task_seconds`` is each task's compute over all candidates, reading excluded (a per-task
    loop reads each embedding matrix once, however many tasks it scores).
    ``normalise`` L2-normalises the features first (the cosine kNN detector)."""
    from sklearn.metrics import roc_auc_score
    from sklearn.neighbors import NearestNeighbors

    from swsa_store import open_store
    from swsa_store.tasks import ROLE_HELDOUT, ROLE_REAL_ANOMALY, ROLE_REAL_NORMAL, ROLE_SEED

    started = time.perf_counter()
    results = {}
    read_seconds = 0.0
    task_seconds = dict.fromkeys(task_ids, 0.0)
    with open_store(store_path) as store:
        images, members = store.images(), store.task_members()
        for name in store.backbones():
            read_started = time.perf_counter()
            features = store.embeddings(name)
            read_seconds += time.perf_counter() - read_started
            if normalise:
                features = features / np.linalg.norm(features, axis=1, keepdims=True)
            for task_id in task_ids:
                task_started = time.perf_counter()
                mine = members[members["task_id"] == task_id]
                ids = {role: np.sort(mine.loc[mine["role"] == role, "image_id"].to_numpy())
                       for role in (ROLE_SEED, ROLE_HELDOUT, ROLE_REAL_NORMAL, ROLE_REAL_ANOMALY)}
                support = np.union1d(ids[ROLE_SEED], ids[ROLE_HELDOUT])
                index = NearestNeighbors(n_neighbors=k).fit(features[support].astype(np.float64))

                def knn(rows):
                    distances, _ = index.kneighbors(features[rows].astype(np.float64))
                    return (distances ** 2).sum(axis=1)

                normal, anomaly = knn(ids[ROLE_REAL_NORMAL]), knn(ids[ROLE_REAL_ANOMALY])
                groups = mine.loc[mine["role"] == ROLE_REAL_ANOMALY].sort_values("image_id")["group"].to_numpy()
                labels = np.r_[np.zeros(len(normal)), np.ones(len(anomaly))]
                rest = roc_auc_score(labels, np.r_[normal, anomaly])
                per_group = [roc_auc_score(np.r_[np.zeros(len(normal)), np.ones((groups == g).sum())],
                                           np.r_[normal, anomaly[groups == g]]) for g in np.unique(groups)]
                # leave-one-out: ask for k + 1 neighbours and drop the query's own bank row
                distances, neighbours = NearestNeighbors(n_neighbors=k + 1).fit(features[support].astype(np.float64)).kneighbors(
                    features[ids[ROLE_HELDOUT]].astype(np.float64))
                own = support[neighbours] == ids[ROLE_HELDOUT][:, None]
                keep = ~own & (np.cumsum(~own, axis=1) <= k)
                heldout_scores = np.where(keep, distances ** 2, 0.0).sum(axis=1)
                synthetic = {}
                task_synth = images[(images["task_id"] == task_id) & (images["kind"] != "real")]
                for source, rows in task_synth.groupby("kind"):
                    scores = knn(rows["image_id"].to_numpy())
                    synthetic[source] = roc_auc_score(np.r_[np.zeros(len(heldout_scores)), np.ones(len(scores))],
                                                      np.r_[heldout_scores, scores])
                    for n in hardest:
                        hard = np.sort(scores)[:n]
                        synthetic[f"{source}@hard{n}"] = roc_auc_score(
                            np.r_[np.zeros(len(heldout_scores)), np.ones(len(hard))], np.r_[heldout_scores, hard])
                results[(task_id, name)] = {"real": [rest, min(per_group)], "synthetic": synthetic}
                task_seconds[task_id] += time.perf_counter() - task_started
    return {"results": results, "seconds": time.perf_counter() - started, "read_seconds": read_seconds,
            "task_seconds": task_seconds}


def extrapolate_reference(reference: dict, kendall_seconds: float, tasks: pd.DataFrame) -> dict:
    """The reference loops' cost for every task of ``tasks`` (``task_id``, ``dataset``) from a sample.

    Tasks of different datasets cost very different amounts (a CUB task scores 5,794 test
    images and 199 per-class AUROCs, an MVTec one ~110 images), so the sampled tasks' mean cost
    is taken per dataset and multiplied by that dataset's number of tasks; reading the
    embeddings is counted once (a loop reads each matrix once, however many tasks it scores),
    and the Kendall loop's per-task cost is added for every task.
    """
    sampled = pd.Series(reference["task_seconds"], dtype=float)
    dataset_of = tasks.set_index("task_id")["dataset"]
    per_dataset = sampled.groupby(dataset_of.reindex(sampled.index).to_numpy()).mean()
    counts = tasks["dataset"].value_counts()
    missing = sorted(set(counts.index) - set(per_dataset.index))
    if missing:
        raise ValueError(f"the reference sample has no task of dataset(s) {missing}; sample at least one task per dataset")
    compute = float((per_dataset * counts.reindex(per_dataset.index)).sum())
    kendall = kendall_seconds / max(1, len(sampled)) * len(tasks)
    return {
        "seconds_per_task_by_dataset": {str(d): float(v) for d, v in per_dataset.items()},
        "tasks_by_dataset": {str(d): int(v) for d, v in counts.items()},
        "read_seconds": float(reference["read_seconds"]),
        "seconds_per_task": (compute + kendall) / len(tasks),
        "extrapolated_seconds": float(reference["read_seconds"]) + compute + kendall,
    }


def reference_kendall(cube, task_rows: np.ndarray) -> tuple[np.ndarray, float]:
    """Per task and source: ``scipy.stats.kendalltau`` of synthetic vs real AUROC (one-vs-rest)."""
    from scipy.stats import kendalltau

    started = time.perf_counter()
    out = np.full((len(task_rows), len(cube.sources)), np.nan)
    for i, t in enumerate(task_rows):
        for v in range(len(cube.sources)):
            out[i, v] = kendalltau(cube.synthetic[t, :, v], cube.real[t, :, 0]).statistic
    return out, time.perf_counter() - started


# --------------------------------------------------------------------------- timing helpers


def matmul_peak_gflops(dtype: str = "float64", n: int = 2048, repeats: int = 3) -> float:
    """The machine's measured matrix-multiply rate (best of ``repeats``) in GFLOP/s."""
    import torch

    a = torch.randn(n, n, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, dtype=getattr(torch, dtype))
    torch.matmul(a, b)
    best = np.inf
    for _ in range(repeats):
        started = time.perf_counter()
        torch.matmul(a, b)
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
    from swsa_store import open_store

    from swsa_engine.run.sweep import run_sweep

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
                      "knn_flops": cube.config["knn_flops"], "refined_scores": cube.config.get("refined_scores", 0),
                      "peak_rss_bytes": peak, "tasks": len(cube.tasks)}))


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
    from swsa_engine.core.selection import STRATEGIES, register_strategy, selection_table

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
    from swsa_engine.core.metrics import kendall_tau

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
    from swsa_engine.run.sweep import AurocCube

    store = Path(store)
    figures: dict = {"machine": {"cpu_count": os.cpu_count()}}
    figures.update(_prepare_bench_store(store, make, task_fraction, image_fraction, progress))
    if progress:
        print("[bench] full sweep ...", flush=True)
    figures["sweep"] = _sweep_subprocess(store, None, device)
    if progress:
        print("[bench] half of the tasks ...", flush=True)
    figures["sweep_half_tasks"] = _sweep_subprocess(store, 0.5, device)
    cube = AurocCube.load(store)
    largest_dim = max(int(d) for d in cube.candidates["feature_dim"])
    figures["largest_matrix_bytes"] = int(largest_dim * _n_images(store) * 4)
    figures["memory_budget_bytes"] = 2 * figures["largest_matrix_bytes"] + (1 << 30)
    selection_figures, full = _time_selection(cube)  # a new strategy over the cached cube
    figures.update(selection_figures)
    figures["reference"] = _reference_figures(store, cube, reference_tasks, progress)
    sweep_seconds = figures["sweep"]["seconds"]
    figures["speedup"] = figures["reference"]["extrapolated_seconds"] / sweep_seconds
    figures["knn_gflops"] = figures["sweep"]["knn_flops"] / max(1e-9, sweep_seconds - figures["sweep"]["read_seconds"]) / 1e9
    figures["matmul_peak_gflops"] = {"float64": matmul_peak_gflops("float64"), "float32": matmul_peak_gflops("float32")}
    figures["tasks"] = len(cube.tasks)
    figures["candidates"] = len(cube.candidate_names)
    figures["sources"] = len(cube.sources)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(figures, indent=2, default=float))
        full.to_csv(out / "table1.csv", index=False)
    return figures


#: the detector grid of issue 8, as ``swsa score --detector`` labels
#: the abnormal-reference split the detector bench makes in memory for NAGL when the store has none
BENCH_REFERENCES = {"source": "cutpaste", "share": 0.25}

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
    from swsa_store import open_store
    from swsa_store.references import make_references, read_references

    from swsa_engine.core.detectors import parse_detector
    from swsa_engine.run.sweep import run_sweep

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
    from swsa_engine.report.summary import markdown_table

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


def _n_images(store: Path) -> int:
    from swsa_store import open_store

    with open_store(store) as s:
        return s.n_images


def format_figures(figures: dict) -> str:
    """The bench result as a short, human-readable table."""
    gib = 1 << 30
    sweep, half, ref = figures["sweep"], figures["sweep_half_tasks"], figures["reference"]
    lines = [
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


def _forward_seconds(embedder, input_size: tuple[int, ...], n_images: int, batch_size: int) -> float:
    """Seconds of ``embedder``'s forward pass alone over ``n_images`` ready random inputs
    ``(batch_size, *input_size)``, after one warm-up batch (kernel selection, allocations)."""
    import torch

    sizes = [batch_size] * (n_images // batch_size) + ([n_images % batch_size] if n_images % batch_size else [])
    generator = torch.Generator().manual_seed(0)
    inputs = {n: torch.randn((n, *input_size), generator=generator) for n in set(sizes)}
    embedder(inputs[sizes[0]])  # warm-up (kernel selection, allocations)
    sync = torch.cuda.synchronize if embedder.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for n in sizes:
        embedder(inputs[n])
    sync()
    return time.perf_counter() - start


def _quiet_embed(store: Path, backbone: str, **options):
    """``embed_store(store, backbone, **options)`` with warnings silenced: the bench reports its own figures."""
    from swsa_store.ingest import embed_store

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return embed_store(store, backbone, **options)


def _local_pipeline(catalog: Path, copy: Path, backbone: str, **options) -> tuple[object, float]:
    """``embed_store`` on a copy of the ``catalog`` store: its report and the seconds of the run
    itself (the model load excluded)."""
    from swsa_store.ingest import run_ingest

    timings: dict = {}

    def timed(*args, **kwargs):
        begin = time.perf_counter()
        result = run_ingest(*args, **kwargs)
        timings["seconds"] = time.perf_counter() - begin
        return result

    shutil.copyfile(catalog, copy)
    report = _quiet_embed(copy, backbone, runner=timed, **options)
    return report, timings["seconds"]


def _ray_pipeline(catalog: Path, copy: Path, backbone: str, ray: str, ray_kwargs: dict, **options) -> dict:
    """``embed_store`` on Ray (``ray``: an address or ``"local"``) on a copy of the ``catalog``
    store, end to end; its figures, with the time to the first result apart."""
    from swsa_store.distributed import RayIngestRunner, ray_session

    shutil.copyfile(catalog, copy)
    runner = RayIngestRunner(**ray_kwargs)
    with ray_session(None if ray == "local" else ray):
        report = _quiet_embed(copy, backbone, device="cpu", runner=runner, **options)
    stats = runner.stats
    return {
        "seconds": stats["seconds"], "images_per_s": report.written / stats["seconds"], "actors": stats["actors"],
        "seconds_to_first_result": stats["seconds"] - stats["seconds_after_first_result"],
    }


def bench_ingest(
    work_dir: str | os.PathLike,
    *,
    backbone: str = "timm/resnet10t",
    weights: str | None = "random",
    image_size: int | None = 64,
    n_images: int = 512,
    source_size: int = 256,
    batch_size: int = 64,
    workers: int = 0,
    device: str = "cpu",
    ray: str | None = None,
    progress: bool = False,
    **ray_kwargs,
) -> dict:
    """Images per second of the ingest pipeline against the model's forward pass alone.

    On a generated catalog of ``n_images`` JPEGs (``source_size`` px): *forward* = the same
    :class:`~swsa_store.ingest.Embedder` on ready ``(batch_size, 3, H, W)`` tensors on ``device``
    (the anchor); *pipeline* = ``embed_store`` (read, decode, preprocess, forward, durable write),
    timed around the run itself (the model load is excluded); with ``ray`` (an address, or
    ``"local"``), the same on Ray, end to end from building the dataset (actor start included,
    reported apart as the time to the first result).
    Returns ``{"forward": {...}, "pipeline": {...}, ["ray": {...}], "ratio", ...}``.
    """
    import torch

    from swsa_store.models.backbones import create_backbone
    from swsa_store.catalog import make_ingest_catalog
    from swsa_store.ingest import Embedder

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    store = make_ingest_catalog(work_dir, n_images, source_size=source_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = create_backbone(backbone, weights=weights, image_size=image_size, device=device)
    embedder = Embedder(loaded.model, device=device)
    input_size = tuple(loaded.preprocess.input_size)
    forward_s = _forward_seconds(embedder, input_size, n_images, batch_size)
    options = {"weights": weights, "image_size": image_size, "batch_size": batch_size, "progress": progress}
    report, pipeline_s = _local_pipeline(store, work_dir / "local.h5", backbone, num_workers=workers, device=device, **options)
    figures = {
        "backbone": backbone, "weights": weights, "input_size": list(input_size), "images": n_images,
        "source_size": source_size, "batch_size": batch_size, "workers": workers, "device": device,
        "torch_threads": torch.get_num_threads(),
        "forward": {"seconds": forward_s, "images_per_s": n_images / forward_s},
        "pipeline": {"seconds": pipeline_s, "images_per_s": report.written / pipeline_s, "written": report.written},
    }
    figures["ratio"] = figures["pipeline"]["images_per_s"] / figures["forward"]["images_per_s"]
    if ray is not None:
        figures["ray"] = _ray_pipeline(store, work_dir / "ray.h5", backbone, ray, ray_kwargs, **options)
        figures["ray_ratio"] = figures["ray"]["images_per_s"] / figures["forward"]["images_per_s"]
    return figures


def format_ingest(figures: dict) -> str:
    """``bench_ingest``'s result as a few lines."""
    f = figures
    lines = [
        f"ingest bench: {f['images']} JPEGs ({f['source_size']} px) → {f['backbone']} ({f['weights'] or 'pretrained'} "
        f"weights), input {'x'.join(map(str, f['input_size']))}, batch {f['batch_size']}, device {f['device']}, "
        f"{f['workers']} DataLoader workers, {f['torch_threads']} torch threads",
        f"model forward alone:             {f['forward']['images_per_s']:9.1f} images/s",
        f"pipeline (read+preprocess+write): {f['pipeline']['images_per_s']:9.1f} images/s  "
        f"= {100 * f['ratio']:.0f} % of the forward pass (anchor: at least 90 %)",
    ]
    if "ray" in f:
        r = f["ray"]
        lines.append(f"on Ray ({r['actors']} actors), end to end:  {r['images_per_s']:9.1f} images/s  = "
                     f"{100 * f['ray_ratio']:.0f} %, of which {r['seconds_to_first_result']:.1f} s of "
                     f"{r['seconds']:.1f} s before the first result (starting workers and actors, shipping the model)")
    return "\n".join(lines)


def _main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--_sweep", dest="sweep_store")
    parser.add_argument("--task-fraction", type=float, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    _sweep_worker(args.sweep_store, args.task_fraction, args.device)


if __name__ == "__main__":
    _main()
