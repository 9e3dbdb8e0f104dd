"""``swsa bench``: the engine timed on a paper-shaped store against reference loops (default), or
instead the ingest pipeline (--ingest), the CLIP prompt and BLISS re-scoring (--clip), every
detector of the grid (--detectors), or knn_score against a same-shape matrix multiply (--knn);
--make-store only writes the paper-shaped store."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from swsa_engine.app.bench import format_figures, run_bench
from swsa_engine.app.bench_clip import bench_clip_rescoring
from swsa_engine.app.bench_detectors import bench_detectors, format_detector_bench
from swsa_engine.app.bench_ingest import bench_ingest, format_ingest
from swsa_engine.app.bench_knn import bench_knn, format_knn_bench
from swsa_engine.app.bench_store import make_paper_store
from swsa_engine.app.cli.common import add_command, add_device_option, add_ray_options, print_summary, ray_kwargs
from swsa_engine.core.detectors import patch_cost

__all__ = ["cmd_bench", "add_bench_command"]


def cmd_bench(args: argparse.Namespace) -> int:
    if args.ingest:
        return _bench_ingest(args)
    if args.clip:
        print_summary("bench prompts and BLISS", bench_clip_rescoring(task_fraction=args.task_fraction,
                                                                      image_fraction=args.image_fraction))
        return 0
    if args.detectors:
        return _bench_detectors(args)
    if args.knn:
        table = bench_knn(progress=not args.quiet)
        print(format_knn_bench(table))
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            table.to_csv(Path(args.out) / "knn.csv", index=False)
            print(f"figures written: {Path(args.out) / 'knn.csv'}")
        return 0
    if args.make_store:
        summary = make_paper_store(args.make_store, task_fraction=args.task_fraction, image_fraction=args.image_fraction,
                                   progress=not args.quiet)
        print_summary("bench store", summary)
        return 0
    figures = run_bench(args.store, task_fraction=args.task_fraction, image_fraction=args.image_fraction,
                        reference_tasks=args.reference_tasks, device=args.device, out=args.out, progress=not args.quiet)
    print(format_figures(figures))
    if args.out:
        print(f"figures written: {Path(args.out) / 'bench.json'}")
    return 0


def _bench_ingest(args: argparse.Namespace) -> int:
    """`swsa bench --ingest`: images/s of the embedding pipeline vs the forward pass alone."""
    actors = {k: v for k, v in ray_kwargs(args).items() if k != "address"}
    with tempfile.TemporaryDirectory(prefix="swsa-ingest-") as tmp:
        figures = bench_ingest(args.out or tmp, backbone=args.backbone, weights=args.weights,
                               image_size=args.image_size, n_images=args.images, batch_size=args.batch_size,
                               workers=args.workers, device=args.device, repeats=args.repeats,
                               progress=not args.quiet, ray=args.ray, **actors)
    print(format_ingest(figures))
    if args.out:
        (Path(args.out) / "ingest.json").write_text(json.dumps(figures, indent=2))
        print(f"figures written: {Path(args.out) / 'ingest.json'}")
    return 0


def _bench_detectors(args: argparse.Namespace) -> int:
    """`swsa bench --detectors`: every detector of the grid timed on the (made if missing) paper-shaped store."""
    if not Path(args.store).exists():
        make_paper_store(args.store, task_fraction=args.task_fraction, image_fraction=args.image_fraction,
                         progress=not args.quiet)
    table = bench_detectors(args.store, task_fraction=args.detector_fraction, device=args.device, progress=not args.quiet)
    patch = patch_cost(device=args.device, repeats=2)
    print(format_detector_bench(table, patch))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        table.to_csv(Path(args.out) / "detectors.csv", index=False)
        (Path(args.out) / "patch_cost.json").write_text(json.dumps(patch, indent=2))
        print(f"figures written: {Path(args.out) / 'detectors.csv'}, {Path(args.out) / 'patch_cost.json'}")
    return 0


def add_bench_command(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "bench", cmd_bench,
                    "time the engine on a paper-shaped store (329 tasks, 10 backbones) against reference loops")
    p.add_argument("--store", default="swsa-bench/paper.h5", help="bench store (made if missing; default swsa-bench/paper.h5)")
    p.add_argument("--make-store", metavar="PATH", help="only write a paper-shaped store of random embeddings to PATH")
    p.add_argument("--task-fraction", type=float, default=1.0, help="share of each dataset's classes (scale knob, default 1)")
    p.add_argument("--image-fraction", type=float, default=1.0, help="share of each class's images (scale knob, default 1)")
    p.add_argument("--reference-tasks", type=int, default=2, help="tasks per dataset recomputed by the reference loops")
    p.add_argument("--clip", action="store_true",
                   help="instead: time re-scoring every prompt (10 + ensemble) and the BLISS grid for the paper's tasks")
    p.add_argument("--detectors", action="store_true",
                   help="instead: time every detector of the grid (kNN k/metric, Mahalanobis, residual K/reduce, NAGL, "
                        "PCA) over all backbones of the store, and the patch-level score per task")
    p.add_argument("--knn", action="store_true",
                   help="instead: time knn_score (exact) and knn_score_bounded on 20,000 × 2,048 queries against banks "
                        "of 20, 200, 2,000 and 20,000 rows beside the same-shape float32 matrix multiply")
    p.add_argument("--detector-fraction", type=float, default=0.1,
                   help="--detectors: share of each dataset's tasks timed, extrapolated to all (default 0.1)")
    p.add_argument("--out", default=None, help="folder for bench.json and table1.csv (detectors.csv with --detectors)")
    add_device_option(p)
    _add_bench_ingest_options(p)
    add_ray_options(p)


def _add_bench_ingest_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("--ingest: images/s of the embedding pipeline vs the model's forward pass alone")
    g.add_argument("--ingest", action="store_true",
                   help="instead: time embedding a generated catalog of JPEGs (read, preprocess, forward, write) "
                        "against the forward pass alone on the same device (--out keeps the catalog and ingest.json)")
    g.add_argument("--backbone", default="timm/resnet10t", help="--ingest: backbone (default timm/resnet10t)")
    g.add_argument("--weights", default="random", help="--ingest: weights (default random; see `swsa embed --help`)")
    g.add_argument("--image-size", dest="image_size", type=int, default=64, help="--ingest: model input size (default 64)")
    g.add_argument("--images", type=int, default=512, help="--ingest: images in the generated catalog (default 512)")
    g.add_argument("--batch-size", dest="batch_size", type=int, default=64, help="--ingest: batch size (default 64)")
    g.add_argument("--workers", type=int, default=0,
                   help="--ingest: DataLoader worker processes of the local path (default 0: decoding threads)")
    g.add_argument("--repeats", type=int, default=3,
                   help="--ingest: alternating runs of the forward pass and the pipeline, the best of each kept (default 3)")
