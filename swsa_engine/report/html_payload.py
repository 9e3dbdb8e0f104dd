"""The HTML report's task payloads: one JSON object per task, from which the page builds the
task's section when it is opened — its seed images, synthetic anomalies per generator, a sample
of real validation images (thumbnail data URIs carried by the payload), every candidate's
synthetic and real AUROC, SWSA's and the oracle's picks, the label-free confidence of every pick
(``pick_confidence.csv``: resample probability, source agreement, margin, and the regret per setting),
the recommendation and why (``recommendation.csv``) and its recorded skips. The store is
read through :class:`swsa_engine.run.report_inputs.StoreImages`."""

from __future__ import annotations

import json
import os
from typing import Iterator

import numpy as np
import pandas as pd

from swsa_engine.core.cube import SETTINGS, AurocCube
from swsa_engine.report.html_format import fmt_number
from swsa_engine.report.html_thumbs import TaskThumbs, ThumbnailCache
from swsa_engine.run.report_inputs import StoreImages, group_rows, real_image_ids

__all__ = ["task_payloads"]


def _records(groups: dict, task_id: int) -> list[dict]:
    """The rows of ``task_id``'s group as dicts; none when it has no group."""
    return groups[task_id].to_dict(orient="records") if task_id in groups else []


def _task_entry(task_id: int, dataset, normal_class, state: str) -> dict:
    """A task's line in the task index (and the head of its payload)."""
    return {"id": task_id, "dataset": str(dataset), "cls": str(normal_class), "status": state}


def _skips_by_task(skips: pd.DataFrame, task_of_synthetic: dict) -> dict:
    """The skips grouped by task: a skip of a synthetic image (task_id -1) counts for the task
    the image was made for."""
    skips = skips.copy()
    if len(skips):
        skips["task_of"] = [int(t) if int(t) >= 0 else int(task_of_synthetic.get(int(i), -1))
                            for t, i in zip(skips["task_id"], skips["image_id"])]
    return group_rows(skips, "task_of")


def _skip_rows(skips_by_task: dict, task_id: int) -> list[list]:
    """[stage, image id, candidate, reason] per skip recorded for ``task_id``."""
    return [[str(r["stage"]), int(r["image_id"]), str(r["candidate"]), str(r["reason"])]
            for r in _records(skips_by_task, task_id)]


def _real_images(members: pd.DataFrame | None, thumbs: TaskThumbs, n_real: int) -> tuple[list, list, list]:
    """A task's seed ids, ``n_real`` sampled real normal ids and ``n_real`` sampled
    [real anomaly id, its group], each carried with its thumbnail; all empty without ``members``."""
    seeds, normals, anomalies = real_image_ids(members, n_real)
    use = thumbs.use
    return [use(i) for i in seeds], [use(i) for i in normals], [[use(i), g] for i, g in anomalies]


def _generators(made: pd.DataFrame | None, thumbs: TaskThumbs, max_per_generator: int) -> list[dict]:
    """Per generator (image kind, sorted) of a task's synthetic images ``made``: its first
    ``max_per_generator`` images, their layout and its total count."""
    generators = []
    if made is None:
        return generators
    for source, rows in made.groupby("kind", sort=True):
        rows = rows.sort_values(["source_index", "image_id"])
        items, layout = _generator_items(rows.head(max_per_generator), thumbs)
        generators.append({"source": str(source), "layout": layout, "total": int(len(rows)), "items": items})
    return generators


def _generator_items(rows: pd.DataFrame, thumbs: TaskThumbs) -> tuple[list[dict], str]:
    """One item per synthetic image (its id, parents, and style and content ids for diffusion)
    and the generator's layout: "diffusion" (style × content grid), "pairs" (beside its parents)
    or "plain"."""
    use = thumbs.use
    items, layout = [], "plain"
    for image_id, parents, params in zip(rows["image_id"], rows["parent_ids"], rows["params"]):
        try:
            parents = [int(p) for p in json.loads(parents or "[]")]
            params = json.loads(params or "{}")
        except (ValueError, TypeError):
            parents, params = [], {}
        item = {"id": use(image_id), "parents": [use(p) for p in parents]}
        if "style_id" in params and "content_id" in params:
            item["style"], item["content"] = use(params["style_id"]), use(params["content_id"])
            layout = "diffusion"
        elif parents and layout == "plain":
            layout = "pairs"
        items.append(item)
    return items, layout


def _auroc_payload(cube: AurocCube, t: int, closest: np.ndarray, base: list[str]) -> dict:
    """Task row ``t``'s formatted AUROCs: per candidate, per source (synthetic) and setting (real)."""
    return {
        "candidates": cube.candidate_names,
        "synthetic": {src: [fmt_number(v) for v in cube.synthetic[t, :, i]] for i, src in enumerate(cube.sources)},
        "real": {setting: [fmt_number(v) for v in cube.real[t, :, s]] for s, setting in enumerate(SETTINGS)},
        "closest": [str(c) for c in closest[t]],
        "base": list(base),
    }


def _picks_payload(picks: list[dict]) -> list[dict]:
    """A task's rows of ``tasks.csv`` (one per setting and source), formatted."""
    return [{
        "setting": row["setting"], "source": row["source"], "swsa": row["swsa_pick"],
        "swsa_synth": fmt_number(row["swsa_pick_synthetic_auroc"]), "swsa_real": fmt_number(row["swsa_pick_real_auroc"]),
        "oracle": row["oracle_pick"], "oracle_real": fmt_number(row["oracle_real_auroc"]), "hit": bool(row["hit"]),
        **{key: fmt_number(row.get(column, float("nan"))) for key, column in _CONFIDENCE_KEYS.items()},
    } for row in picks]


