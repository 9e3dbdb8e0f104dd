"""Issue 22, the rest: the synth summary in words, run_paper.py running what it can without a
diffusion model, the ADM config from the CLI, DiffStyle committing each finished batch; formula-escaped
export manifests and predictions; every distinct skip reason kept."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from swsa_engine.app.bench_store import make_paper_store
from swsa_engine.app.cli import main
from swsa_engine.core.cube import AurocCube
from swsa_engine.report.tables import all_skips
from swsa_engine.run.bundle_export import export_detector
from swsa_engine.run.report_inputs import grouped_skip_reasons, read_skips
from swsa_store import create_store, edit_store, open_store
from swsa_store.catalog import catalog_dataset, resolve_path
from swsa_store.csv_safe import FORMULA_START, read_csv, write_csv
from swsa_store.export import export_validation
from swsa_store.scores import import_scores
from swsa_store.synth.adm import load_diffusion_model, parse_adm_config
from swsa_store.synth.adm_unet import ADM_256_UNCOND, ADMConfig
from swsa_store.synthesize import SynthWriter, synthesize
from test_bundle import store as bundle_store  # noqa: F401  (test_bundle's module fixture: a small digits store)
from test_clip import tiny_store as clip_store  # noqa: F401  (test_clip's module fixture)
from test_diffstyle import tiny_adm

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(image_size=16, model_channels=32, out_channels=6, num_res_blocks=1, attention_ds=[2],
            channel_mult=[1, 2], num_head_channels=16)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _folder(root: Path, classes=("a", "b"), n: int = 8, size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for label in classes:
        folder = root / label
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def _run(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return status, out.getvalue(), err.getvalue()


# --------------------------------------------------------------------------- tasks_skipped in words


def test_synth_says_in_words_what_it_skipped_and_why(tmp_path):
    store = tmp_path / "s.h5"
    catalog_dataset(store, "folder", root=_folder(tmp_path / "img"), name="toy", n_seed=3)
    argv = ["synth", "--store", str(store), "--method", "cutpaste", "--count", "2", "--quiet"]
    status, first, _ = _run(argv)
    assert status == 0 and "tasks_skipped=0" in first and "no task skipped" in first
    status, again, _ = _run(argv)
    assert status == 0
    assert "tasks_skipped=2" in again  # the key stays for scripts that read it
    assert "2 task(s) skipped because they already hold all their cutpaste images from an earlier run" in again
    assert "made 0 new cutpaste image(s)" in again


# --------------------------------------------------------------------------- run_paper.py


def _run_paper():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import run_paper
    finally:
        sys.path.pop(0)
    return run_paper


def test_run_paper_runs_what_it_can_without_a_diffusion_model(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SWSA_DIFFUSION_MODEL", raising=False)
    _folder(tmp_path / "img")
    config = tmp_path / "c.toml"
    config.write_text(f"""
