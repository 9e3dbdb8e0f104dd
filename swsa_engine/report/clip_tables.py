"""Tables over the CLIP cubes: prompt selection, BLISS setting selection and the BLISS grid.

The cubes are those of :mod:`swsa_engine.run.prompt_sweep` (``/results/prompt_cube`` and
``/results/bliss_cube``); these functions only read them. :func:`clip_report_lines` writes the
report's Markdown blocks and CSVs for whichever of the two the store holds.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from swsa_engine.core.cube import BLISS_CUBE, BLISS_DEFAULT, ENSEMBLE, PROMPT_CUBE, SETTINGS, AurocCube, bliss_name
from swsa_engine.core.selection import selection_table
from swsa_engine.report.tables import markdown_table, table1_display, write_csv
from swsa_engine.run.cube_io import load_cube, stored_results


def subcube(cube: AurocCube, names: list[str]) -> AurocCube:
    """The cube restricted to the candidates ``names`` (in that order)."""
    index = [cube.candidate_names.index(n) for n in names]
    skips = cube.skips[cube.skips["candidate"].isin(names + ["*"])] if len(cube.skips) else cube.skips
    return AurocCube(tasks=cube.tasks, candidates=cube.candidates.iloc[index].reset_index(drop=True), sources=cube.sources,
                     real=cube.real[:, index], synthetic=cube.synthetic[:, index], per_class=cube.per_class[:, index],
                     class_names=cube.class_names, skips=skips, config=cube.config)


def _swsa_rows(cube: AurocCube) -> list:
    """Table 1's SWSA rows, one per base synthetic source of ``cube``."""
    base = cube.config.get("base_sources", [s for s in cube.sources if "@" not in s])
    return [(f"SWSA ({source})", "swsa", {"source": source}) for source in base]


def prompt_selection_table(cube: AurocCube) -> pd.DataFrame:
    """Table 1's prompt-selection rows per dataset × setting: default prompt, prompt ensemble,
    SWSA per synthetic source, best prompt (oracle) — selection over the single prompts.

    The ensemble is not a pick among the prompts; its ``picks`` count the tasks where it is at
    least as good as the best single prompt.
    """
    prompts = [n for n in cube.candidate_names if n != ENSEMBLE]
    single = subcube(cube, prompts)
    strategies = [("Default prompt", "fixed", {"candidate": prompts[0]})] + _swsa_rows(single) + \
                 [("Best prompt (oracle)", "oracle", {})]
    table = selection_table(single, strategies)
    if ENSEMBLE not in cube.candidate_names:
        return table
    e = cube.candidate_names.index(ENSEMBLE)
    index = [cube.candidate_names.index(n) for n in prompts]
    extra = []
    for dataset in sorted(cube.tasks["dataset"].unique()):
        rows = np.flatnonzero(cube.tasks["dataset"].to_numpy() == dataset)
        for s, setting in enumerate(SETTINGS):
            ens, real = cube.real[rows, e, s], cube.real[rows][:, index, s]
            defined = np.isfinite(ens) & np.isfinite(real).all(axis=1)
            n = int(defined.sum())
            best = real[defined].max(axis=1) if n else np.array([])
            extra.append({"dataset": dataset, "setting": setting, "strategy": "Prompt ensemble",
                          "picks": float((ens[defined] >= best).sum()), "tasks": n,
                          "pick_rate": float(np.mean(ens[defined] >= best)) if n else np.nan,
                          "auroc": float(np.mean(ens[defined])) if n else np.nan,
                          "best": float(np.mean(best)) if n else np.nan})
    table = pd.concat([table, pd.DataFrame(extra)], ignore_index=True)
    order = {"Default prompt": 0, "Prompt ensemble": 1, "Best prompt (oracle)": 9}
    table["_o"] = [order.get(s, 5) for s in table["strategy"]]
    table = table.sort_values(["dataset", "setting", "_o"], kind="stable").drop(columns="_o").reset_index(drop=True)
    return table


