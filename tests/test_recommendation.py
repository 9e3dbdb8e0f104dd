"""The recommendation (issue 25 item 3): ensemble(mean) unless the single SWSA pick or the selected
ensemble beats it in >= 95 % of bootstrap resamples of the synthetic set — against a naive loop
(sklearn AUROCs per task, resample and source), its fallbacks with their reasons, and its place as
the first row of Table 1 and of the strategies table."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from swsa_engine.core.ensemble_pass import ENSEMBLE_FAMILY, SELECTED
from swsa_engine.core.recommendation import ENSEMBLE_MEAN, RECOMMENDED_LABEL, THRESHOLD, recommend
from swsa_engine.core.score_cube import ScoreCube
from swsa_engine.core.selection import (RecommendationFallbackWarning, SelectionContext, create_strategy,
                                        default_strategies, evaluate_weights, selection_table)
from swsa_engine.core.strategy_comparison import strategies_table
from swsa_engine.core.synthetic_resampling import part_aurocs_finite, resample_positions
from swsa_engine.report.summary import write_report
from swsa_engine.report.tables import strategies_display, table1_display

from test_strategies import _cube

NAMES = ["a", "b", "c", "d", ENSEMBLE_MEAN, SELECTED]
SOURCES = ("s1", "s2")
B = 40


def _data(seed=0, n_tasks=6, width=40):
    """ScoreCube-shaped synthetic scores with integer ties. Task 0: single 'a' separates perfectly;
    task 1: the selected ensemble does, every single equals ensemble(mean); task 2: noise; task 3:
    'a' and the selected ensemble both perfect (a tie of mean synthetic AUROCs); tasks 4+: noise."""
    rng = np.random.default_rng(seed)
    part = rng.choice([-1, 0, 1, 2], size=(n_tasks, width), p=[0.1, 0.3, 0.3, 0.3]).astype(np.int8)
    part[:, :4], part[:, 4:8], part[:, 8:12] = 0, 1, 2
    anomaly = part > 0
    scores = rng.integers(0, 6, size=(n_tasks, len(NAMES), width)).astype(float)
    scores[0, 0] = np.where(anomaly[0], 10, 0) + rng.integers(0, 2, size=width)
    scores[1, :5] = scores[1, 4]
    scores[1, 5] = np.where(anomaly[1], 9, 1)
    scores[3, 0] = np.where(anomaly[3], 10, 0)
    scores[3, 5] = np.where(anomaly[3], 8, 2)
    scores = np.where(part[:, None] >= 0, scores, np.nan)
    base = part_aurocs_finite(scores, part, len(SOURCES))
    return scores, part, base


def _score_cube(scores, part):
    n_tasks, _, width = scores.shape
    empty = np.full((n_tasks, 1), -1)
    return ScoreCube(np.arange(n_tasks), NAMES, list(SOURCES), empty, empty.astype(np.int8), empty >= 0, empty,
                     np.full((n_tasks, 1), "", dtype=object), np.full((n_tasks, len(NAMES), 1), np.nan),
                     np.where(part >= 0, np.arange(width), -1), part, scores)


def _single_weights(base, n_single=4):
    crit = np.nanmean(base, axis=2)
    out = np.zeros(crit.shape)
    for t, row in enumerate(crit):
        best = np.nanmax(row[:n_single])
        tied = [c for c in range(n_single) if row[c] == best]
        out[t, tied] = 1.0 / len(tied)
    return out


def _naive(scores, part, base, single, threshold=THRESHOLD, n_resamples=B, seed=0):
    """The rule written out: per task and resample, sklearn AUROCs of each source, their mean, strict wins."""
    positions, new_parts = resample_positions(part, len(SOURCES), n_resamples, seed)
    choices, weights, shares = [], np.zeros(single.shape), []
    for t in range(len(scores)):
        wins = np.zeros(len(NAMES))
        for b in range(n_resamples):
            value = np.full(len(NAMES), np.nan)
            for c in range(len(NAMES)):
                s = scores[t, c, positions[t, b]]
                aurocs = []
                for v in range(len(SOURCES)):
                    keep = (new_parts[t] == 0) | (new_parts[t] == v + 1)
                    aurocs.append(roc_auc_score(new_parts[t][keep] == v + 1, s[keep]))
                value[c] = np.mean(aurocs)
            wins += value > value[4]
        p_single = sum(single[t, c] * wins[c] / n_resamples for c in range(4))
        p_selected = wins[5] / n_resamples
        shares.append((p_single, p_selected))
        crit = base[t].mean(axis=1)
        single_value = sum(single[t, c] * crit[c] for c in range(4))
        if p_single >= threshold and p_selected >= threshold:
            choice = "single" if single_value > crit[5] else SELECTED
        elif p_single >= threshold:
            choice = "single"
        elif p_selected >= threshold:
            choice = SELECTED
        else:
            choice = ENSEMBLE_MEAN
        choices.append(choice)
        weights[t] = single[t] if choice == "single" else np.eye(len(NAMES))[NAMES.index(choice)]
    return choices, weights, np.array(shares)


@pytest.mark.parametrize("seed", [0, 1])
def test_rule_equals_a_naive_loop(seed):
    scores, part, base = _data(seed)
    single = _single_weights(base)
    got = recommend(base, single, NAMES, SOURCES, _score_cube(scores, part), n_resamples=B, seed=seed)
    choices, weights, shares = _naive(scores, part, base, single, seed=seed)
    assert got.choice.tolist() == choices
    np.testing.assert_allclose(got.weights, weights)
    np.testing.assert_allclose(np.c_[got.p_single, got.p_selected], shares, atol=1e-12)
    assert choices[:4] == ["single", SELECTED, ENSEMBLE_MEAN, SELECTED]  # every branch, the tie to the ensemble
    assert "both pass" in got.reason[3] and "ensemble(mean) (the default)" in got.reason[2]
    assert not got.fallback.any()


def test_a_lower_bar_lets_more_challengers_through():
    scores, part, base = _data(0)
    single = _single_weights(base)
    strict = recommend(base, single, NAMES, SOURCES, _score_cube(scores, part), n_resamples=B)
    loose = recommend(base, single, NAMES, SOURCES, _score_cube(scores, part), threshold=0.05, n_resamples=B)
    choices, _, _ = _naive(scores, part, base, single, threshold=0.05)
    assert loose.choice.tolist() == choices
    assert (loose.choice != ENSEMBLE_MEAN).sum() >= (strict.choice != ENSEMBLE_MEAN).sum()
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\], got 0"):
        recommend(base, single, NAMES, SOURCES, None, threshold=0)


def test_fallbacks_record_their_reason():
    scores, part, base = _data(0)
    single = _single_weights(base)
    no_scores = recommend(base, single, NAMES, SOURCES, None)
    assert set(no_scores.choice) == {ENSEMBLE_MEAN} and no_scores.fallback.all()
    assert all("no per-image scores" in r for r in no_scores.reason)
    np.testing.assert_array_equal(no_scores.weights, np.tile(np.eye(6)[4], (len(base), 1)))
    # no ensembles in the cube: the single pick
    alone = recommend(base[:, :4], single[:, :4], NAMES[:4], SOURCES, None)
    assert set(alone.choice) == {"single"} and "the cube has no ensemble(mean)" in alone.reason[0]
    np.testing.assert_array_equal(alone.weights, single[:, :4])
    # ensemble(mean) undefined on task 2 (no eligible member): the single pick there only
    holed = base.copy()
    holed[2, 4] = np.nan
    gap = scores.copy()
    gap[2, 4] = np.nan
    some = recommend(holed, single, NAMES, SOURCES, _score_cube(gap, part), n_resamples=B)
    assert some.choice[2] == "single" and "no synthetic AUROC on this task" in some.reason[2]
    assert some.choice[0] == "single" and some.fallback.tolist() == [False, False, True, False, False, False]
    # neither the ensemble nor a single pick: no pick, NaN weights
    nothing = single[:, :4].copy()
    nothing[1] = np.nan
    none = recommend(base[:, :4], nothing, NAMES[:4], SOURCES, None)
    assert none.choice[1] == "" and np.isnan(none.weights[1]).all() and "no pick" in none.reason[1]


def test_scores_from_another_run_are_refused():
    scores, part, base = _data(0)
    single = _single_weights(base)
    other = base.copy()
    other[0, 4, 1] += 0.01
    with pytest.raises(ValueError, match="do not reproduce the cube's synthetic AUROCs .*'ensemble\\(mean\\)'"):
        recommend(other, single, NAMES, SOURCES, _score_cube(scores, part), n_resamples=B)
    with pytest.raises(ValueError, match="sources \\['s1', 's2'\\] differ from the cube's base sources"):
        recommend(base, single, NAMES, ("s1", "x"), _score_cube(scores, part), n_resamples=B)


def _context(base, scores, part, real):
    family = ["knn"] * 4 + [ENSEMBLE_FAMILY] * 2
    candidates = pd.DataFrame({"name": NAMES, "n_params": [1, 2, 3, 4, 0, 0], "family": family})
    return SelectionContext(synthetic=base, sources=SOURCES, base_sources=SOURCES, candidates=candidates, real=real,
                            scores=None if scores is None else _score_cube(scores, part))


def test_strategy_may_pick_an_ensemble_and_regret_stays_against_the_best_single():
    scores, part, base = _data(0)
    real = np.random.default_rng(2).uniform(0.5, 0.9, size=(len(base), len(NAMES)))
    real[1, 5] = 0.99  # the selected ensemble beats every single candidate on task 1
    ctx = _context(base, scores, part, real)
    weights = create_strategy("recommended", n_resamples=str(B))(ctx)  # settings may come as text (--pick)
    expected = recommend(base, _single_weights(base), NAMES, SOURCES, ctx.scores, n_resamples=B).weights
    np.testing.assert_array_equal(weights, expected)
    outcome = evaluate_weights(weights, real, ctx.single)
    assert outcome["best"][1] == real[1, :4].max() and outcome["auroc"][1] == 0.99  # negative regret is allowed
    with pytest.warns(RecommendationFallbackWarning, match="no per-image scores"):
        create_strategy("recommended")(_context(base, None, part, real))


def test_recommendation_is_the_first_row_of_table1_and_the_strategies_table(tmp_path):
    cube = _cube(np.random.default_rng(5))
    assert default_strategies(cube)[0] == (RECOMMENDED_LABEL, "recommended", {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table1 = selection_table(cube)
        comparison = strategies_table(cube, n_resamples=20)
        paths = write_report(cube, tmp_path)
    for table in (table1, comparison):
        firsts = table.groupby(["dataset", "setting"], sort=False)["strategy"].first()
        assert set(firsts) == {RECOMMENDED_LABEL}
    # without ensembles or scores it falls back to SWSA (mean of sources): the same numbers
    rec, swsa_mean = (table1[table1.strategy == label] for label in (RECOMMENDED_LABEL, "SWSA (mean of sources)"))
    np.testing.assert_array_equal(rec["auroc"].to_numpy(), swsa_mean["auroc"].to_numpy())
    csv = pd.read_csv(paths["strategies_csv"])
    assert csv["strategy"].iloc[0] == RECOMMENDED_LABEL
    assert strategies_display(csv)["strategy"].iloc[0] == RECOMMENDED_LABEL
    assert table1_display(table1)["strategy"].iloc[0].startswith(RECOMMENDED_LABEL)
    report = paths["report"].read_text()
    table1_md = report[report.index("| dataset"):]
    assert table1_md.index(RECOMMENDED_LABEL) < table1_md.index("Largest model")
    strategies_md = report[report.index("## Strategies compared"):]
    assert strategies_md.index(RECOMMENDED_LABEL) < strategies_md.index("Largest model")
