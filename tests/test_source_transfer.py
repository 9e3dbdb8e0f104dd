"""The transfer check (issue 25's synthetic evidence): each synthetic source left out in turn — against
naive loops on a cube with ties and a candidate undefined on one source, the recommendation on a
held-out view against the rule run on physically deleted columns, ScoreCube.without_source against
sklearn, the errors, and the report's transfer.csv / Markdown / HTML sections."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from swsa_engine.core.cube import AurocCube
from swsa_engine.core.ensemble_pass import ENSEMBLE_FAMILY, SELECTED
from swsa_engine.core.recommendation import ENSEMBLE_MEAN, recommend
from swsa_engine.core.score_cube import ScoreCube
from swsa_engine.core.selection import (STRATEGIES, SelectionContext, as_weights, create_strategy, reads_synthetic,
                                        register_strategy, swsa_mean)
from swsa_engine.core.source_transfer import ALL_HELD_OUT, held_out_context, transfer_summary, transfer_table
from swsa_engine.core.synthetic_resampling import part_aurocs_finite
from swsa_engine.report.html import write_html_report
from swsa_engine.report.summary import write_report
from swsa_engine.report.transfer_tables import transfer_verdict

SOURCES = ["s1", "s2", "s3"]
ALL_SOURCES = SOURCES + ["s1@hard10", "s2@hard10", "s3@hard10"]
SINGLES = ["m0", "m1", "m2", "m3", "m4"]
NAMES = SINGLES + [ENSEMBLE_MEAN, SELECTED]
STRATEGIES = [("SWSA (mean of sources)", "swsa_mean", {}), ("SWSA (s1)", "swsa", {"source": "s1"}),
              ("Random (expected)", "random", {}), (ENSEMBLE_MEAN, "fixed", {"candidate": ENSEMBLE_MEAN}),
              (SELECTED, "fixed", {"candidate": SELECTED}), ("Best model (oracle)", "oracle", {})]


def _cube(seed=0, n_tasks=9) -> AurocCube:
    """AUROCs rounded to 0.05 (ties); m4 has no AUROC on s1 (as NAGL has none on cutpaste)."""
    rng = np.random.default_rng(seed)
    synthetic = np.round(rng.uniform(0.4, 1.0, size=(n_tasks, len(NAMES), len(ALL_SOURCES))) * 20) / 20
    synthetic[:, 4, [0, 3]] = np.nan
    real = np.round(rng.uniform(0.5, 1.0, size=(n_tasks, len(NAMES), 2)) * 20) / 20
    candidates = pd.DataFrame({"name": NAMES, "n_params": [1, 2, 3, 4, 5, 0, 0], "feature_dim": 8,
                               "weights_kind": "pretrained", "family": ["knn"] * 5 + [ENSEMBLE_FAMILY] * 2})
    tasks = pd.DataFrame({"task_id": np.arange(n_tasks), "dataset": np.where(np.arange(n_tasks) < 5, "x", "y"),
                          "normal_class": [f"c{i}" for i in range(n_tasks)]})
    return AurocCube(tasks=tasks, candidates=candidates, sources=list(ALL_SOURCES), real=real, synthetic=synthetic,
                     per_class=np.full((n_tasks, len(NAMES), 1), np.nan),
                     class_names=np.full((n_tasks, 1), "", dtype=object), config={"k": 3, "base_sources": SOURCES})


def _naive_regrets(cube: AurocCube, rows: np.ndarray, held: str) -> dict[str, list[float]]:
    """Per strategy, per task: regret on ``held`` written out with plain loops (NaN: not evaluated)."""
    h = SOURCES.index(held)
    others = [v for v in range(3) if v != h]
    out = {label: [] for label, _, _ in STRATEGIES}
    for t in rows:
        truth = cube.synthetic[t, :, h]
        defined = [c for c in range(5) if not np.isnan(cube.synthetic[rows, c, h]).any()]
        best = max(truth[c] for c in defined)

        def regret(cs):  # the expectation over a tied / spread pick, over the candidates defined on h
            kept = [c for c in cs if not np.isnan(truth[c])]
            return best - sum(truth[c] for c in kept) / len(kept) if kept else np.nan

        crit = [np.nanmean(cube.synthetic[t, c, others]) for c in range(5)]
        top = max(crit)
        out["SWSA (mean of sources)"].append(regret([c for c in range(5) if crit[c] == top]))
        if held != "s1":
            s1 = cube.synthetic[t, :5, 0]
            top1 = np.nanmax(s1)
            out["SWSA (s1)"].append(regret([c for c in range(5) if s1[c] == top1]))
        out["Random (expected)"].append(regret(range(5)))
        out[ENSEMBLE_MEAN].append(best - truth[5])
        out["Best model (oracle)"].append(regret([c for c in defined if truth[c] == best]))
    return out


def test_transfer_table_equals_naive_loops():
    cube = _cube()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = transfer_table(cube, STRATEGIES)
    assert SELECTED not in set(table["strategy"])  # its weights saw every source: never evaluated
    assert not ((table["strategy"] == "SWSA (s1)") & (table["held_out_source"] == "s1")).any()
    for dataset in ("x", "y"):
        rows = np.flatnonzero(cube.tasks["dataset"].to_numpy() == dataset)
        pooled: dict[str, list] = {}
        for held in SOURCES:
            for label, regrets in _naive_regrets(cube, rows, held).items():
                if not regrets:
                    continue
                pooled.setdefault(label, []).extend(regrets)
                got = table[(table.dataset == dataset) & (table.held_out_source == held) & (table.strategy == label)]
                values = np.asarray(regrets, dtype=float)
                assert int(got["tasks"].iloc[0]) == int(np.isfinite(values).sum())
                assert got["mean_regret"].iloc[0] == pytest.approx(np.nanmean(values), abs=1e-12), (dataset, held, label)
        for label, regrets in pooled.items():
            got = table[(table.dataset == dataset) & (table.held_out_source == ALL_HELD_OUT) & (table.strategy == label)]
            assert got["mean_regret"].iloc[0] == pytest.approx(np.nanmean(regrets), abs=1e-12)
    # a pick of m4 on s1 (undefined there) leaves its task out rather than counting it
    assert (table.loc[table.held_out_source == "s1", "tasks"] <= 5).all()
    grid = transfer_summary(table[table.dataset == "x"])
    assert list(grid.columns) == SOURCES + [ALL_HELD_OUT] and list(grid.index)[0] == "SWSA (mean of sources)"


def _scores(seed=1, n_tasks=4, width=48):
    rng = np.random.default_rng(seed)
    part = rng.choice([-1, 0, 1, 2, 3], size=(n_tasks, width), p=[0.1, 0.3, 0.2, 0.2, 0.2]).astype(np.int8)
    part[:, :4], part[:, 4:8], part[:, 8:12], part[:, 12:16] = 0, 1, 2, 3
    values = rng.integers(0, 5, size=(n_tasks, len(NAMES), width)).astype(float)
    values[:, 0] += 3 * (part > 0)  # m0 separates every source well: the single pick's share can pass the bar
    values = np.where(part[:, None] >= 0, values, np.nan)
    empty = np.full((n_tasks, 1), -1)
    cube = ScoreCube(np.arange(n_tasks), NAMES, SOURCES, empty, empty.astype(np.int8), empty >= 0, empty,
                     np.full((n_tasks, 1), "", dtype=object), np.full((n_tasks, len(NAMES), 1), np.nan),
                     np.where(part >= 0, np.arange(width), -1), part, values)
    return cube, part_aurocs_finite(values, part, 3)


def test_without_source_equals_sklearn_on_the_remaining_sources():
    scores, base = _scores()
    reduced = scores.without_source("s2")
    assert reduced.sources == ["s1", "s3"] and not (reduced.synthetic_part == 3).any()
    aurocs = part_aurocs_finite(reduced.synthetic_scores, reduced.synthetic_part, 2)
    for t in range(len(base)):
        for c in range(len(NAMES)):
            for v, source in enumerate(("s1", "s3")):
                keep = np.isin(scores.synthetic_part[t], [0, SOURCES.index(source) + 1])
                y = scores.synthetic_part[t, keep] > 0
                assert aurocs[t, c, v] == pytest.approx(roc_auc_score(y, scores.synthetic_scores[t, c, keep]), abs=1e-15)
    with pytest.raises(ValueError, match="unknown synthetic source 'nope'; the score cube holds: s1, s2, s3"):
        scores.without_source("nope")


def test_recommendation_on_a_held_out_view_is_the_rule_on_deleted_columns():
    scores, base = _scores()
    candidates = pd.DataFrame({"name": NAMES, "n_params": [1, 2, 3, 4, 5, 0, 0],
                               "family": ["knn"] * 5 + [ENSEMBLE_FAMILY] * 2})
    ctx = SelectionContext(synthetic=base, sources=tuple(SOURCES), base_sources=tuple(SOURCES), candidates=candidates,
                           real=np.full(base.shape[:2], 0.5), scores=scores)
    for held in SOURCES:
        view = held_out_context(ctx, held)
        np.testing.assert_array_equal(view.real[:, :6], base[:, :6, SOURCES.index(held)])
        assert np.isnan(view.real[:, 6]).all() and np.isnan(view.synthetic[:, 6]).all()
        kept = [v for v in range(3) if SOURCES[v] != held]
        keep_q = ~np.isin(scores.synthetic_part, [SOURCES.index(held) + 1])
        widths = keep_q.sum(axis=1)
        deleted_part = np.full((len(base), widths.max()), -1, dtype=np.int8)
        deleted_scores = np.full((len(base), len(NAMES), widths.max()), np.nan)
        for t in range(len(base)):  # physically delete the held-out queries and renumber the parts
            part = scores.synthetic_part[t, keep_q[t]]
            deleted_part[t, :widths[t]] = np.where(part > SOURCES.index(held) + 1, part - 1, part)
            deleted_scores[t, :, :widths[t]] = scores.synthetic_scores[t][:, keep_q[t]]
        deleted = ScoreCube(scores.task_ids, NAMES, [SOURCES[v] for v in kept], scores.real_ids, scores.real_label,
                            scores.real_in_rest, scores.real_group, scores.group_names, scores.real_scores,
                            np.where(deleted_part >= 0, 0, -1), deleted_part, deleted_scores)
        synth = base[:, :, kept].copy()
        synth[:, 6] = np.nan
        single = as_weights(swsa_mean()(view), len(NAMES))
        expected = recommend(synth, single, NAMES, tuple(SOURCES[v] for v in kept), deleted, n_resamples=30)
        got = create_strategy("recommended", n_resamples=30)(view)
        np.testing.assert_array_equal(got, expected.weights)
        assert not np.nan_to_num(got[:, 6]).any()  # never ensemble(selected) in a held-out view
        assert "single" in set(expected.choice)  # the test reaches the bootstrap's single branch


def test_held_out_errors_and_too_few_sources():
    cube = _cube()
    ctx = SelectionContext(synthetic=cube.synthetic, sources=tuple(ALL_SOURCES), base_sources=tuple(SOURCES),
                           candidates=cube.candidates, real=cube.real[:, :, 0])
    with pytest.raises(ValueError, match="'s1@hard10' is not a base synthetic source; the tasks have: s1, s2, s3"):
        held_out_context(ctx, "s1@hard10")
    one = SelectionContext(synthetic=cube.synthetic[:, :, :1], sources=("s1",), base_sources=("s1",),
                           candidates=cube.candidates, real=cube.real[:, :, 0])
    with pytest.raises(ValueError, match="needs at least two base sources"):
        held_out_context(one, "s1")
    view = held_out_context(ctx, "s2")
    assert view.sources == ("s1", "s3", "s1@hard10", "s3@hard10") and view.base_sources == ("s1", "s3")
    cube.config["base_sources"] = ["s1"]
    assert transfer_table(cube, STRATEGIES).empty


def test_report_writes_transfer_csv_markdown_and_html(tmp_path):
    cube = _cube(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paths = write_report(cube, tmp_path / "r")
        html_path = write_html_report(cube, None, tmp_path / "r" / "report.html", report_dir=tmp_path / "r")
    table = pd.read_csv(paths["transfer_csv"])
    assert set(table["held_out_source"]) == set(SOURCES) | {ALL_HELD_OUT}
    md = paths["report"].read_text(encoding="utf-8")
    assert "## Does the pick hold on an unseen kind of anomaly?" in md
    verdict = transfer_verdict(table, "x")
    pooled = table[(table.dataset == "x") & (table.held_out_source == ALL_HELD_OUT)].set_index("strategy")
    assert f"ensemble(mean) {pooled.loc[ENSEMBLE_MEAN, 'mean_regret']:.4f}" in verdict and verdict in md
    assert "transfer-0" in html_path.read_text(encoding="utf-8")


CALLS: list = []  # every run of the test strategy below


def _by_params(**_):
    def pick(ctx):
        CALLS.append(1)
        return np.full(ctx.shape[0], np.argmax(np.where(ctx.single, ctx.candidates["n_params"].to_numpy(), -1)))
    return pick


if "transfer_test_params" not in STRATEGIES:  # no default label: it joins no other test's tables
    register_strategy("transfer_test_params", reads_synthetic=False)(_by_params)


def test_a_strategy_that_reads_no_synthetic_set_runs_once_per_dataset():
    assert not reads_synthetic("transfer_test_params") and reads_synthetic("swsa_mean")
    assert not reads_synthetic("model_centrality") and not reads_synthetic("em")
    CALLS.clear()
    table = transfer_table(_cube(), [("params", "transfer_test_params", {}), ("Largest", "largest", {})])
    assert len(CALLS) == 2  # two datasets × three held-out sources: computed on each dataset's first view only
    mine, largest = (table[table.strategy == s].reset_index(drop=True) for s in ("params", "Largest"))
    assert len(mine) == 6  # (s2, s3, all) × 2 datasets: the largest, m4, has no AUROC on s1
    pd.testing.assert_frame_equal(mine.drop(columns="strategy"), largest.drop(columns="strategy"))
