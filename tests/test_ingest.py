"""Ingest: embeddings land in the store, resume after SIGKILL gives the same bytes, bad images
become recorded skips."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from swsa_store import StoreError, open_store
from swsa_store.catalog import catalog_dataset
from swsa_store.ingest import embed_store, fixed_batches
from swsa_store.schema import DONE_FAILED, DONE_WRITTEN

TINY = "timm/resnet10t"
NAME = "timm-resnet10t"  # the embedding matrix's name in the store
EMBED_ARGS = ["--backbone", TINY, "--weights", "random", "--image-size", "32", "--batch-size", "32", "--quiet"]


def _embed(store, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return embed_store(store, TINY, weights="random", image_size=32, batch_size=32, progress=False, **kw)


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    store = root / "s.h5"
    catalog_dataset(store, "digits", image_dir=root / "img", image_size=32, n_seed=10)
    return store


def _copy_store(src: Path, dst_dir: Path) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / "s.h5"
    dst.write_bytes(src.read_bytes())
    return dst


def test_embed_writes_every_row_with_attrs(digits_store, tmp_path):
    store = _copy_store(digits_store, tmp_path)
    report = _embed(store)
    assert report.written == report.total == 1797 and report.failed == 0
    with open_store(store) as s:
        features = s.embeddings(NAME)
        assert np.isfinite(features).all() and features.shape[0] == 1797
        assert (s.done_mask(NAME) == DONE_WRITTEN).all()
        cfg = s.embedding_attrs(NAME)["config"]
        assert cfg["weights_kind"] == "random"
        assert cfg["preprocess"]["input_size"] == [3, 32, 32]
        for key in ("torch_version", "timm_version", "numpy_version", "n_params", "feature_dim"):
            assert key in cfg
    again = _embed(store)  # everything done: nothing to do
    assert again.written == 0 and again.already_done == 1797


def test_partial_then_resume_equals_uninterrupted(digits_store, tmp_path):
    full = _copy_store(digits_store, tmp_path / "a")
    part = _copy_store(digits_store, tmp_path / "b")
    _embed(full)
    first = _embed(part, max_batches=7)
    assert first.written == 7 * 32
    with open_store(part) as s:
        assert (s.done_mask(NAME) == DONE_WRITTEN).sum() == 7 * 32
    _embed(part)
    with open_store(full) as a, open_store(part) as b:
        assert a.embeddings(NAME).tobytes() == b.embeddings(NAME).tobytes()


def test_incompatible_existing_matrix_is_refused(digits_store, tmp_path):
    store = _copy_store(digits_store, tmp_path)
    _embed(store, max_batches=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(StoreError, match="already holds embeddings .* made with preprocess=.*embed under another name"):
            embed_store(store, TINY, weights="random", image_size=48, batch_size=32, progress=False)


def test_fixed_batches_are_stable():
    ids = np.array([9, 1, 5, 3, 7])
    assert [b.tolist() for b in fixed_batches(ids, 2)] == [[1, 3], [5, 7], [9]]


def _run_cli(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "swsa_engine.app.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, **kw)


def _kill_and_resume(digits_store, tmp_path, targets):
    """Kill `swsa embed` once its progress file shows ``targets[i]`` rows done (past what the store
    held when that run started), check that the kill landed mid-write, then resume and compare."""
    from swsa_store.locks import progress_path, read_progress
    reference = _copy_store(digits_store, tmp_path / "ref")
    killed = _copy_store(digits_store, tmp_path / "kill")
    assert _run_cli(["embed", "--store", str(reference), *EMBED_ARGS]).wait(timeout=300) == 0
    landed = 0
    for target in targets:
        before = _done_rows(killed)
        progress_path(killed).unlink(missing_ok=True)
        process = _run_cli(["embed", "--store", str(killed), *EMBED_ARGS])
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline:
            seen = read_progress(killed)
            if seen.get("pid") == process.pid and seen.get("rows_done", 0) >= before + target:
                os.kill(process.pid, signal.SIGKILL)
                break
            time.sleep(0.002)
        process.wait(timeout=60)
        with h5py.File(killed, "r"):  # the file opens cleanly after every kill
            pass
        with open_store(killed) as s:
            features, done = s.embeddings(NAME), s.done_mask(NAME)
            assert np.isfinite(features[done == DONE_WRITTEN]).all(), f"a done row is not written (kill at {target})"
        landed += int(before < _done_rows(killed) < 1797)
    assert landed == len(targets), f"only {landed} of {len(targets)} kills landed mid-write (targets {targets})"
    final = _run_cli(["embed", "--store", str(killed), *EMBED_ARGS])
    _, err = final.communicate(timeout=300)
    assert final.returncode == 0, err.decode()[-2000:]
    with open_store(reference) as a, open_store(killed) as b:
        assert a.embeddings(NAME).tobytes() == b.embeddings(NAME).tobytes(), f"kills at {targets}"
        np.testing.assert_array_equal(a.done_mask(NAME), b.done_mask(NAME))


def _done_rows(store) -> int:
    with open_store(store) as s:
        return int((s.done_mask(NAME) != 0).sum()) if NAME in s.backbones() else 0


def test_sigkill_at_random_points_then_resume_gives_identical_bytes(digits_store, tmp_path):
    rng = random.Random()  # different kill points on every run; printed on failure
    targets = [32 * rng.randint(1, 8) for _ in range(4)]  # rows past the run's start: a kill mid-write
    _kill_and_resume(digits_store, tmp_path, targets)


@pytest.mark.slow
@pytest.mark.parametrize("repeat", range(5))
def test_sigkill_many_times(digits_store, tmp_path, repeat):
    rng = random.Random()
    targets = [32 * rng.randint(1, 5) for _ in range(8)]
    _kill_and_resume(digits_store, tmp_path, targets)


def _folder(root: Path, classes=("a", "b", "c"), per_class=8, size=24):
    rng = np.random.default_rng(0)
    for c, class_name in enumerate(classes):
        (root / class_name).mkdir(parents=True)
        for i in range(per_class):
            pixels = (rng.random((size, size, 3)) * 60 + 60 * c).astype(np.uint8)
            Image.fromarray(pixels).save(root / class_name / f"{i:02d}.png")


def test_corrupt_image_is_a_recorded_skip_and_nothing_else_changes(tmp_path):
    clean_root, dirty_root = tmp_path / "clean", tmp_path / "dirty"
    _folder(clean_root)
    _folder(dirty_root)
    (dirty_root / "b" / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (dirty_root / "empty_class").mkdir()
    for root in (clean_root, dirty_root):
        catalog_dataset(root / "s.h5", "folder", root=root, name="toy", n_seed=2)
    with open_store(dirty_root / "s.h5") as s:
        images, skips = s.images(), s.skips()
    bad = images[images["status"] != "ok"]
    assert len(bad) == 1 and bad["path"].iloc[0].endswith("zz_corrupt.png")
    assert "cannot decode image" in bad["skip_reason"].iloc[0]
    assert any("empty_class" in r for r in skips["reason"])
    assert int(bad["image_id"].iloc[0]) in skips["image_id"].to_list()
    report = _embed(dirty_root / "s.h5")
    assert report.failed == 0 and report.total == len(images) - 1
    _embed(clean_root / "s.h5")
    with open_store(clean_root / "s.h5") as a, open_store(dirty_root / "s.h5") as b:
        clean, dirty = a.images(), b.images()
        keep = dirty["status"] == "ok"
        # the same files get the same embeddings
        by_path = dict(zip(clean["path"].map(lambda p: Path(p).relative_to(clean_root)).astype(str), a.embeddings(NAME)))
        for path, row in zip(dirty.loc[keep, "path"], b.embeddings(NAME)[keep.to_numpy()]):
            assert np.array_equal(by_path[str(Path(path).relative_to(dirty_root))], row)
    # the skip reaches the report
    from swsa_engine.report.summary import write_report
    from swsa_engine.run.sweep import run_sweep
    from swsa_store.synthesize import synthesize

    synthesize(dirty_root / "s.h5", "cutpaste", count=4, progress=False)
    _embed(dirty_root / "s.h5")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cube = run_sweep(dirty_root / "s.h5", progress=False)
    with open_store(dirty_root / "s.h5") as s:
        paths = write_report(cube, tmp_path / "report", store_skips=s.skips())
    text = paths["report"].read_text()
    assert "cannot decode image" in text and "empty_class" in text
    assert np.isfinite(cube.real).all()  # nothing else is affected: every task is scored


def test_image_broken_after_catalog_is_recorded_at_embed_time(tmp_path):
    _folder(tmp_path / "data")
    store = tmp_path / "s.h5"
    catalog_dataset(store, "folder", root=tmp_path / "data", name="toy", n_seed=2)
    victim = tmp_path / "data" / "a" / "03.png"
    victim.write_bytes(victim.read_bytes()[:40])  # truncated after cataloguing
    report = _embed(store)
    assert report.failed == 1 and "cannot decode image" in report.failures[0][1]
    with open_store(store) as s:
        done, skips = s.done_mask(NAME), s.skips()
    assert (done == DONE_FAILED).sum() == 1
    row = skips[skips["stage"] == "embed"]
    assert len(row) == 1 and row["backbone"].iloc[0] == NAME
