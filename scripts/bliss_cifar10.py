#!/usr/bin/env python
"""BLISS's own CIFAR-10 benchmark (Goodge et al., Section 5): one-class and several-class splits.

Splits: 1 normal class (10 trials, one per class), 6 normal classes (5 trials), 9 normal
classes (10 trials, one per held-out anomaly class). Normal statistics come from the training
images of the normal classes (``--train-per-class`` of them per class, default all 5,000), test =
the whole CIFAR-10 test set (normal = the normal classes). Prints BLISS's Table-1 row format:
``mean ± std`` AUROC (×100) over trials, for Biased-CLIP (the internal class score alone) and BLISS
(λ = 0.5, K = 10, dictionary = ImageNet-1k names split at commas, prompt "This is a photo of a {}").

Needs, on disk: CIFAR-10 in the python format (``--data DIR`` holding ``cifar-10-batches-py/`` or
the batches themselves) and CLIP weights (``--weights FILE`` or the search of
:mod:`swsa_store.models.clip`; BLISS used ViT-B/16 = ``clip/ViT-B-16@openai``). Nothing is downloaded.

    python scripts/bliss_cifar10.py --data ~/data --model clip/ViT-B-16@openai --device cuda

The 6-class splits are not listed in the BLISS paper (it reuses ZOC's); by default the script
draws 5 seeded splits (``--seed``); pass your own with ``--six "0,1,2,3,4,5;..."``.
"""

from __future__ import annotations

import argparse
import pickle
import sys
import time
from pathlib import Path

import numpy as np

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def load_cifar10(data: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    folder = data / "cifar-10-batches-py" if (data / "cifar-10-batches-py").is_dir() else data
    files = {"train": [folder / f"data_batch_{i}" for i in range(1, 6)], "test": [folder / "test_batch"]}
    missing = [str(f) for fs in files.values() for f in fs if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 (python version) not found under {data}: missing {missing[0]}"
                                f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}. Download "
                                "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and extract it there")
    out = {}
    for split, paths in files.items():
        xs, ys = [], []
        for path in paths:
            with open(path, "rb") as handle:
                batch = pickle.load(handle, encoding="bytes")
            xs.append(batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(np.asarray(batch[b"labels"]))
        out[split] = (np.concatenate(xs), np.concatenate(ys))
    return out


def embed_images(clip, images: np.ndarray, batch_size: int) -> np.ndarray:
    import torch
    from PIL import Image

    out = []
    device = torch.device(clip.device)
    with torch.inference_mode():
        for lo in range(0, len(images), batch_size):
            batch = torch.stack([clip.transform(Image.fromarray(x)) for x in images[lo: lo + batch_size]]).to(device)
            with torch.autocast(device.type, enabled=device.type == "cuda"):
                out.append(clip.model.encode_image(batch).float().cpu().numpy())
    return np.concatenate(out)


def splits(seed: int, six: str | None) -> dict[str, list[list[int]]]:
    rng = np.random.default_rng(seed)
    six_splits = [[int(c) for c in s.split(",")] for s in six.split(";")] if six else \
        [sorted(rng.choice(10, 6, replace=False).tolist()) for _ in range(5)]
    return {"1 class": [[c] for c in range(10)], "6 classes": six_splits,
            "9 classes": [[c for c in range(10) if c != a] for a in range(10)]}


def run(args) -> int:
    from swsa_engine.core.clip_scores import bliss_score
    from swsa_engine.core.metrics import auroc
    from swsa_store.models.clip import BLISS_TEMPLATE, bliss_dictionary, embed_texts, load_clip

    data = load_cifar10(Path(args.data).expanduser())
    clip = load_clip(args.model, args.weights, weights_dir=args.weights_dir, device=args.device)
    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    x_train, y_train = data["train"]
    if args.train_per_class:
        keep = np.concatenate([rng.choice(np.flatnonzero(y_train == c), args.train_per_class, replace=False) for c in range(10)])
        x_train, y_train = x_train[keep], y_train[keep]
    x_test, y_test = data["test"]
    z_train = embed_images(clip, x_train, args.batch_size)
    z_test = embed_images(clip, x_test, args.batch_size)
    classes = embed_texts(clip, [BLISS_TEMPLATE.format(c) for c in CLASSES])
    dictionary = embed_texts(clip, bliss_dictionary())
    n_per = np.bincount(y_train, minlength=10).max()
    support = np.zeros((10, n_per, z_train.shape[1]), np.float32)
    mask = np.zeros((10, n_per), bool)
    for c in range(10):
        rows = z_train[y_train == c]
        support[c, : len(rows)], mask[c, : len(rows)] = rows, True
    print(f"CLIP {clip.cfg.name} ({clip.weights.kind} weights), {len(z_train)} train / {len(z_test)} test images, "
          f"dictionary {len(dictionary)}, embedded in {time.perf_counter() - started:.0f} s")
    print(f"{'|C|':<10} {'Biased-CLIP':>14} {'BLISS':>14}")
    for label, trials in splits(args.seed, args.six).items():
        biased, bliss = [], []
        for normal in trials:  # a handful of trials; each is one batched call over all test images
            normal = np.asarray(normal)
            out = bliss_score(z_test, classes[normal][None], support[normal][None], dictionary, support_mask=mask[normal][None],
                              k=(args.k,), lam=(0.0, args.lam))
            is_anomaly = ~np.isin(y_test, normal)
            bliss.append(float(auroc(out["score"][1, 0, 0], is_anomaly)) * 100)
            biased.append(float(auroc(out["ic"][0].min(axis=0), is_anomaly)) * 100)
        print(f"{label:<10} {np.mean(biased):>7.1f} ± {np.std(biased):<4.1f} {np.mean(bliss):>7.1f} ± {np.std(bliss):<4.1f}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder with cifar-10-batches-py/ (python version)")
    parser.add_argument("--model", default="clip/ViT-B-16@openai", help="clip/<arch>@<tag> (default: BLISS's ViT-B/16)")
    parser.add_argument("--weights", default=None, help="CLIP weights file (else the offline search; 'random' for a smoke test)")
    parser.add_argument("--weights-dir", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--train-per-class", type=int, default=0, help="normal images per class for the statistics (0: all)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--lam", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--six", default=None, help='6-class splits, e.g. "0,1,2,3,4,5;2,3,4,5,6,7"')
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, OSError, ValueError) as error:  # missing data or weights: one clear line
        print(f"bliss_cifar10: error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
