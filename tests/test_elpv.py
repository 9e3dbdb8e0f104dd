"""ELPV solar cells (the installed elpv-dataset package) and one-vs-rest over chosen anomaly groups."""

from __future__ import annotations

import collections
import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from swsa_engine.run.task_groups import TaskGroup, build_task_groups, pad_rows, rest_mask
from swsa_engine.run.prompt_sweep import score_group_candidates
from swsa_engine.run.knn_sweep import score_group
from swsa_store import edit_store, open_store
from swsa_store.catalog import catalog_dataset
from swsa_store.datasets import create_dataset
from swsa_store.datasets.elpv import ELPV_LICENCE, ElpvDataset, elpv_bucket, elpv_data_root
from swsa_store.datasets.base import PAPER_SAMPLE_COLUMNS
from swsa_store.tasks import ROLE_HELDOUT, ROLE_REAL_ANOMALY, ROLE_REAL_NORMAL, ROLE_SEED, build_tasks

BUCKETS = {0: "good", 1: "p=1/3", 2: "p=2/3", 3: "p=1"}
SMALL = {"n_support": 30, "n_test_normal": 20, "n_anomaly": 10}
#: The counts the ELPV paper and the package's README give.
PUBLISHED = {("mono", "good"): 588, ("mono", "p=1/3"): 117, ("mono", "p=2/3"): 56, ("mono", "p=1"): 313,
             ("poly", "good"): 920, ("poly", "p=1/3"): 178, ("poly", "p=2/3"): 50, ("poly", "p=1"): 402}


def _csv_counts(labels: Path) -> collections.Counter:
    """(cell type, bucket) counts straight from labels.csv with the csv module."""
    counts = collections.Counter()
    with open(labels, newline="") as fh:
        for row in csv.reader(fh, delimiter=" ", skipinitialspace=True):
            fields = [f for f in row if f]
            if fields:
                counts[(fields[2], BUCKETS[round(float(fields[1]) * 3)])] += 1
    return counts


@pytest.fixture(scope="module")
def full_table():
    """Every image of the package, decoded once (about 3 s)."""
    dataset = create_dataset("elpv")
    return dataset, dataset.samples()


def test_counts_equal_labels_csv(full_table):
    dataset, table = full_table
    data_root, version = elpv_data_root()
    expected = _csv_counts(data_root / "labels.csv")
    assert expected == collections.Counter(PUBLISHED)
    assert collections.Counter(zip(table["class_name"], table["defect"])) == expected
    assert {(t, d): n for t, by in dataset.label_counts().items() for d, n in by.items()} == expected
    assert (table["status"] == "ok").all() and (table[["width", "height"]] == 300).all().all()
    # every defective cell is test; each type's normals are split in halves (train = support)
    assert (table.loc[table["defect"] != "good", "split"] == "test").all()
    normals = table[table["defect"] == "good"].groupby(["class_name", "split"]).size()
    assert normals.to_dict() == {("mono", "test"): 294, ("mono", "train"): 294,
                                 ("poly", "test"): 460, ("poly", "train"): 460}
    # read in place, provenance recorded
    assert all(p.startswith(str(data_root)) for p in table["path"])
    assert dataset.source_package == "elpv-dataset" and dataset.source_version == version != ""
    assert dataset.licence == ELPV_LICENCE == "CC BY-NC-SA 4.0" and "Deitsch" in dataset.citation
    about = ElpvDataset.describe()
    assert about["images"] == 2624 and about["licence"] == "CC BY-NC-SA 4.0" and about["source_version"] == version


def test_samples_table_columns_and_dtypes():
    table = create_dataset("elpv", **SMALL).samples()
    assert list(table.columns) == list(PAPER_SAMPLE_COLUMNS) + ["defect_probability"]
    for column, dtype in PAPER_SAMPLE_COLUMNS.items():
        if dtype == "int64":
            assert table[column].dtype == np.int64, column
        else:
            assert pd.api.types.is_string_dtype(table[column].dtype), column
    assert table["defect_probability"].dtype == np.float64
    keys = list(zip(table["class_name"], table["split"], table["rel_path"]))
    assert keys == sorted(keys) and list(table.index) == list(range(len(table)))
    assert set(table["class_name"]) == {"mono", "poly"} and (table["dataset"] == "elpv").all()
    thirds = np.rint(table["defect_probability"] * 3).astype(int)
    assert list(table["defect"]) == [BUCKETS[t] for t in thirds]
    # source_index is the row of labels.csv (the index into elpv_dataset.load_dataset's arrays)
    assert (table["rel_path"] == [f"images/cell{i + 1:04d}.png" for i in table["source_index"]]).all()


