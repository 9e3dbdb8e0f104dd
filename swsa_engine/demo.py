"""``swsa demo``: the whole SWSA loop on scikit-learn's handwritten digits, on CPU.

catalog (1,797 digits rendered to RGB PNGs, 10 tasks) → CutPaste (normal and scar) and Perlin-noise
anomalies from each task's seed images → embeddings with each candidate backbone → AUROC cube over
feature sources × detectors (kNN, Mahalanobis, PCA; :data:`swsa_engine.cli.DEMO_DETECTORS`) → report.

Weights: each candidate uses pretrained weights when they are found in the documented order
(``--weights-dir``, ``SWSA_WEIGHTS_DIR``, the Hugging Face and torch caches); otherwise — as on
a fresh machine, where nothing can be downloaded — the demo *asks for* a randomly initialised
network, which is warned about and marked in the report.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

log = logging.getLogger(__name__)


def _weights_for(backbone: str, weights_dir: str | None) -> str:
    from swsa_store.backbones import WeightsNotFoundError, get_backbone_cfg, resolve_weights

    cfg = get_backbone_cfg(backbone)
    if cfg.family == "pixels":  # needs no weights
        return None
    try:
        return resolve_weights(cfg, None, weights_dir=weights_dir).path
    except WeightsNotFoundError:
        return "random"


def run_demo(
    out_dir: str = "swsa-demo",
    backbones: list[str] | None = None,
    *,
    image_size: int = 64,
    count: int = 50,
    n_seed: int = 20,
    seed: int = 0,
    batch_size: int = 64,
    workers: int = 0,
    weights_dir: str | None = None,
    device: str = "cpu",
    progress: bool = True,
    detectors: list[str] | None = None,
) -> dict:
    from swsa_store import open_store
    from swsa_store.catalog import catalog_dataset
    from swsa_store.ingest import embed_store, embedding_name
    from swsa_store.synthesize import synthesize

    from .cli import DEMO_BACKBONES, DEMO_DETECTORS
    from .report import write_report
    from .sweep import run_sweep

    backbones = list(backbones or DEMO_BACKBONES)
    detectors = list(detectors or DEMO_DETECTORS)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store_path = out / "store.h5"
    timings: dict[str, float] = {}

    def step(name, func, *a, **kw):
        started = time.perf_counter()
        if progress:
            print(f"[swsa demo] {name} ...", flush=True)
        result = func(*a, **kw)
        timings[name] = time.perf_counter() - started
        return result

    step("catalog digits", catalog_dataset, store_path, "digits", n_seed=n_seed, split_seed=seed,
         image_dir=out / "images" / "digits", image_size=image_size, test_fraction=0.5, seed=seed)
    step("synth cutpaste", synthesize, store_path, "cutpaste", count=count, seed=seed, progress=progress)
    step("synth cutpaste-scar", synthesize, store_path, "cutpaste", count=count, seed=seed, progress=progress, variant="scar")
    step("synth perlin", synthesize, store_path, "perlin", count=count, seed=seed, progress=progress)
    weights_used = {}
    for backbone in backbones:
        weights = _weights_for(backbone, weights_dir)
        weights_used[backbone] = weights
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the random-init warning is logged and shown in the report
            step(f"embed {backbone}", embed_store, store_path, backbone, weights=weights, weights_dir=weights_dir,
                 image_size=image_size, batch_size=batch_size, num_workers=workers, device=device, progress=progress)
    cube = step("score", run_sweep, store_path, backbones=[embedding_name(b) for b in backbones], device=device, progress=progress,
                detectors=detectors)
    with open_store(store_path) as store:
        skips = store.skips()
    total = sum(timings.values())
    notes = [
        "Dataset: scikit-learn's handwritten digits (1,797 images, 10 classes), rendered to "
        f"{image_size}×{image_size} RGB; each digit is the normal class of one task, the other digits are anomalies.",
        f"Candidates: {len(cube.candidates)} = feature sources ({', '.join(backbones)}) × detectors "
        f"({', '.join(cube.config['detectors'])}); `pixels` needs no weights, and Mahalanobis / PCA on it are "
        "fitted on each task's support set only.",
        "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()) + f"; total {total:.1f}.",
    ]
    paths = step("report", write_report, cube, out / "report", store_skips=skips, title="SWSA demo — digits", notes=notes,
                 store_path=store_path, table3_tasks=3, figure4=True)
    from .html_report import write_html_report

    paths["html"] = step("html report", write_html_report, cube, store_path, out / "report" / "report.html",
                         report_dir=out / "report", store_skips=skips, title="SWSA demo — digits", notes=notes)
    if progress:
        print((out / "report" / "report.md").read_text(encoding="utf-8").split("## Figure 3")[0])
    return paths
