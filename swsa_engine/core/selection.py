"""Selection strategies and their evaluation over an AUROC cube.

A strategy is one small function: it gets a :class:`SelectionContext` (the synthetic AUROCs of
every task and candidate, the candidates' metadata) and returns, per task, either the index of
the candidate it picks ``(T,)`` or a probability distribution over candidates ``(T, C)`` (a
random strategy is its expectation, so results are exact and need no seed). Register one with
``@register_strategy("name")``; the factory takes the strategy's settings as keywords::

    @register_strategy("median_synthetic")
    def median_synthetic(**_):
        return lambda ctx: np.nanmedian(ctx.synthetic_base, axis=2).argmax(axis=1)

Only strategies marked ``uses_labels`` (the oracle) may read ``ctx.real``. A strategy registered
with ``default_label="..."`` (and no required settings) is one of :func:`default_strategies`'
rows, so Table 1 and the strategies comparison show it with no further change.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd

from swsa_store.registry import Registry

from swsa_engine.core.cube import SETTINGS, AurocCube
from swsa_engine.core.detectors import DEFAULT_DETECTOR
from swsa_engine.core.ensemble_pass import ENSEMBLE_FAMILY
from swsa_engine.core.label_free import model_centrality as centrality_of
from swsa_engine.core.em_mv import em_mv_criteria
from swsa_engine.core.label_free import robust_rank_aggregation, trimmed_borda
from swsa_engine.core.ranking import VERDICTS, ranking_table  # noqa: F401 (Table 2, re-exported)
from swsa_engine.core.recommendation import RECOMMENDED, RECOMMENDED_LABEL, THRESHOLD, Recommendation, recommend
from swsa_engine.core.score_cube import ScoreCube

STRATEGIES: Registry = Registry("selection strategy")
#: strategy name → its row label in :func:`default_strategies` (``register_strategy(default_label=...)``)
DEFAULT_LABELS: dict[str, str] = {}
#: the strategies registered with ``first=True``: the first rows of :func:`default_strategies`, in order
FIRST_STRATEGIES: list[str] = []


@dataclass(frozen=True)
class SelectionContext:
    """What a strategy may look at, for T tasks and C candidates.

    synthetic : (T, C, V) synthetic AUROC per source (``sources`` names the V columns)
    base_sources : the sources that are not "hardest N" variants
    candidates : DataFrame with ``name, n_params, feature_dim, weights_kind, family``
    real : (T, C) real AUROC of the setting being evaluated — for label-using strategies only
    scores : the per-image scores of the T tasks (:class:`~swsa_engine.core.score_cube.ScoreCube`),
        or None when the cube kept none (strategies that need them give NaN picks)
    criteria : name → (T, C) label-free criteria of a pass (``em``, ``mv``: :mod:`swsa_engine.run.em_mv_pass`)

    Candidates of family ``"ensemble"`` (:mod:`swsa_engine.core.ensemble_pass`) are combinations
    of the single candidates: the built-in strategies choose among the single candidates
    (:attr:`single`), and each ensemble is its own row (:func:`default_strategies`).
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

    def source(self, name: str) -> np.ndarray:
        """(T, C) synthetic AUROC of one source."""
        if name not in self.sources:
            raise ValueError(f"unknown validation source {name!r}; available: {', '.join(self.sources)}")
        return self.synthetic[:, :, self.sources.index(name)]

    @property
    def synthetic_base(self) -> np.ndarray:
        """(T, C, V0) synthetic AUROC of the base sources only."""
        return np.stack([self.source(s) for s in self.base_sources], axis=2)


def register_strategy(name: str, *, uses_labels: bool = False, default_label: str | None = None,
                      first: bool = False):
    """Decorator registering a strategy factory ``factory(**settings) -> (ctx -> picks)``;
    ``default_label``: the row label under which :func:`default_strategies` includes it (built
    with no settings); None: only when asked for by name. ``first``: that row comes first (the
    recommendation)."""

    def decorate(factory):
        factory.uses_labels = uses_labels
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
    return STRATEGIES.names()


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