def test_caps_are_respected_seeded_and_nested():
    entries = ElpvDataset(**SMALL).entries()
    sizes = entries.groupby(["class_name", "split", "defect"]).size().to_dict()
    for cell in ("mono", "poly"):
        assert sizes[(cell, "train", "good")] == 30 and sizes[(cell, "test", "good")] == 20
        assert all(sizes[(cell, "test", b)] == 10 for b in ("p=1/3", "p=2/3", "p=1"))
    # a cap above a bucket's size takes it all
    big = ElpvDataset(n_anomaly=100).entries()
    assert (big[(big["class_name"] == "poly") & (big["defect"] == "p=2/3")].shape[0]) == 50
    # a larger cap only adds rows; the split does not depend on the caps
    larger = ElpvDataset(n_support=60, n_test_normal=40, n_anomaly=20).entries()
    key = ["rel_path", "split"]
    assert set(map(tuple, entries[key].to_numpy())) < set(map(tuple, larger[key].to_numpy()))
    full = ElpvDataset().entries().set_index("rel_path")["split"]
    assert (full.loc[entries["rel_path"]].to_numpy() == entries["split"].to_numpy()).all()


def test_same_seed_same_table_other_seed_other_split():
    a = create_dataset("elpv", **SMALL).samples()
    b = create_dataset("elpv", **SMALL).samples()
    pd.testing.assert_frame_equal(a, b)
    other = ElpvDataset(**SMALL, seed=1).entries()
    train = set(a.loc[a["split"] == "train", "rel_path"])
    assert train != set(other.loc[other["split"] == "train", "rel_path"])
    # the full split moves too, not only the capped subsets
    full0, full1 = ElpvDataset().entries(), ElpvDataset(seed=1).entries()
    assert set(full0.loc[full0["split"] == "train", "rel_path"]) != set(full1.loc[full1["split"] == "train", "rel_path"])


def _members(store):
    with open_store(store) as s:
        return s.images(), s.tasks(), s.task_members()


def test_tasks_support_test_normals_and_anomaly_groups(tmp_path):
    store = tmp_path / "s.h5"
    summary = catalog_dataset(store, "elpv", n_seed=10, **SMALL)
    assert summary["tasks"] == 2 and summary["skipped_tasks"] == 0 and summary["images"] == 2 * (30 + 20 + 30)
    images, tasks, members = _members(store)
    assert sorted(tasks["normal_class"]) == ["mono", "poly"] and (tasks["protocol"] == "defect").all()
    assert (tasks["rest_groups"] == '["p=1"]').all()
    info = images.set_index("image_id")
    for task in tasks.itertuples():
        mine = members[members["task_id"] == task.task_id]
        support = set(mine.loc[mine["role"].isin([ROLE_SEED, ROLE_HELDOUT]), "image_id"])
        normals = set(mine.loc[mine["role"] == ROLE_REAL_NORMAL, "image_id"])
        anomalies = mine[mine["role"] == ROLE_REAL_ANOMALY]
        assert len(support) == 30 and len(normals) == 20 and len(anomalies) == 30 and not support & normals
        assert (info.loc[list(support), "split"] == "train").all() and (info.loc[list(support), "defect"] == "good").all()
        assert (info.loc[list(normals), "split"] == "test").all() and (info.loc[list(normals), "defect"] == "good").all()
        # anomalies only in real validation, grouped by bucket, all of the task's own cell type
        defective = set(info.index[(info["defect"] != "good") & (info["class_name"] == task.normal_class)])
        assert set(anomalies["image_id"]) == defective and not defective & (support | normals)
        assert list(anomalies["group"]) == list(info.loc[anomalies["image_id"], "defect"])
        assert set(anomalies["group"]) == {"p=1/3", "p=2/3", "p=1"}
        assert (info.loc[list(support | normals | defective), "class_name"] == task.normal_class).all()
    group = build_task_groups(images, tasks, members)[0]
    assert list(group.group_names) == ["p=1", "p=1/3", "p=2/3"]
    assert group.group_in_rest.tolist() == [[True, False, False]] * 2
    with open_store(store) as s:
        assert "no official split" in json.loads(s.table_attrs("tasks")["validation_sources"])["elpv"]


