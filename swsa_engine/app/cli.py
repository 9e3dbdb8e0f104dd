"""The ``swsa`` command line: demo, catalog, synth, embed, embed-text, score, report, info, bench,
import-scores, export-validation, split-refs.

Every subcommand has ``--help``. Errors print one line (``swsa: error: ...``) and exit with a
non-zero status; ``--debug`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("swsa")

#: Official layouts read by `swsa catalog <dataset> --root PATH` (see swsa_store.datasets.paper).
PAPER_LAYOUTS = {
    "cub": "CUB_200_2011/ with images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, images/",
    "flowers": "a folder with jpg/, imagelabels.mat, setid.mat",
    "mvtec": "a folder of <category>/train/good, <category>/test/<defect>, <category>/ground_truth",
    "visa": "a folder with split_csv/1cls.csv and <object>/Data, <object>/image_anno.csv",
    "tinyimagenet": "tiny-imagenet-200/ with wnids.txt, words.txt, train/, val/val_annotations.txt",
}


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
    elif args.dataset in PAPER_LAYOUTS:
        if not args.root:
            raise ValueError(f"`swsa catalog {args.dataset}` needs --root PATH ({PAPER_LAYOUTS[args.dataset]})")
        kwargs = {"root": args.root, "name": args.name}
        if args.dataset == "flowers":
            kwargs["validation"] = args.validation
        if args.dataset == "visa":
            kwargs["multi_defect"] = args.multi_defect
    elif args.dataset == "elpv":  # read in place from the elpv-dataset package unless --root says otherwise
        kwargs = {"root": args.root, "anomalies": args.elpv_anomalies, "test_fraction": args.test_fraction,
                  "seed": args.seed, "n_support": args.support, "n_test_normal": args.test_normals,
                  "n_anomaly": args.anomalies}
    else:
        if args.root:
            kwargs["root"] = args.root
    summary = catalog_dataset(args.store, args.dataset, n_seed=args.n_seed, split_seed=args.seed, **kwargs)
    _print_summary("catalog", summary)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from swsa_store.synthesize import synthesize

    if args.count is None and args.method == "auxiliary":
        args.count = 100
    if args.method == "auxiliary":
        from swsa_store.auxiliary import sample_auxiliary

        if not args.root:
            raise ValueError("`swsa synth --method auxiliary` needs --root PATH (Tiny-ImageNet or any image folder)")
        if args.ray is not None:
            raise ValueError("--ray does not apply to --method auxiliary (it samples files, computes nothing); drop --ray")
        summary = sample_auxiliary(args.store, args.root, count=args.count, seed=args.seed, source=args.source)
        _print_summary("synth", summary)
        return 0
    kwargs = {}
    if args.variant:
        kwargs["variant"] = args.variant
    if getattr(args, "texture_dir", None):
        kwargs["texture_dir"] = args.texture_dir
    for name in ("model", "steps", "gamma", "t_edit", "interpolation", "t_boost", "device", "batch_size"):
        if getattr(args, name) is not None:  # only what was given, so other generators keep their defaults
            kwargs[name] = getattr(args, name)
    run = synthesize
    if args.ray is not None:  # the same synthesis on a Ray cluster; the driver still writes the store
        from swsa_store.distributed import synthesize_ray

        kwargs.update(_ray_kwargs(args))
        run = synthesize_ray
    summary = run(args.store, args.method, count=args.count, seed=args.seed, source=args.source,
                  progress=not args.quiet, **kwargs)
    _print_summary("synth", summary)
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from swsa_store.ingest import embed_store
    from swsa_store.models.preprocessing import parse_preprocess

    preprocess = parse_preprocess(args.preprocess) if args.preprocess else None  # a bad override: one-line error
    embed = embed_store
    if args.ray is not None:  # the same ingest on a Ray cluster; the driver still writes the store
        import functools

        from swsa_store.distributed import embed_store_ray

        embed = functools.partial(embed_store_ray, **_ray_kwargs(args))
    for backbone in _split(args.backbone):
        report = embed(
            args.store, backbone, weights=args.weights, weights_dir=args.weights_dir,
            allow_download=args.allow_download, image_size=args.image_size, name=args.name if len(_split(args.backbone)) == 1 else None,
            batch_size=args.batch_size, num_workers=args.workers, device=args.device, progress=not args.quiet,
            patch_tokens=args.patch_tokens, preprocess=preprocess,
        )
        _print_summary("embed", {
            "backbone": report.backbone, "images": report.total, "already_done": report.already_done,
            "written": report.written, "failed": report.failed,
        })
        for image_id, reason in report.failures[:10]:
            print(f"  skipped image {image_id}: {reason}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from swsa_engine.run.sweep import run_sweep

    if getattr(args, "prompts", False) or getattr(args, "bliss", False):
        return cmd_score_clip(args)
    detectors = [d.strip() for d in (args.detectors or "").split(";") if d.strip()] or None
    cube = run_sweep(args.store, backbones=_split(args.backbones) or None, k=args.k, detectors=detectors,
                     hardest=tuple(int(n) for n in _split(args.hardest)), device=args.device, progress=not args.quiet)
    _print_summary("score", {
        "tasks": len(cube.tasks), "candidates": len(cube.candidates), "sources": cube.sources,
        "skipped cells": len(cube.skips), "seconds": cube.config["seconds"],
    })
    return 0


def cmd_score_clip(args: argparse.Namespace) -> int:
    from swsa_engine.run.prompt_sweep import (
        BLISS_KS, BLISS_LAMBDAS, bliss_selection_table, prompt_selection_table, run_bliss_sweep, run_prompt_sweep,
    )
    from swsa_engine.report.summary import markdown_table, table1_display

    hardest = tuple(int(n) for n in _split(args.hardest))
    if args.prompts:
        cube = run_prompt_sweep(args.store, model=args.model, prompt_set=args.prompt_set, hardest=hardest)
        _print_summary("score prompts", {"tasks": len(cube.tasks), "candidates": len(cube.candidates),
                                         "sources": cube.sources, "seconds": cube.config["seconds"]})
        if not args.quiet:
            print(markdown_table(table1_display(prompt_selection_table(cube))))
    if args.bliss:
        lambdas = tuple(float(v) for v in _split(args.lambdas)) or BLISS_LAMBDAS
        ks = tuple(int(v) for v in _split(args.ks)) or BLISS_KS
        cube = run_bliss_sweep(args.store, model=args.model, lambdas=lambdas, ks=ks, hardest=hardest)
        _print_summary("score bliss", {"tasks": len(cube.tasks), "candidates": len(cube.candidates),
                                       "sources": cube.sources, "seconds": cube.config["seconds"]})
        if not args.quiet:
            print(markdown_table(table1_display(bliss_selection_table(cube))))
    return 0


def cmd_embed_text(args: argparse.Namespace) -> int:
    from swsa_store.models.clip import embed_text_store

    summary = embed_text_store(args.store, args.model, weights=args.weights, weights_dir=args.weights_dir,
                               allow_download=args.allow_download, device=args.device, prompt_files=args.prompts or (),
                               dictionary=not args.no_dictionary, batch_size=args.batch_size)
    _print_summary("embed-text", summary)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from swsa_store import open_store

    from swsa_engine.report.summary import write_report
    from swsa_engine.run.sweep import AurocCube

    cube = AurocCube.load(args.store)
    with open_store(args.store) as store:
        skips = store.skips()
    paths = write_report(cube, args.out, store_skips=skips, store_path=args.store, table3_tasks=args.table3_tasks,
                         figure4=args.figure4, candidate=args.candidate)
    print(f"report written: {paths['report']}")
    if args.html:
        from swsa_engine.report.html import write_html_report

        html_path = write_html_report(cube, args.store, args.html, report_dir=args.out, store_skips=skips)
        print(f"HTML report written: {html_path} ({html_path.stat().st_size / 1e6:.1f} MB)")
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
            "skips": len(skips), "skip_reasons": grouped_skip_reasons(skips),
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
                "weights": cfg.get("weights_kind"), "weights_path": cfg.get("weights_path", ""),
                "weights_sha256": cfg.get("weights_sha256", ""), "weights_package": cfg.get("weights_package", ""),
                "weights_package_version": cfg.get("weights_package_version", ""),
            }
            if name in store.patch_sets():
                pa, pdone = store.patch_attrs(name), store.patch_done_mask(name)
                per_image = int(pa["n_patches"]) * int(pa["patch_dim"]) * 2
                info["backbones"][name]["patches"] = {
                    "done": int((pdone[usable] == DONE_WRITTEN).sum()), "n_patches": int(pa["n_patches"]),
                    "patch_dim": int(pa["patch_dim"]), "grid": list(pa["grid"]), "layer": pa["layer"],
                    "dtype": "float16", "bytes_per_image": per_image, "bytes_total": per_image * len(images),
                    "bytes_per_dataset": {str(d): per_image * int(n) for d, n in images.groupby("dataset").size().items()},
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
              f"dim {b['feature_dim']}, weights {_weights_summary(b)}")
        if "patches" in b:
            pt = b["patches"]
            per_dataset = ", ".join(f"{d} {n / 2**20:.1f} MiB" for d, n in pt["bytes_per_dataset"].items())
            print(f"    patch tokens: {pt['done']}/{b['of']} done, {pt['n_patches']} x {pt['patch_dim']} float16 "
                  f"({pt['grid'][0]}x{pt['grid'][1]} grid, {pt['layer']}), {pt['bytes_per_image'] / 1024:.1f} KiB/image, "
                  f"{pt['bytes_total'] / 2**20:.1f} MiB in all ({per_dataset})")
    print(f"  results: {', '.join(info['results']) or 'none'}")
    for group in info["skip_reasons"]:
        print(f"  skipped ({group['stage']}) x{group['count']}: {group['reason']}")
    return 0


def _weights_summary(backbone: dict) -> str:
    """``kind`` and, where a file was read, its name, package and sha256 (for `swsa info`)."""
    if not backbone.get("weights_sha256"):
        return str(backbone["weights"])
    package = (f", package {backbone['weights_package']} {backbone['weights_package_version']}".rstrip()
               if backbone.get("weights_package") else "")
    return f"{backbone['weights']} ({Path(str(backbone['weights_path'])).name}{package}, sha256 {backbone['weights_sha256']})"


def grouped_skip_reasons(skips, limit: int = 20) -> list[dict]:
    """The store's recorded skips grouped by stage and reason (paths and numbers folded), most frequent
    first: ``[{"stage", "reason" (one example), "count"}]``, at most ``limit`` groups."""
    import re

    if not len(skips):
        return []
    keys = skips["reason"].astype(str).map(lambda r: re.sub(r"(/[^\s:;,]+)+|\d+", "#", r))
    table = skips.assign(key=keys).groupby(["stage", "key"], sort=False)
    groups = [{"stage": str(stage), "reason": str(rows["reason"].iloc[0]), "count": int(len(rows))}
              for (stage, _), rows in table]
    return sorted(groups, key=lambda g: -g["count"])[:limit]


def cmd_import_scores(args: argparse.Namespace) -> int:
    from swsa_store.scores import import_scores

    summary = import_scores(args.store, args.candidate, args.file, allow_missing=args.allow_missing, replace=args.replace)
    _print_summary("import-scores", summary)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from swsa_engine.app.bench import format_figures, make_paper_store, run_bench

    if args.ingest:
        import tempfile

        from swsa_engine.app.bench import bench_ingest, format_ingest

        ray_kwargs = {k: v for k, v in _ray_kwargs(args).items() if k != "address"}
        with tempfile.TemporaryDirectory(prefix="swsa-ingest-") as tmp:
            figures = bench_ingest(args.out or tmp, backbone=args.backbone, weights=args.weights,
                                   image_size=args.image_size, n_images=args.images, batch_size=args.batch_size,
                                   workers=args.workers, device=args.device, progress=not args.quiet,
                                   ray=args.ray, **ray_kwargs)
        print(format_ingest(figures))
        if args.out:
            (Path(args.out) / "ingest.json").write_text(json.dumps(figures, indent=2))
            print(f"figures written: {Path(args.out) / 'ingest.json'}")
        return 0
    if args.clip:
        from swsa_engine.run.prompt_sweep import bench_clip_rescoring

        _print_summary("bench prompts and BLISS", bench_clip_rescoring(task_fraction=args.task_fraction,
                                                                       image_fraction=args.image_fraction))
        return 0
    if args.detectors:
        from swsa_engine.app.bench import bench_detectors, format_detector_bench
        from swsa_engine.core.patch import patch_cost

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
    if args.make_store:
        summary = make_paper_store(args.make_store, task_fraction=args.task_fraction, image_fraction=args.image_fraction,
                                   progress=not args.quiet)
        _print_summary("bench store", summary)
        return 0
    figures = run_bench(args.store, task_fraction=args.task_fraction, image_fraction=args.image_fraction,
                        reference_tasks=args.reference_tasks, device=args.device, out=args.out, progress=not args.quiet)
    print(format_figures(figures))
    if args.out:
        print(f"figures written: {Path(args.out) / 'bench.json'}")
    return 0


def cmd_export_validation(args: argparse.Namespace) -> int:
    from swsa_store.export import export_validation

    summary = export_validation(args.store, args.out, format=args.format, tasks=_split(args.tasks) or None,
                                train=args.train, include_test=not args.no_test, link=not args.copy)
    _print_summary("export-validation", summary)
    return 0


def cmd_split_refs(args: argparse.Namespace) -> int:
    from swsa_store.references import split_references

    table = split_references(args.store, args.source, args.share, seed=args.seed)
    _print_summary("split-refs", {"source": args.source, "share": args.share, "seed": args.seed,
                                  "references": len(table), "tasks": int(table["task_id"].nunique())})
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from swsa_engine.app.demo import run_demo

    sizes = {"n_support": args.support, "n_test_normal": args.test_normals, "n_anomaly": args.anomalies}
    paths = run_demo(
        out_dir=args.out, backbones=_split(args.backbones) or None, dataset=args.dataset, image_size=args.image_size,
        count=args.count, n_seed=args.n_seed, seed=args.seed, full=args.full, sizes=sizes, batch_size=args.batch_size,
        workers=args.workers, weights_dir=args.weights_dir, device=args.device, progress=not args.quiet,
        detectors=[d.strip() for d in (args.detectors or "").split(";") if d.strip()] or None,
        diffusion_model=args.diffusion_model,
    )
    print(f"\nreport: {paths['report']}")
    if "html" in paths:
        print(f"HTML report: {paths['html']}")
    return 0


# --------------------------------------------------------------------------- parser


def _split(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        value = ",".join(value)
    return [v.strip() for v in str(value).split(",") if v.strip()]


def _ray_kwargs(args: argparse.Namespace) -> dict:
    """The scale-out options of `embed`/`synth` as keyword arguments of swsa_store.distributed."""
    return {"address": None if args.ray == "local" else args.ray, "actors_per_gpu": args.actors_per_gpu,
            "num_actors": args.actors, "read_on": args.read_on, "cpu_threads": args.cpu_threads}


def _add_ray_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scale-out on Ray (pip install 'swsa[distributed]'; the driver stays the store's only writer)")
    g.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run on Ray: 'auto' (the cluster this machine belongs to), a cluster address (host:port or "
                        "ray://host:10001), or nothing for a local Ray instance")
    g.add_argument("--actors-per-gpu", dest="actors_per_gpu", type=int, default=1,
                   help="model actors per GPU (each reserves 1/N of a GPU; default 1)")
    g.add_argument("--actors", type=int, default=None,
                   help="number of model actors (default: GPUs x actors per GPU; without GPUs half the cluster's CPUs)")
    g.add_argument("--read-on", dest="read_on", choices=("driver", "any"), default="driver",
                   help="where images are read: on the driver's node (default; no shared file system needed) or on "
                        "any node (every node sees the catalog's paths)")
    g.add_argument("--cpu-threads", dest="cpu_threads", type=int, default=None,
                   help="threads of CPU actors (default: Ray's, 1 per actor); the local path's thread count gives its bytes")


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
    # in the order `swsa --help` lists them
    for add_command in (_add_demo_command, _add_catalog_command, _add_synth_command, _add_embed_command,
                        _add_score_command, _add_embed_text_command, _add_report_command, _add_import_scores_command,
                        _add_bench_command, _add_split_refs_command, _add_info_command, _add_export_validation_command):
        add_command(sub)
    return parser


def _add_command(sub: argparse._SubParsersAction, name: str, func, help_text: str) -> argparse.ArgumentParser:
    """A subcommand running ``func(args)``, with the --quiet every command takes."""
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.set_defaults(func=func)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _add_store_option(p: argparse.ArgumentParser, help: str | None = None) -> None:
    p.add_argument("--store", required=True, help=help)


def _add_device_option(p: argparse.ArgumentParser | argparse._ArgumentGroup, default: str | None = "cpu",
                       help: str | None = None) -> None:
    p.add_argument("--device", default=default, help=help)


def _add_loader_options(p: argparse.ArgumentParser) -> None:
    """--batch-size and --workers of the local embedding DataLoader (demo, embed)."""
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")


def _add_weights_options(p: argparse.ArgumentParser, weights_help: str, weights_dir_help: str) -> None:
    """Where a model's weights come from (embed, embed-text)."""
    p.add_argument("--weights", default=None, help=weights_help)
    p.add_argument("--weights-dir", default=None, help=weights_dir_help)
    p.add_argument("--allow-download", action="store_true", help="allow downloading weights (offline by default)")


