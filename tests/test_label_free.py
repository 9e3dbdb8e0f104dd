"""swsa_engine.core.label_free (and core.em_mv's criteria) against naive per-task loops (scipy,
scikit-learn) on seeded data with ties and padding."""

import warnings

from itertools import combinations

import numpy as np
import pytest
import scipy.stats
from sklearn.cluster import AgglomerativeClustering

from swsa_engine.core.em_mv import excess_mass_mass_volume
from swsa_engine.core.label_free import (
    borda_points, expected_random_pick, model_centrality, robust_rank_aggregation, rra_rho, trimmed_borda,
    trimmed_borda_sources,
)
from swsa_engine.core.metrics import UndefinedMetricWarning, kendall_tau


def _scores_with_ties(seed, shape=(3, 6, 25), levels=5):
    """Integer-valued scores (many ties), a padding mask, one missing candidate and one constant one."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, levels, shape).astype(np.float64)
    mask = rng.random((shape[0], shape[2])) < 0.8
    mask[:, :3] = True
    scores[~np.broadcast_to(mask[:, None, :], shape)] = np.nan  # padding holds NaN: must be ignored
    scores[1, 2] = np.nan  # candidate 2 missing in task 1
    scores[2, 4] = np.where(mask[2], 3.0, np.nan)  # candidate 4 constant in task 2
    return scores, mask


def _available(scores, mask, t):
    return [c for c in range(scores.shape[1]) if not np.isnan(scores[t, c, mask[t]]).all()]


# ---- model centrality

def _naive_centrality(scores, mask):
    n_tasks, n_candidates, _ = scores.shape
    out = np.full((n_tasks, n_candidates), np.nan)
    for t in range(n_tasks):
        available = _available(scores, mask, t)
        for c in available:
            taus = []
            for j in available:
                if j != c:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        tau = scipy.stats.kendalltau(scores[t, c, mask[t]], scores[t, j, mask[t]]).statistic
                    taus.append(0.0 if np.isnan(tau) else tau)  # Ma et al.'s code: nan_to_num
            out[t, c] = sum(taus) / (len(available) - 1)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_model_centrality_matches_a_scipy_loop(seed):
    scores, mask = _scores_with_ties(seed)
    result = model_centrality(scores, mask)
    expected = _naive_centrality(scores, mask)
    np.testing.assert_array_equal(np.isnan(result), np.isnan(expected))
    np.testing.assert_allclose(result, expected, atol=1e-12, equal_nan=True)
    assert np.isnan(result[1, 2]) and not np.isnan(result[2, 4])  # missing → NaN; constant → taus of 0


def test_model_centrality_matches_the_batched_kendall_tau():
    rng = np.random.default_rng(5)
    scores = np.round(rng.normal(size=(2, 4, 40)), 1)  # ties
    mask = np.ones((2, 40), dtype=bool)
    mask[1, 30:] = False
    tau, _ = kendall_tau(scores[:, :, None, :], scores[:, None, :, :], mask[:, None, None, :])
    off_diagonal = ~np.eye(4, dtype=bool)
    expected = (tau * off_diagonal).sum(axis=2) / 3
    np.testing.assert_allclose(model_centrality(scores, mask), expected, atol=1e-12)


def test_model_centrality_favours_the_consensus_and_ignores_scale():
    rng = np.random.default_rng(3)
    truth = rng.normal(size=200)
    scores = np.stack([truth + 0.3 * rng.normal(size=200) for _ in range(4)] + [rng.normal(size=200)])[None]
    centrality = model_centrality(scores)
    assert centrality[0, 4] < centrality[0, :4].min()
    rescaled = scores.copy()
    rescaled[0, 1] = np.exp(3 * rescaled[0, 1])  # a monotone transform changes no ranking
    np.testing.assert_allclose(model_centrality(rescaled), centrality, atol=1e-12)


def test_model_centrality_is_undefined_with_one_candidate_or_one_image():
    assert np.isnan(model_centrality(np.ones((1, 1, 5)))).all()
    mask = np.array([[True, False, False]])
    assert np.isnan(model_centrality(np.arange(6.0).reshape(1, 2, 3), mask)).all()


# ---- robust rank aggregation

def _naive_rho(synthetic):
    n_tasks, n_candidates, n_sources = synthetic.shape
    out = np.full((n_tasks, n_candidates), np.nan)
    normalised = np.full(synthetic.shape, np.nan)
    for t in range(n_tasks):
        for v in range(n_sources):
            ranked = ~np.isnan(synthetic[t, :, v])
            if ranked.any():
                ranks = scipy.stats.rankdata(-synthetic[t, ranked, v], method="average")
                normalised[t, ranked, v] = ranks / ranked.sum()
    for t in range(n_tasks):
        for c in range(n_candidates):
            r = np.sort(normalised[t, c][~np.isnan(normalised[t, c])])
            n = len(r)
            if n:
                betas = [scipy.stats.beta.cdf(r[k - 1], k, n - k + 1) for k in range(1, n + 1)]
                out[t, c] = min(1.0, n * min(betas))
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_rra_matches_a_scipy_beta_loop(seed):
    rng = np.random.default_rng(seed)
    synthetic = np.round(rng.random((4, 7, 5)), 1)  # tied AUROCs
    synthetic[0, :, 1] = np.nan  # a source absent from a task
    synthetic[1, 3, 0] = synthetic[1, 3, 4] = np.nan  # a candidate some sources do not rank
    synthetic[2, 5, :] = np.nan  # a candidate no source ranks
    rho = rra_rho(synthetic)
    expected = _naive_rho(synthetic)
    np.testing.assert_allclose(rho, expected, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(robust_rank_aggregation(synthetic), -np.log10(expected), rtol=1e-12, equal_nan=True)
    assert np.isnan(rho[2, 5])


def test_rra_prefers_the_candidate_every_source_ranks_first():
    synthetic = np.array([[[0.9, 0.8, 0.95], [0.7, 0.85, 0.6], [0.5, 0.5, 0.5]]])
    score = robust_rank_aggregation(synthetic)
    assert score[0].argmax() == 0 and score[0, 2] == 0.0  # rho = 1 → 0, not -0


# ---- trimmed Borda (Goswami et al., ICLR 2023)

def _naive_distance(a, b):
    """Kendall distance with ties (a pair tied in exactly one counts 1/2) over the pairs both rank, per pair."""
    pairs = [(i, j) for i, j in combinations(range(len(a)), 2) if np.isfinite([a[i], a[j], b[i], b[j]]).all()]
    if not pairs:
        return np.nan
    cost = 0.0
    for i, j in pairs:
        sa, sb = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
        cost += 1.0 if sa * sb < 0 else 0.5 if (sa == 0) != (sb == 0) else 0.0
    return cost / len(pairs)


def _naive_trimmed_borda(synthetic):
    """Per task, by loops: Borda points per source, influence of each source on the Borda objective,
    then scikit-learn's single-linkage clustering of the reliabilities (keep-all when they are equal)."""
    n_tasks, n_candidates, n_sources = synthetic.shape
    points = np.full(synthetic.shape, np.nan)
    kept = np.zeros((n_tasks, n_sources), bool)
    scores = np.full((n_tasks, n_candidates), np.nan)
    for t in range(n_tasks):
        for v in range(n_sources):
            ranked = np.flatnonzero(~np.isnan(synthetic[t, :, v]))
            if len(ranked) >= 2:
                for c in ranked:
                    x = synthetic[t, ranked, v]
                    points[t, c, v] = ((x < synthetic[t, c, v]).sum() + 0.5 * ((x == synthetic[t, c, v]).sum() - 1)) / (len(ranked) - 1)
        valid = [v for v in range(n_sources) if not np.isnan(points[t, :, v]).all()]

        def borda(sources):
            return np.array([np.nanmean(points[t, c, sources]) if np.isfinite(points[t, c, sources]).any() else np.nan
                             for c in range(n_candidates)])

        def objective(sources):
            consensus = borda(sources)
            distances = [_naive_distance(points[t, :, u], consensus) for u in sources]
            return np.nanmean(distances)

        keep = list(valid)
        if len(valid) > 2:
            reliability = np.array([objective([u for u in valid if u != v]) - objective(valid) for v in valid])
            ordered = np.sort(reliability)
            gaps = np.diff(ordered)
            if gaps.max() > 1e-12:
                tied = np.flatnonzero(gaps >= gaps.max() - 1e-12)
                if len(tied) == 1:  # a unique largest gap: scikit-learn's single linkage cuts it
                    labels = AgglomerativeClustering(n_clusters=2, linkage="single").fit_predict(reliability[:, None])
                else:  # tied largest gaps (scikit-learn's choice is arbitrary): the documented lowest cut
                    labels = (reliability > ordered[tied[0]]).astype(int)
                sums = [reliability[labels == g].sum() for g in (0, 1)]
                upper = int(labels[np.argmax(reliability)])
                best = upper if sums[upper] >= sums[1 - upper] else 1 - upper  # tied sums: the upper cluster
                keep = [v for v, label in zip(valid, labels) if label == best]
        kept[t, keep] = True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            scores[t] = borda(keep) if keep else np.nan
    return points, kept, scores


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_trimmed_borda_matches_a_naive_loop_with_sklearn_clustering(seed):
    rng = np.random.default_rng(seed)
    synthetic = np.round(rng.random((6, 7, 5)), 1)  # tied AUROCs
    synthetic[:, :, 4] = 1.0 - synthetic[:, :, 0] + rng.normal(0, 0.02, (6, 7)).round(2)  # an outlying source
    synthetic[0, :, 1] = np.nan  # a source absent from a task
    synthetic[1, 3, 0] = synthetic[1, 3, 2] = np.nan  # a candidate some sources do not rank
    synthetic[2, 5, :] = np.nan  # a candidate no source ranks
    synthetic[3, 1:, 3] = np.nan  # a source ranking one candidate: it orders nothing
    points, kept, scores = _naive_trimmed_borda(synthetic)
    np.testing.assert_allclose(borda_points(synthetic), points, rtol=1e-12, equal_nan=True)
    np.testing.assert_array_equal(trimmed_borda_sources(synthetic), kept)
    np.testing.assert_allclose(trimmed_borda(synthetic), scores, rtol=1e-12, equal_nan=True)
    assert not kept[3, 3] and np.isnan(scores[2, 5])