def single_candidates(candidates: pd.DataFrame) -> np.ndarray:
    """(C,) bool: the candidates whose ``family`` is not ``"ensemble"`` (all, without a family column)."""
    if "family" not in candidates:
        return np.ones(len(candidates), dtype=bool)
    return candidates["family"].astype(str).to_numpy() != ENSEMBLE_FAMILY


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


@register_strategy("swsa")
def swsa(source: str, detectors: list[str] | None = None, **_):
    """SWSA: the candidate with the best synthetic AUROC on ``source`` (among ``detectors`` only, if given)."""
    return lambda ctx: argmax_weights(restrict(ctx, ctx.source(source), detectors))


@register_strategy("largest")
def largest_model(detectors: list[str] | None = None, **_):
    """The candidate with the most parameters (the paper's "largest model" baseline); ties (one
    backbone under several detectors) share the pick. ``detectors``: choose among those only."""

    def pick(ctx):
        sizes = restrict(ctx, ctx.candidates["n_params"].to_numpy(dtype=np.float64), detectors)
        return np.broadcast_to(argmax_weights(sizes[None, :]), ctx.real.shape).copy()

    return pick


@register_strategy("random")
def random_pick(**_):
    """A uniformly random single candidate, as its expectation (uniform weights over the single
    candidates: :func:`swsa_engine.core.label_free.expected_random_pick`'s value, not one draw)."""

    def pick(ctx):
        single = ctx.single.astype(np.float64)
        return np.broadcast_to(single / max(single.sum(), 1.0), ctx.real.shape).copy()

    return pick


@register_strategy("fixed")
def fixed_candidate(candidate: str, **_):
    """Always the named candidate (e.g. the default prompt ``prompt01``, BLISS's default setting)."""

    def pick(ctx):
        names = list(ctx.candidates["name"])
        if candidate not in names:
            raise ValueError(f"fixed strategy: unknown candidate {candidate!r}; candidates: {', '.join(names)}")
        weights = np.zeros(ctx.real.shape)
        weights[:, names.index(candidate)] = 1.0
        return weights

    return pick


@register_strategy("oracle", uses_labels=True)
def oracle(detectors: list[str] | None = None, **_):
    """The best candidate on the real validation set: the upper bound ("best possible");
    ``detectors``: the best within that sub-grid."""
    return lambda ctx: argmax_weights(restrict(ctx, ctx.real, detectors))


@register_strategy("swsa_mean")
def swsa_mean(**_):
    """The best mean synthetic AUROC over all base sources (generators)."""

    def pick(ctx):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return argmax_weights(restrict(ctx, np.nanmean(ctx.synthetic_base, axis=2), None))

    return pick


@register_strategy("swsa_rank")
def swsa_rank(**_):
    """Rank aggregation: the best mean rank of the synthetic AUROC across base sources."""

    def pick(ctx):
        base = np.where(ctx.single[None, :, None], ctx.synthetic_base, np.nan)
        ranks = np.argsort(np.argsort(np.where(np.isnan(base), -np.inf, base), axis=1), axis=1).astype(float)
        ranks[np.isnan(base)] = np.nan
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return argmax_weights(np.nanmean(ranks, axis=2))

    return pick


class MissingScoresWarning(UserWarning):
    """A strategy that reads per-image scores got a cube without them: its picks are NaN."""


#: why a strategy that reads per-image scores gives no pick on a cube without them
NO_SCORES = ("{name}: the cube holds no per-image scores, which {name} needs, so it gives no pick; re-run "
             "`swsa score` (it keeps them by default) to compute them")


def centrality(ctx: SelectionContext) -> np.ndarray | None:
    """(T, C) model centrality of the single candidates from their scores of each task's real test
    images (:func:`swsa_engine.core.label_free.model_centrality`; NaN for ensembles and candidates
    without scores on the task; images some scored candidate lacks a score for are left out), or
    None without scores."""
    if ctx.scores is None:
        return None
    values = ctx.scores.real_scores[:, ctx.single]
    pool = ctx.scores.real_pool
    finite = np.isfinite(values) & pool[:, None, :]
    available = finite.any(axis=2)
    mask = pool & ~(available[:, :, None] & pool[:, None, :] & ~np.isfinite(values)).any(axis=1)
    out = np.full(ctx.real.shape, np.nan)
    if values.shape[2]:
        out[:, ctx.single] = centrality_of(np.where(available[:, :, None], values, np.nan), mask)
    return out