def _add_demo_command(sub: argparse._SubParsersAction) -> None:
    from swsa_engine.app.demo import DEMO_DATASETS, ELPV_COUNT, ELPV_SIZES

    p = _add_command(sub, "demo", cmd_demo, "run the whole SWSA loop on real data (ELPV solar cells with ImageNet-trained "
                     "EfficientNet-Lites; --dataset digits for the quick one) and write a report")
    p.add_argument("--dataset", default="elpv", choices=DEMO_DATASETS,
                   help="elpv (default: real solar-cell images, pretrained weights) or digits (quick, 8x8 digits)")
    p.add_argument("--out", default="swsa-demo", help="output folder (store, images, report); default: swsa-demo")
    p.add_argument("--backbones", default=None,
                   help="comma-separated candidate feature sources (default elpv: pixels, pixels@32, efficientnet_lite0,1,2; "
                        "digits: pixels, resnet18, resnet34, resnet50, vit_b_32)")
    p.add_argument("--detectors", default=None,
                   help="detectors applied to every feature source, ';'-separated (default elpv: knn; knn(k=5,cosine); "
                        "mahalanobis; residual(K=4,mean); pca(n=8); digits: knn; mahalanobis; pca(n=8))")
    p.add_argument("--image-size", type=int, default=None,
                   help="model input size (default: each model's own for elpv; 64 for digits, also their render size)")
    p.add_argument("--count", type=int, default=None,
                   help=f"synthetic anomalies per task and generator (paper: 100; default elpv {ELPV_COUNT}, digits 50)")
    p.add_argument("--n-seed", type=int, default=20, help="seed images per task (default 20)")
    p.add_argument("--seed", type=int, default=0, help="base seed (split and generators)")
    g = p.add_argument_group("ELPV sizes, per cell type (a seeded subset; --full uses every image)")
    g.add_argument("--support", type=int, default=None, help=f"support images (default {ELPV_SIZES['n_support']})")
    g.add_argument("--test-normals", type=int, default=None,
                   help=f"defect-free test images (default {ELPV_SIZES['n_test_normal']})")
    g.add_argument("--anomalies", type=int, default=None,
                   help=f"defective test images per probability bucket (default {ELPV_SIZES['n_anomaly']})")
    g.add_argument("--full", action="store_true", help="every image of the dataset (about 40 minutes on 2 CPU cores)")
    p.add_argument("--diffusion-model", default=None,
                   help="DiffStyle anomalies too, with this diffusion model (file or folder; or $SWSA_DIFFUSION_MODEL)")
    _add_loader_options(p)
    p.add_argument("--weights-dir", default=None, help="folder with pretrained weights (else: installed packages, caches; "
                   "digits: else random init)")
    _add_device_option(p)


