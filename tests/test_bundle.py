"""Detector bundles: export a candidate from a store, verify it on load, predict in a fresh process.

A small digits store (pixels@8 features, CutPaste anomalies, kNN and Mahalanobis candidates) is built
once. Scores that ``swsa predict`` computes in a fresh process, without the store, are compared with
naive per-image references (a loop of squared distances for kNN, scikit-learn's LedoitWolf for
Mahalanobis) over the store's own features of the same bank, and with the cube's real AUROCs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

from swsa_engine.app.cli import main
from swsa_engine.core.cube import SETTINGS
from swsa_engine.core.thresholds import f1_optimal_threshold, normal_quantile_threshold
from swsa_engine.run.bundle import BANK_FILE, BUNDLE_SCHEMA_VERSION, MANIFEST, BundleError, load_bundle, manifest_digest
from swsa_engine.core.selection import recommendation, selection_context
from swsa_engine.run.bundle_ensemble import load_ensemble_bundle, reference_cdf
from swsa_engine.run.bundle_export import export_detector, parse_pick, split_candidate
from swsa_engine.run.cube_io import load_cube
from swsa_engine.run.predict import Predictor, expand_images, load_bundle_backbone, load_predictor
from swsa_engine.run.sweep import run_sweep
from swsa_store import open_store
from swsa_store.catalog import catalog_dataset, resolve_path
from swsa_store.ingest import embed_store
from swsa_store.synthesize import synthesize
from swsa_store.tasks import ROLE_HELDOUT, ROLE_REAL_ANOMALY, ROLE_REAL_NORMAL, ROLE_SEED

FEATURE = "pixels@8"
TASK = 3


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    path = root / "s.h5"
    catalog_dataset(path, "digits", n_seed=8, image_size=16, image_dir=root / "images")
    synthesize(path, "cutpaste", count=12, seed=0, progress=False)
    embed_store(path, FEATURE, progress=False)
    run_sweep(path, detectors=["knn", "mahalanobis"], progress=False, exact_scores=True)
    with open_store(path) as s:
        images, members = s.images(), s.task_members()
        features = s.embeddings(FEATURE).astype(np.float64)
    mine = members[members["task_id"] == TASK]
    role = lambda *r: np.sort(mine.loc[mine["role"].isin(r), "image_id"].to_numpy())
    return {"path": path, "root": root, "images": images, "features": features,
            "bank": np.union1d(role(ROLE_SEED), role(ROLE_HELDOUT)), "heldout": role(ROLE_HELDOUT),
            "normal": role(ROLE_REAL_NORMAL), "anomaly": role(ROLE_REAL_ANOMALY)}


def naive_scores(candidate: str, bank: np.ndarray, queries: np.ndarray) -> np.ndarray:
    if candidate == FEATURE:  # kNN, k = 3, squared L2: a plain loop
        return np.array([np.sort(((bank - q) ** 2).sum(axis=1))[:3].sum() for q in queries])
    return LedoitWolf().fit(bank).mahalanobis(queries)


def run_cli(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "swsa_engine.app.cli", *map(str, argv)], capture_output=True, text=True)


@pytest.mark.parametrize("candidate", [FEATURE, f"{FEATURE}/mahalanobis"])
def test_predict_in_a_fresh_process_equals_the_store_scores(store, tmp_path, candidate):
    bundle = tmp_path / "bundle"
    manifest = export_detector(store["path"], TASK, bundle, candidate=candidate)
    assert manifest["bank"]["image_ids"] == store["bank"].tolist()
    assert manifest["backbone"]["backbone"] == FEATURE and manifest["backbone"]["weights_kind"] == "none"
    assert sorted(p.name for p in bundle.iterdir()) == [BANK_FILE, MANIFEST, "validation_scores.npy"]
    test_ids = np.concatenate([store["normal"], store["anomaly"]])
    paths = [resolve_path(store["path"], p) for p in store["images"]["path"].to_numpy()[test_ids]]
    hidden = store["path"].with_name("hidden.h5")
    store["path"].rename(hidden)  # the bundle alone: no store
    try:
        result = run_cli("predict", "--detector", bundle, *paths, "--out", tmp_path / "scores.csv", "--quiet",
                         "--batch-size", "50")
    finally:
        hidden.rename(store["path"])
    assert result.returncode == 0, result.stderr
    frame = pd.read_csv(tmp_path / "scores.csv", keep_default_na=False)
    assert frame["path"].tolist() == [str(p) for p in paths] and (frame["error"] == "").all()
    features = store["features"]
    expected = naive_scores(candidate, features[store["bank"]], features[test_ids])
    np.testing.assert_allclose(frame["score"].to_numpy(dtype=float), expected, rtol=1e-6, atol=0)
    # the cube's real one-vs-rest AUROC of this candidate comes back from the predicted scores
    cube = load_cube(store["path"])
    row = int(np.flatnonzero(cube.tasks["task_id"].to_numpy() == TASK)[0])
    labels = np.r_[np.zeros(len(store["normal"])), np.ones(len(store["anomaly"]))]
    cell = cube.real[row, cube.candidate_names.index(candidate), SETTINGS.index("one-vs-rest")]
    assert roc_auc_score(labels, frame["score"].to_numpy(dtype=float)) == pytest.approx(cell, abs=1e-12)
    threshold = manifest["thresholds"][manifest["default_threshold"]]["value"]
    assert (frame["decision"] == np.where(frame["score"] >= threshold, "anomaly", "normal")).all()


def test_thresholds_equal_core_thresholds_on_the_validation_scores(store, tmp_path):
    manifest = export_detector(store["path"], TASK, tmp_path / "b", candidate=FEATURE)
    bundle = load_bundle(tmp_path / "b")
    validation = manifest["validation"]
    ids, is_anomaly = np.array(validation["image_ids"]), np.array(validation["is_anomaly"])
    scores = bundle.validation_scores
    # the held-out normals, scored leave-one-out: a naive loop over the bank without each one
    features, bank = store["features"], store["bank"]
    normals = ids[~is_anomaly]
    assert sorted(normals) == sorted(store["heldout"])
    loo = [np.sort(((features[bank[bank != i]] - features[i]) ** 2).sum(axis=1))[:3].sum() for i in normals]
    np.testing.assert_allclose(scores[~is_anomaly], loo, rtol=1e-9)
    # the anomalies, scored without their parents (the leak-free protocol)
    parents = store["images"].set_index("image_id").loc[ids[is_anomaly], "parent_ids"].map(json.loads)
    without = [np.sort(((features[np.setdiff1d(bank, p)] - features[i]) ** 2).sum(axis=1))[:3].sum()
               for i, p in zip(ids[is_anomaly], parents)]
    np.testing.assert_allclose(scores[is_anomaly], without, rtol=1e-9)
    rules = manifest["thresholds"]
    # 81-ish held-out normals are too few for a 0.99 conformal quantile: undefined, default falls back to F1
    assert rules["normal_quantile"]["value"] is None and manifest["default_threshold"] == "synthetic_f1"
    assert "too few" in rules["normal_quantile"]["undefined_reason"] and "--quantile" in manifest["default_threshold_reason"]
    threshold, f1, fpr = f1_optimal_threshold(scores, is_anomaly)
    assert rules["synthetic_f1"]["value"] == threshold and rules["synthetic_f1"]["f1"] == f1
    assert rules["synthetic_f1"]["fpr_heldout_normals"] == fpr
    assert bundle.threshold(None) == ("synthetic_f1", threshold)
    with pytest.raises(BundleError, match="threshold 'normal_quantile' .* is undefined: .*too few"):
        bundle.threshold("normal_quantile")
    # a quantile the normals can support: the conformal rank, and it is the default
    manifest = export_detector(store["path"], TASK, tmp_path / "b", candidate=FEATURE, quantile=0.9)
    rule = manifest["thresholds"]["normal_quantile"]
    assert rule["value"] == normal_quantile_threshold(scores[~is_anomaly], quantile=0.9)
    n = int((~is_anomaly).sum())
    assert rule["value"] == np.sort(scores[~is_anomaly])[int(np.ceil((n + 1) * 0.9)) - 1]
    assert rule["expected_fpr"] == pytest.approx(0.1) and manifest["default_threshold"] == "normal_quantile"


def test_tampered_bundles_are_refused(store, tmp_path):
    export_detector(store["path"], TASK, tmp_path / "good", candidate=f"{FEATURE}/mahalanobis")
    load_bundle(tmp_path / "good")
    # a changed bank
    shutil.copytree(tmp_path / "good", tmp_path / "bank")
    data = bytearray((tmp_path / "bank" / BANK_FILE).read_bytes())
    data[-1] ^= 1
    (tmp_path / "bank" / BANK_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="bank.npy was modified after export"):
        load_bundle(tmp_path / "bank")
    result = run_cli("predict", "--detector", tmp_path / "bank", tmp_path)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("swsa: error: ") and "bank.npy was modified" in result.stderr
    # another schema version (an older bundle, a newer one), even with a consistent manifest hash: both versions named
    for version in (BUNDLE_SCHEMA_VERSION - 1, BUNDLE_SCHEMA_VERSION + 1):
        shutil.copytree(tmp_path / "good", tmp_path / f"schema{version}")
        manifest = json.loads((tmp_path / f"schema{version}" / MANIFEST).read_text())
        manifest["schema_version"] = version
        manifest["manifest_sha256"] = manifest_digest(manifest)
        (tmp_path / f"schema{version}" / MANIFEST).write_text(json.dumps(manifest))
        with pytest.raises(BundleError, match=f"schema version {version} .* reads schema version {BUNDLE_SCHEMA_VERSION}"):
            load_bundle(tmp_path / f"schema{version}")
    # an edited manifest (a threshold moved)
    shutil.copytree(tmp_path / "good", tmp_path / "edited")
    manifest = json.loads((tmp_path / "edited" / MANIFEST).read_text())
    manifest["thresholds"]["synthetic_f1"]["value"] = 0.0
    (tmp_path / "edited" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="manifest.json was modified after export"):
        load_bundle(tmp_path / "edited")
    # a missing file, and a folder that is no bundle
    shutil.copytree(tmp_path / "good", tmp_path / "missing")
    (tmp_path / "missing" / BANK_FILE).unlink()
    with pytest.raises(BundleError, match="lacks bank.npy"):
        load_bundle(tmp_path / "missing")
    with pytest.raises(BundleError, match="is not a detector bundle"):
        load_bundle(tmp_path)
    assert isinstance(BundleError("x"), ValueError)


def test_pick_exports_the_strategys_choice(store, tmp_path, capsys):
    cube = load_cube(store["path"])
    row = int(np.flatnonzero(cube.tasks["task_id"].to_numpy() == TASK)[0])
    synthetic = cube.synthetic[row, :, cube.sources.index("cutpaste")]
    best = cube.candidate_names[int(np.nanargmax(synthetic))]
    assert main(["export-detector", "--store", str(store["path"]), "--task", str(TASK), "--pick", "swsa:cutpaste",
                 "--out", str(tmp_path / "picked"), "--quiet"]) == 0
    assert f"candidate={best}" in capsys.readouterr().out
    manifest = load_bundle(tmp_path / "picked").manifest
    assert manifest["candidate"]["name"] == best
    assert manifest["candidate"]["chosen_by"] == {"how": "pick", "strategy": "swsa", "settings": {"source": "cutpaste"},
                                                  "weight": 1.0, "tied_with": []}
    assert manifest["candidate"]["cube_synthetic_auroc"]["cutpaste"] == synthetic[cube.candidate_names.index(best)]
    for pick, message in [("oracle", "reads the real test labels"), ("swsa", "needs other settings"),
                          ("nope", "unknown selection strategy")]:
        assert main(["export-detector", "--store", str(store["path"]), "--task", str(TASK), "--pick", pick,
                     "--out", str(tmp_path / pick)]) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert parse_pick("swsa(source=perlin)") == ("swsa", {"source": "perlin"}) and parse_pick("swsa_mean") == ("swsa_mean", {})


def test_candidates_a_bundle_cannot_hold_are_refused(store, tmp_path):
    with pytest.raises(ValueError, match="'scores' is an imported score set: it has no features"):
        split_candidate("scores", [FEATURE], ["scores"])
    with pytest.raises(ValueError, match=r"pixels@8 was embedded without patch tokens, which patch\(K=2\) needs; run "
                                         r"`swsa embed --store .* --backbone pixels@8 --patch-tokens` first"):
        export_detector(store["path"], TASK, tmp_path / "x", candidate=f"{FEATURE}/patch(K=2)")
    with pytest.raises(ValueError, match=r"residual\(K=4,mean,text=0.5\) \(family 'residual'\) adds a CLIP text prior, "
                                         "which a bundle cannot hold yet"):
        split_candidate(f"{FEATURE}/residual(text=0.5)", [FEATURE], [])
    with pytest.raises(ValueError, match="no embeddings 'resnet18'"):
        split_candidate("resnet18", [FEATURE], [])
    with pytest.raises(ValueError, match="exactly one of --candidate NAME and --pick"):
        export_detector(store["path"], TASK, tmp_path / "x")
    with pytest.raises(ValueError, match="no task 99"):
        export_detector(store["path"], 99, tmp_path / "x", candidate=FEATURE)


def test_predict_rows_for_unreadable_images_and_weights_checks(store, tmp_path):
    export_detector(store["path"], TASK, tmp_path / "b", candidate=FEATURE)
    predictor = Predictor.load(tmp_path / "b", batch_size=3)
    good = [resolve_path(store["path"], p) for p in store["images"]["path"].to_numpy()[store["normal"][:4]]]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    frame = predictor.predict([good[0], tmp_path / "broken.png", tmp_path / "none.png", *good[1:], "nothing*/x.png"],
                              threshold=0.0)
    assert frame.columns.tolist() == ["path", "score", "decision", "error"]
    assert frame["error"].tolist()[:3] == ["", frame["error"][1], "no such file or folder"] and "cannot decode" in frame["error"][1]
    assert frame["error"].iloc[-1] == "no file matches this pattern"
    scored = frame[frame["error"] == ""]
    np.testing.assert_allclose(scored["score"], naive_scores(FEATURE, store["features"][store["bank"]],
                                                             store["features"][store["normal"][:4]]), rtol=1e-6)
    assert (scored["decision"] == "anomaly").all() and frame.loc[frame["error"] != "", "decision"].eq("").all()
    assert frame.attrs["threshold"] == "given"
    backbone = dict(load_bundle(tmp_path / "b").manifest["backbone"], weights_sha256="0" * 64)
    with pytest.raises(BundleError, match="have sha256 None, the bundle was fitted on features of weights with sha256 0000"):
        load_bundle_backbone(backbone)
    with pytest.raises(BundleError, match="preprocesses images as"):
        load_bundle_backbone(dict(backbone, weights_sha256="", preprocess={"input_size": [3, 9, 9]}))


def test_expand_images(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/1.png", "a/b/2.JPG", "a/notes.txt", "c.png"):
        (tmp_path / name).write_bytes(b"")
    found = expand_images([tmp_path / "a", str(tmp_path / "*.png"), tmp_path / "missing.png", tmp_path / "a" / "b" / "2.JPG"])
    assert found == [(str(tmp_path / "a/1.png"), ""), (str(tmp_path / "a/b/2.JPG"), ""), (str(tmp_path / "c.png"), ""),
                     (str(tmp_path / "missing.png"), "no such file or folder"), (str(tmp_path / "a/b/2.JPG"), "")]
    (tmp_path / "empty").mkdir()
    assert expand_images([tmp_path / "empty"])[0][1].startswith("folder holds no image files")


def test_commands_have_help(capsys):
    for command in ("export-detector", "predict"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0 and f"usage: swsa {command}" in capsys.readouterr().out


# --------------------------------------------------------------------------- ensemble bundles (issue 25 item 3)


def _naive_cdf(x, reference):
    """The documented reference rule, one value at a time: (#below + #equal / 2) / n."""
    return (sum(r < x for r in reference) + 0.5 * sum(r == x for r in reference)) / len(reference)


def test_export_defaults_to_the_recommendation(store, tmp_path, capsys):
    cube = load_cube(store["path"])
    row = np.flatnonzero(cube.tasks["task_id"].to_numpy() == TASK)
    outcome = recommendation(selection_context(cube, row, 0))
    chosen = np.asarray(cube.candidate_names)[np.nan_to_num(outcome.weights[0]) > 0][0]
    assert main(["export-detector", "--store", str(store["path"]), "--task", str(TASK), "--out",
                 str(tmp_path / "rec"), "--quiet"]) == 0
    assert f"candidate={chosen}" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "rec" / MANIFEST).read_text())
    assert manifest["candidate"]["chosen_by"]["strategy"] == "recommended"