def test_anomalies_two_thirds_admits_p_two_thirds(tmp_path):
    store = tmp_path / "s.h5"
    catalog_dataset(store, "elpv", anomalies="2/3", n_seed=5, n_support=10, n_test_normal=5, n_anomaly=3)
    images, tasks, members = _members(store)
    assert (tasks["rest_groups"] == '["p=1", "p=2/3"]').all()
    assert build_task_groups(images, tasks, members)[0].group_in_rest.tolist() == [[True, False, True]] * 2


@pytest.mark.parametrize("kwargs, message", [
    ({"anomalies": "1/3"}, r"^anomalies must be one of \['1', '2/3'\] .*got '1/3'$"),
    ({"anomalies": 1}, r"^anomalies must be one of"),
    ({"n_support": 0}, r"^n_support must be a positive integer or None \(all images\), got 0$"),
    ({"n_anomaly": 2.5}, r"^n_anomaly must be a positive integer"),
    ({"test_fraction": 1.0}, r"^test_fraction must be strictly between 0 and 1, got 1.0$"),
    ({"seed": -1}, r"^seed must be a non-negative integer"),
])
def test_bad_options_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        ElpvDataset(**kwargs)
    assert "\n" not in str(info.value)


def _write_root(root: Path, lines: list[str], n_images: int) -> Path:
    (root / "images").mkdir(parents=True)
    for i in range(1, n_images + 1):
        Image.fromarray(np.full((6, 6), i * 7 % 256, dtype=np.uint8)).save(root / "images" / f"cell{i:04d}.png")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def test_malformed_rows_are_recorded_skips(tmp_path):
    lines = [f"images/cell{i:04d}.png  0.0  mono" for i in range(1, 7)]
    lines += ["images/cell0007.png  0.3333333333333333  mono", "images/cell0008.png  0.333  mono",
              "images/cell0009.png  1.0  mono",
              "images/cell0010.png  0.5  mono",               # not a third: a skipped row
              "images/cell0011.png  abc  mono",               # not a number: a skipped row
              "images/cell0012.png  1.0",                     # two fields: a skipped entry
              "", "images/cell0001.png  1.0  mono",           # a repeated path: a skipped entry
              "images/cell0013.png  1.0  mono", "images/missing.png  1.0  mono"]
    root = _write_root(tmp_path / "elpv", lines, 13)
    dataset = ElpvDataset(root)
    assert dataset.source_package == "" and dataset.source_version == ""
    table = dataset.samples().set_index("rel_path")
    skipped = table[table["status"] == "skipped"]
    assert "line 10: defect probability '0.5' is not 0, 1/3, 2/3 or 1" in skipped.loc["images/cell0010.png", "skip_reason"]
    assert "'abc' is not a number" in skipped.loc["images/cell0011.png", "skip_reason"]
    assert skipped.loc["images/missing.png", "skip_reason"].startswith("cannot read file")
    assert len(skipped) == 3
    assert table.loc["images/cell0008.png", "defect"] == "p=1/3"
    assert len(dataset.skipped_entries) == 2
    assert "line 12: expected '<path> <defect probability> <cell type>'" in dataset.skipped_entries[0]
    assert "line 14: images/cell0001.png is already listed on line 1" in dataset.skipped_entries[1]
    store = tmp_path / "s.h5"
    summary = catalog_dataset(store, "elpv", root=root, n_seed=2)
    assert summary["skipped_images"] == 3 and summary["tasks"] == 1
    with open_store(store) as s:
        reasons = list(s.skips()["reason"])
    assert any("line 12" in r for r in reasons) and any("already listed" in r for r in reasons)
    assert elpv_bucket("2/3")[0] == "p=2/3" and elpv_bucket("nan")[0] == "" and elpv_bucket("1.4")[0] == ""


