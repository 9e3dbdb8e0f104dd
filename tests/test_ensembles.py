"""Ensembles (swsa_engine.core.ensembles) against scipy, PyOD's combination functions and naive loops."""

import numpy as np
import pytest
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score
from sklearn.utils import shuffle

from swsa_engine.core.ensembles import combine_scores, greedy_ensemble_weights, normalise_scores, shuffled_buckets
from swsa_engine.core.synthetic_resampling import part_aurocs_finite

combination = pytest.importorskip("pyod.models.combination", reason="PyOD's combination needs pyod and combo")


def tied_scores(seed, shape):
    return np.random.default_rng(seed).integers(0, 5, size=shape).astype(float)


def test_rank_normalisation_is_scaled_midranks_over_the_masked_images():
    scores = tied_scores(0, (4, 3, 15))
    mask = np.random.default_rng(1).random((4, 15)) < 0.8
    got = normalise_scores(scores, mask)
    for t in range(4):
        n = mask[t].sum()
        for c in range(3):
            want = (rankdata(scores[t, c, mask[t]]) - 1) / (n - 1)
            np.testing.assert_allclose(got[t, c, mask[t]], want, rtol=0, atol=1e-15)
            assert np.isnan(got[t, c, ~mask[t]]).all()


def test_zscore_normalisation():
    scores = np.random.default_rng(2).normal(size=(2, 3, 10))
    scores[1, 2] = 4.0  # a constant member: zeros
    got = normalise_scores(scores, method="zscore")
    np.testing.assert_allclose(got[0], (scores[0] - scores[0].mean(-1, keepdims=True)) / scores[0].std(-1, keepdims=True))
    assert (got[1, 2] == 0).all()


@pytest.mark.parametrize("seed", range(3))
def test_combinations_equal_pyod(seed):
    rng = np.random.default_rng(seed)
    members, n_images, n_buckets = 10, 30, 5
    normalised = normalise_scores(rng.normal(size=(1, members, n_images)))
    matrix = normalised[0].T  # PyOD: (n_samples, n_estimators)
    np.testing.assert_allclose(combine_scores(normalised, "mean")[0], combination.average(matrix))
    np.testing.assert_allclose(combine_scores(normalised, "max")[0], combination.maximization(matrix))
    np.testing.assert_allclose(combine_scores(normalised, "median")[0], combination.median(matrix))
    order = shuffle(list(range(members)), random_state=seed)
    buckets = np.array_split(np.asarray(order), n_buckets)
    np.testing.assert_allclose(combine_scores(normalised, "aom", buckets=buckets)[0],
                               combination.aom(matrix, n_buckets=n_buckets, random_state=seed))
    np.testing.assert_allclose(combine_scores(normalised, "moa", buckets=buckets)[0],
                               combination.moa(matrix, n_buckets=n_buckets, random_state=seed))
    weights = rng.random(members)
    np.testing.assert_allclose(combine_scores(normalised, "mean", weights=weights)[0],
                               combination.average(matrix, estimator_weights=weights[None, :]))


def test_buckets_and_errors():
    buckets = shuffled_buckets(7, 3, seed=4)
    assert sorted(np.concatenate(buckets).tolist()) == list(range(7)) and [len(b) for b in buckets] == [3, 2, 2]
    with pytest.raises(ValueError, match="n_buckets=8 is more than the 7 members"):
        shuffled_buckets(7, 8)
    with pytest.raises(ValueError, match="combination 'vote' is unknown; choose one of mean, max"):
        combine_scores(np.zeros((1, 2, 3)), "vote")
    with pytest.raises(ValueError, match=r"non-finite value\(s\) among masked-in images \(first: task row 0, candidate 1"):
        normalise_scores(np.array([[[0.0, 1.0], [np.nan, 1.0]]]))


def test_part_aurocs_equal_sklearn():
    rng = np.random.default_rng(5)
    scores = tied_scores(6, (3, 4, 24))
    parts = rng.integers(-1, 3, size=(3, 24))
    parts[:, :3] = [0, 1, 2]
    got = part_aurocs_finite(scores, parts, 2)
    for t in range(3):
        for c in range(4):
            for v in range(2):
                keep = (parts[t] == 0) | (parts[t] == v + 1)
                assert got[t, c, v] == pytest.approx(roc_auc_score(parts[t, keep] == v + 1, scores[t, c, keep]))


def test_part_aurocs_bit_identical_to_auroc_per_source_with_nans_and_ties():
    """The one-sort form gives exactly (==) what metrics.auroc gives on each source's subset, with
    ties, NaN scores (left out for that candidate only), padding, and sources a task lacks (NaN)."""
    from swsa_engine.core.metrics import auroc

    rng = np.random.default_rng(11)
    scores = tied_scores(7, (4, 5, 40)).astype(float)
    scores[rng.random(scores.shape) < 0.1] = np.nan
    parts = rng.integers(-1, 4, size=(4, 40))
    parts[3][parts[3] == 2] = 1  # task 3 has no anomaly of source 1
    got = part_aurocs_finite(scores, parts, 3)
    for t in range(4):
        for c in range(5):
            for v in range(3):
                keep = ((parts[t] == 0) | (parts[t] == v + 1)) & np.isfinite(scores[t, c])
                if not (parts[t, keep] == v + 1).any() or not (parts[t, keep] == 0).any():
                    assert np.isnan(got[t, c, v])
                    continue
                assert got[t, c, v] == auroc(scores[t, c, keep], parts[t, keep] == v + 1)
    assert np.isnan(got[3, :, 1]).all()


