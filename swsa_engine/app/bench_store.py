"""The paper-shaped bench store: :func:`make_paper_store` writes a store with the real *shape* of
the SWSA benchmark — CUB-200-2011, Oxford Flowers-102, MVTec-AD and VisA, 329 tasks, 100 CutPaste
+ 100 diffusion + 100 auxiliary synthetic images per task (Flowers: 25 each), the ten backbones
with their true feature sizes — filled with seeded, class-structured random embeddings (a Gaussian
cluster per class; defect types as offsets from their product's cluster; synthetic anomalies
between or near clusters). No image files exist; only embeddings. :func:`paper_shapes` and
:func:`paper_catalog_tables` give the shapes and the catalog tables alone (also used by the CLIP bench).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from swsa_store import create_store, edit_store
from swsa_store.catalog import normalise_image_rows
from swsa_store.row_writer import EmbeddingRowWriter
from swsa_store.store import writer_lock
from swsa_store.tasks import VALIDATION_RULE, build_tasks, stable_seed

__all__ = [
    "PAPER_BACKBONES", "SOURCES", "MVTEC", "VISA", "ClassShape", "DatasetShape", "paper_shapes", "paper_catalog_tables",
    "CENTRE_RANK", "CENTRE_SPREAD", "make_paper_store",
]

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
    """One class (or product) of a paper dataset: its train and test-normal image counts, and its
    test images per defect type (defect datasets only)."""

    name: str
    n_train: int
    n_test_normal: int
    defects: tuple[int, ...] = ()  # test images per defect type (defect datasets only)


@dataclass(frozen=True)
class DatasetShape:
    """One paper dataset: its protocol, its classes and its synthetic images per task and source."""

    name: str
    protocol: str  # "multi-class" (other classes are anomalies) or "defect"
    classes: tuple[ClassShape, ...]
    synthetic_per_source: int


def _spread(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal counts (the first ones one larger)."""
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
        rows = normalise_image_rows(rows, next_id)
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
        synth = normalise_image_rows(pd.concat(synth_rows, ignore_index=True), next_id)
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
