"""Mahalanobis, few-shot residual, NAGL and PCA detectors against plain per-task references, the
abnormal-reference split, and the sweep with several detectors against per-task reference loops.

All engine detectors compute in float64; references are scikit-learn's LedoitWolf with scipy's
mahalanobis, NumPy SVD, and explicit loops; agreement is asserted to 1e-9 relative.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import mahalanobis
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

from swsa_engine.app.bench import make_paper_store
from swsa_engine.app.cli import main
from swsa_engine.core.detectors import (KnnDetector, MahalanobisDetector, NaglDetector, PcaDetector, ResidualDetector,
                                   parse_detector)
from swsa_engine.run.task_groups import TaskGroup, build_task_groups, pad_rows
from swsa_engine.run.sweep import run_sweep
from swsa_store import edit_store, open_store
from swsa_store.references import REFERENCES_TABLE, choose_references, hash_uniform, read_references, split_references
from swsa_store.tasks import ROLE_HELDOUT, ROLE_REAL_ANOMALY, ROLE_REAL_NORMAL, ROLE_SEED

RTOL = 1e-9


def _batch(rng, n_tasks, width, n_bank, dim, *, n_abnormal=0):
    """Random padded per-task queries / banks with an offset (features are not centred) and some
    leave-one-out queries that are copies of their excluded bank row."""
    scale = rng.uniform(0.3, 3.0, size=dim)
    bank = rng.normal(size=(n_tasks, n_bank, dim)) * scale + 2.0
    bank_mask = rng.random((n_tasks, n_bank)) < 0.85
    bank_mask[:, : min(n_bank, 6)] = True
    queries = rng.normal(size=(n_tasks, width, dim)) * scale * 1.3 + 2.0
    query_mask = rng.random((n_tasks, width)) < 0.9
    exclude = np.where(rng.random((n_tasks, width)) < 0.5, rng.integers(0, n_bank, size=(n_tasks, width)), -1)
    copies = (exclude >= 0) & (rng.random((n_tasks, width)) < 0.5)  # held-out normals are bank rows
    t, w = np.nonzero(copies)
    queries[t, w] = bank[t, exclude[t, w]]
    queries[~query_mask] = np.nan  # padding may hold anything
    out = dict(queries=queries, query_mask=query_mask, bank=bank, bank_mask=bank_mask, exclude=exclude,
               task_ids=rng.integers(0, 1000, size=n_tasks))
    if n_abnormal:
        out["abnormal"] = rng.normal(size=(n_tasks, n_abnormal, dim)) * scale + 2.5
        out["abnormal_mask"] = rng.random((n_tasks, n_abnormal)) < 0.8
        out["abnormal_mask"][:, :4] = True
    return out


def _fit_rows(b, t, w):
    rows = b["bank_mask"][t].copy()
    j = b["exclude"][t, w]
    if j >= 0 and rows[j]:
        rows[j] = False
    return b["bank"][t][rows]


_FITS: dict = {}


def _fit_once(kind, rows, fit):
    """Reference fits are cached by their rows' bytes (the sweep test scores many queries per fit)."""
    key = (kind, rows.shape, rows.tobytes())
    if key not in _FITS:
        _FITS[key] = fit(rows)
    return _FITS[key]


def _ref_mahalanobis(x, bank_rows):
    def fit(rows):
        lw = LedoitWolf().fit(rows)
        return lw.location_, np.linalg.inv(lw.covariance_)

    location, precision = _fit_once("lw", bank_rows, fit)
    return mahalanobis(x, location, precision) ** 2


def _ref_pca(x, bank_rows, n):
    def fit(rows):
        mean = rows.mean(axis=0)
        return mean, np.linalg.svd(rows - mean, full_matrices=False)[2]

    mean, vt = _fit_once("svd", bank_rows, fit)
    axes = vt[:n]
    d = x - mean
    return float(((d - axes.T @ (axes @ d)) ** 2).sum())


def _ref_knn(x, rows, k):
    return float(np.sort(((rows - x) ** 2).sum(axis=1))[:k].sum())


