"""Scale-out on Ray (``swsa_store.distributed``): the same bytes as the local path, faults
survived, the driver the store's only writer.

One local Ray instance with 2 CPUs serves the whole module; every result is compared byte for
byte with the local path run in this process. The tests that start Ray take about 4 minutes on a
2-core machine, so they are marked ``slow`` and `.ci/run` runs them on their own line
(``python -m pytest -q -m slow tests/test_ray.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from swsa_store import open_store
from swsa_store.catalog import catalog_dataset
from swsa_store.ingest import embed_store
from swsa_store.schema import DONE_WRITTEN

TINY = "timm/resnet10t"
NAME = "timm-resnet10t"
EMBED = dict(weights="random", image_size=32, progress=False)


# --------------------------------------------------------------------------------------------
# fixtures: one Ray instance, one catalog, local references
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'swsa[distributed]'")
    pytest.importorskip("ray.data")
    from ray import cloudpickle

    # the fault-injecting actors below travel by value (workers cannot import this test module)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def folder_store(tmp_path_factory):
    """3 classes x 30 images, a corrupt file (a catalog skip) and a file corrupted after
    cataloguing (an embed-time recorded skip)."""
    root = tmp_path_factory.mktemp("ray_folder")
    rng = np.random.default_rng(0)
    for c, class_name in enumerate("abc"):
        (root / "img" / class_name).mkdir(parents=True)
        for i in range(30):
            pixels = np.clip(rng.normal(80 + 50 * c, 40, (24 + i % 5, 28, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "img" / class_name / f"{i:02d}.png")
    (root / "img" / "a" / "99.png").write_bytes(b"not an image")
    store = root / "s.h5"
    catalog_dataset(store, "folder", root=root / "img", n_seed=4)
    late = root / "img" / "b" / "07.png"
    late.write_bytes(late.read_bytes()[:40])  # truncated after cataloguing
    return store


def _copy(src: Path, dst_dir: Path) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / "s.h5"
    shutil.copyfile(src, dst)
    return dst


_references: dict[int, Path] = {}


def local_reference(folder_store: Path, tmp_path_factory, batch_size: int) -> Path:
    """The local path's store for this batch size (computed once)."""
    if batch_size not in _references:
        store = _copy(folder_store, tmp_path_factory.mktemp(f"local_bs{batch_size}"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            embed_store(store, TINY, batch_size=batch_size, **EMBED)
        _references[batch_size] = store
    return _references[batch_size]


def _embed_skips(store: Path) -> list[tuple[int, str]]:
    with open_store(store) as s:
        skips = s.skips()
    rows = skips[skips["stage"] == "embed"]
    return sorted(zip(rows["image_id"].astype(int), rows["reason"]))


def assert_same_store(reference: Path, store: Path) -> None:
    with open_store(reference) as a, open_store(store) as b:
        fa, fb = a.embeddings(NAME), b.embeddings(NAME)
        assert fa.tobytes() == fb.tobytes(), f"max |difference| {np.nanmax(np.abs(fa - fb))}"
        np.testing.assert_array_equal(a.done_mask(NAME), b.done_mask(NAME))
    assert _embed_skips(reference) == _embed_skips(store)


# --------------------------------------------------------------------------------------------
# embedding
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_embed_on_ray_gives_the_local_path_bytes(ray_instance, folder_store, tmp_path, tmp_path_factory):
    from swsa_store.distributed import embed_store_ray

    reference = local_reference(folder_store, tmp_path_factory, 16)
    store = _copy(folder_store, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = embed_store_ray(store, TINY, batch_size=16, cpu_threads=torch.get_num_threads(), **EMBED)
    assert report.total == 90 and report.written == 89 and report.failed == 1
    assert report.failures[0][1].startswith("cannot decode image")  # the bad image: a recorded skip
    assert_same_store(reference, store)
    with open_store(store) as s:
        done = s.done_mask(NAME)
    assert (done == DONE_WRITTEN).sum() == 89


class KillOnceEmbedActor:
    """The model actor, killed through Ray's API (``ray.kill(self, no_restart=False)``) in the
    middle of its third call, once per marker file; Ray restarts it and retries the call."""

    marker = ""

    def __init__(self, model_ref):
        from swsa_store.distributed import EmbedActor

        self.inner = EmbedActor(model_ref)
        self.calls = 0

    def __call__(self, row):
        import ray

        self.calls += 1
        if self.calls == 3 and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            ray.kill(ray.get_runtime_context().current_actor, no_restart=False)
            time.sleep(60)  # killed before this returns
        return self.inner(row)


def _gone(pid: int, wait_s: float = 10.0) -> bool:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_actor_killed_mid_run_is_restarted_and_the_store_is_identical(ray_instance, folder_store, tmp_path,
                                                                      tmp_path_factory):
    from swsa_store.distributed import RayIngestRunner

    reference = local_reference(folder_store, tmp_path_factory, 8)
    store = _copy(folder_store, tmp_path)
    KillOnceEmbedActor.marker = str(tmp_path / "killed")
    runner = RayIngestRunner(actor_cls=KillOnceEmbedActor, cpu_threads=torch.get_num_threads())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = embed_store(store, TINY, batch_size=8, runner=runner, **EMBED)
    assert Path(KillOnceEmbedActor.marker).exists(), "the actor was never killed"
    killed_pid = int(Path(KillOnceEmbedActor.marker).read_text())
    assert _gone(killed_pid), "the killed actor's process is still alive"
    assert report.written == 89 and report.failed == 1
    assert runner.stats["batches"] == 12
    assert_same_store(reference, store)


def _done_count(store: Path) -> int:
    try:
        with h5py.File(store, "r", locking=False) as f:
            return int((f["embeddings"][NAME]["done"][...] == DONE_WRITTEN).sum())
    except (OSError, KeyError):
        return 0


@pytest.mark.slow
def test_driver_killed_then_rerun_completes_identically(ray_instance, folder_store, tmp_path, tmp_path_factory):
    """The CLI as a driver connected to the running cluster (--ray ADDRESS), SIGKILL-ed once some
    rows are durable; the same command again finishes with the local path's bytes."""
    reference = local_reference(folder_store, tmp_path_factory, 2)
    store = _copy(folder_store, tmp_path)
    address = ray_instance.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "swsa_engine.app.cli", "embed", "--store", str(store), "--backbone", TINY,
           "--weights", "random", "--image-size", "32", "--batch-size", "2", "--quiet", "--ray", address,
           "--cpu-threads", str(torch.get_num_threads())]
    for attempt in range(3):  # a driver that outruns the kill is retried on a fresh copy
        shutil.copyfile(folder_store, store)
        process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None and _done_count(store) == 0:
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
        _, err = process.communicate(timeout=60)
        assert process.returncode in (-signal.SIGKILL, 0), err.decode()[-2000:]
        done_after_kill = _done_count(store)
        if 0 < done_after_kill < 89:
            break
    else:
        pytest.fail(f"could not kill the driver mid-run in 3 attempts (last: {done_after_kill} rows done)")
    with h5py.File(store, "r"):  # the file opens cleanly after the kill
        pass
    rerun = subprocess.run(cmd, capture_output=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
    summary = rerun.stdout.decode()
    assert f"already_done={done_after_kill}" in summary, summary
    assert_same_store(reference, store)


# --------------------------------------------------------------------------------------------
# synthesis
# --------------------------------------------------------------------------------------------


def _tiny_adm(path: Path) -> Path:
    from swsa_store.synth.adm import ADMConfig, ADMUNet, save_adm

    torch.manual_seed(0)
    net = ADMUNet(ADMConfig(image_size=16, model_channels=32, out_channels=6, num_res_blocks=1, attention_ds=(2,),
                            channel_mult=(1, 2), num_head_channels=16))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # ADM zero-initialises some output convolutions
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return save_adm(net.eval(), path)


def _synthetic_rows(store: Path, source: str = "diffusion"):
    with open_store(store) as s:
        images = s.images()
    rows = images[images["kind"] == source].sort_values(["task_id", "source_index"])
    return rows[["task_id", "source_index", "sha256", "parent_ids", "params", "width", "height"]].reset_index(drop=True)


@pytest.mark.slow
def test_diffusion_synthesis_on_ray_gives_the_local_path_images(ray_instance, tmp_path):
    from swsa_store.distributed import synthesize_ray
    from swsa_store.synthesize import synthesize

    local, remote = tmp_path / "local.h5", tmp_path / "ray.h5"
    for store in (local, remote):
        catalog_dataset(store, "digits", image_dir=tmp_path / "digits", image_size=16, n_seed=4)
    model = _tiny_adm(tmp_path / "tiny_adm.pt")
    with open_store(local) as s:
        task_ids = [int(t) for t in s.tasks()["task_id"][:3]]
    kwargs = dict(model=str(model), steps=4, batch_size=3, task_ids=task_ids, progress=False)
    synthesize(local, "diffusion", device="cpu", **kwargs)
    # one task already made locally: the Ray run must skip it (resume rule)
    synthesize(remote, "diffusion", device="cpu", **{**kwargs, "task_ids": task_ids[:1]})
    summary = synthesize_ray(remote, "diffusion", cpu_threads=torch.get_num_threads(), **kwargs)
    assert summary == {"source": "diffusion", "tasks_done": 2, "tasks_skipped": 1, "images": 2 * 4, "skipped_images": 0}
    a, b = _synthetic_rows(local), _synthetic_rows(remote)
    assert len(a) == 3 * 4
    # pixel-identical: the PNG files' bytes (sha256) and provenance are the local path's
    assert a.equals(b)
    with open_store(remote) as s:
        paths = s.images().query("kind == 'diffusion'")["path"]
    for path in paths:
        assert hashlib.sha256(Path(path).read_bytes()).hexdigest() in set(a["sha256"])
    params = [json.loads(p) for p in b["params"]]
    assert {p["model"] for p in params} == {"tiny_adm.pt"}
    # nothing left: a rerun skips every task
    again = synthesize_ray(remote, "diffusion", cpu_threads=torch.get_num_threads(), **kwargs)
    assert again["tasks_skipped"] == 3 and again["images"] == 0


# --------------------------------------------------------------------------------------------
# without Ray
# --------------------------------------------------------------------------------------------


def test_missing_ray_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    from swsa_engine.app.cli import main
    from swsa_store.distributed import RAY_MISSING, RayUnavailableError, require_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if not installed
    with pytest.raises(RayUnavailableError, match="pip install 'swsa\\[distributed\\]'"):
        require_ray()
    store = tmp_path / "s.h5"
    for argv in (["embed", "--store", str(store), "--backbone", TINY, "--weights", "random", "--ray"],
                 ["synth", "--store", str(store), "--method", "cutpaste", "--ray", "auto"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err == f"swsa: error: {RAY_MISSING}\n"
    assert RAY_MISSING == "--ray needs Ray: pip install 'swsa[distributed]'"


def test_cli_ray_options_parse():
    from swsa_engine.app.cli import build_parser, ray_kwargs as _ray_kwargs

    parser = build_parser()
    args = parser.parse_args(["embed", "--store", "s.h5", "--backbone", "x", "--ray", "--actors-per-gpu", "2"])
    assert _ray_kwargs(args) == {"address": None, "actors_per_gpu": 2, "num_actors": None, "read_on": "driver",
                                 "cpu_threads": None}
    args = parser.parse_args(["synth", "--store", "s.h5", "--ray", "10.0.0.1:6379", "--actors", "3", "--read-on", "any"])
    assert _ray_kwargs(args)["address"] == "10.0.0.1:6379" and args.actors == 3 and args.read_on == "any"
    assert parser.parse_args(["embed", "--store", "s.h5", "--backbone", "x"]).ray is None


def test_bench_ingest_measures_pipeline_and_forward(tmp_path):
    from swsa_engine.app.bench import bench_ingest, format_ingest

    figures = bench_ingest(tmp_path, n_images=24, source_size=48, image_size=32, batch_size=8)
    assert figures["pipeline"]["written"] == 24
    for key in ("forward", "pipeline"):
        assert figures[key]["images_per_s"] > 0 and figures[key]["seconds"] > 0
    assert figures["ratio"] == pytest.approx(figures["pipeline"]["images_per_s"] / figures["forward"]["images_per_s"])
    text = format_ingest(figures)
    assert "model forward alone" in text and "% of the forward pass" in text
