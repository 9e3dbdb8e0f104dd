"""The AUROC cube: every task × candidate × validation source AUROC of a sweep, as arrays.

:class:`AurocCube` holds the results of one sweep (:func:`swsa_engine.run.sweep.run_sweep`, or the
prompt and BLISS sweeps of :mod:`swsa_engine.run.prompt_sweep`); its arrays are plain NumPy and
pandas, with no I/O here. :meth:`AurocCube.to_arrays` / :meth:`AurocCube.from_arrays` are the
flat form that :mod:`swsa_engine.run.cube_io` writes to and reads from a store.

:func:`grouped_auroc` computes the ``per_class`` AUROCs (normals against each out-class alone),
whose minimum is the one-vs-closest setting.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from swsa_engine.core.protocol import cube_protocol

#: the two real-validation settings, in the order of the cube's ``real[..., setting]`` axis
SETTINGS = ("one-vs-rest", "one-vs-closest")
#: the name of the kNN / detector sweep's cube among a store's results
CUBE_RESULT = "cube"
#: the columns of :attr:`AurocCube.skips`
SKIP_COLUMNS = ["task_id", "candidate", "reason"]

# ---- the CLIP cubes (swsa_engine.run.prompt_sweep) and their candidates' names
#: the prompt sweep's and the BLISS sweep's cubes among a store's results
PROMPT_CUBE = "prompt_cube"
BLISS_CUBE = "bliss_cube"
#: the prompt cube's prompt-ensemble candidate, reported beside the single prompts (not selected among them)
ENSEMBLE = "ensemble"
#: the BLISS grid (λ × K) and its default setting (λ, K)
BLISS_LAMBDAS = (0.1, 0.25, 0.5, 0.75, 1.0, 2.0)
BLISS_KS = (1, 5, 10, 20)
BLISS_DEFAULT = (0.5, 10)


def prompt_name(j: int) -> str:
    """The candidate name of the prompt set's ``j``-th template pair (0-based): ``prompt01``, ..."""
    return f"prompt{j + 1:02d}"


def bliss_name(lam: float, k: int) -> str:
    """The candidate name of the BLISS setting (λ = ``lam``, K = ``k``), e.g. ``bliss_l0.5_k10``."""
    return f"bliss_l{lam:g}_k{int(k)}"


def hard_source_name(source: str, n: int) -> str:
    """Name of the validation source that keeps the ``n`` hardest anomalies of ``source``."""
    return f"{source}@hard{n}"


