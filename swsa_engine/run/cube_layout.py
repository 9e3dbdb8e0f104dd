"""Where each task group's AUROCs go in a cube being built: :class:`CubeLayout`.

Every sweep (the kNN / detector sweep of :mod:`swsa_engine.run.sweep`, the prompt and BLISS
sweeps of :mod:`swsa_engine.run.prompt_sweep`) scores one task group at a time; the layout holds
the cube's empty arrays over all groups (tasks in group order) and writes one group's results
into its rows. :class:`ScoreLayout` does the same for the per-image scores behind the AUROCs
(:class:`~swsa_engine.core.score_cube.ScoreCube`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from swsa_engine.core.cube import hard_source_name
from swsa_engine.core.score_cube import ScoreCube
from swsa_engine.run.group_scoring import own_real_queries, synthetic_queries
from swsa_engine.run.task_groups import TaskGroup, pad_rows, rest_mask


@dataclass
class CubeLayout:
    """The empty arrays of an :class:`~swsa_engine.core.cube.AurocCube` over ``groups`` (tasks in
    group order) and where each group's tasks sit in them (``offsets`` (len(groups) + 1,)).

    ``real`` (T, C, 2), ``synthetic`` (T, C, V) and ``per_class`` (T, C, G) start NaN;
    ``self_validated`` (T, C, V) starts False (a cell left out as self-validation: True);
    ``class_names`` (T, G) is filled ("" padded); ``sources`` are ``base_sources`` then their
    hardest-N variants; ``tasks`` the (task_id, dataset, normal_class) rows in group order.
    """

    base_sources: list[str]
    sources: list[str]
    tasks: pd.DataFrame
    offsets: np.ndarray
    real: np.ndarray
    synthetic: np.ndarray
    per_class: np.ndarray
    class_names: np.ndarray
    self_validated: np.ndarray | None = None

    def __post_init__(self):
        if self.self_validated is None:
            self.self_validated = np.zeros(self.synthetic.shape, dtype=bool)

    @classmethod
    def of(cls, groups: list[TaskGroup], tasks: pd.DataFrame, n_candidates: int, hardest: tuple[int, ...]) -> "CubeLayout":
        """The empty layout for ``n_candidates`` candidates over ``groups`` (tasks: the store's task table)."""
        base_sources = sorted({s for g in groups for s in g.synthetic})
        sources = base_sources + [hard_source_name(s, n) for s in base_sources for n in hardest]
        ordered = pd.concat([tasks.set_index("task_id").loc[g.task_ids, ["dataset", "normal_class"]] for g in groups]).reset_index()
        n_tasks = len(ordered)
        max_groups = max(len(g.group_names) for g in groups)
        offsets = np.cumsum([0] + [len(g.task_ids) for g in groups])
        class_names = np.full((n_tasks, max_groups), "", dtype=object)
        for g, group in enumerate(groups):
            class_names[offsets[g] : offsets[g + 1], : len(group.group_names)] = group.group_names
        return cls(base_sources, sources, ordered[["task_id", "dataset", "normal_class"]], offsets,
                   np.full((n_tasks, n_candidates, 2), np.nan), np.full((n_tasks, n_candidates, len(sources)), np.nan),
                   np.full((n_tasks, n_candidates, max_groups), np.nan), class_names)

    def put(self, g: int, group: TaskGroup, column: int, result: dict) -> None:
        """Write one candidate's AUROCs for ``group`` (the ``g``-th), a ``score_group*`` result, into ``column``."""
        span = slice(self.offsets[g], self.offsets[g + 1])
        self.real[span, column] = result["real"]
        self.synthetic[span, column] = result["synthetic"]
        self.per_class[span, column, : len(group.group_names)] = result["per_class"]
        if "self_validated" in result:  # detectors with abnormal references
            self.self_validated[span, column] = result["self_validated"]


@dataclass
class ScoreLayout:
    """A :class:`~swsa_engine.core.score_cube.ScoreCube` being filled over ``groups`` (tasks in
    group order, as :class:`CubeLayout`): each task's real test images compacted to the left of
    its row (``order[g]`` (T_g, Q_g): their positions in ``group.real_ids``), its synthetic
    validation queries as :func:`~swsa_engine.run.group_scoring.synthetic_queries` lays them out
    (held-out normals, then each base source's anomalies). Scores start NaN."""

    scores: ScoreCube
    offsets: np.ndarray
    order: list  # per group: (T_g, Q_g) positions of each task's real images in group.real_ids

    @classmethod
    def of(cls, groups: list[TaskGroup], layout: CubeLayout, candidates: list[str]) -> "ScoreLayout":
        """The empty score layout of ``candidates`` over ``groups`` (``layout``: the AUROC cube's)."""
        sources = layout.base_sources
        order, parts = [], {k: [] for k in ("real_ids", "real_label", "real_in_rest", "real_group", "synthetic_ids",
                                            "synthetic_part")}
        for group in groups:
            rows = np.arange(len(group.task_ids))
            member = group.real_label >= 0
            positions, present, ids = own_real_queries(group, member, int(member.sum(axis=1).max(initial=0)))
            order.append(positions)
            parts["real_ids"].append(ids)
            for key, values in (("real_label", group.real_label), ("real_in_rest", rest_mask(group, rows)),
                                ("real_group", group.real_group)):
                parts[key].append(np.where(present, np.take_along_axis(values, positions, axis=1), -1))
            queries, widths = synthetic_queries(group, rows, sources)
            part = np.repeat(np.arange(len(widths)), widths)[None, :]
            parts["synthetic_ids"].append(queries)
            parts["synthetic_part"].append(np.where(queries >= 0, part, -1))
        padded = {key: _pad(values) for key, values in parts.items()}
        n_tasks, n_candidates = int(layout.offsets[-1]), len(candidates)
        scores = ScoreCube(
            layout.tasks["task_id"].to_numpy(), candidates, sources, padded["real_ids"],
            padded["real_label"].astype(np.int8), padded["real_in_rest"] > 0, padded["real_group"], layout.class_names,
            np.full((n_tasks, n_candidates, padded["real_ids"].shape[1]), np.nan), padded["synthetic_ids"],
            padded["synthetic_part"].astype(np.int8),
            np.full((n_tasks, n_candidates, padded["synthetic_ids"].shape[1]), np.nan))
        return cls(scores, layout.offsets, order)

    def put(self, g: int, column: int, result: dict) -> None:
        """Write one candidate's scores for the ``g``-th group from a ``score_group*`` result's
        ``scores``: ``rows`` (T',) scored tasks, ``real`` (T', Q) scores of ``group.real_ids``,
        ``queries`` (T', W) the candidate's synthetic queries (-1 where it left one out) and
        ``synthetic`` (T', W) their scores. Tasks not in ``rows`` stay NaN."""
        scored = result.get("scores")
        if scored is None or len(scored["rows"]) == 0:
            return
        rows = np.asarray(scored["rows"])
        at = self.offsets[g] + rows
        order = self.order[g][rows]
        real = np.take_along_axis(scored["real"], order, axis=1) if order.shape[1] else np.zeros(order.shape)
        self.scores.real_scores[at, column, : order.shape[1]] = np.where(self.scores.real_label[at, : order.shape[1]] >= 0,
                                                                        real, np.nan)
        width = scored["queries"].shape[1]
        self.scores.synthetic_scores[at, column, :width] = np.where(scored["queries"] >= 0, scored["synthetic"], np.nan)


def _pad(blocks: list[np.ndarray]) -> np.ndarray:
    """Stack (T_g, W_g) integer blocks into (sum T_g, max W_g), -1 padded."""
    rows = [row for block in blocks for row in np.asarray(block, dtype=np.int64)]
    return pad_rows(rows) if rows else np.zeros((0, 0), dtype=np.int64)
