"""Perlin-noise anomalies: mask geometry, unchanged pixels outside the mask, determinism,
texture-folder and self-texture modes, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from swsa_store.synth import create_generator, generator_rng, list_generators
from swsa_store.synth.perlin import (
    PerlinConfig,
    PerlinGenerator,
    list_textures,
    perlin_anomaly,
    perlin_mask,
    perlin_noise,
)


def _image(width: int = 48, height: int = 40, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    arr = np.stack([(xx * 5) % 256, (yy * 6) % 256, ((xx + yy) * 3) % 256], -1)
    arr = (arr + rng.integers(0, 20, arr.shape)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr, mode="RGB")


@pytest.fixture()
def texture_dir(tmp_path):
    root = tmp_path / "dtd"
    (root / "banded").mkdir(parents=True)
    (root / "dotted").mkdir()
    Image.new("RGB", (30, 20), (250, 10, 10)).save(root / "banded" / "b1.jpg")
    Image.new("RGB", (64, 64), (10, 250, 10)).save(root / "dotted" / "d1.png")
    Image.new("L", (10, 10), 128).save(root / "dotted" / "gray.png")
    (root / "notes.txt").write_text("not an image")
    return root


def test_registered():
    assert "perlin" in list_generators()
    assert isinstance(create_generator("perlin"), PerlinGenerator)


def test_noise_is_bounded_and_smooth():
    rng = np.random.default_rng(0)
    noise = perlin_noise((64, 80), (4, 2), rng, angle=30.0)
    assert noise.shape == (64, 80) and np.isfinite(noise).all()
    assert np.abs(noise).max() <= 1.0 + 1e-9 and noise.std() > 0.05
    # gradient noise is continuous: neighbouring pixels differ by far less than the range
    assert np.abs(np.diff(noise, axis=1)).max() < 0.2


@pytest.mark.parametrize("shape", [(8, 8), (40, 48), (64, 64), (37, 101)])
def test_mask_coverage_within_range_over_many_draws(shape):
    config = PerlinConfig(coverage=(0.03, 0.3))
    rng = np.random.default_rng(123)
    for _ in range(200):
        mask, params = perlin_mask(shape, rng, config)
        assert mask.shape == shape and mask.dtype == bool
        assert 0.03 <= mask.mean() <= 0.3
        assert params["coverage"] == pytest.approx(mask.mean())
        assert 1 <= params["tries"] <= config.max_tries
        for drawn, used, side in zip(params["scales"], params["cells"], shape):
            assert drawn in (1, 2, 4, 8, 16, 32) and used == min(drawn, max(1, side // 4))  # cells >= 4 px
        assert -90.0 <= params["angle"] <= 90.0


def test_scales_and_rotation_follow_config():
    config = PerlinConfig(scale_range=(4, 8), rotation=(0.0, 0.0), coverage=(0.001, 1.0))
    rng = np.random.default_rng(5)
    seen = set()
    for _ in range(100):
        _, params = perlin_mask((64, 64), rng, config)
        seen.update(params["scales"])
        assert params["angle"] == 0.0
    assert seen == {4, 8}


def test_pixels_outside_the_mask_are_unchanged():
    image = _image()
    before = np.asarray(image).copy()
    rng = np.random.default_rng(7)
    for _ in range(30):
        out, mask, params = perlin_anomaly(image, rng)
        arr = np.asarray(out)
        assert out.mode == "RGB" and out.size == image.size
        np.testing.assert_array_equal(arr[~mask], before[~mask])
        assert params["coverage"] == pytest.approx(mask.mean())
        json.dumps(params, allow_nan=False)
    np.testing.assert_array_equal(np.asarray(image), before)  # the input is not modified


def test_full_blend_with_a_texture_replaces_the_masked_pixels(texture_dir):
    config = PerlinConfig(texture_dir=str(texture_dir), blend=(1.0, 1.0))
    names = list_textures(texture_dir)
    assert names == ("banded/b1.jpg", "dotted/d1.png", "dotted/gray.png")
    rng = np.random.default_rng(1)
    image = _image()
    for _ in range(10):
        out, mask, params = perlin_anomaly(image, rng, config, names)
        texture = np.asarray(Image.open(texture_dir / params["texture"]).convert("RGB").resize(image.size, Image.Resampling.BILINEAR))
        np.testing.assert_array_equal(np.asarray(out)[mask], texture[mask])
        assert params["blend"] == 1.0 and params["texture"] in names


def test_generator_is_deterministic_and_records_params():
    seeds, ids = [_image(seed=0), _image(seed=1), _image(32, 32, seed=2)], [10, 11, 12]
    gen = create_generator("perlin")
    a = gen.generate(seeds, ids, 12, generator_rng(0, 3, "perlin"))
    b = create_generator("perlin").generate(seeds, ids, 12, generator_rng(0, 3, "perlin"))
    c = gen.generate(seeds, ids, 12, generator_rng(0, 4, "perlin"))
    assert len(a) == 12
    for x, y in zip(a, b):
        assert x.params == y.params and x.parent_ids == y.parent_ids
        np.testing.assert_array_equal(np.asarray(x.image), np.asarray(y.image))
    assert any(not np.array_equal(np.asarray(x.image), np.asarray(z.image)) for x, z in zip(a, c))
    for item in a:
        assert item.parent_ids[0] in ids
        assert item.image.size == seeds[ids.index(item.parent_ids[0])].size
        p = item.params
        assert p["texture"] == "self" and sorted(p["permutation"]) == list(range(16))
        assert 0.2 <= p["blend"] <= 1.0 and p["threshold"] == 0.5 and 0.01 <= p["coverage"] <= 0.5
        assert {"scales", "cells", "angle", "tries", "jitter", "shuffle_grid"} <= set(p)
    assert len({json.dumps(x.params, sort_keys=True) for x in a}) == 12


def test_self_texture_is_a_shuffled_copy():
    image = Image.fromarray(np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3) % 251, mode="RGB")
    config = PerlinConfig(jitter=0.0, blend=(1.0, 1.0), shuffle_grid=2, coverage=(0.001, 1.0))
    rng = np.random.default_rng(3)
    out, mask, params = perlin_anomaly(image, rng, config)
    src = np.asarray(image)
    tiles = [src[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] for r in range(2) for c in range(2)]
    expected = np.concatenate([np.concatenate([tiles[params["permutation"][r * 2 + c]] for c in range(2)], axis=1)
                               for r in range(2)], axis=0)
    assert params["permutation"] != [0, 1, 2, 3]
    np.testing.assert_array_equal(np.asarray(out)[mask], expected[mask])


def test_texture_folder_mode_in_generator(texture_dir):
    gen = create_generator("perlin", texture_dir=str(texture_dir))
    assert gen.describe()["n_textures"] == 3
    out = gen.generate([_image()], [0], 20, generator_rng(1, 0, "perlin"))
    assert {o.params["texture"] for o in out} <= set(gen.textures)
    assert len({o.params["texture"] for o in out}) > 1


def test_synthesize_writes_perlin_rows(tmp_path):
    from swsa_store import open_store
    from swsa_store.catalog import catalog_dataset
    from swsa_store.synthesize import synthesize

    store = tmp_path / "s.h5"
    catalog_dataset(store, "digits", image_dir=tmp_path / "img", image_size=16, n_seed=4)
    summary = synthesize(store, "perlin", count=3, progress=False)
    assert summary["source"] == "perlin" and summary["images"] == 30
    with open_store(store) as s:
        rows = s.images()
    rows = rows[rows["kind"] == "perlin"]
    assert len(rows) == 30 and rows["task_id"].nunique() == 10
    params = json.loads(rows["params"].iloc[0])
    assert params["generator"] == "perlin" and "coverage" in params and "blend" in params
    assert synthesize(store, "perlin", count=3, progress=False)["images"] == 0  # resumable / idempotent


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scale_range": (1, 3)}, "powers of two"),
        ({"scale_range": (8, 2)}, "scale_range"),
        ({"threshold": 1.5}, "threshold"),
        ({"blend": (0.0, 0.5)}, "blend"),
        ({"blend": (0.5, 1.2)}, "blend"),
        ({"coverage": (0.5, 0.1)}, "coverage"),
        ({"max_tries": 0}, "max_tries"),
        ({"shuffle_grid": 0}, "shuffle_grid"),
        ({"jitter": 0.9}, "jitter"),
        ({"rotation": "no"}, "rotation"),
        ({"shuffle_grid": 1, "jitter": 0.0},
         r"^PerlinConfig.shuffle_grid=1 with jitter=0 and no texture_dir makes the texture the seed image itself, "
         r"so every output equals its parent; set shuffle_grid >= 2, jitter > 0 or a texture_dir$"),
    ],
)
def test_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PerlinConfig(**kwargs)


def test_no_op_refusal_needs_all_three_settings(tmp_path):
    PerlinConfig(shuffle_grid=1, jitter=0.1)  # jittered self texture: changes the image
    PerlinConfig(shuffle_grid=2, jitter=0.0)  # shuffled tiles: changes the image
    PerlinConfig(shuffle_grid=1, jitter=0.0, texture_dir=str(tmp_path))  # a texture folder: changes it


def test_cells_scale_with_the_image_side():
    from swsa_store.synth.perlin import MIN_CELL_PX

    rng = np.random.default_rng(2)
    for side, most in ((32, 8), (64, 16), (128, 32), (300, 32)):
        cells = set()
        for _ in range(60):
            _, params = perlin_mask((side, side), rng, PerlinConfig(coverage=(0.001, 1.0)))
            cells.update(params["cells"])
        assert max(cells) == most and side / max(cells) >= MIN_CELL_PX  # the DRAEM range from 128 px up


def test_other_errors(tmp_path):
    with pytest.raises(TypeError, match="unknown \\['variant'\\]"):
        create_generator("perlin", variant="scar")
    with pytest.raises(ValueError, match="does not exist"):
        create_generator("perlin", texture_dir=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        create_generator("perlin", texture_dir=str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png")
    gen = create_generator("perlin", texture_dir=str(bad))
    with pytest.raises(ValueError, match="cannot read texture image .*broken.png"):
        gen.generate([_image()], [0], 1, np.random.default_rng(0))
    # a coverage the threshold cannot reach: a clear error after max_tries
    impossible = PerlinConfig(threshold=0.95, coverage=(0.5, 0.6), max_tries=5)
    with pytest.raises(ValueError, match="could not draw a Perlin mask .* in 5 tries"):
        perlin_mask((32, 32), np.random.default_rng(0), impossible)
    with pytest.raises(ValueError, match="at least 8x8"):
        perlin_anomaly(Image.new("RGB", (4, 30)), np.random.default_rng(0))
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        create_generator("perlin").generate([_image()], [0], 1, rng=0)
