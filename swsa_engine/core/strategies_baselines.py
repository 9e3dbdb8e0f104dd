"""The field's label-free model-selection baselines as strategies: model centrality (from the
per-image scores of the unlabelled real test images), Goix's Excess-Mass and Mass-Volume criteria,
and robust rank aggregation and trimmed Borda of the synthetic sources' rankings.

None reads a real label, so each gives the same picks in every setting. Registered on import
(:mod:`swsa_engine.core.selection` imports this module); the array functions behind them are in
:mod:`swsa_engine.core.label_free` and :mod:`swsa_engine.core.em_mv`.
"""

from __future__ import annotations

import warnings

import numpy as np

from swsa_engine.core.label_free import model_centrality as centrality_of
from swsa_engine.core.label_free import robust_rank_aggregation, trimmed_borda
from swsa_engine.core.selection_registry import SelectionContext, argmax_weights, register_strategy, restrict

__all__ = [
    "MissingScoresWarning", "NO_SCORES", "centrality", "model_centrality", "CRITERION_STRATEGIES",
    "criterion_strategy", "robust_rank_aggregation_pick", "trimmed_borda_pick",
]


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
    out = np.full(ctx.shape, np.nan)
    if values.shape[2]:
        out[:, ctx.single] = centrality_of(np.where(available[:, :, None], values, np.nan), mask)
    return out


@register_strategy("model_centrality", default_label="Model centrality (Ma et al. 2021)", reads_synthetic=False)
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
            return np.full(ctx.shape, np.nan)
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
            return np.full(ctx.shape, np.nan)
        return argmax_weights(restrict(ctx, CRITERION_STRATEGIES[name][1] * ctx.criteria[name], None))

    return lambda **_: pick


register_strategy("em", reads_synthetic=False)(criterion_strategy("em"))
register_strategy("mv", reads_synthetic=False)(criterion_strategy("mv"))


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