#: payload key → column of ``tasks.csv`` / ``pick_confidence.csv`` (the pick's label-free confidence)
_CONFIDENCE_KEYS = {"resample": "pick_resample_probability", "agreement": "pick_source_agreement",
                    "margin": "pick_margin"}


def _confidence_payload(rows: list[dict]) -> list[dict]:
    """A task's rows of ``pick_confidence.csv`` (one per strategy and setting) as one entry per
    strategy: its pick, the three confidence measures and the regret per setting."""
    by_strategy: dict[str, dict] = {}
    for row in rows:
        entry = by_strategy.setdefault(str(row["strategy"]), {
            "strategy": str(row["strategy"]), "pick": "" if pd.isna(row["pick"]) else str(row["pick"]),
            **{key: fmt_number(row[column]) for key, column in _CONFIDENCE_KEYS.items()}, "regret": {}})
        entry["regret"][str(row["setting"])] = fmt_number(row["regret"])
    return list(by_strategy.values())


def _text(value) -> str:
    return "" if pd.isna(value) else str(value)


def _recommendation_payload(rows: list[dict]) -> dict | None:
    """A task's rows of ``recommendation.csv`` (one per setting) as one entry: the choice, what it runs,
    its rule's numbers and reason (the same in every setting), and the real AUROC and regret per setting."""
    if not rows:
        return None
    first = rows[0]
    return {"choice": _text(first["recommendation"]), "runs": _text(first["runs"]), "members": "" if pd.isna(first["members"]) else str(int(first["members"])),
            "member_weights": _text(first["member_weights"]), "single": _text(first["single_pick"]),
            "p_single": fmt_number(first["p_single_beats_mean"]), "p_selected": fmt_number(first["p_selected_beats_mean"]),
            "threshold": fmt_number(first["threshold"]), "n_resamples": _text(first["n_resamples"]),
            "synthetic": [fmt_number(first[c]) for c in ("synthetic_single", "synthetic_mean", "synthetic_selected")],
            "reason": _text(first["reason"]), "real": {str(r["setting"]): fmt_number(r["real_auroc"]) for r in rows},
            "regret": {str(r["setting"]): fmt_number(r["regret"]) for r in rows}}


def task_payloads(cube: AurocCube, store_path: str | os.PathLike | None, picks: pd.DataFrame, skips: pd.DataFrame, *,
                  thumb_size: int, max_per_generator: int, n_real: int,
                  tsne_tasks: set[int], confidence: pd.DataFrame | None = None,
                  recommendation: pd.DataFrame | None = None) -> Iterator[tuple[int, dict, dict]]:
    """Yield (task_id, index entry, JSON payload) per task, in the cube's task order, then the
    store's tasks that the cube has no AUROCs for. ``picks``: the rows of ``tasks.csv``;
    ``skips``: every recorded skip (``skips.csv``); ``tsne_tasks``: the ids of the tasks Figure 4 shows;
    ``confidence``: the rows of ``pick_confidence.csv`` (None: no per-image scores); ``recommendation``:
    the rows of ``recommendation.csv`` (:mod:`swsa_engine.report.recommendation_table`)."""
    images = StoreImages.read(store_path)
    cache = ThumbnailCache(images, thumb_size)
    picks_by_task = group_rows(picks, "task_id")
    confidence_by_task = group_rows(confidence, "task_id")
    recommendation_by_task = group_rows(recommendation, "task_id")
    skips_by_task = _skips_by_task(skips, images.task_of_synthetic)
    closest = cube.closest_class()
    base = cube.config.get("base_sources", [s for s in cube.sources if "@" not in s])
    for t in range(len(cube.tasks)):
        task_id = int(cube.tasks["task_id"].iloc[t])
        entry = _task_entry(task_id, cube.tasks["dataset"].iloc[t], cube.tasks["normal_class"].iloc[t], "ok")
        thumbs = TaskThumbs(cache)
        seeds, normals, anomalies = _real_images(images.members_by_task.get(task_id), thumbs, n_real)
        generators = _generators(images.synthetic_by_task.get(task_id), thumbs, max_per_generator)
        payload = {
            **entry, "seeds": seeds, "generators": generators, "normals": normals, "anomalies": anomalies,
            "auroc": _auroc_payload(cube, t, closest, base), "picks": _picks_payload(_records(picks_by_task, task_id)),
            "confidence": _confidence_payload(_records(confidence_by_task, task_id)),
            "recommendation": _recommendation_payload(_records(recommendation_by_task, task_id)),
            "skips": _skip_rows(skips_by_task, task_id), "tsne": task_id in tsne_tasks, "thumbs": thumbs.by_id,
        }
        yield task_id, entry, payload
    if images.store_tasks is not None:
        yield from _unscored_payloads(cube, images.store_tasks, skips_by_task)


def _unscored_payloads(cube: AurocCube, store_tasks: pd.DataFrame, skips_by_task: dict):
    """Yield (task_id, index entry, JSON payload) per store task that ``cube`` has no AUROCs for:
    skipped, or not scored yet."""
    scored = set(int(i) for i in cube.tasks["task_id"])
    for row in store_tasks.to_dict(orient="records"):
        if int(row["task_id"]) in scored:
            continue
        task_id = int(row["task_id"])
        state = "skipped" if row.get("status", "ok") != "ok" else "not scored"
        entry = _task_entry(task_id, row["dataset"], row["normal_class"], state)
        payload = {**entry, "reason": str(row.get("skip_reason", "")),
                   "seeds": [], "generators": [], "normals": [], "anomalies": [], "auroc": None, "picks": [], "confidence": [],
                   "skips": _skip_rows(skips_by_task, task_id), "tsne": False, "thumbs": {}}
        yield task_id, entry, payload
