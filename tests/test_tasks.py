"""Task construction: support / seed / held-out split, real validation, skips, determinism."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from swsa_store.tasks import (
    ROLE_HELDOUT, ROLE_REAL_ANOMALY, ROLE_REAL_NORMAL, ROLE_SEED, build_tasks, members_of,
)


def _catalog(counts: dict[str, tuple[int, int]], dataset="d") -> pd.DataFrame:
    rows = []
    for class_name, (n_train, n_test) in counts.items():
        rows += [{"class_name": class_name, "split": "train"}] * n_train
        rows += [{"class_name": class_name, "split": "test"}] * n_test
    table = pd.DataFrame(rows)
    table["image_id"] = np.arange(len(table))
    table["dataset"] = dataset
    table["kind"] = "real"
    table["status"] = "ok"
    return table


def test_split_sizes_and_roles():
    images = _catalog({"a": (30, 10), "b": (25, 8), "c": (12, 5)})
    tasks, members = build_tasks(images, "d", n_seed=20, seed=3)
    assert list(tasks["normal_class"]) == ["a", "b", "c"]
    a = tasks.iloc[0]
    assert (a.n_support, a.n_seed, a.n_heldout, a.n_real_normal, a.n_real_anomaly) == (30, 20, 10, 10, 13)
    assert not a.seeds_are_heldout
    seeds, heldout = members_of(members, 0, ROLE_SEED), members_of(members, 0, ROLE_HELDOUT)
    support = images[(images.class_name == "a") & (images.split == "train")].image_id.to_numpy()
    assert len(np.intersect1d(seeds, heldout)) == 0
    np.testing.assert_array_equal(np.union1d(seeds, heldout), support)
    normal = members_of(members, 0, ROLE_REAL_NORMAL)
    anomaly = members_of(members, 0, ROLE_REAL_ANOMALY)
    assert set(images.loc[normal, "class_name"]) == {"a"} and set(images.loc[normal, "split"]) == {"test"}
    assert set(images.loc[anomaly, "class_name"]) == {"b", "c"} and set(images.loc[anomaly, "split"]) == {"test"}
    assert tasks.iloc[0].n_out_classes == 2
    anomaly_rows = members[(members.task_id == 0) & (members.role == ROLE_REAL_ANOMALY)]
    np.testing.assert_array_equal(anomaly_rows["group"].to_numpy(), images.loc[anomaly_rows["image_id"], "class_name"].to_numpy())
    assert (members.loc[members.role != ROLE_REAL_ANOMALY, "group"] == "").all()


def test_small_support_makes_every_image_seed_and_heldout():
    images = _catalog({"a": (10, 4), "b": (10, 4)})
    tasks, members = build_tasks(images, "d", n_seed=20)
    assert tasks["seeds_are_heldout"].all()
    np.testing.assert_array_equal(members_of(members, 0, ROLE_SEED), members_of(members, 0, ROLE_HELDOUT))
    assert tasks.iloc[0].n_seed == tasks.iloc[0].n_heldout == 10


def test_split_is_seeded_and_deterministic():
    images = _catalog({"a": (40, 4), "b": (40, 4)})
    _, m1 = build_tasks(images, "d", n_seed=20, seed=0)
    _, m2 = build_tasks(images, "d", n_seed=20, seed=0)
    _, m3 = build_tasks(images, "d", n_seed=20, seed=1)
    pd.testing.assert_frame_equal(m1, m2)
    assert not np.array_equal(members_of(m1, 0, ROLE_SEED), members_of(m3, 0, ROLE_SEED))


def test_skipped_images_and_unscoreable_tasks_are_recorded():
    images = _catalog({"a": (5, 3), "b": (0, 3), "c": (4, 0)})
    images.loc[0, "status"] = "skipped"
    tasks, members = build_tasks(images, "d", n_seed=2)
    by_class = tasks.set_index("normal_class")
    assert by_class.loc["a", "n_support"] == 4  # the skipped image is in no task
    assert 0 not in members["image_id"].to_numpy()
    assert by_class.loc["b", "status"] == "skipped"
    assert "no training images" in by_class.loc["b", "skip_reason"]
    assert by_class.loc["c", "status"] == "skipped"
    assert "one class" in by_class.loc["c", "skip_reason"]


def test_one_class_dataset_is_a_recorded_skip():
    tasks, _ = build_tasks(_catalog({"only": (10, 5)}), "d", n_seed=3)
    assert tasks.iloc[0].status == "skipped"
    assert "real validation has one class" in tasks.iloc[0].skip_reason


def test_errors():
    with pytest.raises(ValueError, match="n_seed must be at least 1"):
        build_tasks(_catalog({"a": (3, 3)}), "d", n_seed=0)
    with pytest.raises(ValueError, match="has no catalogued images"):
        build_tasks(_catalog({"a": (3, 3)}), "other")
