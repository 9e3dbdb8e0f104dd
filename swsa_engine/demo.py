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
from dataclasses import dataclass, field
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


@dataclass
class _Steps:
    """Runs the demo's steps, announcing each one (with ``progress``) and timing it."""

    progress: bool
    timings: dict[str, float] = field(default_factory=dict)

    def __call__(self, name: str, func, *args, **kwargs):
        started = time.perf_counter()
        if self.progress:
            print(f"[swsa demo] {name} ...", flush=True)
        result = func(*args, **kwargs)
        self.timings[name] = time.perf_counter() - started
        return result


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
    """Run the whole demo into ``out_dir`` (``store.h5``, ``images/``, ``report/``); returns the report's paths.

    ``backbones`` and ``detectors`` default to :data:`~swsa_engine.cli.DEMO_BACKBONES` and
    :data:`~swsa_engine.cli.DEMO_DETECTORS`; with ``progress``, steps are announced and the
    report's head is printed.
    """
    from swsa_store.ingest import embedding_name

    from .cli import DEMO_BACKBONES, DEMO_DETECTORS
    from .sweep import run_sweep

    backbones = list(backbones or DEMO_BACKBONES)
    detectors = list(detectors or DEMO_DETECTORS)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store_path = out / "store.h5"
    step = _Steps(progress)
    _catalog_and_synthesize(step, store_path, out, image_size=image_size, count=count, n_seed=n_seed, seed=seed)
    _embed_backbones(step, store_path, backbones, weights_dir=weights_dir, image_size=image_size,
                     batch_size=batch_size, workers=workers, device=device)
    cube = step("score", run_sweep, store_path, backbones=[embedding_name(b) for b in backbones], device=device, progress=progress,
                detectors=detectors)
    paths = _write_reports(step, cube, store_path, out, _demo_notes(cube, backbones, image_size, step.timings))
    if progress:
        print((out / "report" / "report.md").read_text(encoding="utf-8").split("## Figure 3")[0])
    return paths


def _catalog_and_synthesize(step: _Steps, store_path: Path, out: Path, *, image_size: int, count: int, n_seed: int,
                            seed: int) -> None:
    from swsa_store.catalog import catalog_dataset
    from swsa_store.synthesize import synthesize

    progress = step.progress
    step("catalog digits", catalog_dataset, store_path, "digits", n_seed=n_seed, split_seed=seed,
         image_dir=out / "images" / "digits", image_size=image_size, test_fraction=0.5, seed=seed)
    step("synth cutpaste", synthesize, store_path, "cutpaste", count=count, seed=seed, progress=progress)
    step("synth cutpaste-scar", synthesize, store_path, "cutpaste", count=count, seed=seed, progress=progress, variant="scar")
    step("synth perlin", synthesize, store_path, "perlin", count=count, seed=seed, progress=progress)


def _embed_backbones(step: _Steps, store_path: Path, backbones: list[str], *, weights_dir: str | None, image_size: int,
                     batch_size: int, workers: int, device: str) -> None:
    from swsa_store.ingest import embed_store

    for backbone in backbones:
        weights = _weights_for(backbone, weights_dir)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the random-init warning is logged and shown in the report
            step(f"embed {backbone}", embed_store, store_path, backbone, weights=weights, weights_dir=weights_dir,
                 image_size=image_size, batch_size=batch_size, num_workers=workers, device=device, progress=step.progress)


def _demo_notes(cube, backbones: list[str], image_size: int, timings: dict[str, float]) -> list[str]:
    """The report's notes on the dataset, the candidates and the steps' timings so far."""
    total = sum(timings.values())
    return [
        "Dataset: scikit-learn's handwritten digits (1,797 images, 10 classes), rendered to "
        f"{image_size}×{image_size} RGB; each digit is the normal class of one task, the other digits are anomalies.",
        f"Candidates: {len(cube.candidates)} = feature sources ({', '.join(backbones)}) × detectors "
        f"({', '.join(cube.config['detectors'])}); `pixels` needs no weights, and Mahalanobis / PCA on it are "
        "fitted on each task's support set only.",
        "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()) + f"; total {total:.1f}.",
    ]


def _write_reports(step: _Steps, cube, store_path: Path, out: Path, notes: list[str]) -> dict:
    """The Markdown report (with its CSVs and figures) and the HTML report under ``out / "report"``."""
    from swsa_store import open_store

    from .report import write_report

    with open_store(store_path) as store:
        skips = store.skips()
    paths = step("report", write_report, cube, out / "report", store_skips=skips, title="SWSA demo — digits", notes=notes,
                 store_path=store_path, table3_tasks=3, figure4=True)
    from .html_report import write_html_report

    paths["html"] = step("html report", write_html_report, cube, store_path, out / "report" / "report.html",
                         report_dir=out / "report", store_skips=skips, title="SWSA demo — digits", notes=notes)
    return paths
