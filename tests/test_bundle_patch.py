"""Patch-level detector bundles (issue 21 items 1-2): the bank's patch tokens as .npy, scores of the
store's own test images equal to the cube's in a fresh process without the store, and ``swsa predict
--heatmaps``: one heat map per image over the image the backbone saw, and an HTML gallery.

A toy folder dataset (three classes of noise textures at 64 px) is embedded with a randomly
initialised timm ResNet (patch tokens: its layer3 map, a 4 x 4 grid at 64 px); the detector is
``patch(K=2)``. The heat-map test pastes a red square into one cell of fresh, seeded images of the
normal class and checks that the map's hottest patch (and hottest pixel) is that cell.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import matplotlib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from swsa_engine.app.cli import main
from swsa_engine.core.patch_maps import patch_score_maps
from swsa_engine.report.prediction_gallery import (GALLERY_FILE, HEATMAP_COLORMAP, colour_scale, gallery_html,
                                                   heatmap_name, overlay_heatmap, upsample_map)
from swsa_engine.run.bundle import BANK_FILE, BundleError, load_bundle
from swsa_engine.run.bundle_export import export_detector
from swsa_engine.run.cube_io import load_cube
from swsa_engine.run.predict import Predictor
from swsa_engine.run.sweep import run_sweep
from swsa_store import open_store
from swsa_store.catalog import catalog_dataset, resolve_path
from swsa_store.ingest import embed_store
from swsa_store.synthesize import synthesize

BACKBONE, NAME = "timm/resnet10t", "timm-resnet10t"
CANDIDATE = f"{NAME}/patch(K=2)"
SIZE, CELL = 64, 16  # 64 px input, a 16 px stride: a 4 x 4 grid of patches
pytestmark = pytest.mark.filterwarnings("ignore:.*has RANDOM weights")  # a random backbone is fine for these tests


def _texture(rng, level: int) -> np.ndarray:
    return (rng.random((SIZE, SIZE, 3)) * 60 + level).astype(np.uint8)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("patch_bundle")
    rng = np.random.default_rng(0)
    for c, name in enumerate("abc"):
        (root / "img" / name).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(_texture(rng, 60 * c)).save(root / "img" / name / f"{i:02d}.png")
    path = root / "s.h5"
    catalog_dataset(path, "folder", root=root / "img", name="toy", n_seed=3)
    synthesize(path, "cutpaste", count=6, seed=0, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: warned, fine for a test
        embed_store(path, BACKBONE, weights="random", image_size=SIZE, batch_size=8, progress=False, patch_tokens=True)
        run_sweep(path, detectors=["patch(K=2)", "knn"], progress=False, ensembles=False)
    cube = load_cube(path)
    task = int(cube.tasks.loc[cube.tasks["normal_class"] == "a", "task_id"].iloc[0])
    bundle = root / "bundle"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manifest = export_detector(path, task, bundle, candidate=CANDIDATE)
    return {"path": path, "root": root, "cube": cube, "task": task, "bundle": bundle, "manifest": manifest}


def test_patch_bundle_holds_the_bank_tokens_and_the_draw(store):
    manifest, bundle = store["manifest"], load_bundle(store["bundle"])
    with open_store(store["path"]) as s:
        tokens = s.patches(NAME)
    ids = np.asarray(manifest["bank"]["image_ids"])
    assert bundle.bank.dtype == np.float16 and bundle.bank.shape == (len(ids), 16, 256)
    np.testing.assert_array_equal(bundle.bank[ids >= 0], tokens[ids[ids >= 0]])
    assert manifest["patches"]["grid"] == [4, 4] and manifest["patches"]["layer"] == "layer3"
    record = manifest["detector"]
    assert record["family"] == "patch" and record["parameters"] == {"K": 2, "seed": 0} and record["seed"] == 0
    assert len(record["references"]["bank_slots"]) == 2
    assert [manifest["bank"]["image_ids"][s] for s in record["references"]["bank_slots"]] == record["references"]["image_ids"]
    assert bundle.manifest["files"][BANK_FILE]["dtype"] == "<f2"


def test_patch_predictions_equal_the_cube_and_draw_a_gallery(store, tmp_path):
    cube, task = store["cube"], store["task"]
    row = int(np.flatnonzero(cube.tasks["task_id"].to_numpy() == task)[0])
    ids = cube.scores.real_ids[row]
    ids = ids[ids >= 0]
    with open_store(store["path"]) as s:
        paths = [str(resolve_path(store["path"], p)) for p in s.images()["path"].to_numpy()[ids]]
    hidden = store["path"].with_name("hidden.h5")
    store["path"].rename(hidden)  # the bundle alone
    try:
        result = subprocess.run([sys.executable, "-m", "swsa_engine.app.cli", "predict", "--detector", str(store["bundle"]),
                                 *paths, "--out", str(tmp_path / "scores.csv"), "--heatmaps", str(tmp_path / "maps"),
                                 "--quiet", "--batch-size", "5"], capture_output=True, text=True)
    finally:
        hidden.rename(store["path"])
    assert result.returncode == 0, result.stderr
    frame = pd.read_csv(tmp_path / "scores.csv", keep_default_na=False)
    assert frame["path"].tolist() == paths and (frame["error"] == "").all()
    stored = cube.scores.real_scores[row, cube.candidate_names.index(CANDIDATE), : len(ids)]
    np.testing.assert_allclose(frame["score"].to_numpy(dtype=float), stored, rtol=1e-6, atol=0)
    # one PNG per image, as large as the display minimum, and a page that lists them by score
    assert all((tmp_path / "maps").joinpath(p).is_file() for p in frame["heatmap"])
    assert Image.open(frame["heatmap"].iloc[0]).size == (224, 224)
    page = (tmp_path / "maps" / GALLERY_FILE).read_text()
    positions = [page.index(p) for p in frame.sort_values("score", ascending=False, kind="stable")["path"]]
    assert positions == sorted(positions) and page.count("<figure") == len(frame)


def _defect_images(folder, n: int, seed: int):
    """``n`` seeded textures of the normal class with a red square pasted into one 16 px cell each."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    paths, cells = [], []
    for i in range(n):
        pixels = _texture(rng, 0)
        r, c = (int(v) for v in rng.integers(0, 4, size=2))
        pixels[r * CELL + 3 : r * CELL + 13, c * CELL + 3 : c * CELL + 13] = [255, 40, 40]
        paths.append(str(folder / f"defect{i}.png"))
        Image.fromarray(pixels).save(paths[-1])
        cells.append((r, c))
    return paths, cells


