"""Patch tokens (swsa embed --patch-tokens) and the patch-level residual detector.

Embedding: a tiny random ViT and a tiny ResNet store (N, P, D') float16 tokens with
self-describing attrs; pooled rows are unchanged by --patch-tokens; an interrupted run resumes
to the same bytes. Detector: equal to an explicit per-task numpy loop (float64 brute force) to
1e-9 relative, leave-one-out included; its bad settings give one-line errors.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from swsa_engine.app.cli import main
from swsa_engine.core.detectors import PatchDetector, create_detector, list_detectors, parse_detector, patch_cost
from swsa_engine.run.patch_features import load_patch_features
from swsa_store import StoreError, open_store
from swsa_store.catalog import catalog_dataset
from swsa_store.ingest import embed_store
from swsa_store.schema import DONE_WRITTEN

VIT, VIT_NAME = "timm/vit_tiny_patch16_224", "timm-vit_tiny_patch16_224"
CNN, CNN_NAME = "timm/resnet10t", "timm-resnet10t"


def _embed(store, backbone, **kw):
    kw = {"weights": "random", "image_size": 32, "batch_size": 8, "progress": False, **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return embed_store(store, backbone, **kw)


@pytest.fixture(scope="module")
def toy_store(tmp_path_factory) -> Path:
    """A store of 24 small images (3 classes x 8), catalogued, not embedded."""
    root = tmp_path_factory.mktemp("toy")
    rng = np.random.default_rng(0)
    for c, name in enumerate("abc"):
        (root / "img" / name).mkdir(parents=True)
        for i in range(8):
            pixels = (rng.random((24, 24, 3)) * 60 + 60 * c).astype(np.uint8)
            Image.fromarray(pixels).save(root / "img" / name / f"{i:02d}.png")
    catalog_dataset(root / "s.h5", "folder", root=root / "img", name="toy", n_seed=2)
    return root / "s.h5"


def _copy(src: Path, dst_dir: Path) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / "s.h5"
    dst.write_bytes(src.read_bytes())
    return dst


# --------------------------------------------------------------------------- embedding


@pytest.mark.parametrize("backbone,name,shape,layer,source", [
    (VIT, VIT_NAME, (4, 192), "forward_features", "vit-patch-tokens"),  # 2x2 grid of 16 px patches at 32 px
    (CNN, CNN_NAME, (4, 256), "layer3", "cnn-feature-map"),  # layer3: stride 16
])
def test_patch_tokens_are_stored_with_attrs(toy_store, tmp_path, backbone, name, shape, layer, source):
    store = _copy(toy_store, tmp_path)
    report = _embed(store, backbone, patch_tokens=True)
    assert report.written == report.total == 24 and report.failed == 0
    with open_store(store) as s:
        assert s.patch_sets() == [name]
        tokens, done = s.patches(name), s.patch_done_mask(name)
        attrs = s.patch_attrs(name)
        dset = s.file["patches"][name]["tokens"]
        assert dset.chunks == (1, *shape) and dset.compression is None
    assert tokens.shape == (24, *shape) and tokens.dtype == np.float16
    assert np.isfinite(tokens).all() and (done == DONE_WRITTEN).all()
    assert attrs["layer"] == layer and attrs["token_source"] == source and attrs["dtype"] == "float16"
    assert attrs["grid"] == [2, 2] and attrs["n_patches"] == shape[0] and attrs["patch_dim"] == shape[1]
    assert attrs["bytes_per_image"] == shape[0] * shape[1] * 2
    assert attrs["n_prefix_tokens_dropped"] == (1 if source.startswith("vit") else 0)
    assert attrs["embedding_config"]["weights_kind"] == "random"
    np.testing.assert_array_equal(load_patch_features(store, name), tokens)
    part, rows_done = load_patch_features(store, name, np.array([5, 2, 5]), with_done=True)
    np.testing.assert_array_equal(part, tokens[[5, 2, 5]])
    assert rows_done.all()
    # `swsa info` states the cost per image and per dataset
    assert main(["info", "--store", str(store), "--json"]) == 0


def test_patch_token_model_gives_vit_tokens_and_layer3_map():
    from swsa_store.models.backbones import create_backbone, patch_token_model

    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vit, cnn = (create_backbone(b, weights="random", image_size=32) for b in (VIT, CNN))
    with torch.inference_mode():
        wrapped, _ = patch_token_model(vit)
        pooled, tokens = wrapped(x)
        assert torch.equal(pooled, vit.model(x))  # pooled features do not change
        assert torch.equal(tokens, vit.model.forward_features(x)[:, 1:])  # class token dropped
        wrapped, _ = patch_token_model(cnn)
        pooled, tokens = wrapped(x)
        assert torch.equal(pooled, cnn.model(x))
        fmap = cnn.model.layer3(cnn.model.layer2(cnn.model.layer1(cnn.model.maxpool(cnn.model.act1(
            cnn.model.bn1(cnn.model.conv1(x)))))))
        assert torch.equal(tokens, fmap.flatten(2).transpose(1, 2))


def test_interrupted_patch_embedding_resumes_to_the_same_bytes(toy_store, tmp_path):
    full = _copy(toy_store, tmp_path / "full")
    part = _copy(toy_store, tmp_path / "part")
    _embed(full, CNN, patch_tokens=True)
    first = _embed(part, CNN, patch_tokens=True, max_batches=1)  # killed after one batch, in effect
    assert first.written == 8
    with open_store(part) as s:
        assert (s.patch_done_mask(CNN_NAME) == DONE_WRITTEN).sum() == 8
        assert np.isnan(s.patches(CNN_NAME)[s.patch_done_mask(CNN_NAME) != DONE_WRITTEN].astype(np.float32)).all()
    again = _embed(part, CNN, patch_tokens=True)
    assert again.already_done == 8 and again.written == 16
    with open_store(full) as a, open_store(part) as b:
        assert a.patches(CNN_NAME).tobytes() == b.patches(CNN_NAME).tobytes()
        assert a.embeddings(CNN_NAME).tobytes() == b.embeddings(CNN_NAME).tobytes()
        np.testing.assert_array_equal(a.patch_done_mask(CNN_NAME), b.patch_done_mask(CNN_NAME))


def test_patch_tokens_added_later_leave_pooled_rows_unchanged(toy_store, tmp_path):
    store = _copy(toy_store, tmp_path)
    _embed(store, CNN)
    with open_store(store) as s:
        pooled = s.embeddings(CNN_NAME)
    # asked for patch tokens of a backbone embedded without them: one line naming the fix
    with pytest.raises(StoreError) as error:
        load_patch_features(store, CNN_NAME)
    assert str(error.value) == (f"embeddings {CNN_NAME} were made without patch tokens; "
                                f"run swsa embed --store {store} --backbone {CNN} --patch-tokens")
    report = _embed(store, CNN, patch_tokens=True)
    assert report.already_done == 0 and report.written == 24
    with open_store(store) as s:
        assert s.embeddings(CNN_NAME).tobytes() == pooled.tobytes()
        assert (s.patch_done_mask(CNN_NAME) == DONE_WRITTEN).all()


def test_patch_tokens_of_a_feature_source_without_them_are_refused(toy_store, tmp_path):
    store = _copy(toy_store, tmp_path)
    with pytest.raises(ValueError, match="embed it without --patch-tokens"):
        _embed(store, "pixels", patch_tokens=True)


# --------------------------------------------------------------------------- detector


def _reference(detector: PatchDetector, queries, query_mask, bank, bank_mask, exclude, task_ids) -> np.ndarray:
    """Explicit per-task, per-query float64 brute force of the patch-level residual."""
    T, W, P, D = queries.shape
    out = np.full((T, W), np.nan)
    for t in range(T):
        usable = np.flatnonzero(bank_mask[t])
        order = np.random.default_rng([detector.seed, int(task_ids[t])]).permutation(len(usable))
        drawn = [int(s) for s in usable[order]]
        for w in range(W):
            if not query_mask[t, w]:
                continue
            others = [s for s in (drawn[: detector.K + 1] if detector.K else usable) if s != exclude[t, w]]
            refs = others[: detector.K] if detector.K else others
            assert detector.K == 0 or len(refs) == detector.K
            y = bank[t, refs].reshape(-1, D).astype(np.float64)
            best = np.array([min(float(((x - r) ** 2).sum()) for r in y) for x in queries[t, w].astype(np.float64)])
            out[t, w] = best.max()
    return out


def _seeded_batch(rng, dtype, T=4, W=6, S=7, P=5, D=24):
    queries = rng.standard_normal((T, W, P, D)).astype(dtype)
    bank = rng.standard_normal((T, S, P, D)).astype(dtype)
    query_mask = rng.random((T, W)) < 0.8
    bank_mask = np.ones((T, S), dtype=bool)
    bank_mask[1, 5:] = False  # padding
    bank[1, 5:] = np.nan  # never read
    exclude = np.full((T, W), -1, dtype=np.int64)
    for t in range(T):  # held-out normals: queries that are bank images, scored leave-one-out
        for w in range(3):
            slot = int(rng.integers(0, int(bank_mask[t].sum())))
            queries[t, w], exclude[t, w] = bank[t, slot], slot
    queries[~query_mask] = np.nan  # masked-out queries are never read
    return queries, query_mask, bank, bank_mask, exclude


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
@pytest.mark.parametrize("label", ["patch(K=1)", "patch(K=3,seed=5)", "patch(K=all)"])
def test_patch_detector_equals_per_task_brute_force(dtype, label):
    rng = np.random.default_rng(7)
    batch = _seeded_batch(rng, dtype)
    task_ids = np.array([3, 11, 12, 40])
    detector = parse_detector(label)
    assert detector.label == label and detector.family == "patch" and detector.needs == "patches"
    small = PatchDetector(detector.K, detector.seed, chunk_bytes=1 << 10)  # many blocks: the same scores
    got = small.score_tasks(*batch, task_ids=task_ids)
    want = _reference(detector, *batch, task_ids)
    assert got.dtype == np.float64 and got.shape == want.shape
    np.testing.assert_array_equal(np.isnan(got), ~batch[1])
    np.testing.assert_allclose(got, want, rtol=1e-9, equal_nan=True)
    np.testing.assert_array_equal(detector.score_tasks(*batch, task_ids=task_ids), got)
    # a task's draw and scores do not depend on the tasks scored with it
    alone = detector.score_tasks(*(x[2:3] for x in batch), task_ids=task_ids[2:3])
    np.testing.assert_array_equal(alone[0], got[2])


def test_patch_detector_is_exact_where_float32_cannot_tell_distances_apart():
    rng = np.random.default_rng(0)
    base = rng.standard_normal(32) * 100.0  # large norms, tiny differences: float32 distances are noise
    queries = base + rng.standard_normal((2, 4, 6, 32)) * 1e-2
    bank = base + rng.standard_normal((2, 5, 6, 32)) * 1e-2
    mask, bank_mask = np.ones((2, 4), bool), np.ones((2, 5), bool)
    exclude = np.full((2, 4), -1)
    exclude[:, 0], queries[:, 0] = 2, bank[:, 2]
    for K in (2, 0):
        detector = PatchDetector(K)
        got = detector.score_tasks(queries, mask, bank, bank_mask, exclude, task_ids=np.arange(2))
        np.testing.assert_allclose(got, _reference(detector, queries, mask, bank, bank_mask, exclude, np.arange(2)),
                                   rtol=1e-9)


def test_patch_detector_registry_settings_and_references():
    assert "patch" in list_detectors()
    assert create_detector("patch", K="all") == PatchDetector(0) and PatchDetector(0).label == "patch(K=all)"
    detector = PatchDetector(3, seed=1)
    assert detector.min_bank(False) == 3 and detector.min_bank(True) == 4 and PatchDetector(0).min_bank(True) == 2
    assert detector.prepare(np.ones((2, 3, 4))).shape == (2, 3, 4) and not detector.needs_abnormal
    bank_mask = np.ones((2, 6), dtype=bool)
    bank_mask[1, 4:] = False
    refs = detector.references(bank_mask, np.array([0, 9]))
    assert refs.shape == (2, 3) and (refs[1] < 4).all() and len(set(refs[0])) == 3
    np.testing.assert_array_equal(refs, detector.reference_slots(bank_mask, np.array([0, 9]))[:, :3])
    assert PatchDetector(0).references(bank_mask, np.array([0, 9])).shape == (2, 0)
    for text in ("patch(K=-1)", "patch(K=lots)"):
        with pytest.raises(ValueError, match="patch"):
            parse_detector(text)


def test_k_larger_than_the_support_is_a_one_line_error():
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((1, 2, 3, 4))
    bank = rng.standard_normal((1, 3, 3, 4))
    args = (queries, np.ones((1, 2), bool), bank, np.ones((1, 3), bool))
    with pytest.raises(ValueError) as error:
        PatchDetector(4).score_tasks(*args, np.full((1, 2), -1), task_ids=np.array([7]))
    message = str(error.value)
    assert "\n" not in message and "task 7 has 3" in message and "smaller K" in message
    PatchDetector(3).score_tasks(*args, np.full((1, 2), -1), task_ids=np.array([7]))  # 3 fit
    with pytest.raises(ValueError, match="K references \\+ 1"):  # a held-out query needs one more
        PatchDetector(3).score_tasks(*args, np.array([[0, -1]]), task_ids=np.array([7]))
    bad = queries.copy()
    bad[0, 1, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        PatchDetector(2).score_tasks(bad, *args[1:], np.full((1, 2), -1), task_ids=np.array([7]))


def test_patch_cost_reports_ms_per_task():
    cost = patch_cost(n_queries=4, n_patches=9, dim=16, K=2, bank_size=5, n_tasks=2)
    assert cost["ms_per_task"] > 0 and cost["n_tasks"] == 2 and cost["shape"]["K"] == 2