def _assert_tasks(detector, b, reference, *, abnormal=False):
    kwargs = {"abnormal": b["abnormal"], "abnormal_mask": b["abnormal_mask"]} if abnormal else {}
    scores = detector.score_tasks(b["queries"], b["query_mask"], b["bank"], b["bank_mask"], b["exclude"],
                                  task_ids=b["task_ids"], **kwargs)
    assert scores.dtype == np.float64 and scores.shape == b["query_mask"].shape
    assert np.isnan(scores[~b["query_mask"]]).all()
    for t, w in zip(*np.nonzero(b["query_mask"])):
        assert scores[t, w] == pytest.approx(reference(t, w), rel=RTOL), (t, w)


def _assert_shared(detector, b, reference, *, abnormal=False):
    kwargs = {"abnormal": b["abnormal"], "abnormal_mask": b["abnormal_mask"]} if abnormal else {}
    queries = np.nan_to_num(b["queries"][0])
    scores = detector.score_shared(queries, b["bank"], b["bank_mask"], task_ids=b["task_ids"], **kwargs)
    assert scores.shape == (len(b["bank"]), len(queries))
    for t in range(len(b["bank"])):
        for q in range(len(queries)):
            assert scores[t, q] == pytest.approx(reference(t, queries[q]), rel=RTOL), (t, q)


# S < D (Flowers-like: 10 images, many dimensions), S ≈ D, S > D
SHAPES = [(3, 7, 10, 40), (2, 6, 14, 12), (2, 5, 30, 6)]


@pytest.mark.parametrize("n_tasks, width, n_bank, dim", SHAPES)
def test_mahalanobis_equals_ledoit_wolf_and_scipy(n_tasks, width, n_bank, dim):
    b = _batch(np.random.default_rng(dim), n_tasks, width, n_bank, dim)
    detector = MahalanobisDetector()
    _assert_tasks(detector, b, lambda t, w: _ref_mahalanobis(b["queries"][t, w], _fit_rows(b, t, w)))
    _assert_shared(detector, b, lambda t, x: _ref_mahalanobis(x, b["bank"][t][b["bank_mask"][t]]))


@pytest.mark.parametrize("n_tasks, width, n_bank, dim", SHAPES)
@pytest.mark.parametrize("n", [1, 3])
def test_pca_equals_svd_reconstruction(n_tasks, width, n_bank, dim, n):
    b = _batch(np.random.default_rng(100 + dim + n), n_tasks, width, n_bank, dim)
    detector = PcaDetector(n)
    _assert_tasks(detector, b, lambda t, w: _ref_pca(b["queries"][t, w], _fit_rows(b, t, w), n))
    _assert_shared(detector, b, lambda t, x: _ref_pca(x, b["bank"][t][b["bank_mask"][t]], n))


@pytest.mark.parametrize("n_bank, dim, n", [(40, 60, 8), (25, 10, 4), (60, 300, 3)])
def test_pca_leave_one_out_downdate_equals_refit(monkeypatch, n_bank, dim, n):
    """The secular-equation downdate against the plain eigendecomposition refit, every query leave-one-out."""
    from swsa_engine.core.detectors import pca as pca_module

    rng = np.random.default_rng(n_bank + dim)
    bank = rng.normal(size=(3, n_bank, dim)) * rng.uniform(0.2, 4.0, size=dim) + 1.0
    bank_mask = np.ones((3, n_bank), dtype=bool)
    bank_mask[1, -3:] = False
    exclude = np.tile(np.arange(n_bank), (3, 1))
    exclude[1, -3:] = -1
    queries = bank + 0.1 * rng.normal(size=bank.shape)
    args = (queries, np.ones((3, n_bank), dtype=bool), bank, bank_mask, exclude)
    fast = PcaDetector(n).score_tasks(*args, task_ids=np.arange(3))
    lam = np.linalg.eigvalsh(np.cov(bank[0].T) * (n_bank - 1))[::-1]
    assert lam[n] > 1e-3 * lam[0]  # no deflation here: the downdate path did the work
    monkeypatch.setattr(pca_module, "DEFLATION_TOL", np.inf)  # every fit deflates: plain refits
    refit = PcaDetector(n).score_tasks(*args, task_ids=np.arange(3))
    np.testing.assert_allclose(fast, refit, rtol=1e-10)


