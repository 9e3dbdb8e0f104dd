"""Issue 23: the selection modules split, and label-free strategies computed once for both settings.

Table 1 and the strategies comparison now run each label-free strategy once per dataset (on a
context whose real AUROCs are NaN) and the oracle once per setting; checked against the naive
loop the tables used before (every strategy on every setting's own context), on a cube with
per-image scores (model centrality), ensembles (the recommendation's bootstrap) and ties."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pandas as pd
import pytest

from swsa_engine.core import selection, selection_registry, strategies_baselines, strategies_builtin
from swsa_engine.core.cube import SETTINGS
from swsa_engine.core.ensemble_pass import SELECTED
from swsa_engine.core.recommendation import ENSEMBLE_MEAN
from swsa_engine.core.score_cube import ScoreCube
from swsa_engine.core.selection import (STRATEGIES, default_strategies, evaluate_weights, register_strategy,
                                        selection_context, selection_table, setting_reals, setting_weights,
                                        strategy_weights)
from swsa_engine.core.strategy_comparison import selection_tables, strategies_table
from swsa_engine.core.synthetic_resampling import part_aurocs_finite

from test_strategies import _cube

NAMES = ["m0", "m1", "m2", "m3", ENSEMBLE_MEAN, SELECTED]


def _scored_cube(seed=0, n_tasks=12, n_real=30, width=36):
    """``test_strategies._cube`` (two datasets, tied AUROCs) with 4 single candidates, ensemble(mean)
    and ensemble(selected), and per-image scores with integer ties (model centrality, the bootstrap)."""
    rng = np.random.default_rng(seed)
    cube = _cube(rng, n_tasks=n_tasks, n_candidates=len(NAMES))
    candidates = cube.candidates.assign(name=NAMES, family=["resnet"] * 4 + ["ensemble"] * 2)
    label = rng.choice([-1, 0, 1], size=(n_tasks, n_real), p=[0.1, 0.6, 0.3]).astype(np.int8)
    label[:, :2], label[:, 2:4] = 0, 1
    real_scores = np.where(label[:, None] >= 0, rng.integers(0, 5, size=(n_tasks, len(NAMES), n_real)), np.nan)
    part = rng.choice([-1, 0, 1, 2, 3], size=(n_tasks, width)).astype(np.int8)
    part[:, :3], part[:, 3:6], part[:, 6:9], part[:, 9:12] = 0, 1, 2, 3
    synthetic_scores = np.where(part[:, None] >= 0, rng.integers(0, 6, size=(n_tasks, len(NAMES), width)), np.nan)
    empty = np.full((n_tasks, 1), "", dtype=object)
    scores = ScoreCube(np.arange(n_tasks), NAMES, ["s1", "s2", "s3"], np.where(label >= 0, np.arange(n_real), -1),
                       label, label >= 0, np.where(label > 0, 0, -1), empty, real_scores.astype(float),
                       np.where(part >= 0, np.arange(width), -1), part, synthetic_scores.astype(float))
    synthetic = part_aurocs_finite(scores.synthetic_scores, part, 3)  # the AUROCs the scores give, as `swsa score`
    return dataclasses.replace(cube, candidates=candidates, scores=scores, synthetic=synthetic)


def _quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fallbacks of the recommendation on a tiny cube
        return function(*args, **kwargs)


def _rows(cube, dataset):
    return np.flatnonzero(cube.tasks["dataset"].to_numpy() == dataset)


def _strategies(cube):
    return default_strategies(cube) + [("fixed m2", "fixed", {"candidate": "m2"})]


def test_setting_weights_equal_each_strategy_on_each_settings_own_context():
    cube = _scored_cube()
    strategies = _strategies(cube)
    assert {"recommended", "model_centrality", "oracle", "rra", "trimmed_borda", "random", "largest"} <= {
        name for _, name, _ in strategies}
    for dataset in ("x", "y"):
        rows = _rows(cube, dataset)
        shared = _quiet(setting_weights, selection_context(cube, rows, 1), setting_reals(cube, rows), strategies)
        assert len(shared) == len(SETTINGS)
        for s in range(len(SETTINGS)):
            naive = _quiet(strategy_weights, selection_context(cube, rows, s), strategies)
            for (label, _, _), ours, expected in zip(strategies, shared[s], naive):
                np.testing.assert_array_equal(ours, expected, err_msg=f"{label}, {SETTINGS[s]}")
    real = cube.real.copy()
    real[:, :, 1] = real[:, ::-1, 0]  # the settings disagree: only the oracle's picks may differ
    shared = _quiet(setting_weights, selection_context(cube, _rows(cube, "x"), 0), setting_reals(
        dataclasses.replace(cube, real=real), _rows(cube, "x")), strategies)
    differ = {label for k, (label, _, _) in enumerate(strategies) if not np.array_equal(shared[0][k], shared[1][k])}
    assert differ == {"Best model (oracle)"}


def _naive_table1(cube, strategies):
    """Table 1 as it was computed before: every strategy on every dataset × setting context."""
    records = []
    for dataset in sorted(cube.tasks["dataset"].unique()):
        for s, setting in enumerate(SETTINGS):
            ctx = selection_context(cube, _rows(cube, dataset), s)
            for (label, _, _), weights in zip(strategies, _quiet(strategy_weights, ctx, strategies)):
                outcome = evaluate_weights(weights, ctx.real, ctx.single)
                defined = ~np.isnan(outcome["hit"])
                hit, auroc, best = (outcome[k][defined] for k in ("hit", "auroc", "best"))
                records.append({"dataset": dataset, "setting": setting, "strategy": label, "picks": float(hit.sum()),
                                "tasks": int(defined.sum()), "pick_rate": float(hit.mean()) if len(hit) else np.nan,
                                "auroc": float(auroc.mean()) if len(hit) else np.nan,
                                "best": float(best.mean()) if len(hit) else np.nan})
    return pd.DataFrame(records)


def test_table1_and_the_comparison_equal_the_naive_loop_and_each_other():
    cube = _scored_cube(seed=1)
    strategies = _strategies(cube)
    table1, comparison = _quiet(selection_tables, cube, strategies, n_resamples=60)
    pd.testing.assert_frame_equal(table1, _naive_table1(cube, strategies))
    pd.testing.assert_frame_equal(table1, _quiet(selection_table, cube, strategies))
    pd.testing.assert_frame_equal(comparison, _quiet(strategies_table, cube, strategies, n_resamples=60))
    centrality = table1[table1["strategy"] == "Model centrality (Ma et al. 2021)"]
    assert len(centrality) == 4 and (centrality["tasks"] > 0).all()  # scores were read: defined picks


def test_label_free_strategies_run_once_per_dataset_and_never_see_labels():
    calls = {"free": [], "labelled": []}
    if "test_count_label_free" not in STRATEGIES:
        @register_strategy("test_count_label_free")
        def count_free(**_):
            def pick(ctx):
                calls["free"].append(bool(np.isnan(ctx.real).all()))
                return np.nanmean(ctx.synthetic_base, axis=2).argmax(axis=1)
            return pick

        @register_strategy("test_count_labelled", uses_labels=True)
        def count_labelled(**_):
            def pick(ctx):
                calls["labelled"].append(bool(np.isfinite(ctx.real).all()))
                return np.nan_to_num(ctx.real, nan=-1.0).argmax(axis=1)
            return pick
    cube = _scored_cube(seed=2)
    rows = [("free", "test_count_label_free", {}), ("labelled", "test_count_labelled", {})]
    table = selection_table(cube, rows)
    assert calls["free"] == [True, True]  # once per dataset (x, y), real hidden
    assert calls["labelled"] == [True] * 4  # once per dataset and setting, real given
    assert len(table) == 2 * len(SETTINGS) * 2


def test_setting_weights_rejects_reals_of_another_shape():
    cube = _scored_cube()
    rows = _rows(cube, "x")
    with pytest.raises(ValueError, match=r"each setting's real AUROCs must be \(tasks, candidates\) = "
                                         rf"\({len(rows)}, 6\), got \(3, 6\)"):
        setting_weights(selection_context(cube, rows, 0), [cube.real[:3, :, 0]], [("random", "random", {})])


def test_every_public_name_of_the_selection_modules_is_importable_from_selection():
    for module in (selection_registry, strategies_builtin, strategies_baselines):
        for name in module.__all__:
            assert name in selection.__all__, f"{module.__name__}.{name} missing from selection.__all__"
            assert getattr(selection, name) is getattr(module, name)
    assert all(hasattr(selection, name) for name in selection.__all__)
    assert {"swsa", "largest", "random", "fixed", "oracle", "swsa_mean", "swsa_rank", "recommended",
            "model_centrality", "em", "mv", "rra", "trimmed_borda"} <= set(selection.list_strategies())
    assert selection.uses_labels("oracle")
    assert not any(selection.uses_labels(name) for name in ("swsa", "recommended", "model_centrality", "rra", "random"))
