"""The selection strategies' registry, what a strategy sees (:class:`SelectionContext`) and how a
pick is scored (:func:`evaluate_weights`).

A strategy is a factory ``factory(**settings) -> (ctx -> picks)``: given a :class:`SelectionContext`
it returns, per task, the index of the candidate it picks ``(T,)`` or weights over the candidates
``(T, C)``. Only strategies registered with ``uses_labels=True`` (the oracle) may read ``ctx.real``;
every other one is *label-free*: its picks cannot depend on the setting (one-vs-rest or
one-vs-closest), so :func:`setting_weights` computes them once for all the settings of the same
tasks, on a context whose ``real`` is NaN. The built-in strategies are registered by
:mod:`swsa_engine.core.strategies_builtin` and :mod:`swsa_engine.core.strategies_baselines`;
import them through :mod:`swsa_engine.core.selection`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from swsa_store.registry import Registry

from swsa_engine.core.cube import SETTINGS, AurocCube
from swsa_engine.core.em_mv import em_mv_criteria
from swsa_engine.core.ensemble_pass import single_candidates
from swsa_engine.core.score_cube import ScoreCube

__all__ = [
    "STRATEGIES", "DEFAULT_LABELS", "FIRST_STRATEGIES", "SelectionContext", "register_strategy", "create_strategy",
    "list_strategies", "uses_labels", "reads_synthetic", "argmax_weights", "single_candidates", "restrict", "as_weights",
    "evaluate_weights", "base_sources", "selection_context", "setting_reals", "strategy_weights", "setting_weights",
]

STRATEGIES: Registry = Registry("selection strategy")
#: strategy name → its row label in ``default_strategies`` (``register_strategy(default_label=...)``)
DEFAULT_LABELS: dict[str, str] = {}
#: the strategies registered with ``first=True``: the first rows of ``default_strategies``, in order
FIRST_STRATEGIES: list[str] = []


@dataclass(frozen=True)
class SelectionContext:
    """What a strategy may look at, for T tasks and C candidates.

    synthetic : (T, C, V) synthetic AUROC per source (``sources`` names the V columns)
    base_sources : the sources that are not "hardest N" variants
    candidates : DataFrame with ``name, n_params, feature_dim, weights_kind, family``
    real : (T, C) real AUROC of the setting being evaluated — for label-using strategies only
        (the label-free ones get NaN here from :func:`setting_weights`)
    scores : the per-image scores of the T tasks (:class:`~swsa_engine.core.score_cube.ScoreCube`),
        or None when the cube kept none (strategies that need them give NaN picks)
    criteria : name → (T, C) label-free criteria of a pass (``em``, ``mv``: :mod:`swsa_engine.run.em_mv_pass`)

    Candidates of family ``"ensemble"`` (:mod:`swsa_engine.core.ensemble_pass`) are combinations
    of the single candidates: the built-in strategies choose among the single candidates
    (:attr:`single`), and each ensemble is its own row (``default_strategies``).
    """

    synthetic: np.ndarray
    sources: tuple[str, ...]
    base_sources: tuple[str, ...]
    candidates: pd.DataFrame
    real: np.ndarray
    scores: ScoreCube | None = None
    criteria: dict = field(default_factory=dict)

    @property
    def single(self) -> np.ndarray:
        """(C,) bool: the candidates that are not ensembles."""
        return single_candidates(self.candidates)

    @property
    def shape(self) -> tuple[int, int]:
        """(T, C): the shape of ``real`` and of a strategy's weights on this context (label-free
        strategies may read it: :meth:`without_labels` keeps it)."""
        return tuple(self.real.shape)

    def source(self, name: str) -> np.ndarray:
        """(T, C) synthetic AUROC of one source."""
        if name not in self.sources:
            raise ValueError(f"unknown validation source {name!r}; available: {', '.join(self.sources)}")
        return self.synthetic[:, :, self.sources.index(name)]

    @property
    def synthetic_base(self) -> np.ndarray:
        """(T, C, V0) synthetic AUROC of the base sources only."""
        return np.stack([self.source(s) for s in self.base_sources], axis=2)

    def without_labels(self) -> SelectionContext:
        """This context with ``real`` all NaN (same shape): what a label-free strategy is given."""
        return dataclasses.replace(self, real=np.full(self.real.shape, np.nan))


def register_strategy(name: str, *, uses_labels: bool = False, default_label: str | None = None,
                      first: bool = False, reads_synthetic: bool = True):
    """Decorator registering a strategy factory ``factory(**settings) -> (ctx -> picks)``;
    ``uses_labels``: it reads ``ctx.real`` (the oracle); otherwise it is given NaN there and its picks
    are computed once for every setting. ``default_label``: the row label under which
    ``default_strategies`` includes it (built with no settings); None: only when asked for by name.
    ``first``: that row comes first (the recommendation). ``reads_synthetic=False``: its picks do not
    depend on the synthetic sets (it reads only the unlabelled real test images), so a view with a
    synthetic source left out (``swsa_engine.core.source_transfer``) may reuse them."""

    def decorate(factory):
        factory.uses_labels = uses_labels
        factory.reads_synthetic = reads_synthetic
        registered = STRATEGIES.register(name)(factory)
        if default_label:
            DEFAULT_LABELS[name] = default_label
            if first and name not in FIRST_STRATEGIES:
                FIRST_STRATEGIES.append(name)
        return registered

    return decorate


def create_strategy(name: str, /, **settings) -> Callable[[SelectionContext], np.ndarray]:
    """Build the registered strategy ``name`` with ``settings``."""
    return STRATEGIES.create(name, **settings)


def list_strategies() -> list[str]:
    """The registered strategies' names, sorted."""
    return STRATEGIES.names()


