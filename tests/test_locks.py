"""One writer at a time: the lock is taken before any work, names its holder, can be waited for;
two `synth` or `catalog` runs never duplicate rows nor share ids; orphaned temporary files of
killed writers are removed by the next writer. The writers called from Python (run_sweep,
import_scores, split_references) hold the lock for their whole run like the CLI; `--wait` takes
only a number, so a positional argument after it stays a positional."""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from swsa_engine.app.bench_store import make_paper_store
from swsa_engine.app.cli import build_parser, main
from swsa_engine.app.cli.common import attach_wait_values
from swsa_engine.run.sweep import run_sweep
from swsa_store import StoreError, create_store, edit_store, open_store
from swsa_store.catalog import add_images, catalog_dataset
from swsa_store.locks import held_by_me, lock_holder, store_lock
from swsa_store.paths import NEXT_ID_ATTR
from swsa_store.references import split_references
from swsa_store.scores import import_scores


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


# --------------------------------------------------------------------------- writers called from Python


@pytest.fixture
def paper_store(tmp_path):
    """A small paper-shaped store with tasks, synthetic anomalies and two embedding matrices."""
    path = tmp_path / "p.h5"
    make_paper_store(path, task_fraction=0.03, image_fraction=0.25, synthetic=16,
                     backbones={"resnet18": (48, 11), "vit": (32, 5)}, progress=False)
    return path


def _score_table(store: Path) -> pd.DataFrame:
    """A score for every (task, image) pair (rows outside a task's validation set are ignored)."""
    with open_store(store) as s:
        task_ids, n_images = s.tasks()["task_id"].to_numpy(), s.n_images
    pairs = np.stack(np.meshgrid(task_ids, np.arange(n_images), indexing="ij"), axis=-1).reshape(-1, 2)
    return pd.DataFrame({"task": pairs[:, 0], "image_id": pairs[:, 1],
                         "score": np.random.default_rng(0).integers(0, 5, len(pairs)).astype(float)})


def _state(store: Path) -> dict:
    """Every file of the store (the store, its results) → its bytes."""
    return {p.name: p.read_bytes() for p in sorted(store.parent.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


def _sweep(store, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_sweep(store, progress=False, hardest=(4,), **kwargs)


PYTHON_WRITERS = {
    "import_scores": (lambda s, **kw: import_scores(s, "imported", _score_table(s), **kw), "swsa import-scores"),
    "split_references": (lambda s, **kw: split_references(s, "cutpaste", 0.25, **kw), "swsa split-refs"),
    "run_sweep": (lambda s, **kw: _sweep(s, **kw), "swsa score"),
}


@pytest.mark.parametrize("writer", sorted(PYTHON_WRITERS))
def test_python_writer_is_refused_while_another_writes_and_can_wait(paper_store, writer):
    call, _ = PYTHON_WRITERS[writer]
    before = _state(paper_store)
    holder = _hold(paper_store, 1.5)
    try:
        started = time.monotonic()
        with pytest.raises(StoreError, match=rf"being written by PID {holder.pid} \(swsa synth\) since .*pass --wait$"):
            call(paper_store)
        assert time.monotonic() - started < 1.0  # refused at once, before any work
        assert _state(paper_store) == before  # and nothing written
        call(paper_store, wait=60)  # the holder ends after 1.5 s
    finally:
        holder.kill()
        holder.wait()
    assert _state(paper_store) != before


@pytest.mark.parametrize("writer, inner", [("import_scores", "swsa_store.scores.validate_scores"),
                                           ("split_references", "swsa_store.references.make_references"),
                                           ("run_sweep", "swsa_engine.run.sweep.build_task_groups")])
def test_python_writer_holds_the_lock_for_its_whole_run(paper_store, writer, inner, monkeypatch):
    """While the writer works (inside one of its steps) the lock is this process's and a second
    writer — `swsa split-refs` in another process — is refused, naming this writer."""
    call, command = PYTHON_WRITERS[writer]
    module, name = inner.rsplit(".", 1)
    original = getattr(importlib.import_module(module), name)
    seen = {}

    def step(*args, **kwargs):
        seen["held"] = held_by_me(paper_store)
        if "refused" not in seen:
            other = _cli("split-refs", "--store", str(paper_store), "--source", "cutpaste", "--share", "0.5")
            _, seen["refused"] = other.communicate(timeout=120)
            seen["status"] = other.returncode
        return original(*args, **kwargs)

    monkeypatch.setattr(inner, step)
    call(paper_store)
    assert seen["held"] and seen["status"] == 1
    assert f"being written by PID {os.getpid()} ({command}) since" in seen["refused"]
    assert not held_by_me(paper_store) and lock_holder(paper_store)["pid"] == os.getpid()  # released, record kept


def test_sweep_without_saving_takes_no_lock(paper_store):
    holder = _hold(paper_store, 600)
    try:
        cube = _sweep(paper_store, save=False, ensembles=False)  # reads only: runs beside a writer
        assert len(cube.tasks) > 0
    finally:
        holder.kill()
        holder.wait()


def test_writer_inside_a_held_lock_reenters_without_waiting(paper_store):
    with store_lock(paper_store, command="swsa split-refs"):
        table = split_references(paper_store, "cutpaste", 0.25)
        assert held_by_me(paper_store)
    assert len(table) > 0 and not held_by_me(paper_store)


# --------------------------------------------------------------------------- --wait before a positional


@pytest.mark.parametrize("argv, dataset, wait", [
    (["catalog", "--wait", "folder", "--store", "s"], "folder", math.inf),
    (["catalog", "folder", "--wait", "--store", "s"], "folder", math.inf),
    (["catalog", "folder", "--store", "s", "--wait"], "folder", math.inf),
    (["catalog", "--wait", "5", "folder", "--store", "s"], "folder", 5.0),
    (["catalog", "folder", "--wait", "2.5", "--store", "s"], "folder", 2.5),
    (["catalog", "--wait=3", "folder", "--store", "s"], "folder", 3.0),
    (["catalog", "folder", "--store", "s"], "folder", 0.0),
])
def test_wait_takes_only_a_number_and_leaves_a_positional_alone(argv, dataset, wait):
    args = build_parser().parse_args(attach_wait_values(argv))
    assert (args.dataset, args.wait) == (dataset, wait)


def test_wait_refuses_a_negative_number_in_one_line(capsys):
    with pytest.raises(SystemExit):
        main(["catalog", "--wait", "-1", "folder", "--store", "s"])
    assert "--wait takes a number of seconds >= 0, got '-1'" in capsys.readouterr().err


def test_cli_wait_before_the_positional_waits_for_the_writer(paper_store, tmp_path):
    scores = tmp_path / "scores.csv"
    _score_table(paper_store).to_csv(scores, index=False)
    holder = _hold(paper_store, 600)
    try:
        gave_up = _cli("import-scores", "--wait", "0.2", str(scores), "--store", str(paper_store), "--candidate", "x")
        _, err = gave_up.communicate(timeout=120)
        assert gave_up.returncode == 1 and "gave up after waiting 0.2 s" in err
        waited = _cli("import-scores", "--wait", str(scores), "--store", str(paper_store), "--candidate", "x")
        time.sleep(3)
        assert waited.poll() is None  # waiting: the file was not taken for --wait's seconds
        holder.kill()
        out, err = waited.communicate(timeout=180)
        assert waited.returncode == 0, err
        assert "import-scores: candidate=x" in out
    finally:
        holder.kill()
        holder.wait()