def _add_catalog_command(sub: argparse._SubParsersAction) -> None:
    p = _add_command(sub, "catalog", cmd_catalog, "catalog a dataset into a store and build its tasks")
    p.add_argument("dataset", help="registered dataset: elpv, digits, folder, cub, flowers, mvtec, visa, tinyimagenet, ...")
    _add_store_option(p, help="the HDF5 store (created if missing)")
    p.add_argument("--root", help="dataset root folder (folder: root/<class>/... or root/{train,test}/<class>/...)")
    p.add_argument("--name", help="dataset name in the store (folder: default the root's name; paper datasets: default "
                   "cub, flowers, mvtec, visa, tinyimagenet)")
    p.add_argument("--validation", default="valid", choices=("valid", "tstid", "valid+tstid"),
                   help="flowers: setid.mat set(s) used as real validation (default valid, the paper's validation subset)")
    p.add_argument("--multi-defect", default="multiple", choices=("multiple", "combined", "first"),
                   help="visa: group of an image listing several defects (default: one group 'multiple' per product)")
    p.add_argument("--image-dir", help="digits: where to render the PNGs (default: <store>.files/digits)")
    p.add_argument("--image-size", type=int, default=64, help="digits: render size (default 64)")
    p.add_argument("--test-fraction", type=float, default=0.5, help="test share when a dataset has no split (default 0.5)")
    g = p.add_argument_group("elpv (solar cells from the elpv-dataset package; CC BY-NC-SA 4.0)")
    g.add_argument("--elpv-anomalies", default="1", choices=("1", "2/3"),
                   help="defect probabilities that are anomalies in one-vs-rest: 1 (default) or 2/3 (2/3 and 1)")
    g.add_argument("--support", type=int, default=None, help="support images per cell type (default: all train normals)")
    g.add_argument("--test-normals", type=int, default=None, help="defect-free test images per cell type (default all)")
    g.add_argument("--anomalies", type=int, default=None, help="defective images per cell type and bucket (default all)")
    p.add_argument("--n-seed", type=int, default=20, help="seed images per task (default 20, the paper's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/test and seed/held-out splits")


