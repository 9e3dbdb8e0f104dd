"""The ``swsa`` command line: demo, catalog, synth, embed, score, report, info.

Every subcommand has ``--help``. Errors print one line (``swsa: error: ...``) and exit with a
non-zero status; ``--debug`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path

log = logging.getLogger("swsa")

DEMO_BACKBONES = ("resnet18", "resnet34", "resnet50", "vit_b_32")


# --------------------------------------------------------------------------- commands


def cmd_catalog(args: argparse.Namespace) -> int:
    from swsa_store.catalog import catalog_dataset

    kwargs = {}
    if args.dataset == "digits":
        image_dir = Path(args.image_dir) if args.image_dir else Path(str(args.store) + ".files") / "digits"
        kwargs = {"image_dir": image_dir, "image_size": args.image_size, "test_fraction": args.test_fraction, "seed": args.seed}
    elif args.dataset == "folder":
        if not args.root:
            raise ValueError("`swsa catalog folder` needs --root PATH (root/<class>/<images> or root/{train,test}/<class>/<images>)")
        kwargs = {"root": args.root, "name": args.name, "test_fraction": args.test_fraction, "seed": args.seed}
    else:
        if args.root:
            kwargs["root"] = args.root
    summary = catalog_dataset(args.store, args.dataset, n_seed=args.n_seed, split_seed=args.seed, **kwargs)
    _print_summary("catalog", summary)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from swsa_store.synthesize import synthesize

    kwargs = {}
    if args.variant:
        kwargs["variant"] = args.variant
    summary = synthesize(args.store, args.method, count=args.count, seed=args.seed, source=args.source,
                         progress=not args.quiet, **kwargs)
    _print_summary("synth", summary)
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from swsa_store.ingest import embed_store

    for backbone in _split(args.backbone):
        report = embed_store(
            args.store, backbone, weights=args.weights, weights_dir=args.weights_dir,
            allow_download=args.allow_download, image_size=args.image_size, name=args.name if len(_split(args.backbone)) == 1 else None,
            batch_size=args.batch_size, num_workers=args.workers, device=args.device, progress=not args.quiet,
        )
        _print_summary("embed", {
            "backbone": report.backbone, "images": report.total, "already_done": report.already_done,
            "written": report.written, "failed": report.failed,
        })
        for image_id, reason in report.failures[:10]:
            print(f"  skipped image {image_id}: {reason}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from .sweep import run_sweep

    cube = run_sweep(args.store, backbones=_split(args.backbones) or None, k=args.k,
                     hardest=tuple(int(n) for n in _split(args.hardest)), device=args.device, progress=not args.quiet)
    _print_summary("score", {
        "tasks": len(cube.tasks), "candidates": len(cube.candidates), "sources": cube.sources,
        "skipped cells": len(cube.skips), "seconds": cube.config["seconds"],
    })
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from swsa_store import open_store

    from .report import write_report
    from .sweep import AurocCube

    cube = AurocCube.load(args.store)
    with open_store(args.store) as store:
        skips = store.skips()
    paths = write_report(cube, args.out, store_skips=skips)
    print(f"report written: {paths['report']}")
    if not args.quiet:
        print(Path(paths["report"]).read_text(encoding="utf-8").split("## Figure 3")[0])
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from swsa_store import open_store
    from swsa_store.store import DONE_FAILED, DONE_WRITTEN

    with open_store(args.store) as store:
        images, tasks, skips = store.images(), store.tasks(), store.skips()
        info = {
            "store": str(store.path), "schema_version": int(store.file.attrs["schema_version"]),
            "images": len(images), "datasets": {}, "backbones": {}, "results": store.results(),
            "skips": len(skips),
        }
        for dataset, rows in images.groupby("dataset"):
            mine = tasks[tasks["dataset"] == dataset]
            info["datasets"][dataset] = {
                "classes": int(rows.loc[rows["kind"] == "real", "class_name"].nunique()),
                "images": {kind: int(n) for kind, n in rows.groupby("kind").size().items()},
                "skipped_images": int((rows["status"] != "ok").sum()),
                "tasks": int(len(mine)), "skipped_tasks": int((mine["status"] != "ok").sum()),
            }
        usable = (images["status"] == "ok").to_numpy()
        for name in store.backbones():
            done = store.done_mask(name)
            cfg = store.embedding_attrs(name).get("config", {})
            info["backbones"][name] = {
                "done": int((done[usable] == DONE_WRITTEN).sum()), "of": int(usable.sum()),
                "failed": int((done == DONE_FAILED).sum()), "feature_dim": cfg.get("feature_dim"),
                "weights": cfg.get("weights_kind"),
            }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"store {info['store']} (schema {info['schema_version']}): {info['images']} images, {info['skips']} recorded skips")
    for dataset, d in info["datasets"].items():
        kinds = ", ".join(f"{n} {k}" for k, n in d["images"].items())
        print(f"  dataset {dataset}: {d['classes']} classes, {kinds}; {d['tasks']} tasks ({d['skipped_tasks']} skipped), "
              f"{d['skipped_images']} skipped images")
    for name, b in info["backbones"].items():
        pct = 100.0 * b["done"] / b["of"] if b["of"] else 0.0
        print(f"  embeddings {name}: {b['done']}/{b['of']} done ({pct:.0f}%), {b['failed']} failed, "
              f"dim {b['feature_dim']}, weights {b['weights']}")
    print(f"  results: {', '.join(info['results']) or 'none'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    paths = run_demo(
        out_dir=args.out, backbones=_split(args.backbones), image_size=args.image_size, count=args.count,
        n_seed=args.n_seed, seed=args.seed, batch_size=args.batch_size, workers=args.workers,
        weights_dir=args.weights_dir, device=args.device, progress=not args.quiet,
    )
    print(f"\nreport: {paths['report']}")
    return 0


# --------------------------------------------------------------------------- parser


def _split(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        value = ",".join(value)
    return [v.strip() for v in str(value).split(",") if v.strip()]


def _print_summary(stage: str, summary: dict) -> None:
    parts = ", ".join(f"{k}={v}" for k, v in summary.items())
    print(f"{stage}: {parts}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swsa",
        description="Selection With Synthetic Anomalies: choose anomaly detectors without labelled validation data.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name, func, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        return p

    p = add("demo", cmd_demo, "run the whole SWSA loop on scikit-learn's digits and write a report")
    p.add_argument("--out", default="swsa-demo", help="output folder (store, images, report); default: swsa-demo")
    p.add_argument("--backbones", default=",".join(DEMO_BACKBONES), help="comma-separated candidate backbones")
    p.add_argument("--image-size", type=int, default=64, help="render size of the digits and model input size (default 64)")
    p.add_argument("--count", type=int, default=50, help="CutPaste anomalies per task and variant (paper: 100; default 50)")
    p.add_argument("--n-seed", type=int, default=20, help="seed images per task (default 20)")
    p.add_argument("--seed", type=int, default=0, help="base seed (split and generators)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--weights-dir", default=None, help="folder with pretrained weights (else: caches, else random init)")
    p.add_argument("--device", default="cpu")

    p = add("catalog", cmd_catalog, "catalog a dataset into a store and build its tasks")
    p.add_argument("dataset", help="registered dataset: digits, folder, ...")
    p.add_argument("--store", required=True, help="the HDF5 store (created if missing)")
    p.add_argument("--root", help="dataset root folder (folder: root/<class>/... or root/{train,test}/<class>/...)")
    p.add_argument("--name", help="dataset name in the store (folder datasets; default: the root's name)")
    p.add_argument("--image-dir", help="digits: where to render the PNGs (default: <store>.files/digits)")
    p.add_argument("--image-size", type=int, default=64, help="digits: render size (default 64)")
    p.add_argument("--test-fraction", type=float, default=0.5, help="test share when a dataset has no split (default 0.5)")
    p.add_argument("--n-seed", type=int, default=20, help="seed images per task (default 20, the paper's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/test and seed/held-out splits")

    p = add("synth", cmd_synth, "make each task's synthetic anomalies from its seed images")
    p.add_argument("--store", required=True)
    p.add_argument("--method", default="cutpaste", help="registered generator (default cutpaste)")
    p.add_argument("--variant", help="generator variant, e.g. cutpaste: normal | scar")
    p.add_argument("--count", type=int, default=100, help="anomalies per task (paper: 100; Flowers 25)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source", help="name of this validation source in reports (default: method[-variant])")

    p = add("embed", cmd_embed, "embed every catalogued image with a backbone (resumable)")
    p.add_argument("--store", required=True)
    p.add_argument("--backbone", required=True, help="registered backbone(s), comma-separated, or timm/<name>")
    p.add_argument("--weights", default=None,
                   help="weights file or folder, 'random' for random init (loudly), default: search the documented order")
    p.add_argument("--weights-dir", default=None, help="folder searched for <backbone>.safetensors|.pth (or SWSA_WEIGHTS_DIR)")
    p.add_argument("--allow-download", action="store_true", help="allow downloading weights (offline by default)")
    p.add_argument("--image-size", type=int, default=None, help="override the model's input resolution")
    p.add_argument("--name", help="name of the embedding matrix (default: the backbone name)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")

    p = add("score", cmd_score, "compute the AUROC cube for all tasks, candidates and sources")
    p.add_argument("--store", required=True)
    p.add_argument("--backbones", help="comma-separated candidates (default: every embedding in the store)")
    p.add_argument("--k", type=int, default=3, help="neighbours in the kNN score (default 3, the paper's)")
    p.add_argument("--hardest", default="10,5", help="also validate on the N hardest synthetic anomalies (default 10,5)")
    p.add_argument("--device", default="cpu")

    p = add("report", cmd_report, "write Markdown/CSV/JSON tables and figures from the scored store")
    p.add_argument("--store", required=True)
    p.add_argument("--out", required=True, help="report folder")

    p = add("info", cmd_info, "show what a store holds: datasets, tasks, backbones and their completeness")
    p.add_argument("--store", required=True)
    p.add_argument("--json", action="store_true", help="print JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("swsa: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # one line for the user; --debug for the traceback
        if args.debug:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"swsa: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
