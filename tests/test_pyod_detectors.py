"""PyOD detectors (``pyod(model=...)``) against PyOD called directly, query by query.

The reference fits PyOD's class, built here by hand, on the task's usable bank rows minus the
query's left-out rows and calls ``decision_function`` on that one query; the detector groups
queries by exclusion set and must give the same numbers (to 1e-9 relative: batched distance
computations may differ from single rows in the last bits). Data are seeded, with tied rows,
padding holding NaN, and queries leaving out several bank rows.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

pytest.importorskip("pyod")
from pyod.models.copod import COPOD  # noqa: E402
from pyod.models.ecod import ECOD  # noqa: E402
from pyod.models.iforest import IForest  # noqa: E402
from pyod.models.knn import KNN  # noqa: E402
from pyod.models.loda import LODA  # noqa: E402
from pyod.models.lof import LOF  # noqa: E402
from pyod.models.ocsvm import OCSVM  # noqa: E402
from pyod.models.pca import PCA  # noqa: E402

from swsa_engine.app.bench import make_paper_store  # noqa: E402
from swsa_engine.core.detectors import PYOD_MODELS, PyodDetector, parse_detector  # noqa: E402
from swsa_engine.run.sweep import run_sweep  # noqa: E402
from swsa_store import open_store  # noqa: E402
from swsa_store.tasks import ROLE_HELDOUT, ROLE_REAL_ANOMALY, ROLE_REAL_NORMAL, ROLE_SEED  # noqa: E402

RTOL = 1e-9

#: label → PyOD estimator built by hand, as a user calling PyOD directly would
CASES = {
    "pyod(model=iforest,n_estimators=30,seed=3)": lambda: IForest(n_estimators=30, random_state=3),
    "pyod(model=lof,n_neighbors=3)": lambda: LOF(n_neighbors=3),
    "pyod(model=ocsvm,nu=0.3,gamma=0.05)": lambda: OCSVM(nu=0.3, gamma=0.05),
    "pyod(model=ocsvm,kernel=linear)": lambda: OCSVM(kernel="linear"),
    "pyod(model=ecod)": lambda: ECOD(),
    "pyod(model=copod)": lambda: COPOD(),
    "pyod(model=pca,n_components=3)": lambda: PCA(n_components=3, svd_solver="full"),
    "pyod(model=pca)": lambda: PCA(n_components=0.95, svd_solver="full"),
    "pyod(model=knn,n_neighbors=2,method=mean)": lambda: KNN(n_neighbors=2, method="mean"),
    "pyod(model=loda,n_bins=5,n_random_cuts=20,seed=1)": lambda: LODA(n_bins=5, n_random_cuts=20, random_state=1),
}


def _batch(rng, n_tasks=3, width=9, n_bank=12, dim=5, n_excluded=3):
    """Per-task queries and banks on a coarse grid (tied values and tied rows), padding holding
    NaN, and per-query exclusions (T, W, E) with repeats and -1."""
    bank = np.round(rng.normal(size=(n_tasks, n_bank, dim)) * 2) / 2 + 1.0
    bank[:, 1] = bank[:, 0]  # a tied row
    bank_mask = rng.random((n_tasks, n_bank)) < 0.85
    bank_mask[:, :9] = True
    bank[~bank_mask] = np.nan
    queries = np.round(rng.normal(size=(n_tasks, width, dim)) * 3) / 2 + 1.0
    queries[:, 0] = queries[:, 1]  # tied queries
    exclude = np.where(rng.random((n_tasks, width, n_excluded)) < 0.5,
                       rng.integers(0, n_bank, size=(n_tasks, width, n_excluded)), -1)
    exclude[:, 2, :] = [4, 4, -1]  # a repeat
    exclude[:, 3, :] = [5, -1, 6]
    exclude[:, 4, :] = [6, 5, -1]  # the same set as query 3, in another order
    queries[:, 2] = bank[:, 4]  # a held-out normal: a copy of its left-out row
    query_mask = rng.random((n_tasks, width)) < 0.85
    query_mask[:, :5] = True
    query_mask[-1] = False  # a task without queries
    queries[~query_mask] = np.nan
    return dict(queries=queries, query_mask=query_mask, bank=bank, bank_mask=bank_mask, exclude=exclude,
                task_ids=np.arange(10, 10 + n_tasks))


def _direct(make, bank_rows, x):
    return float(make().fit(bank_rows).decision_function(x[None, :])[0])


@pytest.mark.parametrize("label", list(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_scores_equal_pyod_called_directly(label, seed):
    b = _batch(np.random.default_rng(seed))
    detector = parse_detector(label)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = detector.score_tasks(b["queries"], b["query_mask"], b["bank"], b["bank_mask"], b["exclude"],
                                   task_ids=b["task_ids"])
        n_tasks, width = b["query_mask"].shape
        expected = np.full((n_tasks, width), np.nan)
        for t in range(n_tasks):
            for w in np.flatnonzero(b["query_mask"][t]):
                keep = b["bank_mask"][t].copy()
                keep[[j for j in b["exclude"][t, w] if j >= 0]] = False
                expected[t, w] = _direct(CASES[label], b["bank"][t][keep], b["queries"][t, w])
    assert np.isnan(got[~b["query_mask"]]).all()
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=1e-12)
    assert np.isfinite(got[b["query_mask"]]).all()
    assert detector.family == "pyod" and detector.max_exclusions is None


@pytest.mark.parametrize("label", list(CASES))
def test_shared_scores_equal_pyod_called_directly(label):
    b = _batch(np.random.default_rng(5))
    shared = b["queries"][0][b["query_mask"][0]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = parse_detector(label).score_shared(shared, b["bank"], b["bank_mask"], task_ids=b["task_ids"])
        expected = [[_direct(CASES[label], b["bank"][t][b["bank_mask"][t]], x) for x in shared] for t in range(3)]
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=1e-12)


def test_transductive_models_score_each_query_alone():
    """PyOD's ECOD scores a batch against the bank *and the batch*: the detector's score of a query
    must not move when the other queries change (and differs from PyOD's batch call)."""
    b = _batch(np.random.default_rng(2))
    detector = parse_detector("pyod(model=ecod)")
    args = (b["query_mask"], b["bank"], b["bank_mask"], None)
    first = detector.score_tasks(b["queries"], *args, task_ids=b["task_ids"])
    moved = b["queries"].copy()
    moved[:, 5:] += 50.0
    second = detector.score_tasks(moved, *args, task_ids=b["task_ids"])
    np.testing.assert_array_equal(first[:, :5], second[:, :5])
    rows = b["bank"][0][b["bank_mask"][0]]
    batch = ECOD().fit(rows).decision_function(moved[0][b["query_mask"][0]])
    assert not np.allclose(batch[:5], second[0, :5])


def test_one_fit_per_distinct_exclusion_set(monkeypatch):
    from swsa_engine.core.detectors import pyod as module

    calls = []
    real = module.pyod_scores
    monkeypatch.setattr(module, "pyod_scores", lambda *a: calls.append(len(a[3])) or real(*a))
    b = _batch(np.random.default_rng(0))
    parse_detector("pyod(model=knn)").score_tasks(b["queries"], b["query_mask"], b["bank"], b["bank_mask"],
                                                  b["exclude"], task_ids=b["task_ids"])
    expected = 0
    for t in range(3):
        sets = {tuple(sorted({j for j in b["exclude"][t, w] if j >= 0 and b["bank_mask"][t, j]}))
                for w in np.flatnonzero(b["query_mask"][t])}
        expected += len(sets)
    assert len(calls) == expected and sum(calls) == b["query_mask"].sum()


def test_labels_round_trip_and_defaults():
    for label in list(CASES) + [f"pyod(model={m})" for m in PYOD_MODELS]:
        detector = parse_detector(label)
        assert isinstance(detector, PyodDetector)
        assert parse_detector(detector.label) == detector
    assert parse_detector("pyod(model=iforest)").label == "pyod(model=iforest,n_estimators=100,max_features=1.0,seed=0)"
    assert parse_detector("pyod(model=IForest,n_estimators=100)") == parse_detector("pyod(model=iforest)")
    assert parse_detector("pyod(model=ocsvm,gamma=0.5)").label == "pyod(model=ocsvm,kernel=rbf,nu=0.5,gamma=0.5)"
    assert parse_detector("pyod(model=ecod)").label == "pyod(model=ecod)"
    assert parse_detector("pyod(model=pca,n_components=4)").min_bank(False) == 5
    assert parse_detector("pyod(model=lof,n_neighbors=7)").min_bank(3) == 11
    assert parse_detector("pyod(model=ecod)").min_bank(True) == 3


@pytest.mark.parametrize("label, message", [
    ("pyod(model=hbos2)", r"unknown PyOD model 'hbos2'; valid models: iforest, lof, ocsvm, ecod, copod, pca, knn, loda"),
    ("pyod", r"pyod needs a model: pyod\(model=NAME, \.\.\.\) with NAME one of iforest"),
    ("pyod(model=ecod,k=3)", r"pyod model ecod does not take k; it takes no settings"),
    ("pyod(model=knn,k=3)", r"pyod model knn does not take k; it takes n_neighbors, method"),
    ("pyod(model=knn,method=max)", r"pyod knn method must be one of largest, mean, median, got 'max'"),
    ("pyod(model=iforest,n_estimators=0)", r"pyod iforest n_estimators must be an integer >= 1, got 0"),
    ("pyod(model=ocsvm,nu=1.5)", r"pyod ocsvm nu must be a number in \(0, 1\], got '1.5'"),
    ("pyod(model=ocsvm,gamma=fast)", r"pyod ocsvm gamma \(auto, scale or a number\) must be a number, got 'fast'"),
    ("pyod(model=pca,n_components=1.5)", r"must be an integer >= 1 or a fraction of the variance in \(0, 1\)"),
])
def test_bad_labels_give_one_line_errors(label, message):
    with pytest.raises(ValueError, match=message) as error:
        parse_detector(label)
    assert "\n" not in str(error.value)


def test_small_banks_and_dimensions_give_clear_errors():
    b = _batch(np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"pyod\(model=lof,n_neighbors=9\) needs at least 11 usable bank rows per task, "
                                         r"task 10 has 9 .*LOF needs more bank rows than n_neighbors"):
        mask = b["bank_mask"].copy()
        mask[:, 9:] = False
        parse_detector("pyod(model=lof,n_neighbors=9)").score_tasks(b["queries"], b["query_mask"], b["bank"], mask,
                                                                      b["exclude"][..., 0], task_ids=b["task_ids"])
    with pytest.raises(ValueError, match=r"keeps 7 principal axes but the features have 5 dimensions"):
        parse_detector("pyod(model=pca,n_components=7)").score_tasks(b["queries"], b["query_mask"], b["bank"],
                                                                       b["bank_mask"], None, task_ids=b["task_ids"])


def test_missing_pyod_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyod.models", None)
    b = _batch(np.random.default_rng(0))
    with pytest.raises(ImportError, match=r"PyOD detectors need the optional extra PyOD \(pip install 'swsa\[pyod\]'\)"):
        parse_detector("pyod(model=ecod)").score_tasks(b["queries"], b["query_mask"], b["bank"], b["bank_mask"], None,
                                                        task_ids=b["task_ids"])


# --------------------------------------------------------------------------- in the sweep


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("pyod") / "paper.h5"
    make_paper_store(path, task_fraction=0.03, image_fraction=0.25, synthetic=16,
                     backbones={"resnet18": (48, 11)}, progress=False)
    return path


def _reference_aurocs(path, task_id, make):
    """Real one-vs-rest AUROC and synthetic AUROC per source, PyOD fitted by hand for every image
    (the paper's protocol: held-out normals leave themselves out, anomalies the whole support)."""
    with open_store(path) as s:
        images, members = s.images(columns=["image_id", "kind", "status", "task_id"]), s.task_members()
        features = s.embeddings("resnet18").astype(np.float64)
    mine = members[members["task_id"] == task_id]
    role = lambda r: np.sort(mine.loc[mine["role"] == r, "image_id"].to_numpy())  # noqa: E731
    support = np.union1d(role(ROLE_SEED), role(ROLE_HELDOUT))
    score_of = lambda i: _direct(make, features[support[support != i]], features[i])  # noqa: E731
    normals, anomalies = role(ROLE_REAL_NORMAL), role(ROLE_REAL_ANOMALY)
    real = roc_auc_score(np.r_[np.zeros(len(normals)), np.ones(len(anomalies))],
                         [score_of(i) for i in np.concatenate([normals, anomalies])])
    held = [score_of(i) for i in role(ROLE_HELDOUT)]
    ok = images[(images["task_id"] == task_id) & (images["status"] == "ok") & (images["kind"] != "real")]
    synthetic = {source: roc_auc_score(np.r_[np.zeros(len(held)), np.ones(len(rows))],
                                       held + [score_of(i) for i in rows["image_id"]])
                 for source, rows in ok.groupby("kind")}
    return real, synthetic


def test_pyod_candidates_in_the_sweep(store, tmp_path):
    path = tmp_path / "s.h5"
    path.write_bytes(store.read_bytes())
    with open_store(path) as s:
        tasks = s.tasks()
    chosen = tasks[tasks["status"] == "ok"].groupby("dataset")["task_id"].first().tolist()[:2]
    detectors = ["knn", "pyod(model=ecod)", "pyod(model=iforest,n_estimators=50)"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cube = run_sweep(path, progress=False, save=False, detectors=detectors, task_ids=chosen, protocol="paper")
        leak_free = run_sweep(path, progress=False, save=False, detectors=detectors[1:], task_ids=chosen)
    names = ["resnet18", "resnet18/pyod(model=ecod)", "resnet18/pyod(model=iforest,n_estimators=50,max_features=1.0,seed=0)"]
    assert set(names) <= set(cube.candidate_names)
    makes = {names[1]: ECOD, names[2]: lambda: IForest(n_estimators=50, random_state=0)}
    checked = 0
    for name, make in makes.items():
        c = cube.candidate_names.index(name)
        assert np.isfinite(leak_free.synthetic[:, leak_free.candidate_names.index(name)]).any()
        for task_id in chosen:
            t = list(cube.tasks["task_id"]).index(task_id)
            real, synthetic = _reference_aurocs(path, task_id, make)
            assert cube.real[t, c, 0] == pytest.approx(real, abs=1e-12), (name, task_id)
            for source, value in synthetic.items():
                assert cube.synthetic[t, c, cube.sources.index(source)] == pytest.approx(value, abs=1e-12), (name, source)
                checked += 1
    assert checked >= 4
