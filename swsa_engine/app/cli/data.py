"""``swsa`` data commands: catalog, synth, embed, embed-text, import-scores, export-validation and
split-refs — each one call of a :mod:`swsa_store` function that writes the store."""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

from swsa_store.auxiliary import sample_auxiliary
from swsa_store.catalog import catalog_dataset
from swsa_store.distributed import embed_store_ray, synthesize_ray
from swsa_store.export import export_validation
from swsa_store.ingest import embed_store
from swsa_store.models.clip import embed_text_store
from swsa_store.models.preprocessing import parse_preprocess
from swsa_store.references import split_references
from swsa_store.scores import import_scores
from swsa_store.synth import list_generators
from swsa_store.synthesize import synthesize

from swsa_engine.app.cli.common import (add_command, add_device_option, add_loader_options, add_ray_options,
                                        add_store_option, add_weights_options, print_summary, ray_kwargs, split_list,
                                        task_id_list)

__all__ = [
    "PAPER_LAYOUTS", "cmd_catalog", "cmd_synth", "cmd_embed", "cmd_embed_text", "cmd_import_scores",
    "cmd_export_validation", "cmd_split_refs", "add_catalog_command", "add_synth_command", "add_embed_command",
    "add_embed_text_command", "add_import_scores_command", "add_split_refs_command", "add_export_validation_command",
]

#: Official layouts read by `swsa catalog <dataset> --root PATH` (see swsa_store.datasets: one module per dataset).
PAPER_LAYOUTS = {
    "cub": "CUB_200_2011/ with images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, images/",
    "flowers": "a folder with jpg/, imagelabels.mat, setid.mat",
    "mvtec": "a folder of <category>/train/good, <category>/test/<defect>, <category>/ground_truth",
    "visa": "a folder with split_csv/1cls.csv and <object>/Data, <object>/image_anno.csv",
    "tinyimagenet": "tiny-imagenet-200/ with wnids.txt, words.txt, train/, val/val_annotations.txt",
}


def cmd_catalog(args: argparse.Namespace) -> int:
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
    print_summary("catalog", summary)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    task_ids = task_id_list(args.tasks)
    if args.count is None and args.method == "auxiliary":
        args.count = 100
    if args.method == "auxiliary":
        if not args.root:
            raise ValueError("`swsa synth --method auxiliary` needs --root PATH (Tiny-ImageNet or any image folder)")
        if args.ray is not None:
            raise ValueError("--ray does not apply to --method auxiliary (it samples files, computes nothing); drop --ray")
        summary = sample_auxiliary(args.store, args.root, count=args.count, seed=args.seed, source=args.source,
                                   task_ids=task_ids)
        print_summary("synth", summary)
        print(synth_summary_words(summary))
        return 0
    kwargs = {}
    if args.variant:
        kwargs["variant"] = args.variant
    if getattr(args, "texture_dir", None):
        kwargs["texture_dir"] = args.texture_dir
    for name in ("model", "adm_config", "steps", "gamma", "t_edit", "interpolation", "t_boost", "device", "batch_size"):
        if getattr(args, name) is not None:  # only what was given, so other generators keep their defaults
            kwargs[name] = getattr(args, name)
    run = synthesize
    if args.ray is not None:  # the same synthesis on a Ray cluster; the driver still writes the store
        kwargs.update(ray_kwargs(args))
        run = synthesize_ray
    summary = run(args.store, args.method, count=args.count, seed=args.seed, source=args.source,
                  task_ids=task_ids, progress=not args.quiet, **kwargs)
    print_summary("synth", summary)
    print(synth_summary_words(summary))
    return 0


def synth_summary_words(summary: dict) -> str:
    """:func:`~swsa_store.synthesize.synthesize`'s summary in words, below its ``key=value`` line
    (whose keys, ``tasks_skipped`` among them, stay as they are for scripts that read them):
    what was made, which tasks were skipped and why, which images were left out and why."""
    source, done, skipped = summary["source"], int(summary["tasks_done"]), int(summary["tasks_skipped"])
    words = [f"  made {summary['images']} new {source} image(s) for {done} task(s)"]
    if skipped:
        words.append(f"{skipped} task(s) skipped because they already hold all their {source} images "
                     "from an earlier run (nothing left to make; use another --source for a new set)")
    else:
        words.append("no task skipped")
    left_out = int(summary.get("skipped_images", 0))
    if left_out:
        words.append(f"{left_out} image(s) catalogued as skipped: no visible change from the parent after every "
                     "redraw (reasons in the store's skips table)")
    return "; ".join(words)