def uses_labels(name: str) -> bool:
    """Whether the registered strategy ``name`` reads ``ctx.real`` (was registered ``uses_labels=True``)."""
    return bool(STRATEGIES.get(name).uses_labels)


def reads_synthetic(name: str) -> bool:
    """Whether the registered strategy ``name`` may read the synthetic sets (all but those registered
    ``reads_synthetic=False``)."""
    return bool(getattr(STRATEGIES.get(name), "reads_synthetic", True))


def argmax_weights(values: np.ndarray) -> np.ndarray:
    """(T, C) → (T, C) uniform weights over each row's maxima (ties share); NaN rows → NaN."""
    values = np.asarray(values, dtype=np.float64)
    all_nan = np.isnan(values).all(axis=1)
    filled = np.where(np.isnan(values), -np.inf, values)
    best = filled.max(axis=1, keepdims=True)
    weights = (filled == best).astype(np.float64)
    weights /= weights.sum(axis=1, keepdims=True)
    weights[all_nan] = np.nan
    return weights


def restrict(ctx: SelectionContext, values: np.ndarray, detectors: list[str] | None) -> np.ndarray:
    """``values`` (T, C) or (C,) with candidates whose detector is not in ``detectors`` set to NaN
    (``None``: every single candidate), so a strategy can choose within a sub-grid, e.g. the paper's
    backbone-only grid ``detectors=["knn(k=3,l2)"]``. Ensembles are always NaN here: the
    strategies choose among single candidates."""
    values = np.where(ctx.single, np.asarray(values, dtype=np.float64), np.nan)
    if detectors is None:
        return values
    if "detector" not in ctx.candidates:
        raise ValueError("restricting to detectors needs a 'detector' column in the candidates; re-run `swsa score`")
    allowed = ctx.candidates["detector"].isin(list(detectors)).to_numpy()
    return np.where(allowed, np.asarray(values, dtype=np.float64), np.nan)


def as_weights(picks: np.ndarray, n_candidates: int) -> np.ndarray:
    """A strategy's output, ``(T,)`` indices or ``(T, C)`` weights, as ``(T, C)`` weights."""
    picks = np.asarray(picks)
    if picks.ndim == 1:
        weights = np.zeros((len(picks), n_candidates))
        weights[np.arange(len(picks)), picks.astype(np.int64)] = 1.0
        return weights
    if picks.ndim != 2 or picks.shape[1] != n_candidates:
        raise ValueError(f"a strategy must return (T,) indices or (T, {n_candidates}) weights, got shape {picks.shape}")
    return picks.astype(np.float64)


