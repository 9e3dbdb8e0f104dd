"""The HDF5 store: round trip, atomic edits, schema checks, locking, row writes."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest

from swsa_store import SCHEMA_VERSION, StoreError, create_store, edit_store, open_store
from swsa_store.row_writer import EmbeddingRowWriter
from swsa_store.schema import read_table, write_table
from swsa_store.store import writer_lock


def _table(n=5):
    return pd.DataFrame({
        "image_id": np.arange(n, dtype=np.int64),
        "name": [f"img {i} ü" for i in range(n)],
        "score": np.linspace(0, 1, n),
        "flag": np.arange(n) % 2 == 0,
    })


def test_table_round_trip(tmp_path):
    path = tmp_path / "t.h5"
    table = _table()
    with h5py.File(path, "w") as f:
        write_table(f, "things", table, attrs={"rule": "x"})
    with h5py.File(path, "r") as f:
        back = read_table(f["things"])
        assert f["things"].attrs["rule"] == "x"
    pd.testing.assert_frame_equal(back, table, check_dtype=False)
    assert back["image_id"].dtype == np.int64 and back["flag"].dtype == bool


def test_repetitive_string_columns_round_trip_as_categories(tmp_path):
    rng = np.random.default_rng(0)
    table = pd.DataFrame({
        "group": rng.choice(["cat", "dog", "é-ü", ""], size=5000).astype(object),
        "path": [f"/data/{i}.png" for i in range(5000)],
    })
    with h5py.File(tmp_path / "t.h5", "w") as f:
        write_table(f, "t", table)
        assert f["t"]["group"].attrs["encoding"] == "categorical"  # codes + 4 categories
        assert "encoding" not in f["t"]["path"].attrs  # every value distinct: plain strings
    with h5py.File(tmp_path / "t.h5", "r") as f:
        pd.testing.assert_frame_equal(read_table(f["t"]), table)
        pd.testing.assert_frame_equal(read_table(f["t"], ["group"]), table[["group"]])


def test_store_round_trip_embeddings_and_results(tmp_path):
    path = create_store(tmp_path / "s.h5")
    with edit_store(path) as store:
        store.replace_table("images", _table(6))
        store.create_embeddings("bb", 4, {"model": "m", "config": '{"feature_dim": 4}'})
        store.write_result("r", {"cube": np.ones((2, 3)), "names": np.array(["a", "b"])}, {"k": 3, "cfg": {"a": 1}})
    with open_store(path) as store:
        assert store.n_images == 6
        assert store.backbones() == ["bb"]
        features = store.embeddings("bb")
        assert features.shape == (6, 4) and np.isnan(features).all()
        assert (store.done_mask("bb") == 0).all()
        assert store.embedding_attrs("bb")["config"] == {"feature_dim": 4}
        assert store.results() == ["r"]
        assert store.result_group("r")["cube"].shape == (2, 3)
        assert int(store.file.attrs["schema_version"]) == SCHEMA_VERSION
    rows = np.arange(12, dtype=np.float32).reshape(3, 4)
    with writer_lock(path), EmbeddingRowWriter(path, "bb") as writer:
        writer.write(np.array([1, 2, 4]), rows, np.array([1, 1, 2], dtype=np.uint8))
    with open_store(path) as store:
        np.testing.assert_array_equal(store.embeddings("bb", [4, 1, 2]), rows[[2, 0, 1]])
        np.testing.assert_array_equal(store.done_mask("bb"), [0, 1, 1, 0, 2, 0])


def test_grow_embeddings_keeps_rows(tmp_path):
    path = create_store(tmp_path / "s.h5")
    with edit_store(path) as store:
        store.replace_table("images", _table(3))
        store.create_embeddings("bb", 2, {})
        store.create_patches("bb", 4, 2, {})
    with writer_lock(path), EmbeddingRowWriter(path, "bb", patches=True) as writer:
        writer.write(np.array([0, 1, 2]), np.ones((3, 2), np.float32), np.ones(3, np.uint8),
                     patch_rows=np.full((3, 4, 2), 2.0, np.float32))
    with edit_store(path, compact=True) as store:
        store.replace_table("images", _table(5))
        store.grow_embeddings(5)
    with open_store(path) as store:
        features = store.embeddings("bb")
        assert features.shape == (5, 2)
        np.testing.assert_array_equal(features[:3], 1.0)
        assert np.isnan(features[3:]).all()
        np.testing.assert_array_equal(store.done_mask("bb"), [1, 1, 1, 0, 0])
        # patch tokens grow the same way and keep one image per chunk
        tokens = store.patches("bb")
        assert tokens.shape == (5, 4, 2) and tokens.dtype == np.float16
        np.testing.assert_array_equal(tokens[:3], 2.0)
        assert np.isnan(tokens[3:]).all()
        np.testing.assert_array_equal(store.patch_done_mask("bb"), [1, 1, 1, 0, 0])
        assert store.file["patches"]["bb"]["tokens"].chunks == (1, 4, 2)


def test_failed_edit_leaves_store_unchanged(tmp_path):
    path = create_store(tmp_path / "s.h5")
    with edit_store(path) as store:
        store.replace_table("images", _table(3))
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        with edit_store(path) as store:
            store.replace_table("images", _table(7))
            raise RuntimeError("boom")
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".s.h5.edit*"))


def test_open_errors(tmp_path):
    with pytest.raises(StoreError, match="does not exist; create it with `swsa catalog"):
        open_store(tmp_path / "missing.h5")
    with pytest.raises(ValueError, match="supports mode='r' only"):
        open_store(tmp_path / "missing.h5", mode="a")
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w"):
        pass
    with pytest.raises(StoreError, match="not an swsa store"):
        open_store(plain)
    newer = create_store(tmp_path / "newer.h5")
    with h5py.File(newer, "r+") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(StoreError, match=r"newer than this swsa understands"):
        open_store(newer)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not hdf5 at all")
    with pytest.raises(StoreError, match="cannot open store"):
        open_store(garbage)


def test_read_only_store_refuses_writes(tmp_path):
    path = create_store(tmp_path / "s.h5")
    with open_store(path) as store:
        with pytest.raises(StoreError, match="read-only"):
            store.replace_table("images", _table())


def test_second_writer_is_refused(tmp_path):
    import subprocess
    import sys
    path = create_store(tmp_path / "s.h5")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom swsa_store.store import writer_lock\n"
                               f"with writer_lock({str(path)!r}):\n    print('held', flush=True)\n    time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreError, match=rf"is being written by PID {holder.pid} .* since .*; wait or pass --wait"):
            with edit_store(path):
                pass
    finally:
        holder.kill()
        holder.wait()
    with writer_lock(path), edit_store(path):  # free once its holder died; re-entrant within one process
        pass


def test_missing_embeddings_error_names_command(tmp_path):
    path = create_store(tmp_path / "s.h5")
    with open_store(path) as store:
        with pytest.raises(StoreError, match="swsa embed --store"):
            store.embeddings("resnet18")


def test_results_are_saved_beside_the_store_without_rewriting_it(tmp_path):
    from swsa_store.schema import save_result

    path = create_store(tmp_path / "s.h5")
    before = path.stat()
    save_result(path, "cube", {"a": np.arange(3)}, {"k": 3})
    save_result(path, "cube", {"a": np.arange(4)}, {"k": 5})  # replaces atomically
    after = path.stat()
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    assert sorted(p.name for p in (tmp_path / "s.h5.results").iterdir()) == ["cube.h5"]
    with open_store(path) as store:
        assert store.results() == ["cube"]
        group = store.result_group("cube")
        assert group["a"].shape == (4,) and group.attrs["k"] == 5
    with pytest.raises(StoreError, match="plain file name"):
        save_result(path, "../x", {}, {})