def test_heat_map_hottest_patch_is_the_pasted_defect(store, tmp_path):
    predictor = Predictor.load(store["bundle"], batch_size=4)
    paths, cells = _defect_images(tmp_path / "defects", 6, seed=5)
    frame, maps = predictor.predict_with_maps(paths)
    assert maps.shape == (6, 4, 4) and (frame["error"] == "").all()
    # the map's maximum is the image's score (the detector's max over patches)
    np.testing.assert_allclose(maps.reshape(6, -1).max(axis=1), frame["score"], rtol=1e-12)
    view = predictor.model_view(paths[0])
    assert view.shape == (SIZE, SIZE, 3) and view.dtype == np.uint8
    for grid, (r, c) in zip(maps, cells):
        assert np.unravel_index(np.argmax(grid), grid.shape) == (r, c)
        heat = upsample_map(grid, view.shape[:2])
        y, x = np.unravel_index(np.argmax(heat), heat.shape)
        assert (r * CELL <= y < (r + 1) * CELL) and (c * CELL <= x < (c + 1) * CELL)
    # a plain texture of the normal class is cooler everywhere than the defects' hottest patches
    _, plain = predictor.predict_with_maps([store["path"].parent / "img" / "a" / "00.png"])
    assert plain.max() < maps.reshape(6, -1).max(axis=1).min()


