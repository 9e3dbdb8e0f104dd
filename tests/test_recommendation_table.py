"""Issue 25, the rest: the report's per-task "recommendation and its reason" table (recommendation.csv,
its Markdown section, the HTML drill-down), checked against Table 1's "Recommended (swsa)" row and
the rule written out; and z-score normalisation of ensemble members from the CLI (`swsa score
--ensemble-normalisation zscore`), checked against a naive per-task loop, with rank the bit-identical default."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pandas as pd
import pytest

from swsa_engine.app.bench_store import make_paper_store
from swsa_engine.app.cli import main
from swsa_engine.core.cube import SETTINGS
from swsa_engine.core.ensemble_pass import ENSEMBLE_FAMILY, SELECTED
from swsa_engine.core.recommendation import ENSEMBLE_MEAN, RECOMMENDED_LABEL, THRESHOLD
from swsa_engine.core.selection import selection_table
from swsa_engine.report.html import write_html_report
from swsa_engine.report.recommendation_table import RECOMMENDATION_COLUMNS, recommendation_table
from swsa_engine.report.summary import write_report
from swsa_engine.run.bundle_ensemble import member_weights
from swsa_engine.run.cube_io import load_cube
from swsa_engine.run.sweep import run_sweep
from swsa_store.csv_safe import read_csv

from test_strategies import _cube

DETECTORS = ["knn(k=3)", "mahalanobis"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A small paper-shaped store (11 tasks over 4 datasets, 2 backbones, 3 synthetic sources)."""
    path = tmp_path_factory.mktemp("recommendation") / "s.h5"
    make_paper_store(path, task_fraction=0.03, image_fraction=0.25, synthetic=16,
                     backbones={"resnet18": (48, 11), "vit": (32, 5)}, progress=False)
    return path


