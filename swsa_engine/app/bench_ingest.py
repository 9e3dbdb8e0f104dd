"""``swsa bench --ingest``: images per second of the ingest pipeline (read, decode, preprocess,
forward, durable write; optionally on Ray) against the model's forward pass alone, each the best of a
few alternating runs (other work on the machine slows either), and on the CPU the ceiling that the
work allows: the forward pass's share of the CPU time one image costs (reading, decoding and resizing
being the rest), and what that leaves on the machine's cores."""

from __future__ import annotations

import os
import shutil
import time
import warnings
from pathlib import Path

import torch

from swsa_store.catalog import make_ingest_catalog
from swsa_store.distributed import RayIngestRunner, ray_session
from swsa_store.ingest import Embedder, ImageReader, embed_store, run_ingest
from swsa_store.ingest_pipeline import available_cores, pixel_plan
from swsa_store.models.backbones import create_backbone

__all__ = ["bench_ingest", "format_ingest"]


def _forward_seconds(embedder, input_size: tuple[int, ...], n_images: int, batch_size: int) -> tuple[float, float]:
    """Seconds and CPU seconds (every thread of the process) of ``embedder``'s forward pass alone
    over ``n_images`` ready random inputs ``(batch_size, *input_size)``, after one warm-up batch
    (kernel selection, allocations)."""
    sizes = [batch_size] * (n_images // batch_size) + ([n_images % batch_size] if n_images % batch_size else [])
    generator = torch.Generator().manual_seed(0)
    inputs = {n: torch.randn((n, *input_size), generator=generator) for n in set(sizes)}
    embedder(inputs[sizes[0]])  # warm-up (kernel selection, allocations)
    sync = torch.cuda.synchronize if embedder.device.type == "cuda" else (lambda: None)
    sync()
    start, cpu_start = time.perf_counter(), time.process_time()
    for n in sizes:
        embedder(inputs[n])
    sync()
    return time.perf_counter() - start, time.process_time() - cpu_start


def _decode_cpu_seconds(images: Path, transform) -> tuple[float, int]:
    """CPU seconds of reading, decoding and preprocessing the JPEGs under ``images`` on one thread, as
    the ingest runner does (:func:`~swsa_store.ingest_pipeline.pixel_plan`), and their number."""
    paths = sorted(str(p) for p in images.rglob("*.jpg"))
    reader = ImageReader(range(len(paths)), paths, transform, os.sep).with_plan(pixel_plan(transform))
    start = time.thread_time()
    for index in range(len(reader)):
        reader[index]
    return time.thread_time() - start, len(paths)


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
    repeats: int = 3,
    ray: str | None = None,
    progress: bool = False,
    **ray_kwargs,
) -> dict:
    """Images per second of the ingest pipeline against the model's forward pass alone.

    On a generated catalog of ``n_images`` JPEGs (``source_size`` px): *forward* = the same
    :class:`~swsa_store.ingest.Embedder` on ready ``(batch_size, 3, H, W)`` tensors on ``device``
    (the anchor); *pipeline* = ``embed_store`` (read, decode, preprocess, forward, durable write),
    timed around the run itself (the model load is excluded); each the best of ``repeats`` runs,
    alternating. On a CPU device, *ceiling*: the most the CPU work allows (:func:`_ceiling`; the
    forward pass's share of that work when it keeps every core busy). With ``ray`` (an address, or ``"local"``), the same on Ray, once,
    end to end from building the dataset (actor start included, reported apart as the time to the
    first result).
    Returns ``{"forward": {...}, "pipeline": {...}, "ratio", "decode": {...}, "forward_share", "ceiling",
    ["ray": {...}], ...}``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    store = make_ingest_catalog(work_dir, n_images, source_size=source_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = create_backbone(backbone, weights=weights, image_size=image_size, device=device)
    embedder = Embedder(loaded.model, device=device)
    input_size = tuple(loaded.preprocess.input_size)
    options = {"weights": weights, "image_size": image_size, "batch_size": batch_size, "progress": progress}
    forward, pipeline = [], []
    for _ in range(repeats):
        forward.append(_forward_seconds(embedder, input_size, n_images, batch_size))
        pipeline.append(_local_pipeline(store, work_dir / "local.h5", backbone, num_workers=workers, device=device,
                                        **options))
    decode_cpu, decoded = _decode_cpu_seconds(work_dir / "images", loaded.transform)
    figures = {
        "backbone": backbone, "weights": weights, "input_size": list(input_size), "images": n_images,
        "source_size": source_size, "batch_size": batch_size, "workers": workers, "device": device,
        "torch_threads": torch.get_num_threads(), "decode_threads": available_cores(), "repeats": repeats,
        **_rates(forward, pipeline, n_images),
        "decode": {"cpu_ms_per_image": 1e3 * decode_cpu / decoded},
    }
    figures.update(_ceiling(figures, available_cores()) if embedder.device.type == "cpu" else
                   {"forward_share": None, "ceiling": None})
    if ray is not None:
        figures["ray"] = _ray_pipeline(store, work_dir / "ray.h5", backbone, ray, ray_kwargs, **options)
        figures["ray_ratio"] = figures["ray"]["images_per_s"] / figures["forward"]["images_per_s"]
    return figures


def _rates(forward: list[tuple[float, float]], pipeline: list[tuple[object, float]], n_images: int) -> dict:
    """``{"forward", "pipeline", "ratio"}`` from the runs (``(seconds, CPU seconds)`` of the forward pass,
    ``(report, seconds)`` of the pipeline), each the best one; every run's images/s is kept."""
    forward_s, forward_cpu = min(forward)
    report, pipeline_s = min(pipeline, key=lambda run: run[1])
    return {
        "forward": {"seconds": forward_s, "images_per_s": n_images / forward_s,
                    "cpu_ms_per_image": 1e3 * forward_cpu / n_images,
                    "runs_images_per_s": [n_images / s for s, _ in forward]},
        "pipeline": {"seconds": pipeline_s, "images_per_s": report.written / pipeline_s, "written": report.written,
                     "runs_images_per_s": [r.written / s for r, s in pipeline]},
        "ratio": (report.written / pipeline_s) / (n_images / forward_s),
    }