def test_missing_root_or_package_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"^ELPV root .*nope does not exist or is not a folder; expected root/labels.csv"):
        ElpvDataset(tmp_path / "nope")
    (tmp_path / "empty" / "images").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"^ELPV: missing .*labels.csv; expected"):
        ElpvDataset(tmp_path / "empty")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "elpv_dataset" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"^ELPV: the elpv-dataset package is not installed; install it with "
                                                r"`pip install elpv-dataset`"):
        ElpvDataset()


def test_root_through_a_symlink_catalogues_normally(tmp_path):
    lines = [f"images/cell{i:04d}.png  {'0.0' if i <= 4 else '1.0'}  poly" for i in range(1, 7)]
    real = _write_root(tmp_path / "real", lines, 6)
    (tmp_path / "link").symlink_to(real)
    table = ElpvDataset(tmp_path / "link").samples()
    assert (table["status"] == "ok").all() and all(p.startswith(str(tmp_path / "link")) for p in table["path"])


def test_old_store_without_rest_groups_still_opens_and_appends(tmp_path):
    store = tmp_path / "s.h5"
    catalog_dataset(store, "elpv", n_seed=5, n_support=10, n_test_normal=5, n_anomaly=3)
    images, tasks, members = _members(store)
    with edit_store(store) as s:  # a store written before rest_groups existed
        s.replace_table("tasks", tasks.drop(columns="rest_groups"))
    images, old_tasks, members = _members(store)
    assert "rest_groups" not in old_tasks
    assert build_task_groups(images, old_tasks, members)[0].group_in_rest.all()  # every group, as before
    catalog_dataset(store, "elpv", name="elpv2", n_seed=5, n_support=12, n_test_normal=5, n_anomaly=3)
    _, tasks, _ = _members(store)
    assert list(tasks["rest_groups"]) == ["", "", '["p=1"]', '["p=1"]']


def test_build_tasks_rest_groups():
    rows = [("a", "train", "good")] * 4 + [("a", "test", "good")] * 2 + [("a", "test", "x"), ("a", "test", "y")]
    rows += [("b", "train", "good")] * 3 + [("b", "test", "good"), ("b", "test", "y")]
    images = pd.DataFrame(rows, columns=["class_name", "split", "defect"]).assign(
        image_id=np.arange(len(rows)), dataset="d", kind="real", status="ok")
    tasks, _ = build_tasks(images, "d", n_seed=2, protocol="defect")
    assert (tasks["rest_groups"] == "").all() and (tasks["status"] == "ok").all()
    tasks, _ = build_tasks(images, "d", n_seed=2, protocol="defect", rest_groups=["x"])
    assert list(tasks["rest_groups"]) == ['["x"]', '["x"]'] and list(tasks["status"]) == ["ok", "skipped"]
    assert tasks["skip_reason"].iloc[1] == "one-vs-rest has one class (no test anomalies in groups ['x'])"
    with pytest.raises(ValueError, match=r"^rest_groups must be a list of group names \(or None for all groups\), got 'x'$"):
        build_tasks(images, "d", protocol="defect", rest_groups="x")


# --------------------------------------------------------------------------- the engine


def _group(rng, n_tasks=4, n_groups=3, dim=5, layout="shared"):
    """Features and a TaskGroup whose tasks admit only some anomaly groups to one-vs-rest."""
    n_images = 300
    features = rng.normal(size=(n_images, dim)) + rng.integers(0, 3, size=(n_images, 1))
    ids = rng.permutation(n_images)
    support = [np.sort(ids[10 * t: 10 * t + 10]) for t in range(n_tasks)]
    heldout = [s[:4] for s in support]
    real_ids = np.sort(ids[100:190])
    if layout == "shared":
        label = rng.choice([-1, 0, 1], size=(n_tasks, len(real_ids)), p=[0.1, 0.3, 0.6])
    else:  # each task its own images
        owner = rng.integers(0, n_tasks, size=len(real_ids))
        label = np.where(owner[None, :] == np.arange(n_tasks)[:, None], rng.integers(0, 2, (n_tasks, len(real_ids))), -1)
    real_group = np.where(label == 1, rng.integers(0, n_groups, size=label.shape), -1)
    in_rest = np.array([[True, False, False], [True, True, False], [False, True, True], [True, True, True]])[:n_tasks]
    group = TaskGroup("d", np.arange(n_tasks), pad_rows(support), pad_rows(heldout), {}, real_ids,
                      label.astype(np.int8), real_group, np.array(["p=1", "p=1/3", "p=2/3"], dtype=object),
                      group_in_rest=in_rest)
    return features, group, support


