"""Group commits of the ingest writer (``EmbeddingRowWriter.write_group``, ``ingest_pipeline.GroupCommits``).

With a slow disk (``os.fsync`` sleeping) batches share commits and the store holds what the plain
one-batch-at-a-time loop writes (rows, flags, checksums, patch tokens, failures); every flag is set
only after its rows are synced, and ``after_batch`` comes once per batch, in order, after the sync of
its flags; a failed commit leaves earlier commits intact and its own flags unset, and a rerun
completes the store; the forward pass waits for the writer only past the backlog bound. The Ray read
task and ``swsa predict`` read with the numpy pixel plan, giving the transform's bytes.
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from swsa_store import ingest_pipeline, open_store
from swsa_store.catalog import make_ingest_catalog, resolve_path
from swsa_store.distributed import read_embed_batch
from swsa_store.ingest import collate_items, embed_store, run_ingest
from swsa_store.ingest_pipeline import GroupCommits
from swsa_store.models.backbones import create_backbone
from swsa_store.row_writer import EmbeddedBatch, EmbeddingRowWriter, write_embedded_batches
from swsa_store.samples import read_image
from swsa_store.schema import DONE_FAILED, DONE_TODO, DONE_WRITTEN
from swsa_store.store import writer_lock

from swsa_engine.run.predict import image_batches

TINY, NAME = "timm/resnet10t", "timm-resnet10t"
OPTIONS = {"weights": "random", "image_size": 16, "batch_size": 2, "progress": False, "patch_tokens": True}
N_IMAGES, BROKEN = 40, 7  # 20 batches of 2; image 7 is truncated after cataloguing: a failed row
ROW_DATASETS = ("features", "checksum", "patches", "patch_checksum")
FLAG_DATASETS = ("done", "patch_done")


def _embed(store: Path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return embed_store(store, TINY, **OPTIONS, **kwargs)


def _one_batch_at_a_time(reader, embedder, writer, batches, **_):
    """The plain ingest loop: per batch, the transform image by image, the forward pass, one write."""
    position = {image_id: i for i, image_id in enumerate(reader.image_ids)}
    failures, written, failed = [], 0, 0
    for batch in batches:
        ids, ok, pixels, reasons = collate_items([reader[position[int(i)]] for i in batch])
        features = embedder(pixels) if pixels is not None else None
        status = write_embedded_batches(writer, [EmbeddedBatch(ids, ok, features, reasons)], failures)[0]
        written, failed = written + int((status == DONE_WRITTEN).sum()), failed + int((status == DONE_FAILED).sum())
    return written, failed, failures


def _contents(store: Path) -> dict[str, bytes]:
    with open_store(store) as s:
        groups = {"embeddings": s.file["embeddings"][NAME], "patches": s.file["patches"][NAME]}
        return {f"{g}/{k}": group[k][...].tobytes() for g, group in groups.items() for k in group}


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """A catalogued store of JPEGs (one broken after cataloguing) and its contents embedded by the
    one-batch-at-a-time loop, with that run's failures."""
    root = tmp_path_factory.mktemp("group_commit")
    store = make_ingest_catalog(root, N_IMAGES, source_size=32)
    with open_store(store) as s:
        victim = resolve_path(store, s.images()["path"].iloc[BROKEN])
    victim.write_bytes(victim.read_bytes()[:60])
    reference = root / "reference.h5"
    shutil.copy(store, reference)
    report = _embed(reference, runner=_one_batch_at_a_time)
    assert report.failed == 1 and report.written == N_IMAGES - 1
    return {"store": store, "root": root, "contents": _contents(reference), "failures": report.failures}


class _Recorded:
    """An h5py dataset whose writes are appended to ``log`` as ``(name, first id, last id + 1)``."""

    def __init__(self, dataset, name: str, log: list):
        self._dataset, self._name, self._log = dataset, name, log

    def __getattr__(self, attribute):
        return getattr(self._dataset, attribute)

    def __getitem__(self, key):
        return self._dataset[key]

    def __setitem__(self, key, value):
        self._dataset[key] = value
        self._log.append((self._name, key.start, key.stop))


