"""swsa_engine.core.metrics against sklearn / scipy, row by row, on seeded random data."""

import time
import warnings

import numpy as np
import pytest
import scipy.stats
from sklearn.metrics import roc_auc_score

from swsa_engine.core.metrics import UndefinedMetricWarning, auroc, kendall_tau, rankdata_midrank

TOLERANCE = 1e-12


def _rows(*arrays, shape):
    """Iterate over the leading-axis rows of arrays broadcast to ``shape``."""
    broadcast = [np.broadcast_to(array, shape).reshape(-1, shape[-1]) for array in arrays]
    return zip(*broadcast)


def _reference_auroc(scores, labels, mask=None):
    shape = np.broadcast_shapes(np.shape(scores), np.shape(labels))
    mask = np.ones(shape, dtype=bool) if mask is None else mask
    values = [
        roc_auc_score(label_row[keep], score_row[keep])
        for score_row, label_row, keep in _rows(scores, labels, mask, shape=shape)
    ]
    return np.array(values).reshape(shape[:-1])


def _reference_kendall(x, y, mask=None):
    shape = np.broadcast_shapes(np.shape(x), np.shape(y))
    mask = np.ones(shape, dtype=bool) if mask is None else mask
    taus, pvalues = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's own small-sample warnings
        for x_row, y_row, keep in _rows(x, y, mask, shape=shape):
            result = scipy.stats.kendalltau(x_row[keep], y_row[keep])
            taus.append(result.statistic)
            pvalues.append(result.pvalue)
    return np.array(taus).reshape(shape[:-1]), np.array(pvalues).reshape(shape[:-1])


def _random_labels(rng, shape, anomaly_rate=0.3):
    """Labels with both classes in every row (first entry normal, second anomalous)."""
    labels = rng.random(shape) < anomaly_rate
    labels[..., 0] = False
    labels[..., 1] = True
    return labels


def _permutation_with_inversions(n, inversions):
    """A permutation of range(n) with exactly ``inversions`` inversions (Lehmer code)."""
    code = []
    remaining = inversions
    for position in range(n):
        digit = min(remaining, n - 1 - position)
        code.append(digit)
        remaining -= digit
    assert remaining == 0
    available = list(range(n))
    return np.array([available.pop(digit) for digit in code])


# --------------------------------------------------------------------------------------
# auroc
# --------------------------------------------------------------------------------------


def test_auroc_continuous_scores_batched():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(4, 5, 37))
    labels = _random_labels(rng, (4, 5, 37))
    result = auroc(scores, labels)
    assert result.shape == (4, 5) and result.dtype == np.float64
    np.testing.assert_allclose(result, _reference_auroc(scores, labels), rtol=0, atol=TOLERANCE)


def test_auroc_heavy_ties_with_shared_labels():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 4, size=(4, 5, 29)).astype(float)
    labels = _random_labels(rng, (29,))
    result = auroc(scores, labels)
    assert result.shape == (4, 5)
    np.testing.assert_allclose(result, _reference_auroc(scores, labels), rtol=0, atol=TOLERANCE)


def test_auroc_integer_scores_and_zero_one_labels():
    rng = np.random.default_rng(2)
    scores = rng.integers(-2, 2, size=(7, 15))
    labels = _random_labels(rng, (7, 15)).astype(np.int64)
    np.testing.assert_allclose(
        auroc(scores, labels), _reference_auroc(scores, labels), rtol=0, atol=TOLERANCE
    )


@pytest.mark.parametrize("tied", [False, True])
def test_auroc_random_masks_ignore_excluded_entries(tied):
    rng = np.random.default_rng(3 + tied)
    shape = (4, 5, 40)
    scores = rng.integers(0, 4, size=shape).astype(float) if tied else rng.normal(size=shape)
    labels = _random_labels(rng, shape)
    mask = rng.random(shape) < 0.6
    mask[..., :2] = True  # keep both classes in every row
    # Whatever sits in excluded entries (even NaN or inf) must not matter.
    scores[~mask] = rng.choice([np.nan, np.inf, -np.inf, 1e9], size=int((~mask).sum()))
    result = auroc(scores, labels, mask=mask)
    np.testing.assert_allclose(
        result, _reference_auroc(scores, labels, mask), rtol=0, atol=TOLERANCE
    )


def test_auroc_one_dimensional_input_gives_a_float():
    rng = np.random.default_rng(5)
    scores = rng.integers(0, 3, size=23).astype(float)
    labels = _random_labels(rng, (23,))
    result = auroc(scores, labels)
    assert isinstance(result, float) and np.ndim(result) == 0
    assert abs(result - roc_auc_score(labels, scores)) <= TOLERANCE


