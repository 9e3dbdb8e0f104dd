"""The built-in selection strategies that read the synthetic AUROCs or the candidates' metadata:
SWSA per source and aggregated over the sources, the largest model, the random pick, a fixed
candidate, the oracle (the only one reading real labels) and the recommendation.

Registered on import (:mod:`swsa_engine.core.selection` imports this module); the field's
label-free baselines live in :mod:`swsa_engine.core.strategies_baselines`.
"""

from __future__ import annotations

import warnings

import numpy as np

from swsa_engine.core.recommendation import RECOMMENDED, RECOMMENDED_LABEL, THRESHOLD, Recommendation, recommend
from swsa_engine.core.selection_registry import SelectionContext, argmax_weights, as_weights, register_strategy, restrict

__all__ = [
    "swsa", "largest_model", "random_pick", "fixed_candidate", "oracle", "swsa_mean", "swsa_rank", "recommendation",
    "RecommendationFallbackWarning", "recommended",
]


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
        return np.broadcast_to(argmax_weights(sizes[None, :]), ctx.shape).copy()

    return pick


@register_strategy("random")
def random_pick(**_):
    """A uniformly random single candidate, as its expectation (uniform weights over the single
    candidates: :func:`swsa_engine.core.label_free.expected_random_pick`'s value, not one draw)."""

    def pick(ctx):
        single = ctx.single.astype(np.float64)
        return np.broadcast_to(single / max(single.sum(), 1.0), ctx.shape).copy()

    return pick


@register_strategy("fixed")
def fixed_candidate(candidate: str, **_):
    """Always the named candidate (e.g. the default prompt ``prompt01``, BLISS's default setting)."""

    def pick(ctx):
        names = list(ctx.candidates["name"])
        if candidate not in names:
            raise ValueError(f"fixed strategy: unknown candidate {candidate!r}; candidates: {', '.join(names)}")
        weights = np.zeros(ctx.shape)
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
