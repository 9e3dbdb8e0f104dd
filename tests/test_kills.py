"""Kills that provably land mid-write: ``embed`` and ``synth`` SIGKILL-ed after the writer reports
N committed rows in ``<store>.progress`` (and before it finishes), 20 kills each; after a resume
the store holds exactly the bytes of an uninterrupted run.

Every run happens in a child forked from this process (which never runs torch itself, so the fork
is safe and costs milliseconds instead of an interpreter start); the parent only watches the
progress file and kills. A kill *landed mid-write* when the store holds more committed rows than
when that run started and fewer than all of them — the test counts those and requires them.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from swsa_store import open_store
from swsa_store.catalog import catalog_dataset
from swsa_store.ingest import embed_store  # imported here (no torch work done), so forked children start at once
from swsa_store.locks import progress_path, read_progress, remove_orphans
from swsa_store.models.backbones import create_backbone  # noqa: F401  (the same: import once, before forking)
from swsa_store.schema import DONE_TODO
from swsa_store.synthesize import synthesize

COUNT = 6  # synthetic anomalies per task

TINY, NAME, BATCH = "timm/resnet10t", "timm-resnet10t", 8
KILLS = 20
ROUNDS = 4  # kills are spread over this many stores, each resumed and compared at the end
FORK = multiprocessing.get_context("fork")


def _folder(root: Path, classes=3, per_class=40, size=20) -> Path:
    rng = np.random.default_rng(1)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = (rng.random((size, size, 3)) * 80 + 50 * c).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"c{c}" / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kills")
    store = root / "base" / "s.h5"
    catalog_dataset(store, "folder", root=_folder(root / "base" / "images"), name="toy", n_seed=4)
    return store


def _copy(base: Path, folder: Path) -> Path:
    shutil.copytree(base.parent, folder)
    return folder / base.name


def _embed(store: str) -> None:
    torch.set_num_threads(1)  # in the child: two cores are shared, threads only contend
    warnings.simplefilter("ignore")
    embed_store(store, TINY, weights="random", image_size=16, batch_size=BATCH, progress=False)


def _synth(store: str) -> None:
    synthesize(store, "cutpaste", count=COUNT, seed=3, progress=False, commit_every_s=0.0)


def _run(target, store: Path) -> None:
    """``target(store)`` in a forked child, to completion."""
    child = FORK.Process(target=target, args=(str(store),))
    child.start()
    child.join(300)
    assert child.exitcode == 0, f"{target.__name__} exited with {child.exitcode}"


def _kill_after(target, store: Path, rows: int, timeout: float = 120.0) -> dict:
    """Run ``target`` in a child; SIGKILL it once its progress shows at least ``rows`` rows done.
    Returns the last progress seen (``{}`` if the child ended before)."""
    progress_path(store).unlink(missing_ok=True)
    child = FORK.Process(target=target, args=(str(store),))
    child.start()
    deadline, seen = time.monotonic() + timeout, {}
    while child.is_alive() and time.monotonic() < deadline:
        seen = read_progress(store) or seen
        if seen.get("pid") == child.pid and seen.get("rows_done", 0) >= rows:
            os.kill(child.pid, signal.SIGKILL)
            break
        time.sleep(0.001)
    child.join(60)
    return seen


def _embedded_rows(store: Path) -> int:
    with open_store(store) as s:
        return int((s.done_mask(NAME) != DONE_TODO).sum()) if NAME in s.backbones() else 0


def _synth_rows(store: Path) -> int:
    with open_store(store) as s:
        return int((s.images(["split"])["split"] == "synthetic").sum())


def _embedding_bytes(store: Path) -> tuple[bytes, bytes, bytes]:
    with open_store(store) as s:
        group = s.file["embeddings"][NAME]
        return s.embeddings(NAME).tobytes(), group["done"][...].tobytes(), group["checksum"][...].tobytes()


def _synth_state(store: Path) -> tuple:
    with open_store(store) as s:
        table = s.images(raw_paths=True)
        rows = table[table["split"] == "synthetic"]
        files = [(s.files_dir.parent / p).read_bytes() for p in rows["path"] if p]
        return rows.to_csv(index=False), files


def _kill_rounds(base: Path, tmp_path: Path, target, count_rows, total: int, state) -> tuple[int, int]:
    """:data:`KILLS` kills over :data:`ROUNDS` copies of ``base``; each copy is resumed and
    compared with an uninterrupted run. Returns ``(kills, kills that landed mid-write)``."""
    reference = _copy(base, tmp_path / "reference")
    _run(target, reference)
    expected = state(reference)
    rng = random.Random()
    kills = landed = 0
    for r in range(ROUNDS):
        store = _copy(base, tmp_path / f"round{r}")
        for _ in range(KILLS // ROUNDS):
            before = count_rows(store)
            step = BATCH if target is _embed else 1
            _kill_after(target, store, before + step * rng.randint(1, 2))
            after = count_rows(store)
            kills += 1
            landed += int(before < after < total)
            with open_store(store):  # opens cleanly after every kill
                pass
        _run(target, store)
        assert state(store) == expected, f"round {r}: resumed store differs from an uninterrupted run"
        assert not list(store.parent.glob(".s.h5.edit.*")), "a temporary copy was left after the resume"
    print(f"\n{target.__name__}: {landed} of {kills} kills landed mid-write")
    return kills, landed


def test_embed_killed_mid_write_resumes_to_identical_bytes(base, tmp_path):
    with open_store(base) as s:
        total = int((s.images(["status"])["status"] == "ok").sum())
    kills, landed = _kill_rounds(base, tmp_path, _embed, _embedded_rows, total, _embedding_bytes)
    assert kills == KILLS and landed >= KILLS // 2, f"only {landed} of {kills} kills landed mid-write"


def test_synth_killed_mid_write_resumes_to_identical_catalogue_and_files(base, tmp_path):
    with open_store(base) as s:
        total = COUNT * int((s.tasks()["status"] == "ok").sum())
    kills, landed = _kill_rounds(base, tmp_path, _synth, _synth_rows, total, _synth_state)
    assert kills == KILLS and landed >= KILLS // 2, f"only {landed} of {kills} kills landed mid-write"


def test_report_killed_mid_write_leaves_the_previous_report_whole(tmp_path):
    from swsa_engine.report.atomic import publish, staging_dir
    final = tmp_path / "report"
    final.mkdir()
    (final / "report.md").write_text("old report")
    (final / "table1.csv").write_text("old table")

    def half_write(store: str) -> None:  # stages one file, then is killed before the rename
        staging = staging_dir(final)
        (staging / "table1.csv").write_text("new table")
        (staging / "report.md").write_text("new rep")
        os.kill(os.getpid(), signal.SIGKILL)

    child = FORK.Process(target=half_write, args=("",))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    assert (final / "report.md").read_text() == "old report" and (final / "table1.csv").read_text() == "old table"
    orphans = list(tmp_path.glob(".report.report-tmp.*"))
    assert len(orphans) == 1
    staging = staging_dir(final)  # the next report removes the dead writer's staging folder
    assert list(tmp_path.glob(".report.report-tmp.*")) == [staging]
    (staging / "report.md").write_text("new report")
    paths = publish(staging, final, {"report": staging / "report.md"})
    assert paths == {"report": final / "report.md"} and (final / "report.md").read_text() == "new report"
    assert not staging.exists()


def _cube(seed: int):
    import pandas as pd

    from swsa_engine.core.cube import AurocCube

    rng = np.random.default_rng(seed)
    n_tasks, n_candidates = 5, 4
    return AurocCube(
        tasks=pd.DataFrame({"task_id": np.arange(n_tasks), "dataset": "d", "normal_class": [f"c{i}" for i in range(n_tasks)]}),
        candidates=pd.DataFrame({"name": [f"m{i}" for i in range(n_candidates)], "n_params": 10 + np.arange(n_candidates),
                                 "feature_dim": 8, "weights_kind": "random", "family": "resnet"}),
        sources=["s1"], real=rng.uniform(0.4, 1.0, (n_tasks, n_candidates, 2)),
        synthetic=rng.uniform(0.4, 1.0, (n_tasks, n_candidates, 1)),
        per_class=np.full((n_tasks, n_candidates, 1), np.nan), class_names=np.full((n_tasks, 1), "", dtype=object),
        config={"k": 3, "base_sources": ["s1"]},
    )


def test_score_killed_while_saving_its_cube_leaves_the_old_cube_or_none(tmp_path):
    """``score``'s save (run_sweep → save_cube → save_result) SIGKILL-ed inside the write of its
    temporary file, after a random number of its arrays: 20 kills, each provably mid-write (the
    child kills itself from inside h5py's dataset creation, with the temporary file on disk).
    The cube a reader then loads is the old one, whole, or none at all (first kill)."""
    import h5py

    from swsa_engine.run.cube_io import load_cube, save_cube
    from swsa_store import StoreError

    store = tmp_path / "s.h5"
    catalog_dataset(store, "folder", root=_folder(tmp_path / "img", classes=2, per_class=6, size=8), name="toy", n_seed=2)
    results = Path(f"{store}.results")
    n_arrays = len(_cube(0).to_arrays()[0])
    rng = random.Random(0)

    def killed_save(after: int):
        def run(store_path: str) -> None:
            real, calls = h5py.Group.create_dataset, []

            def counting(self, *args, **kwargs):
                if len(calls) == after:  # `after` arrays are in the temporary file: die mid-write
                    os.kill(os.getpid(), signal.SIGKILL)
                calls.append(1)
                return real(self, *args, **kwargs)

            h5py.Group.create_dataset = counting
            save_cube(_cube(99), store_path)
        return run

    mid_write, old = 0, None
    for trial in range(KILLS):
        after = rng.randrange(1, n_arrays)
        child = FORK.Process(target=killed_save(after), args=(str(store),))
        child.start()
        child.join(60)
        assert child.exitcode == -signal.SIGKILL
        orphans = list(results.glob(".cube.h5.*.tmp"))
        mid_write += len(orphans) == 1 and orphans[0].stat().st_size > 0
        assert remove_orphans(store) == orphans  # what `swsa verify --repair` removes; the next count is exact
        if old is None:
            with pytest.raises(StoreError):
                load_cube(store)  # none there, never a half-written one
            save_cube(_cube(trial), store)
            old = _cube(trial)
        else:
            loaded = load_cube(store)
            np.testing.assert_array_equal(loaded.real, old.real)
            np.testing.assert_array_equal(loaded.synthetic, old.synthetic)
            assert loaded.candidate_names == old.candidate_names
    print(f"score save: {mid_write} of {KILLS} kills landed mid-write")
    assert mid_write == KILLS
    save_cube(_cube(99), store)  # an uninterrupted save replaces it
    np.testing.assert_array_equal(load_cube(store).real, _cube(99).real)