def test_ensemble_bundle_predicts_in_a_fresh_process(store, tmp_path):
    name = "ensemble(mean)"
    cube = load_cube(store["path"])
    assert name in cube.candidate_names
    bundle = tmp_path / "ens"
    manifest = export_detector(store["path"], TASK, bundle, candidate=name)
    members = [m["name"] for m in manifest["ensemble"]["members"]]
    assert manifest["kind"] == "ensemble" and members == [FEATURE, f"{FEATURE}/mahalanobis"]
    assert manifest["ensemble"]["method"] == "mean" and [m["weight"] for m in manifest["ensemble"]["members"]] == [0.5, 0.5]
    for entry in manifest["ensemble"]["members"]:  # each member a complete, hashed single bundle
        member = load_bundle(bundle / entry["folder"])
        assert member.manifest["candidate"]["name"] == entry["name"] and member.manifest["backbone"]["backbone"] == FEATURE
        assert member.manifest["files"][BANK_FILE]["sha256"] and member.manifest["manifest_sha256"] == entry["manifest_sha256"]
    with pytest.raises(BundleError, match="is an ensemble bundle; load it with Predictor.load"):
        load_bundle(bundle)
    test_ids = np.concatenate([store["normal"], store["anomaly"]])
    paths = [resolve_path(store["path"], p) for p in store["images"]["path"].to_numpy()[test_ids]]
    hidden = store["path"].with_name("hidden_ens.h5")
    store["path"].rename(hidden)
    try:
        result = run_cli("predict", "--detector", bundle, *paths, "--out", tmp_path / "scores.csv", "--quiet")
    finally:
        hidden.rename(store["path"])
    assert result.returncode == 0, result.stderr
    frame = pd.read_csv(tmp_path / "scores.csv", keep_default_na=False)
    assert (frame["error"] == "").all() and frame["path"].tolist() == [str(p) for p in paths]
    # (a) every member's predicted score is its cube score of the same image
    row = int(np.flatnonzero(cube.tasks["task_id"].to_numpy() == TASK)[0])
    where = {int(i): q for q, i in enumerate(cube.scores.real_ids[row])}
    raw = []
    for member in members:
        cube_scores = cube.scores.real_scores[row, cube.candidate_names.index(member), [where[int(i)] for i in test_ids]]
        raw.append(frame[f"member_score[{member}]"].to_numpy(dtype=float))
        relative = np.abs(raw[-1] - cube_scores) / np.abs(cube_scores)
        print(f"\n{member}: max relative difference predicted vs cube score {relative.max():.2e}")
        # the store is scored with exact_scores: its kept kNN scores are the float64 brute-force values
        # (without it they carry float32 round-off, up to ~3.7e-6 relative here; the AUROCs are exact either way)
        np.testing.assert_allclose(raw[-1], cube_scores, rtol=1e-9, atol=0)
    # (b) the ensemble score is the documented reference-CDF rule, written out naively
    naive = []
    for i in range(len(frame)):
        values = []
        for m, entry in enumerate(manifest["ensemble"]["members"]):
            member = load_bundle(bundle / entry["folder"])
            reference = member.validation_scores[~np.asarray(member.manifest["validation"]["is_anomaly"])]
            values.append(_naive_cdf(raw[m][i], reference.tolist()))
        naive.append(sum(values) / len(values))
    np.testing.assert_allclose(frame["score"].to_numpy(dtype=float), naive, rtol=0, atol=1e-12)
    # (c) its real AUROC beside the cube's ensemble AUROC (normalised over the test pool there)
    labels = np.r_[np.zeros(len(store["normal"])), np.ones(len(store["anomaly"]))]
    predicted = roc_auc_score(labels, frame["score"].to_numpy(dtype=float))
    in_cube = cube.real[row, cube.candidate_names.index(name), SETTINGS.index("one-vs-rest")]
    print(f"\nensemble(mean) task {TASK}: predicted-scores AUROC {predicted:.4f}, cube AUROC {in_cube:.4f}")
    assert abs(predicted - in_cube) < 0.1
    # a tampered member file is refused, in the library and by the command
    data = bytearray((bundle / manifest["ensemble"]["members"][1]["folder"] / BANK_FILE).read_bytes())
    data[-1] ^= 1
    (bundle / manifest["ensemble"]["members"][1]["folder"] / BANK_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="bank.npy was modified after export"):
        load_ensemble_bundle(bundle)
    result = run_cli("predict", "--detector", bundle, paths[0])
    assert result.returncode == 1 and "bank.npy was modified" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_ensemble_bundle_over_the_test_pool_reproduces_the_cube_scores(store, tmp_path):
    """normalise_over="batch" ranks each member over the images scored together, as the cube does over
    a task's test pool: predicting that pool gives the cube's ensemble scores (the store is scored with
    exact_scores, so the members' raw scores are the cube's); the default reference rule does not."""
    name = "ensemble(mean)"
    cube = load_cube(store["path"])
    row = int(np.flatnonzero(cube.tasks["task_id"].to_numpy() == TASK)[0])
    pool = np.flatnonzero(cube.scores.real_pool[row])
    ids = cube.scores.real_ids[row, pool]
    path_of = dict(zip(store["images"]["image_id"].to_numpy(), store["images"]["path"].to_numpy()))
    paths = [str(resolve_path(store["path"], path_of[int(i)])) for i in ids]
    export_detector(store["path"], TASK, tmp_path / "ens", candidate=name)
    predictor = load_predictor(tmp_path / "ens")
    batch = predictor.predict(paths, normalise_over="batch")["score"].to_numpy(dtype=float)
    want = cube.scores.real_scores[row, cube.candidate_names.index(name), pool]
    np.testing.assert_allclose(batch, want, rtol=0, atol=1e-12)
    reference = predictor.predict(paths)["score"].to_numpy(dtype=float)
    assert np.abs(reference - want).max() > 1e-3  # the per-image rule is another normalisation
    with pytest.raises(ValueError, match="normalise_over must be one of reference, batch"):
        predictor.bundle.combine(np.zeros((2, 3)), "pool")
    result = run_cli("predict", "--detector", tmp_path / "ens", paths[0], "--normalise-over", "batch", "--quiet")
    assert result.returncode == 0, result.stderr
    single = tmp_path / "single"
    export_detector(store["path"], TASK, single, candidate=FEATURE)
    result = run_cli("predict", "--detector", single, paths[0], "--normalise-over", "batch")
    assert result.returncode == 1 and "--normalise-over applies to ensemble bundles" in result.stderr


def test_reference_cdf_equals_the_naive_rule_with_ties():
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 5, size=17).astype(float)
    x = np.r_[rng.integers(-1, 7, size=30).astype(float), np.nan]
    got = reference_cdf(x, reference)
    np.testing.assert_allclose(got[:-1], [_naive_cdf(v, reference.tolist()) for v in x[:-1]], atol=0)
    assert np.isnan(got[-1])
    with pytest.raises(BundleError, match="reference pool is empty"):
        reference_cdf(x, np.array([]))
