"""Several excluded bank rows per query (``exclude`` (T, W, E)): the kNN engine and the detectors
against a naive per-query loop that deletes the excluded rows from the bank.

The leak-free protocol scores each validation query against its task's bank minus its origins:
a held-out normal without itself, a CutPaste anomaly without its seed, a DiffStyle anomaly
without its content and style images (E = 2).  Data are integer-valued with repeated rows, so
distances tie; exclusions hold -1 padding, repeats, padding rows and masked queries.
"""

from __future__ import annotations

import numpy as np
import pytest

from swsa_engine.core.detectors import (KnnDetector, MahalanobisDetector, NaglDetector, PatchDetector, PcaDetector,
                                        ResidualDetector)
from swsa_engine.core.knn import (bounded_knn_tasks, centre_rows, exact_knn_candidates, knn_score_batched,
                                  knn_score_batched_bounded)
from swsa_engine.core.knn.checks import distinct_exclusions

RTOL = 1e-12


# --------------------------------------------------------------------------- naive references


def knn_naive(q: np.ndarray, rows: np.ndarray, k: int) -> float:
    """The kNN score by its definition: the sum of the k smallest squared L2 distances (float64)."""
    d = ((np.asarray(rows, dtype=np.float64) - np.asarray(q, dtype=np.float64)[None, :]) ** 2).sum(-1)
    return float(np.sort(d)[:k].sum())


def kept_rows(bank_mask_row: np.ndarray, excluded) -> np.ndarray:
    """Bank positions left for one query: the real rows minus every excluded position."""
    keep = bank_mask_row.copy()
    for j in np.atleast_1d(excluded):
        if j >= 0:
            keep[j] = False  # a padding row stays False; a repeat changes nothing
    return np.flatnonzero(keep)


def naive_batched(queries, banks, k, query_mask, bank_mask, exclude):
    """(T, W) kNN scores, one query at a time, each against its bank without its excluded rows."""
    out = np.full(query_mask.shape, np.nan)
    for t, w in zip(*np.nonzero(query_mask)):
        out[t, w] = knn_naive(queries[t, w], banks[t, kept_rows(bank_mask[t], exclude[t, w])], k)
    return out


def naive_ids(features, query_ids, bank_ids, exclude, k):
    """(T, W) kNN scores of row ids against banks of row ids (-1 padding) without excluded positions."""
    out = np.full(query_ids.shape, np.nan)
    for t, w in zip(*np.nonzero(query_ids >= 0)):
        rows = bank_ids[t, kept_rows(bank_ids[t] >= 0, exclude[t, w])]
        out[t, w] = knn_naive(features[query_ids[t, w]], features[rows], k)
    return out


def tie_batch(seed: int, n_tasks=6, width=14, n_bank=11, dim=5, n_excl=3):
    """Integer-valued queries and banks with repeated rows, padding, masked queries and
    exclusions (T, W, E) with -1 padding, repeats and padding rows; every real query keeps >= 4 rows."""
    rng = np.random.default_rng(seed)
    banks = rng.integers(-2, 3, (n_tasks, n_bank, dim)).astype(np.float64)
    banks[:, 4] = banks[:, 1]
    banks[:, 7] = banks[:, 1]  # a row three times: tied distances
    queries = rng.integers(-2, 3, (n_tasks, width, dim)).astype(np.float64)
    queries[:, 0] = banks[:, 1]  # a query equal to the repeated row
    queries[:, 2] = banks[:, 1]
    query_mask = rng.random((n_tasks, width)) < 0.8
    query_mask[:, :4] = True
    bank_mask = rng.random((n_tasks, n_bank)) < 0.8
    bank_mask[:, :8] = True
    bank_mask[:, -1] = False
    exclude = np.where(rng.random((n_tasks, width, n_excl)) < 0.6, rng.integers(0, n_bank, (n_tasks, width, n_excl)), -1)
    exclude[:, 0] = [1, -1, -1]  # itself (one of three equal rows)
    exclude[:, 1] = [3, 3, 3]  # one row, repeated
    exclude[:, 2] = [1, 4, 7]  # every copy of the query: its nearest rows go
    exclude[:, 3] = [n_bank - 1, -1, 2]  # a padding row and a real one
    queries[~query_mask] = np.nan  # masked queries may hold anything
    return queries, query_mask, banks, bank_mask, exclude