def test_pca_leave_one_out_deflation_falls_back_to_refit():
    """Tied top eigenvalues and a left-out row orthogonal to a top axis deflate the secular
    equation: those fits are flagged and refitted, and the scores still equal the SVD reference."""
    from swsa_engine.core.detectors import downdated_top_axes as _downdated_top_axes

    cross = np.array([[3, 0, 0], [-3, 0, 0], [0, 3, 0], [0, -3, 0], [0, 0, 1], [0, 0, -1]], dtype=float)
    bank = np.concatenate([cross, cross * 0.5])[None] + 5.0  # λ1 = λ2 (tied), λ3 smaller
    n_bank = bank.shape[1]
    gram = (bank[0] - bank[0].mean(0)) @ (bank[0] - bank[0].mean(0)).T
    lam, basis = np.linalg.eigh(gram)
    lam, basis = lam[::-1], basis[:, ::-1]
    rows = np.arange(n_bank)
    _, ok = _downdated_top_axes(np.tile(np.where(lam > 1e-9, lam, 0.0), (n_bank, 1)), basis[rows], np.zeros((n_bank, n_bank)),
                                np.full(n_bank, n_bank / (n_bank - 1)), 2)
    assert not ok.any()
    queries = bank + np.array([0.3, -0.2, 0.7])
    exclude = rows[None]
    b = dict(queries=queries, query_mask=np.ones((1, n_bank), dtype=bool), bank=bank,
             bank_mask=np.ones((1, n_bank), dtype=bool), exclude=exclude, task_ids=np.array([7]))
    _assert_tasks(PcaDetector(2), b, lambda t, w: _ref_pca(queries[t, w], _fit_rows(b, t, w), 2))


def _ref_residual_refs(detector, bank_mask, task_id):
    """The documented draw: the K usable positions with the smallest hash_uniform(seed, task, position)."""
    positions = np.flatnonzero(bank_mask)
    keys = [hash_uniform(detector.seed, task_id, int(p)) for p in positions]
    return sorted(int(positions[i]) for i in np.argsort(keys, kind="stable")[: detector.K])


@pytest.mark.parametrize("K, reduce", [(2, "mean"), (4, "min"), (4, "mean"), (5, "min")])
def test_residual_equals_explicit_loops(K, reduce):
    b = _batch(np.random.default_rng(7 * K + len(reduce)), 4, 9, 11, 16)
    detector = ResidualDetector(K, reduce)
    refs = detector.references(b["bank_mask"], b["task_ids"])
    for t in range(len(refs)):
        assert list(refs[t]) == _ref_residual_refs(detector, b["bank_mask"][t], int(b["task_ids"][t]))
    # make sure some leave-one-out queries are references
    b["exclude"][:, 0] = refs[:, 0]
    b["query_mask"][:, 0] = True
    b["queries"][:, 0] = b["bank"][np.arange(4), refs[:, 0]]

    def reference(t, w, x=None):
        x = b["queries"][t, w] if x is None else x
        rows = [b["bank"][t, r] for r in refs[t] if x is not None and (w is None or r != b["exclude"][t, w])]
        if reduce == "mean":
            return float(((x - np.mean(rows, axis=0)) ** 2).sum())
        return min(float(((x - r) ** 2).sum()) for r in rows)

    _assert_tasks(detector, b, reference)
    _assert_shared(detector, b, lambda t, x: reference(t, None, x))


