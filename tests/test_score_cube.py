"""The score cube: per-image scores behind the AUROC cube, saved beside it, reproducing its AUROCs."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from swsa_engine.app.bench_store import make_paper_store
from swsa_engine.core.protocol import LEAK_FREE, PAPER
from swsa_engine.core.score_cube import ScoreCube, score_aurocs
from swsa_engine.run.cube_io import load_cube, load_scores, save_cube
from swsa_engine.run.sweep import run_sweep
from swsa_store import StoreError, edit_store, open_store
from swsa_store.tasks import ROLE_HELDOUT, ROLE_SEED

DETECTORS = ["knn(k=3)", "mahalanobis"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A small paper-shaped store whose anomalies sit next to their parents (one seed parent for
    cutpaste and tinyimagenet, two for diffusion), two backbones."""
    path = tmp_path_factory.mktemp("scores") / "s.h5"
    make_paper_store(path, task_fraction=0.03, image_fraction=0.25, synthetic=16,
                     backbones={"resnet18": (48, 11), "vit": (32, 5)}, progress=False)
    rng = np.random.default_rng(0)
    with edit_store(path) as s:
        images, members = s.images(), s.task_members()
        seeds = members[members["role"] == ROLE_SEED].groupby("task_id")["image_id"].apply(np.asarray)
        parents = ["[]" if row.kind == "real" else
                   json.dumps([int(c) for c in rng.choice(seeds[row.task_id], size=2 if row.kind == "diffusion" else 1,
                                                          replace=False)])
                   for row in images.itertuples()]
        images["parent_ids"] = parents
        s.replace_table("images", images)
        dataset = s.file["embeddings"]["resnet18"]["features"]
        features = dataset[...]
        features[:, :3] = np.round(features[:, :3])  # ties in the distances
        dataset[...] = features
    return path


