"""The validation protocols (leak-free / paper) and the self-validation rule, against naive loops."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from swsa_engine.app.bench_store import make_paper_store
from swsa_engine.app.cli import main
from swsa_engine.core.cube import AurocCube
from swsa_engine.core.protocol import (LEAK_FREE, PAPER, check_protocol, cube_protocol, origin_positions, protocol_line,
                                       query_origins, shares_parents)
from swsa_engine.report.summary import write_report
from swsa_engine.run.cube_io import load_cube, save_cube
from swsa_engine.run.sweep import run_sweep
from swsa_engine.run.task_groups import build_task_groups
from swsa_store import edit_store, open_store
from swsa_store.references import read_references, split_references
from swsa_store.tasks import ROLE_HELDOUT, ROLE_SEED

# --------------------------------------------------------------------------- pure functions


def _naive_positions(support, origins):
    out = np.full(origins.shape, -1, dtype=np.int64)
    for t in range(origins.shape[0]):
        for w in range(origins.shape[1]):
            found = []
            for origin in origins[t, w]:
                if origin < 0:
                    continue
                where = [s for s in range(support.shape[1]) if support[t, s] == origin]
                if where and where[0] not in found:
                    found.append(where[0])
            out[t, w, : len(found)] = found
    return out


def test_origin_positions_equals_a_naive_loop_with_ties_and_padding():
    rng = np.random.default_rng(3)
    for _ in range(20):
        n_tasks, n_slots, width, depth = rng.integers(1, 5), rng.integers(1, 9), rng.integers(0, 7), rng.integers(1, 4)
        support = np.full((n_tasks, n_slots), -1)
        for t in range(n_tasks):
            n = rng.integers(0, n_slots + 1)
            support[t, :n] = rng.choice(30, size=n, replace=False)
            rng.shuffle(support[t])  # padding anywhere, ids unsorted
        # origins drawn from a small pool: repeated ids within a query (ties), ids not in the bank, -1
        origins = rng.integers(-1, 12, size=(n_tasks, width, depth))
        np.testing.assert_array_equal(origin_positions(support, origins), _naive_positions(support, origins))
    with pytest.raises(ValueError, match=r"origins must be \(T, W, E\) with T = 2 tasks, got shape \(3, 1, 1\)"):
        origin_positions(np.zeros((2, 3), int), np.zeros((3, 1, 1), int))


def test_query_origins_held_out_themselves_anomalies_their_parents():
    queries = np.array([[4, 7, 20, 21, -1, 30], [5, -1, 22, -1, -1, 31]])
    widths = [2, 3, 1]
    parents_a = np.array([[[4, -1], [7, 9], [1, -1]], [[5, 2], [-1, -1], [-1, -1]]])  # (T, 3, 2)
    parents_b = np.zeros((2, 1, 0), dtype=int)  # no parents recorded (e.g. auxiliary images)
    leak_free = query_origins(queries, widths, [parents_a, parents_b], LEAK_FREE)
    assert leak_free.shape == (2, 6, 2)
    assert leak_free[:, :, 0].tolist() == [[4, 7, 4, 7, -1, -1], [5, -1, 5, -1, -1, -1]]
    assert leak_free[0, 3].tolist() == [7, 9] and leak_free[1, 3].tolist() == [-1, -1]  # padding query: none
    paper = query_origins(queries, widths, [parents_a, parents_b], PAPER)
    assert paper.shape == (2, 6, 1) and paper[:, :, 0].tolist() == [[4, 7, -1, -1, -1, -1], [5, -1, -1, -1, -1, -1]]
    with pytest.raises(ValueError, match="one parents array per source: 2 sources, 1 arrays"):
        query_origins(queries, widths, [parents_a], LEAK_FREE)
    with pytest.raises(ValueError, match="unknown validation protocol 'nope'; use one of leak-free, paper"):
        check_protocol("nope")
    assert cube_protocol({}) == PAPER and cube_protocol({"protocol": LEAK_FREE}) == LEAK_FREE
    assert protocol_line({}).startswith("Validation protocol: paper (")


def test_shares_parents_equals_a_naive_loop():
    rng = np.random.default_rng(5)
    parents = rng.integers(-1, 8, size=(4, 6, 2))
    references = rng.integers(-1, 8, size=(4, 3, 1))
    expected = [[any(p >= 0 and p in set(references[t].ravel()) for p in parents[t, w]) for w in range(6)] for t in range(4)]
    assert shares_parents(parents, references).tolist() == expected
    assert not shares_parents(parents, np.zeros((4, 0, 1), int)).any()


# --------------------------------------------------------------------------- a small store with parents


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A paper-shaped store whose anomalies sit next to their parents (every fourth one an exact
    copy of it, distance 0): cutpaste and tinyimagenet have one seed parent, diffusion two."""
    path = tmp_path_factory.mktemp("protocol") / "s.h5"
    make_paper_store(path, task_fraction=0.03, image_fraction=0.25, synthetic=16, backbones={"resnet18": (48, 11)},
                     progress=False)
    rng = np.random.default_rng(0)
    with edit_store(path) as s:
        images, members = s.images(), s.task_members()
        dataset = s.file["embeddings"]["resnet18"]["features"]
        features = dataset[...].astype(np.float64)
        seeds = members[members["role"] == ROLE_SEED].groupby("task_id")["image_id"].apply(np.asarray)
        parents = []
        for row in images.itertuples():
            if row.kind == "real":
                parents.append("[]")
                continue
            chosen = rng.choice(seeds[row.task_id], size=2 if row.kind == "diffusion" else 1, replace=False)
            parents.append(json.dumps([int(c) for c in chosen]))
            near = features[chosen[0]].copy()
            if row.image_id % 4:
                near[rng.integers(0, near.size, size=2)] += rng.uniform(0.5, 1.5, size=2)  # a small edit of its parent
            features[row.image_id] = near
        images["parent_ids"] = parents
        s.replace_table("images", images)
        dataset[...] = features.astype(np.float32)
    return path


