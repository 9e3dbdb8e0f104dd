"""Ensembles as candidates, and the label-free strategies that read per-image scores."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from swsa_engine.app.cli import main
from swsa_engine.core.ensemble_pass import ENSEMBLE_FAMILY, SELECTED, ensemble_candidates, ensemble_specs
from swsa_engine.core.ensembles import greedy_ensemble_weights, shuffled_buckets
from swsa_engine.core.label_free import model_centrality
from swsa_engine.core.score_cube import ScoreCube, score_aurocs
from swsa_engine.core.selection import (DEFAULT_LABELS, MissingScoresWarning, create_strategy, default_strategies,
                                        list_strategies, selection_context, selection_table)
from swsa_engine.core.strategy_comparison import strategies_table
from swsa_engine.run.cube_io import load_cube
from swsa_engine.run.sweep import run_sweep

from test_score_cube import DETECTORS, store  # noqa: F401  (the module's store fixture)

HARDEST = (4, 2)


def _score_cube(seed=3):
    """4 tasks × 6 candidates (3 backbones × 2 detectors), integer scores (ties), ragged pools:
    f3/d2 has random weights, f3/d1 is constant on task 1, f1/d2 misses synthetic scores on task 2."""
    rng = np.random.default_rng(seed)
    n_tasks, n_real, width, n_groups = 4, 30, 26, 3
    real_label = rng.choice([-1, 0, 1], size=(n_tasks, n_real), p=[0.15, 0.45, 0.4]).astype(np.int8)
    real_label[:, :2], real_label[:, 2:4] = 0, 1
    real_group = np.where(real_label == 1, rng.integers(0, n_groups, size=real_label.shape), -1)
    in_rest = (real_label == 0) | ((real_label == 1) & (real_group != 2))
    part = rng.choice([-1, 0, 1, 2], size=(n_tasks, width), p=[0.1, 0.4, 0.3, 0.2]).astype(np.int8)
    part[:, :3], part[:, 3:5], part[:, 5:7] = 0, 1, 2
    real_scores = np.where(real_label[:, None] >= 0, rng.integers(0, 7, size=(n_tasks, 6, n_real)), np.nan)
    synthetic_scores = np.where(part[:, None] >= 0, rng.integers(0, 7, size=(n_tasks, 6, width)), np.nan)
    real_scores[:, 0] += 3 * real_label[:, :]  # one informative candidate
    real_scores[1, 4] = np.where(real_label[1] >= 0, 2.0, np.nan)
    synthetic_scores[1, 4] = np.where(part[1] >= 0, 2.0, np.nan)
    synthetic_scores[2, 1, part[2] == 2] = np.nan
    names = [f"f{b}/d{d}" for b in (1, 2, 3) for d in (1, 2)]
    scores = ScoreCube(np.arange(10, 10 + n_tasks), names, ["s1", "s2"], np.where(real_label >= 0, 1, -1) *
                       np.arange(n_real), real_label, in_rest, real_group,
                       np.array([["g0", "g1", "g2"]] * n_tasks, dtype=object), real_scores,
                       np.where(part >= 0, np.arange(width), -1), part, synthetic_scores)
    candidates = pd.DataFrame({"name": names, "feature": [f"f{b}" for b in (1, 2, 3) for _ in (1, 2)],
                               "detector": ["d1", "d2"] * 3, "n_params": [1, 1, 2, 2, 3, 3], "feature_dim": 4,
                               "weights_kind": ["pretrained"] * 5 + ["random"], "family": "x"})
    return scores, candidates


def _naive_members(t, members):
    """The exclusion rule of the fixture's candidates, written out."""
    excluded = {5}  # random weights
    if t == 1:
        excluded.add(4)  # constant
    if t == 2:
        excluded.add(1)  # synthetic scores missing
    return [c for c in members if c not in excluded]


def _naive_rank(values):
    return (rankdata(values, method="average") - 1) / (len(values) - 1)


def _naive_combine(matrix, method, weights=None):
    """matrix (M, N) normalised scores of the members → (N,) with a loop over images."""
    n_members = matrix.shape[0]
    buckets = shuffled_buckets(n_members, min(5, n_members)) if method in ("aom", "moa") else None
    out = []
    for column in matrix.T:
        if method == "mean":
            out.append(np.mean(column) if weights is None else np.sum(weights * column) / np.sum(weights))
        elif method == "max":
            out.append(max(column))
        elif method == "median":
            out.append(np.median(column))
        elif method == "aom":
            out.append(np.mean([max(column[b]) for b in buckets]))
        else:
            out.append(max(np.mean(column[b]) for b in buckets))
    return np.asarray(out)