store = "{tmp_path / 's.h5'}"
report = "{tmp_path / 'report'}"
n_seed = 3
[datasets.folder]
root = "{tmp_path / 'img'}"
name = "toy"
[datasets.mvtec]
root = "{tmp_path / 'no-such-folder'}"
[counts]
default = 3
[[synth]]
method = "cutpaste"
[[synth]]
method = "diffusion"
optional = true
[embed]
backbones = ["timm/resnet10t"]
weights = "random"
image_size = 32
device = "cpu"
[score]
k = 1
hardest = []
device = "cpu"
""")
    with pytest.warns(Warning):  # the random-weights warning
        status = _run_paper().main(["--config", str(config), "--quiet"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "skipped: no diffusion model given" in out
    assert "mvtec" in out and "does not exist" in out  # the missing dataset root: skipped, said so
    assert "skipped 4 of" in out  # mvtec catalog, cutpaste on mvtec, diffusion on folder and on mvtec
    assert (tmp_path / "report").is_dir() and any((tmp_path / "report").iterdir())
    with open_store(tmp_path / "s.h5") as s:
        kinds = set(s.images()["kind"])
    assert "cutpaste" in kinds and "diffusion" not in kinds


def test_run_paper_passes_the_model_and_adm_config_to_the_generator():
    run_paper = _run_paper()
    config = {"datasets": {"cub": {"root": "x"}}, "embed": {"backbones": []},
              "synth": [{"method": "diffusion", "model": "m.pt", "adm_config": "cfg.json", "optional": True}]}
    synth = [s for s in run_paper.build_plan(config, store="s.h5") if s["step"] == "synth"]
    assert synth[0]["kwargs"]["model"] == "m.pt" and synth[0]["kwargs"]["adm_config"] == "cfg.json"


# --------------------------------------------------------------------------- the ADM config


def test_parse_adm_config_reads_json_text_and_files(tmp_path):
    assert parse_adm_config(None) is None
    assert parse_adm_config(json.dumps(TINY)) == ADMConfig.from_dict(TINY)
    (tmp_path / "c.json").write_text(json.dumps(TINY))
    assert parse_adm_config(tmp_path / "c.json") == ADMConfig.from_dict(TINY)
    (tmp_path / "c.toml").write_text("model_channels = 64\nchannel_mult = [1, 2]\n")
    assert parse_adm_config(str(tmp_path / "c.toml")).model_channels == 64
    for bad, text in (('{"no_such_key": 1}', "unknown ADM config keys ['no_such_key']"),
                      ("[1, 2]", "must be a mapping"), ("{oops", "is not a JSON object"),
                      (str(tmp_path / "missing.json"), "cannot read ADM config")):
        with pytest.raises(ValueError, match=r".*") as caught:
            parse_adm_config(bad)
        assert text in str(caught.value) and "\n" not in str(caught.value)


def test_a_plain_state_dict_needs_its_config_and_the_cli_takes_it(tmp_path):
    module = tiny_adm()
    plain = tmp_path / "plain.pt"
    torch.save(module.state_dict(), plain)  # a published checkpoint's form: no config inside
    with pytest.raises(ValueError, match="does not match the ADM config"):
        load_diffusion_model(plain)  # the paper's 256x256 config by default
    model = load_diffusion_model(plain, adm_config=json.dumps(TINY))
    assert model.info["config"]["model_channels"] == 32 != ADM_256_UNCOND.model_channels

    store = tmp_path / "s.h5"
    catalog_dataset(store, "folder", root=_folder(tmp_path / "img", classes=("a", "b")), name="toy", n_seed=4)
    (tmp_path / "adm.json").write_text(json.dumps(TINY))
    base = ["synth", "--store", str(store), "--method", "diffusion", "--model", str(plain), "--count", "2",
            "--steps", "2", "--device", "cpu", "--tasks", "0", "--quiet"]
    status, _, err = _run(base)
    assert status == 1 and "does not match the ADM config" in err
    status, out, err = _run(base + ["--adm-config", str(tmp_path / "adm.json")])
    assert status == 0, err
    with open_store(store) as s:
        made = s.images().query("kind == 'diffusion'")
    assert len(made) == 2 and "model_channels" not in out


# --------------------------------------------------------------------------- DiffStyle: one batch at most


def test_a_kill_during_diffstyle_loses_at_most_one_batch(tmp_path, monkeypatch):
    store = tmp_path / "s.h5"
    catalog_dataset(store, "folder", root=_folder(tmp_path / "img", classes=("a", "b"), n=16), name="toy", n_seed=6)
    model = tmp_path / "tiny.pt"
    from swsa_store.synth.adm import save_adm

    save_adm(tiny_adm(), model)
    import swsa_store.synth.diffstyle as ds

    real, made = ds.postprocess, []

    def dies_after_five(x):
        if len(made) == 5:
            raise KeyboardInterrupt  # the process dies here: nothing after this line runs
        made.append(1)
        return real(x)

    monkeypatch.setattr(ds, "postprocess", dies_after_five)
    batch = 2
    with pytest.raises(KeyboardInterrupt):  # the default 30-second commit clock never fires here
        synthesize(store, "diffusion", model=str(model), steps=2, device="cpu", batch_size=batch, count=8,
                   task_ids=[0], progress=False)
    with open_store(store) as s:
        committed = int((s.images()["kind"] == "diffusion").sum())
    assert len(made) == 5 and committed == 4  # two finished batches catalogued; the fifth image only is lost
    assert len(made) - committed < batch


def test_synth_writer_commits_every_n_rows_and_refuses_a_bad_n(tmp_path):
    with pytest.raises(ValueError, match="commit_every must be a positive number of images, got 0"):
        SynthWriter(tmp_path / "s.h5", tmp_path, source="x", method="x", seed=0, commit_every=0)


# --------------------------------------------------------------------------- the prompt cube's templates


def test_templates_used_follow_each_tasks_dataset():
    import pandas as pd

    from swsa_store.models.prompts import GENERIC_TEMPLATES, PAPER_TEMPLATES, paper_prompt_set, templates_used

    templates = paper_prompt_set().templates
    tasks = pd.DataFrame({"task_id": [0, 1, 2], "dataset": ["mvtec", "digits", "mvtec"],
                          "protocol": ["defect", "multiclass", "defect"]})
    used = templates_used(templates, tasks)
    assert len(used) == 10
    assert used[0] == [PAPER_TEMPLATES["industrial"][0], GENERIC_TEMPLATES[0]]  # both families, first seen first
    assert templates_used(templates, tasks.iloc[[1]]) == [[pair] for pair in GENERIC_TEMPLATES]
    assert PAPER_TEMPLATES["flowers"][0] not in sum(used, [])  # the dict's first entry, used by no task


def test_the_prompt_cube_lists_the_templates_its_tasks_used(clip_store):
    from swsa_engine.run.prompt_sweep import run_prompt_sweep
    from swsa_store.models.prompts import GENERIC_TEMPLATES

    store, _ = clip_store  # digits tasks: the generic ('*') templates, not the flowers ones listed first
    cube = run_prompt_sweep(store, save=False)
    names = cube.candidates.set_index("name")["template"]
    assert names["prompt01"] == f"{GENERIC_TEMPLATES[0][0]} | {GENERIC_TEMPLATES[0][1]}"
    assert cube.config["templates_used"][3] == [list(GENERIC_TEMPLATES[3])]


# --------------------------------------------------------------------------- every skip reason kept


def test_a_task_missing_both_test_sides_names_both():
    import pandas as pd

    from swsa_store.tasks import build_tasks

    images = pd.DataFrame({"class_name": list("aaabbb"), "split": "train", "image_id": range(6), "dataset": "d",
                           "kind": "real", "status": "ok"})
    tasks, _ = build_tasks(images, "d", n_seed=1)  # no test images at all: both sides of real validation missing
    assert set(tasks["skip_reason"]) == {"real validation has no class (no normal and no anomalous test images)"}


# --------------------------------------------------------------------------- formula-escaped CSVs beyond the report

HOSTILE = ("=cmd", "+add", "-sub", "@at")


def _raw_cells(path: Path) -> list[str]:
    return [cell for row in csv.reader(path.open(encoding="utf-8")) for cell in row]


def test_export_manifests_escape_class_names_that_start_a_formula(tmp_path):
    store = tmp_path / "s.h5"
    catalog_dataset(store, "folder", root=_folder(tmp_path / "images", classes=HOSTILE, n=8), name="toy", n_seed=3)
    synthesize(store, "cutpaste", count=3, seed=0, progress=False)
    out = tmp_path / "out"
    export_validation(store, out)
    manifests = [out / "manifest.csv", *sorted(out.glob("*/manifest.csv"))]
    assert len(manifests) == 1 + len(HOSTILE)
    for manifest in manifests:
        for cell in _raw_cells(manifest):
            assert not cell.startswith(FORMULA_START), (manifest, cell)
    root = read_csv(out / "manifest.csv", keep_default_na=False, dtype={"generator": str, "group": str})
    assert set(root["group"]) - {""} == set(HOSTILE)  # read back exactly
    before = {p: p.read_bytes() for p in manifests}
    export_validation(store, out)  # idempotent: escaped rows read back and written again unchanged
    assert {p: p.read_bytes() for p in manifests} == before


def test_predictions_csv_escapes_paths_that_start_a_formula(bundle_store, tmp_path, monkeypatch):
    bundle = tmp_path / "bundle"
    export_detector(bundle_store["path"], 3, bundle, candidate="pixels@8")
    monkeypatch.chdir(tmp_path)
    real = resolve_path(bundle_store["path"], bundle_store["images"]["path"].iloc[int(bundle_store["normal"][0])])
    shutil.copyfile(real, tmp_path / ("=cmd" + Path(real).suffix))
    names = ["=cmd" + Path(real).suffix, "+missing.png", "-missing.png", "@missing.png"]
    status, _, err = _run(["predict", "--detector", str(bundle), "--out", "pred.csv", "--quiet", "--", *names])
    assert status == 0, err
    for cell in _raw_cells(tmp_path / "pred.csv"):
        assert not cell.startswith(FORMULA_START), cell
    frame = read_csv(tmp_path / "pred.csv", keep_default_na=False)
    assert frame["path"].tolist() == names
    assert frame["error"].iloc[0] == "" and (frame["error"].iloc[1:] != "").all()
    assert np.isfinite(float(frame["score"].iloc[0]))


def test_csv_cell_escapes_every_formula_start_and_round_trips():
    values = ["=1+1", "+1", "-1", "@SUM(A1)", "\tx", "\rx", "'quoted", "plain", "", "a=b"]
    frame = pd.DataFrame({"text": values, "number": np.arange(len(values)) - 3.5})
    text = write_csv(frame, None)
    cells = list(csv.reader(io.StringIO(text, newline="")))
    assert [row[0] for row in cells[1:]] == ["'=1+1", "'+1", "'-1", "'@SUM(A1)", "'\tx", "'\rx", "''quoted", "plain", "",
                                             "a=b"]
    assert [row[1] for row in cells[1:]][:2] == ["-3.5", "-2.5"]  # numbers are not escaped
    assert len(cells) == 1 + len(values)  # the carriage return stays inside its (quoted) cell
    back = read_csv(io.StringIO(text), keep_default_na=False)
    assert back["text"].tolist() == values and np.array_equal(back["number"], frame["number"])


# --------------------------------------------------------------------------- every distinct skip reason is kept


def test_append_skips_keeps_every_distinct_reason_and_readers_group_them(tmp_path):
    store = create_store(tmp_path / "s.h5")
    rows = pd.DataFrame({"stage": "embed", "image_id": [4, 4, 4, 5, -1, -1], "task_id": [-1, -1, -1, -1, 2, 2],
                         "backbone": "b", "reason": ["cannot read /x/4.png: truncated", "shape 1x1 is too small",
                                                     "cannot read /x/4.png: truncated", "cannot read /x/5.png: truncated",
                                                     "task: too few normals", "task: no anomalies"]})
    with edit_store(store) as s:
        s.append_skips(rows)
    with edit_store(store) as s:  # a re-run records the same rows again: nothing is added
        s.append_skips(rows.iloc[[1, 4]])
    skips = read_skips(store)
    assert len(skips) == 5  # one identical duplicate dropped, both reasons of image 4 and of task 2 kept
    assert sorted(skips.loc[skips["image_id"] == 4, "reason"]) == ["cannot read /x/4.png: truncated",
                                                                     "shape 1x1 is too small"]
    assert sorted(skips.loc[skips["task_id"] == 2, "reason"]) == ["task: no anomalies", "task: too few normals"]
    groups = {(g["stage"], g["reason"]): g["count"] for g in grouped_skip_reasons(skips)}
    assert groups[("embed", "cannot read /x/4.png: truncated")] == 2  # 4.png and 5.png fold into one reason
    assert sum(groups.values()) == 5
    table = all_skips(AurocCube(
        tasks=pd.DataFrame({"task_id": [2], "dataset": ["d"], "normal_class": ["c"]}),
        candidates=pd.DataFrame({"name": ["b"], "n_params": [1], "feature_dim": [1], "weights_kind": ["x"], "family": ["f"]}),
        sources=["s"], real=np.zeros((1, 1, 2)), synthetic=np.zeros((1, 1, 1)), per_class=np.zeros((1, 1, 1)),
        class_names=np.full((1, 1), "", dtype=object), config={}), skips)
    assert len(table) == 5 and set(table["candidate"]) == {"b"}


def test_reimporting_scores_replaces_the_earlier_imports_skips(tmp_path):
    store = tmp_path / "p.h5"
    make_paper_store(store, task_fraction=0.03, image_fraction=0.25, synthetic=16, backbones={"r": (32, 1)}, progress=False)
    with open_store(store) as s:
        n_images, task_ids = s.n_images, s.tasks()["task_id"].to_numpy()
    table = pd.DataFrame({"task": np.repeat(task_ids, n_images), "image_id": np.tile(np.arange(n_images), len(task_ids)),
                          "score": 1.0})
    import_scores(store, "x", table[~((table["task"] == task_ids[0]) & (table["image_id"] < 600))], allow_missing=True)
    import_scores(store, "x", table[~((table["task"] == task_ids[1]) & (table["image_id"] < 600))], allow_missing=True,
                  replace=True)
    skips = read_skips(store)
    assert skips.loc[skips["stage"] == "import", "task_id"].tolist() == [int(task_ids[1])]