def _expected(group, t, scores):
    """sklearn's one-vs-rest over normals + the admitted groups, and per group over every group."""
    label, groups = group.real_label[t], group.real_group[t]
    rest = (label == 0) | ((label == 1) & group.group_in_rest[t][np.maximum(groups, 0)])
    one_vs_rest = roc_auc_score(label[rest] == 1, scores[rest])
    per_class = []
    for g in range(len(group.group_names)):
        chosen = (label == 0) | ((label == 1) & (groups == g))
        y = label[chosen] == 1
        per_class.append(roc_auc_score(y, scores[chosen]) if 0 < y.sum() < len(y) else np.nan)
    return one_vs_rest, np.array(per_class)


@pytest.mark.parametrize("layout", ["shared", "per-task"])
def test_knn_one_vs_rest_uses_only_rest_groups(layout):
    features, group, support = _group(np.random.default_rng(3), layout=layout)
    out = score_group(features, np.ones(len(features), bool), group, [], k=2, hardest=())
    for t in range(len(group.task_ids)):
        bank = features[support[t]]
        scores = np.array([np.sort(((bank - features[i]) ** 2).sum(1))[:2].sum() for i in group.real_ids])
        one_vs_rest, per_class = _expected(group, t, scores)
        assert out["real"][t, 0] == pytest.approx(one_vs_rest, abs=1e-12)
        np.testing.assert_allclose(out["per_class"][t], per_class, atol=1e-12)
        assert out["real"][t, 1] == pytest.approx(np.nanmin(per_class), abs=1e-12)  # closest: every group
    # task 0 admits one group of three: its one-vs-rest differs from the all-groups AUROC
    everything = score_group(features, np.ones(len(features), bool),
                             TaskGroup(**{**group.__dict__, "group_in_rest": None}), [], k=2, hardest=())
    assert everything["real"][0, 0] != pytest.approx(out["real"][0, 0])
    np.testing.assert_allclose(everything["real"][:, 1], out["real"][:, 1])
    np.testing.assert_allclose(everything["real"][3], out["real"][3])  # task 3 admits every group


def test_candidate_scorer_one_vs_rest_uses_only_rest_groups():
    rng = np.random.default_rng(8)
    features, group, _ = _group(rng)
    table = rng.integers(0, 6, size=(2, len(features))).astype(float)  # two candidates, with ties

    def scorer(rows, query_ids, exclude):
        picked = table[:, np.maximum(query_ids, 0)]  # (C, Q) or (C, B, Q)
        return np.broadcast_to(picked, (len(rows),) + picked.shape) if query_ids.ndim == 1 else picked.transpose(1, 0, 2)

    out = score_group_candidates(scorer, group, np.ones(len(features), bool), [], 2, hardest=())
    for t in range(len(group.task_ids)):
        for c in range(2):
            one_vs_rest, per_class = _expected(group, t, table[c, group.real_ids])
            assert out["real"][t, c, 0] == pytest.approx(one_vs_rest, abs=1e-12)
            assert out["real"][t, c, 1] == pytest.approx(np.nanmin(per_class), abs=1e-12)


def test_rest_mask_and_group_in_rest_shape():
    _, group, _ = _group(np.random.default_rng(1))
    mask = rest_mask(group, np.arange(4))
    assert mask.shape == group.real_label.shape
    assert not (mask & (group.real_label < 0)).any()
    assert (mask[3] == (group.real_label[3] >= 0)).all()
    with pytest.raises(ValueError, match=r"group_in_rest must be \(tasks, groups\) = \(4, 3\), got \(4, 2\)"):
        TaskGroup(**{**group.__dict__, "group_in_rest": np.ones((4, 2), bool)})