def _reference_trimmed_borda_winner(ranks):
    """The reference code's pipeline (tsad-model-selection, rank_aggregation.trimmed_borda, influence
    with Borda) on complete rankings without ties: ``ranks`` (V, C), 0 = best; the aggregate's best."""
    def borda(r):
        return np.argsort(np.argsort(r.sum(axis=0)))

    def distance(a, b):
        return sum((a[i] - a[j]) * (b[i] - b[j]) < 0 for i, j in combinations(range(len(a)), 2))

    def objective(r):
        sigma = borda(r)
        return np.mean([distance(x, sigma) for x in r])

    reliability = np.array([objective(np.delete(ranks, v, axis=0)) - objective(ranks) for v in range(len(ranks))])
    labels = AgglomerativeClustering(n_clusters=2, linkage="single").fit_predict(reliability[:, None])
    best = max((0, 1), key=lambda g: reliability[labels == g].sum())
    return int(np.argmin(borda(ranks[labels == best])))


@pytest.mark.parametrize("seed", range(4))
def test_trimmed_borda_picks_what_the_reference_pipeline_picks_without_ties(seed):
    rng = np.random.default_rng(10 + seed)
    truth = rng.random(8)
    synthetic = truth[:, None] + rng.normal(0, 0.15, (8, 5))  # five noisy views of one quality
    synthetic[:, 4] = -truth + rng.normal(0, 0.05, 8)  # one reversed source
    ranks = np.argsort(np.argsort(-synthetic, axis=0), axis=0).T  # (V, C), 0 = best
    assert int(np.argmax(trimmed_borda(synthetic[None])[0])) == _reference_trimmed_borda_winner(ranks)
    assert not trimmed_borda_sources(synthetic[None])[0, 4]