def tie_ids(seed: int, n_tasks=4, width=16, n_bank=20, dim=6, n_excl=2, dtype=np.float32):
    """Feature rows (N, D) with repeats, per-task bank ids (T, S) with a row listed twice and
    padding, query ids (T, W) with padding, and bank positions to exclude (T, W, E)."""
    rng = np.random.default_rng(seed)
    features = rng.integers(-3, 4, (150, dim)).astype(dtype)
    features[100:110] = features[:10]  # repeated rows
    bank_ids = np.stack([rng.permutation(120)[:n_bank] for _ in range(n_tasks)])
    bank_ids[:, 5] = bank_ids[:, 6]  # the same row twice in a bank
    bank_ids[1, 15:] = -1
    query_ids = rng.integers(0, 150, (n_tasks, width))
    query_ids[:, 12:] = -1
    query_ids[:, 0] = bank_ids[:, 6]
    exclude = np.where(rng.random((n_tasks, width, n_excl)) < 0.6, rng.integers(0, n_bank, (n_tasks, width, n_excl)), -1)
    exclude[:, 0] = [5, 6]  # both slots of the repeated row
    exclude[:, 1] = [4, 4]
    exclude[1, 2] = [17, 3]  # a padding position
    exclude[:, 13] = [2, 3]  # a padding query
    return features, query_ids, bank_ids, exclude


def first_only(exclude: np.ndarray) -> np.ndarray:
    """(T, W) the first position of each (T, W, E) row, and (T, W, 3): it, then -1, then itself again."""
    one = exclude[..., 0]
    return one, np.stack([one, np.full_like(one, -1), one], axis=2)


# --------------------------------------------------------------------------- distinct exclusions


def test_distinct_exclusions_keeps_each_real_row_once():
    _, query_mask, _, bank_mask, exclude = tie_batch(0)
    got = distinct_exclusions(exclude, query_mask, bank_mask)
    assert got.dtype == np.int64 and got.shape[:2] == exclude.shape[:2]
    for t in range(exclude.shape[0]):
        for w in range(exclude.shape[1]):
            want = sorted({int(j) for j in exclude[t, w] if j >= 0 and bank_mask[t, j]}) if query_mask[t, w] else []
            row = got[t, w]
            n = int((row >= 0).sum())
            assert (row[n:] == -1).all() and sorted(row[:n].tolist()) == want
    assert got.shape[2] == max(1, max(int((got[t, w] >= 0).sum()) for t in range(6) for w in range(14)))
    # E = 1 only masks; no exclusions at all gives one column of -1
    one = distinct_exclusions(exclude[..., :1], query_mask, bank_mask)
    assert one.shape[2] == 1
    assert (distinct_exclusions(np.full((2, 3, 4), -1), np.ones((2, 3), bool), np.ones((2, 5), bool)) == -1).all()


# --------------------------------------------------------------------------- knn_score_batched


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("seed, n_bank", [(0, 11), (1, 11), (2, 8)])
def test_batched_leaves_out_several_rows(precision, seed, n_bank):
    # n_bank = 8: the float32 route's k + 3 candidates take in excluded columns too
    queries, query_mask, banks, bank_mask, exclude = tie_batch(seed, n_bank=n_bank)
    for k in (1, 3, 4):
        want = naive_batched(queries, banks, k, query_mask, bank_mask, exclude)
        for block_size in (None, 1):
            got = knn_score_batched(queries, banks, k, query_mask=query_mask, bank_mask=bank_mask, exclude=exclude,
                                    precision=precision, block_size=block_size)
            np.testing.assert_allclose(got, want, rtol=RTOL, atol=0)
            assert np.isnan(got[~query_mask]).all()
    # leaving the rows out changes scores: the copies of query 2 are its nearest rows
    kept = knn_score_batched(queries, banks, 2, query_mask=query_mask, bank_mask=bank_mask, precision=precision)
    assert (kept[:, 2] == 0).all()
    left = knn_score_batched(queries, banks, 2, query_mask=query_mask, bank_mask=bank_mask, exclude=exclude, precision=precision)
    assert (left[:, 2] > 0).all()


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_batched_one_exclusion_is_bit_identical_in_every_form(precision):
    queries, query_mask, banks, bank_mask, exclude = tie_batch(3)
    one, padded = first_only(exclude)
    kw = dict(query_mask=query_mask, bank_mask=bank_mask, precision=precision)
    base = knn_score_batched(queries, banks, 3, exclude=one, **kw)
    np.testing.assert_array_equal(knn_score_batched(queries, banks, 3, exclude=one[..., None], **kw), base)
    np.testing.assert_array_equal(knn_score_batched(queries, banks, 3, exclude=padded, **kw), base)
    np.testing.assert_allclose(base, naive_batched(queries, banks, 3, query_mask, bank_mask, one), rtol=RTOL, atol=0)


