#!/usr/bin/env python
"""Run the SWSA paper's benchmark from a TOML configuration (default: configs/paper.toml).

    python scripts/run_paper.py --config configs/paper.toml [--dry-run] [--store PATH]

Steps, each a call of the library's own functions (every step is resumable, so an interrupted
run is continued by running the same command again):

1. catalog  ``swsa_store.catalog.catalog_dataset`` for each dataset (cub, flowers, mvtec, visa);
2. synth    ``swsa_store.synthesize.synthesize`` per generator and dataset (``[counts]``: 100 per
            task, Flowers 25); an ``optional`` generator that is not registered, and the
            diffusion generator without a model (``model = "..."`` in its table or
            ``$SWSA_DIFFUSION_MODEL``; ``adm_config`` selects the ADM configuration), are skipped;
3. auxiliary ``swsa_store.auxiliary.sample_auxiliary`` (the Tiny-ImageNet baseline);
4. embed    ``swsa_store.ingest.embed_store`` for each of the ten backbones;
5. score    ``swsa_engine.run.sweep.run_sweep``;
6. report   ``swsa_engine.report.summary.write_report``.

A step whose input is missing (a dataset root, weights not on disk, the diffusion model) is
skipped, said at once and listed at the end; the other steps still run. ``--dry-run`` prints the
plan and touches nothing. Other errors print one line and exit 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import tomllib
from pathlib import Path

DIFFUSION_MODEL_ENV = "SWSA_DIFFUSION_MODEL"  # DiffStyle's default model (swsa_store.synth.diffstyle)
PAPER_TASKS = {"cub": 200, "flowers": 102, "mvtec": 15, "visa": 12}
DATASET_KEYS = {"flowers": ("validation",), "visa": ("multi_defect",)}
#: [[synth]] keys passed on to the generator (the diffusion model and its ADM configuration, ...)
GENERATOR_KEYS = ("model", "adm_config", "steps", "gamma", "t_edit", "interpolation", "t_boost", "device", "batch_size")


def load_config(path: str | Path) -> dict:
    """The parsed TOML configuration; a one-line ValueError when it is missing or invalid."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read config {path}: {exc.strerror or exc}") from None
    try:
        config = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config {path} is not valid TOML: {exc}") from None
    for key in ("datasets", "embed"):
        if key not in config:
            raise ValueError(f"config {path} has no [{key}] table")
    return config


def build_plan(config: dict, store: str | None = None) -> list[dict]:
    """The ordered steps: ``{"step", "kwargs", "note"}`` dicts (``kwargs`` go to the function)."""
    store = store or config.get("store", "paper/swsa.h5")
    seed, n_seed = int(config.get("seed", 0)), int(config.get("n_seed", 20))
    counts = dict(config.get("counts", {}))
    default_count = int(counts.pop("default", 100))
    plan = []
    for name, spec in config["datasets"].items():
        if "root" not in spec:
            raise ValueError(f"config: [datasets.{name}] needs a root")
        kwargs = {"root": spec["root"], **{k: spec[k] for k in DATASET_KEYS.get(name, ()) + ("name",) if k in spec}}
        plan.append({"step": "catalog", "kwargs": {"store_path": store, "dataset_name": name, "n_seed": n_seed,
                                                    "split_seed": seed, **kwargs},
                     "note": f"{PAPER_TASKS.get(name, '?')} tasks expected"})
    for spec in config.get("synth", []):
        method = spec["method"]
        variant = spec.get("variant")
        source = spec.get("source") or (method if variant in (None, "normal") else f"{method}-{variant}")
        for name, dataset in config["datasets"].items():
            count = int(counts.get(name, default_count))
            gen = {"variant": variant} if variant else {}
            gen.update({k: v for k, v in spec.items() if k in GENERATOR_KEYS})  # e.g. model, adm_config
            plan.append({"step": "synth", "dataset": dataset.get("name", name), "optional": bool(spec.get("optional", False)),
                         "kwargs": {"store_path": store, "method": method, "count": count, "seed": seed,
                                    "source": source, **gen},
                         "note": f"{source}: {count} per {name} task"})
    aux = config.get("auxiliary")
    if aux:
        plan.append({"step": "auxiliary", "kwargs": {"store_path": store, "root": aux["root"], "count": default_count,
                                                      "counts": {k: int(v) for k, v in counts.items()}, "seed": seed,
                                                      "source": aux.get("source")},
                     "note": f"{aux.get('source') or 'auxiliary'}: {default_count} per task ({counts or 'no exceptions'})"})
    embed = config["embed"]
    for backbone in embed["backbones"]:
        plan.append({"step": "embed", "kwargs": {
            "store_path": store, "backbone": backbone, "weights_dir": embed.get("weights_dir"),
            "allow_download": bool(embed.get("allow_download", False)), "batch_size": int(embed.get("batch_size", 64)),
            "num_workers": int(embed.get("num_workers", 0)), "device": embed.get("device", "cpu"),
            **{k: embed[k] for k in ("weights", "image_size") if k in embed}}, "note": backbone})
    score = config.get("score", {})
    plan.append({"step": "score", "kwargs": {"store_path": store, "k": int(score.get("k", 3)),
                                             "hardest": tuple(int(n) for n in score.get("hardest", (10, 5))),
                                             "device": score.get("device", "cpu")}, "note": "AUROC cube"})
    plan.append({"step": "report", "kwargs": {"store_path": store, "out_dir": config.get("report", "paper/report")},
                 "note": "Markdown / CSV / JSON / PNG"})
    return plan


