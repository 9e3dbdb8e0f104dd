"""Goix's EM/MV with feature sub-sampling (swsa_engine.core.em_mv), the pass that computes them for a
sweep (swsa_engine.run.em_mv_pass) and the ``em`` / ``mv`` strategies.

Pure parts are compared with naive loops on seeded data with ties; the pass on a small digits store
(pixels@8 features, kNN, cosine kNN, Mahalanobis and PCA candidates, two tasks) is compared with a
brute-force recomputation (a loop of squared distances for kNN, scikit-learn's LedoitWolf for
Mahalanobis) on the same feature subsets and uniform samples.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from sklearn.covariance import LedoitWolf

from swsa_engine.app.cli import main
from swsa_engine.core.detectors import parse_detector
from swsa_engine.core.em_mv import (EM_MV_KEY, FeatureBoxes, draw_feature_boxes, em_mv_criteria, em_mv_record,
                                    excess_mass_mass_volume, join_em_mv, split_em_mv, subsampled_em_mv,
                                    uniform_in_boxes, unsupported_reason)
from swsa_engine.core.ensemble_pass import ENSEMBLE_FAMILY
from swsa_engine.core.label_free import trimmed_borda
from swsa_engine.core.selection import (MissingScoresWarning, create_strategy, default_strategies, selection_context,
                                        selection_table)
from swsa_engine.core.strategy_comparison import strategies_table
from swsa_engine.run.cube_io import load_cube, save_cube
from swsa_engine.run.em_mv_pass import EmMvSettings, run_em_mv_pass
from swsa_engine.run.sweep import run_sweep
from swsa_store import open_store
from swsa_store.catalog import catalog_dataset
from swsa_store.ingest import embed_store
from swsa_store.synthesize import synthesize
from swsa_store.tasks import ROLE_HELDOUT, ROLE_REAL_ANOMALY, ROLE_REAL_NORMAL, ROLE_SEED

FEATURE = "pixels@8"
DETECTORS = ["knn", "knn(k=5,cosine)", "mahalanobis", "pca(n=8)"]
TASKS = [1, 3]
SMALL = EmMvSettings(draws=6, subset_features=5, uniform_samples=400, seed=3)
EM_LABEL, MV_LABEL = "Excess-Mass (Goix 2016)", "Mass-Volume (Goix 2016)"
BORDA_LABEL = "SWSA (trimmed Borda, Goswami et al. 2023)"


# ---- feature sub-sampling

def _features_with_ties(seed=0, n=40, dim=9):
    rng = np.random.default_rng(seed)
    features = rng.integers(0, 4, (n, dim)).astype(float)  # ties everywhere
    features[:, 2] = 7.0  # a constant feature: a box of width 0, never drawn
    features[:, dim - 1] *= 1000.0  # another scale: the standardised volume does not care
    return features


def test_feature_boxes_match_a_naive_loop():
    features = _features_with_ties()
    boxes = draw_feature_boxes(features, 30, 5, np.random.default_rng(1))
    assert boxes.columns.shape == (30, 5) and boxes.volume.shape == (30,)
    for k in range(30):
        columns = boxes.columns[k]
        assert len(set(columns)) == 5 and 2 not in columns and list(columns) == sorted(columns)
        volume = 1.0
        for j, column in enumerate(columns):
            values = features[:, column]
            assert boxes.low[k, j] == values.min() and boxes.high[k, j] == values.max()
            volume *= (values.max() - values.min()) / np.sqrt(((values - values.mean()) ** 2).mean())
        assert boxes.volume[k] == pytest.approx(volume, rel=1e-12)
    assert set(boxes.columns.ravel()) == set(range(9)) - {2}  # every non-constant feature gets drawn
    again = draw_feature_boxes(features, 30, 5, np.random.default_rng(1))
    np.testing.assert_array_equal(again.columns, boxes.columns)  # seeded


def test_few_features_are_all_used_in_every_draw():
    features = _features_with_ties(dim=4)  # 3 non-constant features <= d' = 5
    boxes = draw_feature_boxes(features, 4, 5, np.random.default_rng(0))
    np.testing.assert_array_equal(boxes.columns, np.tile([0, 1, 3], (4, 1)))


def test_uniform_samples_lie_in_their_boxes():
    boxes = draw_feature_boxes(_features_with_ties(), 3, 5, np.random.default_rng(2))
    samples = uniform_in_boxes(boxes, 5000, np.random.default_rng(3))
    assert samples.shape == (3, 5000, 5)
    assert (samples >= boxes.low[:, None]).all() and (samples <= boxes.high[:, None]).all()
    np.testing.assert_allclose(samples.mean(axis=1), (boxes.low + boxes.high) / 2, atol=0.05 * (boxes.high - boxes.low).max())


def test_subsampled_em_mv_is_the_mean_of_each_draws_criteria():
    rng = np.random.default_rng(5)
    draws, n_candidates, n_images, n_uniform = 4, 3, 30, 200
    data = rng.integers(0, 8, (draws, n_candidates, n_images)).astype(float)
    uniform = rng.integers(0, 12, (draws, n_candidates, n_uniform)).astype(float)
    uniform[1, 0] = 1e6  # draw 1: no uniform sample reaches candidate 0's data: its EM is undefined there
    data[:, 2] = np.nan  # candidate 2 not scored on the task
    uniform[:, 2] = np.nan
    volume = np.array([1.0, 2.5, 0.5, 4.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the undefined draw is counted, not warned
        em, mv, undefined = subsampled_em_mv(data, uniform, volume)
    for c in range(2):
        per_draw = []
        for k in range(draws):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                per_draw.append(excess_mass_mass_volume(data[k, c][None, None], None, uniform[k, c][None, None], [volume[k]]))
        ems = np.array([e[0, 0] for e, _ in per_draw])
        mvs = np.array([m[0, 0] for _, m in per_draw])
        assert em[c] == pytest.approx(ems[~np.isnan(ems)].mean(), rel=1e-12)
        assert mv[c] == pytest.approx(mvs.mean(), rel=1e-12)
        assert undefined[c] == np.isnan(ems).sum()
    assert undefined[0] == 1 and np.isnan(em[2]) and np.isnan(mv[2]) and undefined[2] == 0


@pytest.mark.parametrize("label, reason", [
    ("knn", ""), ("knn(k=5,cosine)", ""), ("mahalanobis", ""), ("pca(n=4)", ""), ("residual(K=4,mean)", ""),
    ("nagl(k=3,beta=0.5)", ""), ("pyod(model=ocsvm)", ""), ("pyod(model=pca)", ""),
    ("pca(n=8)", "keeps 8 principal axes of a 5-feature subset: it reconstructs every point exactly"),
    ("pyod(model=pca,n_components=5)", "keeps 5 principal axes of a 5-feature subset"),
    ("pyod(model=ecod)", "transductive in PyOD and scored one query at a time: 50 subsets x 2000 uniform samples"),
    ("residual(K=4,mean,text=0.5)", "adds CLIP's text prior"),
    ("patch(K=4)", "scores patch tokens"),
])
def test_detectors_em_mv_cannot_score_say_why(label, reason):
    found = unsupported_reason(parse_detector(label))
    assert found == "" if not reason else reason in found


# ---- the criteria stored with a cube

def test_record_is_strict_json_and_realigns_by_task_and_candidate():
    em = np.array([[1.0, np.nan, 3.0], [4.0, 5.0, 6.0]])
    mv = -em
    record = em_mv_record([7, 9], ["a", "b", "c"], em, mv, np.zeros((2, 3)), settings={"draws": 6}, skipped=[("b", "why")])
    json.dumps(record, allow_nan=False)  # NaN stored as null
    config = {"k": 3, EM_MV_KEY: record}
    criteria = em_mv_criteria(config, [9, 8, 7], ["c", "a", "z"])  # permuted, one unknown task and candidate
    np.testing.assert_array_equal(criteria["em"], [[6.0, 4.0, np.nan], [np.nan] * 3, [3.0, 1.0, np.nan]])
    np.testing.assert_array_equal(criteria["mv"], -criteria["em"])
    np.testing.assert_array_equal(em_mv_criteria(config, [7, 9], ["a", "b", "c"], rows=[1])["em"], em[1:])
    assert em_mv_criteria({"k": 3}, [7], ["a"]) == {}
    stripped, arrays = split_em_mv(config)
    assert "em" not in stripped[EM_MV_KEY] and config[EM_MV_KEY]["em"] is record["em"]  # the input is not changed
    np.testing.assert_array_equal(arrays["em_mv_em"], em)
    assert join_em_mv(stripped, arrays) == config
    assert split_em_mv({"k": 3}) == ({"k": 3}, {}) and join_em_mv({"k": 3}, {}) == {"k": 3}


# ---- the pass on a small digits store

@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("em_mv")
    path = root / "s.h5"
    catalog_dataset(path, "digits", n_seed=8, image_size=16, image_dir=root / "images")
    synthesize(path, "cutpaste", count=12, seed=0, progress=False)
    embed_store(path, FEATURE, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cube = run_sweep(path, detectors=DETECTORS, progress=False, task_ids=TASKS)
    return {"path": path, "cube": cube, "scored": run_em_mv_pass(path, cube, settings=SMALL, progress=False)}


def _naive_task(store, task_id, score):
    """Task ``task_id``'s EM/MV of one detector, recomputed: the same draws, ``score(bank, points)`` by hand."""
    with open_store(store["path"]) as s:
        members, features = s.task_members(), s.embeddings(FEATURE).astype(np.float64)
    mine = members[members["task_id"] == task_id]
    ids = lambda *roles: np.sort(mine.loc[mine["role"].isin(roles), "image_id"].to_numpy())
    test, bank = ids(ROLE_REAL_NORMAL, ROLE_REAL_ANOMALY), ids(ROLE_SEED, ROLE_HELDOUT)
    rng = SMALL.rng(task_id, FEATURE)
    boxes = draw_feature_boxes(features[test], SMALL.draws, SMALL.subset_features, rng)
    uniform = uniform_in_boxes(boxes, SMALL.uniform_samples, rng)
    ems, mvs = [], []
    for k in range(SMALL.draws):
        columns = boxes.columns[k]
        scores = score(features[bank][:, columns], np.vstack([features[test][:, columns], uniform[k]]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            em, mv = excess_mass_mass_volume(scores[None, None, : len(test)], None, scores[None, None, len(test):],
                                             [boxes.volume[k]])
        ems.append(em[0, 0])
        mvs.append(mv[0, 0])
    return np.nanmean(ems), np.mean(mvs)


def _knn(bank, points):
    return np.array([np.sort(((bank - p) ** 2).sum(axis=1))[:3].sum() for p in points])


def _mahalanobis(bank, points):
    return LedoitWolf().fit(bank).mahalanobis(points)


@pytest.mark.parametrize("candidate, score", [(FEATURE, _knn), (f"{FEATURE}/mahalanobis", _mahalanobis)])
def test_pass_equals_a_brute_force_recomputation(store, candidate, score):
    cube = store["scored"]
    criteria = em_mv_criteria(cube.config, cube.tasks["task_id"], cube.candidate_names)
    column = cube.candidate_names.index(candidate)
    for row, task_id in enumerate(cube.tasks["task_id"]):
        em, mv = _naive_task(store, int(task_id), score)
        assert criteria["em"][row, column] == pytest.approx(em, rel=1e-6)
        assert criteria["mv"][row, column] == pytest.approx(mv, rel=1e-6)


def test_pass_scores_what_it_can_and_says_why_not_the_rest(store):
    cube = store["scored"]
    record = cube.config[EM_MV_KEY]
    criteria = em_mv_criteria(cube.config, cube.tasks["task_id"], cube.candidate_names)
    names = cube.candidate_names
    scored = [FEATURE, f"{FEATURE}/knn(k=5,cosine)", f"{FEATURE}/mahalanobis"]
    for name in scored:
        assert np.isfinite(criteria["em"][:, names.index(name)]).all() and np.isfinite(criteria["mv"][:, names.index(name)]).all()
        assert (criteria["mv"][:, names.index(name)] > 0).all()
    reasons = dict(map(tuple, record["skipped"]))
    assert "keeps 8 principal axes" in reasons[f"{FEATURE}/pca(n=8)"]
    ensembles = [n for n, f in zip(names, cube.candidates["family"]) if f == ENSEMBLE_FAMILY]
    assert ensembles and all("no single box" in reasons[n] for n in ensembles)
    for name in [f"{FEATURE}/pca(n=8)"] + ensembles:
        assert np.isnan(criteria["em"][:, names.index(name)]).all()
    assert record["settings"]["draws"] == SMALL.draws and record["settings"]["seconds"] > 0
    again = run_em_mv_pass(store["path"], store["cube"], settings=SMALL, progress=False)
    assert again.config[EM_MV_KEY]["em"] == record["em"]  # seeded: the same draws
    other = run_em_mv_pass(store["path"], store["cube"], settings=EmMvSettings(draws=6, uniform_samples=400, seed=4),
                           progress=False)
    assert other.config[EM_MV_KEY]["em"] != record["em"]


def test_strategies_pick_by_the_criteria_and_appear_in_the_tables(store):
    save_cube(store["scored"], store["path"])
    cube = load_cube(store["path"])  # EM/MV saved as datasets, read back into the config
    assert cube.config[EM_MV_KEY] == store["scored"].config[EM_MV_KEY]
    labels = [label for label, _, _ in default_strategies(cube)]
    assert EM_LABEL in labels and MV_LABEL in labels
    assert labels.index(BORDA_LABEL) == labels.index("SWSA (robust rank aggregation)") + 1  # beside Kolde's RRA
    criteria = em_mv_criteria(cube.config, cube.tasks["task_id"], cube.candidate_names)
    single = cube.candidates["family"].to_numpy() != ENSEMBLE_FAMILY
    base = [cube.sources.index(s) for s in cube.config["base_sources"]]
    borda = trimmed_borda(np.where(single[None, :, None], cube.synthetic[:, :, base], np.nan))
    table = selection_table(cube)
    for s, setting in enumerate(("one-vs-rest", "one-vs-closest")):
        real = cube.real[:, :, s]
        row = table[table["setting"] == setting].set_index("strategy")
        for label, values in ((EM_LABEL, criteria["em"]), (MV_LABEL, -criteria["mv"]), (BORDA_LABEL, borda)):
            expected = []
            for t in range(len(cube.tasks)):  # the best criterion among the single candidates, ties shared
                candidates = [c for c in range(len(single)) if single[c] and np.isfinite(values[t, c])]
                best = max(values[t, c] for c in candidates)
                expected.append(np.mean([real[t, c] for c in candidates if values[t, c] == best]))
            assert row.loc[label, "auroc"] == pytest.approx(np.mean(expected), abs=1e-12)
    comparison = strategies_table(cube, n_resamples=20)
    assert {EM_LABEL, MV_LABEL, BORDA_LABEL} <= set(comparison["strategy"])


def test_cubes_without_criteria_have_no_em_mv_rows_and_the_strategies_warn(store):
    save_cube(store["cube"], store["path"])  # a cube from before EM/MV: no record, no datasets
    cube = load_cube(store["path"])
    assert EM_MV_KEY not in cube.config
    labels = [label for label, _, _ in default_strategies(cube)]
    assert EM_LABEL not in labels and MV_LABEL not in labels
    ctx = selection_context(cube, np.arange(len(cube.tasks)), 0)
    with pytest.warns(MissingScoresWarning, match=r"em: the cube holds no EM criteria, so it gives no pick; run `swsa "
                                                  r"score --em-mv`"):
        assert np.isnan(create_strategy("em")(ctx)).all()


def test_bad_settings_give_one_line_errors(store):
    with pytest.raises(ValueError, match=r"EM/MV draws must be an integer >= 1, got 0"):
        EmMvSettings(draws=0)
    with pytest.raises(ValueError, match=r"EM/MV seed must be an integer >= 0, got -1"):
        EmMvSettings(seed=-1)
    with pytest.raises(ValueError, match=r"every one of the 3 features is constant over the 4 test images"):
        draw_feature_boxes(np.ones((4, 3)), 2, 5, np.random.default_rng(0))
    cube = store["cube"]
    old = cube.with_candidates(cube.candidates.iloc[:0], cube.real[:, :0], cube.synthetic[:, :0], cube.per_class[:, :0])
    old.candidates = old.candidates.drop(columns=["feature"])
    with pytest.raises(ValueError, match=r"the cube's candidates have no feature column: it is not a detector sweep's "
                                         r"cube \(or it is too old\); re-run `swsa score`"):
        run_em_mv_pass(store["path"], old, progress=False)
    assert isinstance(draw_feature_boxes(np.eye(3), 1, 2, np.random.default_rng(0)), FeatureBoxes)


def test_score_command_computes_em_mv_when_asked(store):  # last: it replaces the store's cube and scores
    assert main(["score", "--store", str(store["path"]), "--detectors", "knn", "--em-mv", "--quiet"]) == 0
    cube = load_cube(store["path"])
    criteria = em_mv_criteria(cube.config, cube.tasks["task_id"], cube.candidate_names)
    assert np.isfinite(criteria["em"][:, cube.candidate_names.index(FEATURE)]).all()
    assert cube.config["stage_seconds"]["em_mv"] > 0 and cube.config[EM_MV_KEY]["settings"]["draws"] == 50