@register_strategy("model_centrality", default_label="Model centrality (Ma et al. 2021)")
def model_centrality(**_):
    """Model centrality: the single candidate whose ranking of the task's unlabelled real test
    images agrees most with the others' (mean Kendall tau-b; Ma, Zhao, Zhang & Akoglu, "A
    Large-scale Study on Unsupervised Outlier Model Selection: Do Internal Strategies Suffice?",
    arXiv:2104.01422, 2021). Reads ``ctx.scores``; no labels, no synthetic anomalies. The same
    pick in every setting (it never sees which images are normal)."""

    def pick(ctx):
        values = centrality(ctx)
        if values is None:
            warnings.warn(NO_SCORES.format(name="model_centrality"), MissingScoresWarning, stacklevel=2)
            return np.full(ctx.real.shape, np.nan)
        return argmax_weights(restrict(ctx, values, None))

    return pick


#: strategies reading ``ctx.criteria``: name → (row label, +1 higher is better / -1 lower is better)
CRITERION_STRATEGIES = {"em": ("Excess-Mass (Goix 2016)", 1.0), "mv": ("Mass-Volume (Goix 2016)", -1.0)}


def criterion_strategy(name: str):
    """Strategy ``name``: the single candidate with the best Goix (2016, arXiv:1607.01152) Excess-Mass (``em``)
    or Mass-Volume (``mv``) criterion (:mod:`swsa_engine.run.em_mv_pass`); NaN picks, warned, without them."""

    def pick(ctx):
        if name not in ctx.criteria:
            warnings.warn(f"{name}: the cube holds no {name.upper()} criteria, so it gives no pick; run `swsa score "
                          "--em-mv` to compute them", MissingScoresWarning, stacklevel=2)
            return np.full(ctx.real.shape, np.nan)
        return argmax_weights(restrict(ctx, CRITERION_STRATEGIES[name][1] * ctx.criteria[name], None))

    return lambda **_: pick


register_strategy("em")(criterion_strategy("em"))
register_strategy("mv")(criterion_strategy("mv"))


@register_strategy("rra", default_label="SWSA (robust rank aggregation)")
def robust_rank_aggregation_pick(**_):
    """Robust rank aggregation of the synthetic sources' rankings (Kolde, Laur, Adler & Vilo,
    Bioinformatics 28(4), 2012; as a model-selection aggregator: Goswami et al., "Unsupervised
    Model Selection for Time-series Anomaly Detection", ICLR 2023): the single candidate that the
    base sources rank near the top most consistently (:func:`swsa_engine.core.label_free.robust_rank_aggregation`)."""

    def pick(ctx):
        base = np.where(ctx.single[None, :, None], ctx.synthetic_base, np.nan)
        return argmax_weights(restrict(ctx, robust_rank_aggregation(base), None))

    return pick


@register_strategy("trimmed_borda", default_label="SWSA (trimmed Borda, Goswami et al. 2023)")
def trimmed_borda_pick(**_):
    """Trimmed Borda of the base sources' rankings (Goswami et al., ICLR 2023; :func:`.label_free.trimmed_borda`)."""
    return lambda ctx: argmax_weights(restrict(ctx, trimmed_borda(
        np.where(ctx.single[None, :, None], ctx.synthetic_base, np.nan)), None))


def recommendation(ctx: SelectionContext, *, threshold: float = THRESHOLD, n_resamples: int | None = None,
                   seed: int | None = None) -> Recommendation:
    """The recommendation's outcome on ``ctx`` (choices, reasons and bootstrap shares per task;
    :func:`swsa_engine.core.recommendation.recommend`): among the SWSA mean-of-sources pick,
    ``ensemble(mean)`` and ``ensemble(selected)``."""
    single = as_weights(swsa_mean()(ctx), len(ctx.candidates))
    extra = {k: int(v) for k, v in (("n_resamples", n_resamples), ("seed", seed)) if v is not None}
    return recommend(ctx.synthetic_base, single, [str(n) for n in ctx.candidates["name"]], ctx.base_sources, ctx.scores,
                     threshold=float(threshold), **extra)


