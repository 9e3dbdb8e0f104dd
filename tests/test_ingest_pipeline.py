"""The local ingest runner (swsa_store.ingest_pipeline): its embeddings are bit-identical to the plain
path (PIL decode, the backbone's transform per image, torch.stack, forward) on real files; the batched
preprocessing equals the transform for every pixel value; decoding threads keep truncated files refused
and wait for CPU forward passes; failures propagate without a hang."""

from __future__ import annotations

import shutil
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torchvision import transforms

from swsa_store import ingest_pipeline, open_store
from swsa_store.catalog import make_ingest_catalog, resolve_path
from swsa_store.ingest import embed_store, embedding_name, fixed_batches, run_ingest
from swsa_store.ingest_pipeline import ImageReader, PixelPlan, pixel_plan
from swsa_store.models.backbones import create_backbone
from swsa_store.samples import ImageReadError, decode_rgb, read_image
from swsa_store.schema import DONE_TODO, DONE_WRITTEN

from fixtures_photos import photo_store

#: (backbone, create_backbone keywords): a real ImageNet model with its package's mean/std at 224 px,
#: a timm model at 64 px (bicubic resize and crop), user overrides, raw pixels (no Normalize).
BACKBONES = [
    ("efficientnet_lite0", {}),
    ("timm/resnet10t", {"weights": "random", "image_size": 64}),
    ("timm/resnet10t", {"weights": "random", "preprocess": "size=40;interpolation=bilinear;crop_pct=1.0;"
                                                           "mean=0.5,0.25,0.125;std=0.2,0.3,0.7"}),
    ("pixels@12", {}),
]


def _quiet_backbone(name: str, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_backbone(name, **kwargs)


@pytest.fixture(scope="module")
def real_store(tmp_path_factory):
    """The two scikit-learn photos (RGB JPEG) and five ELPV solar cells (greyscale PNG), catalogued."""
    return photo_store(tmp_path_factory.mktemp("real"), 5)


def _plain_reference(store: Path, loaded, batch_size: int) -> np.ndarray:
    """The embeddings the plain way: PIL decode, the transform per image, torch.stack of each fixed
    batch, the model's forward pass — ``(N, D)`` float32, rows in image-id order."""
    with open_store(store) as s:
        images = s.images()
    usable = images.loc[images["status"] == "ok", "image_id"].to_numpy()
    rows = np.full((len(images), loaded.feature_dim), np.nan, dtype=np.float32)
    for batch in fixed_batches(usable, batch_size):
        pixels = [loaded.transform(Image.open(resolve_path(store, images["path"][i])).convert("RGB")) for i in batch]
        with torch.inference_mode():
            rows[batch] = loaded.model.eval()(torch.stack(pixels)).float().numpy()
    return rows


def _embedded(store: Path, name: str, **kwargs) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = embed_store(store, name, batch_size=3, progress=False, **kwargs)
    assert report.failed == 0 and report.written == report.total == 7
    with open_store(store) as s:
        return s.embeddings(embedding_name(name))


@pytest.mark.parametrize("name, kwargs", BACKBONES, ids=lambda v: v if isinstance(v, str) else "")
def test_embeddings_are_bit_identical_to_the_plain_path(real_store, tmp_path, name, kwargs):
    loaded = _quiet_backbone(name, **kwargs)
    assert pixel_plan(loaded.transform) is not None  # the batched path is the one under test
    expected = _plain_reference(real_store, loaded, batch_size=3)
    for workers in (0, 1):  # decoding threads; one DataLoader worker process
        store = tmp_path / f"w{workers}" / "s.h5"
        store.parent.mkdir()
        shutil.copy(real_store, store)
        got = _embedded(store, name, num_workers=workers, **kwargs)
        assert got.tobytes() == expected.tobytes(), f"{name} {kwargs}, {workers} workers: rows differ"


def _noise(shape, seed) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))


@pytest.mark.parametrize("name, kwargs", BACKBONES, ids=lambda v: v if isinstance(v, str) else "")
def test_plan_pixels_equal_the_transform_bit_for_bit(name, kwargs):
    transform = _quiet_backbone(name, **kwargs).transform
    plan = pixel_plan(transform)
    for seed, shape in enumerate([(256, 256, 3), (300, 200, 3), (73, 73, 3), (17, 500, 3)]):
        image = _noise(shape, seed)
        expected = transform(image).numpy()
        got = plan.pixels(image)
        assert got.dtype == np.float32 and got.flags.c_contiguous and got.shape == expected.shape
        assert got.tobytes() == expected.tobytes(), f"{name}: {shape}"