def test_auroc_one_class_rows_are_nan_with_one_warning():
    rng = np.random.default_rng(6)
    scores = rng.normal(size=(6, 10))
    labels = _random_labels(rng, (6, 10))
    labels[1] = True
    labels[4] = False
    mask = np.ones((6, 10), dtype=bool)
    mask[2] = False  # nothing included at all
    with pytest.warns(UndefinedMetricWarning, match=r"undefined for 3 of 6 row") as record:
        result = auroc(scores, labels, mask=mask)
    assert len([w for w in record if w.category is UndefinedMetricWarning]) == 1
    assert np.isnan(result[[1, 2, 4]]).all()
    defined = [0, 3, 5]
    np.testing.assert_allclose(
        result[defined], _reference_auroc(scores[defined], labels[defined]), atol=TOLERANCE
    )


def test_auroc_without_undefined_rows_does_not_warn():
    rng = np.random.default_rng(7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auroc(rng.normal(size=(3, 8)), _random_labels(rng, (3, 8)))


def test_auroc_empty_leading_axis():
    result = auroc(np.zeros((0, 5)), np.array([True, False, True, False, False]))
    assert result.shape == (0,)


@pytest.mark.parametrize(
    ("scores", "labels", "kwargs", "message"),
    [
        (np.zeros((3, 5)), np.zeros(4, dtype=bool), {},
         r"`labels` has 4 entries .* `scores` has 5"),
        (np.zeros((3, 5)), np.zeros((2, 5), dtype=bool), {}, r"do not broadcast"),
        (np.zeros((3, 0)), np.zeros(0, dtype=bool), {}, r"no entries along its last axis"),
        (np.zeros(4), np.array([0, 1, 2, 1]), {}, r"only 0 and 1, got other values such as \[2\]"),
        (np.zeros(3), np.array([-1.0, 1.0, 1.0]), {}, r"labels == anomaly_value"),
        (np.zeros(2), np.array(["a", "b"]), {}, r"`labels` must be boolean .* got dtype <U1"),
        (np.array(["a", "b"]), np.array([True, False]), {}, r"`scores` must be an array of real"),
        (np.float64(0.5), np.array(True), {}, r"got a scalar"),
        (np.zeros(3), np.array([True, False, True]), {"mask": np.array([1, 0, 1])},
         r"`mask` must be boolean .* got dtype int64.*astype\(bool\)"),
        (np.zeros(3), np.array([True, False, True]), {"mask": np.ones(2, dtype=bool)},
         r"`mask` has 2 entries"),
    ],
)
def test_auroc_rejects_malformed_input(scores, labels, kwargs, message):
    with pytest.raises(ValueError, match=message):
        auroc(scores, labels, **kwargs)


def test_auroc_rejects_non_finite_included_scores_and_says_where():
    scores = np.zeros((3, 4))
    scores[1, 2] = np.nan
    scores[2, 0] = np.inf
    labels = np.array([True, False, True, False])
    message = r"2 non-finite .* first is scores\[1, 2\] = .*nan.* `mask`"
    with pytest.raises(ValueError, match=message):
        auroc(scores, labels)
    # The same values are fine once excluded.
    mask = np.isfinite(scores)
    result = auroc(scores, labels, mask=mask)
    assert result.shape == (3,)


def test_auroc_rejects_labels_outside_zero_one_only_where_included():
    labels = np.array([1, 0, 7, 0])
    scores = np.array([0.9, 0.1, 0.5, 0.2])
    with pytest.raises(ValueError, match=r"such as \[7\]"):
        auroc(scores, labels)
    mask = np.array([True, True, False, True])
    assert auroc(scores, labels, mask=mask) == roc_auc_score([1, 0, 0], [0.9, 0.1, 0.2])


def test_auroc_large_batch_is_vectorised():
    rng = np.random.default_rng(8)
    scores = rng.integers(0, 50, size=(200, 300)).astype(float)
    labels = _random_labels(rng, (200, 300))
    auroc(scores[:2], labels[:2])  # warm-up
    start = time.perf_counter()
    result = auroc(scores, labels)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5, f"auroc on (200, 300) took {elapsed:.3f} s"
    sample = [0, 57, 199]
    np.testing.assert_allclose(
        result[sample], _reference_auroc(scores[sample], labels[sample]), atol=TOLERANCE
    )


# --------------------------------------------------------------------------------------
# kendall_tau
# --------------------------------------------------------------------------------------


def _assert_kendall_matches(x, y, mask=None):
    tau, pvalue = kendall_tau(x, y, mask=mask)
    expected_tau, expected_pvalue = _reference_kendall(x, y, mask)
    np.testing.assert_allclose(tau, expected_tau, rtol=0, atol=TOLERANCE)
    # p-values reach 1e-300 or less; compare relatively (and exact zeros exactly).
    np.testing.assert_allclose(pvalue, expected_pvalue, rtol=TOLERANCE, atol=0)
    return tau, pvalue


@pytest.mark.parametrize("n", range(2, 41))
def test_kendall_without_ties_across_exact_and_asymptotic(n):
    rng = np.random.default_rng(100 + n)
    x = rng.normal(size=(3, 4, n))
    y = rng.normal(size=(3, 4, n))
    tau, pvalue = _assert_kendall_matches(x, y)
    assert tau.shape == pvalue.shape == (3, 4)


@pytest.mark.parametrize("n", [2, 3, 5, 12, 33, 34, 35, 40, 80, 171, 172, 250])
def test_kendall_near_perfect_orders_use_exact_tails(n):
    # 0 or 1 discordant (or concordant) pairs: scipy's exact p-value for any n.
    # 2 and 3 discordant pairs: exact for n <= 33, asymptotic above.
    total_pairs = n * (n - 1) // 2
    inversion_counts = sorted({k for k in (0, 1, 2, 3) if k <= total_pairs})
    x = np.arange(n, dtype=float)
    y = np.array([_permutation_with_inversions(n, k) for k in inversion_counts], dtype=float)
    _assert_kendall_matches(x, y)
    _assert_kendall_matches(x, -y)


@pytest.mark.parametrize("n", [4, 9, 20, 33])
def test_kendall_exact_distribution_over_all_inversion_counts(n):
    max_inversions = n * (n - 1) // 2
    counts = np.unique(np.linspace(0, max_inversions, 60).round().astype(int))
    y = np.array([_permutation_with_inversions(n, k) for k in counts])
    _assert_kendall_matches(np.arange(n), y)


@pytest.mark.parametrize("n", [2, 3, 7, 25, 40])
def test_kendall_with_ties(n):
    rng = np.random.default_rng(200 + n)
    x = rng.integers(0, 4, size=(4, 5, n)).astype(float)
    y_tied = rng.integers(0, 3, size=(4, 5, n))
    y_continuous = rng.normal(size=(4, 5, n))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)  # n = 2 can be constant
        _assert_kendall_matches(x, y_tied)
        _assert_kendall_matches(y_continuous, x)