def evaluate_weights(weights: np.ndarray, real: np.ndarray, pool: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-task outcome of a selection. ``weights``, ``real``: (T, C).

    Returns ``hit`` (T,) probability that the pick is a best candidate (ties with the best count
    as hits; a pick outside ``pool`` at least as good as the best counts too), ``auroc`` (T,)
    expected real AUROC of the pick, ``best`` (T,) the best real AUROC among the ``pool``
    candidates ((C,) bool, default all; :attr:`SelectionContext.single` keeps ensembles out, so
    regret is measured against the best single candidate and an ensemble's can be negative).
    Tasks with a NaN in their real row (among ``pool`` or where the pick has weight) or in the
    weights are NaN.
    """
    pool = np.ones(real.shape[1], dtype=bool) if pool is None else np.asarray(pool, dtype=bool)
    undefined = (np.isnan(real[:, pool]).any(axis=1) | np.isnan(weights).any(axis=1)
                 | ((np.nan_to_num(weights) > 0) & np.isnan(real)).any(axis=1))
    safe_real = np.where(np.isnan(real), 0.0, real)
    best = np.where(pool, safe_real, -np.inf).max(axis=1, initial=-np.inf)
    hit = (weights * (safe_real >= best[:, None])).sum(axis=1)
    chosen = (weights * safe_real).sum(axis=1)
    for values in (hit, chosen, best):
        values[undefined] = np.nan
    return {"hit": hit, "auroc": chosen, "best": best}


def base_sources(cube: AurocCube) -> list[str]:
    """The cube's base synthetic sources (``config["base_sources"]``, else its sources without "hardest N" variants)."""
    return list(cube.config.get("base_sources", [s for s in cube.sources if "@" not in s]))


def selection_context(cube: AurocCube, rows: np.ndarray, setting_index: int) -> SelectionContext:
    """What the strategies see of the tasks ``rows`` of ``cube`` in setting ``SETTINGS[setting_index]``."""
    scores = cube.scores
    return SelectionContext(
        synthetic=cube.synthetic[rows], sources=tuple(cube.sources), base_sources=tuple(base_sources(cube)),
        candidates=cube.candidates, real=cube.real[rows, :, setting_index],
        scores=None if scores is None else scores.take(rows),
        criteria=em_mv_criteria(cube.config, cube.tasks["task_id"], cube.candidate_names, rows),
    )


def setting_reals(cube: AurocCube, rows: np.ndarray) -> list[np.ndarray]:
    """Per setting of :data:`~swsa_engine.core.cube.SETTINGS`, the (T, C) real AUROCs of the tasks ``rows``."""
    return [cube.real[rows, :, s] for s in range(len(SETTINGS))]


def strategy_weights(ctx: SelectionContext, strategies: list[tuple[str, str, dict]]) -> list[np.ndarray]:
    """Each strategy's picks on ``ctx`` as (T, C) weights, in the order of ``strategies``
    ((label, strategy name, settings) rows, as ``default_strategies`` gives); every strategy sees
    ``ctx`` as it is."""
    n_candidates = len(ctx.candidates)
    return [as_weights(create_strategy(name, **settings)(ctx), n_candidates) for _, name, settings in strategies]


def setting_weights(ctx: SelectionContext, reals: Sequence[np.ndarray],
                    strategies: list[tuple[str, str, dict]]) -> list[list[np.ndarray]]:
    """Each strategy's (T, C) weights in each setting of the same tasks: ``[setting][strategy]``.

    ``ctx``: the tasks' context (its ``real`` is not read); ``reals``: per setting, the (T, C) real
    AUROCs. A label-free strategy (not ``uses_labels``) runs once, on ``ctx`` with NaN ``real``, and
    every setting shares its weights (the same array: read, don't modify): it sees the same inputs
    in every setting, so its picks are those it would make per setting, computed once. A strategy
    registered ``uses_labels`` runs once per setting on ``ctx`` with that setting's ``real``.
    """
    reals = [np.asarray(real) for real in reals]
    for real in reals:
        if real.shape != ctx.shape:
            raise ValueError(f"each setting's real AUROCs must be (tasks, candidates) = {ctx.shape}, got {real.shape}")
    unlabelled = ctx.without_labels()
    shared = {}
    for k, (_, name, settings) in enumerate(strategies):
        if not uses_labels(name):
            shared[k] = strategy_weights(unlabelled, [strategies[k]])[0]
    out = []
    for real in reals:
        labelled = dataclasses.replace(ctx, real=real)
        out.append([shared[k] if k in shared else strategy_weights(labelled, [row])[0]
                    for k, row in enumerate(strategies)])
    return out