def format_plan(plan: list[dict]) -> str:
    expected = sum(PAPER_TASKS.get(s["kwargs"]["dataset_name"], 0) for s in plan if s["step"] == "catalog")
    lines = [f"plan: {len(plan)} steps; {expected} tasks expected (paper: 329)"]
    for i, step in enumerate(plan, 1):
        shown = {k: v for k, v in step["kwargs"].items() if k != "store_path"}
        lines.append(f"{i:3d}. {step['step']:<9} {step['note']:<40} {shown}")
    return "\n".join(lines)


def run_plan(plan: list[dict], progress: bool = True) -> list[str]:
    """Run every step; a step whose input is missing (a dataset root, an optional generator's model,
    weights not on disk: ``FileNotFoundError``) is skipped and said so, and the rest still runs.
    Returns the skipped steps, one line each (also printed at the end); other errors stop the run."""
    skipped: list[str] = []
    for step in plan:
        print(f"== {step['step']}: {step['note']}", flush=True)
        try:
            reason = _run_step(step, progress)
        except FileNotFoundError as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if reason:
            line = f"{step['step']} {step['note']}: {reason}"
            print(f"   skipped: {reason}", flush=True)
            skipped.append(line)
    if skipped:
        print(f"skipped {len(skipped)} of {len(plan)} steps (the rest ran):")
        print("\n".join(f"  - {line}" for line in skipped))
    else:
        print(f"all {len(plan)} steps ran")
    return skipped


def _run_step(step: dict, progress: bool) -> str:
    """Run one step; returns why it was skipped ("" when it ran)."""
    from swsa_store.catalog import catalog_dataset
    from swsa_store.store import open_store

    kind, kwargs = step["step"], dict(step["kwargs"])
    if kind != "catalog" and not Path(kwargs["store_path"]).exists():
        return "no store yet (every dataset was skipped)"
    if kind == "catalog":
        print(catalog_dataset(kwargs.pop("store_path"), kwargs.pop("dataset_name"), **kwargs))
    elif kind == "synth":
        from swsa_store.synth import list_generators
        from swsa_store.synthesize import synthesize

        if kwargs["method"] not in list_generators():
            if step.get("optional"):
                return f"generator {kwargs['method']!r} is not registered (optional)"
            raise ValueError(f"generator {kwargs['method']!r} is not registered; registered: {list_generators()}")
        if kwargs["method"] == "diffusion" and not kwargs.get("model") and not os.environ.get(DIFFUSION_MODEL_ENV):
            return (f"no diffusion model given (set model = \"PATH\" in its [[synth]] table or ${DIFFUSION_MODEL_ENV}; "
                    "256x256_diffusion_uncond.pt from OpenAI guided-diffusion)")
        with open_store(kwargs["store_path"]) as store:
            tasks = store.tasks()
        ids = tasks[(tasks["dataset"] == step["dataset"]) & (tasks["status"] == "ok")]["task_id"].tolist()
        if not ids:
            return f"no catalogued task of dataset {step['dataset']}"
        print(synthesize(kwargs.pop("store_path"), kwargs.pop("method"), task_ids=ids, progress=progress, **kwargs))
    elif kind == "auxiliary":
        from swsa_store.auxiliary import sample_auxiliary

        print(sample_auxiliary(kwargs.pop("store_path"), kwargs.pop("root"), **kwargs))
    elif kind == "embed":
        from swsa_store.ingest import embed_store

        report = embed_store(kwargs.pop("store_path"), kwargs.pop("backbone"), progress=progress, **kwargs)
        print(f"   {report.written} written, {report.already_done} already done, {report.failed} failed")
    elif kind == "score":
        from swsa_engine.run.sweep import run_sweep

        with open_store(kwargs["store_path"]) as store:
            if not store.backbones() and not store.score_sets():
                return "no embeddings to score (every embed step was skipped)"

        cube = run_sweep(kwargs.pop("store_path"), progress=progress, **kwargs)
        print(f"   {len(cube.tasks)} tasks x {len(cube.candidates)} candidates, sources {cube.sources}")
    elif kind == "report":
        from swsa_engine.report.summary import write_report
        from swsa_engine.run.cube_io import load_cube

        from swsa_engine.run.cube_io import CUBE_RESULT, stored_results

        store_path = kwargs.pop("store_path")
        if CUBE_RESULT not in stored_results(store_path):
            return "no AUROC cube to report (the score step was skipped)"
        with open_store(store_path) as store:
            skips = store.skips()
        paths = write_report(load_cube(store_path), kwargs["out_dir"], store_skips=skips)
        print(f"   report: {paths['report']}")
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/paper.toml", help="TOML configuration (default configs/paper.toml)")
    parser.add_argument("--store", help="override the config's store path")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    try:
        plan = build_plan(load_config(args.config), store=args.store)
        print(format_plan(plan))
        if not args.dry_run:
            run_plan(plan, progress=not args.quiet)
    except Exception as error:
        if args.debug:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"run_paper: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
