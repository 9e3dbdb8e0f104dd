"""``swsa export-detector`` (one candidate of a store, fitted on one task, as a portable bundle) and
``swsa predict`` (score new images with a bundle; ``--heatmaps DIR`` adds patch-level detectors' heat
maps and their HTML gallery, :mod:`swsa_engine.report.prediction_gallery`)."""

from __future__ import annotations

import argparse
import sys

from swsa_store.csv_safe import write_csv

from swsa_engine.app.cli.common import add_command, add_device_option, add_store_option, print_summary
from swsa_engine.core.protocol import PROTOCOLS
from swsa_engine.core.recommendation import RECOMMENDED
from swsa_engine.report.prediction_gallery import GALLERY_FILE, HEATMAP_ALPHA, write_prediction_gallery
from swsa_engine.run.bundle import BundleError
from swsa_engine.run.bundle_export import DEFAULT_QUANTILE, export_detector
from swsa_engine.run.predict import Predictor, load_predictor

__all__ = ["cmd_export_detector", "cmd_predict", "add_export_detector_command", "add_predict_command"]


def cmd_export_detector(args: argparse.Namespace) -> int:
    pick = args.pick if args.pick or args.candidate else RECOMMENDED
    manifest = export_detector(args.store, args.task, args.out, candidate=args.candidate, pick=pick,
                               quantile=args.quantile, protocol=args.protocol)
    rules = manifest["thresholds"]
    shown = {name: rule["value"] for name, rule in rules.items()}
    print_summary("export-detector", {
        "bundle": args.out, "candidate": manifest["candidate"]["name"], "task": manifest["task"]["task_id"],
        **({"members": len(manifest["ensemble"]["members"])} if "ensemble" in manifest else
           {"bank": sum(i >= 0 for i in manifest["bank"]["image_ids"])}), "thresholds": shown,
        "default": manifest["default_threshold"],
    })
    if manifest["default_threshold"] != "normal_quantile":
        print(f"note: {manifest['default_threshold_reason']}", file=sys.stderr)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    predictor = load_predictor(args.detector, device=args.device, batch_size=args.batch_size, num_workers=args.workers,
                               weights=args.weights, weights_dir=args.weights_dir)
    page = None
    if not 0.0 <= args.heatmap_alpha <= 1.0:
        raise ValueError(f"--heatmap-alpha must be between 0 and 1, got {args.heatmap_alpha}")
    if args.heatmaps:
        if not isinstance(predictor, Predictor):
            raise BundleError(f"--heatmaps needs a single patch-level detector bundle; {args.detector} is an ensemble")
        frame, maps = predictor.predict_with_maps(args.images, threshold=args.threshold, progress=not args.quiet)
        page, written = write_prediction_gallery(args.heatmaps, frame, maps, predictor.model_view,
                                                 alpha=args.heatmap_alpha, progress=not args.quiet)
        frame["heatmap"] = written
    elif isinstance(predictor, Predictor):
        if args.normalise_over != "reference":
            raise BundleError(f"--normalise-over applies to ensemble bundles; {args.detector} is a single detector")
        frame = predictor.predict(args.images, threshold=args.threshold, progress=not args.quiet)
    else:
        frame = predictor.predict(args.images, threshold=args.threshold, progress=not args.quiet,
                                  normalise_over=args.normalise_over)
    write_csv(frame, args.out or sys.stdout, float_format="%.17g")  # paths from the user: formula-escaped
    failed = int((frame["error"] != "").sum())
    summary = {"images": len(frame), "anomalies": int((frame["decision"] == "anomaly").sum()), "unreadable": failed,
               "threshold": f"{frame.attrs['threshold']}={frame.attrs['threshold_value']:.6g}",
               **({"gallery": str(page)} if page else {})}
    if args.out:
        print_summary("predict", {**summary, "out": args.out})
    else:  # stdout holds the CSV
        print("predict: " + ", ".join(f"{k}={v}" for k, v in summary.items()), file=sys.stderr)
    return 0


def add_export_detector_command(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "export-detector", cmd_export_detector,
                    "write one candidate, fitted on one task's support images, as a portable detector bundle")
    add_store_option(p)
    p.add_argument("--task", type=int, required=True, help="the task id whose support images are the bank")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--candidate", help="the candidate's cube name: SOURCE (kNN k=3) or SOURCE/DETECTOR, e.g. "
                                           "pixels/mahalanobis")
    which.add_argument("--pick", help="choose the candidate with a selection strategy on the store's cube (default: "
                                      "recommended, which may choose an ensemble; or e.g. swsa:cutpaste, swsa_mean)")
    p.add_argument("--out", required=True, help="the bundle folder to write")
    p.add_argument("--quantile", type=float, default=DEFAULT_QUANTILE,
                   help=f"quantile of the normal-quantile threshold (default {DEFAULT_QUANTILE}: expected FPR <= 1 %%)")
    p.add_argument("--protocol", choices=list(PROTOCOLS), default=None,
                   help="validation protocol of the thresholds' scores (default: the cube's)")


def add_predict_command(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "predict", cmd_predict, "score images with an exported detector bundle")
    p.add_argument("--detector", required=True, help="the bundle folder (swsa export-detector)")
    p.add_argument("images", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    p.add_argument("--out", help="write the scores as CSV here (path, score, decision, error); default: stdout")
    p.add_argument("--heatmaps", metavar="DIR", default=None,
                   help="patch-level detectors: write each image's anomaly heat map over the image (PNG) and an HTML "
                        f"gallery sorted by score ({GALLERY_FILE}) into DIR; the CSV gains a heatmap column")
    p.add_argument("--heatmap-alpha", type=float, default=HEATMAP_ALPHA,
                   help=f"weight of the heat map over the image, 0-1 (default {HEATMAP_ALPHA})")
    p.add_argument("--normalise-over", choices=["reference", "batch"], default="reference",
                   help="ensemble bundles: normalise each member's scores against its reference pool of held-out "
                        "normals (default: every image on its own), or over the images given together (batch: as the "
                        "cube does over a task's test pool, so scoring that pool reproduces the cube's scores)")
    p.add_argument("--threshold", default=None,
                   help="normal_quantile, synthetic_f1 or a number (default: the bundle's default threshold)")
    add_device_option(p, help="cpu (default) or cuda")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--weights", default=None, help="the backbone's weights file, when not where the bundle says")
    p.add_argument("--weights-dir", default=None, help="a folder to search for the backbone's weights")
