"""The ensembles pass a few tasks at a time (issue 23): the same results whatever the chunking,
the AUROCs score_aurocs gives (every column, bit for bit), and no temporary of the score cube's size."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pandas as pd
import pytest

import swsa_engine.core.ensemble_pass as ensemble_pass
import swsa_engine.core.ensembles as ensembles
from swsa_engine.core.ensemble_pass import ensemble_candidates
from swsa_engine.core.score_cube import ScoreCube, score_aurocs

from test_ensemble_candidates import HARDEST, _score_cube


def _ragged(seed):
    """The candidates test's score cube with more holes: a few more members lose their synthetic
    scores on a task, so tasks fall into several member sets."""
    scores, candidates = _score_cube(seed)
    rng = np.random.default_rng(seed)
    for _ in range(2):
        t, c = rng.integers(0, 4), rng.integers(0, 5)
        scores.synthetic_scores[t, c, rng.choice(np.flatnonzero(scores.synthetic_part[t] >= 0), 2)] = np.nan
    return scores, candidates


def _outcome(result):
    return (result.real, result.per_class, result.synthetic, result.scores.real_scores, result.scores.synthetic_scores,
            result.skips, json.dumps(result.config))


@pytest.mark.parametrize("seed", [3, 4, 5])
@pytest.mark.parametrize("normalisation", ["rank", "zscore"])
def test_chunking_changes_nothing(monkeypatch, seed, normalisation):
    scores, candidates = _ragged(seed)
    selection = {"steps": 6, "bags": 4}
    whole = _outcome(ensemble_candidates(scores, candidates, hardest=HARDEST, normalisation=normalisation,
                                         selection=selection))
    monkeypatch.setattr(ensemble_pass, "COMBINE_CHUNK", 1)  # one task at a time
    monkeypatch.setattr(ensembles, "GREEDY_CHUNK", 1)  # one task per greedy batch
    one_by_one = _outcome(ensemble_candidates(scores, candidates, hardest=HARDEST, normalisation=normalisation,
                                              selection=selection))
    for a, b in zip(whole[:5], one_by_one[:5]):
        np.testing.assert_array_equal(a, b)
    assert whole[5] == one_by_one[5] and whole[6] == one_by_one[6]  # skips; config, in the same order


@pytest.mark.parametrize("seed", [3, 6])
def test_every_auroc_is_what_score_aurocs_gives(seed):
    scores, candidates = _ragged(seed)
    # a normal left out of the one-vs-rest AUROC, and a task whose anomalies are all of one class
    scores.real_in_rest[0, np.flatnonzero(scores.real_label[0] == 0)[0]] = False
    scores.real_group[1] = np.where(scores.real_label[1] == 1, 0, -1)
    result = ensemble_candidates(scores, candidates, hardest=HARDEST)
    n_single = len(candidates)
    again = score_aurocs(result.scores, HARDEST, candidates=np.arange(n_single, len(result.scores.candidates)))
    for key in ("real", "per_class", "synthetic"):
        np.testing.assert_array_equal(again[key], getattr(result, key), err_msg=key)


def _large_cube(n_tasks=24, n_real=3000, width=400, seed=0):
    """A score cube big enough that a (T, C, Q) float64 temporary would show in the peak memory:
    24 tasks × 6 candidates (3 backbones × 2 detectors) × 3 400 images."""
    rng = np.random.default_rng(seed)
    real_label = np.where(rng.random((n_tasks, n_real)) < 0.3, 1, 0).astype(np.int8)
    real_label[:, -200:] = -1  # padding
    part = rng.integers(0, 4, size=(n_tasks, width)).astype(np.int8)
    part[:, -50:] = -1
    real = np.where(real_label[:, None] >= 0, rng.normal(size=(n_tasks, 6, n_real)) + real_label[:, None], np.nan)
    synth = np.where(part[:, None] >= 0, rng.normal(size=(n_tasks, 6, width)) + (part[:, None] > 0), np.nan)
    names = [f"f{b}/d{d}" for b in (1, 2, 3) for d in (1, 2)]
    real_ids = np.where(real_label >= 0, 1, -1) * np.arange(n_real)
    groups = np.where(real_label == 1, rng.integers(0, 4, real_label.shape), -1)
    scores = ScoreCube(np.arange(n_tasks), names, ["s1", "s2", "s3"], real_ids, real_label, real_label >= 0, groups,
                       np.array([["g0", "g1", "g2", "g3"]] * n_tasks, dtype=object), real,
                       np.where(part >= 0, np.arange(width), -1), part, synth)
    candidates = pd.DataFrame({"name": names, "feature": [f"f{b}" for b in (1, 2, 3) for _ in (1, 2)],
                               "detector": ["d1", "d2"] * 3, "n_params": 1, "feature_dim": 4,
                               "weights_kind": "pretrained", "family": "x"})
    return scores, candidates


def test_peak_memory_holds_no_score_cube_sized_temporary(monkeypatch):
    scores, candidates = _large_cube()
    monkeypatch.setattr(ensemble_pass, "COMBINE_CHUNK", 2 * 6 * 3000)  # two of the 24 tasks at a time
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        result = ensemble_candidates(scores, candidates, hardest=HARDEST, selection={"steps": 2, "bags": 2})
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    # the result (the score cube with the ensembles appended) must be made; beyond it, a few tasks'
    # worth of temporaries, less than one more copy of the singles' scores (the pass used to make
    # many: normalised copies, member gathers, stacked outputs; 86 MB here, 8 times the result)
    result_bytes = result.scores.nbytes
    assert peak < result_bytes + scores.nbytes, (peak / 2**20, result_bytes / 2**20, scores.nbytes / 2**20)