def naive_greedy(normalised, parts, n_sources, steps, bags, fraction, seed):
    n_tasks, n_candidates, _ = normalised.shape
    rng = np.random.default_rng(seed)
    draws = [np.sort(rng.choice(n_candidates, size=max(1, round(fraction * n_candidates)), replace=False))
             for _ in range(bags)]
    weights = np.zeros((n_tasks, n_candidates))
    for t in range(n_tasks):
        for members in draws:
            total = np.zeros(normalised.shape[2])
            for step in range(steps):
                best, best_value = None, -np.inf
                for c in members:
                    trial = (total + normalised[t, c]) / (step + 1)
                    values = []
                    for v in range(n_sources):
                        keep = (parts[t] == 0) | (parts[t] == v + 1)
                        values.append(roc_auc_score(parts[t, keep] == v + 1, trial[keep]))
                    if np.mean(values) > best_value + 1e-12:
                        best, best_value = c, np.mean(values)
                weights[t, best] += 1
                total += normalised[t, best]
    return weights / weights.sum(axis=1, keepdims=True)


def test_greedy_selection_equals_a_naive_loop():
    rng = np.random.default_rng(8)
    parts = np.tile(np.r_[np.zeros(12), np.ones(8), np.full(8, 2)].astype(int), (3, 1))
    signal = (parts > 0).astype(float)
    raw = tied_scores(9, (3, 6, 28)) + signal[:, None, :] * rng.integers(0, 3, size=(3, 6, 1))
    normalised = normalise_scores(raw)
    got = greedy_ensemble_weights(normalised, parts, 2, steps=4, bags=3, fraction=0.5, seed=3)
    want = naive_greedy(normalised, parts, 2, steps=4, bags=3, fraction=0.5, seed=3)
    np.testing.assert_allclose(got, want, atol=1e-12)
    np.testing.assert_allclose(got.sum(axis=1), 1.0)


def test_part_aurocs_hardest_equal_the_cubes_columns():
    """With ``hardest`` the N-hardest columns are, bit for bit, what score_aurocs computes (the N
    lowest anomaly scores of a source against the normals), ties, NaNs and short sources included."""
    import warnings

    from swsa_engine.core.score_cube import synthetic_column_parts, two_part_auroc

    rng = np.random.default_rng(12)
    scores = tied_scores(13, (5, 3, 36))
    scores[rng.random(scores.shape) < 0.1] = np.nan
    parts = rng.integers(-1, 4, size=(5, 36))
    parts[4][parts[4] == 3] = 2  # task 4 has no anomaly of source 2
    hardest = (4, 1, 0, 30)
    got = part_aurocs_finite(scores, parts, 3, hardest)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = np.stack([two_part_auroc(*p) for p in synthetic_column_parts(scores, parts, 3, hardest)], axis=2)
    np.testing.assert_array_equal(got, want)
    assert got.shape == (5, 3, 3 * 5) and np.isnan(got[4, :, 2]).all()


def test_part_aurocs_of_many_classes_equal_grouped_auroc():
    """Parts need not be synthetic sources: normals against each of 12 classes (more parts than the
    per-part loop handles, so the one-pass sum) is exactly cube.grouped_auroc."""
    from swsa_engine.core.cube import grouped_auroc

    rng = np.random.default_rng(14)
    scores = tied_scores(15, (6, 50))
    labels = rng.choice([-1, 0, 1], size=(6, 50), p=[0.1, 0.4, 0.5]).astype(np.int8)
    groups = np.where(labels == 1, rng.integers(0, 12, size=(6, 50)), -1)
    parts = np.where(labels == 0, 0, np.where(labels == 1, groups + 1, -1))
    got = part_aurocs_finite(np.where(labels >= 0, scores, np.nan), parts, 12)
    np.testing.assert_array_equal(got, grouped_auroc(np.where(labels >= 0, scores, np.nan), labels, groups, 12))


def test_median_combination_is_numpy_median_with_nans():
    """The sort-based median is np.median bit for bit (odd and even member counts, ties), NaN where a member is."""
    for members in (1, 2, 5, 6):
        values = tied_scores(17 + members, (3, members, 20)) / 4
        values[0, 0, :3] = np.nan
        got = combine_scores(values, "median")
        np.testing.assert_array_equal(got, np.median(values, axis=1))
        assert np.isnan(got[0, :3]).all()


def test_tie_groups_against_a_loop():
    from swsa_engine.core.synthetic_resampling import tie_groups

    rows = np.sort(np.where(np.random.default_rng(18).random((4, 15)) < 0.2, np.inf, tied_scores(19, (4, 15))), axis=1)
    first, last, members = tie_groups(rows)
    want = []
    for r, row in enumerate(rows):
        p = 0
        while p < len(row):
            q = p
            while q + 1 < len(row) and row[q + 1] == row[p]:
                q += 1
            if q > p and np.isfinite(row[p]):
                want.append((r * 15 + p, r * 15 + q))
            p = q + 1
    assert list(zip(first.tolist(), last.tolist())) == want
    assert members.tolist() == [i for f, la in want for i in range(f, la + 1)]