def test_residual_draw_is_seeded_and_per_task():
    mask = np.ones((3, 20), bool)
    a = ResidualDetector(4, "mean").references(mask, np.array([1, 2, 3]))
    again = ResidualDetector(4, "min").references(mask, np.array([3, 1, 2]))  # order of tasks does not matter
    np.testing.assert_array_equal(a, again[[1, 2, 0]])
    other_seed = ResidualDetector(4, "mean", seed=1).references(mask, np.array([1, 2, 3]))
    assert not np.array_equal(a, other_seed)
    masked = mask.copy()
    masked[0, a[0, 0]] = False  # an unusable image is never drawn; the others stay
    redrawn = ResidualDetector(4, "mean").references(masked, np.array([1, 2, 3]))
    assert a[0, 0] not in redrawn[0] and set(a[0, 1:]) <= set(redrawn[0])


@pytest.mark.parametrize("k, beta", [(1, 1.0), (3, 0.5)])
def test_nagl_equals_explicit_loops(k, beta):
    b = _batch(np.random.default_rng(31 + k), 3, 8, 9, 10, n_abnormal=7)
    detector = parse_detector(f"nagl(k={k},beta={beta})")
    assert detector == NaglDetector(k, beta) and detector.label == f"nagl(k={k},beta={beta})"

    def reference(t, w, x=None):
        x = b["queries"][t, w] if x is None else x
        normal = _fit_rows(b, t, w) if w is not None else b["bank"][t][b["bank_mask"][t]]
        return _ref_knn(x, normal, k) - beta * _ref_knn(x, b["abnormal"][t][b["abnormal_mask"][t]], k)

    _assert_tasks(detector, b, reference, abnormal=True)
    _assert_shared(detector, b, lambda t, x: reference(t, None, x), abnormal=True)


def test_knn_detector_interface_equals_brute_force():
    b = _batch(np.random.default_rng(3), 3, 7, 9, 12)
    detector = KnnDetector(3, "l2")
    _assert_tasks(detector, b, lambda t, w: _ref_knn(b["queries"][t, w], _fit_rows(b, t, w), 3))
    _assert_shared(detector, b, lambda t, x: _ref_knn(x, b["bank"][t][b["bank_mask"][t]], 3))


def test_labels_round_trip_and_families():
    for text, family in [("mahalanobis", "gaussian"), ("residual(K=4,mean)", "residual"), ("residual(K=8,min)", "residual"),
                         ("nagl(k=3,beta=1.0)", "nagl"), ("pca(n=8)", "pca"), ("residual(K=2,min,seed=3)", "residual")]:
        detector = parse_detector(text)
        assert detector.label == text and detector.family == family
        assert parse_detector(detector.label) == detector
    assert parse_detector("residual(K=4)") == ResidualDetector(4, "mean")
    assert parse_detector("nagl(k=2,beta=0.5,cosine)").metric == "cosine"


def test_bad_settings_give_one_line_errors():
    b = _batch(np.random.default_rng(0), 2, 4, 6, 5)
    b["bank_mask"][1] = [True, True, True, False, False, False]

    def run(detector, **extra):
        detector.score_tasks(b["queries"], b["query_mask"], b["bank"], b["bank_mask"], b["exclude"], task_ids=np.array([10, 11]), **extra)

    with pytest.raises(ValueError, match=r"residual\(K=4,mean\) needs at least 4 usable bank rows per task, task 11 has 3 "
                                         r"\(1 task\(s\) too small\); use a smaller K or a larger support set"):
        run(parse_detector("residual(K=4,mean)"))
    with pytest.raises(ValueError, match=r"knn\(k=5,l2\) needs at least \d usable bank rows per task, task 11 has 3 .*; use a smaller k"):
        run(KnnDetector(5))
    with pytest.raises(ValueError, match=r"pca\(n=3\) needs at least \d usable bank rows.*use a smaller n"):
        run(PcaDetector(3))
    with pytest.raises(ValueError, match=r"needs abnormal references.*swsa split-refs"):
        run(NaglDetector(2))
    with pytest.raises(ValueError, match=r"needs at least 3 abnormal references per task, task 10 has 2"):
        NaglDetector(3).score_tasks(b["queries"], b["query_mask"], b["bank"], np.ones((2, 6), bool),
                                    b["exclude"], task_ids=np.array([10, 11]), abnormal=np.zeros((2, 2, 5)),
                                    abnormal_mask=np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="residual needs an integer K >= 2"):
        parse_detector("residual(K=1)")
    with pytest.raises(ValueError, match="reduce must be 'mean' or 'min'"):
        parse_detector("residual(K=2,median)")
    with pytest.raises(ValueError, match="pca needs an integer n >= 1"):
        parse_detector("pca(n=0)")
    with pytest.raises(ValueError, match="nagl beta must be a number"):
        parse_detector("nagl(beta=x)")
    bad = b["bank"].copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="bank holds 1 non-finite rows"):
        MahalanobisDetector().score_tasks(b["queries"], b["query_mask"], bad, b["bank_mask"], b["exclude"], task_ids=[0, 1])


