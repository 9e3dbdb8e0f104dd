"""The sweep (AUROC cube) and the selection statistics against naive per-task references."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import kendalltau
from sklearn.metrics import roc_auc_score

from swsa_engine.run.task_groups import TaskGroup, pad_rows
from swsa_engine.core.selection import (
    SelectionContext, as_weights, create_strategy, evaluate_weights, list_strategies, ranking_table,
    register_strategy, selection_table,
)
from swsa_engine.core.cube import AurocCube, grouped_auroc
from swsa_engine.run.cube_io import load_cube, save_cube
from swsa_engine.run.knn_sweep import score_group
from swsa_store.registry import UnknownNameError


def _naive_knn(query, bank, k):
    distances = ((bank - query) ** 2).sum(axis=1)
    return np.sort(distances)[:k].sum()


def test_grouped_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(11)
    n_tasks, n_queries, n_groups = 7, 60, 4
    scores = rng.integers(0, 5, size=(n_tasks, n_queries)).astype(float)  # heavy ties
    labels = rng.choice([-1, 0, 1], size=(n_tasks, n_queries), p=[0.2, 0.4, 0.4]).astype(np.int8)
    groups = rng.integers(0, n_groups, size=(n_tasks, n_queries))
    labels[3, groups[3] == 2] = np.where(labels[3, groups[3] == 2] == 1, 0, labels[3, groups[3] == 2])  # empty group
    result = grouped_auroc(scores, labels, groups, n_groups)
    for t in range(n_tasks):
        for g in range(n_groups):
            chosen = (labels[t] == 0) | ((labels[t] == 1) & (groups[t] == g))
            y = labels[t, chosen] == 1
            if y.all() or not y.any():
                assert np.isnan(result[t, g])
            else:
                assert result[t, g] == pytest.approx(roc_auc_score(y, scores[t, chosen]), abs=1e-12)


def _random_group(rng, n_tasks=5, dim=6, n_classes=4):
    """Features for a small dataset and a TaskGroup over it with ragged memberships."""
    n_images = 400
    features = rng.normal(size=(n_images, dim)) + rng.integers(0, 3, size=(n_images, 1))
    ids = rng.permutation(n_images)
    support, heldout, synth_a, synth_b = [], [], [], []
    cursor = 0
    for t in range(n_tasks):
        n_support = int(rng.integers(6, 15))
        s = np.sort(ids[cursor : cursor + n_support]); cursor += n_support
        support.append(s)
        heldout.append(np.sort(rng.choice(s, size=int(rng.integers(2, len(s))), replace=False)))
        synth_a.append(np.sort(ids[cursor : cursor + int(rng.integers(3, 12))])); cursor += len(synth_a[-1])
        synth_b.append(np.sort(ids[cursor : cursor + int(rng.integers(1, 8))])); cursor += len(synth_b[-1])
    real_ids = np.sort(ids[cursor : cursor + 80])
    real_label = rng.choice([-1, 0, 1], size=(n_tasks, len(real_ids)), p=[0.1, 0.3, 0.6]).astype(np.int8)
    real_group = np.where(real_label == 1, rng.integers(0, n_classes, size=real_label.shape), -1)
    group = TaskGroup("d", np.arange(n_tasks), pad_rows(support), pad_rows(heldout),
                      {"a": pad_rows(synth_a), "b": pad_rows(synth_b)}, real_ids, real_label, real_group,
                      np.array([f"c{i}" for i in range(n_classes)], dtype=object))
    return features, group, support, heldout, {"a": synth_a, "b": synth_b}


def _block_diagonal(group, rng):
    """Each task gets its own real validation images (a product's test set, as in MVTec-AD)."""
    n_tasks, n_real = group.real_label.shape
    owner = rng.integers(0, n_tasks, size=n_real)
    label = np.where(owner[None, :] == np.arange(n_tasks)[:, None], rng.integers(0, 2, size=(n_tasks, n_real)), -1)
    group.real_label = label.astype(np.int8)
    group.real_group = np.where(label == 1, rng.integers(0, len(group.group_names), size=label.shape), -1)
    return group


@pytest.mark.parametrize("k, layout", [(1, "shared"), (3, "shared"), (3, "per-task")])
def test_score_group_matches_naive_per_task_loop(k, layout):
    rng = np.random.default_rng(5 + k)
    features, group, support, heldout, synth = _random_group(rng)
    if layout == "per-task":
        group = _block_diagonal(group, rng)
    usable = np.ones(len(features), bool)
    out = score_group(features, usable, group, ["a", "b"], k=k, hardest=(3,))
    for t in range(len(support)):
        bank = features[support[t]]
        # real validation
        real_scores = np.array([_naive_knn(features[i], bank, k) for i in group.real_ids])
        member = group.real_label[t] >= 0
        y = group.real_label[t, member] == 1
        assert out["real"][t, 0] == pytest.approx(roc_auc_score(y, real_scores[member]), abs=1e-12)
        per_class = []
        for g in range(len(group.group_names)):
            chosen = (group.real_label[t] == 0) | ((group.real_label[t] == 1) & (group.real_group[t] == g))
            yy = group.real_label[t, chosen] == 1
            per_class.append(roc_auc_score(yy, real_scores[chosen]) if 0 < yy.sum() < len(yy) else np.nan)
        np.testing.assert_allclose(out["per_class"][t], per_class, atol=1e-12)
        assert out["real"][t, 1] == pytest.approx(np.nanmin(per_class), abs=1e-12)
        # synthetic validation: held-out normals leave-one-out
        normal_scores = []
        for i in heldout[t]:
            rest = support[t][support[t] != i]
            normal_scores.append(_naive_knn(features[i], features[rest], k))
        columns = []
        hard = []
        for source in ("a", "b"):
            anomaly_scores = np.array([_naive_knn(features[i], bank, k) for i in synth[source][t]])
            scores = np.concatenate([normal_scores, anomaly_scores])
            labels = np.r_[np.zeros(len(normal_scores)), np.ones(len(anomaly_scores))]
            columns.append(roc_auc_score(labels, scores))
            hardest = np.sort(anomaly_scores)[:3]
            hard.append(roc_auc_score(np.r_[np.zeros(len(normal_scores)), np.ones(len(hardest))],
                                      np.concatenate([normal_scores, hardest])))
        np.testing.assert_allclose(out["synthetic"][t], columns + hard, atol=1e-12)


def test_score_group_records_k_too_large_and_unusable_rows():
    rng = np.random.default_rng(2)
    features, group, support, _, _ = _random_group(rng)
    usable = np.ones(len(features), bool)
    small = int(np.argmin([len(s) for s in support]))
    out = score_group(features, usable, group, ["a", "b"], k=len(support[small]))
    assert np.isnan(out["real"][small]).all()
    assert any(t == small and "needs at least" in reason for t, reason in out["skips"])
    # an image whose embedding failed leaves the bank, the task is still scored
    usable[support[0][0]] = False
    out = score_group(features, usable, group, ["a", "b"], k=1)
    assert np.isfinite(out["real"][0]).all()


def _cube(rng, n_tasks=12, n_candidates=5):
    real = rng.uniform(0.5, 1.0, size=(n_tasks, n_candidates, 2))
    real[0, :, :] = 0.9  # ties everywhere in one task
    synthetic = np.clip(real[:, :, [0]] + rng.normal(0, 0.05, size=(n_tasks, n_candidates, 3)), 0, 1)
    return AurocCube(
        tasks=pd.DataFrame({"task_id": np.arange(n_tasks), "dataset": np.where(np.arange(n_tasks) < 7, "x", "y"),
                            "normal_class": [f"c{i}" for i in range(n_tasks)]}),
        candidates=pd.DataFrame({"name": [f"m{i}" for i in range(n_candidates)], "n_params": [10, 50, 20, 40, 30],
                                 "feature_dim": 8, "weights_kind": "random", "family": "resnet"}),
        sources=["s1", "s2", "s1@hard10"], real=real, synthetic=synthetic,
        per_class=np.full((n_tasks, n_candidates, 1), np.nan), class_names=np.full((n_tasks, 1), "", dtype=object),
        config={"k": 3, "base_sources": ["s1", "s2"]},
    )


def test_selection_table_matches_naive_loop():
    rng = np.random.default_rng(9)
    cube = _cube(rng)
    table = selection_table(cube).set_index(["dataset", "setting", "strategy"])
    for dataset in ("x", "y"):
        rows = np.flatnonzero(cube.tasks["dataset"] == dataset)
        for s, setting in enumerate(("one-vs-rest", "one-vs-closest")):
            hits, aurocs = [], []
            for t in rows:
                real = cube.real[t, :, s]
                best = real.max()
                synth = cube.synthetic[t, :, 0]
                winners = np.flatnonzero(synth == synth.max())
                hits.append(np.mean([real[w] == best for w in winners]))
                aurocs.append(np.mean([real[w] for w in winners]))
            row = table.loc[(dataset, setting, "SWSA (s1)")]
            assert row["picks"] == pytest.approx(sum(hits))
            assert row["auroc"] == pytest.approx(np.mean(aurocs))
            assert row["best"] == pytest.approx(np.mean(cube.real[rows, :, s].max(axis=1)))
            largest = table.loc[(dataset, setting, "Largest model")]
            assert largest["auroc"] == pytest.approx(np.mean(cube.real[rows, 1, s]))
            random = table.loc[(dataset, setting, "Random (expected)")]
            assert random["auroc"] == pytest.approx(np.mean(cube.real[rows, :, s].mean(axis=1)))
            oracle = table.loc[(dataset, setting, "Best model (oracle)")]
            assert oracle["pick_rate"] == 1.0 and oracle["auroc"] == pytest.approx(oracle["best"])


def test_ranking_table_matches_scipy():
    rng = np.random.default_rng(4)
    cube = _cube(rng)
    table = ranking_table(cube)
    assert len(table) == 2 * 2 * 3
    row = table[(table.dataset == "y") & (table.setting == "one-vs-closest") & (table.source == "s2")].iloc[0]
    rows = cube.tasks["dataset"].to_numpy() == "y"
    expected = kendalltau(cube.synthetic[rows, :, 1].mean(axis=0), cube.real[rows, :, 1].mean(axis=0))
    assert row["tau"] == pytest.approx(expected.statistic, abs=1e-12)
    assert row["p_value"] == pytest.approx(expected.pvalue, abs=1e-12)
    assert row["bonferroni_threshold"] == pytest.approx(0.05 / 12)
    per_task = [kendalltau(cube.synthetic[t, :, 1], cube.real[t, :, 1]).statistic for t in np.flatnonzero(rows)]
    assert row["mean_task_tau"] == pytest.approx(np.nanmean(per_task), abs=1e-12)


def test_strategy_registry_and_custom_strategy():
    assert {"swsa", "largest", "random", "oracle", "swsa_mean", "swsa_rank"} <= set(list_strategies())
    with pytest.raises(UnknownNameError, match="unknown selection strategy .nope.. Valid names: .*swsa"):
        create_strategy("nope")

    @register_strategy("test_worst_synthetic")
    def worst(**_):
        return lambda ctx: np.nanargmin(ctx.source("s1"), axis=1)

    cube = _cube(np.random.default_rng(1))
    table = selection_table(cube, [("worst", "test_worst_synthetic", {})])
    assert set(table["strategy"]) == {"worst"}
    with pytest.raises(ValueError, match="unknown validation source 'zz'"):
        create_strategy("swsa", source="zz")(SelectionContext(cube.synthetic, tuple(cube.sources), ("s1",), cube.candidates, cube.real[:, :, 0]))


def test_evaluate_weights_and_nan_rows():
    real = np.array([[0.6, 0.9, 0.9], [0.7, np.nan, 0.8]])
    weights = as_weights(np.array([1, 0]), 3)
    out = evaluate_weights(weights, real)
    assert out["hit"][0] == 1.0 and out["auroc"][0] == 0.9
    assert np.isnan(out["hit"][1])
    with pytest.raises(ValueError, match=r"must return \(T,\) indices or \(T, 3\) weights"):
        as_weights(np.zeros((2, 4)), 3)


def test_cube_save_and_load(tmp_path):
    from swsa_store import create_store

    path = create_store(tmp_path / "s.h5")
    cube = _cube(np.random.default_rng(3))
    save_cube(cube, path)
    back = load_cube(path)
    np.testing.assert_array_equal(back.real, cube.real)
    np.testing.assert_array_equal(back.synthetic, cube.synthetic)
    assert back.sources == cube.sources and back.candidate_names == cube.candidate_names
    pd.testing.assert_frame_equal(back.tasks, cube.tasks, check_dtype=False)


def test_score_group_whole_bank_refinement_matches_naive_loop(monkeypatch):
    """Scores the candidate refinement cannot certify go to the whole-bank float64 route: forcing
    every one there still gives the naive loop's AUROCs (and the route is really taken)."""
    import swsa_engine.run.knn_sweep as knn_sweep

    real_candidates = knn_sweep.exact_knn_candidates
    calls = []

    def never_certified(*args, **kwargs):
        scores, certified = real_candidates(*args, **kwargs)
        calls.append(int(certified.sum()))
        return scores, np.zeros_like(certified)

    monkeypatch.setattr(knn_sweep, "exact_knn_candidates", never_certified)
    test_score_group_matches_naive_per_task_loop(3, "per-task")
    test_score_group_matches_naive_per_task_loop(1, "shared")
    assert calls and sum(calls) > 0  # there were refinements, and all of them went the whole-bank way


def test_exact_scores_refines_every_kept_knn_score_and_keeps_the_aurocs():
    """With exact_scores every per-image score equals the float64 brute force (not only those an
    AUROC depends on); without it some differ by float32 round-off; the AUROCs are the same."""
    rng = np.random.default_rng(21)
    features, group, support, heldout, synth = _random_group(rng, dim=40)
    features = (features * 1000.0).astype(np.float32)  # float32 rows: the bounded kernels run
    usable = np.ones(len(features), bool)
    plain = score_group(features, usable, group, ["a", "b"], k=3, hardest=(3,))
    exact = score_group(features, usable, group, ["a", "b"], k=3, hardest=(3,), exact_scores=True)
    np.testing.assert_array_equal(plain["real"], exact["real"])
    np.testing.assert_array_equal(plain["synthetic"], exact["synthetic"])
    f64 = features.astype(np.float64)
    for t in range(len(support)):
        want = np.array([_naive_knn(f64[i], f64[support[t]], 3) for i in group.real_ids])
        got = exact["scores"]["real"][exact["scores"]["rows"].tolist().index(t)]
        member = group.real_label[t] >= 0
        np.testing.assert_allclose(got[member], want[member], rtol=1e-12)
    loose = plain["scores"]["real"][0][group.real_label[0] >= 0]
    tight = exact["scores"]["real"][0][group.real_label[0] >= 0]
    assert np.abs(loose - tight).max() > 0  # the default leaves float32 round-off in some kept scores
