"""kNN anomaly scores (swsa_engine.core.knn) against a naive float64 brute force.

The reference is the definition: float64 ``((q - b) ** 2).sum(-1)`` to every usable bank row,
sorted, the first k summed — one query and one task at a time.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch

from swsa_engine.core import knn
from swsa_engine.core.knn import knn_score, knn_score_batched, knn_score_gathered

RTOL = 1e-9


# --------------------------------------------------------------------------- references


def brute(q: np.ndarray, rows: np.ndarray, k: int) -> float:
    q = np.asarray(q, dtype=np.float64)
    rows = np.asarray(rows, dtype=np.float64)
    d = ((q[None, :] - rows) ** 2).sum(-1)
    return float(np.sort(d)[:k].sum())


def brute_score(queries, bank, k, exclude=None):
    out = np.empty(len(queries))
    for i, q in enumerate(queries):
        rows = bank
        if exclude is not None and exclude[i] >= 0:
            rows = np.delete(bank, exclude[i], axis=0)
        out[i] = brute(q, rows, k)
    return out


def brute_batched(queries, banks, k, query_mask=None, bank_mask=None, exclude=None):
    n_t, n_q, _ = queries.shape
    out = np.full((n_t, n_q), np.nan)
    for t in range(n_t):
        for i in range(n_q):
            if query_mask is not None and not query_mask[t, i]:
                continue
            keep = np.ones(banks.shape[1], bool) if bank_mask is None else bank_mask[t].copy()
            if exclude is not None and exclude[t, i] >= 0:
                keep[exclude[t, i]] = False
            out[t, i] = brute(queries[t, i], banks[t][keep], k)
    return out


def brute_gathered(queries, features, bank_index, k, exclude=None):
    n_t = bank_index.shape[0]
    out = np.empty((n_t, len(queries)))
    for t in range(n_t):
        for i, q in enumerate(queries):
            rows = [j for j in bank_index[t] if j >= 0 and (exclude is None or j != exclude[t, i])]
            out[t, i] = brute(q, features[rows], k)
    return out


def assert_close(got, want):
    got = np.asarray(got)
    assert got.dtype == np.float64
    assert got.shape == np.shape(want)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=0)


# --------------------------------------------------------------------------- data


def clustered(rng, n, dim, centers, spread=1e-3, scale=30.0):
    """Points in tight clusters far from the origin: float32 distances are pure rounding noise."""
    c = rng.normal(size=(len(centers), dim)) * scale
    lab = rng.integers(0, len(centers), n)
    return c[lab] + rng.normal(size=(n, dim)) * spread * np.asarray(centers)[lab, None]


def make(rng, n, dim, kind):
    if kind == "normal":
        return rng.normal(size=(n, dim))
    if kind == "relu32":  # like penultimate CNN features, stored as float32
        return np.maximum(rng.normal(size=(n, dim)), 0).astype(np.float32) + np.float32(0.1)
    if kind == "clustered":
        return clustered(rng, n, dim, centers=[1.0, 3.0])
    if kind == "int":
        return rng.integers(-3, 4, size=(n, dim))
    raise AssertionError(kind)


# --------------------------------------------------------------------------- knn_score


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["normal", "relu32", "clustered", "int"])
def test_knn_score_matches_brute_force(seed, kind):
    rng = np.random.default_rng(seed)
    dim = int(rng.choice([1, 3, 16, 70]))
    s = int(rng.integers(1, 40))
    n_q = int(rng.integers(1, 30))
    k = int(rng.integers(1, min(s, 6) + 1))
    bank = make(rng, s, dim, kind)
    queries = make(rng, n_q, dim, kind)
    want = brute_score(queries, bank, k)
    assert_close(knn_score(queries, bank, k), want)
    assert_close(knn_score(queries, bank, k, precision="float64"), want)
    assert_close(knn_score(queries, bank, k, block_size=int(rng.integers(1, 8))), want)


@pytest.mark.parametrize("seed", range(3))
def test_knn_score_exclude_random(seed):
    rng = np.random.default_rng(seed)
    s, dim, n_q = 25, 12, 40
    bank = make(rng, s, dim, "clustered" if seed else "normal")
    queries = make(rng, n_q, dim, "clustered" if seed else "normal")
    exclude = np.where(rng.random(n_q) < 0.6, rng.integers(0, s, n_q), -1)
    for k in (1, 3, s - 1):
        want = brute_score(queries, bank, k, exclude)
        assert_close(knn_score(queries, bank, k, exclude=exclude), want)
        assert_close(knn_score(queries, bank, k, exclude=exclude, precision="float64"), want)


def test_knn_score_leave_one_out_equals_removing_the_row():
    rng = np.random.default_rng(7)
    bank = make(rng, 15, 8, "relu32")
    got = knn_score(bank, bank, 3, exclude=np.arange(15))
    for i in range(15):
        alone = knn_score(bank[i : i + 1], np.delete(bank, i, axis=0), 3)
        np.testing.assert_allclose(got[i], alone[0], rtol=RTOL, atol=0)
    # without exclusion every bank row is its own nearest neighbour at distance 0
    np.testing.assert_allclose(knn_score(bank, bank, 1), 0.0, atol=0)
    # -1 everywhere means no exclusion
    assert_close(knn_score(bank, bank, 3, exclude=np.full(15, -1)), knn_score(bank, bank, 3))


def test_knn_score_refinement_fixes_float32_near_ties():
    """Plain float32 search gets these wrong by far more than 1e-9; the result must not."""
    import faiss

    rng = np.random.default_rng(11)
    bank = clustered(rng, 60, 32, centers=[1.0], spread=1e-4, scale=100.0)
    queries = clustered(rng, 30, 32, centers=[1.0], spread=1e-4, scale=100.0)
    queries = bank[rng.integers(0, 60, 30)] + rng.normal(size=(30, 32)) * 1e-2
    want = brute_score(queries, bank, 3)
    index = faiss.IndexFlatL2(32)
    index.add(bank.astype(np.float32))
    plain = index.search(queries.astype(np.float32), 3)[0].astype(np.float64).sum(1)
    assert np.max(np.abs(plain / want - 1)) > 1e-6  # the data really is hard for float32
    assert_close(knn_score(queries, bank, 3), want)


def test_knn_score_ties_and_duplicates_take_every_fallback_tier(caplog):
    rng = np.random.default_rng(3)
    base = rng.normal(size=(6, 10)) * 50
    bank = np.concatenate([base, base, base, base[:2]])  # every row repeated: exact ties
    queries = np.concatenate([base[:3], base[:3] + 1e-9, rng.normal(size=(4, 10))])
    with caplog.at_level(logging.DEBUG, logger="swsa_engine.core.knn"):
        for k in (1, 3, 4, 7):
            assert_close(knn_score(queries, bank, k), brute_score(queries, bank, k))
            ex = np.arange(len(queries)) % len(bank)
            assert_close(knn_score(queries, bank, k, exclude=ex), brute_score(queries, bank, k, ex))
    text = caplog.text
    assert "re-selecting them in float64" in text
    assert "recomputed exactly against the whole bank" in text


def test_knn_score_torch_candidate_path(monkeypatch):
    """The path used on CUDA without FAISS GPUs (torch float32 running top-k), run on CPU."""
    monkeypatch.setattr(knn.one_bank, "use_faiss", lambda dev: False)
    monkeypatch.setattr(knn.one_bank, "BLOCK_BYTES", 64 * 1024)  # many query and bank blocks
    rng = np.random.default_rng(5)
    for kind in ("normal", "clustered"):
        bank = make(rng, 300, 20, kind)
        queries = make(rng, 50, 20, kind)
        ex = np.where(rng.random(50) < 0.5, rng.integers(0, 300, 50), -1)
        for k in (1, 4):
            assert_close(knn_score(queries, bank, k, exclude=ex), brute_score(queries, bank, k, ex))
            assert_close(knn_score(queries, bank, k, exclude=ex, precision="float64"), brute_score(queries, bank, k, ex))


def test_knn_score_huge_and_tiny_values_use_float64():
    rng = np.random.default_rng(2)
    for scale in (1e25, 1e-20):
        bank = rng.normal(size=(20, 5)) * scale
        queries = rng.normal(size=(6, 5)) * scale
        assert_close(knn_score(queries, bank, 2), brute_score(queries, bank, 2))


def test_knn_score_shapes_dtypes_and_determinism():
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(10, 4)).astype(np.float16)
    queries = rng.normal(size=(5, 4)).astype(np.float32)
    out = knn_score(queries, bank, 2)
    assert out.shape == (5,) and out.dtype == np.float64
    assert_close(out, brute_score(queries, bank, 2))
    np.testing.assert_array_equal(out, knn_score(queries, bank, 2))
    empty = knn_score(np.zeros((0, 4)), bank, 2)
    assert empty.shape == (0,) and empty.dtype == np.float64
    assert_close(knn_score(torch.from_numpy(queries), torch.from_numpy(bank.astype(np.float32)), 2),
                 brute_score(queries, bank.astype(np.float32), 2))


def test_knn_score_logs_memory_estimate(caplog):
    rng = np.random.default_rng(0)
    with caplog.at_level(logging.DEBUG, logger="swsa_engine.core.knn"):
        knn_score(rng.normal(size=(4, 3)), rng.normal(size=(6, 3)), 2)
    assert "MiB per block" in caplog.text


# --------------------------------------------------------------------------- knn_score errors


def test_knn_score_errors():
    rng = np.random.default_rng(0)
    q, b = rng.normal(size=(3, 4)), rng.normal(size=(4, 4))
    with pytest.raises(ValueError, match=r"k must be >= 1, got k=0"):
        knn_score(q, b, 0)
    with pytest.raises(ValueError, match=r"k must be a positive integer, got 2.5"):
        knn_score(q, b, 2.5)
    with pytest.raises(ValueError, match=r"k must be a positive integer, got True"):
        knn_score(q, b, True)
    with pytest.raises(ValueError, match=r"k=5 is larger than the support set \(4 rows\); use k <= 4"):
        knn_score(q, b, 5)
    with pytest.raises(ValueError, match=r"k=4 is larger than the support set minus the excluded row \(4 rows - 1 = 3 usable.*use k <= 3"):
        knn_score(q, b, 4, exclude=np.array([0, -1, -1]))
    knn_score(q, b, 4, exclude=np.array([-1, -1, -1]))  # nothing excluded: fine
    with pytest.raises(ValueError, match=r"k=1 is larger than the support set \(0 rows\); the bank is empty"):
        knn_score(q, np.zeros((0, 4)), 1)
    with pytest.raises(ValueError, match=r"queries have D=4 features per row but bank rows have D=5"):
        knn_score(q, rng.normal(size=(4, 5)), 2)
    with pytest.raises(ValueError, match=r"queries must have shape \(Q, D\) \(2 dimensions\), got shape \(4,\)"):
        knn_score(q[0], b, 2)
    with pytest.raises(ValueError, match=r"bank must have shape \(S, D\)"):
        knn_score(q, b[None], 2)
    with pytest.raises(ValueError, match=r"bank must be a real numeric array of shape \(S, D\), got dtype complex128"):
        knn_score(q, b.astype(complex), 2)
    with pytest.raises(ValueError, match=r"queries must be a real numeric array.*got dtype bool"):
        knn_score(q > 0, b, 2)
    bad = q.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"queries contains NaN or inf at row 2 \(first bad row; 1 bad row\(s\) in all\)"):
        knn_score(bad, b, 2)
    badb = b.copy()
    badb[1, 0] = np.inf
    badb[3, 3] = -np.inf
    with pytest.raises(ValueError, match=r"bank contains NaN or inf at row 1 \(first bad row; 2 bad row\(s\) in all\)"):
        knn_score(q, badb, 2)
    with pytest.raises(ValueError, match=r"exclude must be an integer array of shape \(Q,\), got dtype float64"):
        knn_score(q, b, 2, exclude=np.zeros(3))
    with pytest.raises(ValueError, match=r"exclude must have shape \(Q,\) = \(3,\), got shape \(2,\)"):
        knn_score(q, b, 2, exclude=np.zeros(2, int))
    with pytest.raises(ValueError, match=r"exclude\[1\] = 4 is out of range: it must be -1 \(none\) or a row of bank in \[0, 4\)"):
        knn_score(q, b, 2, exclude=np.array([0, 4, -1]))
    with pytest.raises(ValueError, match=r"exclude\[0\] = -2 is out of range"):
        knn_score(q, b, 2, exclude=np.array([-2, 0, 0]))
    with pytest.raises(ValueError, match=r"block_size must be >= 1"):
        knn_score(q, b, 2, block_size=0)
    with pytest.raises(ValueError, match=r"precision must be None, 'float32' or 'float64', got 'half'"):
        knn_score(q, b, 2, precision="half")
    with pytest.raises(ValueError, match=r"squared norm overflows float64"):
        knn_score(q, b * 1e200, 2)


def test_device_errors():
    rng = np.random.default_rng(0)
    q, b = rng.normal(size=(3, 4)), rng.normal(size=(4, 4))
    with pytest.raises(ValueError, match=r"device='nonsense' is not a valid torch device"):
        knn_score(q, b, 2, device="nonsense")
    with pytest.raises(ValueError, match=r"device='meta' is not supported; use 'cpu' or a CUDA device"):
        knn_score_batched(q[None], b[None], 2, device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"CUDA is not available.*use device='cpu'"):
            knn_score_gathered(q, b, np.array([[0, 1, 2]]), 2, device="cuda")


# --------------------------------------------------------------------------- knn_score_batched


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("precision", [None, "float32", "float64"])
def test_batched_matches_brute_force(seed, precision):
    rng = np.random.default_rng(100 + seed)
    n_t = int(rng.integers(1, 7))
    n_q = int(rng.integers(1, 20))
    s = int(rng.integers(4, 25))
    dim = int(rng.choice([2, 9, 33]))
    k = int(rng.integers(1, 4))
    kind = ["normal", "clustered", "relu32"][seed % 3]
    queries = make(rng, n_t * n_q, dim, kind).reshape(n_t, n_q, dim)
    banks = make(rng, n_t * s, dim, kind).reshape(n_t, s, dim)
    qmask = rng.random((n_t, n_q)) < 0.8
    bmask = rng.random((n_t, s)) < 0.85
    bmask[:, : k + 1] = True  # enough real rows for the exclusion below
    exclude = np.where(rng.random((n_t, n_q)) < 0.5, rng.integers(0, s, (n_t, n_q)), -1)
    # padding and masked queries may hold anything
    banks = banks.astype(np.float64)
    queries = queries.astype(np.float64)
    banks[~bmask] = np.nan
    queries[~qmask] = np.inf
    want = brute_batched(queries, banks, k, qmask, bmask, exclude)
    got = knn_score_batched(queries, banks, k, query_mask=qmask, bank_mask=bmask, exclude=exclude, precision=precision)
    assert_close(got, want)
    got = knn_score_batched(queries, banks, k, query_mask=qmask, bank_mask=bmask, exclude=exclude, precision=precision, block_size=1)
    assert_close(got, want)


def test_batched_defaults_and_agreement_with_knn_score():
    rng = np.random.default_rng(1)
    queries = rng.normal(size=(3, 7, 5))
    banks = rng.normal(size=(3, 9, 5))
    got = knn_score_batched(queries, banks)  # k=3, no masks
    assert_close(got, brute_batched(queries, banks, 3))
    for t in range(3):
        np.testing.assert_allclose(got[t], knn_score(queries[t], banks[t]), rtol=RTOL, atol=0)


def test_batched_leave_one_out_and_padded_exclusion():
    rng = np.random.default_rng(2)
    banks = rng.normal(size=(4, 8, 6))
    bmask = np.ones((4, 8), bool)
    bmask[2, 5:] = False
    # leave-one-out: the bank's own rows as queries, each excluding itself
    exclude = np.tile(np.arange(8), (4, 1))
    qmask = bmask.copy()
    got = knn_score_batched(banks, banks, 2, query_mask=qmask, bank_mask=bmask, exclude=exclude)
    for t in range(4):
        for i in range(8):
            if not qmask[t, i]:
                assert np.isnan(got[t, i])
                continue
            rows = np.delete(banks[t][bmask[t]], i, axis=0)
            np.testing.assert_allclose(got[t, i], brute(banks[t, i], rows, 2), rtol=RTOL, atol=0)
    # excluding a padding row changes nothing
    q = rng.normal(size=(4, 3, 6))
    ex_pad = np.full((4, 3), -1)
    ex_pad[2] = 6
    assert_close(knn_score_batched(q, banks, 3, bank_mask=bmask, exclude=ex_pad), knn_score_batched(q, banks, 3, bank_mask=bmask))


def test_batched_ties_need_fallback(caplog):
    rng = np.random.default_rng(4)
    base = rng.normal(size=(2, 4, 6)) * 40
    # (2, 32, 6): every row 8 times, more tied rows than the k + 3 candidates the kernels refine,
    # so the certificate cannot separate them and the exact fall-back must run
    banks = np.concatenate([base] * 8, axis=1)
    queries = np.concatenate([base, base + 1e-7], axis=1)
    with caplog.at_level(logging.DEBUG, logger="swsa_engine.core.knn"):
        for precision in ("float32", "float64"):
            for k in (2, 4):
                got = knn_score_batched(queries, banks, k, precision=precision)
                assert_close(got, brute_batched(queries, banks, k))
                ex = np.tile(np.arange(8) % 32, (2, 1))
                got = knn_score_batched(queries, banks, k, exclude=ex, precision=precision)
                assert_close(got, brute_batched(queries, banks, k, exclude=ex))
    assert "not certified; recomputed exactly" in caplog.text


def test_batched_empty_and_all_masked():
    rng = np.random.default_rng(0)
    out = knn_score_batched(np.zeros((0, 3, 4)), np.zeros((0, 5, 4)), 2)
    assert out.shape == (0, 3)
    q, b = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 5, 4))
    out = knn_score_batched(q, b, 2, query_mask=np.zeros((2, 3), bool))
    assert out.shape == (2, 3) and np.isnan(out).all()
    # a task without real queries may have too small a bank
    bmask = np.ones((2, 5), bool)
    bmask[1] = False
    qmask = np.ones((2, 3), bool)
    qmask[1] = False
    out = knn_score_batched(q, b, 2, query_mask=qmask, bank_mask=bmask)
    assert_close(out, brute_batched(q, b, 2, qmask, bmask))


def test_batched_errors():
    rng = np.random.default_rng(0)
    q, b = rng.normal(size=(4, 3, 5)), rng.normal(size=(4, 6, 5))
    with pytest.raises(ValueError, match=r"queries hold T=4 tasks but banks hold T=3"):
        knn_score_batched(q, b[:3])
    with pytest.raises(ValueError, match=r"queries have D=5 features per row but bank rows have D=4"):
        knn_score_batched(q, b[..., :4])
    with pytest.raises(ValueError, match=r"queries must have shape \(T, Q, D\) \(3 dimensions\)"):
        knn_score_batched(q[0], b)
    with pytest.raises(ValueError, match=r"bank_mask must be a boolean array of shape \(T, S\).*got dtype int64"):
        knn_score_batched(q, b, bank_mask=np.ones((4, 6), int))
    with pytest.raises(ValueError, match=r"query_mask must have shape \(T, Q\) = \(4, 3\), got shape \(3, 4\)"):
        knn_score_batched(q, b, query_mask=np.ones((3, 4), bool))
    bmask = np.ones((4, 6), bool)
    bmask[1, 2:] = False
    bmask[3, :] = False
    with pytest.raises(ValueError, match=r"k=3 is larger than the support set of 2 task\(s\) \(usable rows .*: task 1: 2, task 3: 0\); use k <= 0"):
        knn_score_batched(q, b, 3, bank_mask=bmask)
    bmask = np.ones((4, 6), bool)
    bmask[2, 3:] = False  # 3 real rows: enough for k=3, not with one excluded
    ex = np.full((4, 3), -1)
    ex[2, 1] = 0
    with pytest.raises(ValueError, match=r"support set of 1 task\(s\) \(usable rows = real bank rows minus an excluded row: task 2: 2\); use k <= 2"):
        knn_score_batched(q, b, 3, bank_mask=bmask, exclude=ex)
    ex[2, 1] = 4  # excluding a padding row leaves 3 usable rows
    knn_score_batched(q, b, 3, bank_mask=bmask, exclude=ex)
    with pytest.raises(ValueError, match=r"exclude\[\(0, 2\)\] = 6 is out of range: it must be -1 \(none\) or a row of that task's bank in \[0, 6\)"):
        ex = np.full((4, 3), -1)
        ex[0, 2] = 6
        knn_score_batched(q, b, 3, exclude=ex)
    bad = q.copy()
    bad[2, 1, 3] = np.nan
    with pytest.raises(ValueError, match=r"queries contains NaN or inf at task 2, row 1"):
        knn_score_batched(bad, b)
    qmask = np.ones((4, 3), bool)
    qmask[2, 1] = False
    knn_score_batched(bad, b, query_mask=qmask)  # masked: ignored
    badb = b.copy()
    badb[3, 4, 0] = np.inf
    with pytest.raises(ValueError, match=r"banks contains NaN or inf at task 3, row 4"):
        knn_score_batched(q, badb)
    with pytest.raises(ValueError, match=r"block_size must be a positive integer or None"):
        knn_score_batched(q, b, block_size="2")
    with pytest.raises(ValueError, match=r"k must be >= 1"):
        knn_score_batched(q, b, -1)


# --------------------------------------------------------------------------- knn_score_gathered


def random_banks(rng, n_t, s, n_f, overlap):
    """(T, S) indices with -1 padding; overlap=False draws disjoint banks when possible."""
    if overlap or n_t * s > n_f:
        bi = rng.integers(0, n_f, (n_t, s))
    else:
        bi = rng.permutation(n_f)[: n_t * s].reshape(n_t, s)
    n_real = rng.integers(1, s + 1, n_t)
    bi[np.arange(s)[None, :] >= n_real[:, None]] = -1
    return bi


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("precision", [None, "float32"])
def test_gathered_matches_brute_force(seed, precision):
    rng = np.random.default_rng(200 + seed)
    n_t = int(rng.integers(1, 9))
    s = int(rng.integers(3, 12))
    n_f = int(rng.integers(n_t * s // 2 + 1, 3 * n_t * s + 2))
    n_q = int(rng.integers(1, 25))
    dim = int(rng.choice([1, 7, 40]))
    kind = ["normal", "clustered", "relu32"][seed % 3]
    features = make(rng, n_f, dim, kind)
    queries = make(rng, n_q, dim, kind)
    bi = random_banks(rng, n_t, s, n_f, overlap=bool(seed % 2))
    n_valid = (bi >= 0).sum(1)
    k = int(rng.integers(1, 4))
    bi[n_valid < k + 1, : k + 1] = rng.integers(0, n_f, ((n_valid < k + 1).sum(), k + 1))
    # exclusion: the query's "own row", sometimes in the bank, sometimes not
    exclude = np.where(rng.random((n_t, n_q)) < 0.5, bi[np.arange(n_t)[:, None], rng.integers(0, s, (n_t, n_q))], -1)
    exclude = np.where(rng.random((n_t, n_q)) < 0.2, rng.integers(0, n_f, (n_t, n_q)), exclude)
    # duplicate bank entries would make usable counts < k here; keep each task's rows distinct
    for t in range(n_t):
        row = bi[t][bi[t] >= 0]
        if len(np.unique(row)) != len(row):
            bi[t] = -1
            bi[t, : k + 1] = rng.choice(n_f, k + 1, replace=False) if n_f >= k + 1 else np.arange(k + 1) % n_f
    if (n_f < k + 1):
        pytest.skip("too few features for this draw")
    want = brute_gathered(queries, features, bi, k, exclude)
    got = knn_score_gathered(queries, features, bi, k, exclude=exclude, precision=precision)
    assert_close(got, want)
    got = knn_score_gathered(queries, features, bi, k, exclude=exclude, precision=precision, block_size=3)
    assert_close(got, want)
    assert_close(knn_score_gathered(queries, features, bi, k, precision=precision), brute_gathered(queries, features, bi, k))


@pytest.mark.parametrize("k", [1, 3, 8, 9, 12])
def test_gathered_layouts_and_large_k(k):
    """Disjoint banks (matrix product against the bank slots) and overlapping banks (gather);
    k <= 8 uses the min/max network, larger k uses topk."""
    rng = np.random.default_rng(k)
    dim, s, n_t = 9, 14, 5
    features = make(rng, 80, dim, "clustered")
    queries = make(rng, 11, dim, "clustered")
    disjoint = rng.permutation(80)[: n_t * s].reshape(n_t, s)
    overlapping = np.stack([rng.choice(20, s, replace=False) for _ in range(n_t)])
    for bi in (disjoint, overlapping):
        bi = bi.copy()
        bi[0, 13:] = -1
        assert_close(knn_score_gathered(queries, features, bi, k), brute_gathered(queries, features, bi, k))


def test_gathered_agrees_with_batched_and_knn_score():
    rng = np.random.default_rng(9)
    features = make(rng, 50, 12, "relu32")
    queries = make(rng, 8, 12, "relu32")
    bi = random_banks(rng, 6, 7, 50, overlap=True)
    bi[:, :4] = rng.integers(0, 50, (6, 4))
    bi = np.stack([np.where(r >= 0, r, -1) for r in bi])
    gathered = knn_score_gathered(queries, features, bi, 3)
    banks = features[np.maximum(bi, 0)]
    batched = knn_score_batched(np.broadcast_to(queries, (6, 8, 12)), banks, 3, bank_mask=bi >= 0)
    np.testing.assert_allclose(gathered, batched, rtol=RTOL, atol=0)
    for t in range(6):
        np.testing.assert_allclose(gathered[t], knn_score(queries, features[bi[t][bi[t] >= 0]], 3), rtol=RTOL, atol=0)


def test_gathered_leave_one_out_and_duplicates():
    rng = np.random.default_rng(12)
    features = make(rng, 30, 5, "normal")
    bi = np.array([[0, 1, 2, 3, 4, -1], [5, 6, 7, 8, 9, 10], [2, 2, 11, 12, -1, -1]])
    queries = features[[0, 1, 5, 2, 20]]
    exclude = np.array([[0, 1, -1, 2, 20], [-1, -1, 5, -1, -1], [0, 1, 5, 2, 20]])
    got = knn_score_gathered(queries, features, bi, 2, exclude=exclude)
    assert_close(got, brute_gathered(queries, features, bi, 2, exclude))
    # leave-one-out equals brute force with that row removed from the bank
    np.testing.assert_allclose(got[0, 0], brute(features[0], features[[1, 2, 3, 4]], 2), rtol=RTOL, atol=0)
    # a row listed twice counts twice, and excluding it removes both copies
    np.testing.assert_allclose(got[2, 4], brute(features[20], features[[2, 2, 11, 12]], 2), rtol=RTOL, atol=0)
    np.testing.assert_allclose(got[2, 3], brute(features[2], features[[11, 12]], 2), rtol=RTOL, atol=0)
    # rows of features not used by any bank may hold NaN
    f2 = features.copy()
    f2[25:] = np.nan
    q2 = features[:5]
    assert_close(knn_score_gathered(q2, f2, bi, 2), brute_gathered(q2, features, bi, 2))


def test_gathered_ties_need_fallback(caplog):
    rng = np.random.default_rng(13)
    base = rng.normal(size=(4, 6)) * 40
    # rows i, i+4, ..., i+28 identical: each bank holds 8 copies of a row, more tied rows than the
    # k + 3 candidates the kernels refine, so the certificate cannot separate them (exact fall-back)
    features = np.concatenate([base] * 8)
    queries = np.concatenate([base, base + 1e-7])
    bi = np.array([np.r_[np.arange(0, 32, 4), np.arange(1, 32, 4)], np.r_[np.arange(2, 32, 4), np.arange(3, 28, 4), -1]])
    with caplog.at_level(logging.DEBUG, logger="swsa_engine.core.knn"):
        for precision in ("float32", "float64"):
            for k in (1, 3):
                got = knn_score_gathered(queries, features, bi, k, precision=precision)
                assert_close(got, brute_gathered(queries, features, bi, k))
                ex = np.stack([np.tile([0, 1, 4, 9], 2), np.tile([2, 6, 10, 3], 2)])
                got = knn_score_gathered(queries, features, bi, k, exclude=ex, precision=precision)
                assert_close(got, brute_gathered(queries, features, bi, k, ex))
    assert "not certified; recomputed exactly" in caplog.text


def test_gathered_float32_input_and_empty():
    rng = np.random.default_rng(14)
    features = make(rng, 40, 16, "relu32")
    queries = make(rng, 9, 16, "relu32")
    bi = random_banks(rng, 4, 6, 40, overlap=False)
    bi[:, :3] = np.arange(12).reshape(4, 3) + 20
    out = knn_score_gathered(queries, features, bi, 3)
    assert out.shape == (4, 9) and out.dtype == np.float64
    assert_close(out, brute_gathered(queries, features, bi, 3))
    np.testing.assert_array_equal(out, knn_score_gathered(queries, features, bi, 3))  # deterministic
    assert knn_score_gathered(queries[:0], features, bi, 3).shape == (4, 0)
    assert knn_score_gathered(queries, features, bi[:0], 3).shape == (0, 9)


def test_gathered_errors():
    rng = np.random.default_rng(0)
    q, f = rng.normal(size=(3, 4)), rng.normal(size=(10, 4))
    bi = np.array([[0, 1, 2, 3], [4, 5, -1, -1]])
    with pytest.raises(ValueError, match=r"queries have D=4 features per row but features rows have D=3"):
        knn_score_gathered(q, f[:, :3], bi, 2)
    with pytest.raises(ValueError, match=r"bank_index must be an integer array of shape \(T, S\), got dtype float64"):
        knn_score_gathered(q, f, bi.astype(float), 2)
    with pytest.raises(ValueError, match=r"bank_index must have shape \(T, S\) \(2 dimensions\), got shape \(4,\)"):
        knn_score_gathered(q, f, bi[0], 2)
    with pytest.raises(ValueError, match=r"bank_index\[\(1, 2\)\] = 10 is out of range: it must be -1 \(none\) or a row of features in \[0, 10\)"):
        knn_score_gathered(q, f, np.array([[0, 1, 2, 3], [4, 5, 10, -1]]), 2)
    with pytest.raises(ValueError, match=r"k=3 is larger than the support set of 1 task\(s\) \(usable rows = bank rows minus excluded row\(s\): task 1: 2\); use k <= 2"):
        knn_score_gathered(q, f, bi, 3)
    ex = np.full((2, 3), -1)
    ex[0, 2] = 1
    with pytest.raises(ValueError, match=r"support set of 1 task\(s\) .*task 0: 3\); use k <= 3"):
        knn_score_gathered(q, f, np.array([[0, 1, 2, 3], [4, 5, 6, 7]]), 4, exclude=ex)
    dup = np.array([[0, 1, 1, 1, 2], [4, 5, 6, 7, 8]])
    ex = np.full((2, 3), -1)
    ex[0, 0] = 1  # removes three slots of task 0
    with pytest.raises(ValueError, match=r"task 0: 2\); use k <= 2"):
        knn_score_gathered(q, f, dup, 3, exclude=ex)
    ex[0, 0] = 9  # not in the bank: nothing removed
    knn_score_gathered(q, f, dup, 3, exclude=ex)
    with pytest.raises(ValueError, match=r"exclude must have shape \(T, Q\) = \(2, 3\), got shape \(3, 2\)"):
        knn_score_gathered(q, f, bi, 2, exclude=np.full((3, 2), -1))
    with pytest.raises(ValueError, match=r"exclude\[\(1, 0\)\] = 10 is out of range"):
        knn_score_gathered(q, f, bi, 2, exclude=np.array([[-1, -1, -1], [10, -1, -1]]))
    bad = f.copy()
    bad[5, 1] = np.nan
    with pytest.raises(ValueError, match=r"features contains NaN or inf at row 5 \(first bad row used by a bank, e.g. task 1"):
        knn_score_gathered(q, bad, bi, 2)
    badq = q.copy()
    badq[1] = np.inf
    with pytest.raises(ValueError, match=r"queries contains NaN or inf at row 1"):
        knn_score_gathered(badq, f, bi, 2)
    with pytest.raises(ValueError, match=r"block_size must be >= 1"):
        knn_score_gathered(q, f, bi, 2, block_size=-3)
    with pytest.raises(ValueError, match=r"k must be a positive integer"):
        knn_score_gathered(q, f, bi, "3")


@pytest.mark.parametrize("k", [1, 3])
def test_small_banks_on_hard_data(k):
    """Banks just larger than the candidate count, on data where float32 ordering is noise."""
    rng = np.random.default_rng(30 + k)
    dim = 24
    for s in range(k, k + 7):
        bank = clustered(rng, s, dim, centers=[1.0], spread=1e-4, scale=100.0)
        queries = bank[rng.integers(0, s, 12)] + rng.normal(size=(12, dim)) * 3e-3
        assert_close(knn_score(queries, bank, k), brute_score(queries, bank, k))
        if s > k:
            ex = rng.integers(-1, s, 12)
            assert_close(knn_score(queries, bank, k, exclude=ex), brute_score(queries, bank, k, ex))
            assert_close(knn_score(queries, bank, k, exclude=ex, precision="float64"), brute_score(queries, bank, k, ex))
        banks = np.stack([bank, bank[::-1]])
        qs = np.stack([queries, queries])
        for precision in ("float32", "float64"):
            assert_close(knn_score_batched(qs, banks, k, precision=precision), brute_batched(qs, banks, k))
            bi = np.stack([np.arange(s), np.arange(s)[::-1]])
            assert_close(knn_score_gathered(queries, bank, bi, k, precision=precision), brute_gathered(queries, bank, bi, k))


def test_leave_one_out_on_hard_data_through_the_exact_fallback(caplog):
    """Distances ~1e-9 of the norms: most certificates fail, those scores are recomputed exactly,
    and the exclusion must still apply there."""
    rng = np.random.default_rng(40)
    features = clustered(rng, 24, 6, centers=[1.0, 2.0])
    bi = np.stack([np.arange(12), np.arange(12, 24)])
    exclude = np.stack([np.arange(12), np.full(12, -1)])
    exclude[1, :6] = np.arange(12, 18)
    queries = features[:12]
    with caplog.at_level(logging.DEBUG, logger="swsa_engine.core.knn"):
        for precision in ("float32", "float64"):
            got = knn_score_gathered(queries, features, bi, 2, exclude=exclude, precision=precision)
            assert_close(got, brute_gathered(queries, features, bi, 2, exclude))
            qs = np.stack([queries, features[12:]])
            banks = features[bi]
            got = knn_score_batched(qs, banks, 2, exclude=np.where(exclude >= 0, exclude % 12, -1), precision=precision)
            assert_close(got, brute_batched(qs, banks, 2, exclude=np.where(exclude >= 0, exclude % 12, -1)))
        got = knn_score(queries, features[:12], 2, exclude=np.arange(12), precision="float64")
        assert_close(got, brute_score(queries, features[:12], 2, np.arange(12)))
    assert re.search(r"knn_score_gathered: [1-9]\d* of 24 scores not certified", caplog.text)


def test_knn_score_exclusion_in_the_last_fallback_tier(caplog):
    """Exact ties beyond the k-th neighbour defeat both certificates; the excluded row (the
    query itself, at distance 0) must stay excluded in the exact recomputation."""
    rng = np.random.default_rng(41)
    x = rng.normal(size=(3, 8)) * 10
    y = rng.normal(size=8) * 10
    bank = np.concatenate([x, np.tile(y, (12, 1))])  # rows 3.. are 12 copies of y
    queries = x
    ex = np.arange(3)
    with caplog.at_level(logging.DEBUG, logger="swsa_engine.core.knn"):
        for k in (3, 6):
            assert_close(knn_score(queries, bank, k, exclude=ex), brute_score(queries, bank, k, ex))
    assert "recomputed exactly against the whole bank" in caplog.text


def test_finite_rows_equals_isfinite_all_with_extremes():
    """The float64-sum form of the one finite-rows rule equals isfinite(...).all() on float32 and
    float16 rows holding NaN, ±inf, inf - inf and the largest finite values (no false alarm)."""
    from swsa_engine.core.validation import finite_rows

    rng = np.random.default_rng(3)
    for dtype in (np.float32, np.float16, np.float64):
        big = np.finfo(dtype).max
        x = rng.normal(size=(200, 33)).astype(dtype)
        specials = np.array([np.nan, np.inf, -np.inf, big, -big], dtype=dtype)
        hits = rng.random(x.shape) < 0.02
        x[hits] = rng.choice(specials, size=int(hits.sum()))
        x[0, :] = big  # a row of the largest finite values is finite
        x[1, :2] = [np.inf, -np.inf]
        np.testing.assert_array_equal(finite_rows(x), np.isfinite(x).all(axis=1))
        assert finite_rows(x)[0] and not finite_rows(x)[1]
