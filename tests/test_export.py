"""`swsa export-validation --format anomalib-folder`: layout, manifest = task members, bytes
identical to the store's files, idempotent reruns, one-line errors."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from swsa_engine.app.cli import main
from swsa_store import open_store
from swsa_store.catalog import catalog_dataset, resolve_path
from swsa_store.export import MANIFEST_COLUMNS, export_validation, task_dir_name
from swsa_store.synthesize import synthesize
from swsa_store.tasks import ROLES


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    path = root / "s.h5"
    catalog_dataset(path, "digits", image_dir=root / "img", image_size=16, n_seed=4)
    synthesize(path, "cutpaste", count=5, progress=False)
    return path


def _tables(store):
    with open_store(store) as s:
        return s.images().set_index("image_id", drop=False), s.tasks(), s.task_members()


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_layout_manifest_and_bytes(store, tmp_path):
    out = tmp_path / "out"
    summary = export_validation(store, out)
    images, tasks, members = _tables(store)
    assert summary["tasks"] == 10 and summary["copied"] == 0 and summary["linked"] == summary["files"]
    assert summary["overlapping_tasks"] == []
    manifest = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    assert list(manifest.columns) == MANIFEST_COLUMNS
    for task in tasks.itertuples():
        name = task_dir_name(task.task_id, task.dataset, task.normal_class)
        assert name == f"{task.task_id:05d}_digits_{task.normal_class}"
        folder = out / name
        assert {p.name for p in folder.iterdir()} == {"manifest.csv", "train", "val", "test"}
        assert {p.name for p in (folder / "val").iterdir()} == {"good", "cutpaste"}
        assert {p.name for p in (folder / "train").iterdir()} == {"good"}
        others = {c for c in tasks["normal_class"] if c != task.normal_class}
        assert {p.name for p in (folder / "test").iterdir()} == {"good"} | others
        rows = manifest[manifest["task"] == task.task_id]
        local = pd.read_csv(folder / "manifest.csv", keep_default_na=False)
        assert sorted(name + "/" + local["file"]) == sorted(rows["file"])
        assert list(local.columns) == MANIFEST_COLUMNS
        # the non-synthetic rows are exactly the task's members (image, role, group)
        mine = members[members["task_id"] == task.task_id]
        expected = sorted(zip(mine["image_id"], mine["role"].map(ROLES), mine["group"]))
        real = rows[rows["role"] != "synthetic"]
        assert sorted(zip(real["image_id"], real["role"], real["group"])) == expected
        # where each role goes, with its label
        where = {role: set(zip(r["split"], r["label"])) for role, r in rows.groupby("role")}
        assert where == {"seed": {("train", 0)}, "heldout": {("val", 0)}, "real_normal": {("test", 0)},
                         "real_anomaly": {("test", 1)}, "synthetic": {("val", 1)}}
        assert not rows.loc[rows["split"] == "val", "in_train"].any()
        # every synthetic image of the task, under val/<generator>
        synth = images[(images["task_id"] == task.task_id) & (images["kind"] != "real")]
        got = rows[rows["role"] == "synthetic"]
        assert sorted(got["image_id"]) == sorted(synth["image_id"]) and set(got["generator"]) == {"cutpaste"}
        assert all(f.startswith(f"{name}/val/cutpaste/") for f in got["file"])
        # files on disk == manifest; bytes identical to (hard links of) the store's files
        on_disk = {p.relative_to(out).as_posix() for p in folder.rglob("*.png")}
        assert on_disk == set(rows["file"])
        for file, image_id in zip(rows["file"], rows["image_id"]):
            src = resolve_path(store, images.at[image_id, "path"])
            assert (out / file).read_bytes() == src.read_bytes()
            assert os.path.samefile(out / file, src)
            assert file.endswith(f"/{image_id:07d}.png")


def test_rerun_is_idempotent_and_subsets_keep_other_tasks(store, tmp_path):
    out = tmp_path / "out"
    export_validation(store, out)
    before, manifest = _snapshot(out), (out / "manifest.csv").read_bytes()
    again = export_validation(store, out)
    assert again["linked"] == again["copied"] == again["removed"] == 0 and again["unchanged"] == again["files"]
    assert _snapshot(out) == before and (out / "manifest.csv").read_bytes() == manifest
    # exporting one task again leaves the others (and the root manifest) as they were
    one = export_validation(store, out, tasks=["3"])
    assert one["tasks"] == 1 and one["unchanged"] == one["files"]
    assert _snapshot(out) == before and (out / "manifest.csv").read_bytes() == manifest
    # a changed or missing file is put back
    victim = next((out / "00003_digits_3" / "val" / "cutpaste").iterdir())
    victim.unlink()
    assert export_validation(store, out, tasks=[3])["linked"] == 1
    assert victim.exists()


def test_subset_copy_and_options(store, tmp_path):
    out = tmp_path / "out"
    summary = export_validation(store, out, tasks=[2, "00005_digits_5"], link=False, include_test=False)
    assert summary["tasks"] == 2 and summary["linked"] == 0 and summary["copied"] == summary["files"]
    assert sorted(p.name for p in out.iterdir()) == ["00002_digits_2", "00005_digits_5", "manifest.csv"]
    assert not (out / "00002_digits_2" / "test").exists()
    manifest = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    assert set(manifest["task"]) == {2, 5} and set(manifest["split"]) == {"train", "val"}
    for file in manifest["file"]:
        assert (out / file).stat().st_nlink == 1  # copies, not links
    # train="support": the held-out normals are also training images (swsa's kNN bank)
    support = export_validation(store, out, tasks=[2], train="support", include_test=False)
    assert support["removed"] == 0
    local = pd.read_csv(out / "00002_digits_2" / "manifest.csv", keep_default_na=False)
    _, tasks, members = _tables(store)
    n_support = int(tasks.loc[tasks["task_id"] == 2, "n_support"].iloc[0])
    assert (local["split"] == "train").sum() == n_support
    assert local.loc[(local["split"] == "val") & (local["label"] == 0), "in_train"].all()
    # back to disjoint: the extra training links of the earlier export are removed
    back = export_validation(store, out, tasks=[2], include_test=False)
    assert back["removed"] == n_support - 4
    assert len(list((out / "00002_digits_2" / "train" / "good").iterdir())) == 4


def test_seeds_that_are_heldout_are_flagged(tmp_path):
    store = tmp_path / "s.h5"
    catalog_dataset(store, "digits", image_dir=tmp_path / "img", image_size=16, n_seed=200)  # support < n_seed
    summary = export_validation(store, tmp_path / "out", tasks=[0], include_test=False)
    assert summary["overlapping_tasks"] == [0]
    local = pd.read_csv(tmp_path / "out" / "00000_digits_0" / "manifest.csv", keep_default_na=False)
    assert (local["split"] == "train").sum() == (local["split"] == "val").sum() > 0
    assert local["in_train"].all()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tasks", "99"], "unknown task '99'"),
        (["--tasks", "3,nope"], "unknown task 'nope'"),
        (["--format", "mvtec"], "unknown export format 'mvtec'; valid formats: anomalib-folder"),
        (["--train", "all"], "unknown train mode 'all'"),
    ],
)
def test_cli_errors_are_one_line(store, tmp_path, capsys, argv, message):
    assert main(["export-validation", "--store", str(store), str(tmp_path / "out"), *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_cli_export_and_api_errors(store, tmp_path, capsys):
    assert main(["export-validation", "--store", str(store), str(tmp_path / "out"), "--tasks", "1", "--quiet"]) == 0
    assert "export-validation: out=" in capsys.readouterr().out
    assert (tmp_path / "out" / "00001_digits_1" / "val" / "cutpaste").is_dir()
    assert main(["export-validation", "--store", str(tmp_path / "none.h5"), str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("swsa: error: store") and len(err.splitlines()) == 1
    assert main(["export-validation", "--store", str(store), str(tmp_path / "o"), "--tasks", "42"]) == 1
    err = capsys.readouterr().err.strip()
    assert "unknown task '42'" in err and len(err.splitlines()) == 1
    with pytest.raises(ValueError, match="unknown export format"):
        export_validation(store, tmp_path / "o", format="yolo")
    with pytest.raises(ValueError, match="unknown train mode"):
        export_validation(store, tmp_path / "o", train="all")