def test_batched_counts_distinct_real_exclusions_for_k():
    rng = np.random.default_rng(4)
    queries = rng.integers(0, 3, (3, 2, 4)).astype(float)
    banks = rng.integers(0, 3, (3, 6, 4)).astype(float)
    bank_mask = np.ones((3, 6), bool)
    bank_mask[:, 5] = False  # 5 real rows per task
    exclude = np.full((3, 2, 3), -1)
    exclude[0, 0] = [1, 1, 1]  # one distinct row: 4 usable
    exclude[1, 1] = [5, 2, -1]  # a padding row and one real row: 4 usable
    got = knn_score_batched(queries, banks, 4, bank_mask=bank_mask, exclude=exclude)
    np.testing.assert_allclose(got, naive_batched(queries, banks, 4, np.ones((3, 2), bool), bank_mask, exclude), rtol=RTOL)
    exclude[2, 1] = [0, 3, 4]  # three distinct real rows: 2 usable
    with pytest.raises(ValueError, match=r"^k=4 is larger than the usable bank rows of 1 task\(s\) \(usable rows = real bank "
                                         r"rows minus the query's distinct excluded rows: task 2: 5 real - 3 excluded = 2 "
                                         r"\(query 1\)\); use k <= 2, or mask out / drop those tasks$"):
        knn_score_batched(queries, banks, 4, bank_mask=bank_mask, exclude=exclude)
    masked = np.ones((3, 2), bool)
    masked[2, 1] = False  # the query that would run short is masked: no error
    knn_score_batched(queries, banks, 4, query_mask=masked, bank_mask=bank_mask, exclude=exclude)
    with pytest.raises(ValueError, match=r"exclude\[\(0, 1, 2\)\] = 6 is out of range: it must be -1 \(none\) or a row of "
                                         r"that task's bank in \[0, 6\)"):
        bad = np.full((3, 2, 3), -1)
        bad[0, 1, 2] = 6
        knn_score_batched(queries, banks, 2, exclude=bad)
    with pytest.raises(ValueError, match=r"exclude must have shape \(T, Q, E\) = \(3, 2, 3\), got shape \(2, 3, 3\)"):
        knn_score_batched(queries, banks, 2, exclude=np.full((2, 3, 3), -1))


# --------------------------------------------------------------------------- bounded kernels