def _naive_aurocs(scores, t, real, synth):
    """(one-vs-rest, one-vs-closest), {source column: AUROC} with sklearn."""
    label, group = scores.real_label[t], scores.real_group[t]
    rest = (label >= 0) & scores.real_in_rest[t]
    out_real = [roc_auc_score(label[rest] == 1, real[rest])]
    per_group = []
    for g in range(3):
        chosen = (label == 0) | ((label == 1) & (group == g))
        if (label[chosen] == 1).any():
            per_group.append(roc_auc_score(label[chosen] == 1, real[chosen]))
    out_real.append(min(per_group))
    part = scores.synthetic_part[t]
    normals = synth[part == 0]
    synthetic = []
    for v in (1, 2):
        anomalies = synth[part == v]
        synthetic.append(roc_auc_score(np.r_[np.zeros(len(normals)), np.ones(len(anomalies))], np.r_[normals, anomalies]))
    for v in (1, 2):
        for n in HARDEST:
            hard = np.sort(synth[part == v])[:n]
            synthetic.append(roc_auc_score(np.r_[np.zeros(len(normals)), np.ones(len(hard))], np.r_[normals, hard]))
    return out_real, synthetic


def test_ensembles_equal_sklearn_on_naively_combined_scores():
    scores, candidates = _score_cube()
    result = ensemble_candidates(scores, candidates, hardest=HARDEST)
    specs = {s.name: s for s in ensemble_specs(candidates)}
    assert list(result.candidates["name"]) == list(specs) == [
        "ensemble(mean)", "ensemble(max)", "ensemble(median)", "ensemble(aom)", "ensemble(moa)",
        "ensemble(mean, backbone=f1)", "ensemble(mean, backbone=f2)", "ensemble(mean, backbone=f3)",
        "ensemble(mean, detector=d1)", "ensemble(mean, detector=d2)", SELECTED]
    assert (result.candidates["family"] == ENSEMBLE_FAMILY).all()
    every = tuple(range(6))
    expected_members = {"ensemble(mean, backbone=f1)": (0, 1), "ensemble(mean, backbone=f2)": (2, 3),
                        "ensemble(mean, backbone=f3)": (4, 5), "ensemble(mean, detector=d1)": (0, 2, 4),
                        "ensemble(mean, detector=d2)": (1, 3, 5)}
    assert {name: spec.members for name, spec in specs.items()} == {name: expected_members.get(name, every) for name in specs}
    n_single = len(candidates)
    checked = 0
    for k, (name, spec) in enumerate(specs.items()):
        assert result.config["ensembles"][name]["members"] == [candidates["name"][c] for c in spec.members]
        for t in range(len(scores.task_ids)):
            members = _naive_members(t, spec.members)
            real_pool, synth_pool = scores.real_label[t] >= 0, scores.synthetic_part[t] >= 0
            if not members:
                assert np.isnan(result.real[t, k]).all() and np.isnan(result.scores.real_scores[t, n_single + k]).all()
                continue
            real = np.stack([_naive_rank(scores.real_scores[t, c][real_pool]) for c in members])
            synth = np.stack([_naive_rank(scores.synthetic_scores[t, c][synth_pool]) for c in members])
            method, weights = spec.method, None
            if method == "selected":
                parts = scores.synthetic_part[t][synth_pool]
                weights = greedy_ensemble_weights(synth[None], parts[None], 2)[0]
                method = "mean"
                recorded = result.config["ensembles"][name]["weights"][int(scores.task_ids[t])]
                assert recorded == {candidates["name"][c]: round(float(w), 6) for c, w in zip(members, weights) if w > 0}
            combined_real = np.full(real_pool.shape, np.nan)
            combined_real[real_pool] = _naive_combine(real, method, weights)
            combined_synth = np.full(synth_pool.shape, np.nan)
            combined_synth[synth_pool] = _naive_combine(synth, method, weights)
            np.testing.assert_allclose(result.scores.real_scores[t, n_single + k], combined_real, atol=1e-12)
            np.testing.assert_allclose(result.scores.synthetic_scores[t, n_single + k], combined_synth, atol=1e-12)
            expected_real, expected_synthetic = _naive_aurocs(scores, t, combined_real, combined_synth)
            np.testing.assert_allclose(result.real[t, k], expected_real, atol=1e-12, err_msg=(name, t))
            np.testing.assert_allclose(result.synthetic[t, k], expected_synthetic, atol=1e-12, err_msg=(name, t))
            checked += 1
    assert checked >= 40
    # the AUROCs are those score_aurocs gives every candidate
    again = score_aurocs(result.scores, HARDEST)
    np.testing.assert_array_equal(again["real"][:, n_single:], result.real)


