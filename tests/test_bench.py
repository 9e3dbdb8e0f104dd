"""The paper-shaped store, the bench (sweep vs reference loops), Table 3 and Figure 4."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from swsa_engine.app.bench import (MVTEC, PAPER_BACKBONES, VISA, format_figures, make_paper_store, paper_shapes,
                               reference_sweep, run_bench)
from swsa_engine.report.distribution import cluster_histogram_tv, total_variation, tv_table
from swsa_engine.run.cube_io import load_cube
from swsa_engine.run.sweep import run_sweep
from swsa_store import open_store
from swsa_store.references import read_references

SMALL = {"resnet18": (512, 11), "vit_b_16": (768, 86), "resnet50": (2048, 25)}


def test_full_paper_shape():
    shapes = {s.name: s for s in paper_shapes()}
    assert sum(len(s.classes) for s in shapes.values()) == 329
    cub, flowers = shapes["cub"], shapes["flowers"]
    assert len(cub.classes) == 200 and sum(c.n_train for c in cub.classes) == 5994
    assert sum(c.n_test_normal for c in cub.classes) == 5794
    assert len(flowers.classes) == 102 and all(c.n_train == 10 for c in flowers.classes)
    assert flowers.synthetic_per_source == 25 and cub.synthetic_per_source == 100
    mvtec, visa = shapes["mvtec"], shapes["visa"]
    assert len(mvtec.classes) == 15 and sum(c.n_train for c in mvtec.classes) == sum(v[0] for v in MVTEC.values())
    assert sum(len(c.defects) for c in mvtec.classes) == sum(v[3] for v in MVTEC.values())
    assert len(visa.classes) == 12
    assert sum(c.n_train + c.n_test_normal for c in visa.classes) == 9621
    assert sum(sum(c.defects) for c in visa.classes) == sum(v[2] for v in VISA.values())
    assert {d for d, _ in PAPER_BACKBONES.values()} == {512, 768, 1024, 1280, 2048}
    with pytest.raises(ValueError, match="must be in"):
        paper_shapes(task_fraction=0)


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "paper.h5"
    make_paper_store(path, task_fraction=0.03, image_fraction=0.25, synthetic=12, backbones=SMALL, progress=False)
    return path


def test_small_store_contents(small_store):
    with open_store(small_store) as store:
        images, tasks, members = store.images(), store.tasks(), store.task_members()
        assert store.backbones() == sorted(SMALL)
        for name, (dim, _) in SMALL.items():
            features = store.embeddings(name)
            assert features.shape == (len(images), dim) and np.isfinite(features).all()
    assert set(tasks["dataset"]) == {"cub", "flowers", "mvtec", "visa"}
    per_task = images[images["kind"] != "real"].groupby(["task_id", "kind"]).size()
    assert set(per_task.to_numpy()) == {12} and len(per_task) == 3 * len(tasks)
    defect_groups = members[(members["role"] == 3) & members["task_id"].isin(tasks.loc[tasks.dataset == "mvtec", "task_id"])]["group"]
    assert defect_groups.str.startswith("defect_").all()
    with pytest.raises(FileExistsError):
        make_paper_store(small_store, backbones=SMALL)


def test_sweep_equals_reference_loops(small_store):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cube = run_sweep(small_store, progress=False, save=True)
    task_ids = list(map(int, cube.tasks.groupby("dataset")["task_id"].first()))
    reference = reference_sweep(small_store, task_ids)
    row_of = {int(t): i for i, t in enumerate(cube.tasks["task_id"])}
    for (task_id, name), ref in reference["results"].items():
        t, c = row_of[task_id], cube.candidate_names.index(name)
        np.testing.assert_allclose(cube.real[t, c], ref["real"], atol=1e-12)
        for source, value in ref["synthetic"].items():
            assert cube.synthetic[t, c, cube.sources.index(source)] == pytest.approx(value, abs=1e-12)


def test_sweep_on_a_subset_of_tasks(small_store):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = run_sweep(small_store, progress=False, save=False)
        part = run_sweep(small_store, progress=False, save=False, task_ids=full.tasks["task_id"].to_numpy()[::2])
    assert len(part.tasks) == (len(full.tasks) + 1) // 2
    np.testing.assert_array_equal(part.real, full.real[::2])
    assert part.config["knn_flops"] > 0


def test_run_bench_reports_matching_numbers(small_store, tmp_path):
    store = tmp_path / "copy.h5"
    store.write_bytes(small_store.read_bytes())
    figures = run_bench(store, make=False, reference_tasks=1, out=tmp_path / "out", progress=False)
    assert figures["reference"]["max_abs_auroc_difference"] < 1e-12
    assert figures["reference"]["max_abs_tau_difference"] < 1e-12
    assert figures["speedup"] > 0 and figures["knn_gflops"] > 0
    assert figures["sweep"]["peak_rss_bytes"] > 0
    assert (tmp_path / "out" / "bench.json").exists()
    text = format_figures(figures)
    assert "speed-up" in text and "peak memory" in text
    # the headline: the sweep over its kNN products at the measured float32 peak, with the stages
    stages = figures["sweep"]["stage_seconds"]
    assert {"read", "knn", "refine", "aurocs", "ensembles", "save"} <= set(stages)
    floor = figures["sweep"]["knn_flops"] / (figures["matmul_peak_gflops"]["float32"] * 1e9)
    assert figures["gemm_floor_seconds"] == pytest.approx(floor)
    assert figures["sweep_over_gemm"] == pytest.approx(figures["sweep"]["seconds"] / floor)
    assert figures["cube_over_gemm"] < figures["sweep_over_gemm"]
    assert text.startswith("HEADLINE sweep / GEMM floor:") and "stages (s): read" in text


def test_knn_bench_times_exact_and_bounded_against_gemm():
    from swsa_engine.app.bench_knn import bench_knn, format_knn_bench

    table = bench_knn(n_queries=300, dim=64, banks=(5, 40), k=2, repeats=1, progress=False)
    assert list(table["bank_rows"]) == [5, 40]
    assert (table["knn_score_efficiency"] > 0).all() and (table["bounded_efficiency"] > 0).all()
    np.testing.assert_allclose(table["knn_score_efficiency"], table["gemm_s"] / table["knn_score_s"])
    assert "bank     40 rows" in format_knn_bench(table)


def test_cluster_histogram_tv_matches_hand_count():
    assignments = np.array([0, 0, 1, 2, 2, 2, 1, 1])
    in_first = np.array([True, True, True, True, False, False, False, False])
    # first: clusters {0: 2, 1: 1, 2: 1} / 4 ; second: {1: 2, 2: 2} / 4
    expected = abs(2 / 4 - 0) + abs(1 / 4 - 2 / 4) + abs(1 / 4 - 2 / 4)
    assert cluster_histogram_tv(assignments, in_first, 3) == pytest.approx(expected)


def test_total_variation_behaviour():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(60, 4))
    assert total_variation(a, a.copy(), runs=3) == pytest.approx(0.0)
    far = total_variation(a, a + 100.0, runs=3)
    assert far == pytest.approx(2.0)
    near = total_variation(a, rng.normal(size=(60, 4)), runs=3)
    assert 0 < near < far
    with pytest.raises(ValueError, match="same D"):
        total_variation(a, a[:, :2])


def test_tv_table_on_small_store(small_store):
    cube = load_cube(small_store)
    table = tv_table(small_store, cube, tasks_per_dataset=1, runs=2)
    assert set(table["dataset"]) <= {"cub", "flowers", "mvtec", "visa"} and len(table) > 0
    assert ((table["total_variation"] >= 0) & (table["total_variation"] <= 2)).all()
    assert (table["candidate"] == "vit_b_16").all()


def test_reference_extrapolation_weights_each_dataset_by_its_tasks():
    import pandas as pd

    from swsa_engine.app.bench import extrapolate_reference

    tasks = pd.DataFrame({"task_id": [1, 2, 3, 4, 5, 6], "dataset": ["a", "a", "a", "a", "b", "b"]})
    reference = {"task_seconds": {1: 2.0, 2: 4.0, 5: 1.0}, "read_seconds": 10.0}
    out = extrapolate_reference(reference, kendall_seconds=0.3, tasks=tasks)
    # a: mean 3 s × 4 tasks, b: 1 s × 2 tasks, reading once, Kendall 0.1 s per task
    assert out["extrapolated_seconds"] == pytest.approx(10.0 + 12.0 + 2.0 + 0.6)
    assert out["seconds_per_task_by_dataset"] == {"a": 3.0, "b": 1.0}
    with pytest.raises(ValueError, match=r"no task of dataset\(s\) \['b'\]"):
        extrapolate_reference({"task_seconds": {1: 2.0}, "read_seconds": 0.0}, 0.0, tasks)


def test_detector_bench_times_each_detector_and_reports_skips(small_store, tmp_path):
    from swsa_engine.app.bench import bench_detectors, format_detector_bench
    from swsa_engine.core.detectors import patch_cost

    table = bench_detectors(small_store, ("knn(k=1,l2)", "mahalanobis", "nagl"), task_fraction=0.5, progress=False)
    assert list(table["detector"]) == ["knn(k=1,l2)", "mahalanobis", "nagl(k=3,beta=1.0)"]
    timed = table[table["status"].str.startswith("ok")]
    assert len(timed) == 3 and (timed["seconds"] > 0).all()
    assert (timed["seconds_all_tasks"] >= timed["seconds"] - 1e-9).all()  # extrapolated up to every task
    assert "in-memory split: 0.25 of each task's cutpaste anomalies" in table.loc[2, "status"]
    with open_store(small_store) as store:
        assert read_references(store) is None  # timing NAGL wrote no split into the store
    text = format_detector_bench(table, patch_cost(n_tasks=1, n_queries=4, n_patches=9, dim=16, bank_size=5))
    assert "| knn(k=1,l2) |" in text and "patch(K=4)" in text
    with pytest.raises(ValueError, match=r"task_fraction must be in \(0, 1\]"):
        bench_detectors(small_store, ("knn",), task_fraction=0)