def _add_synth_command(sub: argparse._SubParsersAction) -> None:
    p = _add_command(sub, "synth", cmd_synth, "make each task's synthetic anomalies from its seed images")
    _add_store_option(p)
    p.add_argument("--method", default="cutpaste", help="registered generator (default cutpaste)")
    p.add_argument("--variant", help="generator variant, e.g. cutpaste: normal | scar")
    p.add_argument("--texture-dir", help="--method perlin: folder of texture images (e.g. DTD's images/); "
                   "default: a shuffled, colour-jittered copy of each seed image")
    p.add_argument("--count", type=int, default=None,
                   help="anomalies per task (default 100, the paper's; Flowers 25; diffusion: every style x content pair)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source", help="name of this validation source in reports (default: method[-variant]; "
                   "auxiliary: tinyimagenet or auxiliary)")
    p.add_argument("--root", help="--method auxiliary: Tiny-ImageNet root or any image folder to sample outliers from "
                   "(--count per task; Flowers tasks 25, as in the paper)")
    _add_diffusion_options(p)
    _add_ray_options(p)


def _add_diffusion_options(p: argparse.ArgumentParser) -> None:
    # no defaults here: cmd_synth passes only what was given, so each generator keeps its own
    g = p.add_argument_group("--method diffusion (DiffStyle h-space content injection)")
    g.add_argument("--model", help="256x256_diffusion_uncond.pt (local file) or a diffusers UNet2DModel directory "
                   "(default: $SWSA_DIFFUSION_MODEL)")
    g.add_argument("--steps", type=int, help="DDIM steps for inversion and for generation (default 50)")
    g.add_argument("--gamma", type=float, help="content strength of h-space interpolation (default 0.7)")
    g.add_argument("--t-edit", dest="t_edit", type=int, help="inject content only at steps t >= t_edit (default 400)")
    g.add_argument("--interpolation", choices=["linear", "slerp"], help="h-space interpolation (default linear, the paper's)")
    g.add_argument("--t-boost", dest="t_boost", type=int, help="stochastic quality boosting at steps t < t_boost (default 0: off)")
    _add_device_option(g, default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    g.add_argument("--batch-size", dest="batch_size", type=int, help="pairs per batch (default 8)")


def _add_embed_command(sub: argparse._SubParsersAction) -> None:
    p = _add_command(sub, "embed", cmd_embed, "embed every catalogued image with a backbone (resumable)")
    _add_store_option(p)
    p.add_argument("--backbone", required=True, help="registered backbone(s), comma-separated, or timm/<name>")
    _add_weights_options(
        p, weights_help="weights file or folder, 'random' for random init (loudly), default: search the documented order",
        weights_dir_help="folder searched for <backbone>.safetensors|.pth, <arch>.pth for timm/<arch>, ... "
                         "(or SWSA_WEIGHTS_DIR)")
    p.add_argument("--image-size", type=int, default=None, help="override the model's input resolution")
    p.add_argument("--preprocess", default=None, metavar="KEY=VALUE;...",
                   help="override the backbone's preprocessing (stored with the embeddings), any of "
                        "size=N;crop_pct=X;crop_mode=center|squash|border;interpolation=bicubic|bilinear|...;"
                        "mean=R,G,B;std=R,G,B, e.g. 'mean=0.5,0.5,0.5;std=0.5,0.5,0.5;crop_pct=1.0'")
    p.add_argument("--name", help="name of the embedding matrix (default: the backbone name)")
    _add_loader_options(p)
    _add_device_option(p, help="cpu, cuda, cuda:1, ... (with --ray: the actors' GPUs)")
    _add_ray_options(p)
    p.add_argument("--patch-tokens", dest="patch_tokens", action="store_true",
                   help="also store the patch tokens (ViT tokens, or a CNN's layer3 map) as float16 in "
                        "/patches/<name>, for the patch detector; costs P x D' x 2 bytes per image "
                        "(ViT-B/16 at 224: 196 x 768 x 2 = 301 KB)")


def _add_score_command(sub: argparse._SubParsersAction) -> None:
    p = _add_command(sub, "score", cmd_score, "compute the AUROC cube for all tasks, candidates and sources")
    _add_store_option(p)
    p.add_argument("--backbones", help="comma-separated candidates (default: every embedding in the store)")
    p.add_argument("--k", type=int, default=3, help="neighbours in the kNN score (default 3, the paper's)")
    p.add_argument("--detectors", help="detectors applied to every embedding, ';'-separated, e.g. "
                                       "'knn(k=3);knn(k=5,cosine);mahalanobis;residual(K=4,mean);residual(K=4,min);"
                                       "nagl(k=3,beta=1.0);pca(n=8)' (default: knn(k=K)); nagl needs `swsa split-refs`")
    p.add_argument("--hardest", default="10,5", help="also validate on the N hardest synthetic anomalies (default 10,5)")
    _add_device_option(p)
    p.add_argument("--prompts", action="store_true",
                   help="score CLIP prompts instead of kNN backbones: /results/prompt_cube (needs `swsa embed-text` "
                        "and `swsa embed --backbone clip/...`)")
    p.add_argument("--bliss", action="store_true", help="score BLISS over the lambda x K grid: /results/bliss_cube")
    p.add_argument("--model", help="--prompts/--bliss: the CLIP model (default: the only one with text embeddings)")
    p.add_argument("--prompt-set", default="paper", help="--prompts: prompt set name (default paper)")
    p.add_argument("--lambdas", default="", help="--bliss: lambda grid (default 0.1,0.25,0.5,0.75,1,2)")
    p.add_argument("--ks", default="", help="--bliss: K grid (default 1,5,10,20)")


def _add_embed_text_command(sub: argparse._SubParsersAction) -> None:
    p = _add_command(sub, "embed-text", cmd_embed_text,
                     "embed every task's CLIP prompts, the BLISS class prompts and the BLISS dictionary into the store")
    _add_store_option(p)
    p.add_argument("--model", default="clip/ViT-B-16-plus-240@laion400m_e32",
                   help="clip/<open_clip architecture>[@<pretrained tag>] (default: the paper's ViT-B-16-plus-240@laion400m_e32)")
    p.add_argument("--prompts", action="append", metavar="FILE",
                   help="extra prompt set from a TOML/JSON file (repeatable); the paper's set is always embedded")
    _add_weights_options(p, weights_help="weights file or folder, 'random' for random init (loudly)",
                         weights_dir_help="folder searched for <arch>@<tag>.pt etc. (or SWSA_WEIGHTS_DIR)")
    p.add_argument("--no-dictionary", action="store_true", help="skip the BLISS dictionary")
    p.add_argument("--batch-size", type=int, default=256)
    _add_device_option(p)


def _add_report_command(sub: argparse._SubParsersAction) -> None:
    p = _add_command(sub, "report", cmd_report, "write Markdown/CSV/JSON tables and figures from the scored store")
    _add_store_option(p)
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--table3-tasks", type=int, default=0,
                   help="add Table 3 (total variation) over this many tasks per dataset (default 0: off)")
    p.add_argument("--figure4", action="store_true", help="add Figure 4 (t-SNE of one task per dataset)")
    p.add_argument("--candidate", help="embedding used by Table 3 and Figure 4 (default vit_b_16, else the first)")
    p.add_argument("--html", metavar="PATH", help="also write one self-contained HTML report (opens offline in a browser)")