def test_exclusions_are_recorded_never_silent():
    scores, candidates = _score_cube()
    result = ensemble_candidates(scores, candidates, hardest=HARDEST)
    skips = pd.DataFrame(result.skips, columns=["task_id", "candidate", "reason"])
    mean = skips[skips["candidate"] == "ensemble(mean)"]
    random_rows = mean[mean["reason"].str.contains("because its weights are random")]
    assert list(random_rows["task_id"]) == [10, 11, 12, 13]
    assert random_rows["reason"].iloc[0] == ("ensemble(mean) leaves out 1 member(s) because its weights are random "
                                             "(weights_kind 'random'): f3/d2")
    assert mean["reason"].str.contains(r"constant on the task's real test images or synthetic validation queries: f3/d1").sum() == 1
    assert mean["reason"].str.contains(r"leaves out 1 member\(s\) because \d+ of the task's synthetic validation queries "
                                       r"have no finite score .*: f1/d2").sum() == 1
    for weights in result.config["ensembles"]["ensemble(mean)"]["weights"].values():
        assert "f3/d2" not in weights
    assert "f3/d1" not in result.config["ensembles"]["ensemble(mean)"]["weights"][11]
    # an ensemble with no member left on some task: NaN there and said so
    assert any("has no member left on the task" in reason for _, _, reason in result.skips) or np.isfinite(result.real).all()
    # an ensemble with no eligible member on any task is not built, and the config says why
    only_random = ensemble_candidates(scores, candidates.assign(weights_kind="random"), hardest=HARDEST)
    assert len(only_random.candidates) == 0 and only_random.real.shape[1] == 0
    assert set(only_random.config["not_built"]) == {name for name in result.config["ensembles"]}
    assert all("no member is eligible on any task" in why for why in only_random.config["not_built"].values())


def test_normalisation_never_sees_a_label():
    scores, candidates = _score_cube()
    flipped = ScoreCube(scores.task_ids, scores.candidates, scores.sources, scores.real_ids,
                        np.where(scores.real_label >= 0, 1 - scores.real_label, -1).astype(np.int8), scores.real_in_rest,
                        scores.real_group, scores.group_names, scores.real_scores, scores.synthetic_ids,
                        np.where(scores.synthetic_part > 0, 3 - scores.synthetic_part, scores.synthetic_part).astype(np.int8),
                        scores.synthetic_scores)
    a = ensemble_candidates(scores, candidates, hardest=HARDEST).scores
    b = ensemble_candidates(flipped, candidates, hardest=HARDEST).scores
    k = slice(len(candidates), len(candidates) + 10)  # every ensemble but the selected one (chosen on the parts)
    np.testing.assert_array_equal(a.real_scores[:, k], b.real_scores[:, k])
    np.testing.assert_array_equal(a.synthetic_scores[:, k], b.synthetic_scores[:, k])


def test_sweep_appends_ensembles_and_their_scores(store):  # noqa: F811
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cube = run_sweep(store, progress=False, save=False, detectors=DETECTORS)
    family = cube.candidates["family"].to_numpy()
    # 5 over all, 2 per backbone, 2 per detector, selected — but mahalanobis cannot leave out diffusion's two
    # parents under leak-free, so neither of its members is eligible anywhere: that ensemble is not built
    assert (family == ENSEMBLE_FAMILY).sum() == 9
    assert "no member is eligible on any task" in cube.config["ensembles"]["not_built"]["ensemble(mean, detector=mahalanobis)"]
    assert cube.config["ensembles"]["ensembles"]["ensemble(mean)"]["members"] == list(cube.candidate_names[:4])
    assert cube.scores.candidates == cube.candidate_names
    aurocs = score_aurocs(cube.scores, tuple(cube.config["hardest"]))
    for key in ("real", "per_class", "synthetic"):
        np.testing.assert_array_equal(aurocs[key], getattr(cube, key), err_msg=key)
    # mahalanobis cannot leave out diffusion's two parents under leak-free: out of the ensembles, said so
    assert cube.skips["reason"].str.contains("ensemble\\(mean\\) leaves out 2 member\\(s\\) because .* synthetic "
                                             "validation queries have no finite score").any()


