"""Pick confidence without labels (issue 20 item 7): resample probability, source agreement and
margin against naive loops (per task, per resample, sklearn's roc_auc_score) on seeded data with
ties; a dominating candidate; identical candidates; the confidence and distrust tables; errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from swsa_engine.core.cube import SETTINGS, AurocCube
from swsa_engine.core.pick_confidence import (CONFIDENCE_COLUMNS, DEFAULT_RESAMPLES, SYNTHETIC_STRATEGIES, confidence_table,
                                              distrust_table,
                                              part_aurocs_finite, pick_confidence, resample_positions, resampled_aurocs)
from swsa_engine.core.selection import create_strategy, default_strategies, selection_context

SOURCES = ["s1", "s2", "s3"]


def _score_arrays(rng, n_tasks=5, n_candidates=6, sizes=((9, 4, 6, 5), (6, 7, 3, 5), (12, 5, 5, 0)), levels=6):
    """Per-image synthetic scores (T, C, W) rounded to ``levels`` values (ties), and parts (T, W):
    task t has sizes[t % 3] = (normals, then anomalies per source), shuffled, padded with -1."""
    width = max(sum(s) for s in sizes) + 3
    parts = np.full((n_tasks, width), -1, dtype=np.int8)
    for t in range(n_tasks):
        row = np.concatenate([np.full(n, p) for p, n in enumerate(sizes[t % len(sizes)])])
        slots = np.sort(rng.choice(width, size=len(row), replace=False))
        parts[t, slots] = rng.permutation(row)
    shift = rng.uniform(0, 1.0, size=(n_tasks, n_candidates, 1))
    scores = np.round((rng.uniform(0, 1, size=(n_tasks, n_candidates, width)) + shift * (parts[:, None, :] > 0))
                      * levels / 2) / levels
    scores = np.where(parts[:, None, :] >= 0, scores, np.nan)
    scores[1, 2, np.flatnonzero(parts[1] == 1)[0]] = np.nan  # one query not scored for one candidate
    return scores, parts


def _cube(scores, parts, *, detectors=None, rng=None):
    rng = rng or np.random.default_rng(1)
    n_tasks, n_candidates, _ = scores.shape
    synthetic = part_aurocs_finite(scores, parts, len(SOURCES))
    candidates = pd.DataFrame({"name": [f"m{i}" for i in range(n_candidates)], "n_params": np.arange(n_candidates) + 1,
                               "feature_dim": 8, "weights_kind": "pretrained", "family": "resnet"})
    if detectors is not None:
        candidates["detector"] = detectors
    return AurocCube(
        tasks=pd.DataFrame({"task_id": np.arange(n_tasks) + 10, "dataset": "x",
                            "normal_class": [f"c{i}" for i in range(n_tasks)]}),
        candidates=candidates, sources=SOURCES, real=np.round(rng.uniform(0.5, 1, (n_tasks, n_candidates, 2)) * 10) / 10,
        synthetic=synthetic, per_class=np.full((n_tasks, n_candidates, 1), np.nan),
        class_names=np.full((n_tasks, 1), "", dtype=object), config={"k": 3, "base_sources": SOURCES})


def _ctx(cube):
    return selection_context(cube, np.arange(len(cube.tasks)), 0)


def _split_argmax(values):
    """Naive tie rule: uniform weights over the maxima of a 1-d array (NaN = not a candidate)."""
    values = np.asarray(values, dtype=float)
    if np.isnan(values).all():
        return np.full(len(values), np.nan)
    best = np.nanmax(values)
    hits = np.array([v == best for v in values], dtype=float)
    return hits / hits.sum()


def _naive_draws(parts, n_sources, n_resamples, seed):
    """The documented draws, one task, part and resample at a time: a list per task of B index lists."""
    rng = np.random.default_rng(seed)
    n_tasks = parts.shape[0]
    draws = [[[] for _ in range(n_resamples)] for _ in range(n_tasks)]
    for part in range(n_sources + 1):
        members = [np.flatnonzero(parts[t] == part) for t in range(n_tasks)]
        width = max(len(m) for m in members)
        u = rng.random((n_tasks, n_resamples, width))
        for t in range(n_tasks):
            for b in range(n_resamples):
                draws[t][b] += [(part, members[t][int(np.floor(u[t, b, j] * len(members[t])))])
                                for j in range(len(members[t]))]
    return draws


def _naive_aurocs(scores_tc, drawn, n_sources):
    """(V,) sklearn AUROCs of one candidate on one resample (list of (part, position))."""
    out = []
    for v in range(n_sources):
        chosen = [(p, i) for p, i in drawn if p in (0, v + 1) and np.isfinite(scores_tc[i])]
        labels = [p == v + 1 for p, _ in chosen]
        if not 0 < sum(labels) < len(labels):
            out.append(np.nan)
            continue
        # sklearn's trapezoids carry rounding error; the AUROC is k / (2 n_pos n_neg): snap to that grid so
        # that exactly tied candidates tie here too (the batched AUROC divides once, exactly)
        grid = 2 * sum(labels) * (len(labels) - sum(labels))
        out.append(round(roc_auc_score(labels, [scores_tc[i] for _, i in chosen]) * grid) / grid)
    return np.array(out)


def test_resampled_aurocs_equal_naive_sklearn_loop():
    rng = np.random.default_rng(0)
    scores, parts = _score_arrays(rng)
    fast = resampled_aurocs(scores, parts, 3, n_resamples=7, seed=3)
    draws = _naive_draws(parts, 3, 7, 3)
    for t in range(scores.shape[0]):
        for c in range(scores.shape[1]):
            for b in range(7):
                np.testing.assert_allclose(fast[t, c, b], _naive_aurocs(scores[t, c], draws[t][b], 3), atol=1e-12)
    # a task without source 3's anomalies: NaN there; the full sample equals sklearn too
    assert np.isnan(fast[2, :, :, 2]).all() and np.isfinite(fast[0]).all()
    full = part_aurocs_finite(scores, parts, 3)
    ok = (parts[0] >= 0)
    labels = parts[0][ok & np.isin(parts[0], [0, 1])] == 1
    assert full[0, 4, 0] == pytest.approx(roc_auc_score(labels, scores[0, 4][ok & np.isin(parts[0], [0, 1])]))


def test_resample_positions_keep_counts_and_parts():
    rng = np.random.default_rng(5)
    _, parts = _score_arrays(rng)
    positions, new_parts = resample_positions(parts, 3, n_resamples=4, seed=0)
    assert positions.shape[:2] == (5, 4) and new_parts.shape == (5, positions.shape[2])
    for t in range(5):
        for p in range(4):
            assert (new_parts[t] == p).sum() == (parts[t] == p).sum()
            drawn = positions[t][:, new_parts[t] == p]
            assert (parts[t][drawn] == p).all()
    again, _ = resample_positions(parts, 3, n_resamples=4, seed=0)
    other, _ = resample_positions(parts, 3, n_resamples=4, seed=1)
    assert np.array_equal(positions, again) and not np.array_equal(positions, other)


def _naive_frequency(cube, scores, parts, name, settings, n_resamples, seed):
    """(T, C) mean pick weight over the resamples: per task, per resample, sklearn AUROCs then the
    strategy (swsa: a naive split argmax; aggregates: the strategy on a one-task context)."""
    draws = _naive_draws(parts, 3, n_resamples, seed)
    ctx = _ctx(cube)
    out = np.zeros(scores.shape[:2])
    for t in range(scores.shape[0]):
        for b in range(n_resamples):
            aurocs = np.stack([_naive_aurocs(scores[t, c], draws[t][b], 3) for c in range(scores.shape[1])])
            aurocs[np.isnan(cube.synthetic[t])] = np.nan
            if name == "swsa":
                weights = _split_argmax(aurocs[:, SOURCES.index(settings["source"])])
            else:
                one = ctx.__class__(synthetic=aurocs[None], sources=tuple(SOURCES), base_sources=tuple(SOURCES),
                                    candidates=cube.candidates, real=np.zeros((1, scores.shape[1])))
                weights = np.asarray(create_strategy(name, **settings)(one))[0]
            out[t] += weights / n_resamples
    return out


@pytest.mark.parametrize("name,settings", [("swsa", {"source": "s2"}), ("swsa_mean", {}), ("swsa_rank", {}), ("rra", {})])
def test_resample_probability_equals_naive_loop(name, settings):
    rng = np.random.default_rng(2)
    scores, parts = _score_arrays(rng)
    cube = _cube(scores, parts)
    conf = pick_confidence(_ctx(cube), scores, parts, SOURCES, [("row", name, settings)], n_resamples=9, seed=4)
    naive = _naive_frequency(cube, scores, parts, name, settings, 9, 4)
    np.testing.assert_allclose(conf.resample_frequency[0], naive, atol=1e-12)
    picks = np.stack([_split_argmax(cube.synthetic[t, :, 1]) for t in range(5)]) if name == "swsa" else conf.weights[0]
    np.testing.assert_allclose(conf.resample_probability[0], (picks * naive).sum(axis=1), atol=1e-12)
    assert conf.labels == ["row"] and conf.n_resamples == 9
    assert ((conf.resample_probability >= 0) & (conf.resample_probability <= 1)).all()


def _dominating(rng, twin=False):
    """Candidate 0 separates normals (0) from anomalies (1) on every image; the rest score every image 0.5
    (or noise); with ``twin``, candidate 1 equals candidate 0."""
    scores, parts = _score_arrays(rng, n_candidates=4)
    noise = np.round(rng.uniform(0.0, 0.3, scores.shape) * 8) / 8  # others rank anomalies below normals
    scores = np.where(parts[:, None, :] > 0, 0.2 + noise, np.where(parts[:, None, :] == 0, 0.5 + noise, np.nan))
    scores[:, 0] = np.where(parts >= 0, (parts > 0).astype(float), np.nan)
    scores[:, 3] = np.where(parts >= 0, 0.5, np.nan)
    if twin:
        scores[:, 1] = scores[:, 0]
    return scores, parts


def test_dominating_candidate_is_always_picked_again():
    scores, parts = _dominating(np.random.default_rng(3))
    cube = _cube(scores, parts)
    rows = [r for r in default_strategies(cube) if r[1] in SYNTHETIC_STRATEGIES]
    conf = pick_confidence(_ctx(cube), scores, parts, SOURCES, rows, n_resamples=50, seed=0)
    assert len(conf.labels) == 6 and conf.labels[2] == "SWSA (s3)"
    lacking = np.zeros(conf.resample_probability.shape, bool)
    lacking[2, 2] = True  # task 2 has no s3 anomalies: no pick there
    assert np.isnan(conf.resample_probability[lacking]).all()
    np.testing.assert_array_equal(conf.resample_probability[~lacking], 1.0)
    np.testing.assert_array_equal(conf.weights[:, :, 0][~lacking], 1.0)
    assert (conf.margin[~lacking] > 0).all()
    agreement = conf.source_agreement
    np.testing.assert_array_equal(agreement[~lacking], 1.0)  # every source (with anomalies) picks candidate 0
    assert np.isnan(agreement[2, 2])


def test_identical_candidates_split_by_the_tie_rule():
    scores, parts = _dominating(np.random.default_rng(4), twin=True)
    cube = _cube(scores, parts)
    conf = pick_confidence(_ctx(cube), scores, parts, SOURCES, [("SWSA (s1)", "swsa", {"source": "s1"}),
                                                                 ("mean", "swsa_mean", {})], n_resamples=20)
    np.testing.assert_allclose(conf.resample_frequency[:, :, :2], 0.5)
    np.testing.assert_allclose(conf.resample_probability, 0.5)
    np.testing.assert_allclose(conf.source_agreement, 0.5)  # each other source picks each twin half the time
    np.testing.assert_array_equal(conf.margin, 0.0)
    table = confidence_table(cube, conf)
    assert set(table["pick"]) == {"m0 | m1"}


def test_margin_and_source_agreement_equal_loops():
    rng = np.random.default_rng(7)
    scores, parts = _score_arrays(rng, n_tasks=6, n_candidates=7)
    detectors = ["knn(k=3,l2)", "pca(n=8)"] * 3 + ["knn(k=3,l2)"]
    cube = _cube(scores, parts, detectors=detectors)
    rows = [("a", "swsa", {"source": "s1"}), ("b", "swsa", {"source": "s3", "detectors": ["knn(k=3,l2)"]}),
            ("c", "swsa_mean", {}), ("d", "swsa_rank", {}), ("e", "rra", {})]
    conf = pick_confidence(_ctx(cube), scores, parts, SOURCES, rows, n_resamples=3)
    allowed = np.array([d == "knn(k=3,l2)" for d in detectors])
    for t in range(6):
        synth = cube.synthetic[t]
        per_source = {(s, restricted): _split_argmax(np.where(allowed | (not restricted), synth[:, v], np.nan))
                      for v, s in enumerate(SOURCES) for restricted in (False, True)}
        means = np.array([np.nanmean(row) if np.isfinite(row).any() else np.nan for row in synth])
        for i, (_, name, settings) in enumerate(rows):
            restricted = "detectors" in settings
            source = settings.get("source")
            crit = synth[:, SOURCES.index(source)] if name == "swsa" else means
            crit = np.where(allowed | (not restricted), crit, np.nan)
            w0 = conf.weights[i, t]
            others = [per_source[(s, restricted)] for s in SOURCES if s != source]
            others = [o for o in others if not np.isnan(o).any()]
            expected = np.mean([(w0 * o).sum() for o in others]) if others else np.nan
            np.testing.assert_allclose(conf.source_agreement[i, t], expected, atol=1e-12)
            pick = int(np.argmax(w0))
            if (w0 > 0).sum() > 1:
                assert conf.margin[i, t] == 0.0
            elif name in ("swsa_rank", "rra"):  # runner-up: the strategy's pick without the pick
                without = synth.copy()
                without[pick] = np.nan
                one = _ctx(cube).__class__(synthetic=without[None], sources=tuple(SOURCES), base_sources=tuple(SOURCES),
                                           candidates=cube.candidates, real=np.zeros((1, 7)))
                runner = np.asarray(create_strategy(name)(one))[0]
                assert conf.margin[i, t] == pytest.approx(crit[pick] - (runner * np.nan_to_num(crit)).sum())
            elif np.isnan(w0).any():  # no pick (a source the task lacks)
                assert np.isnan(conf.margin[i, t])
            else:
                rest = np.delete(crit, pick)
                assert conf.margin[i, t] == pytest.approx(crit[pick] - np.nanmax(rest))
                assert conf.margin[i, t] >= 0
    # undefined only where the pick is: SWSA on s3 in the tasks without s3 anomalies (2 and 5)
    assert np.argwhere(np.isnan(conf.source_agreement)).tolist() == [[1, 2], [1, 5]]


def test_confidence_table_regret_and_distrust_against_loops():
    rng = np.random.default_rng(9)
    scores, parts = _score_arrays(rng, n_tasks=8)
    cube = _cube(scores, parts, rng=rng)
    rows = [r for r in default_strategies(cube) if r[1] in SYNTHETIC_STRATEGIES]
    conf = pick_confidence(_ctx(cube), scores, parts, SOURCES, rows, n_resamples=11)
    table = confidence_table(cube, conf)
    assert list(table.columns) == CONFIDENCE_COLUMNS and len(table) == 8 * len(rows) * len(SETTINGS)
    for row in table.itertuples():
        t, s, i = int(row.task_id) - 10, SETTINGS.index(row.setting), conf.labels.index(row.strategy)
        real = cube.real[t, :, s]
        w = conf.weights[i, t]
        assert row.regret == pytest.approx(real.max() - (w * real).sum(), nan_ok=True)
        assert np.isnan(row.regret) == np.isnan(w).any()
        np.testing.assert_array_equal(row.pick_resample_probability, conf.resample_probability[i, t])
    distrust = distrust_table(table)
    assert len(distrust) == 2 * 3
    for row in distrust.itertuples():
        part = table[table["setting"] == row.setting]
        ok = np.isfinite(part[row.measure]) & np.isfinite(part["regret"])
        rho, p = spearmanr(part.loc[ok, row.measure], part.loc[ok, "regret"])
        assert row.n == ok.sum() and row.n_tasks == 8 and row.n_strategies == len(rows)
        assert row.spearman_rho == pytest.approx(rho, nan_ok=True) and row.p_value == pytest.approx(p, nan_ok=True)


def test_distrust_table_says_why_it_is_undefined():
    table = pd.DataFrame({"task_id": [1, 2, 3, 4], "setting": SETTINGS[0], "strategy": "a",
                          "pick_resample_probability": [1.0, 1.0, 1.0, 1.0], "pick_source_agreement": [0.5, 1, np.nan, np.nan],
                          "pick_margin": [0.1, 0.2, 0.3, 0.4], "regret": [0.0, 0.1, 0.2, 0.0]})
    out = distrust_table(table).set_index(["setting", "measure"])
    assert out.loc[(SETTINGS[0], "pick_resample_probability"), "note"] == "constant pick_resample_probability"
    assert out.loc[(SETTINGS[0], "pick_source_agreement"), "note"] == "fewer than 3 picks with both values"
    assert np.isfinite(out.loc[(SETTINGS[0], "pick_margin"), "spearman_rho"])
    assert out.loc[(SETTINGS[1], "pick_margin"), "n"] == 0


def test_self_validated_cells_stay_out_and_hard_sources_are_skipped():
    rng = np.random.default_rng(11)
    scores, parts = _score_arrays(rng)
    cube = _cube(scores, parts)
    cube.synthetic[:, 0, 1] = np.nan  # the cube left candidate 0 out on s2 (self-validation)
    conf = pick_confidence(_ctx(cube), scores, parts, SOURCES,
                           [("s2", "swsa", {"source": "s2"}), ("hard", "swsa", {"source": "s2@hard10"}),
                            ("largest", "largest", {})], n_resamples=5)
    assert conf.labels == ["s2"] and "no per-image scores" in conf.skipped["hard"]
    assert (conf.weights[0, :, 0] == 0).all() and (conf.resample_frequency[0, :, 0] == 0).all()
    assert DEFAULT_RESAMPLES == 200


def test_error_texts():
    rng = np.random.default_rng(12)
    scores, parts = _score_arrays(rng)
    cube = _cube(scores, parts)
    rows = [("a", "swsa", {"source": "s1"})]
    with pytest.raises(ValueError, match=r"sources \['s1', 's3', 's2'\] differ from the cube's base sources"):
        pick_confidence(_ctx(cube), scores, parts, ["s1", "s3", "s2"], rows)
    shifted = scores.copy()
    shifted[0, 1, np.flatnonzero(parts[0] == 1)[0]] += 5.0
    with pytest.raises(ValueError, match="do not reproduce the cube's synthetic AUROCs .* re-run `swsa score`"):
        pick_confidence(_ctx(cube), shifted, parts, SOURCES, rows)
    with pytest.raises(ValueError, match=r"synthetic_scores has \(5, 5\) \(tasks, candidates\), the cube \(5, 6\)"):
        pick_confidence(_ctx(cube), scores[:, :5], parts, SOURCES, rows)
    with pytest.raises(ValueError, match=r"synthetic_part values must lie in \[-1, 3\]"):
        resample_positions(np.where(parts == 3, 4, parts), 3)
    with pytest.raises(ValueError, match="n_resamples"):
        resample_positions(parts, 3, n_resamples=0)
    with pytest.raises(ValueError, match="at least one synthetic source"):
        pick_confidence(_ctx(cube), scores, parts, [], rows)


def _with_scores(cube, scores, parts):
    from swsa_engine.core.score_cube import ScoreCube

    n_tasks = len(cube.tasks)
    cube.scores = ScoreCube(
        task_ids=cube.tasks["task_id"].to_numpy(), candidates=cube.candidate_names, sources=SOURCES,
        real_ids=np.full((n_tasks, 1), -1), real_label=np.full((n_tasks, 1), -1, dtype=np.int8),
        real_in_rest=np.zeros((n_tasks, 1), bool), real_group=np.full((n_tasks, 1), -1),
        group_names=np.full((n_tasks, 1), "", dtype=object), real_scores=np.full((n_tasks, scores.shape[1], 1), np.nan),
        synthetic_ids=np.where(parts >= 0, np.arange(parts.shape[1]), -1), synthetic_part=parts,
        synthetic_scores=scores)
    return cube


def test_report_shows_confidence_beside_picks_and_the_distrust_section(tmp_path):
    from swsa_engine.report.confidence import NO_SCORES
    from swsa_engine.report.summary import write_report

    rng = np.random.default_rng(13)
    scores, parts = _score_arrays(rng, n_tasks=6)
    cube = _cube(scores, parts, rng=rng)
    paths = write_report(cube, tmp_path / "none")
    text = paths["report"].read_text()
    assert "## When to distrust a pick" in text and NO_SCORES + "." in text and "pick_confidence_csv" not in paths
    assert pd.read_csv(paths["tasks_csv"])["pick_resample_probability"].isna().all()

    paths = write_report(_with_scores(cube, scores, parts), tmp_path / "with")
    text = paths["report"].read_text()
    conf = pd.read_csv(paths["pick_confidence_csv"])
    assert list(conf.columns) == CONFIDENCE_COLUMNS and NO_SCORES not in text
    n = int(conf[conf["setting"] == SETTINGS[0]][["pick_resample_probability", "regret"]].notna().all(axis=1).sum())
    assert f"| {SETTINGS[0]} | pick_resample_probability | {n} | 6 |" in text
    tasks = pd.read_csv(paths["tasks_csv"])
    direct = pick_confidence(_ctx(cube), scores, parts, SOURCES, [("s1", "swsa", {"source": "s1"})])
    names = cube.candidate_names
    for row in tasks.itertuples():
        t, c = int(row.task_id) - 10, names.index(row.swsa_pick)
        assert row.pick_resample_probability == pytest.approx(direct.resample_frequency[0, t, c], nan_ok=True)
        assert row.pick_margin == pytest.approx(direct.margin[0, t], nan_ok=True)

    cube.scores.synthetic_scores = scores + 1.0 * (parts[:, None, :] == 1)  # scores of another run
    text = write_report(cube, tmp_path / "other")["report"].read_text()
    assert "pick confidence: the per-image scores do not reproduce the cube's synthetic AUROCs" in text


def test_html_drill_down_carries_each_picks_confidence(tmp_path):
    import json
    import re

    from swsa_engine.report.html import write_html_report
    from swsa_engine.report.summary import write_report

    rng = np.random.default_rng(14)
    scores, parts = _score_arrays(rng, n_tasks=3)
    cube = _with_scores(_cube(scores, parts, rng=rng), scores, parts)
    paths = write_report(cube, tmp_path / "r")
    page = write_html_report(cube, None, tmp_path / "r" / "report.html", report_dir=tmp_path / "r").read_text()
    payload = json.loads(re.search(r'<script type="application/json" id="task-11">(.*?)</script>', page, re.S).group(1))
    table = pd.read_csv(paths["pick_confidence_csv"])
    rows = table[table["task_id"] == 11]
    assert [c["strategy"] for c in payload["confidence"]] == list(dict.fromkeys(rows["strategy"]))
    first = rows.iloc[0]
    entry = payload["confidence"][0]
    assert entry["resample"] == f"{first['pick_resample_probability']:.3f}" and entry["pick"] == first["pick"]
    assert set(entry["regret"]) == set(SETTINGS)
    tasks = pd.read_csv(paths["tasks_csv"])
    assert payload["picks"][0]["resample"] == f"{tasks[tasks['task_id'] == 11]['pick_resample_probability'].iloc[0]:.3f}"
    assert "How much to trust each pick" in page


def test_tasks_csv_leaves_confidence_out_for_a_pick_the_strategy_does_not_make():
    from swsa_engine.report.confidence import picks_with_confidence, report_confidence

    rng = np.random.default_rng(15)
    scores, parts = _score_arrays(rng, n_tasks=4)
    cube = _with_scores(_cube(scores, parts, rng=rng), scores, parts)
    result = report_confidence(cube)
    i = result.confidence.labels.index("SWSA (s1)")
    made = [f"m{int(np.argmax(result.confidence.weights[i, t]))}" for t in (0, 1)]
    other = [f"m{(int(m[1:]) + 1) % 6}" for m in made]
    picks = pd.DataFrame({"task_id": [10, 11], "source": "s1", "swsa_pick": [made[0], other[1]]})
    out = picks_with_confidence(picks, cube, result)
    c = int(made[0][1:])
    assert out["pick_resample_probability"].iloc[0] == result.confidence.resample_frequency[i, 0, c]
    assert out["pick_margin"].iloc[0] == result.confidence.margin[i, 0]
    assert out.iloc[1][["pick_resample_probability", "pick_source_agreement", "pick_margin"]].isna().all()
