"""The per-class AUPR, F1-max and FPR@95TPR from one sort per row (``grouped_detection_metrics``, behind
``real_metrics`` and ``metrics.csv``): against scikit-learn, and bit for bit against the per-class
loop they replace (one ``detection_metrics`` per task, candidate and class over the whole row)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from swsa_engine.core.cube import AurocCube
from swsa_engine.core.metric_cube import real_metrics
from swsa_engine.core.metrics import UndefinedMetricWarning, detection_metrics, grouped_detection_metrics
from swsa_engine.core.metrics.grouped_curves import summation_widths
from swsa_engine.core.score_cube import ScoreCube, score_aurocs
from swsa_engine.report.metric_tables import candidate_metrics
from reference_metrics import sklearn_detection_metrics

KEYS = ("aupr", "f1_max", "fpr_at_95_tpr")


def loop_metrics(row: np.ndarray, positive: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(3,) the metrics of one whole row (width n) over ``mask``, as the per-class code computed them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        got = detection_metrics(np.where(mask, row, 0.0), positive, mask)
    return np.array([got[key] for key in KEYS])


def random_rows(seed: int, n_rows: int = 6, width: int = 700, n_groups: int = 9):
    """Rows of tied scores with excluded (NaN) entries, groups from 1 to ~300 anomalies, anomalies of no
    group (-1 and ``n_groups``), a row without normals and a row without anomalies of group 0."""
    rng = np.random.default_rng(seed)
    labels = rng.choice([-1, 0, 1], size=(n_rows, width), p=[0.15, 0.2, 0.65]).astype(np.int8)
    sizes = np.r_[3.0, rng.permutation(np.geomspace(1, 300, n_groups)), 3.0]  # group -1, 0 … G - 1, G
    groups = rng.choice(np.arange(-1, n_groups + 1), size=(n_rows, width), p=sizes / sizes.sum())
    groups = np.where(labels == 1, groups, -1)
    scores = np.round(rng.normal(size=(n_rows, width)) + 0.6 * (labels == 1) + 0.05 * groups, 1)  # many ties
    labels[1][labels[1] == 0] = -1
    labels[2][(labels[2] == 1) & (groups[2] == 0)] = -1
    scores[labels == -1] = np.nan
    return scores, labels, groups, n_groups


@pytest.mark.parametrize("seed", range(3))
def test_grouped_metrics_equal_sklearn_per_group(seed):
    scores, labels, groups, n_groups = random_rows(seed, n_rows=4, width=300)
    got = grouped_detection_metrics(scores, labels, groups, n_groups)
    assert got["aupr"].shape == (4, n_groups)
    for r in range(4):
        for g in range(n_groups):
            chosen = (labels[r] == 0) | ((labels[r] == 1) & (groups[r] == g))
            want = sklearn_detection_metrics(scores[r, chosen], labels[r, chosen] == 1)
            np.testing.assert_allclose([got[key][r, g] for key in KEYS], want, rtol=0, atol=1e-12)
    present = np.array([[((labels[r] == 1) & (groups[r] == g)).any() for g in range(n_groups)] for r in range(4)])
    np.testing.assert_array_equal(np.isfinite(got["aupr"][[0, 2, 3]]), present[[0, 2, 3]])  # NaN: no anomaly of g
    assert present[0].sum() >= 3 and np.isnan(got["aupr"][1]).all()  # row 1: no normal


@pytest.mark.parametrize("seed", range(4))
def test_grouped_metrics_are_the_per_group_loop_bit_for_bit(seed):
    scores, labels, groups, n_groups = random_rows(seed, width=[700, 129, 1500, 90][seed])
    got = grouped_detection_metrics(scores, labels, groups, n_groups)
    for r in range(scores.shape[0]):
        for g in range(n_groups):
            chosen = (labels[r] == 0) | ((labels[r] == 1) & (groups[r] == g))
            want = loop_metrics(scores[r], labels[r] == 1, chosen)
            np.testing.assert_array_equal([got[key][r, g] for key in KEYS], want)


def test_summation_widths_keep_numpys_sum():
    assert summation_widths(7169) == (112, 224, 448, 896, 1792, 3584, 7169)
    assert summation_widths(100) == (100,)
    rng = np.random.default_rng(5)
    for n in (129, 700, 1000, 7169):
        for width in summation_widths(n):
            row = np.zeros((3, n))
            row[:, :width] = rng.random((3, width)) ** 3
            np.testing.assert_array_equal(row.sum(axis=-1), np.ascontiguousarray(row[:, :width]).sum(axis=-1))
    # a width off the split would change the last bits: the widths are not arbitrary
    row = np.zeros(7169)
    row[:300] = rng.random(300) ** 3
    assert row.sum() != row[:300].sum() or row.sum() != row[:305].sum()


def test_grouped_metrics_shapes_and_broadcasting():
    scores, labels, groups, n_groups = random_rows(7, n_rows=6, width=200)
    full = grouped_detection_metrics(scores, labels, groups, n_groups)
    leading = grouped_detection_metrics(scores.reshape(2, 3, 200), labels.reshape(2, 3, 200),
                                        groups.reshape(2, 3, 200), n_groups)
    one = grouped_detection_metrics(scores[0], labels[0], groups[0], n_groups)
    two = np.where(np.isfinite(scores[:2]), scores[:2], 0.25)  # scored wherever labels[0] includes an entry
    shared = grouped_detection_metrics(two, labels[0], groups[0], n_groups)  # (n,) labels and groups broadcast
    first, second = (grouped_detection_metrics(two[r], labels[0], groups[0], n_groups) for r in (0, 1))
    for key in KEYS:
        np.testing.assert_array_equal(leading[key].reshape(6, n_groups), full[key])
        np.testing.assert_array_equal(one[key], full[key][0])
        np.testing.assert_array_equal(shared[key], np.stack([first[key], second[key]]))
    assert grouped_detection_metrics(scores, labels, groups, 0)["aupr"].shape == (6, 0)
    assert np.isnan(grouped_detection_metrics(np.zeros((2, 0)), np.zeros((2, 0), int), np.zeros((2, 0), int), 3)["f1_max"]).all()


@pytest.mark.parametrize("kwargs, message", [
    ({"labels": np.array([0, 2, 1])}, r"`labels` must be integers -1 \(excluded\), 0 \(normal\) or 1 \(anomaly\), "
                                      r"got values such as \[2\]"),
    ({"labels": np.array([0.0, 1.0, 1.0])}, r"`labels` must be integers .* got dtype float64"),
    ({"groups": np.array([0.0, 1.0, 0.0])}, r"`groups` must be integer group indices .* got dtype float64"),
    ({"scores": np.array([0.1, np.nan, 0.3])}, r"grouped_detection_metrics: `scores` contains 1 non-finite .* "
                                               r"scores\[1\] = nan\. .* label those entries -1 \(excluded\)"),
    ({"groups": np.array([0, 1])}, r"`groups` has 2 entries along its last axis"),
    ({"tpr": 0.0}, r"tpr must be in \(0, 1\], got 0.0"),
    ({"n_groups": 2.5}, r"n_groups must be a whole number >= 0 .* got 2.5"),
])
def test_errors_say_what_arrived(kwargs, message):
    arguments = {"scores": np.array([0.1, 0.2, 0.3]), "labels": np.array([0, 1, 1]), "groups": np.array([-1, 0, 1]),
                 "n_groups": 2, **kwargs}
    tpr = arguments.pop("tpr", 0.95)
    with pytest.raises(ValueError, match=message):
        grouped_detection_metrics(**arguments, tpr=tpr)


def wide_score_cube(seed: int = 0) -> ScoreCube:
    """3 tasks × 3 candidates over 600 padded real images and 14 classes: tied scores, NaN scores, a
    candidate that scored nothing of one task, a class left out of one task's one-vs-rest set, a class
    without anomalies in one task, a task whose candidate scored no normal, class sizes 1 to ~150."""
    rng = np.random.default_rng(seed)
    n_tasks, n_candidates, width, n_groups = 3, 3, 600, 14
    label = np.full((n_tasks, width), -1, dtype=np.int8)
    group = np.full((n_tasks, width), -1, dtype=np.int64)
    sizes = np.geomspace(1, 150, n_groups)
    for t in range(n_tasks):
        n = width - 150 * t
        label[t, :n] = rng.random(n) < 0.8
        group[t, :n] = np.where(label[t, :n] == 1, rng.choice(n_groups, n, p=sizes / sizes.sum()), -1)
    group[1][group[1] == 3] = 4  # no anomaly of class 3 in task 1
    in_rest = (label >= 0) & ~((np.arange(n_tasks)[:, None] == 2) & (group == 5))
    real = np.round(rng.normal(size=(n_tasks, n_candidates, width)) + label[:, None] * 0.7, 1)  # ties
    real[:, 1][rng.random((n_tasks, width)) < 0.1] = np.nan
    real[0, 2] = np.nan
    real[2, 0][label[2] == 0] = np.nan
    real[np.broadcast_to(label[:, None] < 0, real.shape)] = np.nan
    synth_part = np.tile(np.r_[np.zeros(8), np.ones(8)].astype(np.int8), (n_tasks, 1))
    synth = rng.normal(size=(n_tasks, n_candidates, 16))
    names = np.array([[f"class{g}" for g in range(n_groups)]] * n_tasks, dtype=object)
    return ScoreCube(np.arange(n_tasks) + 10, ["a", "b", "c"], ["s1"], np.where(label >= 0, 1, -1), label,
                     in_rest, group, names, real, np.ones((n_tasks, 16), int), synth_part, synth)


def loop_real_metrics(scores: ScoreCube) -> dict:
    """The reference: ``real_metrics`` as a loop over tasks, candidates and classes, each class one
    ``detection_metrics`` over the task's whole row; one-vs-closest the worst defined class."""
    n_tasks, n_candidates, _ = scores.real_scores.shape
    n_groups = scores.group_names.shape[1]
    out = {key: {"real": np.full((n_tasks, n_candidates, 2), np.nan),
                 "per_class": np.full((n_tasks, n_candidates, n_groups), np.nan)} for key in KEYS}
    for t in range(n_tasks):
        for c in range(n_candidates):
            row = scores.real_scores[t, c]
            label = np.where(np.isfinite(row), scores.real_label[t], -1)
            rest = loop_metrics(row, label == 1, (label >= 0) & scores.real_in_rest[t])
            per_class = np.array([loop_metrics(row, label == 1, (label == 0) | ((label == 1) & (scores.real_group[t] == g)))
                                  for g in range(n_groups)])
            for m, key in enumerate(KEYS):
                defined = per_class[~np.isnan(per_class[:, m]), m]
                worst = np.nan if not defined.size else (defined.max() if key == "fpr_at_95_tpr" else defined.min())
                out[key]["real"][t, c] = rest[m], worst
                out[key]["per_class"][t, c] = per_class[:, m]
    return out