def test_trimmed_borda_keeps_every_source_when_there_is_nothing_to_trim():
    two = np.array([[[0.9, 0.1], [0.5, 0.8], [0.1, 0.9]]])  # two sources: equal reliabilities
    assert trimmed_borda_sources(two).all()
    np.testing.assert_allclose(trimmed_borda(two), [[0.5, 0.5, 0.5]])
    agree = np.repeat(np.array([[0.9], [0.5], [0.1]]), 4, axis=1)[None]  # identical rankings
    assert trimmed_borda_sources(agree).all() and trimmed_borda(agree)[0].argmax() == 0
    empty = np.full((1, 3, 2), np.nan)
    assert not trimmed_borda_sources(empty).any() and np.isnan(trimmed_borda(empty)).all()


# ---- Excess-Mass and Mass-Volume (core.em_mv)

def _naive_em_mv(data, uniform, volume, level=0.9, low=0.9, high=0.999):
    """Goix's definitions with s = -score, by brute force: thresholds = unique data values."""
    s, s_uniform = -data, -uniform
    thresholds = np.unique(s)
    mass = np.array([(s >= u).mean() for u in thresholds])
    leb = np.array([volume * (s_uniform >= u).mean() for u in thresholds])

    def em(t):
        return np.maximum(0.0, (mass[:, None] - np.atleast_1d(t)[None, :] * leb[:, None]).max(axis=0))

    if ((mass > level) & (leb == 0)).any():
        em_value = np.nan
    else:
        lo_t, hi_t = 0.0, 1.0
        while em(hi_t)[0] > level:
            hi_t *= 2
        for _ in range(200):  # bisection for inf{t : EM(t) <= level}
            mid = (lo_t + hi_t) / 2
            lo_t, hi_t = (mid, hi_t) if em(mid)[0] > level else (lo_t, mid)
        grid = np.linspace(0.0, hi_t, 200_001)
        em_value = np.trapezoid(em(grid), grid)
    # MV: Goix's loop (k-th largest score reaching mass alpha) on a fine alpha grid
    alphas = np.linspace(low, high, 99_001)
    ordered = np.sort(s)[::-1]
    mv_curve, count = [], 0
    for alpha in alphas:
        while count / len(s) < alpha:
            count += 1
        mv_curve.append(volume * (s_uniform >= ordered[count - 1]).mean())
    return em_value, np.trapezoid(mv_curve, alphas)