class _Disk:
    """A slow disk and a scripted run. During a run (``calls`` not None; before and after it, the
    real ``os.fsync``) each ``fsync`` sleeps ``delay`` s, then is logged as ``("sync",)``; call
    number ``k`` in ``holds`` (counted from the start of the run) first waits until ``holds[k]``
    forward passes are done (then 0.2 s, for the last one's batch to reach the writer's queue), so
    batches wait behind that commit; call number ``fail_at`` raises an ``OSError`` instead of syncing.
    Forward pass number ``n`` in ``waits`` (from 1) starts once ``fsync`` call ``waits[n]`` has begun."""

    def __init__(self, log: list, delay: float, holds: dict[int, int], waits: dict[int, int] | None = None,
                 fail_at: int | None = None):
        self.log, self.delay, self.holds, self.waits, self.fail_at = log, delay, holds, waits or {}, fail_at
        self.real, self.state, self.calls, self.forwards = os.fsync, threading.Condition(), None, 0

    def fsync(self, fd: int) -> None:
        with self.state:
            if self.calls is None:
                return self.real(fd)
            self.calls += 1
            call = self.calls
            self.state.notify_all()
            if call in self.holds:
                assert self.state.wait_for(lambda: self.forwards >= self.holds[call], timeout=60), "forwards stalled"
        if call in self.holds:
            time.sleep(0.2)
        if call == self.fail_at:
            raise OSError(errno.EIO, "simulated disk failure")
        time.sleep(self.delay)
        self.real(fd)
        self.log.append(("sync",))

    def scripted(self, embedder):
        """``embedder`` whose passes wait as ``waits`` says, and are counted."""

        def forward(batch):
            with self.state:
                n = self.forwards + 1
                if n in self.waits:
                    assert self.state.wait_for(lambda: self.calls >= self.waits[n], timeout=60), "the disk stalled"
            features = embedder(batch)
            with self.state:
                self.forwards += 1
                self.state.notify_all()
            return features

        forward.device = embedder.device
        return forward


def _recording_runner(log: list, groups: list, disk: _Disk, seen: dict):
    """``run_ingest`` on a writer whose datasets, commits and ``after_batch`` calls are logged."""

    def runner(reader, embedder, writer, batches, **kwargs):
        embedder = disk.scripted(embedder)
        for name in ROW_DATASETS + FLAG_DATASETS:
            setattr(writer, name, _Recorded(getattr(writer, name), name, log))
        write_group = writer.write_group

        def logged_group(row_batches):
            write_group(row_batches)
            groups.append([batch.image_ids.tolist() for batch in row_batches])

        writer.write_group = logged_group
        seen["batches"] = [b.tolist() for b in batches]
        log.clear()
        with disk.state:
            disk.calls = 0
        try:
            return run_ingest(reader, embedder, writer, batches, after_batch=lambda k: log.append(("after", k)),
                              **kwargs)
        finally:
            seen["syncs"], disk.calls = disk.calls, None

    return runner


def _check_order(log: list, batches: list[list[int]]) -> list[int]:
    """Assert that every flag is written after a sync that followed its rows (every row dataset)
    and that ``after_batch(k)`` comes after a sync that followed all of batch ``k``'s flags.
    Returns the batches in the order ``after_batch`` saw them."""
    written = {name: set() for name in ROW_DATASETS + FLAG_DATASETS}
    durable = {name: set() for name in ROW_DATASETS + FLAG_DATASETS}
    after = []
    for event in log:
        if event[0] == "sync":
            for name in written:
                durable[name] |= written[name]
        elif event[0] == "after":
            k = event[1]
            synced = all(set(batches[k]) <= durable[name] for name in FLAG_DATASETS)
            assert synced, f"after_batch({k}) before its flags were synced"
            after.append(k)
        else:
            name, ids = event[0], set(range(event[1], event[2]))
            if name in FLAG_DATASETS:
                late = [row for row in ROW_DATASETS if not ids <= durable[row]]
                assert not late, f"flags of rows {sorted(ids)} set before their {late} were synced"
            written[name] |= ids
    return after