def _naive_sweep(path, protocol, name="resnet18", k=3, hardest=(10, 5)):
    """{task_id: {source: AUROC}} by brute force: every query scored against its task's bank minus
    its origins (held-out: itself; leak-free anomalies: their parents), sklearn's AUROC."""
    with open_store(path) as s:
        images, members, feats = s.images(), s.task_members(), s.embeddings(name).astype(np.float64)
        refs = read_references(s)
    out = {}
    for task_id, mine in members.groupby("task_id"):
        role = lambda r: np.sort(mine.loc[mine["role"] == r, "image_id"].to_numpy())
        support = np.union1d(role(ROLE_SEED), role(ROLE_HELDOUT))
        held_out = set() if refs is None else set(refs.loc[refs["task_id"] == task_id, "image_id"])

        def score(image_id, origins):
            bank = feats[[i for i in support if i not in origins]]
            return float(np.sort(((bank - feats[image_id]) ** 2).sum(axis=1))[:k].sum())

        normals = [score(i, {i}) for i in role(ROLE_HELDOUT)]
        ok = images[(images["task_id"] == task_id) & (images["kind"] != "real") & ~images["image_id"].isin(held_out)]
        out[task_id] = {}
        for source, rows in ok.groupby("kind"):
            anomalies = [score(i, set(json.loads(p)) if protocol == LEAK_FREE else set())
                         for i, p in zip(rows["image_id"], rows["parent_ids"])]
            labels = np.r_[np.zeros(len(normals)), np.ones(len(anomalies))]
            out[task_id][source] = roc_auc_score(labels, normals + anomalies)
            for n in hardest:
                hard = sorted(anomalies)[:n]
                out[task_id][f"{source}@hard{n}"] = roc_auc_score(np.r_[np.zeros(len(normals)), np.ones(len(hard))],
                                                                  normals + hard)
    return out


def _assert_cube_equals(cube, expected, column=0):
    checked = 0
    for t, task_id in enumerate(cube.tasks["task_id"]):
        for source, value in expected[task_id].items():
            assert cube.synthetic[t, column, cube.sources.index(source)] == pytest.approx(value, abs=1e-12), (task_id, source)
            checked += 1
    return checked


