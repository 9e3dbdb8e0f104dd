"""Imported scores: the validation sets are exported, scored by scikit-learn detectors fitted on
each task's training folder, imported, and evaluated beside the embedding candidate; every bad
import is a one-line error that leaves the store unchanged."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.ensemble import IsolationForest
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import LocalOutlierFactor
from sklearn.svm import OneClassSVM

from swsa_engine.app.cli import main
from swsa_engine.report.summary import write_report
from swsa_engine.core.selection import selection_table
from swsa_engine.run.sweep import run_sweep
from swsa_store import open_store
from swsa_store.catalog import catalog_dataset
from swsa_store.ingest import embed_store
from swsa_store.scores import ScoreImportError, import_scores
from swsa_store.synthesize import synthesize
from swsa_store.tasks import ROLE_REAL_ANOMALY, ROLE_REAL_NORMAL


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("scores")
    path = root / "s.h5"
    # a small real dataset: 4 digit classes × 40 images from scikit-learn's digits, as an image folder
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in range(4):
        folder = root / "img" / str(label)
        folder.mkdir(parents=True)
        for i, index in enumerate(np.flatnonzero(digits.target == label)[:40]):
            pixels = (digits.images[index] * 255 / 16).astype(np.uint8)
            Image.fromarray(pixels).resize((16, 16), Image.NEAREST).convert("RGB").save(folder / f"{i:03d}.png")
    catalog_dataset(path, "folder", root=root / "img", name="digits4", n_seed=6)
    synthesize(path, "cutpaste", count=8, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        embed_store(path, "timm/resnet10t", weights="random", image_size=32, batch_size=64, progress=False)
    return path


def _pixels(paths):
    return np.stack([np.asarray(Image.open(p).convert("L"), dtype=np.float64).ravel() / 255.0 for p in paths])


def _sklearn_scores(store_path, detector_factory, export_dir) -> pd.DataFrame:
    """The user's workflow: export every task's folders, fit a detector on each task's
    train/good pixels, score its val/ and test/ images, return the score table to import."""
    manifest_path = export_dir / "manifest.csv"
    if not manifest_path.exists():
        assert main(["export-validation", "--store", str(store_path), str(export_dir), "--quiet"]) == 0
    manifest = pd.read_csv(manifest_path)
    rows = []
    for task_id, files in manifest.groupby("task"):
        train = files[files["split"] == "train"]
        scored = files[files["split"] != "train"].drop_duplicates("image_id")
        detector = detector_factory().fit(_pixels(export_dir / train["file"]))
        scores = -detector.score_samples(_pixels(export_dir / scored["file"]))  # higher = more anomalous
        rows.append(pd.DataFrame({"task": task_id, "image_id": scored["image_id"].to_numpy(), "score": scores}))
    return pd.concat(rows, ignore_index=True)


DETECTORS = {
    "isolation_forest": lambda: IsolationForest(random_state=0, n_estimators=50),
    "lof": lambda: LocalOutlierFactor(novelty=True, n_neighbors=5),
    "ocsvm": lambda: OneClassSVM(gamma="scale"),
}


def test_sklearn_detectors_enter_the_cube(store, tmp_path):
    tables = {}
    for name, factory in DETECTORS.items():
        tables[name] = _sklearn_scores(store, factory, tmp_path / "export")
        csv = tmp_path / f"{name}.csv"
        tables[name].to_csv(csv, index=False)
        assert main(["import-scores", "--store", str(store), "--candidate", name, str(csv)]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cube = run_sweep(store, progress=False, save=False, ensembles=False)
    assert set(DETECTORS) | {"timm-resnet10t"} == set(cube.candidate_names)
    with open_store(store) as s:
        members = s.task_members()
    for name, table in tables.items():
        c = cube.candidate_names.index(name)
        for t, task_id in enumerate(cube.tasks["task_id"]):
            mine = members[members.task_id == task_id]
            normal = mine.loc[mine.role == ROLE_REAL_NORMAL, "image_id"]
            anomaly = mine.loc[mine.role == ROLE_REAL_ANOMALY, "image_id"]
            scored = table[table.task == task_id].set_index("image_id")["score"]
            expected = roc_auc_score(np.r_[np.zeros(len(normal)), np.ones(len(anomaly))],
                                     np.r_[scored.loc[normal].to_numpy(), scored.loc[anomaly].to_numpy()])
            assert cube.real[t, c, 0] == pytest.approx(expected, abs=1e-12)
    table1 = selection_table(cube)
    assert {"SWSA (cutpaste)", "Largest model"} <= set(table1["strategy"])
    paths = write_report(cube, tmp_path / "report")
    import json

    assert set(DETECTORS) <= set(json.loads(paths["summary"].read_text())["candidates"])
    ranking = pd.read_csv(paths["table2_csv"])
    assert (ranking["n_candidates"] == 4).all()
    assert cube.candidates.set_index("name").loc["lof", "weights_kind"] == "imported"


def _bad(store, frame, match, tmp_path, **kw):
    before = store.read_bytes()
    csv = tmp_path / "bad.csv"
    frame.to_csv(csv, index=False)
    with pytest.raises(ScoreImportError, match=match):
        import_scores(store, "bad", csv, **kw)
    assert store.read_bytes() == before


def test_bad_imports_are_one_line_errors_and_change_nothing(store, tmp_path, capsys):
    good = _sklearn_scores(store, DETECTORS["lof"], tmp_path / "export")
    _bad(store, good.rename(columns={"score": "value"}), r"needs columns task .*got \['task', 'image_id', 'value'\]", tmp_path)
    frame = good.copy(); frame.loc[3, "image_id"] = 10**7
    _bad(store, frame, r"row 5: unknown image_id 10000000", tmp_path)
    frame = good.copy(); frame.loc[4, "task"] = 999
    _bad(store, frame, r"row 6: unknown task 999", tmp_path)
    frame = good.copy(); frame.loc[7, "score"] = np.nan
    _bad(store, frame, r"row 9: score nan is not a finite number", tmp_path)
    frame = good.copy(); frame.loc[8, "score"] = np.inf
    _bad(store, frame, r"row 10: score inf is not a finite number", tmp_path)
    frame = pd.concat([good, good.iloc[[2]]], ignore_index=True)
    _bad(store, frame, rf"row {len(good) + 2}: duplicate score for task .* \(first given in row 4\)", tmp_path)
    frame = good[good.task != 1]
    _bad(store, frame, r"task 1 lacks scores for \d+ of its \d+ validation images .*--allow-missing", tmp_path)
    with open_store(store) as s:
        path = s.images()["path"].iloc[0]
    frame = good.assign(path=path).drop(columns="image_id")
    frame.loc[0, "path"] = "/no/such/image.png"
    _bad(store, frame, r"row 2: unknown image path '/no/such/image.png'", tmp_path)
    # the CLI says it in one line
    csv = tmp_path / "bad.csv"
    good.iloc[:5].to_csv(csv, index=False)
    assert main(["import-scores", "--store", str(store), "--candidate", "x", str(csv)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("swsa: error: task") and len(err.splitlines()) == 1


def test_allow_missing_records_a_skip_and_scores_the_rest(store, tmp_path):
    good = _sklearn_scores(store, DETECTORS["ocsvm"], tmp_path / "export")
    summary = import_scores(store, "partial", good[good.task != 2], allow_missing=True)
    assert summary["skipped_tasks"] == 1
    with open_store(store) as s:
        skips = s.skips()
    assert ((skips.stage == "import") & (skips.task_id == 2) & (skips.backbone == "partial")).any()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cube = run_sweep(store, backbones=["partial"], progress=False, save=False)
    row = list(cube.tasks["task_id"]).index(2)
    assert np.isnan(cube.real[row, 0]).all() and np.isfinite(np.delete(cube.real[:, 0, 0], row)).all()
    with pytest.raises(ScoreImportError, match="already holds imported scores 'partial'.*--replace"):
        import_scores(store, "partial", good)
    assert import_scores(store, "partial", good, replace=True)["skipped_tasks"] == 0
    with pytest.raises(ScoreImportError, match="already an embedding matrix"):
        import_scores(store, "timm-resnet10t", good)
