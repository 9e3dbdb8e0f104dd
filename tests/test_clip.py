"""CLIP prompts and BLISS: text store, prompt ensemble, two-prompt score, BLISS against a
per-image reference of its equations, the dictionary, and the prompt / BLISS cubes on a tiny
store embedded with a tiny randomly initialised open_clip model."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from swsa_engine.core.clip_scores import (
    bliss_score, l2_normalize, prompt_ensemble, two_prompt_logit, two_prompt_score,
)
from swsa_store.models.clip import (
    PAPER_TEMPLATES, bliss_dictionary, load_prompt_file, paper_prompt_set, register_clip_architecture,
    task_prompt_table,
)

TINY = "swsa-tiny-test"
TINY_CFG = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
register_clip_architecture(TINY, TINY_CFG, overwrite=True)
MODEL = f"clip/{TINY}"


# ---------------------------------------------------------------------------- pure maths


def test_prompt_ensemble_is_renormalised_mean_of_unit_vectors():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(3, 10, 8)) * rng.uniform(0.5, 3, size=(3, 10, 1))
    got = prompt_ensemble(e)
    for t in range(3):
        mean = np.mean([v / np.linalg.norm(v) for v in e[t]], axis=0)
        np.testing.assert_allclose(got[t], mean / np.linalg.norm(mean), atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0)


def test_two_prompt_score_matches_per_image_softmax():
    rng = np.random.default_rng(1)
    images, tn, ta = rng.normal(size=(7, 5)), rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    got = two_prompt_score(images, tn, ta, logit_scale=14.3)  # (4, 7): texts' leading axis, shared images
    logit = two_prompt_logit(images, tn, ta, logit_scale=14.3)
    assert got.shape == (4, 7)
    for t in range(4):
        for q in range(7):
            cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)
            pair = 14.3 * np.array([cos(images[q], tn[t]), cos(images[q], ta[t])])
            p = np.exp(pair - pair.max())
            assert got[t, q] == pytest.approx(p[1] / p.sum(), abs=1e-12)
            assert logit[t, q] == pytest.approx(pair[1] - pair[0], abs=1e-12)
    # per-task images (T, Q, D) broadcast the same way
    per_task = two_prompt_score(np.broadcast_to(images, (4, 7, 5)), tn, ta, 14.3)
    np.testing.assert_allclose(per_task, got, atol=1e-12)


def _bliss_reference(z, classes, supports, dictionary, k, lam, eps=1e-6, ddof=0):
    """The BLISS equations, one image and one class at a time."""
    unit = lambda v: v / np.linalg.norm(v)
    d_unit = [unit(d) for d in dictionary]
    per_class = []
    for c, support in zip(classes, supports):
        c = unit(c)
        s_sims = np.array([unit(s) @ c for s in support])
        ic = -(unit(z) @ c - s_sims.mean()) / (s_sims.std(ddof=ddof) + eps)
        sims = np.array([unit(z) @ d for d in d_unit])
        top = np.argsort(-sims)[:k]
        terms = []
        for j in top:
            sd = np.array([unit(s) @ d_unit[j] for s in support])
            terms.append((sims[j] - sd.mean()) / (sd.std(ddof=ddof) + eps))
        per_class.append(ic + lam * np.mean(terms))
    return min(per_class)


@pytest.mark.parametrize("n_classes", [1, 3])
def test_bliss_matches_per_image_reference(n_classes):
    rng = np.random.default_rng(2 + n_classes)
    n_tasks, n_queries, n_support, dim, m = 2, 6, 5, 8, 30
    queries = rng.normal(size=(n_tasks, n_queries, dim))
    classes = rng.normal(size=(n_tasks, n_classes, dim))
    support = rng.normal(size=(n_tasks, n_classes, n_support, dim))
    mask = np.ones((n_tasks, n_classes, n_support), bool)
    mask[1, 0, 3:] = False  # ragged support
    dictionary = rng.normal(size=(m, dim))
    out = bliss_score(queries, classes, support, dictionary, support_mask=mask, k=(1, 4), lam=(0.5, 2.0))
    assert out["score"].shape == (2, 2, n_tasks, n_queries)
    for li, lam in enumerate((0.5, 2.0)):
        for ki, k in enumerate((1, 4)):
            for t in range(n_tasks):
                sup = [support[t, c][mask[t, c]] for c in range(n_classes)]
                for q in range(n_queries):
                    ref = _bliss_reference(queries[t, q], classes[t], sup, dictionary, k, lam)
                    assert out["score"][li, ki, t, q] == pytest.approx(ref, rel=1e-9, abs=1e-9)
    # scalar k / lam give (B, Q); shared queries broadcast
    single = bliss_score(queries[0], classes, support, dictionary, support_mask=mask, k=4, lam=0.5)
    assert single["score"].shape == (n_tasks, n_queries)
    np.testing.assert_allclose(single["score"][0], out["score"][0, 1, 0], rtol=1e-9)


def test_bliss_leave_one_out_equals_reference_without_that_image():
    rng = np.random.default_rng(9)
    dim, n_support, m = 6, 7, 20
    support = rng.normal(size=(1, 1, n_support, dim))
    classes, dictionary = rng.normal(size=(1, 1, dim)), rng.normal(size=(m, dim))
    queries = support[0, 0][None, [2, 5]]  # two support images queried leave-one-out
    exclude = np.array([[[2, 5]]])
    out = bliss_score(queries, classes, support, dictionary, k=3, lam=0.75, exclude=exclude)
    for i, pos in enumerate((2, 5)):
        rest = np.delete(support[0, 0], pos, axis=0)
        ref = _bliss_reference(support[0, 0, pos], classes[0], [rest], dictionary, 3, 0.75)
        assert out["score"][0, i] == pytest.approx(ref, rel=1e-9)


# ---------------------------------------------------------------------------- prompts, dictionary


def test_bliss_dictionary_splits_at_commas():
    entries = bliss_dictionary(unique=False, template=None)
    assert len(entries) == 1860
    assert "goldfish" in entries and "Carassius auratus" in entries
    assert all("," not in e and e == e.strip() for e in entries)
    unique = bliss_dictionary()
    assert len(unique) == len(set(entries)) == 1842
    assert unique[2] == "This is a photo of a goldfish"


def test_paper_prompt_sets_and_task_table(tmp_path):
    ps = paper_prompt_set()
    assert ps.n_templates == 10
    assert PAPER_TEMPLATES["cub"][0] == ("a photo of a {} bird", "a photo of some bird")
    assert PAPER_TEMPLATES["flowers"][8] == ("a photo of a small {} flower", "a photo of a small some flower")
    assert PAPER_TEMPLATES["industrial"][3] == ("a photo of a {} for inspection", "a photo of a {} with defect for inspection")
    tasks = pd.DataFrame({"task_id": [0, 1], "dataset": ["cub", "mvtec"], "normal_class": ["001.Black_footed_Albatross", "pcb1"],
                          "class_label": ["black footed albatross", "printed circuit board"], "protocol": ["multiclass", "defect"]})
    table = task_prompt_table(tasks, ps)
    assert len(table) == 2 * 10 * 2
    first = table[(table["template"] == 0)].sort_values(["task_id", "side"])["text"].tolist()
    assert first == ["a photo of a black footed albatross bird", "a photo of some bird",
                     "a photo of a printed circuit board", "a photo of a printed circuit board with defect"]
    f = tmp_path / "mine.toml"
    f.write_text('name = "mine"\n[templates]\n"*" = [["a {}", "a broken {}"], ["an image of a {}", "odd {}"]]\n')
    mine = load_prompt_file(f)
    assert mine.name == "mine" and mine.n_templates == 2
    j = tmp_path / "bad.json"
    j.write_text(json.dumps({"templates": {"*": [["a {}", "b"]], "x": [["a", "b"], ["c", "d"]]}}))
    with pytest.raises(ValueError, match="same length"):
        load_prompt_file(j)


# ---------------------------------------------------------------------------- tiny store


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    from swsa_store.catalog import catalog_dataset
    from swsa_store.models.clip import embed_text_store
    from swsa_store.ingest import embed_store
    from swsa_store.synthesize import synthesize

    root = tmp_path_factory.mktemp("clip")
    store = root / "s.h5"
    catalog_dataset(store, "digits", image_dir=root / "digits", image_size=16, n_seed=4)
    synthesize(store, "cutpaste", count=6, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        embed_store(store, MODEL, weights="random", progress=False, batch_size=256)
        summary = embed_text_store(store, MODEL, weights="random")
    return store, summary


def test_text_store_round_trip(tiny_store):
    from swsa_store import open_store

    store, summary = tiny_store
    name = MODEL.replace("/", "-")
    with open_store(store) as s:
        assert s.text_models() == [name]
        assert s.text_sets(name) == ["bliss", "dictionary", "paper"]
        paper = s.text_embeddings(name, "paper")
        tasks = s.tasks()
        dictionary = s.text_embeddings(name, "dictionary")
    assert len(dictionary.strings) == 1842 and dictionary.embeddings.shape == (1842, 16)
    np.testing.assert_allclose(np.linalg.norm(paper.embeddings, axis=1), 1.0, atol=1e-5)
    assert paper.attrs["model"] == MODEL and paper.attrs["weights_kind"] == "random"
    assert paper.attrs["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-5)
    assert "L2" in paper.attrs["normalisation"]
    table = paper.table
    assert len(table) == len(tasks) * 20
    # every row's string is the task's prompt, and its embedding is what the model gives it
    expected = task_prompt_table(tasks, paper_prompt_set())
    merged = expected.merge(table, on=["task_id", "template", "side"])
    assert (paper.strings[merged["row"].to_numpy()] == merged["text"].to_numpy()).all()
    from swsa_store.models.clip import embed_texts, load_clip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = load_clip(MODEL, "random")
    some = merged["text"].iloc[:5].tolist()
    np.testing.assert_allclose(embed_texts(clip, some), paper.embeddings[merged["row"].iloc[:5]], atol=1e-5)


def test_prompt_cube_matches_sklearn(tiny_store):
    from swsa_engine.core.cube import ENSEMBLE
    from swsa_engine.report.clip_tables import prompt_selection_table
    from swsa_engine.run.cube_io import load_cube
    from swsa_engine.run.prompt_sweep import run_prompt_sweep
    from swsa_store import open_store

    store, _ = tiny_store
    cube = run_prompt_sweep(store)
    assert cube.candidate_names[:2] == ["prompt01", "prompt02"] and cube.candidate_names[-1] == ENSEMBLE
    loaded = load_cube(store, "prompt_cube")
    np.testing.assert_array_equal(np.isnan(loaded.real), np.isnan(cube.real))
    name = MODEL.replace("/", "-")
    with open_store(store) as s:
        features = s.embeddings(name)
        members, paper = s.task_members(), s.text_embeddings(name, "paper")
        images = s.images()
        scale = paper.attrs["logit_scale"]
    z = features / np.linalg.norm(features, axis=1, keepdims=True)
    for t in cube.tasks["task_id"].iloc[:3]:
        row = int(np.flatnonzero(cube.tasks["task_id"].to_numpy() == t)[0])
        mine = members[members["task_id"] == t]
        normal = mine.loc[mine["role"] == 2, "image_id"].to_numpy()
        anomaly = mine.loc[mine["role"] == 3, "image_id"].to_numpy()
        ids = np.concatenate([normal, anomaly])
        y = np.r_[np.zeros(len(normal)), np.ones(len(anomaly))]
        tab = paper.table[paper.table["task_id"] == t]
        for j in (0, 4):
            tn = paper.embeddings[tab[(tab["template"] == j) & (tab["side"] == 0)]["row"].iloc[0]]
            ta = paper.embeddings[tab[(tab["template"] == j) & (tab["side"] == 1)]["row"].iloc[0]]
            p = np.array([np.exp(scale * (zz @ ta)) / (np.exp(scale * (zz @ tn)) + np.exp(scale * (zz @ ta))) for zz in z[ids]])
            assert cube.real[row, j, 0] == pytest.approx(roc_auc_score(y, p), abs=1e-9)
        # synthetic: held-out normals vs cutpaste anomalies of this task
        held = mine.loc[mine["role"] == 1, "image_id"].to_numpy()
        synth = images[(images["task_id"] == t) & (images["kind"] != "real")]["image_id"].to_numpy() if "task_id" in images else []
        if len(synth):
            ens_n = prompt_ensemble(paper.embeddings[tab[tab["side"] == 0].sort_values("template")["row"].to_numpy()][None])[0]
            ens_a = prompt_ensemble(paper.embeddings[tab[tab["side"] == 1].sort_values("template")["row"].to_numpy()][None])[0]
            ids = np.concatenate([held, synth])
            y = np.r_[np.zeros(len(held)), np.ones(len(synth))]
            s = two_prompt_logit(z[ids], ens_n, ens_a, scale)
            v = cube.sources.index(cube.config["base_sources"][0])
            assert cube.synthetic[row, -1, v] == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    table = prompt_selection_table(cube)
    assert {"Default prompt", "Prompt ensemble", "Best prompt (oracle)"} <= set(table["strategy"])
    oracle = table[table["strategy"] == "Best prompt (oracle)"]
    assert (oracle["pick_rate"] == 1).all()
    swsa = table[table["strategy"].str.startswith("SWSA")]
    assert (swsa["auroc"] <= swsa["best"] + 1e-12).all()


def test_bliss_cube_matches_reference(tiny_store):
    from swsa_engine.core.cube import bliss_name
    from swsa_engine.report.clip_tables import bliss_grid_table, bliss_selection_table
    from swsa_engine.run.prompt_sweep import run_bliss_sweep
    from swsa_store import open_store

    store, _ = tiny_store
    cube = run_bliss_sweep(store, lambdas=(0.5, 1.0), ks=(1, 10))
    assert cube.candidate_names == [bliss_name(0.5, 1), bliss_name(0.5, 10), bliss_name(1.0, 1), bliss_name(1.0, 10)]
    name = MODEL.replace("/", "-")
    with open_store(store) as s:
        features, members = s.embeddings(name).astype(np.float64), s.task_members()
        classes, dictionary = s.text_embeddings(name, "bliss"), s.text_embeddings(name, "dictionary")
    t = int(cube.tasks["task_id"].iloc[1])
    mine = members[members["task_id"] == t]
    support = np.union1d(mine.loc[mine["role"] == 0, "image_id"], mine.loc[mine["role"] == 1, "image_id"])
    normal = mine.loc[mine["role"] == 2, "image_id"].to_numpy()
    anomaly = mine.loc[mine["role"] == 3, "image_id"].to_numpy()[:25]
    c = classes.embeddings[classes.table.set_index("task_id").loc[t, "row"]].astype(np.float64)
    dictionary = dictionary._replace(embeddings=dictionary.embeddings.astype(np.float64))
    ids = np.concatenate([normal, anomaly])
    ref = np.array([_bliss_reference(features[i], [c], [features[support]], dictionary.embeddings, 10, 1.0) for i in ids])
    y = np.r_[np.zeros(len(normal)), np.ones(len(anomaly))]
    # the cube's AUROC over all anomalies: recompute the reference on all of them via the batched function
    all_anomaly = mine.loc[mine["role"] == 3, "image_id"].to_numpy()
    out = bliss_score(features[np.concatenate([normal, all_anomaly])], c[None, None], features[support][None, None],
                      dictionary.embeddings, k=10, lam=1.0)["score"][0]
    np.testing.assert_allclose(out[: len(ids)], ref, rtol=1e-8, atol=1e-8)
    y_all = np.r_[np.zeros(len(normal)), np.ones(len(all_anomaly))]
    row = int(np.flatnonzero(cube.tasks["task_id"].to_numpy() == t)[0])
    assert cube.real[row, 3, 0] == pytest.approx(roc_auc_score(y_all, out), abs=1e-9)
    assert len(bliss_selection_table(cube)) and len(bliss_grid_table(cube))


def test_report_has_prompt_and_bliss_blocks(tiny_store, tmp_path):
    from swsa_engine.report.clip_tables import clip_report_lines

    store, _ = tiny_store
    paths: dict = {}
    lines = "\n".join(clip_report_lines(store, tmp_path, paths))
    if "Table 1 — prompt selection" in lines:
        assert "Prompt ensemble" in lines and "Default prompt" in lines
    assert all(p.exists() for p in paths.values())


def test_cli_score_prompts_bliss_and_report(tiny_store, tmp_path, capsys):
    from swsa_engine.app.cli import main

    store, _ = tiny_store
    for command in ("embed-text", "score"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
    assert main(["score", "--store", str(store), "--prompts", "--bliss", "--lambdas", "0.5,1", "--ks", "1,5", "--quiet"]) == 0
    assert main(["score", "--store", str(store), "--quiet"]) == 0
    assert main(["report", "--store", str(store), "--out", str(tmp_path / "r"), "--quiet"]) == 0
    text = (tmp_path / "r" / "report.md").read_text()
    assert "Table 1 — prompt selection" in text and "Prompt ensemble" in text and "BLISS — selection" in text
    assert (tmp_path / "r" / "table1_prompts.csv").exists() and (tmp_path / "r" / "bliss_grid.csv").exists()
    assert main(["score", "--store", str(store), "--prompts", "--model", "clip/nope", "--quiet"]) == 1
    assert "no text embeddings" in capsys.readouterr().err


def test_clip_weights_resolution_offline(tmp_path, monkeypatch):
    import torch

    from swsa_store.models.backbones import WeightsNotFoundError, create_backbone, get_backbone_cfg
    from swsa_store.models.clip import load_clip, resolve_clip_weights

    monkeypatch.delenv("SWSA_WEIGHTS_DIR", raising=False)
    cfg = get_backbone_cfg(MODEL)
    assert cfg.family == "clip" and cfg.feature_dim == 16
    with pytest.raises(WeightsNotFoundError, match="weights='random'"):
        resolve_clip_weights(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        random_clip = load_clip(MODEL, "random")
    path = tmp_path / f"{TINY}.pt"
    torch.save(random_clip.model.state_dict(), path)
    source = resolve_clip_weights(cfg, weights_dir=tmp_path)
    assert source.kind == "directory" and source.path == str(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a real file: no random-weights warning
        backbone = create_backbone(MODEL, weights=str(path))
    assert backbone.weights.kind == "file" and backbone.attrs()["family"] == "clip"
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(backbone.model(x), random_clip.model.encode_image(x))
    from swsa_store.registry import UnknownNameError

    with pytest.raises(UnknownNameError, match="no pretrained tag"):
        get_backbone_cfg("clip/ViT-B-16-plus-240@nope")


def test_residual_text_prior_adds_clips_two_prompt_probability(tiny_store):
    """residual(text=w): the image-level residual plus w × CLIP's two-prompt probability, against a per-task loop."""
    from swsa_engine.core.clip_scores import prompt_ensemble, two_prompt_score
    from swsa_engine.core.detectors import parse_detector
    from swsa_engine.run.prompt_sweep import per_task_text
    from swsa_engine.run.sweep import run_sweep
    from swsa_store import open_store
    from swsa_store.tasks import ROLE_HELDOUT, ROLE_REAL_ANOMALY, ROLE_REAL_NORMAL, ROLE_SEED

    store, _ = tiny_store
    name = MODEL.replace("/", "-")
    labels = ["residual(K=2,mean)", "residual(K=2,mean,text=0.5)"]
    cube = run_sweep(store, backbones=[name], detectors=labels, save=False, progress=False, ensembles=False)
    assert cube.candidate_names == [f"{name}/{label}" for label in labels]
    assert cube.config["text_prior"]["model"] == name
    assert np.nanmax(np.abs(cube.real[:, 0, 0] - cube.real[:, 1, 0])) > 1e-6  # the prior changes the ranking
    with open_store(store) as s:
        features = s.embeddings(name).astype(np.float64)
        text = s.text_embeddings(name, "paper")
        members = s.task_members()
    n_templates = int(text.attrs["n_templates"])
    for row, task_id in enumerate(cube.tasks["task_id"].to_numpy()[:3]):
        mine = members[members["task_id"] == task_id]
        ids = {r: np.sort(mine.loc[mine["role"] == r, "image_id"].to_numpy()) for r in
               (ROLE_SEED, ROLE_HELDOUT, ROLE_REAL_NORMAL, ROLE_REAL_ANOMALY)}
        support = np.union1d(ids[ROLE_SEED], ids[ROLE_HELDOUT])
        normal_t, anomaly_t = per_task_text(text, np.array([task_id]), n_templates)
        images = np.r_[ids[ROLE_REAL_NORMAL], ids[ROLE_REAL_ANOMALY]]
        y = np.r_[np.zeros(len(ids[ROLE_REAL_NORMAL])), np.ones(len(ids[ROLE_REAL_ANOMALY]))]
        for c, label in enumerate(labels):
            detector = parse_detector(label)
            refs = support[detector.references(np.ones((1, len(support)), bool), np.array([task_id]))[0]]
            centre = features[refs].mean(axis=0)
            scores = [((features[i] - centre) ** 2).sum() for i in images]
            z = features[images] / np.linalg.norm(features[images], axis=1, keepdims=True)
            prior = two_prompt_score(z, prompt_ensemble(normal_t[0]), prompt_ensemble(anomaly_t[0]), text.attrs["logit_scale"])
            expected = roc_auc_score(y, np.array(scores) + detector.text * prior)
            assert cube.real[row, c, 0] == pytest.approx(expected, abs=1e-12)