@pytest.mark.parametrize("seed", [0, 1])
def test_batched_bounded_holds_its_bounds_with_several_exclusions(seed):
    queries, query_mask, banks, bank_mask, exclude = tie_batch(seed)
    queries = queries + 0.25  # not centred; still ties
    banks = banks + 0.25
    scores, bounds = knn_score_batched_bounded(queries, banks, 3, query_mask=query_mask, bank_mask=bank_mask, exclude=exclude)
    want = naive_batched(queries, banks, 3, query_mask, bank_mask, exclude)
    real = query_mask
    assert np.isnan(scores[~real]).all() and (bounds[~real] == 0).all()
    assert (np.abs(scores - want)[real] <= bounds[real]).all()
    assert (bounds[real] < 1e-3 * np.maximum(want[real], 1.0)).all()  # useful bounds
    one, padded = first_only(exclude)
    base = knn_score_batched_bounded(queries, banks, 3, query_mask=query_mask, bank_mask=bank_mask, exclude=one)
    for form in (one[..., None], padded):
        again = knn_score_batched_bounded(queries, banks, 3, query_mask=query_mask, bank_mask=bank_mask, exclude=form)
        np.testing.assert_array_equal(again[0], base[0])
        np.testing.assert_array_equal(again[1], base[1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bounded_tasks_and_exact_candidates_leave_out_several_rows(dtype):
    features, query_ids, bank_ids, exclude = tie_ids(7, dtype=dtype)
    rows = centre_rows(features, np.arange(len(features)), bank_ids[bank_ids >= 0])
    want = naive_ids(features.astype(np.float64), query_ids, bank_ids, exclude, 3)
    present = query_ids >= 0
    approx, bounds = bounded_knn_tasks(rows, query_ids, bank_ids, 3, exclude=exclude)
    assert np.isnan(approx[~present]).all() and (np.abs(approx - want)[present] <= bounds[present]).all()
    scores, certified = exact_knn_candidates(rows, query_ids, bank_ids, 3, exclude=exclude)
    assert certified[~present].all() and np.isnan(scores[~present]).all()
    assert certified[present].sum() > 0
    np.testing.assert_allclose(scores[certified & present], want[certified & present], rtol=RTOL, atol=0)
    # an excluded query's nearest rows (the same row listed twice) are gone
    assert (want[:, 0] > 0).all()
    one, padded = first_only(exclude)
    for fn in (bounded_knn_tasks, exact_knn_candidates):
        base = fn(rows, query_ids, bank_ids, 3, exclude=one)
        for form in (one[..., None], padded):
            again = fn(rows, query_ids, bank_ids, 3, exclude=form)
            np.testing.assert_array_equal(again[0], base[0])
            np.testing.assert_array_equal(again[1], base[1])


def test_exact_candidates_certify_most_scores_without_ties():
    rng = np.random.default_rng(11)
    features = (3.0 + rng.standard_normal((200, 40))).astype(np.float32)
    bank_ids = np.stack([rng.permutation(150)[:30] for _ in range(5)])
    query_ids = rng.integers(0, 200, (5, 20))
    exclude = np.where(rng.random((5, 20, 2)) < 0.7, rng.integers(0, 30, (5, 20, 2)), -1)
    rows = centre_rows(features, np.arange(200), bank_ids.ravel())
    want = naive_ids(features.astype(np.float64), query_ids, bank_ids, exclude, 3)
    scores, certified = exact_knn_candidates(rows, query_ids, bank_ids, 3, exclude=exclude)
    assert certified.mean() > 0.9
    np.testing.assert_allclose(scores[certified], want[certified], rtol=RTOL)


def test_bounded_tasks_refuse_k_beyond_the_rows_left():
    rng = np.random.default_rng(2)
    features = rng.integers(-3, 4, (40, 5)).astype(np.float32)
    bank_ids = np.array([[0, 1, 2, 3, 4, 5, -1], [6, 7, 8, 9, 10, 11, 12]])
    query_ids = np.array([[20, 21, 22, 23], [24, 25, 26, -1]])
    rows = centre_rows(features, np.arange(40), bank_ids[bank_ids >= 0])
    exclude = np.full((2, 4, 3), -1)
    exclude[0, 3] = [0, 1, 2]  # 6 real rows - 3 = 3
    exclude[1, 3] = [0, 1, 2]  # a padding query: no count
    exclude[0, 2] = [6, 6, 0]  # a padding position and one real row
    bounded_knn_tasks(rows, query_ids, bank_ids, 3, exclude=exclude)
    for fn in (bounded_knn_tasks, exact_knn_candidates):
        with pytest.raises(ValueError, match=r"^k=4 is larger than the usable bank rows of 1 task\(s\) .*task 0: 6 real - 3 "
                                             r"excluded = 3 \(query 3\)\); use k <= 3"):
            fn(rows, query_ids, bank_ids, 4, exclude=exclude)
    exclude[0, 3] = [0, 0, 0]  # one distinct row: enough
    bounded_knn_tasks(rows, query_ids, bank_ids, 4, exclude=exclude)


# --------------------------------------------------------------------------- detectors


def test_max_exclusions_declared():
    assert KnnDetector.max_exclusions is None and NaglDetector.max_exclusions is None
    assert PatchDetector.max_exclusions is None
    assert MahalanobisDetector.max_exclusions == PcaDetector.max_exclusions == ResidualDetector.max_exclusions == 1


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_knn_and_nagl_detectors_leave_out_several_rows(metric):
    queries, query_mask, banks, bank_mask, exclude = tie_batch(5)
    rng = np.random.default_rng(5)
    abnormal = rng.integers(-2, 3, (6, 5, 5)).astype(float)
    abnormal_mask = np.ones((6, 5), bool)
    abnormal_mask[:, 4] = False
    ids = np.arange(6) + 40
    knn = KnnDetector(3, metric)
    nagl = NaglDetector(3, 0.5, metric)
    q, b, a = knn.prepare(np.nan_to_num(queries)), knn.prepare(banks), knn.prepare(abnormal)
    got = knn.score_tasks(q, query_mask, b, bank_mask, exclude, task_ids=ids)
    want = naive_batched(q, b, 3, query_mask, bank_mask, exclude)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    got = nagl.score_tasks(q, query_mask, b, bank_mask, exclude, task_ids=ids, abnormal=a, abnormal_mask=abnormal_mask)
    none = np.full((6, 14, 1), -1)
    toward = naive_batched(q, a, 3, query_mask, abnormal_mask, none)
    np.testing.assert_allclose(got, want - 0.5 * toward, rtol=1e-10, atol=1e-12)


def test_detectors_with_one_exclusion_are_bit_identical_in_every_form():
    queries, query_mask, banks, bank_mask, exclude = tie_batch(6)
    queries = np.nan_to_num(queries) + np.random.default_rng(6).normal(0, 0.1, queries.shape)  # no singular fits
    banks = banks + np.random.default_rng(7).normal(0, 0.1, banks.shape)
    one, padded = first_only(exclude)
    ids = np.arange(6)
    abnormal = np.random.default_rng(8).normal(size=(6, 4, 5))
    extra = dict(abnormal=abnormal, abnormal_mask=np.ones((6, 4), bool))
    for detector in (KnnDetector(3), NaglDetector(2), MahalanobisDetector(), PcaDetector(3), ResidualDetector(4),
                     ResidualDetector(3, "min")):
        base = detector.score_tasks(queries, query_mask, banks, bank_mask, one, task_ids=ids, **extra)
        assert np.isfinite(base[query_mask]).all()
        for form in (one[..., None], padded):
            np.testing.assert_array_equal(
                detector.score_tasks(queries, query_mask, banks, bank_mask, form, task_ids=ids, **extra), base)


def test_one_row_detectors_refuse_several_exclusions():
    queries, query_mask, banks, bank_mask, exclude = tie_batch(9)
    queries = np.nan_to_num(queries)
    ids = np.arange(6) + 70
    several = np.full(exclude.shape, -1)
    several[2, 5] = [0, 3, 3]  # two distinct real rows
    several[4, 6] = [1, 2, -1]
    for detector in (MahalanobisDetector(), PcaDetector(2), ResidualDetector(4)):
        label = detector.label.replace("(", r"\(").replace(")", r"\)")
        with pytest.raises(ValueError, match=rf"^{label} leaves out at most 1 bank row\(s\) per query, but query 5 of task 72 "
                                             r"excludes 2 distinct bank rows \(2 such queries\); use the protocol \"paper\" "
                                             r"or another detector \(knn, nagl and patch leave out any number\)$"):
            detector.score_tasks(queries, query_mask, banks, bank_mask, several, task_ids=ids)
    # one real row in a query (with repeats, padding rows, or masked queries) is fine
    fine = np.full(exclude.shape, -1)
    fine[2, 5] = [3, 3, 3]
    fine[1, 1] = [0, banks.shape[1] - 1, -1]  # the last bank row is padding
    fine[~query_mask] = [0, 1, 2]
    ref = np.full(exclude.shape[:2], -1)
    ref[2, 5], ref[1, 1] = 3, 0
    for detector in (MahalanobisDetector(), PcaDetector(2), ResidualDetector(4)):
        np.testing.assert_array_equal(detector.score_tasks(queries, query_mask, banks, bank_mask, fine, task_ids=ids),
                                      detector.score_tasks(queries, query_mask, banks, bank_mask, ref, task_ids=ids))


def test_knn_detector_needs_k_plus_the_rows_left_out():
    rng = np.random.default_rng(1)
    queries = rng.integers(0, 3, (2, 3, 4)).astype(float)
    banks = rng.integers(0, 3, (2, 6, 4)).astype(float)
    bank_mask = np.ones((2, 6), bool)
    bank_mask[1, 5] = False
    exclude = np.full((2, 3, 3), -1)
    exclude[1, 2] = [0, 1, 2]
    with pytest.raises(ValueError, match=r"^knn\(k=3,l2\) needs at least 6 usable bank rows per task, task 11 has 5 "
                                         r"\(1 task\(s\) too small\); use a smaller k or a larger support set$"):
        KnnDetector(3).score_tasks(queries, np.ones((2, 3), bool), banks, bank_mask, exclude, task_ids=[10, 11])
    assert KnnDetector(3).min_bank(3) == 6 and KnnDetector(3).min_bank(True) == 4
    assert PatchDetector(4).min_bank(2) == 6 and PatchDetector(0).min_bank(2) == 3


def patch_naive(detector: PatchDetector, queries, query_mask, bank, bank_mask, exclude, task_ids):
    """max over query patches of min over reference patches of ||x - y||², the references being
    the first K of the task's seeded permutation that the query does not exclude (all for K=all)."""
    out = np.full(query_mask.shape, np.nan)
    for t, w in zip(*np.nonzero(query_mask)):
        usable = np.flatnonzero(bank_mask[t])
        order = usable[np.random.default_rng([detector.seed, int(task_ids[t])]).permutation(len(usable))]
        if detector.K == 0:
            order = usable
        left = [s for s in order if s not in set(exclude[t, w].tolist())]
        refs = left if detector.K == 0 else left[: detector.K]
        y = bank[t, refs].reshape(-1, bank.shape[-1]).astype(np.float64)
        x = queries[t, w].astype(np.float64)
        out[t, w] = (((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)).min(axis=1).max()
    return out


@pytest.mark.parametrize("K", [0, 2, 3])
def test_patch_detector_leaves_out_several_images(K):
    rng = np.random.default_rng(K)
    n_tasks, width, n_bank, n_patch, dim = 3, 6, 8, 4, 3
    bank = rng.integers(-2, 3, (n_tasks, n_bank, n_patch, dim)).astype(np.float64)
    bank[:, 3] = bank[:, 1]  # a repeated image: ties
    queries = rng.integers(-2, 3, (n_tasks, width, n_patch, dim)).astype(np.float64)
    queries[:, 0] = bank[:, 1]
    query_mask = np.ones((n_tasks, width), bool)
    query_mask[1, 4] = False
    bank_mask = np.ones((n_tasks, n_bank), bool)
    bank_mask[2, 7] = False
    exclude = np.full((n_tasks, width, 3), -1)
    exclude[:, 0] = [1, 3, -1]  # both copies of itself
    exclude[:, 1] = [2, 2, 5]
    exclude[2, 2] = [7, 0, -1]  # a padding image
    exclude[1, 4] = [0, 1, 2]  # a masked query
    ids = np.array([3, 9, 4])
    detector = PatchDetector(K)
    got = detector.score_tasks(queries, query_mask, bank, bank_mask, exclude, task_ids=ids)
    np.testing.assert_allclose(got, patch_naive(detector, queries, query_mask, bank, bank_mask, exclude, ids), rtol=1e-9)
    assert np.isnan(got[1, 4]) and (got[:, 0] > 0).all()
    one, padded = first_only(exclude)
    base = detector.score_tasks(queries, query_mask, bank, bank_mask, one, task_ids=ids)
    np.testing.assert_array_equal(detector.score_tasks(queries, query_mask, bank, bank_mask, padded, task_ids=ids), base)
    if K:
        short = exclude.copy()
        short[0, 5] = [0, 1, 2]  # 3 of task 0's K + 2 images: K - 1 left
        with pytest.raises(ValueError, match=rf"patch\(K={K}\) needs {K + 3} usable normal support images \(K references \+ 3, "
                                             rf"since a query leaves 3 support images out\) but task 3 has {K + 2}"):
            detector.score_tasks(queries, query_mask, bank, bank_mask & (np.arange(n_bank) < K + 2), short, task_ids=ids)


def test_float64_scores_are_the_brute_force_sums_exactly_on_integer_features():
    """Integer-valued features (raw pixels) tie often; the expanded form ||q||² + ||b||² − 2 q·b can land
    one ulp off (652.9999999999999 for 653) and break a tie. Every route refines from the differences."""
    from swsa_engine.core.knn import knn_score, knn_score_batched, knn_score_gathered

    rng = np.random.default_rng(0)
    bank = rng.integers(0, 256, size=(3, 40, 97)).astype(np.float64)
    queries = rng.integers(0, 256, size=(3, 25, 97)).astype(np.float64)
    queries[:, :5] = bank[:, :5] + rng.integers(-1, 2, size=(3, 5, 97))  # near duplicates: small exact sums

    def brute(q, b, k=3):
        d = ((q[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return np.sort(d, axis=1)[:, :k].sum(1)

    want = np.stack([brute(queries[t], bank[t]) for t in range(3)])
    np.testing.assert_array_equal(knn_score_batched(queries, bank, k=3, precision="float64"), want)
    np.testing.assert_array_equal(knn_score(queries[0], bank[0], k=3, precision="float64"), want[0])
    features = bank.reshape(-1, 97)
    index = np.arange(120).reshape(3, 40)
    got = knn_score_gathered(queries[0], features, index, k=3, precision="float64")
    np.testing.assert_array_equal(got[0], want[0])