# --------------------------------------------------------------------------- abnormal-reference split


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("detectors_more") / "paper.h5"
    make_paper_store(path, task_fraction=0.03, image_fraction=0.25, synthetic=16,
                     backbones={"resnet18": (48, 11), "vit_b_16": (64, 86)}, progress=False)
    return path


def _groups(path):
    with open_store(path) as s:
        return build_task_groups(s.images(columns=["image_id", "kind", "status", "task_id"]), s.tasks(), s.task_members(),
                                 read_references(s))


def test_references_are_disjoint_from_validation_and_stable(store, tmp_path):
    path = tmp_path / "s.h5"
    path.write_bytes(store.read_bytes())
    before = {g.dataset: g.synthetic["cutpaste"].copy() for g in _groups(path)}
    table = split_references(path, "cutpaste", 0.3, seed=4)
    assert len(table) and set(table["source"]) == {"cutpaste"}
    with open_store(path) as s:
        attrs = s.table_attrs(REFERENCES_TABLE)
    assert attrs["source"] == "cutpaste" and attrs["share"] == 0.3 and attrs["seed"] == 4
    refs = set(zip(table["task_id"], table["image_id"]))
    for group in _groups(path):
        for t, task_id in enumerate(group.task_ids):
            abnormal = set(group.abnormal[t][group.abnormal[t] >= 0].tolist())
            assert abnormal == {i for (tt, i) in refs if tt == task_id}
            for ids in group.synthetic.values():
                assert not abnormal & set(ids[t][ids[t] >= 0].tolist())  # never validation images
            validation = set(group.synthetic["cutpaste"][t][group.synthetic["cutpaste"][t] >= 0].tolist())
            assert validation | abnormal == {i for i in before[group.dataset][t].tolist() if i >= 0}

    # change the validation set: drop some non-reference cutpaste images and add new ones
    with edit_store(path) as s:
        images = s.images()
        cut = images.index[(images["kind"] == "cutpaste") & ~images["image_id"].isin(table["image_id"])]
        images = images.drop(cut[::2]).reset_index(drop=True)  # ids stay as they were
        extra = images[images["kind"] == "cutpaste"].head(12).copy()
        extra["image_id"] = np.arange(images["image_id"].max() + 1, images["image_id"].max() + 1 + len(extra))
        s.replace_table("images", pd.concat([images, extra], ignore_index=True))
    again = split_references(path, "cutpaste", 0.3, seed=4)
    old_ids = set(table["image_id"])
    kept = again[again["image_id"].isin(images["image_id"])]
    assert set(kept["image_id"]) == old_ids  # no reference changed
    new = again[~again["image_id"].isin(images["image_id"])]
    expected = choose_references(extra["task_id"].to_numpy(), extra["image_id"].to_numpy(), 0.3, 4)
    assert set(new["image_id"]) == set(extra["image_id"][expected])


def test_overlap_check_raises():
    ids = pad_rows([np.array([5, 6]), np.array([7])])
    with pytest.raises(ValueError, match="both an abnormal reference and a validation anomaly"):
        TaskGroup("d", np.array([0, 1]), ids, ids, {"cutpaste": ids}, np.array([1]), np.zeros((2, 1), np.int8),
                  np.zeros((2, 1), np.int64), np.array([], dtype=object), abnormal=pad_rows([np.array([6]), np.array([])]))