def cmd_embed(args: argparse.Namespace) -> int:
    preprocess = parse_preprocess(args.preprocess) if args.preprocess else None  # a bad override: one-line error
    embed = embed_store
    if args.ray is not None:  # the same ingest on a Ray cluster; the driver still writes the store
        embed = functools.partial(embed_store_ray, **ray_kwargs(args))
    for backbone in split_list(args.backbone):
        report = embed(
            args.store, backbone, weights=args.weights, weights_dir=args.weights_dir,
            allow_download=args.allow_download, image_size=args.image_size, name=args.name if len(split_list(args.backbone)) == 1 else None,
            batch_size=args.batch_size, num_workers=args.workers, device=args.device, progress=not args.quiet,
            patch_tokens=args.patch_tokens, preprocess=preprocess,
        )
        print_summary("embed", {
            "backbone": report.backbone, "images": report.total, "already_done": report.already_done,
            "written": report.written, "failed": report.failed,
        })
        for image_id, reason in report.failures[:10]:
            print(f"  skipped image {image_id}: {reason}")
    return 0


def cmd_embed_text(args: argparse.Namespace) -> int:
    summary = embed_text_store(args.store, args.model, weights=args.weights, weights_dir=args.weights_dir,
                               allow_download=args.allow_download, device=args.device, prompt_files=args.prompts or (),
                               dictionary=not args.no_dictionary, batch_size=args.batch_size)
    print_summary("embed-text", summary)
    return 0


def cmd_import_scores(args: argparse.Namespace) -> int:
    summary = import_scores(args.store, args.candidate, args.file, allow_missing=args.allow_missing, replace=args.replace)
    print_summary("import-scores", summary)
    return 0


def cmd_export_validation(args: argparse.Namespace) -> int:
    summary = export_validation(args.store, args.out, format=args.format, tasks=split_list(args.tasks) or None,
                                train=args.train, include_test=not args.no_test, link=not args.copy)
    print_summary("export-validation", summary)
    return 0


def cmd_split_refs(args: argparse.Namespace) -> int:
    table = split_references(args.store, args.source, args.share, seed=args.seed)
    print_summary("split-refs", {"source": args.source, "share": args.share, "seed": args.seed,
                                 "references": len(table), "tasks": int(table["task_id"].nunique())})
    return 0


def add_catalog_command(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "catalog", cmd_catalog, "catalog a dataset into a store and build its tasks")
    p.add_argument("dataset", help="registered dataset: elpv, digits, folder, cub, flowers, mvtec, visa, tinyimagenet, ...")
    add_store_option(p, help="the HDF5 store (created if missing)")
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


def add_synth_command(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "synth", cmd_synth, "make each task's synthetic anomalies from its seed images")
    add_store_option(p)
    p.add_argument("--method", default="cutpaste",
                   help=f"registered generator: {', '.join(list_generators())} (default cutpaste); or auxiliary: real "
                        "outlier images sampled from --root (the paper's Tiny-ImageNet baseline), catalogued as a source")
    p.add_argument("--variant", help="generator variant, e.g. cutpaste: normal | scar")
    p.add_argument("--texture-dir", help="--method perlin: folder of texture images (e.g. DTD's images/); "
                   "default: a shuffled, colour-jittered copy of each seed image")
    p.add_argument("--count", type=int, default=None,
                   help="anomalies per task (default 100, the paper's; Flowers 25; diffusion: every style x content pair)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", help="comma-separated task ids to synthesize for, e.g. 0,3 (default: every task that "
                   "is not skipped; see `swsa info`)")
    p.add_argument("--source", help="name of this validation source in reports, letters, digits and _ . @ - "
                   "(default: method[-variant]; auxiliary: tinyimagenet or auxiliary)")
    p.add_argument("--root", help="--method auxiliary: Tiny-ImageNet root or any image folder to sample outliers from "
                   "(--count per task; Flowers tasks 25, as in the paper)")
    _add_diffusion_options(p)
    add_ray_options(p)