def grouped_auroc(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """AUROC of the normals against each group of anomalies separately, all rows at once.

    Parameters
    ----------
    scores : (T, Q) float, higher = more anomalous; NaN where ``labels == -1``.
    labels : (T, Q) int8: -1 excluded, 0 normal, 1 anomaly.
    groups : (T, Q) int in ``[0, n_groups)`` for anomalies, ignored elsewhere.

    Returns
    -------
    (T, n_groups) float64: AUROC of normals vs the anomalies of group g (ties count one half,
    as in ``sklearn.metrics.roc_auc_score``); NaN where the row has no normal or no anomaly of g.

    Each anomaly's count of normals below it (+ half the ties) comes from two batched
    ``searchsorted`` calls over the row's sorted normal scores; per-group sums of those counts
    divided by ``n_normal * n_group`` are the Mann–Whitney AUROCs.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    n_tasks, _ = scores.shape
    normal = labels == 0
    anomaly = labels == 1
    normal_sorted = np.where(normal, scores, np.inf)
    normal_sorted.sort(axis=1)
    n_normal = normal.sum(axis=1)
    sorted_t = torch.from_numpy(normal_sorted)
    query_t = torch.from_numpy(np.where(anomaly, scores, 0.0))
    below = torch.searchsorted(sorted_t, query_t, right=False).numpy()
    below_or_equal = torch.searchsorted(sorted_t, query_t, right=True).numpy()
    below_or_equal = np.minimum(below_or_equal, n_normal[:, None])  # padding (+inf) never counts
    wins = below + 0.5 * (below_or_equal - below)
    flat_group = np.where(anomaly, np.arange(n_tasks)[:, None] * n_groups + groups, -1)
    chosen = flat_group >= 0
    win_sums = np.bincount(flat_group[chosen], weights=wins[chosen], minlength=n_tasks * n_groups)
    counts = np.bincount(flat_group[chosen], minlength=n_tasks * n_groups)
    win_sums = win_sums.reshape(n_tasks, n_groups)
    counts = counts.reshape(n_tasks, n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        result = win_sums / (counts * n_normal[:, None])
    result[(counts == 0) | (n_normal[:, None] == 0)] = np.nan
    return result


@dataclass
class AurocCube:
    """All AUROCs of a sweep. ``T`` tasks, ``C`` candidates, ``V`` synthetic sources, ``G`` classes.

    Attributes
    ----------
    tasks : DataFrame (task_id, dataset, normal_class), T rows
    candidates : DataFrame (name, n_params, feature_dim, weights_kind, family), C rows
    sources : V synthetic validation source names (e.g. "cutpaste", "cutpaste@hard10")
    real : (T, C, 2) real-validation AUROC for :data:`SETTINGS`
    synthetic : (T, C, V) synthetic-validation AUROC
    per_class : (T, C, G) real AUROC against each out-class alone (NaN padded)
    class_names : (T, G) the out-class of each ``per_class`` column ("" padded)
    skips : DataFrame (task_id, candidate, reason) of (task, candidate) cells left NaN, or scored
        with some images left out (the reason says how many and why)
    config : settings of the sweep (k, hardest counts, ``protocol`` — the validation protocol of
        :mod:`swsa_engine.core.protocol`; absent in older cubes, which read as ``"paper"`` —, ...)
    self_validated : (T, C, V) bool: synthetic cells left NaN because validating the candidate on
        them would be self-validation (its abnormal references come from the same generator or the
        same parents); all False when not given (older cubes)
    scores : the per-image scores behind the AUROCs (:class:`swsa_engine.core.score_cube.ScoreCube`,
        same tasks and candidates) or None: kept by :func:`swsa_engine.run.sweep.run_sweep`, saved
        beside the cube (``swsa_engine.run.cube_io.save_scores``) and attached by ``load_cube``;
        strategies that need scores (model centrality) read it. Not part of :meth:`to_arrays`.
        Candidates of family ``"ensemble"`` are combinations of the others
        (:mod:`swsa_engine.core.ensemble_pass`; members and weights in ``config["ensembles"]``).
    """

    tasks: pd.DataFrame
    candidates: pd.DataFrame
    sources: list[str]
    real: np.ndarray
    synthetic: np.ndarray
    per_class: np.ndarray
    class_names: np.ndarray
    skips: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=SKIP_COLUMNS))
    config: dict = field(default_factory=dict)
    self_validated: np.ndarray | None = None
    scores: object | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        shape = np.shape(self.synthetic)
        if self.self_validated is None:
            self.self_validated = np.zeros(shape, dtype=bool)
        elif np.shape(self.self_validated) != shape:
            raise ValueError(f"self_validated must have the shape of synthetic {shape}, got {np.shape(self.self_validated)}")
        self.self_validated = np.asarray(self.self_validated, dtype=bool)

    @property
    def protocol(self) -> str:
        """The validation protocol the cube was scored with (``"paper"`` for cubes that do not say)."""
        return cube_protocol(self.config)

    @property
    def candidate_names(self) -> list[str]:
        """The C candidate names, in the order of the cube's candidate axis."""
        return list(self.candidates["name"])

    def closest_class(self) -> np.ndarray:
        """(T, C) the out-class giving each one-vs-closest AUROC ("" where undefined)."""
        filled = np.where(np.isnan(self.per_class), np.inf, self.per_class)
        index = filled.argmin(axis=2)
        names = np.take_along_axis(np.broadcast_to(self.class_names[:, None, :], self.per_class.shape), index[..., None], 2)[..., 0]
        return np.where(np.isnan(self.per_class).all(axis=2), "", names)

    def with_candidates(self, candidates: pd.DataFrame, real: np.ndarray, synthetic: np.ndarray, per_class: np.ndarray,
                        *, scores=None, skips: pd.DataFrame | None = None) -> "AurocCube":
        """A new cube with K candidates appended: ``candidates`` (K rows), ``real`` (T, K, 2),
        ``synthetic`` (T, K, V), ``per_class`` (T, K, G) (not self-validated); ``skips`` added to the
        cube's; ``scores`` the score cube of all C + K candidates (None: this cube's ``scores``)."""
        names = list(candidates["name"])
        if set(names) & set(self.candidate_names):
            raise ValueError(f"candidates {sorted(set(names) & set(self.candidate_names))} are already in the cube")
        extra = np.zeros((self.synthetic.shape[0], len(names), self.synthetic.shape[2]), dtype=bool)
        more = [self.skips] + ([skips] if skips is not None and len(skips) else [])
        return AurocCube(
            tasks=self.tasks, candidates=pd.concat([self.candidates, candidates], ignore_index=True), sources=self.sources,
            real=np.concatenate([self.real, real], axis=1), synthetic=np.concatenate([self.synthetic, synthetic], axis=1),
            per_class=np.concatenate([self.per_class, per_class], axis=1), class_names=self.class_names,
            skips=pd.concat(more, ignore_index=True) if len(more) > 1 else self.skips, config=dict(self.config),
            self_validated=np.concatenate([self.self_validated, extra], axis=1),
            scores=self.scores if scores is None else scores)

    # ---- the flat form a store holds (swsa_engine.run.cube_io)
    def to_arrays(self) -> tuple[dict, dict]:
        """``(arrays, attrs)``: the cube's arrays (strings as object arrays) and its JSON-able attributes.

        ``arrays``: ``real`` (T, C, 2), ``synthetic`` (T, C, V), ``self_validated`` (T, C, V) uint8, ``per_class`` (T, C, G),
        ``class_names`` (T, G), ``task_id``, ``dataset``, ``normal_class`` (T,).
        ``attrs``: ``sources``, ``settings``, ``candidates`` and ``skips`` (column → list),
        ``config`` and a ``description``.
        """
        arrays = {
            "real": self.real, "synthetic": self.synthetic, "per_class": self.per_class,
            "self_validated": self.self_validated.astype(np.uint8),
            "class_names": self.class_names.astype(object),
            "task_id": self.tasks["task_id"].to_numpy(), "dataset": self.tasks["dataset"].to_numpy().astype(object),
            "normal_class": self.tasks["normal_class"].to_numpy().astype(object),
        }
        attrs = {
            "sources": list(self.sources), "settings": list(SETTINGS),
            "candidates": self.candidates.to_dict(orient="list"),
            "skips": self.skips.to_dict(orient="list"), "config": self.config,
            "description": "AUROC cube: real (task, candidate, setting), synthetic (task, candidate, source)",
        }
        return arrays, attrs

    @classmethod
    def from_arrays(cls, arrays: dict, attrs: dict) -> "AurocCube":
        """The cube from the flat form of :meth:`to_arrays` (string arrays already decoded to ``str``;
        ``attrs`` already decoded from JSON; ``self_validated`` may be absent: all False)."""
        tasks = pd.DataFrame({
            "task_id": arrays["task_id"],
            "dataset": np.asarray(arrays["dataset"]).astype(object),
            "normal_class": np.asarray(arrays["normal_class"]).astype(object),
        })
        return cls(
            tasks=tasks, candidates=pd.DataFrame(attrs["candidates"]), sources=list(attrs["sources"]),
            real=arrays["real"], synthetic=arrays["synthetic"], per_class=arrays["per_class"],
            class_names=np.asarray(arrays["class_names"]).astype(object),
            skips=pd.DataFrame(attrs["skips"]) if attrs["skips"] else pd.DataFrame(columns=SKIP_COLUMNS),
            config=attrs["config"],
            self_validated=None if arrays.get("self_validated") is None else np.asarray(arrays["self_validated"], dtype=bool),
        )