def test_em_mv_match_goix_definitions_by_brute_force():
    rng = np.random.default_rng(7)
    n_tasks, n_candidates, n_images, n_uniform = 2, 4, 60, 300
    data = rng.integers(0, 12, (n_tasks, n_candidates, n_images)).astype(float)
    mask = rng.random((n_tasks, n_images)) < 0.85
    data[~np.broadcast_to(mask[:, None], data.shape)] = np.nan
    data[1, 3] = np.nan  # a missing candidate
    uniform = rng.integers(0, 20, (n_tasks, n_candidates, n_uniform)).astype(float)  # ties with the data
    volume = np.array([[2.0, 2.0, 5.0, 5.0], [0.5, 0.5, 0.5, 0.5]])
    em, mv = excess_mass_mass_volume(data, mask, uniform, volume)
    for t in range(n_tasks):
        for c in range(n_candidates):
            if t == 1 and c == 3:
                assert np.isnan(em[t, c]) and np.isnan(mv[t, c])
                continue
            em_ref, mv_ref = _naive_em_mv(data[t, c, mask[t]], uniform[t, c], volume[t, c])
            assert em[t, c] == pytest.approx(em_ref, rel=1e-6)
            assert mv[t, c] == pytest.approx(mv_ref, rel=1e-4)


def test_em_mv_on_tasks_of_one_and_two_images():
    data = np.array([[[3.0, 0, 0], [1.0, 0, 0]], [[2.0, 5.0, 0], [4.0, 4.0, 0]]])
    mask = np.array([[True, False, False], [True, True, False]])
    uniform = np.arange(8.0)[None, None].repeat(2, 0).repeat(2, 1)
    em, mv = excess_mass_mass_volume(data, mask, uniform, np.array([1.0, 4.0]))
    for t in range(2):
        for c in range(2):
            em_ref, mv_ref = _naive_em_mv(data[t, c, mask[t]], uniform[t, c], [1.0, 4.0][t])
            assert em[t, c] == pytest.approx(em_ref, rel=1e-6) and mv[t, c] == pytest.approx(mv_ref, rel=1e-4)


