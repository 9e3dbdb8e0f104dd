"""The detector registry and (feature source × detector) candidates in the sweep."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from swsa_engine.app.bench import make_paper_store, reference_sweep
from swsa_engine.app.cli import main
from swsa_engine.core.detectors import (DEFAULT_DETECTOR, KnnDetector, candidate_name, create_detector, list_detectors,
                                   parse_detector)
from swsa_engine.core.selection import selection_table
from swsa_engine.run.cube_io import load_cube
from swsa_engine.run.sweep import run_sweep
from swsa_store.registry import UnknownNameError


def test_parse_and_labels():
    assert parse_detector("knn") == DEFAULT_DETECTOR
    assert parse_detector("knn(k=5)") == KnnDetector(5, "l2")
    assert parse_detector(" knn(k=5, metric=cosine) ") == KnnDetector(5, "cosine")
    assert parse_detector("knn(k=5,cosine)") == KnnDetector(5, "cosine")
    assert parse_detector(KnnDetector(1, "cosine").label) == KnnDetector(1, "cosine")
    assert candidate_name("vit_b_16", DEFAULT_DETECTOR) == "vit_b_16"
    assert candidate_name("vit_b_16", KnnDetector(5, "cosine")) == "vit_b_16/knn(k=5,cosine)"
    assert "knn" in list_detectors() and create_detector("knn", k=1).k == 1


def test_errors_name_what_is_wrong():
    with pytest.raises(UnknownNameError, match="unknown detector 'knnn'.*Did you mean 'knn'"):
        parse_detector("knnn(k=3)")
    with pytest.raises(ValueError, match="integer k >= 1"):
        parse_detector("knn(k=0)")
    with pytest.raises(ValueError, match="metric must be 'l2' or 'cosine'"):
        parse_detector("knn(k=3,metric=manhattan)")
    with pytest.raises(ValueError, match="does not take these settings"):
        parse_detector("knn(q=3)")
    with pytest.raises(ValueError, match="cannot read detector"):
        parse_detector("knn(k=3")


def test_cosine_prepare_normalises_rows():
    features = np.array([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    prepared = KnnDetector(1, "cosine").prepare(features)
    np.testing.assert_allclose(prepared, [[0.6, 0.8], [0.0, 0.0], [1.0, 0.0]])
    assert KnnDetector(1, "l2").prepare(features) is features


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("detectors") / "paper.h5"
    make_paper_store(path, task_fraction=0.03, image_fraction=0.25, synthetic=12,
                     backbones={"resnet18": (512, 11), "vit_b_16": (768, 86)}, progress=False)
    return path


def test_detector_grid_equals_reference_loops(store):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cube = run_sweep(store, progress=False, save=False, detectors=["knn(k=3)", "knn(k=1)", "knn(k=5,cosine)"],
                         ensembles=False)
    assert len(cube.candidates) == 6
    assert set(cube.candidates["detector"]) == {"knn(k=3,l2)", "knn(k=1,l2)", "knn(k=5,cosine)"}
    assert "resnet18" in cube.candidate_names and "resnet18/knn(k=5,cosine)" in cube.candidate_names
    task_ids = list(map(int, cube.tasks.groupby("dataset")["task_id"].first()))
    row_of = {int(t): i for i, t in enumerate(cube.tasks["task_id"])}
    for k, normalise, suffix in ((1, False, "/knn(k=1,l2)"), (5, True, "/knn(k=5,cosine)")):
        reference = reference_sweep(store, task_ids, k=k, normalise=normalise)
        for (task_id, name), ref in reference["results"].items():
            t, c = row_of[task_id], cube.candidate_names.index(name + suffix)
            np.testing.assert_allclose(cube.real[t, c], ref["real"], atol=1e-12)
            for source, value in ref["synthetic"].items():
                assert cube.synthetic[t, c, cube.sources.index(source)] == pytest.approx(value, abs=1e-12)
    table = selection_table(cube)
    assert {"SWSA (cutpaste)", "Best model (oracle)"} <= set(table["strategy"])


def test_cli_detectors_option(store, tmp_path, capsys):
    copy = tmp_path / "s.h5"
    copy.write_bytes(store.read_bytes())
    assert main(["score", "--store", str(copy), "--detectors", "knn(k=3);knn(k=1,cosine)", "--quiet"]) == 0
    cube = load_cube(copy)
    assert cube.config["detectors"] == ["knn(k=3,l2)", "knn(k=1,cosine)"]
    assert "vit_b_16/knn(k=1,cosine)" in cube.candidate_names
    capsys.readouterr()
    assert main(["score", "--store", str(copy), "--detectors", "knn(k=0)", "--quiet"]) == 1
    assert "integer k >= 1" in capsys.readouterr().err


def test_every_detector_is_registered_with_the_sweep_interface():
    names = list_detectors()
    assert {"knn", "mahalanobis", "residual", "nagl", "pca"} <= set(names)
    for text in ("knn(k=3,l2)", "mahalanobis", "residual(K=4,mean)", "nagl(k=3,beta=1.0)", "pca(n=8)"):
        detector = parse_detector(text)
        assert detector.label == text and detector.needs == "features"
        assert detector.needs_abnormal == (detector.family == "nagl")
        assert callable(detector.score_tasks) and callable(detector.score_shared)
        assert detector.min_bank(True) >= detector.min_bank(False) >= 1
        assert candidate_name("pixels", detector) == ("pixels" if detector == DEFAULT_DETECTOR else f"pixels/{text}")


def test_non_knn_detectors_in_the_sweep_and_table1_rows(store, tmp_path):
    copy = tmp_path / "s.h5"
    copy.write_bytes(store.read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cube = run_sweep(copy, progress=False, save=True, backbones=["resnet18"], task_ids=[0, 1],
                         detectors=["knn", "residual(K=25,mean)", "nagl(k=2)"])
    # K larger than the support and NAGL without a split are recorded skips that name the fix
    reasons = set(cube.skips["reason"])
    assert any("residual(K=25,mean) needs at least 25 usable support images" in r and "smaller K" in r for r in reasons)
    assert any("swsa split-refs" in r for r in reasons)
    assert np.isnan(cube.real[:, cube.candidate_names.index("resnet18/nagl(k=2,beta=1.0)")]).all()
    table = selection_table(cube)
    assert {"SWSA (cutpaste), backbone-only grid", "Largest backbone with detector knn(k=3,l2)",
            "Best backbone-only candidate (oracle)", "Largest backbone, all detectors averaged"} <= set(table["strategy"])
    assert "Largest model" not in set(table["strategy"])  # the two largest-backbone rows say what they are
    loaded = load_cube(copy)
    assert loaded.config["detectors"] == ["knn(k=3,l2)", "residual(K=25,mean)", "nagl(k=2,beta=1.0)"]
