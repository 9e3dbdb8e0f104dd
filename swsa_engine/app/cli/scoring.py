"""``swsa score``: the AUROC cube of every task, candidate and validation source (kNN and the other
detectors; or, with --prompts / --bliss, the CLIP prompt and BLISS cubes)."""

from __future__ import annotations

import argparse

from swsa_engine.app.cli.common import add_command, add_device_option, add_store_option, print_summary, split_list
from swsa_engine.core.cube import BLISS_KS, BLISS_LAMBDAS
from swsa_engine.core.ensembles import NORMALISATIONS
from swsa_engine.core.protocol import DEFAULT_PROTOCOL, LEAK_FREE, PAPER, PROTOCOLS
from swsa_engine.report.clip_tables import bliss_selection_table, prompt_selection_table
from swsa_engine.report.tables import markdown_table, table1_display
from swsa_engine.run.prompt_sweep import run_bliss_sweep, run_prompt_sweep
from swsa_engine.run.sweep import run_sweep

__all__ = ["cmd_score", "cmd_score_clip", "add_score_command"]


def cmd_score(args: argparse.Namespace) -> int:
    if getattr(args, "prompts", False) or getattr(args, "bliss", False):
        return cmd_score_clip(args)
    detectors = [d.strip() for d in (args.detectors or "").split(";") if d.strip()] or None
    cube = run_sweep(args.store, backbones=split_list(args.backbones) or None, k=args.k, detectors=detectors,
                     hardest=tuple(int(n) for n in split_list(args.hardest)), device=args.device, progress=not args.quiet,
                     protocol=args.protocol, allow_self_validation=args.allow_self_validation,
                     keep_scores=not args.no_scores, ensembles=not (args.no_ensembles or args.no_scores), em_mv=args.em_mv,
                     ensemble_normalisation=args.ensemble_normalisation, exact_scores=args.exact_scores)
    print_summary("score", {
        "tasks": len(cube.tasks), "candidates": len(cube.candidates), "sources": cube.sources,
        "protocol": cube.protocol, "skipped cells": len(cube.skips),
        "self-validation cells left out": int(cube.self_validated.sum()), "seconds": cube.config["seconds"],
    })
    return 0


def cmd_score_clip(args: argparse.Namespace) -> int:
    if args.detectors or args.backbones:
        option = "--detectors" if args.detectors else "--backbones"
        raise ValueError(f"{option} applies to embedding candidates, not to --prompts/--bliss (which score CLIP prompts); "
                         f"run `swsa score {option} ...` and `swsa score --prompts` separately")
    hardest = tuple(int(n) for n in split_list(args.hardest))
    if args.prompts:
        cube = run_prompt_sweep(args.store, model=args.model, prompt_set=args.prompt_set, hardest=hardest)
        print_summary("score prompts", {"tasks": len(cube.tasks), "candidates": len(cube.candidates),
                                        "sources": cube.sources, "seconds": cube.config["seconds"]})
        if not args.quiet:
            print(markdown_table(table1_display(prompt_selection_table(cube))))
    if args.bliss:
        lambdas = tuple(float(v) for v in split_list(args.lambdas)) or BLISS_LAMBDAS
        ks = tuple(int(v) for v in split_list(args.ks)) or BLISS_KS
        cube = run_bliss_sweep(args.store, model=args.model, lambdas=lambdas, ks=ks, hardest=hardest)
        print_summary("score bliss", {"tasks": len(cube.tasks), "candidates": len(cube.candidates),
                                      "sources": cube.sources, "seconds": cube.config["seconds"]})
        if not args.quiet:
            print(markdown_table(table1_display(bliss_selection_table(cube))))
    return 0


def add_score_command(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "score", cmd_score, "compute the AUROC cube for all tasks, candidates and sources")
    add_store_option(p)
    p.add_argument("--backbones", help="comma-separated candidates (default: every embedding in the store)")
    p.add_argument("--k", type=int, default=3, help="neighbours in the kNN score (default 3, the paper's)")
    p.add_argument("--detectors", help="detectors applied to every embedding, ';'-separated, e.g. "
                                       "'knn(k=3);knn(k=5,cosine);mahalanobis;residual(K=4,mean);residual(K=4,min);"
                                       "nagl(k=3,beta=1.0);pca(n=8)' (default: knn(k=K)); nagl needs `swsa split-refs`")
    p.add_argument("--hardest", default="10,5", help="also validate on the N hardest synthetic anomalies (default 10,5)")
    p.add_argument("--protocol", default=DEFAULT_PROTOCOL, choices=list(PROTOCOLS),
                   help=f"validation protocol (default {DEFAULT_PROTOCOL}). {LEAK_FREE}: {PROTOCOLS[LEAK_FREE]}. "
                        f"{PAPER}: {PROTOCOLS[PAPER]}")
    p.add_argument("--allow-self-validation", action="store_true",
                   help="also validate detectors with abnormal references (nagl) on the references' own generator and "
                        "on anomalies sharing parents with them (left out by default: self-validation inflates them)")
    p.add_argument("--no-ensembles", action="store_true",
                   help="do not add the ensembles of the candidates (mean, max, median, AOM, MOA of rank-normalised "
                        "scores, per backbone, per detector, and the one selected on the synthetic sets) as candidates")
    p.add_argument("--ensemble-normalisation", choices=NORMALISATIONS, default="rank",
                   help="how each ensemble member's scores are made comparable, without labels, over the images being "
                        "scored: rank (mid-ranks scaled to [0, 1]; default) or zscore ((score - mean) / std); "
                        "recorded in the cube and shown in the report")
    p.add_argument("--no-scores", action="store_true",
                   help="do not keep the per-image scores beside the cube (T x C x (Q + W) x 8 bytes); without them "
                        "there are no ensembles and model centrality gives no pick")
    p.add_argument("--exact-scores", action="store_true",
                   help="refine every kept kNN score to its float64 brute-force value (default: only those an AUROC "
                        "depends on; the AUROCs are the same): exported bundles then reproduce the kept scores to ~1e-12")
    p.add_argument("--em-mv", action="store_true",
                   help="also compute Goix's Excess-Mass / Mass-Volume criteria of every candidate (label-free "
                        "baselines: strategies em, mv) from 50 random 5-feature subsets; about 0.25 s per task and candidate")
    add_device_option(p)
    p.add_argument("--prompts", action="store_true",
                   help="score CLIP prompts instead of kNN backbones: /results/prompt_cube (needs `swsa embed-text` "
                        "and `swsa embed --backbone clip/...`)")
    p.add_argument("--bliss", action="store_true", help="score BLISS over the lambda x K grid: /results/bliss_cube")
    p.add_argument("--model", help="--prompts/--bliss: the CLIP model (default: the only one with text embeddings)")
    p.add_argument("--prompt-set", default="paper", help="--prompts: prompt set name (default paper)")
    p.add_argument("--lambdas", default="", help="--bliss: lambda grid (default 0.1,0.25,0.5,0.75,1,2)")
    p.add_argument("--ks", default="", help="--bliss: K grid (default 1,5,10,20)")