class RecommendationFallbackWarning(UserWarning):
    """The recommendation decided some task without its bootstrap test (no per-image scores, no ensemble)."""


@register_strategy(RECOMMENDED, default_label=RECOMMENDED_LABEL, first=True)
def recommended(threshold: float = THRESHOLD, n_resamples: int | None = None, seed: int | None = None, **_):
    """The recommendation (:mod:`swsa_engine.core.recommendation`): ``ensemble(mean)`` unless the
    single SWSA pick (mean of sources) or ``ensemble(selected)`` beats it on the synthetic sets in at
    least ``threshold`` of the bootstrap resamples. Unlike the other built-ins it may pick an
    ensemble; its regret is still measured against the best single candidate. Fallbacks warn
    (:class:`RecommendationFallbackWarning`) with the reason."""

    def pick(ctx):
        outcome = recommendation(ctx, threshold=threshold, n_resamples=n_resamples, seed=seed)
        if outcome.fallback.any():
            warnings.warn(f"{RECOMMENDED}: {outcome.reason[outcome.fallback][0]}", RecommendationFallbackWarning,
                          stacklevel=2)
        return outcome.weights

    return pick


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


def default_strategies(cube: AurocCube) -> list[tuple[str, str, dict]]:
    """Table 1's rows (and the strategies comparison's): (label, strategy name, settings) — first
    the strategies registered with ``first=True`` (the recommendation), then the largest model, the random pick, SWSA per base source and aggregated, every strategy
    registered with a ``default_label``, the oracle, and :func:`detector_strategies`."""
    detector_rows = detector_strategies(cube)
    # with a detector grid, "largest" shares its pick among every detector on the largest backbone
    largest = "Largest backbone, all detectors averaged" if detector_rows else "Largest model"
    rows = [(largest, "largest", {}), ("Random (expected)", "random", {})]
    base = cube.config.get("base_sources", [s for s in cube.sources if "@" not in s])
    rows += [(f"SWSA ({source})", "swsa", {"source": source}) for source in base]
    if len(base) > 1:
        rows += [("SWSA (mean of sources)", "swsa_mean", {}), ("SWSA (rank aggregation)", "swsa_rank", {})]
    rows = [(DEFAULT_LABELS[name], name, {}) for name in FIRST_STRATEGIES] + rows
    listed = {name for _, name, _ in rows} | {"oracle"}
    rows += [(label, name, {}) for name, label in DEFAULT_LABELS.items() if name not in listed]
    criteria = em_mv_criteria(cube.config, cube.tasks["task_id"], cube.candidate_names)  # em, mv: when computed
    rows += [(CRITERION_STRATEGIES[name][0], name, {}) for name in criteria]
    rows += [(name, "fixed", {"candidate": name}) for name in
             cube.candidates.loc[~single_candidates(cube.candidates), "name"] if str(name).startswith("ensemble(")]
    rows.append(("Best model (oracle)", "oracle", {}))
    rows += detector_rows
    return rows


def detector_strategies(cube: AurocCube) -> list[tuple[str, str, dict]]:
    """Table 1's detector-selection rows, when the cube's candidates span several detectors: SWSA
    over the paper's backbone-only grid (the default detector, kNN k = 3), the default detector
    on the largest model, and the best backbone-only candidate (oracle). The full-grid rows are
    the usual ones ("SWSA (source)", "Largest backbone, all detectors averaged", "Best model (oracle)")."""
    if "detector" not in cube.candidates:
        return []
    labels = set(cube.candidates.loc[single_candidates(cube.candidates), "detector"]) - {"imported"}
    default = DEFAULT_DETECTOR.label
    if len(labels) < 2 or default not in labels:
        return []
    base = cube.config.get("base_sources", [s for s in cube.sources if "@" not in s])
    only = {"detectors": [default]}
    rows = [(f"SWSA ({source}), backbone-only grid", "swsa", {"source": source, **only}) for source in base]
    rows += [(f"Largest backbone with detector {default}", "largest", only),
             ("Best backbone-only candidate (oracle)", "oracle", only)]
    return rows