def test_real_metrics_are_the_per_class_loop_bit_for_bit():
    scores = wide_score_cube()
    got, want = real_metrics(scores), loop_real_metrics(scores)
    for key in KEYS:
        for part in ("real", "per_class"):
            np.testing.assert_array_equal(got[key][part], want[key][part], err_msg=f"{key} {part}")
    assert np.isnan(got["aupr"]["per_class"][0, 2]).all() and np.isnan(got["aupr"]["per_class"][1, :, 3]).all()
    assert np.isnan(got["aupr"]["per_class"][2, 0]).all() and np.isfinite(got["aupr"]["real"][1]).all()
    some = real_metrics(scores, np.array([2, 0]))
    np.testing.assert_array_equal(some["f1_max"]["per_class"], got["f1_max"]["per_class"][:, [2, 0]])


def test_real_metrics_equal_sklearn_per_class():
    scores = wide_score_cube(1)
    got = real_metrics(scores)
    for t in range(3):
        for c in range(3):
            row, label = scores.real_scores[t, c], scores.real_label[t]
            ok = np.isfinite(row) & (label >= 0)
            rest = ok & scores.real_in_rest[t]
            np.testing.assert_allclose([got[key]["real"][t, c, 0] for key in KEYS],
                                       sklearn_detection_metrics(row[rest], label[rest] == 1), rtol=0, atol=1e-12)
            for g in range(scores.group_names.shape[1]):
                chosen = ok & ((label == 0) | (scores.real_group[t] == g))
                np.testing.assert_allclose([got[key]["per_class"][t, c, g] for key in KEYS],
                                           sklearn_detection_metrics(row[chosen], label[chosen] == 1), rtol=0, atol=1e-12)


def test_candidate_metrics_table_holds_the_loops_values():
    scores = wide_score_cube(2)
    aurocs = score_aurocs(scores, hardest=())
    cube = AurocCube(pd.DataFrame({"task_id": scores.task_ids, "dataset": ["d1", "d1", "d2"], "normal_class": ["p", "q", "r"]}),
                     pd.DataFrame({"name": scores.candidates, "family": "knn"}), ["s1"], aurocs["real"],
                     aurocs["synthetic"], aurocs["per_class"], scores.group_names, scores=scores)
    table = candidate_metrics(cube)
    want = loop_real_metrics(scores)
    assert len(table) == 3 * 3 * 2
    for s, setting in enumerate(("one-vs-rest", "one-vs-closest")):
        rows = table[table["setting"] == setting]
        assert list(rows["candidate"]) == ["a", "b", "c"] * 3
        for key in KEYS:
            np.testing.assert_array_equal(rows[key].to_numpy(), want[key]["real"][:, :, s].reshape(-1))