def test_strategies_registered_and_in_the_tables(store):  # noqa: F811
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cube = run_sweep(store, progress=False, save=False, detectors=DETECTORS)
    assert {"model_centrality", "rra", "random", "largest"} <= set(list_strategies())
    assert DEFAULT_LABELS["rra"] == "SWSA (robust rank aggregation)"
    labels = [label for label, _, _ in default_strategies(cube)]
    for label in ("Model centrality (Ma et al. 2021)", "SWSA (robust rank aggregation)", "Random (expected)",
                  "ensemble(mean)", "ensemble(selected)", "ensemble(mean, detector=knn(k=3,l2))"):
        assert label in labels
    table = selection_table(cube)
    single = cube.candidates["family"].to_numpy() != ENSEMBLE_FAMILY
    for s, setting in enumerate(("one-vs-rest", "one-vs-closest")):
        for dataset in cube.tasks["dataset"].unique():
            rows = np.flatnonzero(cube.tasks["dataset"].to_numpy() == dataset)
            real = cube.real[rows][:, single, s]
            ok = ~np.isnan(real).any(axis=1)
            row = table[(table["dataset"] == dataset) & (table["setting"] == setting)].set_index("strategy")
            # random: the mean over the single candidates; the oracle: the best single candidate
            assert row.loc["Random (expected)", "auroc"] == pytest.approx(real[ok].mean(axis=1).mean(), abs=1e-12)
            assert row.loc["Best model (oracle)", "auroc"] == pytest.approx(real[ok].max(axis=1).mean(), abs=1e-12)
            ensemble = cube.real[rows][:, cube.candidate_names.index("ensemble(mean)"), s]
            assert row.loc["ensemble(mean)", "auroc"] == pytest.approx(ensemble[ok].mean(), abs=1e-12)
            # model centrality: argmax over the single candidates of core.label_free on the real test images
            mc = model_centrality(cube.scores.real_scores[rows][:, single], cube.scores.real_pool[rows])
            picked = np.take_along_axis(real, np.argmax(mc, axis=1)[:, None], axis=1)[:, 0]
            assert row.loc["Model centrality (Ma et al. 2021)", "auroc"] == pytest.approx(picked[ok].mean(), abs=1e-12)
    comparison = strategies_table(cube, n_resamples=50)
    assert {"Model centrality (Ma et al. 2021)", "SWSA (robust rank aggregation)", "ensemble(mean)"} <= set(comparison["strategy"])
    oracle = comparison[comparison["strategy"] == "Best model (oracle)"]
    assert (oracle["mean_regret"].abs() < 1e-12).all()


def test_strategies_without_scores_give_nan_picks_with_a_reason(store):  # noqa: F811
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cube = run_sweep(store, progress=False, save=False, detectors=DETECTORS, keep_scores=False)
    ctx = selection_context(cube, np.arange(len(cube.tasks)), 0)
    with pytest.warns(MissingScoresWarning, match=r"model_centrality: the cube holds no per-image scores, which "
                                                  r"model_centrality needs, so it gives no pick; re-run `swsa score`"):
        picks = create_strategy("model_centrality")(ctx)
    assert np.isnan(picks).all()
    assert np.isfinite(create_strategy("rra")(ctx)).all()  # needs only the synthetic AUROCs


def test_score_command_without_ensembles(store, tmp_path):  # noqa: F811
    path = tmp_path / "s.h5"
    path.write_bytes(store.read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["score", "--store", str(path), "--detectors", ";".join(DETECTORS), "--no-ensembles", "--quiet"]) == 0
    cube = load_cube(path)
    assert len(cube.candidates) == 4 and cube.scores is not None and not cube.config["ensembles_built"]