@pytest.mark.parametrize("mean, std", [((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ((127 / 255,), (128 / 255,)),
                                       ((0.5, 0.25, 0.1), (0.3, 1.7, 0.01)), (None, None)])
def test_every_pixel_value_in_every_channel_and_position_matches(mean, std):
    """ToTensor and Normalize done in numpy equal torchvision's for all 256 values of each channel,
    at many offsets (vectorised loops and their tails)."""
    steps = [transforms.ToTensor()] + ([transforms.Normalize(mean, std)] if mean is not None else [])
    transform = transforms.Compose(steps)
    plan = pixel_plan(transform)
    assert plan is not None and plan.pil_steps == ()
    for width in (1, 7, 16, 31, 256, 259):
        for shift in range(3):
            values = (np.arange(3 * 256 * width) * 7 + shift) % 256  # every value in every channel
            image = Image.fromarray(values.reshape(256, width, 3).astype(np.uint8))
            assert plan.pixels(image).tobytes() == transform(image).numpy().tobytes(), (width, shift)


def test_plan_refuses_transforms_it_cannot_split_and_keeps_non_rgb_images_exact():
    to_tensor, normalize = transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.2,) * 3)
    assert pixel_plan(lambda image: image) is None
    assert pixel_plan(transforms.Compose([transforms.Resize(8), normalize])) is None  # no ToTensor
    assert pixel_plan(transforms.Compose([to_tensor, normalize, transforms.Lambda(lambda x: x * 2)])) is None
    assert pixel_plan(transforms.Compose([to_tensor, transforms.Lambda(lambda x: x)])) is None
    assert pixel_plan(transforms.Compose([to_tensor, transforms.Normalize((0.5,) * 3, (0.0, 1.0, 1.0))])) is None
    grey = transforms.Compose([transforms.Grayscale(), transforms.ToTensor(), transforms.Normalize((0.5,), (0.25,))])
    plan = pixel_plan(grey)
    assert isinstance(plan, PixelPlan)
    image = _noise((20, 30, 3), 0)
    assert plan.pixels(image).tobytes() == grey(image).numpy().tobytes()  # an L image: the transform's own steps


