"""CutPaste generator and the anomaly-generator extension point (fast, CPU only)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from swsa_store.registry import UnknownNameError
from swsa_store.synth import (
    AnomalyGenerator,
    SyntheticImage,
    create_generator,
    generator_rng,
    list_generators,
)
from swsa_store.synth.cutpaste import CutPasteConfig, CutPasteGenerator, color_jitter, cutpaste

REPO = Path(__file__).resolve().parents[1]


def noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


def changed_mask(before: Image.Image, after: Image.Image) -> np.ndarray:
    a = np.asarray(before.convert("RGB"), dtype=np.int16)
    b = np.asarray(after, dtype=np.int16)
    return np.any(a != b, axis=-1)


def assert_box_inside(box, width, height):
    x0, y0, x1, y1 = box
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, (box, width, height)


# --------------------------------------------------------------------------- normal variant

@pytest.mark.parametrize("size", [(64, 48), (40, 120), (8, 8), (256, 256)])
def test_normal_geometry_over_many_draws(size):
    width, height = size
    img = noise_image(width, height, seed=1)
    rng = np.random.default_rng(123)
    cfg = CutPasteConfig()
    n = 30 if size == (256, 256) else 150
    for _ in range(n):
        out, p = cutpaste(img, rng, cfg)
        json.dumps(p, allow_nan=False)
        assert out.size == img.size and out.mode == "RGB"
        assert p["variant"] == "normal" and p["image_size"] == [width, height]
        pw, ph = p["patch_size"]
        # drawn values inside the paper's ranges
        assert 0.02 <= p["area_ratio_drawn"] <= 0.15
        assert 0.3 <= p["aspect_ratio_drawn"] <= 3.3
        # w, h are the rounded sqrt(area*aspect), sqrt(area/aspect), clipped to the image
        area = p["area_ratio_drawn"] * width * height
        assert pw == min(max(round(math.sqrt(area * p["aspect_ratio_drawn"])), 1), width)
        assert ph == min(max(round(math.sqrt(area / p["aspect_ratio_drawn"])), 1), height)
        assert p["area_ratio"] == pytest.approx(pw * ph / (width * height))
        assert p["aspect_ratio"] == pytest.approx(pw / ph)
        # actual area ratio and aspect within range up to rounding of w and h by 0.5 px
        if pw < width and ph < height:  # not clipped
            assert (pw - 0.5) * (ph - 0.5) <= 0.15 * width * height + 1e-9
            assert (pw + 0.5) * (ph + 0.5) >= 0.02 * width * height - 1e-9
            assert (pw - 0.5) / (ph + 0.5) <= 3.3 + 1e-9
            assert (pw + 0.5) / max(ph - 0.5, 1e-9) >= 0.3 - 1e-9
        # both boxes fully inside the image, same size as the patch
        for key in ("src_box", "dst_box"):
            assert_box_inside(p[key], width, height)
            x0, y0, x1, y1 = p[key]
            assert (x1 - x0, y1 - y0) == (pw, ph)
        # only the destination box changed
        changed = changed_mask(img, out)
        x0, y0, x1, y1 = p["dst_box"]
        outside = changed.copy()
        outside[y0:y1, x0:x1] = False
        assert not outside.any()
        if p["src_box"] != p["dst_box"] and size != (8, 8):
            assert changed[y0:y1, x0:x1].any()


def test_normal_pasted_patch_is_the_jittered_source():
    img = noise_image(80, 60, seed=2)
    for seed in range(5):
        out, p = cutpaste(img, np.random.default_rng(seed), CutPasteConfig(jitter=0.0))
        sx0, sy0, sx1, sy1 = p["src_box"]
        dx0, dy0, dx1, dy1 = p["dst_box"]
        src = np.asarray(img)[sy0:sy1, sx0:sx1].astype(int)
        dst = np.asarray(out)[dy0:dy1, dx0:dx1].astype(int)
        # jitter 0: factors are identities; hue 0 round-trips through HSV (tiny error at most)
        assert np.abs(src - dst).max() <= 8


def test_input_not_modified_and_converted_to_rgb():
    for mode in ("L", "RGBA", "RGB"):
        img = noise_image(32, 24, seed=3, mode=mode)
        before = img.tobytes()
        out, _ = cutpaste(img, np.random.default_rng(0))
        assert img.tobytes() == before and img.mode == mode
        assert out.mode == "RGB" and out.size == (32, 24)
        assert out is not img


# --------------------------------------------------------------------------- scar variant

@pytest.mark.parametrize("size", [(256, 256), (200, 128), (300, 512), (16, 9)])
def test_scar_geometry_over_many_draws(size):
    width, height = size
    img = noise_image(width, height, seed=4)
    cfg = CutPasteConfig(variant="scar")
    side = min(width, height)
    scale = side / 256
    # the paper's px at 256 px as fractions of the shorter side, floored at 2 px (width) / 5 px (length)
    w_lo, w_hi = max(2 * scale, 2), max(16 * scale, 2)
    l_lo, l_hi = max(10 * scale, 5), max(25 * scale, 5)
    rng = np.random.default_rng(7)
    angles = []
    for _ in range(60):
        out, p = cutpaste(img, rng, cfg)
        json.dumps(p, allow_nan=False)
        assert p["variant"] == "scar" and p["side"] == side
        assert p["width_range_px"] == pytest.approx([w_lo, w_hi]) and p["length_range_px"] == pytest.approx([l_lo, l_hi])
        pw, ph = p["patch_size"]
        assert round(w_lo) <= pw <= min(round(w_hi), width)
        assert round(l_lo) <= ph <= min(round(l_hi), height)
        assert -45 <= p["angle"] <= 45
        angles.append(p["angle"])
        assert_box_inside(p["src_box"], width, height)
        assert_box_inside(p["dst_box"], width, height)
        x0, y0, x1, y1 = p["dst_box"]
        rw, rh = p["rotated_size"]
        assert (x1 - x0, y1 - y0) == (rw, rh)
        # expand=True bounding box of a w x h rectangle rotated by the angle (+ rounding)
        t = math.radians(p["angle"])
        assert rw <= math.ceil(abs(pw * math.cos(t)) + abs(ph * math.sin(t))) + 2
        assert rh <= math.ceil(abs(pw * math.sin(t)) + abs(ph * math.cos(t))) + 2
        assert rw >= pw - 1 or rh >= ph - 1
        changed = changed_mask(img, out)
        outside = changed.copy()
        outside[y0:y1, x0:x1] = False
        assert not outside.any()
    assert min(angles) < -20 and max(angles) > 20  # the whole range is used


def test_scar_custom_ranges_scale_with_shorter_side():
    img = noise_image(512, 384, seed=5)  # shorter side 384
    cfg = CutPasteConfig(variant="scar", scar_width=(10 / 256, 10 / 256), scar_length=(20 / 256, 20 / 256),
                         scar_rotation=(0, 0))
    out, p = cutpaste(img, np.random.default_rng(0), cfg)
    assert p["patch_size"] == [15, 30]
    assert p["rotated_size"] == [15, 30] and p["angle"] == 0.0


@pytest.mark.parametrize("side, width_px, length_px", [
    (256, (2, 16), (10, 25)),        # the paper's resolution: exactly the paper's px
    (512, (4, 32), (20, 50)),        # twice the side, twice the px
    (64, (2, 4), (5, 6.25)),         # floors lift the low ends
    (32, (2, 2), (5, 5)),            # everything at the floors: a visible 2 x 5 px scar
])
def test_scar_size_is_a_fraction_of_the_side_with_pixel_floors(side, width_px, length_px):
    from swsa_store.synth.cutpaste import scar_ranges_px

    got_w, got_l = scar_ranges_px(side, CutPasteConfig(variant="scar"))
    assert got_w == pytest.approx(width_px) and got_l == pytest.approx(length_px)
    img = noise_image(side, side, seed=9)
    rng = np.random.default_rng(3)
    sizes = np.array([cutpaste(img, rng, CutPasteConfig(variant="scar"))[1]["patch_size"] for _ in range(80)])
    assert sizes[:, 0].min() >= round(width_px[0]) and sizes[:, 0].max() <= round(width_px[1])
    assert sizes[:, 1].min() >= round(length_px[0]) and sizes[:, 1].max() <= round(length_px[1])


def test_oversized_scar_is_cropped_to_fit():
    img = noise_image(16, 16, seed=6)
    cfg = CutPasteConfig(variant="scar", scar_width=(0.9, 1.0), scar_length=(1.0, 1.0), scar_rotation=(30, 45))
    for seed in range(10):
        out, p = cutpaste(img, np.random.default_rng(seed), cfg)
        assert_box_inside(p["dst_box"], 16, 16)
        assert out.size == (16, 16)


# --------------------------------------------------------------------------- colour jitter

def test_jitter_factors_within_ranges_and_order_is_a_permutation():
    import torch

    torch.manual_seed(0)
    torch_state = torch.get_rng_state()
    np_state = np.random.get_state()[1].copy()
    patch = noise_image(12, 10, seed=7)
    rng = np.random.default_rng(11)
    orders = set()
    for _ in range(200):
        _, j = color_jitter(patch, rng, 0.1)
        assert sorted(j["order"]) == ["brightness", "contrast", "hue", "saturation"]
        orders.add(tuple(j["order"]))
        for key in ("brightness", "contrast", "saturation"):
            assert 0.9 <= j[key] <= 1.1
        assert -0.1 <= j["hue"] <= 0.1
    assert len(orders) > 10  # random order, not fixed
    # never touches torch's or numpy's global RNG
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state)


def test_jitter_params_recorded_by_cutpaste():
    img = noise_image(64, 64, seed=8)
    _, p = cutpaste(img, np.random.default_rng(1), CutPasteConfig(jitter=0.05))
    j = p["jitter"]
    assert 0.95 <= j["brightness"] <= 1.05 and -0.05 <= j["hue"] <= 0.05
    assert len(j["order"]) == 4


# --------------------------------------------------------------------------- determinism

def test_same_seed_gives_identical_bytes_and_params():
    seeds = [noise_image(48, 40, seed=s) for s in range(3)]
    for variant in ("normal", "scar"):
        gen = create_generator("cutpaste", variant=variant)
        a = gen.generate(seeds, [10, 11, 12], 8, np.random.default_rng(99))
        b = gen.generate(seeds, [10, 11, 12], 8, np.random.default_rng(99))
        assert [s.image.tobytes() for s in a] == [s.image.tobytes() for s in b]
        assert [s.params for s in a] == [s.params for s in b]
        assert [s.parent_ids for s in a] == [s.parent_ids for s in b]


def test_different_tasks_give_different_outputs():
    seeds = [noise_image(48, 40, seed=s) for s in range(3)]
    gen = create_generator("cutpaste")
    outs = [
        gen.generate(seeds, [0, 1, 2], 4, generator_rng(0, task, "cutpaste"))
        for task in (0, 1)
    ]
    assert [s.params for s in outs[0]] != [s.params for s in outs[1]]
    assert [s.image.tobytes() for s in outs[0]] != [s.image.tobytes() for s in outs[1]]


def test_generator_rng_matches_seedsequence_recipe():
    for base, task, name in [(0, 0, "cutpaste"), (7, 3, "cutpaste"), (2024, 328, "diffstyle")]:
        expected_seq = np.random.SeedSequence(
            entropy=base, spawn_key=(task, zlib.crc32(name.encode("utf-8")))
        )
        expected = np.random.default_rng(expected_seq).integers(0, 2**32, size=8)
        assert np.array_equal(generator_rng(base, task, name).integers(0, 2**32, size=8), expected)


def test_generator_rng_streams_are_distinct():
    draw = lambda *a: tuple(generator_rng(*a).integers(0, 2**62, size=4))  # noqa: E731
    keys = [(0, 0, "cutpaste"), (0, 1, "cutpaste"), (1, 0, "cutpaste"), (0, 0, "diffstyle")]
    assert len({draw(*k) for k in keys}) == len(keys)
    assert draw(5, 6, "cutpaste") == draw(5, 6, "cutpaste")


def test_generator_rng_independent_of_python_hash_seed():
    code = (
        "from swsa_store.synth import generator_rng;"
        "print(list(generator_rng(3, 9, 'cutpaste').integers(0, 2**32, size=4)))"
    )
    results = set()
    for hash_seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO)}
        proc = subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True
        )
        results.add(proc.stdout.strip())
    here = str(list(generator_rng(3, 9, "cutpaste").integers(0, 2**32, size=4)))
    assert results == {here}


@pytest.mark.parametrize(
    "args, match",
    [((-1, 0, "cutpaste"), "base_seed"), ((0, -2, "cutpaste"), "task_id"), ((0, 0, ""), "generator_name")],
)
def test_generator_rng_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        generator_rng(*args)


# --------------------------------------------------------------------------- generator / registry

def test_generate_outputs_follow_contract():
    seeds = [noise_image(40, 30, seed=1), noise_image(24, 56, seed=2, mode="L"), noise_image(33, 33, seed=3)]
    ids = [101, 205, 309]
    gen = create_generator("cutpaste")
    assert isinstance(gen, AnomalyGenerator) and isinstance(gen, CutPasteGenerator)
    assert gen.name == "cutpaste"
    json.dumps(gen.describe())
    out = gen.generate(seeds, ids, 60, np.random.default_rng(0))
    assert len(out) == 60
    assert {s.parent_ids for s in out} == {(i,) for i in ids}  # all seeds get picked
    size_of = dict(zip(ids, (s.size for s in seeds)))
    for s in out:
        assert isinstance(s, SyntheticImage)
        assert s.image.mode == "RGB" and s.image.size == size_of[s.parent_ids[0]]
        json.dumps(s.params, allow_nan=False)
    assert gen.generate(seeds, ids, 0, np.random.default_rng(0)) == []


def test_registry():
    assert "cutpaste" in list_generators()
    assert isinstance(create_generator("cutpaste"), CutPasteGenerator)
    assert create_generator("cutpaste", variant="scar").config.variant == "scar"
    cfg = CutPasteConfig(jitter=0.2)
    assert create_generator("cutpaste", config=cfg).config is cfg
    with pytest.raises(UnknownNameError, match=r"cutpast.*Did you mean 'cutpaste'.*Valid names: .*cutpaste"):
        create_generator("cutpast")
    with pytest.raises(KeyError):
        create_generator("no-such-generator")
    with pytest.raises(TypeError, match="unknown \\['scar_widht'\\]"):
        create_generator("cutpaste", scar_widht=(1, 2))


def test_synthetic_image_validates_params():
    img = noise_image(8, 8)
    s = SyntheticImage(img, [np.int64(3)], {"a": [1, 2.5, "x"]})
    assert s.parent_ids == (3,) and type(s.parent_ids[0]) is int
    with pytest.raises(ValueError, match="JSON-serialisable"):
        SyntheticImage(img, (1,), {"a": np.float32(1.0)})
    with pytest.raises(AttributeError):
        s.params = {}  # frozen


# --------------------------------------------------------------------------- errors

def test_generate_errors():
    gen = create_generator("cutpaste")
    rng = np.random.default_rng(0)
    ok = [noise_image(16, 16)]
    with pytest.raises(ValueError, match=r"expected count to be a non-negative integer, got -1; fix"):
        gen.generate(ok, [0], -1, rng)
    with pytest.raises(ValueError, match=r"expected at least one seed image, got 0; fix"):
        gen.generate([], [], 5, rng)
    with pytest.raises(ValueError, match=r"expected seed images at least 8x8 px, got 7x20 for image id 4; fix"):
        gen.generate([noise_image(16, 16), noise_image(7, 20)], [3, 4], 1, rng)
    with pytest.raises(ValueError, match=r"expected one seed id per seed image, got 2 ids for 1 images"):
        gen.generate(ok, [0, 1], 1, rng)
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        gen.generate(ok, [0], 1, 42)


def test_cutpaste_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"expected an image at least 8x8 px, got 20x5; fix"):
        cutpaste(noise_image(20, 5), rng)
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        cutpaste(noise_image(20, 20), np.random.RandomState(0))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"variant": "foo"}, r"expected CutPasteConfig.variant in \['normal', 'scar'\], got 'foo'"),
        ({"area_ratio": (0.2, 0.1)}, r"CutPasteConfig.area_ratio .* got \(0.2, 0.1\); fix"),
        ({"area_ratio": (0.0, 0.1)}, r"CutPasteConfig.area_ratio"),
        ({"aspect_ratio": (0.3,)}, r"expected CutPasteConfig.aspect_ratio to be a \(min, max\) pair"),
        ({"jitter": 0.7}, r"expected CutPasteConfig.jitter in \[0, 0.5\].*got 0.7; fix"),
        ({"scar_width": (-1, 3)}, r"CutPasteConfig.scar_width"),
        ({"scar_width": (2, 16)}, r"expected CutPasteConfig.scar_width = \(min, max\) fractions of the image's "
                                  r"shorter side in \(0, 1\], got \(2, 16\) \(the paper's px at 256 px divided"),
        ({"scar_length": (0.1, 0.05)}, r"CutPasteConfig.scar_length = \(min, max\) fractions"),
        ({"scar_min_px": (-1, 5)}, r"CutPasteConfig.scar_min_px"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CutPasteConfig(**kwargs)


def test_config_is_frozen_and_serialisable():
    cfg = CutPasteConfig()
    assert cfg.area_ratio == (0.02, 0.15) and cfg.aspect_ratio == (0.3, 3.3) and cfg.jitter == 0.1
    assert cfg.scar_width == (2 / 256, 16 / 256) and cfg.scar_length == (10 / 256, 25 / 256)
    assert cfg.scar_min_px == (2.0, 5.0)
    assert cfg.scar_rotation == (-45.0, 45.0)
    assert json.loads(json.dumps(cfg.to_dict()))["area_ratio"] == [0.02, 0.15]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.jitter = 0.3  # type: ignore[misc]