def selection_context(cube: AurocCube, rows: np.ndarray, setting_index: int) -> SelectionContext:
    """What the strategies see of the tasks ``rows`` of ``cube`` in setting ``SETTINGS[setting_index]``."""
    base = tuple(cube.config.get("base_sources", [s for s in cube.sources if "@" not in s]))
    scores = cube.scores
    return SelectionContext(
        synthetic=cube.synthetic[rows], sources=tuple(cube.sources), base_sources=base,
        candidates=cube.candidates, real=cube.real[rows, :, setting_index],
        scores=None if scores is None else scores.take(rows),
        criteria=em_mv_criteria(cube.config, cube.tasks["task_id"], cube.candidate_names, rows),
    )


def strategy_weights(ctx: SelectionContext, strategies: list[tuple[str, str, dict]]) -> list[np.ndarray]:
    """Each strategy's picks on ``ctx`` as (T, C) weights, in the order of ``strategies``
    ((label, strategy name, settings) rows, as :func:`default_strategies` gives)."""
    n_candidates = len(ctx.candidates)
    return [as_weights(create_strategy(name, **settings)(ctx), n_candidates) for _, name, settings in strategies]


def selection_table(cube: AurocCube, strategies: list[tuple[str, str, dict]] | None = None) -> pd.DataFrame:
    """The paper's Table 1 over every dataset × setting × strategy.

    Columns: dataset, setting, strategy, picks (expected number of tasks where the pick is a
    best candidate), tasks (tasks evaluated), pick_rate, auroc (mean real AUROC of the pick),
    best (mean best possible real AUROC).
    """
    strategies = strategies or default_strategies(cube)
    records = []
    for dataset in sorted(cube.tasks["dataset"].unique()):
        rows = np.flatnonzero(cube.tasks["dataset"].to_numpy() == dataset)
        for s, setting in enumerate(SETTINGS):
            ctx = selection_context(cube, rows, s)
            for (label, _, _), weights in zip(strategies, strategy_weights(ctx, strategies)):
                outcome = evaluate_weights(weights, ctx.real, ctx.single)
                defined = ~np.isnan(outcome["hit"])
                n = int(defined.sum())
                records.append({
                    "dataset": dataset, "setting": setting, "strategy": label,
                    "picks": float(np.sum(outcome["hit"][defined])), "tasks": n,
                    "pick_rate": float(np.mean(outcome["hit"][defined])) if n else np.nan,
                    "auroc": float(np.mean(outcome["auroc"][defined])) if n else np.nan,
                    "best": float(np.mean(outcome["best"][defined])) if n else np.nan,
                })
    return pd.DataFrame(records)


def per_task_picks(cube: AurocCube, source: str | None = None) -> pd.DataFrame:
    """One row per task and setting: SWSA's pick on ``source``, the oracle's pick and their real AUROCs
    — among the single candidates, as the strategies choose (an ensemble is a row of its own)."""
    base = cube.config.get("base_sources", [s for s in cube.sources if "@" not in s])
    source = source or (base[0] if base else None)
    names = np.array(cube.candidate_names)
    closest = cube.closest_class()
    single = single_candidates(cube.candidates)[None, :]
    records = []
    for s, setting in enumerate(SETTINGS):
        real = np.where(single, cube.real[:, :, s], np.nan)
        synth = (np.where(single, cube.synthetic[:, :, cube.sources.index(source)], np.nan) if source
                 else np.full(real.shape, np.nan))
        safe = lambda a: np.where(np.isnan(a), -np.inf, a)
        pick = safe(synth).argmax(axis=1)
        best = safe(real).argmax(axis=1)
        for t in range(len(cube.tasks)):
            records.append({
                "task_id": int(cube.tasks["task_id"].iloc[t]), "dataset": cube.tasks["dataset"].iloc[t],
                "normal_class": cube.tasks["normal_class"].iloc[t], "setting": setting, "source": source,
                "swsa_pick": names[pick[t]], "swsa_pick_synthetic_auroc": synth[t, pick[t]],
                "swsa_pick_real_auroc": real[t, pick[t]], "oracle_pick": names[best[t]],
                "oracle_real_auroc": real[t, best[t]], "hit": bool(real[t, pick[t]] == real[t, best[t]]),
                "closest_class_of_pick": closest[t, pick[t]] if setting == "one-vs-closest" else "",
            })
    return pd.DataFrame(records)
