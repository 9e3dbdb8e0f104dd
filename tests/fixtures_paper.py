"""Fixture trees that copy the official on-disk layouts of the paper's datasets, tiny images.

Each ``make_*`` writes one dataset under ``root`` and returns a dict of what it wrote (the
expected counts). ``full=True`` writes the real class counts and split sizes:

* CUB-200-2011: 200 classes, 11,788 images, 5,994 train (194 classes x 30 + 6 x 29),
  5,794 test (194 x 29 + 6 x 28);
* Oxford Flowers-102: 102 classes, 8,189 images, trnid 1,020 / valid 1,020 / tstid 6,149
  (10 / 10 / the rest per class, at least 40 images per class);
* MVTec-AD: the 15 categories with their real train / test-good / per-defect counts
  (3,629 train, 1,725 test);
* VisA (1cls split): the 12 objects with their real counts (8,659 train, 2,162 test, 1,200
  anomalies).

Images are 8x8 PNG / JPEG files: a few pre-encoded variants are cycled so writing tens of
thousands of files takes seconds.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image

_VARIANTS: dict[str, list[bytes]] = {}


def image_bytes(fmt: str, index: int) -> bytes:
    """One of 16 pre-encoded 8x8 images of format ``fmt`` ("PNG" or "JPEG")."""
    if fmt not in _VARIANTS:
        out = []
        for k in range(16):
            arr = np.random.default_rng(k).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format=fmt)
            out.append(buf.getvalue())
        _VARIANTS[fmt] = out
    return _VARIANTS[fmt][index % 16]


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# --------------------------------------------------------------------------- CUB-200-2011

CUB_FIRST = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross", "004.Groove_billed_Ani"]


def cub_counts(full: bool) -> list[tuple[int, int]]:
    if not full:
        return [(24, 5), (22, 4), (6, 3)]
    return [(29 if c < 6 else 30, 28 if 6 <= c < 12 else 29) for c in range(200)]


def make_cub(root: Path, full: bool = False, counts: list[tuple[int, int]] | None = None) -> dict:
    counts = counts or cub_counts(full)
    root.mkdir(parents=True, exist_ok=True)
    classes = [CUB_FIRST[c] if c < len(CUB_FIRST) else f"{c + 1:03d}.Bird_Species_{c + 1}" for c in range(len(counts))]
    images, labels, split = [], [], []
    image_id = 0
    for c, (n_train, n_test) in enumerate(counts):
        species = classes[c].split(".", 1)[1]
        for k in range(n_train + n_test):
            image_id += 1
            rel = f"{classes[c]}/{species}_{k + 1:04d}_{100000 + image_id}.jpg"
            _write(root / "images" / rel, image_bytes("JPEG", image_id))
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c + 1}")
            split.append(f"{image_id} {1 if k < n_train else 0}")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (root / "classes.txt").write_text("\n".join(f"{c + 1} {n}" for c, n in enumerate(classes)) + "\n")
    (root / "README").write_text("CUB-200-2011 fixture\n")
    return {"classes": classes, "counts": counts, "n_images": image_id,
            "n_train": sum(a for a, _ in counts), "n_test": sum(b for _, b in counts)}


# --------------------------------------------------------------------------- Oxford Flowers-102


def flowers_totals(full: bool) -> list[int]:
    if not full:
        return [23, 22, 25]  # classes 1..3: 10 trnid + 10 valid + the rest tstid
    totals = [40 + (c * 37) % 60 for c in range(102)]
    extra = 8189 - sum(totals)
    for c in range(extra):
        totals[c % 102] += 1
    return totals


def make_flowers(root: Path, full: bool = False, totals: list[int] | None = None) -> dict:
    from scipy.io import savemat

    totals = totals or flowers_totals(full)
    root.mkdir(parents=True, exist_ok=True)
    n = sum(totals)
    labels = np.concatenate([np.full(t, c + 1) for c, t in enumerate(totals)])
    order = np.random.default_rng(0).permutation(n)  # image numbers are not grouped by class
    labels = labels[order]
    trnid, valid, tstid = [], [], []
    for c in range(len(totals)):
        numbers = np.flatnonzero(labels == c + 1) + 1
        trnid += numbers[:10].tolist()
        valid += numbers[10:20].tolist()
        tstid += numbers[20:].tolist()
    for number in range(1, n + 1):
        _write(root / "jpg" / f"image_{number:05d}.jpg", image_bytes("JPEG", number))
    savemat(str(root / "imagelabels.mat"), {"labels": labels.reshape(1, -1).astype(np.uint8)})
    savemat(str(root / "setid.mat"), {k: np.array(sorted(v), dtype=np.uint16).reshape(1, -1)
                                      for k, v in (("trnid", trnid), ("valid", valid), ("tstid", tstid))})
    return {"n_classes": len(totals), "n_images": n, "trnid": len(trnid), "valid": len(valid), "tstid": len(tstid)}


# --------------------------------------------------------------------------- MVTec-AD

MVTEC_FULL = {
    "bottle": (209, {"good": 20, "broken_large": 20, "broken_small": 22, "contamination": 21}),
    "cable": (224, {"good": 58, "bent_wire": 13, "cable_swap": 12, "combined": 11, "cut_inner_insulation": 14,
                    "cut_outer_insulation": 10, "missing_cable": 12, "missing_wire": 10, "poke_insulation": 10}),
    "capsule": (219, {"good": 23, "crack": 23, "faulty_imprint": 22, "poke": 21, "scratch": 23, "squeeze": 20}),
    "carpet": (280, {"good": 28, "color": 19, "cut": 17, "hole": 17, "metal_contamination": 17, "thread": 19}),
    "grid": (264, {"good": 21, "bent": 12, "broken": 12, "glue": 11, "metal_contamination": 11, "thread": 11}),
    "hazelnut": (391, {"good": 40, "crack": 18, "cut": 17, "hole": 18, "print": 17}),
    "leather": (245, {"good": 32, "color": 19, "cut": 19, "fold": 17, "glue": 19, "poke": 18}),
    "metal_nut": (220, {"good": 22, "bent": 25, "color": 22, "flip": 23, "scratch": 23}),
    "pill": (267, {"good": 26, "color": 25, "combined": 17, "contamination": 21, "crack": 26, "faulty_imprint": 19,
                   "pill_type": 9, "scratch": 24}),
    "screw": (320, {"good": 41, "manipulated_front": 24, "scratch_head": 24, "scratch_neck": 25, "thread_side": 23,
                    "thread_top": 23}),
    "tile": (230, {"good": 33, "crack": 17, "glue_strip": 18, "gray_stroke": 16, "oil": 18, "rough": 15}),
    "toothbrush": (60, {"good": 12, "defective": 30}),
    "transistor": (213, {"good": 60, "bent_lead": 10, "cut_lead": 10, "damaged_case": 10, "misplaced": 10}),
    "wood": (247, {"good": 19, "color": 8, "combined": 11, "hole": 10, "liquid": 10, "scratch": 21}),
    "zipper": (240, {"good": 32, "broken_teeth": 19, "combined": 16, "fabric_border": 17, "fabric_interior": 16,
                     "rough": 17, "split_teeth": 18, "squeezed_teeth": 16}),
}

MVTEC_SMALL = {
    "bottle": (25, {"good": 4, "broken_large": 3, "contamination": 2}),
    "metal_nut": (22, {"good": 3, "bent": 2, "color": 3, "flip": 1}),
}


def make_mvtec(root: Path, full: bool = False, spec: dict | None = None, masks: bool = True) -> dict:
    spec = spec or (MVTEC_FULL if full else MVTEC_SMALL)
    root.mkdir(parents=True, exist_ok=True)
    (root / "license.txt").write_text("CC BY-NC-SA 4.0\n")
    (root / "readme.txt").write_text("MVTec-AD fixture\n")
    k = 0
    for category, (n_train, test) in spec.items():
        for i in range(n_train):
            k += 1
            _write(root / category / "train" / "good" / f"{i:03d}.png", image_bytes("PNG", k))
        for defect, n in test.items():
            for i in range(n):
                k += 1
                _write(root / category / "test" / defect / f"{i:03d}.png", image_bytes("PNG", k))
                if masks and defect != "good":
                    _write(root / category / "ground_truth" / defect / f"{i:03d}_mask.png", image_bytes("PNG", 0))
    return {"categories": list(spec), "n_train": sum(t for t, _ in spec.values()),
            "n_test": sum(sum(d.values()) for _, d in spec.values())}


# --------------------------------------------------------------------------- VisA

#: object -> (train normal, test normal, anomalies); real counts of the 1cls split.
VISA_FULL = {
    "candle": (900, 100, 100), "capsules": (542, 60, 100), "cashew": (450, 50, 100), "chewinggum": (453, 50, 100),
    "fryum": (450, 50, 100), "macaroni1": (900, 100, 100), "macaroni2": (900, 100, 100), "pcb1": (904, 100, 100),
    "pcb2": (901, 100, 100), "pcb3": (905, 101, 100), "pcb4": (904, 101, 100), "pipe_fryum": (450, 50, 100),
}
VISA_SMALL = {"candle": (24, 3, 4), "pcb1": (21, 2, 3)}
#: Defect labels cycled over an object's anomalies; the last one lists two defects.
VISA_DEFECTS = ["scratch", "burnt", "missing", "scratch,burnt"]


def make_visa(root: Path, full: bool = False, spec: dict | None = None, masks: bool = True) -> dict:
    spec = spec or (VISA_FULL if full else VISA_SMALL)
    root.mkdir(parents=True, exist_ok=True)
    split_rows, k = [], 0
    for obj, (n_train, n_test, n_anomaly) in spec.items():
        anno = []
        for i in range(n_train + n_test):
            k += 1
            image = f"{obj}/Data/Images/Normal/{i:04d}.JPG"
            _write(root / image, image_bytes("JPEG", k))
            split_rows.append([obj, "train" if i < n_train else "test", "normal", image, ""])
            anno.append([image, "normal", ""])
        for i in range(n_anomaly):
            k += 1
            image, mask = f"{obj}/Data/Images/Anomaly/{i:03d}.JPG", f"{obj}/Data/Masks/Anomaly/{i:03d}.png"
            _write(root / image, image_bytes("JPEG", k))
            if masks:
                _write(root / mask, image_bytes("PNG", 0))
            split_rows.append([obj, "test", "anomaly", image, mask])
            anno.append([image, VISA_DEFECTS[i % len(VISA_DEFECTS)], mask])
        with open(root / obj / "image_anno.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["image", "label", "mask"])
            writer.writerows(anno)
    (root / "split_csv").mkdir(exist_ok=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(split_rows)
    return {"objects": list(spec), "n_train": sum(a for a, _, _ in spec.values()),
            "n_test": sum(b + c for _, b, c in spec.values())}


# --------------------------------------------------------------------------- Tiny-ImageNet

TINY_WORDS = {"n01443537": "goldfish, Carassius auratus", "n01629819": "European fire salamander, Salamandra salamandra",
              "n01641577": "bullfrog, Rana catesbeiana"}


def make_tinyimagenet(root: Path, n_train: int = 6, n_val: int = 2) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    wnids = list(TINY_WORDS)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    words = dict(TINY_WORDS, n00001740="entity", n00002137="abstraction, abstract entity")
    (root / "words.txt").write_text("".join(f"{w}\t{n}\n" for w, n in sorted(words.items())))
    k, val = 0, []
    for wnid in wnids:
        boxes = []
        for i in range(n_train):
            k += 1
            _write(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", image_bytes("JPEG", k))
            boxes.append(f"{wnid}_{i}.JPEG\t0\t0\t7\t7")
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("\n".join(boxes) + "\n")
        for i in range(n_val):
            k += 1
            name = f"val_{len(val)}.JPEG"
            _write(root / "val" / "images" / name, image_bytes("JPEG", k))
            val.append(f"{name}\t{wnid}\t0\t0\t7\t7")
    (root / "val" / "val_annotations.txt").write_text("\n".join(val) + "\n")
    _write(root / "test" / "images" / "test_0.JPEG", image_bytes("JPEG", 99))
    return {"wnids": wnids, "n_train": n_train * len(wnids), "n_val": n_val * len(wnids)}