def test_leak_free_knn_equals_a_naive_loop_and_paper_equals_the_old_protocol(store):
    leak_free = run_sweep(store, progress=False, save=False)
    paper = run_sweep(store, progress=False, save=False, protocol=PAPER)
    assert leak_free.config["protocol"] == LEAK_FREE and paper.config["protocol"] == PAPER
    assert _assert_cube_equals(leak_free, _naive_sweep(store, LEAK_FREE)) >= 90
    assert _assert_cube_equals(paper, _naive_sweep(store, PAPER)) >= 90
    np.testing.assert_array_equal(leak_free.real, paper.real)  # real queries: nothing left out either way
    # the anomalies are small edits of their parents: with the parent in the bank they look normal
    base = [leak_free.sources.index(s) for s in ("cutpaste", "diffusion", "tinyimagenet")]
    assert np.nanmean(leak_free.synthetic[:, 0, base]) > np.nanmean(paper.synthetic[:, 0, base]) + 0.2
    # without parent ids (an older catalog) both protocols are today's: held-out normals leave-one-out
    with open_store(store) as s:
        images, tasks, members = s.images(), s.tasks(), s.task_members()
    unknown = build_task_groups(images.drop(columns="parent_ids"), tasks, members)
    assert all(p.shape[2] == 0 for g in unknown for p in g.synthetic_parents.values())
    known = build_task_groups(images, tasks, members)
    assert known[0].synthetic_parents["diffusion"].shape[2] == 2


def test_a_detector_that_leaves_out_one_row_skips_sources_with_two_parents(store):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cube = run_sweep(store, progress=False, save=False, detectors=["mahalanobis"])
        paper = run_sweep(store, progress=False, save=False, detectors=["mahalanobis"], protocol=PAPER)
    diffusion = [i for i, s in enumerate(cube.sources) if s.startswith("diffusion")]
    others = [i for i, s in enumerate(cube.sources) if not s.startswith("diffusion")]
    scored = ~np.isnan(cube.real[:, 0, 0])
    assert scored.sum() >= 5
    assert np.isnan(cube.synthetic[scored][:, 0, diffusion]).all()  # never scored with a parent back in the bank
    assert np.isfinite(cube.synthetic[scored][:, 0, others]).all()
    assert np.isfinite(paper.synthetic[scored][:, 0, diffusion]).all()
    reasons = cube.skips["reason"]
    assert reasons.str.contains(r"mahalanobis.* can score a query without at most 1 bank image\(s\); diffusion anomalies "
                                r"are made from up to 2 of them, so the leak-free protocol leaves this source out").sum() \
        == scored.sum()