def test_residual_text_prior_needs_clip_text(tmp_path):
    from swsa_engine.run.sweep import run_sweep
    from swsa_store.catalog import catalog_dataset
    from swsa_store.ingest import embed_store

    store = tmp_path / "s.h5"
    catalog_dataset(store, "digits", image_dir=tmp_path / "digits", image_size=16, n_seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        embed_store(store, "pixels@4", progress=False)
    with pytest.raises(Exception, match="text prior needs CLIP text embeddings.*swsa embed-text"):
        run_sweep(store, detectors=["residual(K=2,mean,text=1)"], save=False, progress=False)


def test_residual_text_prior_reports_images_without_clip_embedding(tiny_store, tmp_path):
    """An image the backbone embedded but CLIP did not (its done flag never written) is left out of
    residual(text=w) and recorded as a skip of that task naming the reason; the plain residual keeps it."""
    import shutil

    import h5py

    from swsa_engine.run.sweep import run_sweep
    from swsa_store import open_store
    from swsa_store.ingest import embed_store
    from swsa_store.tasks import ROLE_SEED

    source, _ = tiny_store
    shutil.copytree(source.parent, tmp_path / "copy")  # the module's store stays whole
    store = tmp_path / "copy" / source.name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        embed_store(store, "pixels@4", progress=False)
    name = MODEL.replace("/", "-")
    with open_store(store) as s:
        members = s.task_members()
    seed = members[members["role"] == ROLE_SEED].iloc[0]
    image_id, task_id = int(seed["image_id"]), int(seed["task_id"])
    with h5py.File(store, "r+") as f:  # as if CLIP's ingest stopped before this image
        f["embeddings"][name]["done"][image_id] = 0
        f["embeddings"][name]["features"][image_id] = np.nan
    labels = ["residual(K=2,mean)", "residual(K=2,mean,text=0.5)"]
    cube = run_sweep(store, backbones=["pixels@4"], detectors=labels, save=False, progress=False, ensembles=False)
    assert np.isfinite(cube.real).all() and np.isfinite(cube.synthetic[:, :, 0]).all()  # still scored
    skips = cube.skips
    assert len(skips) == (members["image_id"] == image_id).sum() == 1
    row = skips.iloc[0]
    assert row["task_id"] == task_id and row["candidate"] == f"pixels@4/{labels[1]}"
    assert f"left out 1 of the task's images that have no CLIP embedding {name!r}" in row["reason"]
    assert f"swsa embed --store STORE --backbone {MODEL}" in row["reason"]


def test_non_finite_real_scores_are_a_recorded_skip_without_synthetic_queries():
    """A group with no held-out or synthetic queries still records the tasks whose real scores are NaN."""
    from swsa_engine.run.task_groups import TaskGroup
    from swsa_engine.run.prompt_sweep import score_group_candidates

    group = TaskGroup(dataset="d", task_ids=np.array([10, 11]), support=np.array([[0, 1], [2, 3]]),
                      heldout=np.full((2, 0), -1), synthetic={}, real_ids=np.array([4, 5, 6, 7]),
                      real_label=np.array([[0, 0, 1, 1], [1, 1, 0, 0]], dtype=np.int8),
                      real_group=np.array([[-1, -1, 0, 0], [0, 0, -1, -1]]), group_names=np.array(["a"]))

    def scorer(rows, query_ids, exclude):
        scores = np.tile(np.arange(query_ids.shape[-1], dtype=float), (len(rows), 1, 1))
        scores[rows == 1] = np.nan  # task 11 cannot be scored
        return scores

    out = score_group_candidates(scorer, group, np.ones(8, dtype=bool), [], 1)
    assert out["real"][0, 0, 0] == 1.0 and np.isnan(out["real"][1]).all()
    assert out["skips"] == [(11, "non-finite scores (too few usable support images?)")]
