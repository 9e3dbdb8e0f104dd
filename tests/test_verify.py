"""`swsa verify` finds a flipped byte in an embedding row, a missing or changed image and an
orphaned temporary file (and --repair removes it); paths are stored relative, so a store moved
with its images works, and `swsa relocate` re-points a dataset whose images moved."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from swsa_engine.app.cli import main
from swsa_store import StoreError, edit_store, open_store
from swsa_store.catalog import catalog_dataset
from swsa_store.ingest import embed_store
from swsa_store.synthesize import synthesize
from swsa_store.verify import relocate_dataset, verify_store

NAME = "timm-resnet10t"


def _folder(root: Path, per_class=6, size=16) -> Path:
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray((rng.random((size, size, 3)) * 200).astype(np.uint8)).save(root / c / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A store beside its images folder, with synthetic images and embeddings."""
    home = tmp_path_factory.mktemp("verify") / "project"
    store = home / "s.h5"
    catalog_dataset(store, "folder", root=_folder(home / "images"), name="toy", n_seed=2)
    synthesize(store, "cutpaste", count=3, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        embed_store(store, "timm/resnet10t", weights="random", image_size=16, batch_size=8, progress=False)
    return store


def _copy(store: Path, folder: Path) -> Path:
    shutil.copytree(store.parent, folder)
    return folder / store.name


def test_intact_store_verifies(built, tmp_path, capsys):
    store = _copy(built, tmp_path / "p")
    report = verify_store(store)
    assert report.ok, report.problems
    assert report.checked["images"] == 18 and report.checked[f"embeddings/{NAME}"] == 18
    assert main(["verify", "--store", str(store)]) == 0
    assert "is intact" in capsys.readouterr().out


def test_flipped_byte_in_an_embedding_row_is_found(built, tmp_path, capsys):
    store = _copy(built, tmp_path / "p")
    with h5py.File(store, "r") as f:
        features = f["embeddings"][NAME]["features"]
        offset = features.id.get_offset() + 5 * features.shape[1] * 4 + 7  # a byte of image 5's row
    with open(store, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x01]))
    report = verify_store(store)
    assert report.problems == [f"checksum mismatch in embeddings/{NAME} (row changed since it was written), image id: 5"]
    assert main(["verify", "--store", str(store)]) == 1
    assert "image id: 5" in capsys.readouterr().out


def test_orphaned_temp_file_is_listed_and_repaired(built, tmp_path, capsys):
    store = _copy(built, tmp_path / "p")
    orphan = store.parent / ".s.h5.edit.31337"
    image_tmp = store.parent / "s.h5.files" / "synth" / "cutpaste" / ".0001.png.999.tmp"
    orphan.write_bytes(b"half a copy")
    image_tmp.write_bytes(b"half an image")
    report = verify_store(store)
    assert sorted(report.problems) == sorted(f"orphaned temporary file (remove with --repair): {p}"
                                             for p in (orphan, image_tmp))
    assert main(["verify", "--store", str(store), "--repair"]) == 0
    assert "removed:" in capsys.readouterr().out
    assert not orphan.exists() and not image_tmp.exists()
    assert verify_store(store).ok


def test_missing_and_changed_images_are_listed(built, tmp_path):
    store = _copy(built, tmp_path / "p")
    (store.parent / "images" / "a" / "00.png").unlink()
    (store.parent / "images" / "b" / "01.png").write_bytes(b"other bytes")
    problems = verify_store(store).problems
    assert any(p.startswith("image file missing") and p.endswith("images/a/00.png") for p in problems)
    assert any(p.startswith("image file changed") and p.endswith("images/b/01.png") for p in problems)
    assert len(problems) == 2


def test_paths_are_stored_relative_and_a_moved_store_works(built, tmp_path):
    with open_store(built) as s:
        raw = s.images(raw_paths=True)
        assert s.dataset_roots() == {"toy": "images"}
    assert raw["path"].iloc[0] == "a/00.png"
    assert all(p.startswith("s.h5.files/synth/cutpaste/") for p in raw[raw["split"] == "synthetic"]["path"])
    moved = _copy(built, tmp_path / "elsewhere")
    shutil.move(str(moved.parent), str(tmp_path / "moved"))  # the whole project folder moves
    store = tmp_path / "moved" / "s.h5"
    with open_store(store) as s:
        paths = s.images()["path"]
    assert all(str(p).startswith(str(tmp_path / "moved")) for p in paths)
    assert verify_store(store).ok


def test_relocate_re_points_a_dataset_whose_images_moved(built, tmp_path, capsys):
    store = _copy(built, tmp_path / "p")
    new_root = tmp_path / "disk2" / "toy"
    shutil.move(str(store.parent / "images"), str(new_root))
    with open_store(store) as s:  # not beside the store any more: found where they were at the last write
        assert s.images()["path"].iloc[0] == str(built.parent / "images" / "a" / "00.png")
    with pytest.raises(StoreError, match=r"12 of 12 images are not under .*nothing changed"):
        relocate_dataset(store, "toy", tmp_path)
    with pytest.raises(StoreError, match=r"holds no dataset 'nope' \(held: toy\)"):
        relocate_dataset(store, "nope", new_root)
    assert main(["relocate", "--store", str(store), "--dataset", "toy", "--root", str(new_root)]) == 0
    assert "12 images now under" in capsys.readouterr().out
    with open_store(store) as s:
        assert s.images()["path"].iloc[0] == str(new_root / "a" / "00.png")
    assert verify_store(store).ok


def test_a_store_with_absolute_paths_still_reads_and_relocates(built, tmp_path):
    store = _copy(built, tmp_path / "p")
    with open_store(store) as s:
        absolute = s.images()
    with edit_store(store) as s:  # a store written before relative paths: absolute paths, no roots
        s.replace_table("images", absolute)
    with open_store(store) as s:
        assert s.images(raw_paths=True)["path"].iloc[0] == absolute["path"].iloc[0]
        assert s.images()["path"].tolist() == absolute["path"].tolist()
    assert verify_store(store).ok
    new_root = tmp_path / "new"
    shutil.copytree(store.parent / "images", new_root)
    relocate_dataset(store, "toy", new_root)
    with open_store(store) as s:
        assert s.images(raw_paths=True)["path"].iloc[0] == "a/00.png"
        assert s.images()["path"].iloc[0] == str(new_root / "a" / "00.png")
