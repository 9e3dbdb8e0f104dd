"""``swsa bench --ingest``: images per second of the ingest pipeline (read, decode, preprocess,
forward, durable write; optionally on Ray) against the model's forward pass alone."""

from __future__ import annotations

import os
import shutil
import time
import warnings
from pathlib import Path

import torch

from swsa_store.catalog import make_ingest_catalog
from swsa_store.distributed import RayIngestRunner, ray_session
from swsa_store.ingest import Embedder, embed_store, run_ingest
from swsa_store.models.backbones import create_backbone

__all__ = ["bench_ingest", "format_ingest"]


def _forward_seconds(embedder, input_size: tuple[int, ...], n_images: int, batch_size: int) -> float:
    """Seconds of ``embedder``'s forward pass alone over ``n_images`` ready random inputs
    ``(batch_size, *input_size)``, after one warm-up batch (kernel selection, allocations)."""
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return embed_store(store, backbone, **options)


def _local_pipeline(catalog: Path, copy: Path, backbone: str, **options) -> tuple[object, float]:
    """``embed_store`` on a copy of the ``catalog`` store: its report and the seconds of the run
    itself (the model load excluded)."""
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