def _sweep(store, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_sweep(store, progress=False, detectors=DETECTORS, save=False, **kwargs)


@pytest.fixture(scope="module")
def cube(store):
    return _sweep(store)


def _quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


# --------------------------------------------------------------------------- the recommendation table


def test_table_explains_table1s_recommended_row(cube):
    table = _quiet(recommendation_table, cube)
    assert list(table.columns) == RECOMMENDATION_COLUMNS and len(table) == len(cube.tasks) * len(SETTINGS)
    table1 = _quiet(selection_table, cube)
    row = table1[table1["strategy"] == RECOMMENDED_LABEL].set_index(["dataset", "setting"])
    mean_real = table.groupby(["dataset", "setting"])["real_auroc"].mean()
    for key, value in mean_real.items():  # the table's choices are the ones Table 1 scores
        assert value == pytest.approx(row.loc[key, "auroc"], abs=1e-12), key
    names = cube.candidate_names
    single = (cube.candidates["family"] != ENSEMBLE_FAMILY).to_numpy()
    base = [cube.sources.index(s) for s in cube.config["base_sources"]]
    for r in table.itertuples():
        t = int(np.flatnonzero(cube.tasks["task_id"].to_numpy() == r.task_id)[0])
        s = SETTINGS.index(r.setting)
        # the single challenger: the best mean synthetic AUROC over the base sources, written out
        means = [np.nanmean(cube.synthetic[t, c, base]) if single[c] else -np.inf for c in range(len(names))]
        assert r.single_pick == " | ".join(names[c] for c in range(len(names)) if means[c] == max(means))
        assert r.synthetic_mean == pytest.approx(np.nanmean(cube.synthetic[t, names.index(ENSEMBLE_MEAN), base]))
        # the rule, from the table's own numbers
        passes_single, passes_selected = r.p_single_beats_mean >= THRESHOLD, r.p_selected_beats_mean >= THRESHOLD
        if passes_single and passes_selected:
            expected = "single" if r.synthetic_single > r.synthetic_selected else SELECTED
        else:
            expected = "single" if passes_single else SELECTED if passes_selected else ENSEMBLE_MEAN
        assert (r.recommendation, r.decided_by) == (expected, "bootstrap")
        runs = r.single_pick if expected == "single" else expected
        assert r.runs == runs and f"{r.p_single_beats_mean:.1%}" in r.reason
        ran = [names.index(n) for n in runs.split(" | ")]
        assert r.real_auroc == pytest.approx(np.mean(cube.real[t, ran, s]), abs=1e-12)
        best = max(cube.real[t, c, s] for c in range(len(names)) if single[c])
        assert r.best_single_real_auroc == best and r.regret == pytest.approx(best - r.real_auroc, abs=1e-12)
        weights = cube.config["ensembles"]["ensembles"].get(r.recommendation, {}).get("weights", {}).get(r.task_id, {})
        assert (pd.isna(r.members) if expected == "single" else r.members == len(weights))
        if expected == SELECTED:
            shown = dict(item.split("=") for item in r.member_weights.split("; "))
            assert {k: float(v) for k, v in shown.items()} == pytest.approx(weights, abs=1e-3)
    # the rule reads no real label: the same choice in every setting
    assert (table.groupby("task_id")["runs"].nunique() == 1).all()
    assert set(table["recommendation"]) >= {ENSEMBLE_MEAN}


def test_report_writes_recommendation_csv_markdown_and_html(cube, tmp_path):
    paths = _quiet(write_report, cube, tmp_path / "report")
    table = read_csv(paths["recommendation_csv"])
    expected = _quiet(recommendation_table, cube)
    np.testing.assert_allclose(table["regret"], expected["regret"], rtol=0, atol=1e-12)
    assert table["runs"].tolist() == expected["runs"].tolist()
    report = paths["report"].read_text()
    section = report[report.index("## The recommendation per task"):]
    section = section[:section.index("\n## ")]
    first = expected[expected["setting"] == SETTINGS[0]]
    counts = first["recommendation"].value_counts()
    assert f"{counts[ENSEMBLE_MEAN]} of {len(first)} tasks" in section
    assert "95% of 200 bootstrap resamples" in section and "mid-ranks scaled to [0, 1] (rank)" in section
    for r in first.itertuples():
        assert re.search(rf"\| {re.escape(r.normal_class)} \| {re.escape(r.recommendation)} \| .* \| "
                         rf"{r.p_single_beats_mean:.3f} \| {r.p_selected_beats_mean:.3f} \|", section), r.normal_class
    html_path = _quiet(write_html_report, cube, None, tmp_path / "r.html", report_dir=tmp_path / "report")
    page = html_path.read_text()
    task = int(first["task_id"].iloc[0])
    payload = json.loads(re.search(rf'<script type="application/json" id="task-{task}">(.*?)</script>', page, re.S)
                         .group(1).replace("<\\/", "</"))
    rec = payload["recommendation"]
    assert rec["choice"] == first["recommendation"].iloc[0] and rec["reason"] == first["reason"].iloc[0]
    assert rec["p_single"] == f"{first['p_single_beats_mean'].iloc[0]:.3f}"
    assert set(rec["regret"]) == set(SETTINGS)
    assert "The recommendation and why" in page and "mid-ranks scaled to [0, 1] (rank)" in page


def test_fallbacks_are_said_with_their_reason(tmp_path):
    cube = _cube(np.random.default_rng(5))  # no per-image scores, no ensembles
    table = _quiet(recommendation_table, cube)
    assert (table["decided_by"] == "fallback").all() and (table["recommendation"] == "single").all()
    assert table["reason"].str.contains("fallback: the cube has no ensemble\\(mean\\)").all()
    assert table["p_single_beats_mean"].isna().all() and table["members"].isna().all()
    report = _quiet(write_report, cube, tmp_path)["report"].read_text()
    assert "Decided without the bootstrap test:" in report
    assert f"the SWSA mean-of-sources pick ({len(cube.tasks)} tasks)" in report
    assert "Ensemble members' scores" not in report  # no ensembles: no normalisation line


# --------------------------------------------------------------------------- z-score ensembles from the CLI


def _naive_zscore_mean(values: np.ndarray) -> np.ndarray:
    """(M, N) members' scores of one task's pool → (N,) mean of their population z-scores (0 if constant)."""
    out = []
    for row in values:
        std = row.std()
        out.append((row - row.mean()) / std if std > 0 else np.zeros_like(row))
    return np.mean(out, axis=0)


def test_zscore_ensemble_equals_a_naive_loop_and_rank_stays_the_default(store, cube):
    zscore = _sweep(store, ensemble_normalisation="zscore")
    rank = _sweep(store, ensemble_normalisation="rank")
    for name in ("real", "synthetic", "per_class"):  # default == explicit rank, bit for bit
        np.testing.assert_array_equal(getattr(cube, name), getattr(rank, name))
    np.testing.assert_array_equal(cube.scores.real_scores, rank.scores.real_scores)
    assert cube.config["ensemble_normalisation"] == "rank" and zscore.config["ensemble_normalisation"] == "zscore"
    assert {e["normalisation"] for e in zscore.config["ensembles"]["ensembles"].values()} == {"zscore"}
    single = (cube.candidates["family"] != ENSEMBLE_FAMILY).to_numpy()
    np.testing.assert_array_equal(zscore.real[:, single], cube.real[:, single])  # single candidates untouched
    c = zscore.candidate_names.index(ENSEMBLE_MEAN)
    scores = zscore.scores
    weights = zscore.config["ensembles"]["ensembles"][ENSEMBLE_MEAN]["weights"]
    checked = 0
    for t, task_id in enumerate(scores.task_ids):
        members = [scores.candidates.index(m) for m in weights[int(task_id)]]
        # the pools core normalises over: the task's images that some single candidate scored
        pool = scores.real_pool[t] & np.isfinite(scores.real_scores[t][single]).any(axis=0)
        expected = _naive_zscore_mean(scores.real_scores[t, members][:, pool])
        np.testing.assert_allclose(scores.real_scores[t, c, pool], expected, rtol=1e-12, atol=1e-12)
        synth_pool = (scores.synthetic_part[t] >= 0) & np.isfinite(scores.synthetic_scores[t][single]).any(axis=0)
        expected = _naive_zscore_mean(scores.synthetic_scores[t, members][:, synth_pool])
        np.testing.assert_allclose(scores.synthetic_scores[t, c, synth_pool], expected, rtol=1e-12, atol=1e-12)
        checked += 1
    assert checked == len(scores.task_ids)
    assert not np.array_equal(zscore.scores.real_scores[:, c], cube.scores.real_scores[:, c])


def test_score_cli_takes_the_normalisation_stores_it_and_the_report_shows_it(store, tmp_path, capsys):
    assert main(["score", "--store", str(store), "--detectors", "knn(k=3)", "--hardest", "4",
                 "--ensemble-normalisation", "zscore", "--quiet"]) == 0
    cube = load_cube(store)
    assert cube.config["ensemble_normalisation"] == "zscore"
    report = _quiet(write_report, cube, tmp_path / "report")["report"].read_text()
    assert "z-scores, (score − mean) / std (zscore)" in report
    task_id = int(cube.tasks["task_id"].iloc[0])
    with pytest.raises(ValueError, match="built on zscore-normalised scores, and a bundle reproduces rank normalisation "
                                         "only; re-run `swsa score` without --ensemble-normalisation"):
        member_weights(cube.config, ENSEMBLE_MEAN, task_id)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["score", "--store", str(store), "--ensemble-normalisation", "minmax"])
    assert "--ensemble-normalisation: invalid choice: 'minmax'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="normalisation 'minmax' is unknown; choose one of rank, zscore"):
        run_sweep(store, ensemble_normalisation="minmax", progress=False)
