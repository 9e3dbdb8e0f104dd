"""Float32 kNN scores with error bounds, and the rank certificate that keeps every AUROC exact."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from swsa_engine.core.knn import knn_score_batched, knn_score_batched_bounded, knn_score_bounded
from swsa_engine.core.metrics import auroc
from swsa_engine.core.certified import hardest_uncertain, order_uncertain
from swsa_engine.run.knn_sweep import score_group
from test_sweep import _naive_knn, _random_group


def _brute(queries, features, bank_index, k):
    return np.array([[_naive_knn(q, features[row[row >= 0]], k) for q in queries] for row in bank_index])


@pytest.mark.parametrize("dim, offset, scale", [(5, 0.0, 1.0), (300, 50.0, 1.0), (700, 0.0, 1e-3), (40, 1e4, 10.0)])
def test_bounded_scores_lie_within_their_bounds(dim, offset, scale):
    rng = np.random.default_rng(dim)
    features = offset + scale * rng.standard_normal((300, dim))
    queries = offset + scale * rng.standard_normal((90, dim))
    bank_index = rng.permutation(300)[:240].reshape(24, 10)
    bank_index[5, 6:] = -1
    bank_index[7, :] = bank_index[8, :]  # two tasks with the same bank
    for k in (1, 3):
        scores, bounds = knn_score_bounded(queries, features, bank_index, k)
        exact = _brute(queries, features, bank_index, k)
        assert scores.shape == bounds.shape == exact.shape
        assert (np.abs(scores - exact) <= bounds).all()
        # the bound is useful: far below the spread of the scores
        assert np.median(bounds / exact) < 1e-4


@pytest.mark.parametrize("dim, offset", [(3, 0.0), (520, 20.0)])
def test_batched_bounded_scores_lie_within_their_bounds(dim, offset):
    rng = np.random.default_rng(dim + 1)
    queries = offset + rng.standard_normal((6, 30, dim))
    banks = offset + rng.standard_normal((6, 9, dim))
    query_mask = rng.random((6, 30)) < 0.85
    bank_mask = np.ones((6, 9), bool)
    bank_mask[4, 6:] = False
    exclude = np.where(rng.random((6, 30)) < 0.5, rng.integers(0, 9, (6, 30)), -1)
    scores, bounds = knn_score_batched_bounded(queries, banks, 3, query_mask=query_mask, bank_mask=bank_mask, exclude=exclude)
    exact = knn_score_batched(queries, banks, 3, query_mask=query_mask, bank_mask=bank_mask, exclude=exclude)
    for t in range(6):  # the reference loop agrees with the exact function
        for w in np.flatnonzero(query_mask[t])[:3]:
            rows = [i for i in np.flatnonzero(bank_mask[t]) if i != exclude[t, w]]
            assert exact[t, w] == pytest.approx(_naive_knn(queries[t, w], banks[t, rows], 3), rel=1e-12)
    assert np.isnan(scores[~query_mask]).all() and (bounds[~query_mask] == 0).all()
    assert (np.abs(scores - exact)[query_mask] <= bounds[query_mask]).all()


def test_bounded_scores_validate_their_input():
    features = np.zeros((10, 4))
    with pytest.raises(ValueError, match="k=3 is larger than the support set of 1 task"):
        knn_score_bounded(np.zeros((2, 4)), features, np.array([[0, 1, -1]]), 3)
    with pytest.raises(ValueError, match="must share D"):
        knn_score_bounded(np.zeros((2, 5)), features, np.array([[0, 1, 2]]), 1)
    bad = features.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="features rows used by a bank contains NaN or inf"):
        knn_score_bounded(np.zeros((2, 4)), bad, np.array([[0, 1, 2]]), 1)
    queries = np.zeros((1, 2, 4))
    queries[0, 1, 0] = np.inf
    with pytest.raises(ValueError, match="queries contains NaN or inf at task 0, row 1"):
        knn_score_batched_bounded(queries, np.zeros((1, 3, 4)), 1)
    # a masked-out query may hold anything
    scores, _ = knn_score_batched_bounded(queries, np.zeros((1, 3, 4)), 1, query_mask=np.array([[True, False]]))
    assert scores[0, 0] == 0.0 and np.isnan(scores[0, 1])


def _naive_uncertain(scores, bounds, labels):
    out = np.zeros(scores.shape, bool)
    for t in range(scores.shape[0]):
        member = labels[t] >= 0
        width = 2 * bounds[t, member].max(initial=0.0)
        for i in np.flatnonzero(labels[t] == 0):
            for j in np.flatnonzero(labels[t] == 1):
                if abs(scores[t, i] - scores[t, j]) <= width:
                    out[t, i] = out[t, j] = True
    return out


def test_order_uncertain_matches_pairwise_loop():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 40, size=(9, 50)) + rng.uniform(0, 0.5, size=(9, 50))
    bounds = rng.uniform(0, 0.2, size=(9, 50))
    labels = rng.choice([-1, 0, 1], size=(9, 50), p=[0.2, 0.3, 0.5]).astype(np.int8)
    labels[2] = np.where(labels[2] == 0, 1, labels[2])  # a task without normals
    np.testing.assert_array_equal(order_uncertain(scores, bounds, labels), _naive_uncertain(scores, bounds, labels))


def test_refining_the_uncertain_scores_gives_the_exact_auroc():
    """Any approximation within its bounds, with the uncertain scores made exact, ranks normals
    against anomalies exactly as the exact scores do: identical AUROCs, ties included."""
    rng = np.random.default_rng(8)
    for _ in range(50):
        exact = rng.integers(0, 12, size=(6, 40)).astype(float)  # many exact ties
        bounds = np.full(exact.shape, rng.uniform(0.05, 0.8))
        approx = exact + rng.uniform(-1, 1, size=exact.shape) * bounds
        labels = rng.choice([0, 1], size=exact.shape).astype(np.int8)
        mixed = np.where(order_uncertain(approx, bounds, labels), exact, approx)
        np.testing.assert_array_equal(auroc(mixed, labels == 1), auroc(exact, labels == 1))


def test_hardest_set_with_uncertain_scores_made_exact_is_the_exact_one():
    rng = np.random.default_rng(12)
    for _ in range(100):
        exact = rng.integers(0, 15, size=(5, 25)).astype(float)
        bounds = np.full(exact.shape, rng.uniform(0.05, 1.5))
        approx = exact + rng.uniform(-1, 1, size=exact.shape) * bounds
        mask = rng.random(exact.shape) < 0.9
        n = int(rng.integers(1, 12))
        mixed = np.where(hardest_uncertain(approx, bounds, mask, n), exact, approx)
        for t in range(5):
            chosen = np.sort(mixed[t, mask[t]])[:n]
            # the same images (their exact values) as the n lowest exact scores
            chosen_ids = np.flatnonzero(mask[t])[np.argsort(mixed[t, mask[t]], kind="stable")[:n]]
            np.testing.assert_array_equal(np.sort(exact[t, chosen_ids]), np.sort(exact[t, mask[t]])[:n])
            assert len(chosen) == min(n, mask[t].sum())


def test_sweep_refines_tied_scores_and_matches_sklearn():
    """Integer features tie exactly, so the float32 path must hand many scores to the exact one."""
    rng = np.random.default_rng(21)
    features, group, support, heldout, synth = _random_group(rng, dim=6)
    features = np.round(features)
    out = score_group(features, np.ones(len(features), bool), group, ["a", "b"], k=2, hardest=(3,))
    assert out["refined_scores"] > 0
    for t in range(len(support)):
        scores = np.array([_naive_knn(features[i], features[support[t]], 2) for i in group.real_ids])
        member = group.real_label[t] >= 0
        assert out["real"][t, 0] == pytest.approx(roc_auc_score(group.real_label[t, member] == 1, scores[member]), abs=1e-12)
        normal = [_naive_knn(features[i], features[support[t][support[t] != i]], 2) for i in heldout[t]]
        for column, source in enumerate(("a", "b")):
            anomalies = np.array([_naive_knn(features[i], features[support[t]], 2) for i in synth[source][t]])
            for got, kept in ((out["synthetic"][t, column], anomalies), (out["synthetic"][t, 2 + column], np.sort(anomalies)[:3])):
                want = roc_auc_score(np.r_[np.zeros(len(normal)), np.ones(len(kept))], np.r_[normal, kept])
                assert got == pytest.approx(want, abs=1e-12)


def _naive_tasks(features, query_ids, bank_ids, exclude, k):
    out = np.full(query_ids.shape, np.nan)
    for t, w in zip(*np.nonzero(query_ids >= 0)):
        rows = [b for j, b in enumerate(bank_ids[t]) if b >= 0 and j != exclude[t, w]]
        out[t, w] = _naive_knn(features[query_ids[t, w]], features[rows], k)
    return out


@pytest.mark.parametrize("dtype, dim", [(np.float32, 300), (np.float64, 520), (np.float32, 7)])
def test_exact_candidates_equal_brute_force_and_certify(dtype, dim):
    from swsa_engine.core.knn import bounded_knn_tasks, centre_rows, exact_knn_candidates

    rng = np.random.default_rng(dim)
    features = (5.0 + rng.standard_normal((200, dim))).astype(dtype)
    features[150] = features[3]  # an exact duplicate bank row: ties among candidates
    bank_ids = rng.permutation(150)[:60].reshape(4, 15)
    bank_ids[0, 3] = 3
    bank_ids[1, 5] = 150
    bank_ids[1, 6] = 3
    bank_ids[2, 12:] = -1
    query_ids = rng.integers(0, 200, (4, 25))
    query_ids[:, 20:] = -1
    exclude = np.where(rng.random((4, 25)) < 0.4, rng.integers(0, 12, (4, 25)), -1)
    exclude[query_ids < 0] = -1
    rows = centre_rows(features, np.r_[query_ids[query_ids >= 0], bank_ids[bank_ids >= 0]], bank_ids[bank_ids >= 0])
    expected = _naive_tasks(features.astype(np.float64), query_ids, bank_ids, exclude, 3)
    approx, bounds = bounded_knn_tasks(rows, query_ids, bank_ids, 3, exclude=exclude)
    assert (np.abs(approx - expected)[query_ids >= 0] <= bounds[query_ids >= 0]).all()
    scores, certified = exact_knn_candidates(rows, query_ids, bank_ids, 3, exclude=exclude)
    assert certified[query_ids < 0].all() and np.isnan(scores[query_ids < 0]).all()
    assert certified.mean() > 0.9  # certification is the rule, not the exception
    np.testing.assert_allclose(scores[certified & (query_ids >= 0)], expected[certified & (query_ids >= 0)], rtol=1e-12)


def test_centre_rows_names_the_bad_row_and_falls_back_when_unsafe():
    from swsa_engine.core.knn import bounded_knn_shared, centre_rows

    features = np.ones((6, 4), dtype=np.float32)
    features[4, 1] = np.inf
    with pytest.raises(ValueError, match="features row 4 contains NaN or inf"):
        centre_rows(features, np.arange(6), np.arange(3))
    huge = np.random.default_rng(0).standard_normal((6, 4)) * 1e20  # squared norms beyond float32's safe range
    rows = centre_rows(huge, np.arange(6), np.arange(4))
    assert not rows.safe
    scores, bounds = bounded_knn_shared(rows, np.array([4, 5]), np.array([[0, 1, 2, 3]]), 2)
    assert (bounds == 0).all()
    np.testing.assert_allclose(scores[0], [_naive_knn(huge[q], huge[:4], 2) for q in (4, 5)], rtol=1e-12)
