"""The field's metrics per candidate (AUPR, F1-max, FPR@95TPR) from the score cube, selection by any
of them (``swsa report --metric``), and the label-free thresholds' real rates in the report."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pandas as pd
import pytest

from swsa_engine.app.bench_store import make_paper_store
from swsa_engine.app.cli import main
from swsa_engine.core.cube import SETTINGS
from swsa_engine.core.metric_cube import (RECOMMENDED_BY_AUROC, metric_arrays, metric_cube, metric_strategies,
                                          require_scores)
from swsa_engine.core.score_cube import ScoreCube
from swsa_engine.core.selection import create_strategy, default_strategies, selection_context, selection_table
from swsa_engine.core.threshold_comparison import first_picks, quantile_rule, threshold_comparison
from swsa_engine.report.html import write_html_report
from swsa_engine.report.tables import read_csv
from swsa_engine.run.cube_io import load_cube
from swsa_engine.run.sweep import run_sweep
from reference_metrics import sklearn_detection_metrics

KEYS = ("aupr", "f1_max", "fpr_at_95_tpr")


def random_score_cube(seed: int = 0) -> ScoreCube:
    """4 tasks × 3 candidates, ragged (-1 padded) real and synthetic sets, tied scores, NaN scores, a
    class out of one task's one-vs-rest set, a task without anomalies of one class, a candidate that
    scored nothing on one task, and sources with fewer anomalies than the hardest N."""
    rng = np.random.default_rng(seed)
    n_tasks, n_candidates, width, n_groups, w_synth = 4, 3, 40, 3, 30
    label = np.full((n_tasks, width), -1, dtype=np.int8)
    group = np.full((n_tasks, width), -1, dtype=np.int64)
    part = np.full((n_tasks, w_synth), -1, dtype=np.int8)
    for t in range(n_tasks):
        n = width - 3 * t
        label[t, :n] = rng.permutation(np.r_[np.zeros(n // 2), np.ones(n - n // 2)])
        group[t, :n] = np.where(label[t, :n] == 1, rng.integers(0, n_groups, n), -1)
        if t == 2:
            group[t][group[t] == 1] = 0  # no anomaly of class 1
        w = w_synth - 2 * t
        part[t, :w] = rng.permutation(np.r_[np.zeros(12), np.ones(10), np.full(w - 22, 2)])
    in_rest = (label == 0) | ((label == 1) & ~((np.arange(n_tasks)[:, None] == 1) & (group == 2)))
    real = np.round(rng.normal(size=(n_tasks, n_candidates, width)) + label[:, None] * 0.8, 1)  # ties
    synth = np.round(rng.normal(size=(n_tasks, n_candidates, w_synth)) + (part[:, None] > 0) * 0.7, 1)
    real[:, 1][rng.random((n_tasks, width)) < 0.1] = np.nan
    synth[:, 1][rng.random((n_tasks, w_synth)) < 0.1] = np.nan
    real[3, 2], synth[3, 2] = np.nan, np.nan
    real[np.broadcast_to(label[:, None] < 0, real.shape)] = np.nan
    synth[np.broadcast_to(part[:, None] < 0, synth.shape)] = np.nan
    return ScoreCube(np.arange(n_tasks) + 10, ["a", "b", "c"], ["s1", "s2"], np.where(label >= 0, 1, -1), label,
                     in_rest, group, np.array([["x", "y", "z"]] * n_tasks, dtype=object), real,
                     np.where(part >= 0, 1, -1), part, synth)


def test_metric_arrays_equal_sklearn_per_cell():
    scores = random_score_cube()
    hardest = (4, 6)
    arrays = metric_arrays(scores, hardest)
    assert arrays["sources"] == ["s1", "s2", "s1@hard4", "s1@hard6", "s2@hard4", "s2@hard6"]
    n_tasks, n_candidates, _ = scores.real_scores.shape
    for t in range(n_tasks):
        for c in range(n_candidates):
            real, label = scores.real_scores[t, c], scores.real_label[t]
            ok = np.isfinite(real) & (label >= 0)
            rest = ok & scores.real_in_rest[t]
            expected = {"rest": sklearn_detection_metrics(real[rest], label[rest] == 1)}
            per_class = np.array([sklearn_detection_metrics(real[ok & ((label == 0) | (scores.real_group[t] == g))],
                                                label[ok & ((label == 0) | (scores.real_group[t] == g))] == 1)
                                  for g in range(3)])
            synth, part = scores.synthetic_scores[t, c], scores.synthetic_part[t]
            normal = synth[(part == 0) & np.isfinite(synth)]
            columns = []
            for v in (1, 2):
                anomalies = np.sort(synth[(part == v) & np.isfinite(synth)])
                columns.append([anomalies] + [anomalies[:n] for n in hardest])
            ordered = [columns[0][0], columns[1][0], columns[0][1], columns[0][2], columns[1][1], columns[1][2]]
            synthetic = np.array([sklearn_detection_metrics(np.r_[normal, a], np.r_[np.zeros(len(normal)), np.ones(len(a))])
                                  for a in ordered])
            for m, key in enumerate(KEYS):
                got = arrays[key]
                np.testing.assert_allclose(got["real"][t, c, 0], expected["rest"][m], rtol=0, atol=1e-12)
                np.testing.assert_allclose(got["per_class"][t, c], per_class[:, m], rtol=0, atol=1e-12)
                worst = np.nan if np.isnan(per_class[:, m]).all() else (
                    np.nanmax(per_class[:, m]) if key == "fpr_at_95_tpr" else np.nanmin(per_class[:, m]))
                np.testing.assert_allclose(got["real"][t, c, 1], worst, rtol=0, atol=1e-12)
                np.testing.assert_allclose(got["synthetic"][t, c], synthetic[:, m], rtol=0, atol=1e-12)
    assert np.isnan(arrays["aupr"]["real"][3, 2]).all() and np.isnan(arrays["aupr"]["per_class"][2, :, 1]).all()
    assert np.isfinite(arrays["aupr"]["real"][:3]).all()


def naive_f1_threshold(scores, labels):
    """The F1-optimal threshold by trying every distinct score (highest first: ties keep the highest)."""
    best, threshold = -1.0, np.nan
    for u in np.unique(scores)[::-1]:
        flagged = scores >= u
        f1 = 2 * (flagged & labels).sum() / (flagged.sum() + labels.sum())
        if f1 > best:
            best, threshold = f1, u
    return threshold


def test_threshold_comparison_equals_a_naive_loop():
    scores = random_score_cube(1)
    picks = np.array([0, 1, -1, 1])
    table = threshold_comparison(scores, picks, quantiles=(0.9, 0.99))
    assert set(table["task_id"]) == {10, 11, 13}  # no pick: no rows
    assert list(table.loc[table["task_id"] == 10, "rule"]) == [quantile_rule(0.9), quantile_rule(0.99), "synthetic_f1",
                                                                "real_f1_max"]
    for t in (0, 1, 3):
        c = picks[t]
        synth, part = scores.synthetic_scores[t, c], scores.synthetic_part[t]
        ok = np.isfinite(synth) & (part >= 0)
        normals = np.sort(synth[ok & (part == 0)])
        real, label = scores.real_scores[t, c], scores.real_label[t]
        test = np.isfinite(real) & (label >= 0) & scores.real_in_rest[t]
        expected = {}
        for q in (0.9, 0.99):
            rank = int(np.ceil((len(normals) + 1) * q - 1e-12))
            expected[quantile_rule(q)] = (normals[rank - 1] if rank <= len(normals) else np.inf, 1 - q)
        f1_value = naive_f1_threshold(synth[ok], part[ok] > 0)
        expected["synthetic_f1"] = (f1_value, (normals >= f1_value).mean())
        expected["real_f1_max"] = (naive_f1_threshold(real[test], label[test] == 1), np.nan)
        rows = table[table["task_id"] == 10 + t].set_index("rule")
        for rule, (value, stated) in expected.items():
            row = rows.loc[rule]
            assert row["threshold"] == value and row["candidate"] == scores.candidates[c]
            np.testing.assert_allclose(row["stated_fpr"], stated, rtol=0, atol=1e-12)
            assert row["uses_labels"] == (rule == "real_f1_max")
            if not np.isfinite(value):
                assert np.isnan(row[["real_precision", "real_recall", "real_fpr"]].astype(float)).all()
                continue
            flagged, anomaly = real[test] >= value, label[test] == 1
            assert row["real_precision"] == pytest.approx((flagged & anomaly).sum() / flagged.sum(), abs=1e-12)
            assert row["real_recall"] == pytest.approx((flagged & anomaly).sum() / anomaly.sum(), abs=1e-12)
            assert row["real_fpr"] == pytest.approx((flagged & ~anomaly).sum() / (~anomaly).sum(), abs=1e-12)
            assert row["n_real_normal"] == (~anomaly).sum() and row["n_heldout_normal"] == len(normals)
    assert np.isinf(table.loc[table["rule"] == quantile_rule(0.99), "threshold"]).all()  # 12 normals: too few
    with pytest.raises(ValueError, match=r"picks must hold one candidate index per task, shape \(4,\)"):
        threshold_comparison(scores, np.array([0, 1]))
    with pytest.raises(ValueError, match=r"candidate indices in \[0, 3\) or -1"):
        threshold_comparison(scores, np.array([0, 1, 5, 0]))
    np.testing.assert_array_equal(first_picks(np.array([[0.5, 0.5, 0.0], [np.nan] * 3, [0, 0, 1.0]])), [0, -1, 2])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A small paper-shaped store (four datasets), swept with two detectors and the ensembles."""
    path = tmp_path_factory.mktemp("metric") / "s.h5"
    make_paper_store(path, task_fraction=0.03, image_fraction=0.25, synthetic=16,
                     backbones={"resnet18": (48, 11), "vit": (32, 5)}, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_sweep(path, progress=False, detectors=["knn(k=3)", "mahalanobis"])
    return path


def test_metric_cube_orients_masks_and_keeps_auroc_untouched(store):
    cube = load_cube(store)
    assert metric_cube(cube, "auroc") is cube and metric_strategies(cube, "auroc") == default_strategies(cube)
    raw = metric_arrays(cube.scores, tuple(cube.config["hardest"]))
    fpr = metric_cube(cube, "fpr95")
    finite = np.isfinite(cube.real)
    np.testing.assert_array_equal(fpr.real[finite], 1.0 - raw["fpr_at_95_tpr"]["real"][finite])
    assert fpr.config["metric"] == "fpr95" and cube.config.get("metric") is None and fpr.sources == cube.sources
    # a cell the AUROC cube leaves out (self-validation) stays out of the metric cube
    masked = dataclasses.replace(cube, synthetic=np.where(np.arange(len(cube.sources)) == 0, np.nan, cube.synthetic))
    assert np.isnan(metric_cube(masked, "aupr").synthetic[:, :, 0]).all()
    assert np.isfinite(metric_cube(cube, "aupr").synthetic[:, :, 0]).any()
    with pytest.raises(ValueError, match=r"--metric aupr needs the per-image scores.*re-run `swsa score`"):
        metric_cube(dataclasses.replace(cube, scores=None), "aupr")
    with pytest.raises(ValueError, match="other tasks or candidates"):
        require_scores(dataclasses.replace(cube, scores=cube.scores.take(np.arange(2))), "f1max")
    with pytest.raises(ValueError, match="unknown metric 'auc'; choose one of auroc, aupr, f1max, fpr95"):
        metric_cube(cube, "auc")


def test_recommendation_keeps_its_auroc_rule_on_a_metric_cube(store):
    cube = load_cube(store)
    ranked = metric_cube(cube, "aupr")
    rows = np.flatnonzero(cube.tasks["dataset"].to_numpy() == cube.tasks["dataset"].iloc[0])
    expected = create_strategy("recommended")(selection_context(cube, rows, 0))
    got = create_strategy(RECOMMENDED_BY_AUROC)(selection_context(ranked, rows, 0))
    np.testing.assert_array_equal(got, expected)
    with pytest.raises(ValueError, match="do not reproduce the cube's synthetic AUROCs"):  # why it needs its own row
        create_strategy("recommended")(selection_context(ranked, rows, 0))
    assert RECOMMENDED_BY_AUROC in [name for _, name, _ in metric_strategies(cube, "aupr")]


def test_report_selects_and_measures_by_the_metric(store, tmp_path, capsys):
    out = tmp_path / "aupr"
    assert main(["report", "--store", str(store), "--out", str(out), "--metric", "aupr", "--quiet"]) == 0
    cube = load_cube(store)
    scores = cube.scores
    table1 = pd.read_csv(out / "table1.csv")
    metrics = read_csv(out / "metrics.csv")
    single = ~cube.candidates["name"].str.startswith("ensemble(").to_numpy()
    source = cube.sources.index("cutpaste")
    for dataset in cube.tasks["dataset"].unique():
        rows = np.flatnonzero(cube.tasks["dataset"].to_numpy() == dataset)
        real = np.full((len(rows), len(cube.candidates)), np.nan)
        synthetic = np.full_like(real, np.nan)
        for i, t in enumerate(rows):
            for c in np.flatnonzero(single):
                value, label = scores.real_scores[t, c], scores.real_label[t]
                keep = np.isfinite(value) & (label >= 0) & scores.real_in_rest[t]
                real[i, c] = sklearn_detection_metrics(value[keep], label[keep] == 1)[0]
                value, part = scores.synthetic_scores[t, c], scores.synthetic_part[t]
                keep = np.isfinite(value) & ((part == 0) | (part == 1 + scores.sources.index("cutpaste")))
                synthetic[i, c] = sklearn_detection_metrics(value[keep], part[keep] > 0)[0]
        synthetic[np.isnan(cube.synthetic[rows, :, source])] = np.nan
        shown = table1[(table1["dataset"] == dataset) & (table1["setting"] == SETTINGS[0])].set_index("strategy")
        defined = ~np.isnan(real[:, single]).any(axis=1)
        assert shown.loc["Best model (oracle)", "auroc"] == pytest.approx(np.nanmax(real, axis=1)[defined].mean(), abs=1e-12)
        pick = np.nanargmax(np.where(np.isnan(synthetic), -np.inf, synthetic), axis=1)
        assert shown.loc["SWSA (cutpaste)", "auroc"] == pytest.approx(real[np.arange(len(rows)), pick][defined].mean(),
                                                                      abs=1e-12)
        rest = metrics[(metrics["dataset"] == dataset) & (metrics["setting"] == SETTINGS[0])]
        got = rest.pivot(index="task_id", columns="candidate", values="aupr")[cube.candidate_names].to_numpy()
        np.testing.assert_allclose(got[:, single], real[:, single], rtol=0, atol=1e-12)
    assert json.loads((out / "summary.json").read_text())["selection_metric"] == "aupr"
    text = (out / "report.md").read_text()
    assert "**Selection metric: AUPR**" in text and "| AUPR of pick |" in text
    assert "## The field's metrics per candidate" in text and "## Label-free thresholds on the real test images" in text
    assert set(read_csv(out / "thresholds.csv")["rule"]) == {quantile_rule(0.99), quantile_rule(0.95), "synthetic_f1",
                                                              "real_f1_max"}
    # the default report: AUROC, Table 1 exactly as selection_table computes it
    assert main(["report", "--store", str(store), "--out", str(tmp_path / "auroc"), "--quiet"]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "auroc" / "table1.csv"), selection_table(cube),
                                      check_dtype=False, rtol=0, atol=0)
    assert "Selection metric" not in (tmp_path / "auroc" / "report.md").read_text()
    page = write_html_report(cube, None, tmp_path / "r.html", report_dir=out, metric="aupr").read_text()
    assert "Selection metric: AUPR" in page and 'id="metrics"' in page and 'id="thresholds"' in page


def test_report_metric_option_documented_and_checked(store, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    help_text = capsys.readouterr().out
    assert "--metric {auroc,aupr,f1max,fpr95}" in help_text and "1 - FPR" in help_text
    with pytest.raises(SystemExit):
        main(["report", "--store", str(store), "--out", str(tmp_path / "x"), "--metric", "auc"])
    assert "invalid choice: 'auc'" in capsys.readouterr().err