def _sweep(store, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_sweep(store, progress=False, detectors=DETECTORS, **kwargs)


@pytest.mark.parametrize("protocol", [LEAK_FREE, PAPER])
def test_scores_reproduce_every_auroc_of_the_cube_exactly(store, protocol):
    cube = _sweep(store, save=False, protocol=protocol, ensembles=False)
    scores = cube.scores
    assert scores.candidates == cube.candidate_names == ["resnet18", "resnet18/mahalanobis", "vit", "vit/mahalanobis"]
    np.testing.assert_array_equal(scores.task_ids, cube.tasks["task_id"])
    assert scores.sources == cube.config["base_sources"]
    aurocs = score_aurocs(scores, tuple(cube.config["hardest"]))
    assert aurocs["sources"] == cube.sources
    for key in ("real", "per_class", "synthetic"):
        np.testing.assert_array_equal(aurocs[key], getattr(cube, key), err_msg=key)  # NaN where the cube's are
    assert np.isfinite(cube.real).mean() > 0.9 and np.isfinite(cube.synthetic).mean() > 0.5
    # padding is NaN, real images of the task are scored; every synthetic part is labelled
    assert np.isnan(scores.real_scores[np.broadcast_to(scores.real_label[:, None] < 0, scores.real_scores.shape)]).all()
    assert np.isfinite(scores.real_scores[:, 0][scores.real_label >= 0]).all()
    assert ((scores.synthetic_part >= 0) == (scores.synthetic_ids >= 0)).all()
    if protocol == LEAK_FREE:  # mahalanobis leaves out one bank row: diffusion (two parents) is not scored
        diffusion = scores.synthetic_part == 1 + scores.sources.index("diffusion")
        assert np.isnan(scores.synthetic_scores[:, 1][diffusion]).all()


def test_knn_scores_are_the_naive_scores_of_each_image(store):
    """Task 0's kNN scores by brute force: real images against the whole bank, held-out normals
    without themselves, anomalies without their parents (leak-free)."""
    cube = _sweep(store, save=False, ensembles=False)
    scores = cube.scores
    with open_store(store) as s:
        images, members, feats = s.images(), s.task_members(), s.embeddings("resnet18").astype(np.float64)
    parents = dict(zip(images["image_id"], images["parent_ids"]))
    task_id = int(scores.task_ids[0])
    mine = members[members["task_id"] == task_id]
    support = np.union1d(*(mine.loc[mine["role"] == r, "image_id"].to_numpy() for r in (ROLE_SEED, ROLE_HELDOUT)))

    def naive(image_id, origins):
        bank = feats[[i for i in support if i not in origins]]
        return float(np.sort(((bank - feats[image_id]) ** 2).sum(axis=1))[:3].sum())

    real = [(i, naive(i, set())) for i in scores.real_ids[0][scores.real_label[0] >= 0]]
    got = dict(zip(scores.real_ids[0], scores.real_scores[0, 0]))
    assert len(real) > 20
    for image_id, expected in real:
        assert got[image_id] == pytest.approx(expected, rel=1e-5)  # float32 kernel, exact where an order depends on it
    checked = 0
    for image_id, part, value in zip(scores.synthetic_ids[0], scores.synthetic_part[0], scores.synthetic_scores[0, 0]):
        if part < 0:
            continue
        origins = {image_id} if part == 0 else set(json.loads(parents[image_id]))
        assert value == pytest.approx(naive(image_id, origins), rel=1e-5), (image_id, part)
        checked += 1
    assert checked > 20


def test_scores_round_trip_beside_the_cube(store, tmp_path):
    path = tmp_path / "s.h5"
    path.write_bytes(store.read_bytes())
    cube = _sweep(path, save=True)
    loaded = load_scores(path)
    for name in ("task_ids", "real_ids", "real_label", "real_in_rest", "real_group", "group_names", "real_scores",
                 "synthetic_ids", "synthetic_part", "synthetic_scores"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(cube.scores, name), err_msg=name)
    assert loaded.candidates == cube.candidate_names and loaded.sources == cube.scores.sources
    assert cube.config["scores_bytes"] == cube.scores.nbytes == loaded.real_scores.nbytes + loaded.synthetic_scores.nbytes
    again = load_cube(path)  # load_cube attaches them
    assert again.scores is not None and again.scores.candidates == again.candidate_names
    # a cube saved over them with other candidates: the stale scores are not attached
    save_cube(again.with_candidates(again.candidates.iloc[:1].assign(name="x"), again.real[:, :1], again.synthetic[:, :1],
                                    again.per_class[:, :1]), path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert load_cube(path).scores is None


def test_no_scores_kept_and_a_store_without_them(store, tmp_path):
    path = tmp_path / "s.h5"
    path.write_bytes(store.read_bytes())
    cube = _sweep(path, save=True, keep_scores=False)
    assert cube.scores is None and not cube.config["ensembles_built"]
    assert all(not str(n).startswith("ensemble(") for n in cube.candidate_names)
    with pytest.raises(StoreError, match=r"holds no per-image scores \('scores'\); re-run `swsa score --store"):
        load_scores(path)
    assert load_cube(path).scores is None


def test_score_cube_checks_its_shapes():
    ids = np.zeros((2, 3), dtype=np.int64)
    good = dict(task_ids=[1, 2], candidates=["a"], sources=["s"], real_ids=ids, real_label=ids.astype(np.int8),
                real_in_rest=ids > 0, real_group=ids, group_names=np.full((2, 1), "g", dtype=object),
                real_scores=np.zeros((2, 1, 3)), synthetic_ids=ids[:, :2], synthetic_part=ids[:, :2].astype(np.int8),
                synthetic_scores=np.zeros((2, 1, 2)))
    assert ScoreCube(**good).nbytes == 2 * 1 * (3 + 2) * 8
    with pytest.raises(ValueError, match=r"ScoreCube.real_scores must have shape \(2, 1, 3\) \(T=2 tasks, C=1 "
                                         r"candidates\), got \(2, 2, 3\)"):
        ScoreCube(**{**good, "real_scores": np.zeros((2, 2, 3))})
    with pytest.raises(ValueError, match=r"ScoreCube.synthetic_scores must have shape \(2, 1, 2\)"):
        ScoreCube(**{**good, "synthetic_scores": np.zeros((2, 1, 3))})