def _jpeg_bytes(seed: int) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    _noise((64, 64, 3), seed).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_concurrent_decodes_refuse_truncated_files_and_restore_the_flag(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # the user's setting, restored after
    whole = [_jpeg_bytes(seed) for seed in range(8)]
    truncated = [data[: len(data) // 2] for data in whole]

    def decode(data):
        try:
            return decode_rgb(data).size
        except (OSError, SyntaxError, ValueError) as error:
            return type(error).__name__

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(decode, [d for pair in zip(whole, truncated) for d in pair] * 20))
    assert results[0::2] == [(64, 64)] * (len(results) // 2)
    assert all(isinstance(r, str) for r in results[1::2]), "a truncated file was padded while others decoded"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


class _SlowEmbedder:
    """Wraps an Embedder: each forward pass takes ``seconds`` longer and its span is recorded."""

    def __init__(self, embedder, seconds: float, fail_at: int | None = None):
        self.embedder, self.seconds, self.fail_at = embedder, seconds, fail_at
        self.device = embedder.device
        self.spans: list[tuple[float, float]] = []

    def __call__(self, batch):
        start = time.perf_counter()
        if self.fail_at is not None and len(self.spans) == self.fail_at:
            raise RuntimeError("forward pass failed on purpose")
        features = self.embedder(batch)
        time.sleep(self.seconds)
        self.spans.append((start, time.perf_counter()))
        return features


@pytest.mark.parametrize("spare_cores", [0, 1])
def test_decoders_use_only_the_cores_a_cpu_forward_pass_leaves(tmp_path, monkeypatch, spare_cores):
    """With no spare core no read starts during a forward pass (but one per thread let through just
    before the gate shut); with one spare core reads go on during forward passes."""
    monkeypatch.setattr(ingest_pipeline, "available_cores", lambda: torch.get_num_threads() + spare_cores)
    store = make_ingest_catalog(tmp_path, 24, source_size=32)
    starts: list[float] = []
    read = ImageReader.__getitem__

    def slow_read(self, index):  # a decode that takes 5 ms, so that reads pile up behind each forward pass
        starts.append(time.perf_counter())
        time.sleep(0.005)
        return read(self, index)

    monkeypatch.setattr(ImageReader, "__getitem__", slow_read)
    slow: list[_SlowEmbedder] = []

    def runner(reader, embedder, *args, **kwargs):
        slow.append(_SlowEmbedder(embedder, 0.05))
        return run_ingest(reader, slow[0], *args, decode_threads=2, **kwargs)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = embed_store(store, "timm/resnet10t", weights="random", image_size=32, batch_size=4, progress=False,
                             runner=runner)
    assert report.written == 24 and len(slow[0].spans) == 6 and len(starts) == 24
    inside = [sum(begin < t < end for t in starts) for begin, end in slow[0].spans]
    if spare_cores == 0:
        assert max(inside) <= 2, f"reads started during forward passes: {inside}"
    else:
        assert max(inside) > 2, f"the spare core did not decode during forward passes: {inside}"


def test_gate_lets_slots_decoders_work_during_a_forward_pass():
    gate = ingest_pipeline.ForwardGate(slots=1)
    entered = threading.Event()

    def decode():
        with gate.decoding():
            entered.set()

    with gate.decoding():  # one decoder at work when the forward pass starts
        with gate.forward():
            worker = threading.Thread(target=decode)
            worker.start()
            assert not entered.wait(0.1), "a second decoder started while the only slot was taken"
    assert entered.wait(5)  # the slot came free
    worker.join()
    with gate.forward():  # a free slot: a decoder starts during the forward pass
        entered.clear()
        decode()
        assert entered.is_set()
    assert ingest_pipeline.ForwardGate.for_device(torch.device("meta")).slots is None  # not the CPU: no limit


def test_a_failing_forward_pass_propagates_and_earlier_batches_stay_durable(real_store, tmp_path):
    store = tmp_path / "s.h5"
    shutil.copy(real_store, store)

    def runner(reader, embedder, *args, **kwargs):
        return run_ingest(reader, _SlowEmbedder(embedder, 0.0, fail_at=2), *args, **kwargs)

    with pytest.raises(RuntimeError, match="forward pass failed on purpose"):
        _embedded(store, "timm/resnet10t", weights="random", image_size=32, runner=runner)
    with open_store(store) as s:
        done = s.done_mask("timm-resnet10t")
    assert (done == DONE_WRITTEN).sum() == 6 and (done == DONE_TODO).sum() == 1  # batches 0 and 1 of 3 images
    left = [t.name for t in threading.enumerate() if t.name.startswith(("swsa-decode", "swsa-write"))]
    assert not left, f"threads of the runner still alive: {left}"


def test_unreadable_image_is_a_failure_value_with_a_plan(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(_jpeg_bytes(0)[:100])
    loaded = _quiet_backbone("timm/resnet10t", weights="random", image_size=32)
    reader = ImageReader([5], [str(bad)], loaded.transform, tmp_path).with_plan(pixel_plan(loaded.transform))
    image_id, pixels, reason = reader[0]
    assert image_id == 5 and pixels is None and reason.startswith("cannot decode image")
    with pytest.raises(ImageReadError, match="cannot decode image"):
        read_image(bad)


def test_bench_ingest_keeps_the_best_runs_and_computes_its_ceiling(tmp_path):
    from swsa_engine.app.bench_ingest import bench_ingest, format_ingest

    f = bench_ingest(tmp_path, n_images=12, source_size=40, image_size=32, batch_size=4, repeats=2)
    for key in ("forward", "pipeline"):
        assert len(f[key]["runs_images_per_s"]) == 2 and f[key]["images_per_s"] == max(f[key]["runs_images_per_s"])
    assert f["pipeline"]["written"] == 12
    assert f["ratio"] == pytest.approx(f["pipeline"]["images_per_s"] / f["forward"]["images_per_s"])
    forward_cpu, decode_cpu = f["forward"]["cpu_ms_per_image"], f["decode"]["cpu_ms_per_image"]
    assert forward_cpu > 0 and decode_cpu > 0
    assert f["forward_share"] == pytest.approx(forward_cpu / (forward_cpu + decode_cpu))
    forward_wall_ms = 1e3 * f["forward"]["seconds"] / 12
    assert f["ceiling"] == pytest.approx(min(1.0, f["cores"] * forward_wall_ms / (forward_cpu + decode_cpu)))
    text = format_ingest(f)
    assert "best of 2 alternating runs" in text and f"ceiling on {f['cores']} cores" in text
    with pytest.raises(ValueError, match="repeats must be at least 1, got 0"):
        bench_ingest(tmp_path / "none", n_images=4, repeats=0)
