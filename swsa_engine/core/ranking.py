"""The paper's Table 2: does the synthetic ranking of the candidates agree with the real one?

:func:`ranking_table` (Kendall's tau-b between the synthetic and the real AUROCs of the
candidates, with the sign: a one-sided test of agreement and the paper's two-sided p) and its
:data:`VERDICTS`. Re-exported by :mod:`swsa_engine.core.selection`, where it used to live.
Pure arrays: no I/O.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from swsa_engine.core.cube import SETTINGS, AurocCube
from swsa_engine.core.metrics import kendall_tau

__all__ = ["VERDICTS", "ranking_table"]


#: Table 2's verdicts, from the one-sided test of agreement and the paper's two-sided test
VERDICTS = {
    "agrees": "the synthetic ranking agrees with the real one (one-sided p for tau > 0 below the threshold)",
    "disagrees (significant)": "tau < 0 and the two-sided p is below the threshold: the synthetic ranking is reversed",
    "disagrees": "tau < 0, not significant",
    "not significant": "tau >= 0, but the one-sided p is not below the threshold",
    "undefined": "no tau (fewer than two candidates with finite AUROCs, or constant AUROCs)",
}


def ranking_table(cube: AurocCube, alpha: float = 0.05) -> pd.DataFrame:
    """The paper's Table 2: Kendall's tau between synthetic and real rankings of the candidates.

    Per dataset × setting × source: x = the candidates' synthetic AUROC averaged over tasks,
    y = their real AUROC averaged over tasks (n = number of candidates), tau-b with ``p_value``
    (two-sided, as in the paper) and ``p_one_sided`` (the alternative tau > 0: "does the
    synthetic ranking agree with the real one?"); also the mean of the per-task taus.
    ``agrees`` is True when ``p_one_sided`` is below the Bonferroni threshold
    ``alpha / (number of tests in the table)`` — never for a negative tau — and ``verdict`` says
    which of :data:`VERDICTS` holds (a negative tau is "disagrees", "(significant)" when its
    two-sided p is below the threshold).
    """
    records = []
    for dataset in sorted(cube.tasks["dataset"].unique()):
        rows = np.flatnonzero(cube.tasks["dataset"].to_numpy() == dataset)
        for s, setting in enumerate(SETTINGS):
            real = cube.real[rows, :, s]
            for v, source in enumerate(cube.sources):
                records.append({"dataset": dataset, "setting": setting, "source": source,
                                **_ranking_row(cube.synthetic[rows, :, v], real)})
    table = pd.DataFrame(records, columns=["dataset", "setting", "source", "n_candidates", "tau", "p_value",
                                           "p_one_sided", "mean_task_tau"])
    n_tests = int(table["p_value"].notna().sum()) if len(table) else 0
    threshold = alpha / n_tests if n_tests else np.nan
    table["bonferroni_threshold"] = threshold
    table["agrees"] = (table["p_one_sided"] < threshold) & (table["tau"] > 0)
    table["verdict"] = [_verdict(tau, p, p1, threshold) for tau, p, p1 in
                        zip(table["tau"], table["p_value"], table["p_one_sided"])]
    return table


def _ranking_row(synth: np.ndarray, real: np.ndarray) -> dict:
    """Table 2's numbers for one dataset × setting × source; ``synth``, ``real``: (T, C)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x, y = np.nanmean(synth, axis=0), np.nanmean(real, axis=0)
        finite = np.isfinite(x) & np.isfinite(y)
        tau, p = kendall_tau(np.nan_to_num(x), np.nan_to_num(y), mask=finite)
        _, p_one_sided = kendall_tau(np.nan_to_num(x), np.nan_to_num(y), mask=finite, alternative="greater")
        both = np.isfinite(synth) & np.isfinite(real)
        task_tau, _ = kendall_tau(np.nan_to_num(synth), np.nan_to_num(real), mask=both)
        mean_task_tau = np.nanmean(task_tau) if np.isfinite(task_tau).any() else np.nan
    return {"n_candidates": int(np.isfinite(x).sum()), "tau": float(tau), "p_value": float(p),
            "p_one_sided": float(p_one_sided), "mean_task_tau": float(mean_task_tau)}


def _verdict(tau: float, p_two_sided: float, p_one_sided: float, threshold: float) -> str:
    """One of :data:`VERDICTS`' keys."""
    if not np.isfinite(tau):
        return "undefined"
    if p_one_sided < threshold:
        return "agrees"
    if tau < 0:
        return "disagrees (significant)" if p_two_sided < threshold else "disagrees"
    return "not significant"
