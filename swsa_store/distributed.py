"""Scale-out on Ray: embedding and synthesis through Ray Data, the driver the store's single writer.

The same ingest and synthesis as the local path (:mod:`.ingest`, :mod:`.synthesize`), with the
work spread over a Ray cluster::

    catalog rows still to do ──► Ray dataset (one row = one fixed batch / one task)
      ──► CPU tasks: read + preprocess (pinned to the driver's node unless read_on="any")
      ──► model actors (one per GPU, num_gpus=1/actors_per_gpu, autocast on GPU; CPU actors
          when the cluster has no GPU): the local path's forward pass / generator
      ──► results stream back to the driver (float32 rows; PNG bytes)
      ──► the driver alone writes: EmbeddingRowWriter (rows fsync-ed, then flagged done) or
          SynthWriter (files fsync-ed, then catalogued)

Exactness: an embedding row = one fixed batch of :func:`~swsa_store.ingest.fixed_batches`,
embedded by one model call with the same preprocessing transform and the same
:class:`~swsa_store.ingest.Embedder` (weights shipped from the driver), so on the same kind of
device the rows have the bytes of the local path; a synthesis row = one task, made by
:func:`~swsa_store.synthesize.generate_task` with the same generator settings (DiffStyle with the
same ``batch_size``), so the PNGs are the local path's.

Faults: actors are restarted and their calls retried by Ray (``max_restarts=-1``,
``max_task_retries=-1``), read tasks retried; the driver ignores a result it has already
written (a batch or task is written once) and checks at the end that every one arrived. A
driver killed at any moment is resumed by running the same command again: done rows are skipped.

Ray is optional (``pip install 'swsa[distributed]'``) and imported only inside functions.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import pickle
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from swsa_store.catalog import resolve_path
from swsa_store.ingest import Embedder, ImageReader, collate_items, embed_store
from swsa_store.ingest_pipeline import GroupCommits, pixel_plan, report_durable
from swsa_store.row_writer import EmbeddedBatch
from swsa_store.samples import decode_rgb
from swsa_store.synth import GENERATORS, create_generator
from swsa_store.synthesize import SynthWriter, encode_synthetic, generate_task, plan_synthesis, synth_source_name

log = logging.getLogger(__name__)

#: The one-line error when ``--ray`` is asked for without Ray installed.
RAY_MISSING = "--ray needs Ray: pip install 'swsa[distributed]'"
READ_ON = ("driver", "any")


class RayUnavailableError(ImportError):
    """Ray (with Ray Data) is not installed."""


def require_ray():
    """The ``ray`` module with ``ray.data`` loaded, or :class:`RayUnavailableError` (one line, how to install)."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise RayUnavailableError(RAY_MISSING) from None
    return ray


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None,
                quiet: bool = True) -> Iterator[Any]:
    """Use the running Ray, or connect to ``address`` (``"auto"``, ``host:port``, ``ray://...``), or
    start a local instance (``address`` None / ``"local"``). Only a Ray started here is shut down."""
    ray = require_ray()
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": not quiet,
                                  "logging_level": logging.WARNING if quiet else logging.INFO}
        if address in (None, "", "local"):
            ray.init(num_cpus=num_cpus, num_gpus=num_gpus, **kwargs)
        else:
            kwargs.pop("include_dashboard")
            ray.init(address=address, **kwargs)
        started = True
    _quiet_ray_data(ray, quiet)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def _quiet_ray_data(ray, quiet: bool) -> None:
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours counts rows and rows/s
    ctx.print_on_execution_start = not quiet
    ctx.enable_auto_log_stats = False
    if quiet:
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def actor_plan(ray, *, actors_per_gpu: int = 1, num_actors: int | None = None) -> dict:
    """How many model actors and what each asks for.

    With GPUs in the cluster: ``GPUs × actors_per_gpu`` actors of ``num_gpus = 1 / actors_per_gpu``;
    without: CPU actors of one CPU each, half the cluster's CPUs (at least 1; the other half
    reads). ``num_actors`` overrides the count. Returns ``{"actors", "num_gpus", "num_cpus", "gpus"}``.
    """
    if isinstance(actors_per_gpu, bool) or not isinstance(actors_per_gpu, int) or actors_per_gpu < 1:
        raise ValueError(f"actors per GPU must be a positive integer, got {actors_per_gpu!r}; fix --actors-per-gpu")
    if num_actors is not None and (isinstance(num_actors, bool) or num_actors < 1):
        raise ValueError(f"the number of actors must be a positive integer, got {num_actors!r}; fix --actors")
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return {"actors": num_actors or gpus * actors_per_gpu, "num_gpus": 1.0 / actors_per_gpu, "num_cpus": 1,
                "gpus": gpus}
    cpus = int(resources.get("CPU", 1))
    return {"actors": num_actors or max(1, cpus // 2), "num_gpus": 0.0, "num_cpus": 1, "gpus": 0}


def _read_args(ray, read_on: str) -> dict:
    """Arguments of the read tasks (one CPU each; Ray retries a task whose worker dies): pinned
    to the driver's node, which has the files (``"driver"``), or anywhere (``"any"``)."""
    if read_on not in READ_ON:
        raise ValueError(f"expected read_on in {list(READ_ON)}, got {read_on!r}; fix --read-on")
    args: dict[str, Any] = {"num_cpus": 1}
    if read_on == "driver":
        args["label_selector"] = {"ray.io/node-id": ray.get_runtime_context().get_node_id()}
    return args


def _actor_args(ray, plan: dict, cpu_threads: int | None) -> dict:
    """Arguments of the model actors. Ray Data restarts a dead actor and retries its calls
    (``max_restarts=-1``, ``max_task_retries=-1`` are its defaults for actor pools).
    ``cpu_threads`` sets CPU actors' ``OMP_NUM_THREADS`` (Ray's default: their CPU count, 1):
    CPU kernels can depend on it, so CPU actors give the local path's bytes with its thread count."""
    args: dict[str, Any] = {"compute": ray.data.ActorPoolStrategy(size=plan["actors"]), "num_cpus": plan["num_cpus"]}
    if plan["num_gpus"]:
        args["num_gpus"] = plan["num_gpus"]
    elif cpu_threads is not None:
        if isinstance(cpu_threads, bool) or not isinstance(cpu_threads, int) or cpu_threads < 1:
            raise ValueError(f"cpu_threads must be a positive integer, got {cpu_threads!r}; fix --cpu-threads")
        args["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(cpu_threads), "MKL_NUM_THREADS": str(cpu_threads)}}
    return args


def _ray_pipeline(ray, items: list[dict], read_fn: Callable, read_kwargs: dict, read_on: str, actor_cls: type,
                  actor_kwargs: dict, plan: dict, cpu_threads: int | None):
    """The Ray dataset ``items`` (one block each) → read tasks (``read_fn``) → model actors
    (``actor_cls``), whose rows stream back to the driver."""
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map(read_fn, fn_kwargs=read_kwargs, **_read_args(ray, read_on))
    return ds.map(actor_cls, fn_constructor_kwargs=actor_kwargs, **_actor_args(ray, plan, cpu_threads))


def _actor_device() -> str:
    """``cuda`` when Ray gave this actor a GPU, else ``cpu``."""
    import ray

    return "cuda" if ray.get_gpu_ids() else "cpu"


def _payload(obj) -> bytes:
    return pickle.dumps(obj, protocol=5)


# --------------------------------------------------------------------------------------------
# embedding
# --------------------------------------------------------------------------------------------


def read_embed_batch(row: dict, *, transform: Callable) -> dict:
    """CPU task: decode and preprocess one fixed batch with the local path's reader and, as it,
    the transform's numpy pixel plan (:func:`~swsa_store.ingest_pipeline.pixel_plan`: the same bytes
    without torch's per-image operations).

    In: ``{"batch", "payload": {"ids" (B,), "paths" [B]}}``. Out: ``{"batch", "payload": {"ids"
    (B,) int64, "ok" (B,) bool, "pixels" (ok.sum(), 3, H, W) float32 or None, "reasons" [B]}}``.
    """
    job = pickle.loads(row["payload"])
    reader = ImageReader(job["ids"], job["paths"], transform, os.sep)  # paths are absolute
    reader = reader.with_plan(pixel_plan(transform))
    ids, ok, batch, reasons = collate_items([reader[i] for i in range(len(reader))])
    pixels = batch.numpy() if batch is not None else None
    return {"batch": row["batch"], "payload": _payload({"ids": ids, "ok": ok, "pixels": pixels, "reasons": reasons})}


class EmbedActor:
    """Model actor: the local path's :class:`~swsa_store.ingest.Embedder` on the actor's device
    (autocast on GPU). ``model_ref``: ``[ObjectRef]`` of the driver's model (weights travel
    through the object store; workers need no weight files)."""

    def __init__(self, model_ref: list):
        import ray

        self.device = _actor_device()
        self.embedder = Embedder(ray.get(model_ref[0]), device=self.device)

    def __call__(self, row: dict) -> dict:
        """``{"batch", "payload"}`` → ``{"batch", "payload": {"ids", "ok", "features" (ok.sum(), D) float32 | None, "reasons"}}``."""
        job = pickle.loads(row["payload"])
        features = self.embedder(torch.from_numpy(job.pop("pixels"))) if job["ok"].any() else None
        job["features"] = features
        return {"batch": row["batch"], "payload": _payload(job)}


class RayIngestRunner:
    """A drop-in for :func:`~swsa_store.ingest.run_ingest` (``embed_store(..., runner=...)``) that
    embeds on Ray and writes on the driver.

    ``actors_per_gpu``/``num_actors``: see :func:`actor_plan`; ``read_on``: ``"driver"`` (read
    tasks on the driver's node: no shared file system needed) or ``"any"`` (every node sees the
    images at the catalog's paths); ``actor_cls``: the model actor class (a subclass of
    :class:`EmbedActor`). ``stats`` holds the last run's timings.
    """

    def __init__(self, *, actors_per_gpu: int = 1, num_actors: int | None = None, read_on: str = "driver",
                 actor_cls: type = EmbedActor, cpu_threads: int | None = None):
        self.actors_per_gpu, self.num_actors, self.read_on = actors_per_gpu, num_actors, read_on
        self.actor_cls, self.cpu_threads = actor_cls, cpu_threads
        self.stats: dict = {}

    def __call__(self, reader, embedder, writer, batches: list[np.ndarray], *, num_workers: int = 0,
                 progress: bool = True, description: str = "embed",
                 after_batch: Callable[[int], None] | None = None) -> tuple[int, int, list[tuple[int, str]]]:
        """Embed ``batches`` (sorted image-id arrays, each one model call) and write them on the driver.

        Returns ``(rows written, rows failed, [(image_id, reason), ...])`` like ``run_ingest``.
        """
        ray = require_ray()
        if not batches:
            return 0, 0, []
        if not ray.is_initialized():
            raise RuntimeError("Ray is not initialised; run inside distributed.ray_session(address)")
        started = time.perf_counter()
        plan = actor_plan(ray, actors_per_gpu=self.actors_per_gpu, num_actors=self.num_actors)
        position = {image_id: i for i, image_id in enumerate(reader.image_ids)}
        items = []
        for k, batch in enumerate(batches):
            paths = [str(resolve_path(reader.store_path, reader.paths[position[int(i)]])) for i in batch]
            items.append({"batch": k, "payload": _payload({"ids": np.asarray(batch, dtype=np.int64), "paths": paths})})
        model_ref = ray.put(embedder.model.to("cpu"))
        ds = _ray_pipeline(ray, items, read_embed_batch, {"transform": reader.transform}, self.read_on,
                           self.actor_cls, {"model_ref": [model_ref]}, plan, self.cpu_threads)
        duplicates = 0
        counts = {"written": 0, "failed": 0}
        failures: list[tuple[int, str]] = []
        seen: set[int] = set()
        n_rows = sum(len(b) for b in batches)
        first = None
        # results arrive in any order; each is committed as it comes, in group commits like the local path
        with tqdm(total=n_rows, desc=f"{description} (ray, {plan['actors']} actors)", unit="img",
                  disable=not progress, dynamic_ncols=True) as bar, GroupCommits(writer, failures) as commits:
            for row in ds.iter_rows():
                k = int(row["batch"])
                if k in seen:  # a retried call's second answer: submitted already
                    duplicates += 1
                    continue
                result = pickle.loads(row["payload"])
                first = first or time.perf_counter()
                commits.submit(k, EmbeddedBatch(result["ids"], result["ok"], result["features"], result["reasons"]))
                seen.add(k)
                report_durable(commits, counts, bar, after_batch)
            commits.close()
            report_durable(commits, counts, bar, after_batch)
        written, failed = counts["written"], counts["failed"]
        del model_ref
        if len(seen) != len(batches):
            raise RuntimeError(f"Ray returned {len(seen)} of {len(batches)} batches; run the same command again "
                               "to embed the rest (done rows are kept)")
        end = time.perf_counter()
        self.stats = {"seconds": end - started, "seconds_after_first_result": end - (first or end),
                      "rows": n_rows, "batches": len(batches), "duplicates_ignored": duplicates, **plan}
        return written, failed, failures


def embed_store_ray(store_path: str | os.PathLike, backbone: str, *, address: str | None = None,
                    actors_per_gpu: int = 1, num_actors: int | None = None, read_on: str = "driver",
                    actor_cls: type = EmbedActor, cpu_threads: int | None = None, num_cpus: int | None = None,
                    **embed_kwargs):
    """:func:`~swsa_store.ingest.embed_store` on Ray: same store, same rows, same resume rule.

    The driver loads the backbone on CPU (for its attributes and to ship its weights), the
    actors embed; ``embed_kwargs`` are ``embed_store``'s (``device`` is ignored: actors use
    their GPU, else the CPU). ``address``: see :func:`ray_session` (``num_cpus`` only for a
    local instance started here); ``cpu_threads``: see :func:`_actor_args`. Returns the
    :class:`~swsa_store.ingest.IngestReport`.
    """
    embed_kwargs.pop("device", None)
    embed_kwargs.pop("num_workers", None)
    runner = RayIngestRunner(actors_per_gpu=actors_per_gpu, num_actors=num_actors, read_on=read_on, actor_cls=actor_cls,
                             cpu_threads=cpu_threads)
    with ray_session(address, num_cpus=num_cpus):
        return embed_store(store_path, backbone, device="cpu", runner=runner, **embed_kwargs)


# --------------------------------------------------------------------------------------------
# synthesis
# --------------------------------------------------------------------------------------------


def read_synth_job(row: dict, *, store_path: str) -> dict:
    """CPU task: attach the job's seed files as raw bytes (read where the files are).

    ``{"job", "payload": TaskJob}`` → ``{"job", "payload": (TaskJob, [bytes per seed])}``.
    """
    job = pickle.loads(row["payload"])
    seeds = [Path(resolve_path(store_path, p)).read_bytes() for p in job.seed_paths]
    return {"job": row["job"], "payload": _payload((job, seeds))}


class SynthActor:
    """Model actor: builds the generator once (the driver's loaded model, when it has one, moved
    to the actor's device) and makes whole tasks with :func:`~swsa_store.synthesize.generate_task`.

    ``spec``: ``{"method", "kwargs", "model_ref": [ObjectRef] | None, "takes_device", "seed", "source"}``.
    """

    def __init__(self, spec: dict):
        import ray

        kwargs = dict(spec["kwargs"])
        if spec["model_ref"] is not None:
            kwargs["model"] = ray.get(spec["model_ref"][0])
        if spec["takes_device"]:
            kwargs["device"] = _actor_device()
        self.generator = create_generator(spec["method"], **kwargs)
        self.seed, self.source = spec["seed"], spec["source"]

    def __call__(self, row: dict) -> dict:
        """``{"job", "payload": (TaskJob, seed bytes)}`` → ``{"job", "payload": [(index, png bytes,
        width, height, parent_ids, params, skip_reason), ...]}`` (:func:`encode_synthetic`; a skip
        has no bytes)."""
        job, seeds = pickle.loads(row["payload"])
        images = [decode_rgb(data) for data in seeds]
        made = [encode_synthetic(index, item)
                for index, item in generate_task(self.generator, job, images, self.seed, self.source)]
        return {"job": row["job"], "payload": _payload(made)}


def synthesize_ray(store_path: str | os.PathLike, method: str = "cutpaste", *, address: str | None = None,
                   count: int | None = None, seed: int = 0, source: str | None = None,
                   task_ids: list[int] | None = None, progress: bool = True, commit_every_s: float = 30.0,
                   actors_per_gpu: int = 1, num_actors: int | None = None, read_on: str = "driver",
                   actor_cls: type = SynthActor, cpu_threads: int | None = None, num_cpus: int | None = None,
                   stats: dict | None = None, **generator_kwargs) -> dict:
    """:func:`~swsa_store.synthesize.synthesize` on Ray: one dataset row per task still to do.

    The driver plans (same rule: catalogued indices are skipped); read tasks (on the driver's
    node unless ``read_on="any"``) attach the seed files as bytes; actors get the generator's
    model (loaded once by the driver) from the object store and send back PNG bytes; the driver
    writes files and catalogue rows (:class:`~swsa_store.synthesize.SynthWriter`). ``device`` is
    ignored (actors use their GPU); ``cpu_threads``: see :func:`_actor_args`; ``stats`` (a dict)
    receives the timings. Returns synthesize's summary.
    """
    require_ray()  # before loading any model
    if count is not None and (isinstance(count, bool) or count < 1):
        raise ValueError(f"count must be at least 1, got {count}")
    generator_kwargs.pop("device", None)
    generator, takes_device = _driver_generator(method, generator_kwargs)
    source = synth_source_name(method, generator_kwargs, source)
    jobs, skipped, files_dir = plan_synthesis(store_path, generator, source, count, task_ids)
    writer = SynthWriter(store_path, files_dir, source=source, method=method, seed=seed, commit_every_s=commit_every_s,
                         commit_every=generator.commit_every)
    if not jobs:
        return {"source": source, "tasks_done": 0, "tasks_skipped": skipped, "images": 0, "skipped_images": 0}
    with ray_session(address, num_cpus=num_cpus) as ray:
        started = time.perf_counter()
        plan = actor_plan(ray, actors_per_gpu=actors_per_gpu, num_actors=num_actors)
        spec = _synth_actor_spec(ray, generator, method, generator_kwargs, takes_device, seed, source)
        del generator
        items = [{"job": j, "payload": _payload(job)} for j, job in enumerate(jobs)]
        ds = _ray_pipeline(ray, items, read_synth_job, {"store_path": str(os.path.abspath(store_path))}, read_on,
                           actor_cls, {"spec": spec}, plan, cpu_threads)
        seen, duplicates = _write_synth_rows(ds, jobs, writer, f"synth {source} (ray, {plan['actors']} actors)",
                                             progress)
        writer.flush()
        if stats is not None:
            stats.update({"seconds": time.perf_counter() - started, "tasks": len(jobs), "images": writer.written,
                          "duplicates_ignored": duplicates, **plan})
        if len(seen) != len(jobs):
            raise RuntimeError(f"Ray returned {len(seen)} of {len(jobs)} tasks; run the same command again "
                               "to make the rest (catalogued images are kept)")
    return {"source": source, "tasks_done": len(jobs), "tasks_skipped": skipped, "images": writer.written,
            "skipped_images": writer.skipped}


def _driver_generator(method: str, generator_kwargs: dict) -> tuple[Any, bool]:
    """The driver's generator (on CPU when it takes a ``device``: it only plans and ships its
    model) and whether it takes a ``device``."""
    takes_device = "device" in inspect.signature(GENERATORS.get(method)).parameters
    driver_kwargs = {**generator_kwargs, **({"device": "cpu"} if takes_device else {})}
    return create_generator(method, **driver_kwargs), takes_device


def _synth_actor_spec(ray, generator, method: str, generator_kwargs: dict, takes_device: bool, seed: int,
                      source: str) -> dict:
    """:class:`SynthActor`'s ``spec``."""
    # a generator with a model (diffusion) gets the driver's loaded one: no weight files on workers
    model = getattr(generator, "model", None)
    model_ref = None if model is None else ray.put(model)
    return {"method": method, "kwargs": {k: v for k, v in generator_kwargs.items() if k != "model"},
            "model_ref": None if model_ref is None else [model_ref], "takes_device": takes_device,
            "seed": seed, "source": source}


def _write_synth_rows(ds, jobs: list, writer, description: str, progress: bool) -> tuple[set[int], int]:
    """Write each task's images as they arrive, once per task (a retried call's second answer is
    ignored). Returns (indices of the jobs written, answers ignored)."""
    seen: set[int] = set()
    duplicates = 0
    total = sum(job.count - len(job.existing) for job in jobs)
    with tqdm(total=total, desc=description, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for row in ds.iter_rows():
            j = int(row["job"])
            if j in seen:
                duplicates += 1
                continue
            for index, data, width, height, parent_ids, params, skip_reason in pickle.loads(row["payload"]):
                writer.add(jobs[j], index, data, width, height, parent_ids, params, skip_reason)
                bar.update(1)
            seen.add(j)
    return seen, duplicates
