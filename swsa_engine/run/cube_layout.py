"""Where each task group's AUROCs go in a cube being built: :class:`CubeLayout`.

Every sweep (the kNN / detector sweep of :mod:`swsa_engine.run.sweep`, the prompt and BLISS
sweeps of :mod:`swsa_engine.run.prompt_sweep`) scores one task group at a time; the layout holds
the cube's empty arrays over all groups (tasks in group order) and writes one group's results
into its rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from swsa_engine.core.cube import hard_source_name
from swsa_engine.run.task_groups import TaskGroup


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