def _add_import_scores_command(sub: argparse._SubParsersAction) -> None:
    p = _add_command(sub, "import-scores", cmd_import_scores,
                     "import anomaly scores computed by any tool (CSV/Parquet: task, image_id or path, score) as a candidate")
    _add_store_option(p)
    p.add_argument("--candidate", required=True, help="name of the candidate in tables and figures")
    p.add_argument("file", help="CSV or Parquet file with columns task (or task_id), image_id (or path), score")
    p.add_argument("--allow-missing", action="store_true",
                   help="skip (and record) tasks whose validation images are not all scored, instead of failing")
    p.add_argument("--replace", action="store_true", help="overwrite imported scores of the same name")


def _add_bench_command(sub: argparse._SubParsersAction) -> None:
    p = _add_command(sub, "bench", cmd_bench,
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
    p.add_argument("--detector-fraction", type=float, default=0.1,
                   help="--detectors: share of each dataset's tasks timed, extrapolated to all (default 0.1)")
    p.add_argument("--out", default=None, help="folder for bench.json and table1.csv (detectors.csv with --detectors)")
    _add_device_option(p)
    _add_bench_ingest_options(p)
    _add_ray_options(p)


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
    g.add_argument("--workers", type=int, default=0, help="--ingest: DataLoader workers of the local path (default 0)")


def _add_split_refs_command(sub: argparse._SubParsersAction) -> None:
    p = _add_command(sub, "split-refs", cmd_split_refs,
                     "hold a seeded share of each task's synthetic anomalies of one source apart as abnormal references "
                     "(for the nagl detector); they leave the synthetic validation set of every candidate")
    _add_store_option(p)
    p.add_argument("--source", required=True, help="synthetic source (image kind), e.g. cutpaste")
    p.add_argument("--share", type=float, required=True,
                   help="share of each task's anomalies of --source used as references, in (0, 1), e.g. 0.25")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-image hash that picks references (default 0)")


def _add_info_command(sub: argparse._SubParsersAction) -> None:
    p = _add_command(sub, "info", cmd_info, "show what a store holds: datasets, tasks, backbones and their completeness")
    _add_store_option(p)
    p.add_argument("--json", action="store_true", help="print JSON")


def _add_export_validation_command(sub: argparse._SubParsersAction) -> None:
    p = _add_command(sub, "export-validation", cmd_export_validation,
                     "export each task's validation set (support, held-out normals, synthetic anomalies) as folders "
                     "anomalib's Folder datamodule reads: <task>/train/good, <task>/val/good, <task>/val/<generator>")
    p.add_argument("out", help="output folder (one sub-folder per task, plus manifest.csv)")
    _add_store_option(p)
    p.add_argument("--format", default="anomalib-folder", help="layout: anomalib-folder (the default and only one for now)")
    p.add_argument("--tasks", help="comma-separated task ids or task folder names (default: every task that is not skipped)")
    p.add_argument("--train", default="disjoint",
                   help="train/good = the support images not held out (default; no validation normal is a training "
                        "image) or the whole support set (as swsa's kNN bank)")
    p.add_argument("--no-test", action="store_true", help="leave out the real test images (test/good, test/<group>)")
    p.add_argument("--copy", action="store_true", help="copy the files instead of hard-linking them")


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
