"""``swsa demo``: the whole SWSA loop on real data (or the quick digits one) into one folder
(see :mod:`swsa_engine.app.demo`)."""

from __future__ import annotations

import argparse

from swsa_engine.app.cli.common import add_command, add_device_option, add_loader_options, split_list
from swsa_engine.app.demo import DEMO_DATASETS, ELPV_COUNT, ELPV_SIZES, run_demo
from swsa_engine.core.metric_cube import DEFAULT_METRIC, METRICS
from swsa_engine.core.protocol import DEFAULT_PROTOCOL, PAPER, PROTOCOLS

__all__ = ["cmd_demo", "add_demo_command"]


def cmd_demo(args: argparse.Namespace) -> int:
    sizes = {"n_support": args.support, "n_test_normal": args.test_normals, "n_anomaly": args.anomalies}
    paths = run_demo(
        out_dir=args.out, backbones=split_list(args.backbones) or None, dataset=args.dataset, image_size=args.image_size,
        count=args.count, n_seed=args.n_seed, seed=args.seed, full=args.full, sizes=sizes, batch_size=args.batch_size,
        workers=args.workers, weights_dir=args.weights_dir, device=args.device, progress=not args.quiet,
        detectors=[d.strip() for d in (args.detectors or "").split(";") if d.strip()] or None,
        diffusion_model=args.diffusion_model, protocol=args.protocol, metric=args.metric,
    )
    print(f"\nreport: {paths['report']}")
    if "html" in paths:
        print(f"HTML report: {paths['html']}")
    return 0


def add_demo_command(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "demo", cmd_demo, "run the whole SWSA loop on real data (ELPV solar cells with ImageNet-trained "
                    "EfficientNet-Lites; --dataset digits for the quick one) and write a report")
    p.add_argument("--dataset", default="elpv", choices=DEMO_DATASETS,
                   help="elpv (default: real solar-cell images, pretrained weights) or digits (quick, 8x8 digits)")
    p.add_argument("--out", default="swsa-demo", help="output folder (store, images, report); default: swsa-demo")
    p.add_argument("--backbones", default=None,
                   help="comma-separated candidate feature sources (default elpv: pixels, pixels@32, efficientnet_lite0,1,2; "
                        "digits: pixels, resnet18, resnet34, resnet50, vit_b_32)")
    p.add_argument("--detectors", default=None,
                   help="detectors applied to every feature source, ';'-separated (default elpv: knn; knn(k=5,cosine); "
                        "mahalanobis; residual(K=4,mean); pca(n=8); pyod(model=ecod); pyod(model=ocsvm); digits: knn; mahalanobis; pca(n=8))")
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
    p.add_argument("--protocol", default=DEFAULT_PROTOCOL, choices=list(PROTOCOLS),
                   help=f"validation protocol (default {DEFAULT_PROTOCOL}: each query scored without its own images or "
                        f"parents; {PAPER}: the SWSA paper's, anomalies scored with their parents in the bank)")
    p.add_argument("--metric", choices=list(METRICS), default=DEFAULT_METRIC,
                   help="what the report's Table 1 and strategies comparison select by and measure (as `swsa report "
                        "--metric`): auroc (default), aupr, f1max or fpr95")
    add_loader_options(p)
    p.add_argument("--weights-dir", default=None, help="folder with pretrained weights (else: installed packages, caches; "
                   "digits: else random init)")
    add_device_option(p)
