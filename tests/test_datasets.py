"""Tests for swsa_store.datasets: the samples table, digits rendering, image folders."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from swsa_store.datasets import (
    SAMPLE_COLUMNS,
    Dataset,
    DigitsDataset,
    ImageFolderDataset,
    ImageReadError,
    create_dataset,
    list_datasets,
    read_image,
)
from swsa_store.registry import UnknownNameError

N_DIGITS = 1797


# --------------------------------------------------------------------------- helpers


def write_png(path: Path, value: int = 128, size: tuple[int, int] = (12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format="PNG")
    return path


def write_jpeg(path: Path, seed: int = 0, size: tuple[int, int] = (48, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format="JPEG", quality=90)
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_schema(df: pd.DataFrame) -> None:
    assert list(df.columns) == list(SAMPLE_COLUMNS)
    for col, dtype in SAMPLE_COLUMNS.items():
        if dtype == "int64":
            assert df[col].dtype == np.int64, col
        else:
            assert pd.api.types.is_string_dtype(df[col].dtype), col
    assert list(df.index) == list(range(len(df)))
    keys = list(zip(df["class_name"], df["split"], df["rel_path"]))
    assert keys == sorted(keys)
    assert set(df["split"]) <= {"train", "test"}
    assert set(df["status"]) <= {"ok", "skipped"}
    assert all(os.path.isabs(p) for p in df["path"])


# --------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits_pair(tmp_path_factory):
    """Two renders of the digits into two different folders."""
    a = DigitsDataset(tmp_path_factory.mktemp("digits_a"))
    b = DigitsDataset(tmp_path_factory.mktemp("digits_b"))
    return a, a.samples(), b, b.samples()


def test_digits_table(digits_pair):
    ds, df, _, _ = digits_pair
    assert_schema(df)
    assert len(df) == N_DIGITS
    assert sorted(df["class_name"].unique()) == [str(d) for d in range(10)]
    assert (df["status"] == "ok").all() and (df["skip_reason"] == "").all()
    assert (df["dataset"] == "digits").all()
    assert sorted(df["source_index"]) == list(range(N_DIGITS))
    assert (df["width"] == 64).all() and (df["height"] == 64).all()
    row = df.iloc[0]
    assert row["path"] == str(ds.image_dir / row["rel_path"])
    assert row["rel_path"] == f"{row['class_name']}/{row['source_index']:04d}.png"
    assert sha(Path(row["path"])) == row["sha256"]


def test_digits_stratified_split(digits_pair):
    from sklearn.datasets import load_digits

    _, df, _, _ = digits_pair
    target = load_digits().target
    assert (df.sort_values("source_index")["class_name"].astype(int).to_numpy() == target).all()
    counts = df.groupby(["class_name", "split"]).size().unstack()
    assert int(counts["test"].sum()) == int(np.ceil(0.5 * N_DIGITS))
    for cls, row in counts.iterrows():
        n = int(row["train"] + row["test"])
        assert n == int((target == int(cls)).sum())
        assert abs(row["test"] - 0.5 * n) <= 1, cls


def test_digits_images_are_the_scaled_originals(digits_pair):
    from sklearn.datasets import load_digits

    _, df, _, _ = digits_pair
    images = load_digits().images
    for _, row in df.iloc[[0, 500, 1796]].iterrows():
        with Image.open(row["path"]) as img:
            assert img.mode == "RGB" and img.size == (64, 64)
            arr = np.asarray(img)
        assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
        expected = np.rint(images[row["source_index"]] * 255 / 16).astype(np.uint8)
        assert (arr[::8, ::8, 0] == expected).all()  # nearest upsampling: exact 8x8 blocks


def test_digits_deterministic(digits_pair):
    _, df_a, _, df_b = digits_pair
    assert (df_a["sha256"] == df_b["sha256"]).all()
    pd.testing.assert_frame_equal(df_a.drop(columns="path"), df_b.drop(columns="path"))
    assert (df_a["path"] != df_b["path"]).all()


def test_digits_rerender_is_idempotent_and_repairs(digits_pair):
    ds, df, _, _ = digits_pair
    paths = [Path(p) for p in df["path"]]
    mtimes = [p.stat().st_mtime_ns for p in paths]
    fresh = DigitsDataset(ds.image_dir)
    pd.testing.assert_frame_equal(fresh.samples(), df)
    assert fresh.files_written == 0
    assert [p.stat().st_mtime_ns for p in paths] == mtimes

    good = paths[3].read_bytes()
    paths[3].write_bytes(good[: len(good) // 2])  # a half file from an older, killed writer
    paths[7].unlink()
    again = DigitsDataset(ds.image_dir)
    pd.testing.assert_frame_equal(again.render(), df)
    assert again.files_written == 2
    assert paths[3].read_bytes() == good and paths[7].exists()
    assert not [p for p in ds.image_dir.rglob(".*")]  # no temporary files left behind


def test_digits_options(tmp_path):
    ds = DigitsDataset(tmp_path, image_size=16, test_fraction=0.25, seed=3, resample="bicubic")
    df = ds.samples()
    assert (df["width"] == 16).all() and (df["height"] == 16).all()
    with Image.open(df["path"].iloc[0]) as img:
        assert img.size == (16, 16)
    assert int((df["split"] == "test").sum()) == int(np.ceil(0.25 * N_DIGITS))
    with pytest.raises(ValueError, match="test_fraction"):
        DigitsDataset(tmp_path, test_fraction=1.0)
    with pytest.raises(ValueError, match="resample"):
        DigitsDataset(tmp_path, resample="lanczos")


def test_digits_seed_changes_split_only(tmp_path, digits_pair):
    _, df, _, _ = digits_pair
    other = DigitsDataset(tmp_path, seed=1).samples().set_index("source_index").sort_index()
    base = df.set_index("source_index").sort_index()
    assert other["sha256"].equals(base["sha256"])
    assert (other["split"] != base["split"]).any()
    assert other.groupby("class_name")["split"].value_counts().sum() == N_DIGITS


# --------------------------------------------------------------------------- image folders


@pytest.fixture()
def class_layout(tmp_path):
    root = tmp_path / "pets"
    for i in range(4):
        write_png(root / "cat" / f"c{i}.png", value=i)
    for i in range(5):
        write_jpeg(root / "dog" / f"d{i}.jpg", seed=i)
    write_png(root / "dog" / "sub" / "deep.PNG", value=9)  # nested, upper-case extension
    write_png(root / "owl" / "only.png", value=7)
    (root / "cat" / ".hidden.png").write_bytes(b"not an image")
    (root / "cat" / "notes.txt").write_text("ignored")
    (root / ".cache").mkdir()
    write_png(root / ".cache" / "x.png")
    return root


def test_folder_class_layout(class_layout):
    ds = ImageFolderDataset(class_layout)
    df = ds.samples()
    assert_schema(df)
    assert ds.name == "pets" and ds.layout == "class" and ds.skipped_classes == []
    assert (df["dataset"] == "pets").all()
    assert df["source_index"].tolist() == list(range(len(df)))
    assert sorted(df["rel_path"]) == sorted(
        [f"cat/c{i}.png" for i in range(4)]
        + [f"dog/d{i}.jpg" for i in range(5)]
        + ["dog/sub/deep.PNG", "owl/only.png"]
    )
    assert (df["status"] == "ok").all()
    split = df.groupby("class_name")["split"].value_counts().unstack(fill_value=0)
    assert split.loc["cat"].to_dict() == {"test": 2, "train": 2}
    assert split.loc["dog"].to_dict() == {"test": 3, "train": 3}  # round(6 * 0.5) = 3
    assert split.loc["owl"].to_dict() == {"test": 0, "train": 1}  # a single image trains
    cat = df[df["class_name"] == "cat"].iloc[0]
    assert (cat["width"], cat["height"]) == (12, 10)
    assert cat["sha256"] == sha(Path(cat["path"]))
    assert cat["path"] == str(class_layout / cat["rel_path"])
    dog = df[df["rel_path"] == "dog/d0.jpg"].iloc[0]
    assert (dog["width"], dog["height"]) == (48, 40)


def test_folder_split_is_seeded_and_stable(class_layout, tmp_path):
    df = ImageFolderDataset(class_layout, seed=0).samples()
    pd.testing.assert_frame_equal(ImageFolderDataset(class_layout, seed=0).samples(), df)
    # adding a class leaves the other classes' splits unchanged
    for i in range(3):
        write_png(class_layout / "ant" / f"a{i}.png", value=20 + i)
    bigger = ImageFolderDataset(class_layout, seed=0).samples()
    old = df.set_index("rel_path")["split"]
    assert bigger.set_index("rel_path")["split"].loc[old.index].equals(old)
    # another seed shuffles differently for some class (checked over a bigger class)
    for i in range(20):
        write_png(class_layout / "bee" / f"b{i:02d}.png", value=40 + i)
    s0 = ImageFolderDataset(class_layout, seed=0).samples()
    s1 = ImageFolderDataset(class_layout, seed=1).samples()
    test0 = set(s0.loc[s0["split"] == "test", "rel_path"])
    test1 = set(s1.loc[s1["split"] == "test", "rel_path"])
    assert test0 != test1 and len(test0) == len(test1)


def test_folder_split_layout(tmp_path):
    root = tmp_path / "ds"
    write_png(root / "train" / "a" / "1.png", value=1)
    write_png(root / "train" / "a" / "2.png", value=2)
    write_png(root / "train" / "b" / "1.png", value=3)
    write_png(root / "test" / "a" / "3.png", value=4)
    write_png(root / "test" / "c" / "1.png", value=5)
    ds = ImageFolderDataset(root, name="mine")
    df = ds.samples()
    assert_schema(df)
    assert ds.layout == "split" and ds.name == "mine"
    assert list(zip(df["class_name"], df["split"], df["rel_path"])) == [
        ("a", "test", "test/a/3.png"),
        ("a", "train", "train/a/1.png"),
        ("a", "train", "train/a/2.png"),
        ("b", "train", "train/b/1.png"),
        ("c", "test", "test/c/1.png"),
    ]
    assert (df["dataset"] == "mine").all() and (df["status"] == "ok").all()


def test_folder_corrupt_and_truncated_images_are_skipped_rows(class_layout):
    clean = ImageFolderDataset(class_layout).samples()
    corrupt = class_layout / "cat" / "garbage.png"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    jpeg = write_jpeg(class_layout / "dog" / "cut.jpg", seed=99, size=(64, 64)).read_bytes()
    (class_layout / "dog" / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])

    df = ImageFolderDataset(class_layout).samples()
    assert_schema(df)
    assert len(df) == len(clean) + 2
    bad = df[df["status"] == "skipped"].set_index("rel_path")
    assert sorted(bad.index) == ["cat/garbage.png", "dog/cut.jpg"]
    for rel, row in bad.iterrows():
        assert row["skip_reason"].startswith("cannot decode image: "), row["skip_reason"]
        assert "\n" not in row["skip_reason"] and str(class_layout) not in row["skip_reason"]
        assert (row["width"], row["height"]) == (0, 0)
        assert row["sha256"] == sha(class_layout / rel)  # the bytes are readable
    assert "truncated" in bad.loc["dog/cut.jpg", "skip_reason"]
    # the other rows are unaffected (a skipped row still counts towards its class's split
    # sizes, so compare everything but the split and the running number)
    cols = ["rel_path", "path", "class_name", "status", "skip_reason", "sha256", "width", "height"]
    good = df.loc[df["status"] == "ok", cols].sort_values("rel_path").reset_index(drop=True)
    pd.testing.assert_frame_equal(good, clean[cols].sort_values("rel_path").reset_index(drop=True))
    assert "0x" not in bad.loc["cat/garbage.png", "skip_reason"]  # no object addresses

    with pytest.raises(ImageReadError, match=r"^cannot decode image .*garbage\.png: \S"):
        read_image(corrupt)
    with pytest.raises(ImageReadError, match=r"cut\.jpg: .*truncated"):
        read_image(class_layout / "dog" / "cut.jpg")


def test_folder_symlinks(class_layout, tmp_path):
    outside = write_png(tmp_path / "outside" / "secret.png", value=3)
    (class_layout / "cat" / "escape.png").symlink_to(outside)
    (class_layout / "cat" / "inside.png").symlink_to(class_layout / "cat" / "c0.png")
    df = ImageFolderDataset(class_layout).samples().set_index("rel_path")
    esc = df.loc["cat/escape.png"]
    assert esc["status"] == "skipped" and "symlink escapes dataset root" in esc["skip_reason"]
    assert esc["sha256"] == "" and esc["width"] == 0
    assert df.loc["cat/inside.png", "status"] == "ok"
    assert df.loc["cat/inside.png", "sha256"] == df.loc["cat/c0.png", "sha256"]


@pytest.mark.parametrize("through", ["root", "parent"])
def test_folder_root_reached_through_a_symlink_catalogues_normally(class_layout, tmp_path, through):
    from swsa_store.catalog import catalog_dataset

    if through == "root":  # the root itself is a symlink
        root = tmp_path / "pets_link"
        root.symlink_to(class_layout)
    else:  # a folder above the root is a symlink
        (tmp_path / "above").symlink_to(class_layout.parent)
        root = tmp_path / "above" / class_layout.name
    direct = ImageFolderDataset(class_layout).samples()
    linked = ImageFolderDataset(root).samples()
    assert (linked["status"] == "ok").all() and len(linked) == len(direct)
    assert all(p.startswith(str(root) + os.sep) for p in linked["path"])  # the path as given, not resolved
    cols = ["rel_path", "class_name", "split", "sha256", "width", "height"]
    pd.testing.assert_frame_equal(linked[cols], direct[cols])
    summary = catalog_dataset(tmp_path / "s.h5", "folder", root=root, n_seed=1)
    assert summary["skipped_images"] == 0 and summary["tasks"] == 3  # (owl's one image gives no test: skipped task)


def test_folder_class_whose_images_are_all_skipped_is_an_error(class_layout, tmp_path):
    for path in (class_layout / "dog").rglob("*.*"):
        path.write_bytes(b"not an image at all")
    with pytest.raises(ValueError) as info:
        ImageFolderDataset(class_layout).samples()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"dataset 'pets' under {class_layout}: every image of class 'dog' was skipped (6 rows): "
                              "cannot decode image (6x, e.g. dog/d0.jpg: cannot decode image: UnidentifiedImageError")
    assert message.endswith("fix or remove those files, or leave the class out")
    # a class folder that is a symlink leading out of the root: every image escapes; the error says how to fix it
    outside = tmp_path / "elsewhere" / "fox"
    write_png(outside / "f0.png", value=1)
    write_png(outside / "f1.png", value=2)
    good = tmp_path / "good"
    write_png(good / "cat" / "c0.png")
    (good / "fox").symlink_to(outside)
    with pytest.raises(ValueError, match=r"every image of class 'fox' was skipped \(2 rows\): symlink escapes dataset "
                                         r"root \(2x, e\.g\. fox/f0\.png: .*\); files \(or class folders\) that are "
                                         r"symlinks leading outside the root are not read; point root at"):
        ImageFolderDataset(good).samples()


def test_folder_empty_class_is_recorded(class_layout, caplog):
    (class_layout / "empty").mkdir()
    (class_layout / "only_hidden").mkdir()
    (class_layout / "only_hidden" / ".DS_Store").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="swsa_store.datasets"):
        ds = ImageFolderDataset(class_layout)
    assert [c for c, _ in ds.skipped_classes] == ["empty", "only_hidden"]
    assert all("no image files" in reason for _, reason in ds.skipped_classes)
    assert "empty" in caplog.text and "no image files" in caplog.text
    assert not set(ds.samples()["class_name"]) & {"empty", "only_hidden"}


def test_folder_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=r"nope does not exist; expected root/<class>/"):
        ImageFolderDataset(missing)
    flat = tmp_path / "flat"
    write_png(flat / "a.png")
    with pytest.raises(ValueError, match=r"no class folders in dataset root .*flat; expected root/"):
        ImageFolderDataset(flat)
    no_classes = tmp_path / "splits"
    (no_classes / "train").mkdir(parents=True)
    write_png(no_classes / "train" / "a.png")
    with pytest.raises(ValueError, match="no class folders under train/"):
        ImageFolderDataset(no_classes)
    mixed = tmp_path / "mixed"
    write_png(mixed / "train" / "a" / "1.png")
    write_png(mixed / "cat" / "1.png")
    with pytest.raises(ValueError, match="ambiguous layout"):
        ImageFolderDataset(mixed)
    with pytest.raises(NotADirectoryError, match="not a directory"):
        ImageFolderDataset(flat / "a.png")


# --------------------------------------------------------------------------- read_image, registry


def test_read_image(tmp_path):
    grey = tmp_path / "g.png"
    Image.fromarray(np.full((5, 7), 200, dtype=np.uint8)).save(grey)
    img = read_image(grey)
    assert img.mode == "RGB" and img.size == (7, 5)
    assert np.asarray(img)[0, 0].tolist() == [200, 200, 200]
    with pytest.raises(ImageReadError, match=r"^cannot decode image .*missing\.png: No such file"):
        read_image(tmp_path / "missing.png")
    assert issubclass(ImageReadError, ValueError)


def test_registry(tmp_path, class_layout):
    assert {"digits", "folder"} <= set(list_datasets())
    ds = create_dataset("digits", image_dir=tmp_path / "d", image_size=8)
    assert isinstance(ds, DigitsDataset) and isinstance(ds, Dataset) and ds.name == "digits"
    folder = create_dataset("folder", root=class_layout)
    assert isinstance(folder, ImageFolderDataset) and isinstance(folder, Dataset)
    with pytest.raises(UnknownNameError, match=r"Did you mean 'digits'.*digits, .*folder"):
        create_dataset("digit")
