"""Bundles of every pooled-feature detector family (issue 21 items 1-2): Mahalanobis, residual, PCA,
NAGL and PyOD's models, refitted at load from the stored bank (no pickle), scored in a fresh process
without the store, equal to the cube's stored per-image scores of the same candidate.

A small digits store (pixels@8, CutPaste and Perlin anomalies, a quarter of the Perlin anomalies held
apart as NAGL's abnormal references) is swept on one task only.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from importlib import metadata

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from swsa_engine.core.detectors import Detector, candidate_name, parse_detector
from swsa_engine.run import bundle_scoring
from swsa_engine.run.bundle import ABNORMAL_FILE, MANIFEST, BundleError, BundleWarning, load_bundle, manifest_digest
from swsa_engine.run.bundle_detector import BUNDLE_FAMILIES, check_bundleable
from swsa_engine.run.bundle_export import export_detector
from swsa_engine.run.predict import Predictor
from swsa_engine.run.sweep import run_sweep
from swsa_store import open_store
from swsa_store.catalog import catalog_dataset, resolve_path
from swsa_store.ingest import embed_store
from swsa_store.references import read_references, split_references
from swsa_store.synthesize import synthesize

FEATURE = "pixels@8"
TASK = 3
DEFAULT = ["mahalanobis", "residual(K=4,min)", "pca(n=4)", "nagl", "pyod(model=ecod)",
           "pyod(model=iforest,n_estimators=20)", "pyod(model=ocsvm)"]
MORE_PYOD = ["pyod(model=copod)", "pyod(model=lof)", "pyod(model=loda,n_random_cuts=30)", "pyod(model=pca)",
             "pyod(model=knn,method=mean)"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    path = root / "s.h5"
    catalog_dataset(path, "digits", n_seed=8, image_size=16, image_dir=root / "images")
    synthesize(path, "cutpaste", count=12, seed=0, progress=False)
    synthesize(path, "perlin", count=12, seed=0, progress=False)
    embed_store(path, FEATURE, progress=False)
    split_references(path, "perlin", 0.25, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cube = run_sweep(path, detectors=DEFAULT, task_ids=[TASK], progress=False, ensembles=False)
    with open_store(path) as s:
        images = s.images()
    row = int(np.flatnonzero(cube.tasks["task_id"].to_numpy() == TASK)[0])
    ids, labels = cube.scores.real_ids[row], cube.scores.real_label[row]
    # 30 normal and 30 anomalous test images, spread over the test set
    chosen = np.concatenate([np.flatnonzero(labels == 0)[::9][:30], np.flatnonzero(labels == 1)[::45][:30]])
    paths = [str(resolve_path(path, p)) for p in images["path"].to_numpy()[ids[chosen]]]
    return {"path": path, "root": root, "cube": cube, "row": row, "chosen": chosen, "paths": paths,
            "labels": labels[chosen]}


def _candidate(label: str) -> str:
    return candidate_name(FEATURE, parse_detector(label))


def _predict_fresh(store, bundles: list, tmp_path) -> list[np.ndarray]:
    """Scores of the chosen test images by each bundle, predicted in a fresh Python process while
    the store is hidden (renamed): the bundles alone."""
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"bundles": [str(b) for b in bundles], "paths": store["paths"],
                               "out": str(tmp_path / "scores.json")}))
    script = ("import json, sys; from swsa_engine.run.predict import load_predictor\n"
              "job = json.load(open(sys.argv[1]))\n"
              "out = [load_predictor(b, batch_size=16).predict(job['paths'])['score'].tolist() for b in job['bundles']]\n"
              "json.dump(out, open(job['out'], 'w'))\n")
    hidden = store["path"].with_name("hidden.h5")
    store["path"].rename(hidden)
    try:
        result = subprocess.run([sys.executable, "-c", script, str(job)], capture_output=True, text=True)
    finally:
        hidden.rename(store["path"])
    assert result.returncode == 0, result.stderr
    return [np.asarray(s, dtype=float) for s in json.loads((tmp_path / "scores.json").read_text())]


def _check_against_cube(store, labels: list[str], tmp_path, cube=None):
    cube = cube or store["cube"]
    bundles = []
    for i, label in enumerate(labels):
        bundles.append(tmp_path / f"b{i}")
        manifest = export_detector(store["path"], TASK, bundles[-1], candidate=_candidate(label))
        assert manifest["detector"]["family"] in BUNDLE_FAMILIES
    predicted = _predict_fresh(store, bundles, tmp_path)
    for label, scores in zip(labels, predicted):
        c = cube.candidate_names.index(_candidate(label))
        stored = cube.scores.real_scores[store["row"], c, store["chosen"]]
        relative = np.abs(scores - stored) / np.abs(stored)
        print(f"\n{label}: max relative difference predicted vs cube score {relative.max():.2e}")
        np.testing.assert_allclose(scores, stored, rtol=1e-6, atol=0, err_msg=label)
    return predicted


def test_every_family_predicts_the_cube_scores_in_a_fresh_process(store, tmp_path):
    predicted = _check_against_cube(store, DEFAULT, tmp_path)
    # AUROC of the predicted scores on the chosen images = AUROC of the cube's scores there
    for label, scores in zip(DEFAULT, predicted):
        c = store["cube"].candidate_names.index(_candidate(label))
        stored = store["cube"].scores.real_scores[store["row"], c, store["chosen"]]
        assert roc_auc_score(store["labels"], scores) == roc_auc_score(store["labels"], stored)


@pytest.mark.slow
def test_more_pyod_models_predict_the_cube_scores(store, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cube = run_sweep(store["path"], detectors=MORE_PYOD, task_ids=[TASK], progress=False, ensembles=False)
    _check_against_cube(store, MORE_PYOD, tmp_path, cube)


def test_manifest_records_parameters_seed_references_and_versions(store, tmp_path):
    forest = export_detector(store["path"], TASK, tmp_path / "forest", candidate=_candidate(DEFAULT[5]))["detector"]
    assert forest["parameters"] == {"model": "iforest", "n_estimators": 20, "max_features": 1.0, "seed": 0}
    assert forest["seed"] == 0 and forest["family"] == "pyod" and forest["refit"] == BUNDLE_FAMILIES["pyod"]
    assert forest["libraries"]["pyod"] == metadata.version("pyod")
    assert forest["libraries"]["scikit-learn"] == metadata.version("scikit-learn")
    residual = export_detector(store["path"], TASK, tmp_path / "res", candidate=_candidate(DEFAULT[1]))
    record = residual["detector"]
    assert record["parameters"] == {"K": 4, "reduce": "min", "seed": 0, "text": 0.0} and record["seed"] == 0
    drawn = store["cube"].config["residual_references"]["residual(K=4,min)"]
    assert record["references"]["image_ids"] == drawn["image_ids"][drawn["task_id"].index(TASK)]
    assert [residual["bank"]["image_ids"][s] for s in record["references"]["bank_slots"]] == record["references"]["image_ids"]
    export_detector(store["path"], TASK, tmp_path / "nagl", candidate=_candidate("nagl"))
    nagl = load_bundle(tmp_path / "nagl").manifest
    assert nagl["detector"]["seed"] is None and ABNORMAL_FILE in nagl["files"]
    with open_store(store["path"]) as s:
        held_apart = read_references(s)
    mine = sorted(held_apart.loc[held_apart["task_id"] == TASK, "image_id"].tolist())
    assert sorted(nagl["abnormal"]["image_ids"]) == mine and nagl["files"][ABNORMAL_FILE]["shape"][0] == len(mine) > 0


def _edited(src, dst, edit) -> None:
    """A copy of bundle ``src`` at ``dst`` whose manifest ``edit`` changed, its own hash made consistent."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((dst / MANIFEST).read_text())
    edit(manifest)
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (dst / MANIFEST).write_text(json.dumps(manifest))