def bliss_selection_table(cube: AurocCube) -> pd.DataFrame:
    """BLISS block: the default setting (λ = 0.5, K = 10), SWSA over the λ × K grid, the oracle."""
    default = cube.config.get("default", bliss_name(*BLISS_DEFAULT))
    if default not in cube.candidate_names:
        default = cube.candidate_names[0]
    strategies = [(f"BLISS default ({default})", "fixed", {"candidate": default})] + _swsa_rows(cube) + \
                 [("Best setting (oracle)", "oracle", {})]
    return selection_table(cube, strategies)


def bliss_grid_table(cube: AurocCube) -> pd.DataFrame:
    """Mean real AUROC of every (λ, K) per dataset and setting (BLISS's Table 2, over K too)."""
    records = []
    for dataset in sorted(cube.tasks["dataset"].unique()):
        rows = cube.tasks["dataset"].to_numpy() == dataset
        for s, setting in enumerate(SETTINGS):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                means = np.nanmean(cube.real[rows, :, s], axis=0)
            for c, row in cube.candidates.iterrows():
                records.append({"dataset": dataset, "setting": setting, "lambda": row.get("lam"), "K": row.get("k"),
                                "auroc": float(means[c])})
    table = pd.DataFrame(records)
    return table.pivot_table(index=["dataset", "setting", "lambda"], columns="K", values="auroc").reset_index()


def clip_report_lines(store_path: str | os.PathLike, out_dir: str | os.PathLike, paths: dict) -> list[str]:
    """Markdown blocks (and CSVs in ``out_dir``) for the prompt and BLISS cubes the store holds;
    adds the CSVs' paths to ``paths``."""
    held = stored_results(store_path)
    out, lines = Path(out_dir), []
    if PROMPT_CUBE in held:
        cube = load_cube(store_path, PROMPT_CUBE)
        table = prompt_selection_table(cube)
        paths["prompt_table_csv"] = out / "table1_prompts.csv"
        write_csv(table, paths["prompt_table_csv"])
        shown = table1_display(table.assign(strategy=table["strategy"].str.replace("Best prompt", "Best model")))
        shown["strategy"] = shown["strategy"].str.replace("Best model", "Best prompt")
        lines += ["## Table 1 — prompt selection (zero-shot CLIP)", "",
                  f"CLIP `{cube.config.get('model')}`, prompt set `{cube.config.get('prompt_set')}`; two-prompt score "
                  f"softmax(s·[cos(z,t_n), cos(z,t_a)])[1] with the model's logit scale s = {cube.config.get('logit_scale', 0):.4g} "
                  "(ranked by its logit). Selection is over the single prompts; the prompt ensemble's pick rate counts the "
                  "tasks where it is at least as good as the best single prompt.", "",
                  markdown_table(shown), ""]
        if (cube.candidates["weights_kind"] == "random").any():
            lines[-4:-4] = ["> **Random CLIP weights**: these numbers describe a randomly initialised model.", ""]
    if BLISS_CUBE in held:
        cube = load_cube(store_path, BLISS_CUBE)
        table = bliss_selection_table(cube)
        grid = bliss_grid_table(cube)
        paths["bliss_table_csv"] = out / "table1_bliss.csv"
        paths["bliss_grid_csv"] = out / "bliss_grid.csv"
        write_csv(table, paths["bliss_table_csv"])
        write_csv(grid, paths["bliss_grid_csv"])
        shown = table1_display(table.assign(strategy=table["strategy"].str.replace("Best setting", "Best model")))
        shown["strategy"] = shown["strategy"].str.replace("Best model", "Best setting")
        grid.columns = [str(c) if not isinstance(c, (int, np.integer)) else f"K={c}" for c in grid.columns]
        lines += ["## BLISS — selection of λ and K", "",
                  f"BLISS s(x) = IC(x) + λ·ET(x) (Goodge et al.), dictionary of {cube.config.get('dictionary_size', '?')} "
                  f"ImageNet names, ε = {cube.config.get('eps')}, σ with ddof = {cube.config.get('ddof')}; candidates "
                  f"λ ∈ {cube.config.get('lambdas')} × K ∈ {cube.config.get('ks')}.", "",
                  markdown_table(shown), "", "Mean real AUROC per (λ, K):", "", markdown_table(grid), ""]
    return lines