def test_self_validation_is_left_out_marked_and_kept_on_request(store, tmp_path):
    path = tmp_path / "s.h5"
    path.write_bytes(store.read_bytes())
    split_references(path, "cutpaste", 0.3, seed=1)
    detectors = ["knn", "nagl(k=2,beta=0.5)"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cube = run_sweep(path, progress=False, save=True, detectors=detectors)
        kept = run_sweep(path, progress=False, save=False, detectors=detectors, allow_self_validation=True)
    nagl = cube.candidate_names.index("resnet18/nagl(k=2,beta=0.5)")
    scored = ~np.isnan(cube.real[:, nagl, 0])
    cut = [i for i, s in enumerate(cube.sources) if s.startswith("cutpaste")]
    assert scored.sum() >= 5 and len(cut) == 3
    assert np.isnan(cube.synthetic[scored][:, nagl, cut]).all() and cube.self_validated[scored][:, nagl, cut].all()
    assert np.isfinite(kept.synthetic[scored][:, nagl, cut]).all() and not kept.self_validated.any()
    assert not cube.self_validated[:, 0].any()  # kNN keeps no references: never self-validation
    np.testing.assert_array_equal(cube.synthetic[:, 0], kept.synthetic[:, 0])
    reasons = cube.skips.loc[cube.skips["candidate"] == "resnet18/nagl(k=2,beta=0.5)", "reason"]
    assert reasons.str.contains("takes its abnormal references from cutpaste; validating it on cutpaste too would be "
                                "self-validation, so that cell is left out; `--allow-self-validation` keeps them").sum() \
        == scored.sum()
    # tinyimagenet anomalies made from a reference's parent are left out, the others validate nagl
    tiny = cube.sources.index("tinyimagenet")
    expected = _naive_nagl(path, "tinyimagenet")
    for t, task_id in enumerate(cube.tasks["task_id"]):
        if not scored[t]:
            continue
        value, left_out = expected[task_id]
        if np.isnan(value):
            assert np.isnan(cube.synthetic[t, nagl, tiny]) and cube.self_validated[t, nagl, tiny]
        else:
            assert cube.synthetic[t, nagl, tiny] == pytest.approx(value, abs=1e-12) and not cube.self_validated[t, nagl, tiny]
        if left_out:
            assert reasons.str.contains(f"{left_out} of the task's 16 tinyimagenet anomalies share parents").any()
    # saved and loaded with the cube; a cube without the array reads as all False
    loaded = load_cube(path)
    np.testing.assert_array_equal(loaded.self_validated, cube.self_validated)
    arrays, attrs = cube.to_arrays()
    del arrays["self_validated"]
    assert not AurocCube.from_arrays(arrays, attrs).self_validated.any()


def _naive_nagl(path, source, k=2, beta=0.5):
    """{task_id: (leak-free NAGL AUROC of ``source`` without the anomalies sharing parents with
    the references (NaN if none is left), how many were left out)}."""
    with open_store(path) as s:
        images, members, feats = s.images(), s.task_members(), s.embeddings("resnet18").astype(np.float64)
        refs = read_references(s)
    knn = lambda x, rows: float(np.sort(((rows - x) ** 2).sum(axis=1))[:k].sum())
    parents = {int(i): set(json.loads(p)) for i, p in zip(images["image_id"], images["parent_ids"])}
    out = {}
    for task_id, mine in members.groupby("task_id"):
        support = np.unique(mine.loc[mine["role"].isin([ROLE_SEED, ROLE_HELDOUT]), "image_id"].to_numpy())
        abnormal = np.sort(refs.loc[refs["task_id"] == task_id, "image_id"].to_numpy())
        used = set().union(*[parents[int(a)] for a in abnormal]) if len(abnormal) else set()
        score = lambda i, origins: knn(feats[i], feats[[j for j in support if j not in origins]]) - beta * knn(feats[i], feats[abnormal])
        normals = [score(i, {i}) for i in mine.loc[mine["role"] == ROLE_HELDOUT, "image_id"]]
        mine_synth = images[(images["task_id"] == task_id) & (images["kind"] == source)]["image_id"].tolist()
        clean = [i for i in mine_synth if not parents[i] & used]
        anomalies = [score(i, parents[i]) for i in clean]
        value = roc_auc_score(np.r_[np.zeros(len(normals)), np.ones(len(anomalies))], normals + anomalies) if anomalies else np.nan
        out[task_id] = (value, len(mine_synth) - len(clean))
    return out


def test_protocol_is_stored_shown_and_chosen_on_the_command_line(store, tmp_path, capsys):
    path = tmp_path / "s.h5"
    path.write_bytes(store.read_bytes())
    assert main(["score", "--store", str(path), "--protocol", "paper", "--quiet"]) == 0
    assert "paper" in capsys.readouterr().out
    assert load_cube(path).protocol == PAPER
    assert main(["score", "--store", str(path), "--quiet"]) == 0
    cube = load_cube(path)
    assert cube.protocol == LEAK_FREE and cube.config["protocol"] == LEAK_FREE
    with pytest.raises(SystemExit):
        main(["score", "--store", str(path), "--protocol", "loo", "--quiet"])
    assert "invalid choice: 'loo'" in capsys.readouterr().err
    paths = write_report(cube, tmp_path / "report")
    assert "Validation protocol: leak-free (each validation query is scored without its origins" in \
        paths["report"].read_text(encoding="utf-8")
    old = AurocCube(cube.tasks, cube.candidates, cube.sources, cube.real, cube.synthetic, cube.per_class, cube.class_names,
                    config={k: v for k, v in cube.config.items() if k != "protocol"})
    assert old.protocol == PAPER
    save_cube(old, path)
    assert load_cube(path).protocol == PAPER
    with pytest.raises(ValueError, match="unknown validation protocol 'loo'"):
        run_sweep(path, progress=False, save=False, protocol="loo")
    assert isinstance(cube.skips, pd.DataFrame)