def _ceiling(figures: dict, cores: int) -> dict:
    """What the CPU work allows (a CPU device): ``forward_share`` = forward CPU / (forward CPU + read,
    decode and preprocess CPU) per image; ``ceiling`` = the most the pipeline can reach, as a share of
    the forward pass's images/s: every one of ``cores`` cores busy with that work, and never more than
    the forward pass's own rate — ``min(1, cores × forward seconds / CPU seconds)`` per image, equal to
    ``forward_share`` when the forward pass alone keeps every core busy."""
    forward_cpu, decode_cpu = figures["forward"]["cpu_ms_per_image"], figures["decode"]["cpu_ms_per_image"]
    forward_wall = 1e3 * figures["forward"]["seconds"] / figures["images"]
    return {"forward_share": forward_cpu / (forward_cpu + decode_cpu), "cores": cores,
            "ceiling": min(1.0, cores * forward_wall / (forward_cpu + decode_cpu))}


def format_ingest(figures: dict) -> str:
    """``bench_ingest``'s result as a few lines."""
    f = figures
    lines = [
        f"ingest bench: {f['images']} JPEGs ({f['source_size']} px) → {f['backbone']} ({f['weights'] or 'pretrained'} "
        f"weights), input {'x'.join(map(str, f['input_size']))}, batch {f['batch_size']}, device {f['device']}, "
        f"{_readers(f)}, {f['torch_threads']} torch threads; best of {f['repeats']} alternating runs",
        f"model forward alone:             {f['forward']['images_per_s']:9.1f} images/s",
        f"pipeline (read+preprocess+write): {f['pipeline']['images_per_s']:9.1f} images/s  "
        f"= {100 * f['ratio']:.0f} % of the forward pass (anchor: at least 90 %)",
    ]
    if f["ceiling"] is not None:
        lines.append(f"CPU per image: forward {f['forward']['cpu_ms_per_image']:.2f} ms, read+decode+preprocess "
                     f"{f['decode']['cpu_ms_per_image']:.2f} ms: the forward pass is {100 * f['forward_share']:.0f} % "
                     f"of the work; ceiling on {f['cores']} cores {100 * f['ceiling']:.0f} % of the forward pass")
    if "ray" in f:
        r = f["ray"]
        lines.append(f"on Ray ({r['actors']} actors), end to end:  {r['images_per_s']:9.1f} images/s  = "
                     f"{100 * f['ray_ratio']:.0f} %, of which {r['seconds_to_first_result']:.1f} s of "
                     f"{r['seconds']:.1f} s before the first result (starting workers and actors, shipping the model)")
    return "\n".join(lines)


def _readers(figures: dict) -> str:
    """Who reads the images: DataLoader worker processes, or the runner's decoding threads."""
    if figures["workers"] > 0:
        return f"{figures['workers']} DataLoader workers"
    return f"{figures['decode_threads']} decoding threads"
