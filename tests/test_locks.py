"""One writer at a time: the lock is taken before any work, names its holder, can be waited for;
two `synth` or `catalog` runs never duplicate rows nor share ids; orphaned temporary files of
killed writers are removed by the next writer."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from swsa_store import StoreError, create_store, edit_store, open_store
from swsa_store.catalog import add_images, catalog_dataset
from swsa_store.locks import lock_holder, store_lock
from swsa_store.paths import NEXT_ID_ATTR


def _folder(root: Path, classes=("a", "b"), per_class=6, size=16, shade=0) -> Path:
    rng = np.random.default_rng(shade)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = (rng.random((size, size, 3)) * 60 + 60 * c + shade).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:02d}.png")
    return root


def _hold(store: Path, seconds: float) -> subprocess.Popen:
    """A process holding the store's lock for ``seconds``; returns once it holds it."""
    code = ("import time\nfrom swsa_store.locks import store_lock\n"
            f"with store_lock({str(store)!r}, command='swsa synth'):\n    print('held', flush=True)\n"
            f"    time.sleep({seconds})\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "swsa_engine.app.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_second_writer_fails_at_once_naming_the_holder_and_can_wait(tmp_path):
    store = create_store(tmp_path / "s.h5")
    holder = _hold(store, 1.5)
    try:
        started = time.monotonic()
        with pytest.raises(StoreError, match=rf"^store .*s\.h5 is being written by PID {holder.pid} \(swsa synth\) "
                                             r"since \d{4}-\d\d-\d\dT.*; wait or pass --wait$"):
            with store_lock(store):
                pass
        assert time.monotonic() - started < 0.5  # at once, not after the work
        with pytest.raises(StoreError, match="gave up after waiting 0.2 s"):
            with store_lock(store, wait=0.2):
                pass
        with store_lock(store, wait=30):  # the holder ends after 1.5 s
            assert lock_holder(store)["pid"] != holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_cli_writer_refused_before_work_and_waits_with_wait(tmp_path):
    root = _folder(tmp_path / "images")
    store = tmp_path / "s.h5"
    create_store(store)
    holder = _hold(store, 600)
    try:
        refused = _cli("catalog", "folder", "--root", str(root), "--name", "toy", "--store", str(store), "--n-seed", "2")
        _, err = refused.communicate(timeout=120)
        assert refused.returncode == 1
        assert f"being written by PID {holder.pid} (swsa synth) since" in err and "pass --wait" in err
        with open_store(store) as s:
            assert len(s.images()) == 0  # refused before any work
        waited = _cli("catalog", "folder", "--root", str(root), "--name", "toy", "--store", str(store), "--n-seed", "2",
                      "--wait", "120")
        time.sleep(2)
        assert waited.poll() is None  # waiting for the holder
        holder.kill()  # a writer that dies releases the lock
        _, err = waited.communicate(timeout=180)
        assert waited.returncode == 0, err
    finally:
        holder.kill()
        holder.wait()
    with open_store(store) as s:
        assert len(s.images()) == 12


@pytest.mark.parametrize("trial", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_two_synth_at_once_never_write_duplicates(tmp_path, trial):
    store = tmp_path / "s.h5"
    catalog_dataset(store, "folder", root=_folder(tmp_path / "images"), name="toy", n_seed=2)
    args = ("synth", "--store", str(store), "--method", "cutpaste", "--count", "8", "--quiet")
    both = [_cli(*args, "--wait"), _cli(*args, "--wait")]
    for run in both:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
    with open_store(store) as s:
        synthetic = s.images()[lambda t: t["split"] == "synthetic"]
    assert len(synthetic) == 2 * 8
    assert not synthetic.duplicated(["kind", "task_id", "source_index"]).any()


def test_add_images_never_catalogues_a_synthetic_image_twice(tmp_path):
    store = tmp_path / "s.h5"
    catalog_dataset(store, "folder", root=_folder(tmp_path / "images"), name="toy", n_seed=2)
    rows = pd.DataFrame({"dataset": "toy", "class_name": "a", "split": "synthetic", "kind": "cutpaste",
                         "path": "", "status": "skipped", "skip_reason": "unchanged", "task_id": 0,
                         "source_index": [0, 1, 1]})
    first = add_images(store, rows)
    again = add_images(store, rows.iloc[[1, 0]])
    assert first.tolist() == [12, 13, 13] and again.tolist() == [13, 12]
    with open_store(store) as s:
        assert len(s.images()) == 14


def test_two_catalogs_at_once_get_distinct_ids(tmp_path):
    store = tmp_path / "s.h5"
    runs = [_cli("catalog", "folder", "--root", str(_folder(tmp_path / name, shade=9 * i)), "--name", name,
                 "--store", str(store), "--n-seed", "2", "--wait") for i, name in enumerate(("one", "two"))]
    for run in runs:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
    with open_store(store) as s:
        images = s.images()
    assert images["image_id"].tolist() == list(range(24))
    assert sorted(images["dataset"].value_counts().to_dict().items()) == [("one", 12), ("two", 12)]


def test_ids_are_never_reused(tmp_path):
    store = tmp_path / "s.h5"
    catalog_dataset(store, "folder", root=_folder(tmp_path / "images"), name="toy", n_seed=2)
    with open_store(store) as s:
        assert s.table_attrs("images")[NEXT_ID_ATTR] == 12
    with edit_store(store) as s:  # rows removed by hand after ids were handed out
        s.replace_images(s.images().iloc[:10])
    with pytest.raises(StoreError, match=r"handed out image ids up to 11 but holds 10 rows .* ids are never reused"):
        add_images(store, pd.DataFrame({"dataset": "toy", "class_name": "a", "split": "synthetic", "kind": "x",
                                        "path": "", "task_id": 0, "source_index": [0]}))


def test_orphaned_temporary_files_are_removed_by_the_next_writer(tmp_path):
    store = create_store(tmp_path / "s.h5")
    orphans = [tmp_path / ".s.h5.edit.4242", tmp_path / ".s.h5.edit.4242.compact", tmp_path / ".s.h5.creating.77",
               tmp_path / "s.h5.results" / ".cube.h5.4242.tmp"]
    orphans[-1].parent.mkdir()
    for path in orphans:
        path.write_bytes(b"x" * 1000)
    keep = tmp_path / "s.h5.results" / "cube.h5"
    keep.write_bytes(b"result")
    with edit_store(store):
        pass
    assert not any(p.exists() for p in orphans) and keep.exists()
    for _ in range(5):  # kills during edits never pile up copies
        (tmp_path / ".s.h5.edit.999").write_bytes(b"x")
        with edit_store(store):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5", "s.h5.lock", "s.h5.results"]