def test_gallery_escapes_paths_and_lists_failures(store, tmp_path):
    odd = tmp_path / "<script>alert(1)<"
    odd.mkdir()
    paths, _ = _defect_images(odd / "script>", 1, seed=1)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    code = main(["predict", "--detector", str(store["bundle"]), paths[0], str(tmp_path / "broken.png"),
                 "--out", str(tmp_path / "s.csv"), "--heatmaps", str(tmp_path / "maps"), "--quiet"])
    assert code == 0
    page = (tmp_path / "maps" / GALLERY_FILE).read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "not scored" in page and "broken.png" in page and "cannot decode" in page
    assert page.count("data:image/png;base64,") == 1
    frame = pd.read_csv(tmp_path / "s.csv", keep_default_na=False)
    assert frame["heatmap"].tolist()[1] == "" and frame["heatmap"].iloc[0].endswith(".png")
    # the page as a function: every row, one scale stated
    table = pd.DataFrame({"path": ["low.png", "gone.png", "high.png"], "score": [1.0, np.nan, 2.0],
                          "decision": ["normal", "", "anomaly"], "error": ["", "no such file or folder", ""]})
    html = gallery_html(table, ["a.png", "", "b.png"], ["data:image/png;base64,AAAA", "", "data:image/png;base64,BBBB"],
                        colour_scale(np.array([[1.0, np.nan, 3.0]])))
    assert "[1, 3]" in html and html.count("<figure") == 3
    assert html.index("high.png") < html.index("low.png") < html.index("gone.png")


def test_heatmaps_need_a_patch_bundle(store, tmp_path, capsys):
    knn = tmp_path / "knn"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_detector(store["path"], store["task"], knn, candidate=NAME)
    image = str(store["path"].parent / "img" / "a" / "00.png")
    assert main(["predict", "--detector", str(knn), image, "--heatmaps", str(tmp_path / "m"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "heat maps need a patch-level detector bundle" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(BundleError, match="whose score has no spatial map"):
        Predictor.load(knn).predict_with_maps([image])
    assert main(["predict", "--detector", str(store["bundle"]), image, "--heatmap-alpha", "2", "--quiet"]) == 1
    assert "--heatmap-alpha must be between 0 and 1, got 2.0" in capsys.readouterr().err


def test_patch_score_maps_equal_a_naive_loop_with_ties():
    rng = np.random.default_rng(3)
    queries = rng.integers(-2, 3, size=(5, 6, 4)).astype(np.float16)  # integer values: many tied distances
    references = np.concatenate([rng.integers(-2, 3, size=(7, 4)), queries[0, :2].astype(int)]).astype(np.float16)
    naive = np.array([[min(float(((q.astype(float) - r.astype(float)) ** 2).sum()) for r in references) for q in image]
                      for image in queries])
    got = patch_score_maps(queries, references, block_bytes=64)  # tiny blocks: several per call
    np.testing.assert_array_equal(got, naive)
    assert got[0, 0] == got[0, 1] == 0.0  # a patch that is a reference
    with pytest.raises(ValueError, match="references have D=3 but queries have D=4"):
        patch_score_maps(queries, references[:, :3])
    with pytest.raises(ValueError, match="at least one reference patch"):
        patch_score_maps(queries, references[:0])


def test_overlay_blends_the_colour_map_over_the_view():
    view = np.full((32, 32, 3), 200, dtype=np.uint8)
    grid = np.array([[0.0, 1.0], [0.0, 0.0]])
    assert (overlay_heatmap(view, grid, (0.0, 1.0), alpha=0.0) == 200).all()  # enlarged to 224, unchanged
    full = overlay_heatmap(view, grid, (0.0, 1.0), alpha=1.0)
    assert full.shape == (224, 224, 3)
    heat = upsample_map(grid, (224, 224))  # bilinear: a cell's value at its centre (between pixels 55 and 56)
    assert heat[55:57, 167:169].min() > 0.99 and heat[168, 56] == pytest.approx(0.0)
    assert np.unravel_index(np.argmax(heat), heat.shape)[0] < 112 <= np.unravel_index(np.argmax(heat), heat.shape)[1]
    hot = (np.asarray(matplotlib.colormaps[HEATMAP_COLORMAP](float(heat[56, 168]))[:3]) * 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(full[56, 168], hot)  # alpha 1: the colour of the map's value alone
    assert heatmap_name(7, "/x/<b> a.PNG") == "00007_b_a.png"
    with pytest.raises(ValueError, match="alpha must be in \\[0, 1\\]"):
        overlay_heatmap(view, grid, (0.0, 1.0), alpha=1.5)