def test_a_bundle_rebuilt_differently_is_refused_or_warned(store, tmp_path):
    export_detector(store["path"], TASK, tmp_path / "forest", candidate=_candidate(DEFAULT[5]))
    _edited(tmp_path / "forest", tmp_path / "params", lambda m: m["detector"]["parameters"].update(n_estimators=50))
    with pytest.raises(BundleError, match=r"reads back as 'pyod\(model=iforest,n_estimators=20.*with parameters .* "
                                          r"\(the bundle says .*'n_estimators': 50.*export the detector again"):
        load_bundle(tmp_path / "params")
    _edited(tmp_path / "forest", tmp_path / "old", lambda m: m["detector"]["libraries"].update(pyod="0.0.1"))
    with pytest.warns(BundleWarning, match=f"fitted with pyod 0.0.1; this environment has pyod {metadata.version('pyod')}"):
        load_bundle(tmp_path / "old")
    export_detector(store["path"], TASK, tmp_path / "res", candidate=_candidate(DEFAULT[1]))
    _edited(tmp_path / "res", tmp_path / "drawn", lambda m: m["detector"]["references"].update(bank_slots=[0, 1, 2, 3]))
    with pytest.raises(BundleError, match=r"residual\(K=4,min\) draws other references .* than at export"):
        load_bundle(tmp_path / "drawn")


def test_pyod_is_fitted_once_at_load(store, tmp_path, monkeypatch):
    export_detector(store["path"], TASK, tmp_path / "forest", candidate=_candidate(DEFAULT[5]))
    fits = []
    real = bundle_scoring.pyod_estimator
    monkeypatch.setattr(bundle_scoring, "pyod_estimator", lambda *a: fits.append(a) or real(*a))
    predictor = Predictor.load(tmp_path / "forest", batch_size=7)
    assert len(fits) == 1
    frame = predictor.predict(store["paths"][:20])
    assert len(fits) == 1 and frame["score"].notna().all()


class _Custom(Detector):
    label = "custom"
    family = "custom"

    def min_bank(self, has_heldout):
        return 1

    def score_tasks(self, *args, **kwargs):
        raise NotImplementedError


def test_families_a_bundle_cannot_reproduce_are_refused_in_one_line():
    with pytest.raises(ValueError, match="detector family 'custom' \\(custom\\) cannot be bundled: swsa does not know how "
                                         "to refit it from stored arrays; bundled families: knn, gaussian"):
        check_bundleable(_Custom())
