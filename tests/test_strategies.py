"""Table 2 with the sign (one-sided agreement test) and the strategies comparison (regret, pick
rate, bootstrap intervals) against naive loops over tasks and bootstrap draws."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.stats import kendalltau

from swsa_engine.core.cube import SETTINGS, AurocCube
from swsa_engine.core.metrics import kendall_tau
from swsa_engine.core.selection import STRATEGIES, DEFAULT_LABELS, default_strategies, ranking_table, register_strategy
from swsa_engine.core.strategy_comparison import (ALL_DATASETS, COMPARISON_COLUMNS, bootstrap_ci, bootstrap_indices,
                                                  compare_weights, strategies_table)
from swsa_engine.report.figures import list_figures
from swsa_engine.report.summary import write_report
from swsa_engine.report.tables import strategies_display, table2_note


def _cube(rng, n_tasks=14, n_candidates=6, anti=()):
    """A cube with tied AUROCs (rounded to 0.05); sources listed in ``anti`` rank the candidates backwards."""
    real = np.round(rng.uniform(0.5, 1.0, size=(n_tasks, n_candidates, 2)) * 20) / 20
    real[0] = 0.9  # every candidate tied in one task
    noise = rng.normal(0, 0.03, size=(n_tasks, n_candidates, 3))
    synthetic = np.round(np.clip(real[:, :, [0, 0, 0]] + noise, 0, 1) * 20) / 20
    for v in anti:
        synthetic[:, :, v] = 1.5 - synthetic[:, :, v]
    return AurocCube(
        tasks=pd.DataFrame({"task_id": np.arange(n_tasks), "dataset": np.where(np.arange(n_tasks) < 8, "x", "y"),
                            "normal_class": [f"c{i}" for i in range(n_tasks)]}),
        candidates=pd.DataFrame({"name": [f"m{i}" for i in range(n_candidates)],
                                 "n_params": [10, 50, 20, 50, 30, 5][:n_candidates], "feature_dim": 8,
                                 "weights_kind": "random", "family": "resnet"}),
        sources=["s1", "s2", "s3"], real=real, synthetic=synthetic,
        per_class=np.full((n_tasks, n_candidates, 1), np.nan), class_names=np.full((n_tasks, 1), "", dtype=object),
        config={"k": 3, "base_sources": ["s1", "s2", "s3"]},
    )


# --------------------------------------------------------------------------- Table 2 with the sign


@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_kendall_tau_one_sided_matches_scipy_with_ties(alternative):
    rng = np.random.default_rng(3)
    rows = []
    for n in (3, 5, 9, 20, 33, 40):
        for kind in ("ties", "no ties", "reversed", "same"):
            x = rng.integers(0, 4, size=n).astype(float) if kind == "ties" else rng.permutation(n).astype(float)
            y = {"ties": rng.integers(0, 4, size=n).astype(float), "no ties": rng.permutation(n).astype(float),
                 "reversed": -x, "same": x.copy()}[kind]
            rows.append((x, y))
    for x, y in rows:
        tau, p = kendall_tau(x, y, alternative=alternative)
        expected = kendalltau(x, y, alternative=alternative)
        assert tau == pytest.approx(expected.statistic, abs=1e-12)
        assert p == pytest.approx(expected.pvalue, rel=1e-9, abs=1e-15), (x, y)


def test_kendall_tau_rejects_unknown_alternative():
    with pytest.raises(ValueError, match="kendall_tau: unknown alternative 'bigger'; use one of two-sided, greater, less"):
        kendall_tau([1.0, 2.0, 3.0], [1.0, 3.0, 2.0], alternative="bigger")


def test_ranking_table_one_sided_p_matches_scipy_row_by_row():
    cube = _cube(np.random.default_rng(5), anti=(1,))
    table = ranking_table(cube)
    assert {"p_value", "p_one_sided", "agrees", "verdict"} <= set(table.columns)
    assert "significant" not in table.columns
    for row in table.itertuples():
        rows = cube.tasks["dataset"].to_numpy() == row.dataset
        x = cube.synthetic[rows, :, cube.sources.index(row.source)].mean(axis=0)
        y = cube.real[rows, :, SETTINGS.index(row.setting)].mean(axis=0)
        greater = kendalltau(x, y, alternative="greater")
        two_sided = kendalltau(x, y)
        assert row.tau == pytest.approx(greater.statistic, abs=1e-12)
        assert row.p_one_sided == pytest.approx(greater.pvalue, rel=1e-9, abs=1e-15)
        assert row.p_value == pytest.approx(two_sided.pvalue, rel=1e-9, abs=1e-15)
        assert row.agrees == bool(greater.pvalue < 0.05 / len(table))
    reversed_source = table[(table.source == "s2") & (table.setting == "one-vs-rest")]
    assert (reversed_source["tau"] < 0).all() and not reversed_source["agrees"].any()
    assert table["agrees"].any()  # both outcomes are exercised


def test_negative_tau_is_never_agreement():
    cube = _cube(np.random.default_rng(8), n_tasks=30, n_candidates=6, anti=(0, 2))
    # a perfectly reversed source with a tiny two-sided p: "disagrees (significant)", never "agrees"
    cube.synthetic[:, :, 0] = -cube.real[:, :, 0] + np.arange(6) * 1e-3
    table = ranking_table(cube, alpha=0.5)
    negative = table[table["tau"] < 0]
    assert len(negative) >= 4
    assert not negative["agrees"].any()
    assert set(negative["verdict"]) <= {"disagrees", "disagrees (significant)"}
    assert "disagrees (significant)" in set(negative["verdict"])
    positive = table[table["agrees"]]
    assert (positive["tau"] > 0).all() and (positive["verdict"] == "agrees").all()
    note = table2_note(table)
    assert "a negative tau never agrees" in note and "p_one_sided" in note


# --------------------------------------------------------------------------- the strategies comparison


def _naive_row(weights_t, real, n_resamples, seed, level=0.95):
    """One strategy by loops: per-task outcomes, then per bootstrap draw the mean of each measure."""
    aurocs, regrets, hits = [], [], []
    for t in range(real.shape[0]):
        if np.isnan(real[t]).any() or np.isnan(weights_t[t]).any():
            continue
        best = max(real[t])
        aurocs.append(sum(w * r for w, r in zip(weights_t[t], real[t])))
        regrets.append(best - aurocs[-1])
        hits.append(sum(w for w, r in zip(weights_t[t], real[t]) if r == best))
    n = len(aurocs)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_resamples, n))
    out = {"n_tasks": n}
    for name, values in (("auroc", aurocs), ("regret", regrets), ("hit", hits)):
        means = [sum(values[i] for i in draw) / n for draw in draws]
        out[name] = (sum(values) / n, *np.quantile(means, [(1 - level) / 2, (1 + level) / 2]))
    return out


def test_compare_weights_matches_naive_loops():
    rng = np.random.default_rng(21)
    n_tasks, n_candidates = 11, 5
    real = np.round(rng.uniform(0.4, 1.0, size=(n_tasks, n_candidates)) * 10) / 10  # ties
    real[4, 2] = np.nan  # an undefined task
    picks = rng.integers(0, n_candidates, size=(3, n_tasks))
    weights = np.zeros((4, n_tasks, n_candidates))
    for k in range(3):
        weights[k, np.arange(n_tasks), picks[k]] = 1.0
    weights[1, 7] = np.nan  # a strategy without a pick on one task
    weights[3] = 1.0 / n_candidates  # the random pick's expectation
    table = compare_weights(weights, real, n_resamples=300, seed=7)
    for k in range(4):
        naive = _naive_row(weights[k], real, 300, 7)
        row = table.iloc[k]
        assert row["n_tasks"] == naive["n_tasks"] == (9 if k == 1 else 10)
        for name, columns in (("auroc", ("mean_real_auroc", "ci_low", "ci_high")),
                              ("regret", ("mean_regret", "regret_ci_low", "regret_ci_high")),
                              ("hit", ("pick_rate", "pick_rate_ci_low", "pick_rate_ci_high"))):
            assert [row[c] for c in columns] == pytest.approx(naive[name], abs=1e-12), (k, name)
    random = table.iloc[3]
    defined = ~np.isnan(real).any(axis=1)
    assert random["mean_real_auroc"] == pytest.approx(np.mean(real[defined].mean(axis=1)))
    expected_hits = [(real[t] == real[t].max()).mean() for t in np.flatnonzero(defined)]
    assert random["pick_rate"] == pytest.approx(np.mean(expected_hits))
    assert (table["ci_low"] <= table["mean_real_auroc"] + 1e-12).all()
    assert (table["mean_real_auroc"] <= table["ci_high"] + 1e-12).all()


def test_bootstrap_helpers_errors_and_seed():
    assert np.array_equal(bootstrap_indices(6, 5, 3), np.random.default_rng(3).integers(0, 6, size=(5, 6)))
    with pytest.raises(ValueError, match="the bootstrap needs at least one resample, got n_resamples=0"):
        bootstrap_indices(4, 0)
    with pytest.raises(ValueError, match="the interval's level must be between 0 and 1, got 95"):
        bootstrap_ci(np.ones((1, 3)), bootstrap_indices(3, 4), level=95)
    with pytest.raises(ValueError, match=r"weights must be \(K, T, C\) with \(T, C\) = real's shape \(3, 2\)"):
        compare_weights(np.ones((3, 2)), np.ones((3, 2)))
    empty = compare_weights(np.full((1, 2, 3), np.nan), np.ones((2, 3)))
    assert empty.loc[0, "n_tasks"] == 0 and np.isnan(empty.loc[0, "mean_regret"]) and np.isnan(empty.loc[0, "ci_low"])


def test_strategies_table_every_default_strategy_and_naive_swsa():
    cube = _cube(np.random.default_rng(2))
    table = strategies_table(cube, n_resamples=200, seed=1)
    assert list(table.columns) == COMPARISON_COLUMNS
    labels = [label for label, _, _ in default_strategies(cube)]
    assert {"Largest model", "Random (expected)", "SWSA (s1)", "SWSA (mean of sources)", "Best model (oracle)"} <= set(labels)
    for dataset in ("x", "y", ALL_DATASETS):
        for setting in SETTINGS:
            block = table[(table.dataset == dataset) & (table.setting == setting)]
            assert list(block["strategy"]) == labels
    oracle = table[table.strategy == "Best model (oracle)"]
    assert (oracle["mean_regret"] == 0).all() and (oracle["pick_rate"] == 1).all()
    # SWSA (s2) in one-vs-closest on dataset y, by a loop over tasks (ties share the pick)
    rows = np.flatnonzero(cube.tasks["dataset"].to_numpy() == "y")
    weights = np.zeros((1, len(rows), 6))
    for i, t in enumerate(rows):
        synth = cube.synthetic[t, :, 1]
        winners = np.flatnonzero(synth == synth.max())
        weights[0, i, winners] = 1.0 / len(winners)
    naive = _naive_row(weights[0], cube.real[rows, :, 1], 200, 1)
    row = table[(table.dataset == "y") & (table.setting == "one-vs-closest") & (table.strategy == "SWSA (s2)")].iloc[0]
    assert [row.mean_regret, row.regret_ci_low, row.regret_ci_high] == pytest.approx(naive["regret"], abs=1e-12)
    assert row.n_tasks == len(rows)
    pooled = table[(table.dataset == ALL_DATASETS) & (table.strategy == "Random (expected)")]
    assert (pooled["n_tasks"] == len(cube.tasks)).all()


def test_a_strategy_registered_with_a_default_label_joins_the_table():
    name = "test_smallest_model"
    if name not in STRATEGIES:
        @register_strategy(name, default_label="Smallest model (test)")
        def smallest(**_):
            return lambda ctx: np.broadcast_to(np.argmin(ctx.candidates["n_params"].to_numpy()), ctx.real.shape[:1])
    try:
        cube = _cube(np.random.default_rng(4))
        table = strategies_table(cube, n_resamples=50)
        row = table[(table.dataset == "x") & (table.setting == "one-vs-rest") & (table.strategy == "Smallest model (test)")]
        rows = cube.tasks["dataset"].to_numpy() == "x"
        assert row["mean_real_auroc"].iloc[0] == pytest.approx(cube.real[rows, 5, 0].mean())
    finally:
        DEFAULT_LABELS.pop(name, None)
    assert "Smallest model (test)" not in {label for label, _, _ in default_strategies(cube)}


def test_report_writes_strategies_csv_markdown_json_and_figure(tmp_path):
    assert "strategies" in list_figures()
    cube = _cube(np.random.default_rng(6), anti=(2,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paths = write_report(cube, tmp_path)
    csv = pd.read_csv(paths["strategies_csv"])
    assert list(csv.columns) == COMPARISON_COLUMNS and len(csv) == 3 * 2 * len(default_strategies(cube))
    assert paths["strategies_figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = paths["report"].read_text()
    assert "## Strategies compared" in report and "![strategies: mean regret per strategy](strategies.png)" in report
    first = strategies_display(csv).iloc[0]
    assert f"| {first['regret [95% CI]']} |" in report
    assert "p_one_sided" in report and "significant**" not in report
    summary = json.loads(paths["summary"].read_text())
    assert len(summary["strategies"]) == len(csv)
    assert {"p_one_sided", "agrees", "verdict"} <= set(summary["table2"][0])