def test_split_refs_cli(store, tmp_path, capsys):
    path = tmp_path / "s.h5"
    path.write_bytes(store.read_bytes())
    assert main(["split-refs", "--store", str(path), "--source", "cutpaste", "--share", "0.25", "--quiet"]) == 0
    assert "split-refs: source=cutpaste" in capsys.readouterr().out
    assert main(["split-refs", "--store", str(path), "--source", "nope", "--share", "0.25"]) == 1
    assert "no synthetic anomalies of source 'nope'" in capsys.readouterr().err
    assert main(["split-refs", "--store", str(path), "--source", "cutpaste", "--share", "1.5"]) == 1
    assert "share must be a number in (0, 1)" in capsys.readouterr().err


# --------------------------------------------------------------------------- the sweep against per-task references


def _reference_aurocs(path, task_id, name, score):
    """Per-task reference: real one-vs-rest AUROC and synthetic AUROC per base source, with
    ``score(x, bank_rows, abnormal_rows, task_id, support_positions)`` applied one image at a time."""
    key = (str(path), name)
    if key not in _FITS:
        with open_store(path) as s:
            _FITS[key] = (s.images(columns=["image_id", "kind", "status", "task_id"]), s.task_members(),
                          s.embeddings(name).astype(np.float64), read_references(s))
    images, members, features, refs = _FITS[key]
    mine = members[members["task_id"] == task_id]
    role = lambda r: np.sort(mine.loc[mine["role"] == r, "image_id"].to_numpy())
    support = np.union1d(role(ROLE_SEED), role(ROLE_HELDOUT))
    abnormal = np.sort(refs.loc[refs["task_id"] == task_id, "image_id"].to_numpy()) if refs is not None else np.array([], int)

    def score_of(image_id):
        rows = support[support != image_id]
        return score(features[image_id], features[rows], features[abnormal], support, image_id)

    normals, anomalies = role(ROLE_REAL_NORMAL), role(ROLE_REAL_ANOMALY)
    ids = np.concatenate([normals, anomalies])
    real = roc_auc_score(np.r_[np.zeros(len(normals)), np.ones(len(anomalies))], [score_of(i) for i in ids])
    held = [score_of(i) for i in role(ROLE_HELDOUT)]
    synthetic = {}
    ok = images[(images["task_id"] == task_id) & (images["status"] == "ok") & ~images["image_id"].isin(abnormal)]
    for source, rows in ok[ok["kind"] != "real"].groupby("kind"):
        anomaly = [score_of(i) for i in rows["image_id"]]
        synthetic[source] = roc_auc_score(np.r_[np.zeros(len(held)), np.ones(len(anomaly))], held + anomaly)
    return real, synthetic