def _add_diffusion_options(p: argparse.ArgumentParser) -> None:
    # no defaults here: cmd_synth passes only what was given, so each generator keeps its own
    g = p.add_argument_group("--method diffusion (DiffStyle h-space content injection)")
    g.add_argument("--model", help="256x256_diffusion_uncond.pt (local file) or a diffusers UNet2DModel directory "
                   "(default: $SWSA_DIFFUSION_MODEL)")
    g.add_argument("--adm-config", dest="adm_config", metavar="JSON|FILE",
                   help="ADM configuration of a plain state-dict .pt model: a JSON object or a .json/.toml file of "
                        "guided-diffusion's UNet settings, e.g. '{\"model_channels\": 128}' (default: the paper's "
                        "256x256 unconditional model)")
    g.add_argument("--steps", type=int, help="DDIM steps for inversion and for generation (default 50)")
    g.add_argument("--gamma", type=float, help="content strength of h-space interpolation (default 0.7)")
    g.add_argument("--t-edit", dest="t_edit", type=int, help="inject content only at steps t >= t_edit (default 400)")
    g.add_argument("--interpolation", choices=["linear", "slerp"], help="h-space interpolation (default linear, the paper's)")
    g.add_argument("--t-boost", dest="t_boost", type=int, help="stochastic quality boosting at steps t < t_boost (default 0: off)")
    add_device_option(g, default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    g.add_argument("--batch-size", dest="batch_size", type=int, help="pairs per batch (default 8)")


def add_embed_command(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "embed", cmd_embed, "embed every catalogued image with a backbone (resumable)")
    add_store_option(p)
    p.add_argument("--backbone", required=True, help="registered backbone(s), comma-separated, or timm/<name>")
    add_weights_options(
        p, weights_help="weights file or folder, 'random' for random init (loudly), default: search the documented order",
        weights_dir_help="folder searched for <backbone>.safetensors|.pth, <arch>.pth for timm/<arch>, ... "
                         "(or SWSA_WEIGHTS_DIR)")
    p.add_argument("--image-size", type=int, default=None, help="override the model's input resolution")
    p.add_argument("--preprocess", default=None, metavar="KEY=VALUE;...",
                   help="override the backbone's preprocessing (stored with the embeddings), any of "
                        "size=N;crop_pct=X;crop_mode=center|squash|border;interpolation=bicubic|bilinear|...;"
                        "mean=R,G,B;std=R,G,B, e.g. 'mean=0.5,0.5,0.5;std=0.5,0.5,0.5;crop_pct=1.0'")
    p.add_argument("--name", help="name of the embedding matrix (default: the backbone name)")
    add_loader_options(p)
    add_device_option(p, help="cpu, cuda, cuda:1, ... (with --ray: the actors' GPUs)")
    add_ray_options(p)
    p.add_argument("--patch-tokens", dest="patch_tokens", action="store_true",
                   help="also store the patch tokens (ViT tokens, or a CNN's layer3 map) as float16 in "
                        "/patches/<name>, for the patch detector; costs P x D' x 2 bytes per image "
                        "(ViT-B/16 at 224: 196 x 768 x 2 = 301 KB)")


def add_embed_text_command(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "embed-text", cmd_embed_text,
                    "embed every task's CLIP prompts, the BLISS class prompts and the BLISS dictionary into the store")
    add_store_option(p)
    p.add_argument("--model", default="clip/ViT-B-16-plus-240@laion400m_e32",
                   help="clip/<open_clip architecture>[@<pretrained tag>] (default: the paper's ViT-B-16-plus-240@laion400m_e32)")
    p.add_argument("--prompts", action="append", metavar="FILE",
                   help="extra prompt set from a TOML/JSON file (repeatable); the paper's set is always embedded")
    add_weights_options(p, weights_help="weights file or folder, 'random' for random init (loudly)",
                        weights_dir_help="folder searched for <arch>@<tag>.pt etc. (or SWSA_WEIGHTS_DIR)")
    p.add_argument("--no-dictionary", action="store_true", help="skip the BLISS dictionary")
    p.add_argument("--batch-size", type=int, default=256)
    add_device_option(p)


def add_import_scores_command(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "import-scores", cmd_import_scores,
                    "import anomaly scores computed by any tool (CSV/Parquet: task, image_id or path, score) as a candidate")
    add_store_option(p)
    p.add_argument("--candidate", required=True, help="name of the candidate in tables and figures")
    p.add_argument("file", help="CSV or Parquet file with columns task (or task_id), image_id (or path), score")
    p.add_argument("--allow-missing", action="store_true",
                   help="skip (and record) tasks whose validation images are not all scored, instead of failing")
    p.add_argument("--replace", action="store_true", help="overwrite imported scores of the same name")


def add_split_refs_command(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "split-refs", cmd_split_refs,
                    "hold a seeded share of each task's synthetic anomalies of one source apart as abnormal references "
                    "(for the nagl detector); they leave the synthetic validation set of every candidate")
    add_store_option(p)
    p.add_argument("--source", required=True, help="synthetic source (image kind), e.g. cutpaste")
    p.add_argument("--share", type=float, required=True,
                   help="share of each task's anomalies of --source used as references, in (0, 1), e.g. 0.25")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-image hash that picks references (default 0)")


def add_export_validation_command(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "export-validation", cmd_export_validation,
                    "export each task's validation set (support, held-out normals, synthetic anomalies) as folders "
                    "anomalib's Folder datamodule reads: <task>/train/good, <task>/val/good, <task>/val/<generator>")
    p.add_argument("out", help="output folder (one sub-folder per task, plus manifest.csv)")
    add_store_option(p)
    p.add_argument("--format", default="anomalib-folder", help="layout: anomalib-folder (the default and only one for now)")
    p.add_argument("--tasks", help="comma-separated task ids or task folder names (default: every task that is not skipped)")
    p.add_argument("--train", default="disjoint",
                   help="train/good = the support images not held out (default; no validation normal is a training "
                        "image) or the whole support set (as swsa's kNN bank)")
    p.add_argument("--no-test", action="store_true", help="leave out the real test images (test/good, test/<group>)")
    p.add_argument("--copy", action="store_true", help="copy the files instead of hard-linking them")