def test_kendall_broadcasts_a_shared_ranking():
    rng = np.random.default_rng(300)
    real_ranking = rng.normal(size=11)
    synthetic_rankings = rng.integers(0, 5, size=(6, 11))
    tau, pvalue = _assert_kendall_matches(real_ranking, synthetic_rankings)
    assert tau.shape == (6,)


def test_kendall_random_masks_drop_excluded_entries():
    rng = np.random.default_rng(301)
    shape = (4, 5, 30)
    x = rng.normal(size=shape)
    y = np.where(rng.random(shape) < 0.5, rng.integers(0, 4, size=shape), rng.normal(size=shape))
    mask = rng.random(shape) < 0.5
    mask[..., :3] = True
    x[~mask] = np.nan  # excluded entries may hold anything
    _assert_kendall_matches(x, y, mask=mask)


def test_kendall_infinite_values_are_ordered_like_scipy():
    x = np.array([[1.0, -np.inf, np.inf, 2.0, np.inf], [3.0, 1.0, 2.0, 0.0, -1.0]])
    y = np.array([[0.5, 0.1, 0.9, 0.7, 0.2], [np.inf, 2.0, 2.0, -np.inf, 4.0]])
    _assert_kendall_matches(x, y)


def test_kendall_one_dimensional_input_gives_floats():
    rng = np.random.default_rng(302)
    x, y = rng.normal(size=9), rng.normal(size=9)
    tau, pvalue = kendall_tau(x, y)
    assert isinstance(tau, float) and isinstance(pvalue, float)
    expected = scipy.stats.kendalltau(x, y)
    assert abs(tau - expected.statistic) <= TOLERANCE
    assert abs(pvalue - expected.pvalue) <= TOLERANCE * expected.pvalue


def test_kendall_constant_or_too_short_rows_are_nan_with_one_warning():
    rng = np.random.default_rng(303)
    x = rng.normal(size=(5, 6))
    y = rng.normal(size=(5, 6))
    x[1] = 3.0  # constant x
    y[3] = -1.0  # constant y
    mask = np.ones((5, 6), dtype=bool)
    mask[4, 1:] = False  # a single included entry
    with pytest.warns(UndefinedMetricWarning, match=r"undefined for 3 of 5 row") as record:
        tau, pvalue = kendall_tau(x, y, mask=mask)
    assert len([w for w in record if w.category is UndefinedMetricWarning]) == 1
    for row in (1, 3, 4):
        assert np.isnan(tau[row]) and np.isnan(pvalue[row])
        reference = _reference_kendall(x[row], y[row], mask[row])
        assert np.isnan(reference[0]) and np.isnan(reference[1])
    _assert_kendall_matches(x[[0, 2]], y[[0, 2]])