def test_sweep_with_an_in_memory_split_equals_the_written_split(store, tmp_path):
    """run_sweep(references=make_references(...)) scores NAGL as a written split does, and writes nothing."""
    from swsa_store.references import make_references

    path = tmp_path / "s.h5"
    path.write_bytes(store.read_bytes())
    with open_store(path) as s:
        images, tasks = s.images(columns=["image_id", "kind", "status", "task_id"]), s.tasks()
    chosen = tasks[tasks["status"] == "ok"].groupby("dataset")["task_id"].first().tolist()[:2]
    split = make_references(images, "cutpaste", 0.3, seed=4, store_path=path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        memory = run_sweep(path, progress=False, save=False, detectors=["nagl(k=2,beta=0.5)"], task_ids=chosen,
                           references=split)
        with open_store(path) as s:
            assert read_references(s) is None
        split_references(path, "cutpaste", 0.3, seed=4)
        written = run_sweep(path, progress=False, save=False, detectors=["nagl(k=2,beta=0.5)"], task_ids=chosen)
    np.testing.assert_array_equal(memory.synthetic, written.synthetic)
    np.testing.assert_array_equal(memory.real, written.real)
    assert memory.config["abnormal_references"] == written.config["abnormal_references"]
    with pytest.raises(ValueError, match=r"holds no synthetic anomalies of source 'nope' \(held: .*cutpaste"):
        make_references(images, "nope", 0.3, store_path=path)


def test_sweep_with_several_detectors_equals_per_task_references(store, tmp_path):
    path = tmp_path / "s.h5"
    path.write_bytes(store.read_bytes())
    split_references(path, "cutpaste", 0.3)
    with open_store(path) as s:
        tasks = s.tasks()
    chosen = tasks[(tasks["status"] == "ok") & (tasks["dataset"] != "visa")].groupby("dataset")["task_id"].first().tolist()
    detectors = ["knn", "mahalanobis", "residual(K=3,mean)", "residual(K=2,min)", "nagl(k=2,beta=0.5)", "pca(n=3)"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the reference loop below scores held-out normals leave-one-out and anomalies against the whole
        # bank, validating nagl on its own generator too: the paper's protocol, self-validation kept
        cube = run_sweep(path, progress=False, save=True, detectors=detectors, task_ids=chosen, protocol="paper",
                         allow_self_validation=True, ensembles=False)
    assert len(cube.candidates) == 12 and cube.config["abnormal_references"]["source"] == "cutpaste"
    draws = cube.config["residual_references"]["residual(K=3,mean)"]

    def residual(K, reduce):
        def score(x, rows, abnormal, support, own):
            task = int(task_of[0])
            drawn = draws_by_k[K][task]
            refs = [r for r in drawn if r != own]
            diffs = [((x - feats[r]) ** 2).sum() for r in refs]
            return ((x - np.mean([feats[r] for r in refs], axis=0)) ** 2).sum() if reduce == "mean" else min(diffs)
        return score

    references = {
        "mahalanobis": lambda x, rows, a, s, o: _ref_mahalanobis(x, rows),
        "nagl(k=2,beta=0.5)": lambda x, rows, a, s, o: _ref_knn(x, rows, 2) - 0.5 * _ref_knn(x, a, 2),
        "pca(n=3)": lambda x, rows, a, s, o: _ref_pca(x, rows, 3),
        "residual(K=3,mean)": residual(3, "mean"), "residual(K=2,min)": residual(2, "min"),
    }
    draws_by_k = {}
    for label in ("residual(K=3,mean)", "residual(K=2,min)"):
        entry = cube.config["residual_references"][label]
        draws_by_k[entry["K"]] = dict(zip(entry["task_id"], entry["image_ids"]))
    checked = 0
    for name in ("resnet18", "vit_b_16"):
        with open_store(path) as s:
            feats = s.embeddings(name).astype(np.float64)
        for task_id in chosen:
            task_of = [task_id]
            t = list(cube.tasks["task_id"]).index(task_id)
            with open_store(path) as s:
                members = s.task_members()
            support = np.union1d(*(members.loc[(members["task_id"] == task_id) & (members["role"] == r), "image_id"]
                                   for r in (ROLE_SEED, ROLE_HELDOUT)))
            positions = [int(np.searchsorted(support, i)) for i in draws_by_k[3][task_id]]
            expected = sorted(np.argsort([hash_uniform(0, task_id, p) for p in range(len(support))], kind="stable")[:3])
            assert positions == [int(p) for p in expected]
            for label, score in references.items():
                c = cube.candidate_names.index(f"{name}/{label}")
                if np.isnan(cube.real[t, c, 0]):
                    assert ((cube.skips["task_id"] == task_id) & (cube.skips["candidate"] == f"{name}/{label}")).any()
                    continue
                real, synthetic = _reference_aurocs(path, task_id, name, score)
                assert cube.real[t, c, 0] == pytest.approx(real, abs=1e-12), (name, label, task_id)
                for source, value in synthetic.items():
                    assert cube.synthetic[t, c, cube.sources.index(source)] == pytest.approx(value, abs=1e-12), (label, source)
                checked += 1
    assert checked >= 30
