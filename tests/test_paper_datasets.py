"""The paper's datasets from their official layouts, their tasks, auxiliary outliers, paper config."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fixtures_paper import (
    MVTEC_FULL, VISA_FULL, make_cub, make_flowers, make_mvtec, make_tinyimagenet, make_visa,
)
from swsa_engine.app.cli import main as swsa_main
from swsa_store import open_store
from swsa_store.catalog import catalog_dataset
from swsa_store.datasets.class_names import FLOWERS_102_NAMES, clean_class_name
from swsa_store.datasets import SAMPLE_COLUMNS, create_dataset
from swsa_store.datasets.base import PAPER_SAMPLE_COLUMNS
from swsa_store.datasets.visa import visa_defect
from swsa_store.tasks import ROLE_HELDOUT, ROLE_REAL_ANOMALY, ROLE_REAL_NORMAL, ROLE_SEED

ROOT = Path(__file__).resolve().parents[1]


def assert_table(df: pd.DataFrame) -> None:
    assert list(df.columns) == list(PAPER_SAMPLE_COLUMNS)
    assert list(df.columns)[: len(SAMPLE_COLUMNS)] == list(SAMPLE_COLUMNS)
    keys = list(zip(df["class_name"], df["split"], df["rel_path"]))
    assert keys == sorted(keys)
    assert set(df["split"]) <= {"train", "test"}
    assert df["source_index"].dtype == np.int64


# --------------------------------------------------------------------------- class names


def test_class_names():
    assert clean_class_name("cub", "001.Black_footed_Albatross") == "black footed albatross"
    assert clean_class_name("visa", "pcb1") == "printed circuit board"
    assert clean_class_name("visa", "macaroni2") == "macaroni"
    assert clean_class_name("visa", "chewinggum") == "chewing gum"
    assert clean_class_name("visa", "pipe_fryum") == "pipe fryum"
    assert clean_class_name("mvtec", "metal_nut") == "metal nut"
    assert len(FLOWERS_102_NAMES) == len(set(FLOWERS_102_NAMES)) == 102
    assert FLOWERS_102_NAMES[0] == "pink primrose" and FLOWERS_102_NAMES[-1] == "blackberry lily"


# --------------------------------------------------------------------------- loaders


def test_cub_loader(tmp_path):
    info = make_cub(tmp_path / "CUB_200_2011")
    ds = create_dataset("cub", root=tmp_path / "CUB_200_2011")
    df = ds.samples()
    assert_table(df)
    assert len(df) == info["n_images"] and (df["status"] == "ok").all()
    counts = df.groupby(["class_name", "split"]).size().unstack()
    assert counts.loc["001.Black_footed_Albatross"].to_dict() == {"test": 5, "train": 24}
    assert counts.loc["003.Sooty_Albatross"].to_dict() == {"test": 3, "train": 6}
    assert ds.class_labels["001.Black_footed_Albatross"] == "black footed albatross"
    assert sorted(df["source_index"]) == list(range(1, info["n_images"] + 1))  # images.txt ids
    assert df["rel_path"].str.startswith("images/").all() and (df["defect"] == "").all()


def test_flowers_loader(tmp_path):
    info = make_flowers(tmp_path / "flowers102")
    ds = create_dataset("flowers", root=tmp_path / "flowers102")
    df = ds.samples()
    assert_table(df)
    assert info["trnid"] == info["valid"] == 30
    counts = df.groupby(["class_name", "split"]).size().unstack()
    assert list(counts.index) == sorted(FLOWERS_102_NAMES[:3])
    assert (counts["train"] == 10).all() and (counts["test"] == 10).all()  # tstid is not catalogued
    both = create_dataset("flowers", root=tmp_path / "flowers102", validation="valid+tstid").samples()
    assert (both["split"] == "test").sum() == info["valid"] + info["tstid"]
    tst = create_dataset("flowers", root=tmp_path / "flowers102", validation="tstid").samples()
    assert (tst["split"] == "test").sum() == info["tstid"]
    assert set(df.loc[df.split == "train", "source_index"]).isdisjoint(df.loc[df.split == "test", "source_index"])
    with pytest.raises(ValueError, match="validation must be one of"):
        create_dataset("flowers", root=tmp_path / "flowers102", validation="test")


def test_mvtec_loader(tmp_path):
    make_mvtec(tmp_path / "mvtec")
    ds = create_dataset("mvtec", root=tmp_path / "mvtec")
    df = ds.samples()
    assert_table(df)
    assert ds.protocol == "defect" and ds.categories == ["bottle", "metal_nut"]
    assert ds.class_labels == {"bottle": "bottle", "metal_nut": "metal nut"}
    bottle = df[df.class_name == "bottle"]
    assert (bottle.split == "train").sum() == 25 and (bottle.loc[bottle.split == "train", "defect"] == "good").all()
    assert bottle.loc[bottle.split == "test"].groupby("defect").size().to_dict() == {
        "broken_large": 3, "contamination": 2, "good": 4}
    assert not df["rel_path"].str.contains("ground_truth").any()


def test_visa_loader_and_multi_defect_grouping(tmp_path):
    make_visa(tmp_path / "visa")
    ds = create_dataset("visa", root=tmp_path / "visa")
    df = ds.samples()
    assert_table(df)
    assert ds.class_labels == {"candle": "candle", "pcb1": "printed circuit board"}
    candle = df[df.class_name == "candle"]
    assert (candle.split == "train").sum() == 24
    assert candle.loc[candle.split == "test"].groupby("defect").size().to_dict() == {
        "burnt": 1, "good": 3, "missing": 1, "multiple": 1, "scratch": 1}
    combined = create_dataset("visa", root=tmp_path / "visa", multi_defect="combined").samples()
    assert "burnt+scratch" in set(combined["defect"])
    assert visa_defect("scratch, burnt", "first") == "scratch"
    assert visa_defect(" Scratch ") == "scratch"


def test_tinyimagenet_loader(tmp_path):
    info = make_tinyimagenet(tmp_path / "tiny-imagenet-200")
    ds = create_dataset("tinyimagenet", root=tmp_path / "tiny-imagenet-200")
    df = ds.samples()
    assert_table(df)
    assert (df.split == "train").sum() == info["n_train"] and (df.split == "test").sum() == info["n_val"]
    assert ds.class_labels["n01443537"] == "goldfish"
    assert not df["rel_path"].str.startswith("test/").any()
    assert len(ds.train_files()) == info["n_train"]


# --------------------------------------------------------------------------- tasks


def _members(store_path):
    with open_store(store_path) as store:
        return store.images(), store.tasks(), store.task_members(), store.table_attrs("tasks")


def test_catalog_builds_paper_tasks(tmp_path):
    store = tmp_path / "s.h5"
    make_cub(tmp_path / "cub")
    make_flowers(tmp_path / "flowers")
    make_mvtec(tmp_path / "mvtec")
    make_visa(tmp_path / "visa")
    for name in ("cub", "flowers", "mvtec", "visa"):
        catalog_dataset(store, name, root=tmp_path / name)
    images, tasks, members, attrs = _members(store)
    assert tasks.groupby("dataset").size().to_dict() == {"cub": 3, "flowers": 3, "mvtec": 2, "visa": 2}
    by = tasks.set_index(["dataset", "normal_class"])
    cub = by.loc[("cub", "001.Black_footed_Albatross")]
    assert (cub.n_support, cub.n_seed, cub.n_heldout, cub.n_real_normal, cub.n_real_anomaly) == (24, 20, 4, 5, 7)
    assert cub.class_label == "black footed albatross" and cub.protocol == "multiclass"
    fl = by.loc[("flowers", "pink primrose")]
    assert (fl.n_support, fl.n_seed, fl.n_heldout, fl.n_real_normal, fl.n_real_anomaly) == (10, 10, 10, 10, 20)
    assert fl.seeds_are_heldout
    nut = by.loc[("mvtec", "metal_nut")]
    assert (nut.n_support, nut.n_seed, nut.n_heldout, nut.n_real_normal, nut.n_real_anomaly, nut.n_out_classes) == (
        22, 20, 2, 3, 6, 3)
    assert nut.protocol == "defect" and nut.class_label == "metal nut"
    pcb = by.loc[("visa", "pcb1")]
    assert (pcb.n_support, pcb.n_real_normal, pcb.n_real_anomaly) == (21, 2, 3)
    assert pcb.class_label == "printed circuit board"
    # defect tasks: anomalies are the product's own defective test images, grouped by defect type
    task = int(nut.task_id)
    rows = members[(members.task_id == task) & (members.role == ROLE_REAL_ANOMALY)]
    img = images.set_index("image_id").loc[rows.image_id]
    assert set(img.class_name) == {"metal_nut"} and set(img.split) == {"test"}
    assert list(rows.group) == list(img.defect) and set(rows.group) == {"bent", "color", "flip"}
    normal = images.set_index("image_id").loc[members[(members.task_id == task) & (members.role == ROLE_REAL_NORMAL)].image_id]
    assert set(normal.defect) == {"good"} and set(normal.split) == {"test"}
    support = members[(members.task_id == task) & members.role.isin([ROLE_SEED, ROLE_HELDOUT])].image_id
    assert set(images.set_index("image_id").loc[support, "split"]) == {"train"}
    candle = int(by.loc[("visa", "candle")].task_id)
    groups = members[(members.task_id == candle) & (members.role == ROLE_REAL_ANOMALY)].group
    assert sorted(groups) == ["burnt", "missing", "multiple", "scratch"]
    # which split each validation set comes from
    sources = json.loads(attrs["validation_sources"])
    assert set(sources) == {"cub", "flowers", "mvtec", "visa"}
    assert "valid" in sources["flowers"] and "test" in sources["cub"] and "image_anno.csv" in sources["visa"]
    assert (images.loc[images.dataset == "cub", "defect"] == "").all()


def _paper_scale(tmp_path: Path, full: bool) -> tuple[Path, dict]:
    """All four datasets with the real class counts; ``full``: real per-class sizes too."""
    timings = {}
    t = time.perf_counter()
    if full:
        make_cub(tmp_path / "cub", full=True)
        make_flowers(tmp_path / "flowers", full=True)
        make_mvtec(tmp_path / "mvtec", full=True)
        make_visa(tmp_path / "visa", full=True)
    else:
        make_cub(tmp_path / "cub", counts=[(3, 1)] * 200)
        make_flowers(tmp_path / "flowers", totals=[21] * 102)
        make_mvtec(tmp_path / "mvtec", spec={c: (2, {d: 1 for d in test}) for c, (_, test) in MVTEC_FULL.items()},
                   masks=False)
        make_visa(tmp_path / "visa", spec={o: (2, 1, 2) for o in VISA_FULL}, masks=False)
    timings["write_s"] = time.perf_counter() - t
    store = tmp_path / "paper.h5"
    t = time.perf_counter()
    for name in ("cub", "flowers", "mvtec", "visa"):
        catalog_dataset(store, name, root=tmp_path / name)
    timings["catalog_s"] = time.perf_counter() - t
    return store, timings


def test_paper_scale_class_counts_give_329_tasks(tmp_path):
    store, timings = _paper_scale(tmp_path, full=False)
    images, tasks, members, _ = _members(store)
    assert len(tasks) == 329 and (tasks.status == "ok").all()
    assert tasks.groupby("dataset").size().to_dict() == {"cub": 200, "flowers": 102, "mvtec": 15, "visa": 12}
    assert (tasks.loc[tasks.dataset == "flowers", "n_real_anomaly"] == 1010).all()
    mvtec = tasks[tasks.dataset == "mvtec"].set_index("normal_class")
    assert mvtec.loc["cable", "n_out_classes"] == 8 and mvtec.loc["toothbrush", "n_out_classes"] == 1
    assert timings["write_s"] + timings["catalog_s"] < 60


@pytest.mark.slow
def test_full_size_layouts_give_the_papers_329_tasks(tmp_path):
    store, timings = _paper_scale(tmp_path, full=True)
    print(f"full-size fixtures: {timings}")
    images, tasks, members, _ = _members(store)
    assert len(tasks) == 329 and (tasks.status == "ok").all()
    real = images[images.kind == "real"]
    assert real.groupby("dataset").size().to_dict() == {"cub": 11788, "flowers": 2040, "mvtec": 5354, "visa": 10821}
    by = {d: t.set_index("normal_class") for d, t in tasks.groupby("dataset")}
    cub = by["cub"]
    assert cub.n_support.sum() == 5994 and set(cub.n_support) == {29, 30}
    assert (cub.n_seed == 20).all() and set(cub.n_heldout) == {9, 10}
    assert ((cub.n_real_normal + cub.n_real_anomaly) == 5794).all() and cub.n_out_classes.eq(199).all()
    fl = by["flowers"]
    assert (fl.n_support == 10).all() and (fl.n_seed == 10).all() and (fl.n_heldout == 10).all()
    assert (fl.n_real_normal == 10).all() and (fl.n_real_anomaly == 1010).all()
    mv = by["mvtec"]
    for category, (n_train, test) in MVTEC_FULL.items():
        row = mv.loc[category]
        assert (row.n_support, row.n_seed, row.n_heldout) == (n_train, 20, n_train - 20)
        assert (row.n_real_normal, row.n_real_anomaly) == (test["good"], sum(test.values()) - test["good"])
        assert row.n_out_classes == len(test) - 1
    vi = by["visa"]
    for obj, (n_train, n_test, n_anomaly) in VISA_FULL.items():
        row = vi.loc[obj]
        assert (row.n_support, row.n_seed, row.n_real_normal, row.n_real_anomaly) == (n_train, 20, n_test, n_anomaly)


# --------------------------------------------------------------------------- bad layouts


def test_missing_index_files_name_the_expected_file(tmp_path):
    make_cub(tmp_path / "cub")
    (tmp_path / "cub" / "train_test_split.txt").unlink()
    with pytest.raises(FileNotFoundError, match="train_test_split.txt"):
        create_dataset("cub", root=tmp_path / "cub")
    make_flowers(tmp_path / "fl")
    (tmp_path / "fl" / "setid.mat").unlink()
    with pytest.raises(FileNotFoundError, match="setid.mat"):
        create_dataset("flowers", root=tmp_path / "fl")
    (tmp_path / "fl" / "setid.mat").write_bytes(b"not a mat file")
    with pytest.raises(ValueError, match="cannot read .*setid.mat"):
        create_dataset("flowers", root=tmp_path / "fl")
    make_visa(tmp_path / "visa")
    (tmp_path / "visa" / "pcb1" / "image_anno.csv").unlink()
    with pytest.raises(FileNotFoundError, match="pcb1/image_anno.csv"):
        create_dataset("visa", root=tmp_path / "visa")
    (tmp_path / "visa" / "split_csv" / "1cls.csv").unlink()
    with pytest.raises(FileNotFoundError, match="split_csv/1cls.csv"):
        create_dataset("visa", root=tmp_path / "visa")
    make_tinyimagenet(tmp_path / "tiny")
    (tmp_path / "tiny" / "val" / "val_annotations.txt").unlink()
    with pytest.raises(FileNotFoundError, match="val_annotations.txt"):
        create_dataset("tinyimagenet", root=tmp_path / "tiny")
    with pytest.raises(FileNotFoundError, match="MVTec-AD: no category"):
        create_dataset("mvtec", root=tmp_path / "tiny" / "val")
    (tmp_path / "cub2" / "images").mkdir(parents=True)
    for index_file in ("classes.txt", "image_class_labels.txt", "train_test_split.txt"):
        (tmp_path / "cub2" / index_file).write_text("1 1\n")
    (tmp_path / "cub2" / "images.txt").write_text("1 a.jpg\n2\n")
    with pytest.raises(ValueError, match="images.txt line 2"):
        create_dataset("cub", root=tmp_path / "cub2")


def test_cli_bad_layout_is_one_line(tmp_path, capsys):
    make_cub(tmp_path / "cub")
    (tmp_path / "cub" / "classes.txt").unlink()
    code = swsa_main(["catalog", "cub", "--root", str(tmp_path / "cub"), "--store", str(tmp_path / "s.h5")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "classes.txt" in err and "Traceback" not in err
    code = swsa_main(["catalog", "visa", "--store", str(tmp_path / "s.h5")])
    assert code == 1 and "needs --root" in capsys.readouterr().err


def test_unreadable_escaping_and_untrained_are_recorded_skips(tmp_path):
    root = tmp_path / "cub"
    make_cub(root)
    lines = (root / "images.txt").read_text().splitlines()
    lines[0] = "1 ../../../etc/passwd"
    (root / "images.txt").write_text("\n".join(lines) + "\n")
    victim = root / "images" / lines[1].split()[1]
    victim.write_bytes(b"\xff\xd8 truncated jpeg")
    df = create_dataset("cub", root=root).samples()
    skipped = df[df.status == "skipped"].set_index("source_index")
    assert "path escapes dataset root" in skipped.loc[1, "skip_reason"]
    assert skipped.loc[2, "skip_reason"].startswith("cannot decode image")
    assert len(skipped) == 2

    mv = tmp_path / "mvtec"
    make_mvtec(mv)
    for f in (mv / "bottle" / "train" / "good").iterdir():
        f.unlink()
    store = tmp_path / "s.h5"
    summary = catalog_dataset(store, "mvtec", root=mv)
    assert summary["skipped_tasks"] == 1 and any("bottle" in r for r in summary["skipped_classes"])
    _, tasks, _, _ = _members(store)
    assert "no training images" in tasks.set_index("normal_class").loc["bottle", "skip_reason"]


def test_paper_root_through_a_symlink_and_a_class_of_skipped_images(tmp_path):
    mv = tmp_path / "mvtec"
    make_mvtec(mv)
    (tmp_path / "link").symlink_to(mv)
    direct, linked = create_dataset("mvtec", root=mv).samples(), create_dataset("mvtec", root=tmp_path / "link").samples()
    assert (linked["status"] == "ok").all() and list(linked["sha256"]) == list(direct["sha256"])
    for path in (mv / "bottle").rglob("*.png"):  # every image of one product corrupt: an error, not a silent class
        path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"^dataset 'mvtec' under .*: every image of class 'bottle' was skipped "
                                         r"\(\d+ rows\): cannot decode image \(\d+x, e\.g\. bottle/"):
        create_dataset("mvtec", root=mv).samples()


# --------------------------------------------------------------------------- auxiliary outliers


def test_auxiliary_outliers(tmp_path):
    from swsa_store.auxiliary import sample_auxiliary

    tiny = tmp_path / "tiny"
    make_tinyimagenet(tiny, n_train=12)
    make_cub(tmp_path / "cub")
    make_flowers(tmp_path / "flowers")
    store = tmp_path / "s.h5"
    catalog_dataset(store, "cub", root=tmp_path / "cub")
    catalog_dataset(store, "flowers", root=tmp_path / "flowers")
    summary = sample_auxiliary(store, tiny, count=30, counts={"flowers": 5}, seed=3)
    assert summary == {"source": "tinyimagenet", "tasks_done": 6, "tasks_skipped": 0, "images": 3 * 30 + 3 * 5,
                       "pool_size": 36}
    images, tasks, _, _ = _members(store)
    aux = images[images.kind == "tinyimagenet"]
    assert aux.groupby("task_id").size().to_dict() == {
        int(t.task_id): (5 if t.dataset == "flowers" else 30) for t in tasks.itertuples()}
    assert (aux.split == "synthetic").all() and (aux.seed == 3).all() and (aux.status == "ok").all()
    params = json.loads(aux.params.iloc[0])
    assert params["root"] == str(tiny) and params["rel_path"].startswith("train/") and params["pool_size"] == 36
    first = aux[aux.task_id == 0]
    assert first.params.map(lambda p: json.loads(p)["rel_path"]).is_unique
    again = sample_auxiliary(store, tiny, count=30, counts={"flowers": 5}, seed=3)
    assert again["tasks_done"] == 0 and again["tasks_skipped"] == 6
    # deterministic: a second store draws the same files
    store2 = tmp_path / "s2.h5"
    catalog_dataset(store2, "cub", root=tmp_path / "cub")
    sample_auxiliary(store2, tiny, count=30, seed=3)
    aux2 = _members(store2)[0]
    assert list(aux2[aux2.kind == "tinyimagenet"].params) == list(aux[aux.dataset == "cub"].params)
    # any image folder, via the CLI
    code = swsa_main(["synth", "--store", str(store2), "--method", "auxiliary", "--root", str(tmp_path / "flowers"),
                      "--count", "4", "--quiet"])
    assert code == 0
    assert (_members(store2)[0].kind == "auxiliary").sum() == 3 * 4
    with pytest.raises(ValueError, match="fewer than"):
        sample_auxiliary(store2, tiny, count=100, source="big")


# --------------------------------------------------------------------------- paper configuration


def test_paper_config_and_dry_run(tmp_path):
    import tomllib

    config = tomllib.loads((ROOT / "configs" / "paper.toml").read_text())
    assert set(config["datasets"]) == {"cub", "flowers", "mvtec", "visa"}
    assert len(config["embed"]["backbones"]) == 10
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import run_paper
    finally:
        sys.path.pop(0)
    plan = run_paper.build_plan(config, store="x.h5")
    steps = [step["step"] for step in plan]
    assert steps[:4] == ["catalog"] * 4 and steps[-2:] == ["score", "report"]
    assert steps.count("embed") == 10
    aux = [s for s in plan if s["step"] == "auxiliary"]
    assert len(aux) == 1 and aux[0]["kwargs"]["counts"] == {"flowers": 25}
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_paper.py"), "--config",
                          str(ROOT / "configs" / "paper.toml"), "--dry-run"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "catalog" in out.stdout and "329" in out.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[datasets\n")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_paper.py"), "--config", str(bad), "--dry-run"],
                         capture_output=True, text=True)
    assert out.returncode != 0 and len(out.stderr.strip().splitlines()) == 1