@pytest.mark.parametrize(
    ("x", "y", "kwargs", "message"),
    [
        (np.zeros((2, 5)), np.zeros((2, 4)), {}, r"`y` has 4 entries .* `x` has 5"),
        (np.zeros((2, 5)), np.zeros((3, 5)), {}, r"do not broadcast"),
        (np.zeros((2, 0)), np.zeros((2, 0)), {}, r"no entries along their last axis"),
        (np.array(["a", "b"]), np.zeros(2), {}, r"`x` must be an array of real numbers"),
        (np.zeros(3), np.zeros(3), {"mask": np.array([1, 1, 0])}, r"`mask` must be boolean"),
        (np.array([1.0, np.nan, 2.0, np.nan]), np.arange(4.0), {},
         r"`x` contains 2 NaN .* first is x\[1\] = .*nan.*exclude those entries with `mask`"),
    ],
)
def test_kendall_rejects_malformed_input(x, y, kwargs, message):
    with pytest.raises(ValueError, match=message):
        kendall_tau(x, y, **kwargs)


def test_kendall_large_batch_in_blocks():
    # Enough rows to need several (rows, n, n) blocks; checked against scipy on a sample.
    rng = np.random.default_rng(304)
    x = rng.integers(0, 20, size=(120, 200))
    y = rng.normal(size=(120, 200))
    tau, pvalue = kendall_tau(x, y)
    sample = [0, 63, 119]
    expected_tau, expected_pvalue = _reference_kendall(x[sample], y[sample])
    np.testing.assert_allclose(tau[sample], expected_tau, atol=TOLERANCE)
    np.testing.assert_allclose(pvalue[sample], expected_pvalue, rtol=TOLERANCE)


# --------------------------------------------------------------------------------------
# rankdata_midrank
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "axis"), [((17,), -1), ((4, 5, 9), -1), ((6, 7), 0), ((3, 4), None)]
)
def test_rankdata_midrank_matches_scipy(shape, axis):
    rng = np.random.default_rng(400)
    for values in (rng.integers(0, 4, size=shape), rng.normal(size=shape)):
        np.testing.assert_array_equal(
            rankdata_midrank(values, axis=axis),
            scipy.stats.rankdata(values, method="average", axis=axis),
        )


def test_rankdata_midrank_nan_slices_propagate():
    values = np.array([[1.0, np.nan, 2.0], [3.0, 3.0, 1.0]])
    np.testing.assert_array_equal(rankdata_midrank(values), scipy.stats.rankdata(values, axis=1))


def test_auroc_equals_mann_whitney_from_midranks():
    rng = np.random.default_rng(401)
    for _ in range(5):
        scores = rng.integers(0, 3, size=12).astype(float)
        labels = _random_labels(rng, (12,))
        ranks = rankdata_midrank(scores)
        positives, negatives = labels.sum(), (~labels).sum()
        u = ranks[labels].sum() - positives * (positives + 1) / 2
        assert abs(auroc(scores, labels) - u / (positives * negatives)) <= TOLERANCE


def test_kendall_tau_b_long_equals_scipy_with_ties_masks_and_constant_rows():
    from scipy.stats import kendalltau as scipy_kendalltau

    from swsa_engine.core.metrics.kendall_long import kendall_tau_b_long

    rng = np.random.default_rng(8)
    x = rng.integers(0, 12, size=(30, 200)).astype(float)
    y = x + rng.integers(0, 4, size=x.shape)
    y[::4] = rng.integers(0, 9, size=y[::4].shape)
    x[:, :3] = [-np.inf, np.inf, 0.0]
    mask = rng.random(x.shape) < 0.85
    x[0] = 2.0  # constant: NaN
    mask[1, 1:] = False  # one entry kept: NaN
    x[2, ~mask[2]] = np.nan  # NaN where left out is fine
    got = kendall_tau_b_long(x, y, mask)
    for r in range(30):
        if mask[r].sum() < 2 or np.ptp(x[r, mask[r]]) == 0:
            assert np.isnan(got[r])
        else:
            assert got[r] == scipy_kendalltau(x[r, mask[r]], y[r, mask[r]]).statistic
    with pytest.raises(ValueError, match="must not hold NaN among the kept entries"):
        kendall_tau_b_long(np.array([[1.0, np.nan]]), np.array([[1.0, 2.0]]))
