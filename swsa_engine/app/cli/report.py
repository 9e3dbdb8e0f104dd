"""``swsa report`` (Markdown/CSV/JSON tables, figures and the HTML report from a scored store) and
``swsa info`` (what a store holds). Both read the store through :mod:`swsa_engine.run`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from swsa_engine.app.cli.common import add_command, add_custom_strategy, add_store_option
from swsa_engine.core.metric_cube import DEFAULT_METRIC, METRICS, require_scores
from swsa_engine.report.html import write_html_report
from swsa_engine.report.summary import write_report
from swsa_engine.run.cube_io import load_cube
from swsa_engine.run.report_inputs import read_skips, store_info

__all__ = ["cmd_report", "cmd_info", "info_lines", "add_report_command", "add_info_command"]


def cmd_report(args: argparse.Namespace) -> int:
    for spec in args.strategy or []:  # registered before any table is computed; a bad spec fails first
        add_custom_strategy(spec)
    cube = load_cube(args.store)
    require_scores(cube, args.metric)  # before anything is written
    skips = read_skips(args.store)
    paths = write_report(cube, args.out, store_skips=skips, store_path=args.store, table3_tasks=args.table3_tasks,
                         figure4=args.figure4, candidate=args.candidate, metric=args.metric)
    print(f"report written: {paths['report']}")
    if args.html:
        html_path = write_html_report(cube, args.store, args.html, report_dir=args.out, store_skips=skips,
                                      metric=args.metric)
        print(f"HTML report written: {html_path} ({html_path.stat().st_size / 1e6:.1f} MB)")
    if not args.quiet:
        print(Path(paths["report"]).read_text(encoding="utf-8").split("## Figure 3")[0])
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    info = store_info(args.store)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for line in info_lines(info):
        print(line)
    return 0


def info_lines(info: dict) -> list[str]:
    """``swsa info``'s lines for the dict of :func:`swsa_engine.run.report_inputs.store_info`."""
    lines = [f"store {info['store']} (schema {info['schema_version']}): {info['images']} images, {info['skips']} recorded skips"]
    for dataset, d in info["datasets"].items():
        kinds = ", ".join(f"{n} {k}" for k, n in d["images"].items())
        lines.append(f"  dataset {dataset}: {d['classes']} classes, {kinds}; {d['tasks']} tasks ({d['skipped_tasks']} skipped), "
                     f"{d['skipped_images']} skipped images")
    for name, b in info["backbones"].items():
        lines += _backbone_lines(name, b)
    lines.append(f"  results: {', '.join(info['results']) or 'none'}")
    for group in info["skip_reasons"]:
        lines.append(f"  skipped ({group['stage']}) x{group['count']}: {group['reason']}")
    return lines


def _backbone_lines(name: str, b: dict) -> list[str]:
    """One embedding's line (completeness, failures, size, weights), and its patch tokens' line."""
    pct = 100.0 * b["done"] / b["of"] if b["of"] else 0.0
    lines = [f"  embeddings {name}: {b['done']}/{b['of']} done ({pct:.0f}%), {b['failed']} failed, "
             f"dim {b['feature_dim']}, weights {_weights_summary(b)}"]
    if "patches" in b:
        pt = b["patches"]
        per_dataset = ", ".join(f"{d} {n / 2**20:.1f} MiB" for d, n in pt["bytes_per_dataset"].items())
        lines.append(f"    patch tokens: {pt['done']}/{b['of']} done, {pt['n_patches']} x {pt['patch_dim']} float16 "
                     f"({pt['grid'][0]}x{pt['grid'][1]} grid, {pt['layer']}), {pt['bytes_per_image'] / 1024:.1f} KiB/image, "
                     f"{pt['bytes_total'] / 2**20:.1f} MiB in all ({per_dataset})")
    return lines


def _weights_summary(backbone: dict) -> str:
    """``kind`` and, where a file was read, its name, package and sha256 (for `swsa info`)."""
    if not backbone.get("weights_sha256"):
        return str(backbone["weights"])
    package = (f", package {backbone['weights_package']} {backbone['weights_package_version']}".rstrip()
               if backbone.get("weights_package") else "")
    return f"{backbone['weights']} ({Path(str(backbone['weights_path'])).name}{package}, sha256 {backbone['weights_sha256']})"


def add_report_command(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "report", cmd_report, "write Markdown/CSV/JSON tables and figures from the scored store")
    add_store_option(p)
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--table3-tasks", type=int, default=0,
                   help="add Table 3 (total variation) over this many tasks per dataset (default 0: off)")
    p.add_argument("--figure4", action="store_true", help="add Figure 4 (t-SNE of one task per dataset)")
    p.add_argument("--candidate", help="embedding used by Table 3 and Figure 4 (default vit_b_16, else the first)")
    p.add_argument("--metric", choices=list(METRICS), default=DEFAULT_METRIC,
                   help="what Table 1 and the strategies comparison select by (synthetic) and measure (real): auroc "
                        "(default), aupr (average precision), f1max (best F1) or fpr95 (FPR at 95%% TPR, used as "
                        "1 - FPR so higher is better); aupr, f1max and fpr95 need the per-image scores `swsa score` keeps")
    p.add_argument("--html", metavar="PATH", help="also write one self-contained HTML report (opens offline in a browser)")
    p.add_argument("--strategy", action="append", metavar="MODULE:FUNCTION",
                   help="add a custom selection strategy to Table 1 and the strategies comparison (repeatable): "
                        "FUNCTION(ctx) -> (T,) picked indices or (T, C) weights, ctx a SelectionContext without real "
                        "labels; MODULE must be importable (e.g. on PYTHONPATH)")


def add_info_command(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "info", cmd_info, "show what a store holds: datasets, tasks, backbones and their completeness")
    add_store_option(p)
    p.add_argument("--json", action="store_true", help="print JSON")