def test_slow_disk_batches_share_commits_and_the_store_equals_the_plain_loop(catalog, tmp_path, monkeypatch):
    store = tmp_path / "s.h5"
    shutil.copy(catalog["store"], store)
    log, groups, seen = [], [], {}
    # batch 0's commit lasts until every batch is embedded (a disk slower than the forward passes)
    disk = _Disk(log, delay=0.02, holds={1: N_IMAGES // 2}, waits={2: 1})
    monkeypatch.setattr(os, "fsync", disk.fsync)
    report = _embed(store, runner=_recording_runner(log, groups, disk, seen))
    batches = seen["batches"]
    assert len(batches) == N_IMAGES // 2
    assert [len(group) for group in groups] == [1, len(batches) - 1]  # the other batches shared one commit
    assert [batch for group in groups for batch in group] == batches  # every batch once, in order
    assert _check_order(log, batches) == list(range(len(batches)))
    assert seen["syncs"] == 2 * len(groups)  # one sync for the rows and one for the flags of each commit
    assert _contents(store) == catalog["contents"]
    assert report.failures == catalog["failures"] and report.written == N_IMAGES - 1 and report.failed == 1


def test_a_failed_commit_keeps_earlier_commits_leaves_its_flags_unset_and_a_rerun_completes(catalog, tmp_path,
                                                                                            monkeypatch):
    store = tmp_path / "s.h5"
    shutil.copy(catalog["store"], store)
    log, groups, seen = [], [], {}
    # commits: batch 0 (done once 5 batches are embedded), batches 1-4 (failing at their rows' sync once
    # every batch is embedded); batch 5 is embedded once the failing commit has begun: 5-19 wait behind it
    disk = _Disk(log, delay=0.02, holds={1: 5, 3: N_IMAGES // 2}, waits={2: 1, 6: 3}, fail_at=3)
    monkeypatch.setattr(os, "fsync", disk.fsync)
    with pytest.raises(OSError, match="simulated disk failure"):
        _embed(store, runner=_recording_runner(log, groups, disk, seen))
    assert groups == [[seen["batches"][0]]]
    committed = [i for batch in groups[0] for i in batch]
    assert _check_order(log, seen["batches"]) == list(range(len(groups[0])))  # after_batch only for the commit
    with open_store(store) as s:
        done, features = s.done_mask(NAME), s.embeddings(NAME)
        patch_done = s.patch_done_mask(NAME)
    expected_done = np.frombuffer(catalog["contents"]["embeddings/done"], dtype=np.uint8)
    np.testing.assert_array_equal(done[committed], expected_done[committed])
    np.testing.assert_array_equal(patch_done[committed], expected_done[committed])
    rest = np.setdiff1d(np.arange(N_IMAGES), committed)
    assert (done[rest] == DONE_TODO).all() and (patch_done[rest] == DONE_TODO).all()
    reference = np.frombuffer(catalog["contents"]["embeddings/features"], dtype=np.float32).reshape(N_IMAGES, -1)
    assert features[committed].tobytes() == reference[committed].tobytes()
    left = [t.name for t in threading.enumerate() if t.name.startswith(("swsa-decode", "swsa-write"))]
    assert not left, f"threads of the runner still alive: {left}"
    report = _embed(store)
    assert report.already_done == len([i for i in committed if i != BROKEN])
    assert _contents(store) == catalog["contents"]


def test_forward_pass_waits_only_past_the_backlog_bound(catalog, tmp_path, monkeypatch):
    store = tmp_path / "s.h5"
    shutil.copy(catalog["store"], store)
    _embed(store, max_batches=0)  # the matrices, no row
    entered, release = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def blocked_fsync(fd):
        entered.set()
        assert release.wait(10), "the test never released the disk"
        real_fsync(fd)

    rng = np.random.default_rng(0)
    batches = [EmbeddedBatch(np.array([2 * k, 2 * k + 1]), np.ones(2, bool),
                             (rng.standard_normal((2, 512), dtype=np.float32),
                              rng.standard_normal((2, 1, 256), dtype=np.float32)), ["", ""]) for k in range(4)]
    size = batches[0].nbytes
    groups, failures = [], []
    monkeypatch.setattr(os, "fsync", blocked_fsync)
    with writer_lock(store), EmbeddingRowWriter(store, NAME, patches=True) as writer:
        write_group = writer.write_group
        writer.write_group = lambda rows: (write_group(rows), groups.append([b.image_ids[0] // 2 for b in rows]))
        with GroupCommits(writer, failures, backlog_bytes=3 * size) as commits:
            commits.submit(0, batches[0])
            assert entered.wait(10)  # batch 0's commit holds the disk
            started = time.monotonic()
            commits.submit(1, batches[1])
            commits.submit(2, batches[2])  # 3 batches pending: within the bound, no wait
            assert time.monotonic() - started < 1.0
            fourth = threading.Thread(target=commits.submit, args=(3, batches[3]))
            fourth.start()
            fourth.join(0.3)
            assert fourth.is_alive(), "the fourth batch did not wait although the backlog was full"
            release.set()
            fourth.join(10)
            assert not fourth.is_alive()
            commits.close()
            commits.raise_failure()
            durable = commits.durable()
    assert [k for k, _ in durable] == [0, 1, 2, 3] and all((s == DONE_WRITTEN).all() for _, s in durable)
    assert groups[0] == [0] and groups[1][:2] == [1, 2]  # batches 1 and 2 waited together: one commit
    with open_store(store) as s:
        np.testing.assert_array_equal(s.embeddings(NAME)[:8], np.concatenate([b.features[0] for b in batches]))
        assert (s.done_mask(NAME)[:8] == DONE_WRITTEN).all() and (s.done_mask(NAME)[8:] == DONE_TODO).all()


@pytest.fixture
def counted_plan(monkeypatch):
    """Counts the images read through a :class:`~swsa_store.ingest_pipeline.PixelPlan`."""
    calls = []
    pixels = ingest_pipeline.PixelPlan.pixels
    monkeypatch.setattr(ingest_pipeline.PixelPlan, "pixels", lambda plan, image: calls.append(1) or pixels(plan, image))
    return calls


def _transform():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_backbone(TINY, weights="random", image_size=16).transform


def _paths_and_plain_pixels(catalog, transform):
    with open_store(catalog["store"]) as s:
        paths = [str(resolve_path(catalog["store"], p)) for p in s.images()["path"].iloc[:10]]
    good = [p for i, p in enumerate(paths) if i != BROKEN]
    return paths, np.stack([transform(read_image(p)).numpy() for p in good])


def test_ray_read_task_uses_the_pixel_plan_and_gives_the_transforms_bytes(catalog, counted_plan):
    transform = _transform()
    paths, expected = _paths_and_plain_pixels(catalog, transform)
    row = {"batch": 3, "payload": pickle.dumps({"ids": np.arange(10), "paths": paths})}
    out = read_embed_batch(row, transform=transform)
    job = pickle.loads(out["payload"])
    assert out["batch"] == 3 and job["ok"].tolist() == [i != BROKEN for i in range(10)]
    assert job["reasons"][BROKEN].startswith("cannot decode image")
    assert job["pixels"].dtype == np.float32 and job["pixels"].tobytes() == expected.tobytes()
    assert len(counted_plan) == 9  # every decoded image went through the plan


def test_predict_reads_with_the_pixel_plan_and_gives_the_transforms_bytes(catalog, counted_plan):
    transform = _transform()
    paths, expected = _paths_and_plain_pixels(catalog, transform)
    rows = np.arange(100, 110)
    batches = list(image_batches(rows, paths, transform, batch_size=4))
    assert [b[0].tolist() for b in batches] == [rows[:4].tolist(), rows[4:8].tolist(), rows[8:].tolist()]
    ok = np.concatenate([b[1] for b in batches])
    assert ok.tolist() == [i != BROKEN for i in range(10)]
    got = np.concatenate([b[2].numpy() for b in batches if b[2] is not None])
    assert got.dtype == np.float32 and got.tobytes() == expected.tobytes()
    assert len(counted_plan) == 9