def test_em_mv_rank_a_density_like_score_above_its_reverse():
    rng = np.random.default_rng(11)
    points = rng.normal(size=(400, 2))
    box_low, box_high = points.min(axis=0), points.max(axis=0)
    uniform = rng.uniform(box_low, box_high, size=(20_000, 2))
    distance, uniform_distance = np.linalg.norm(points, axis=1), np.linalg.norm(uniform, axis=1)  # = anomaly
    data_scores = np.stack([distance, -distance])[None]  # candidate 1: the reverse ranking
    uniform_scores = np.stack([uniform_distance, -uniform_distance])[None]
    em, mv = excess_mass_mass_volume(data_scores, None, uniform_scores, np.prod(box_high - box_low)[None])
    assert em[0, 0] > em[0, 1] and mv[0, 0] < mv[0, 1]


def test_em_is_nan_with_a_warning_when_no_uniform_sample_reaches_the_data():
    data = np.arange(20.0)[None, None]
    uniform = np.full((1, 1, 50), 1e6)  # every uniform sample more anomalous than every image
    with pytest.warns(UndefinedMetricWarning, match="no uniform sample falls in a level set of mass above 0.9"):
        em, mv = excess_mass_mass_volume(data, None, uniform, np.array([3.0]))
    assert np.isnan(em[0, 0]) and mv[0, 0] == 0.0


# ---- random pick and mean-score ensemble

def test_expected_random_pick_is_the_nan_aware_mean():
    real = np.array([[0.5, 0.7, np.nan], [np.nan, np.nan, np.nan], [1.0, 0.0, 0.5]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mean of empty slice"
        result = expected_random_pick(real)
    np.testing.assert_allclose(result, [0.6, np.nan, 0.5], equal_nan=True)


# ---- bad input: one-line errors naming what arrived

@pytest.mark.parametrize("call, message", [
    (lambda: model_centrality(np.ones((2, 3))), r"`scores` must have 3 axes of shape \(T, C, Q\), got shape \(2, 3\)"),
    (lambda: model_centrality(np.ones((1, 2, 0))), r"model_centrality: `scores` has no images"),
    (lambda: model_centrality(np.ones((1, 2, 3)), np.ones((1, 3))), r"`mask` must be boolean"),
    (lambda: model_centrality(np.ones((1, 2, 3)), np.ones((2, 3), bool)), r"`mask` must have shape \(T, Q\) = \(1, 3\)"),
    (lambda: rra_rho(np.ones((2, 3))), r"`synthetic` must have 3 axes of shape \(T, C, V\)"),
    (lambda: trimmed_borda(np.ones((2, 3))), r"`synthetic` must have 3 axes of shape \(T, C, V\)"),
    (lambda: expected_random_pick(np.array(["a"])), r"`real` must be an array of real numbers"),
    (lambda: excess_mass_mass_volume(np.ones((1, 2, 3)), None, np.ones((1, 3, 4)), [1.0]),
     r"`uniform_scores` must have shape \(T, C, U\) = \(1, 2, U\) with U >= 1, got shape \(1, 3, 4\)"),
    (lambda: excess_mass_mass_volume(np.ones((1, 2, 3)), None, np.full((1, 2, 4), np.nan), [1.0]),
     r"`uniform_scores`\[0, 0\] holds NaN"),
    (lambda: excess_mass_mass_volume(np.ones((1, 2, 3)), None, np.ones((1, 2, 4)), [0.0]),
     r"`volume`\[0\] = 0.0 must be finite and > 0"),
    (lambda: excess_mass_mass_volume(np.ones((1, 2, 3)), None, np.ones((1, 2, 4)), np.ones(3)),
     r"`volume` must have shape \(T,\) = \(1,\) or \(T, C\) = \(1, 2\), got shape \(3,\)"),
    (lambda: excess_mass_mass_volume(np.ones((1, 2, 3)), None, np.ones((1, 2, 4)), [1.0], em_level=1.5),
     r"em_level must be in \(0, 1\), got em_level=1.5"),
    (lambda: excess_mass_mass_volume(np.ones((1, 2, 3)), None, np.ones((1, 2, 4)), [1.0], alpha_range=(0.99, 0.9)),
     r"alpha_range must be \(low, high\) with 0 <= low < high <= 1"),
    (lambda: excess_mass_mass_volume(np.ones((1, 2, 3)), None, np.ones((1, 2, 4)), [1.0], em_grid_points=1),
     r"em_grid_points must be >= 2, got 1"),
])
def test_bad_input_gives_one_line_errors(call, message):
    with pytest.raises(ValueError, match=message) as error:
        call()
    assert "\n" not in str(error.value)
