"""The command line's rough edges (issue 22 items 13, 14, 17): a closed pipe, --version,
`synth --tasks`, the auxiliary source in `synth --help`, `score --prompts` with --detectors,
custom strategies from `swsa report --strategy module:function`, Figure 3 with many
candidates, Table 1's largest-backbone rows, and the random-weights warning said once."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import swsa_engine.app.cli.report as report_cli
from swsa_engine.app.cli import main
from swsa_engine.core.cube import AurocCube
from swsa_engine.core.selection import DEFAULT_LABELS, default_strategies, selection_table
from swsa_engine.report.figures.figure3 import figure3
from swsa_engine.report.tables import read_csv
from swsa_store import open_store
from swsa_store.catalog import catalog_dataset


def make_cube(n_tasks: int = 6, n_candidates: int = 4, seed: int = 0, detectors: list[str] | None = None) -> AurocCube:
    """A cube with ties in its AUROCs (rounded to 0.05); ``detectors``: one per candidate."""
    rng = np.random.default_rng(seed)
    real = (rng.uniform(0.4, 1.0, size=(n_tasks, n_candidates, 2)) * 20).round() / 20
    synthetic = (rng.uniform(0.4, 1.0, size=(n_tasks, n_candidates, 1)) * 20).round() / 20
    candidates = pd.DataFrame({"name": [f"model_{i:02d}" for i in range(n_candidates)],
                               "n_params": [10 + (i % 5) for i in range(n_candidates)], "feature_dim": 8,
                               "weights_kind": "random", "family": "resnet"})
    if detectors is not None:
        candidates["detector"] = detectors
    return AurocCube(
        tasks=pd.DataFrame({"task_id": np.arange(n_tasks), "dataset": "toy",
                            "normal_class": [f"c{i}" for i in range(n_tasks)]}),
        candidates=candidates, sources=["s1"], real=real, synthetic=synthetic,
        per_class=np.full((n_tasks, n_candidates, 1), np.nan), class_names=np.full((n_tasks, 1), "", dtype=object),
        config={"k": 3, "base_sources": ["s1"]},
    )


# --------------------------------------------------------------------------- item 13


def test_closed_pipe_ends_quietly():
    script = textwrap.dedent("""
        import sys
        import swsa_engine.app.cli.report as report_cli
        def flood(args):
            for i in range(200000):
                print("line", i)
            return 0
        report_cli.cmd_info = flood
        from swsa_engine.app.cli import main
        sys.exit(main(["info", "--store", "unused.h5"]))
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.readline() == b"line 0\n"
    process.stdout.close()  # what `| head -1` does
    err = process.stderr.read().decode()
    process.wait(timeout=60)
    assert err == "", err  # no traceback, no "Exception ignored", no "swsa: error: [Errno 32] Broken pipe"
    assert process.returncode == 1


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("swsa ") and out.split()[1][0].isdigit()


def test_synth_help_lists_every_method_and_tasks(capsys):
    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for word in ("auxiliary", "cutpaste", "perlin", "diffusion", "--tasks", "Tiny-ImageNet"):
        assert word in out, word


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-edges")
    rng = np.random.default_rng(3)
    from PIL import Image

    for label in ("a", "b", "c"):
        folder = root / "img" / label
        folder.mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    path = root / "s.h5"
    catalog_dataset(path, "folder", root=root / "img", name="toy", n_seed=3)
    return path


def test_synth_tasks_makes_only_those_tasks(store, capsys):
    with open_store(store) as s:
        task_ids = sorted(s.tasks().query("status == 'ok'")["task_id"].tolist())
    assert len(task_ids) >= 3
    chosen = [task_ids[0], task_ids[2]]
    assert main(["synth", "--store", str(store), "--count", "2", "--quiet", "--source", "cp_some",
                 "--tasks", f"{chosen[0]}, {chosen[1]}"]) == 0
    with open_store(store) as s:
        made = s.images().query("kind == 'cp_some'")
    assert sorted(made["task_id"].unique().tolist()) == chosen and len(made) == 4
    capsys.readouterr()
    assert main(["synth", "--store", str(store), "--count", "2", "--tasks", "0,x"]) == 1
    assert capsys.readouterr().err.strip() == "swsa: error: --tasks: 'x' is not a task id (comma-separated whole numbers, e.g. 0,3)"
    assert main(["synth", "--store", str(store), "--count", "2", "--tasks", "999"]) == 1
    assert "unknown or skipped task ids [999]" in capsys.readouterr().err


def test_score_prompts_with_detectors_is_a_clear_error(store, capsys):
    assert main(["score", "--store", str(store), "--prompts", "--detectors", "knn(k=3)"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("swsa: error: --detectors applies to embedding candidates, not to --prompts/--bliss")
    assert "\n" not in err


# --------------------------------------------------------------------------- --strategy module:function


@pytest.fixture
def report_from_cube(monkeypatch):
    cube = make_cube(n_tasks=7, n_candidates=5, seed=4)
    monkeypatch.setattr(report_cli, "load_cube", lambda store: cube)
    monkeypatch.setattr(report_cli, "read_skips", lambda store: None)
    return cube


def test_report_strategy_module_function(report_from_cube, store, tmp_path, monkeypatch, capsys):
    cube = report_from_cube
    module = tmp_path / "mods"
    module.mkdir()
    (module / "edge_strategies_22.py").write_text(textwrap.dedent("""
        import numpy as np
        SEEN = []
        def lowest_synthetic(ctx):
            SEEN.append(bool(np.isnan(ctx.real).all()))
            return np.nanargmin(ctx.source("s1"), axis=1)
    """))
    monkeypatch.syspath_prepend(str(module))
    monkeypatch.setitem(DEFAULT_LABELS, "custom:edge_strategies_22:lowest_synthetic", "placeholder")  # removed after
    out = tmp_path / "report"
    assert main(["report", "--store", str(store), "--out", str(out), "--quiet",
                 "--strategy", "edge_strategies_22:lowest_synthetic"]) == 0
    table1 = read_csv(out / "table1.csv")
    rows = table1[table1["strategy"] == "lowest_synthetic (custom)"]
    assert len(rows) == 2  # one dataset x two settings
    import edge_strategies_22

    assert edge_strategies_22.SEEN and all(edge_strategies_22.SEEN)  # the strategy never saw real labels
    for s, setting in enumerate(("one-vs-rest", "one-vs-closest")):
        hits, aurocs = [], []
        for t in range(len(cube.tasks)):  # the naive loop: first lowest synthetic AUROC, hit when its real is best
            pick = min(range(cube.synthetic.shape[1]), key=lambda c: (cube.synthetic[t, c, 0], c))
            hits.append(cube.real[t, pick, s] == cube.real[t, :, s].max())
            aurocs.append(cube.real[t, pick, s])
        row = rows[rows["setting"] == setting].iloc[0]
        assert row["picks"] == pytest.approx(sum(hits)) and row["auroc"] == pytest.approx(np.mean(aurocs))


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "--strategy 'no_colon': expected module:function"),
    ("surely_missing_module_22:f", "cannot import module 'surely_missing_module_22': ModuleNotFoundError"),
    ("json:no_such_function", "module 'json' has no function 'no_such_function'"),
    ("json:__name__", "module 'json' has no function '__name__'"),
])
def test_report_strategy_bad_spec_is_one_line(report_from_cube, tmp_path, capsys, spec, message):
    assert main(["report", "--store", "unused.h5", "--out", str(tmp_path / "r"), "--quiet", "--strategy", spec]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("swsa: error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "r").exists()  # refused before any work


# --------------------------------------------------------------------------- item 14: Figure 3


def test_figure3_labels_do_not_overlap_with_many_candidates(tmp_path, monkeypatch):
    cube = make_cube(n_tasks=5, n_candidates=40, seed=5)
    cube.synthetic[:] = 0.7 + 0.002 * np.arange(40)[None, :, None]  # 40 points in a tight cluster
    cube.real[:] = 0.8 + 0.001 * np.arange(40)[None, :, None]
    saved = []
    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (saved.append(self), original(self, *a, **k))[1])
    figure3(cube, tmp_path / "f3.png")
    fig = saved[0]
    renderer = FigureCanvasAgg(fig).get_renderer()
    small = make_cube(n_tasks=5, n_candidates=4)
    assert fig.get_size_inches()[0] > 5.2  # the figure grew with the candidates
    for ax in fig.axes:
        shown = [t for t in ax.texts if t.get_visible()]
        assert 1 <= len(shown) <= 10
        boxes = [t.get_window_extent(renderer) for t in shown]
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                assert not boxes[i].overlaps(boxes[j]), (shown[i].get_text(), shown[j].get_text())
        assert shown[0].get_text() == "model_39"  # the best synthetic AUROC is labelled first
    saved.clear()
    figure3(small, tmp_path / "small.png")
    assert sum(t.get_visible() for t in saved[0].axes[0].texts) == 4  # few candidates: every one labelled


# --------------------------------------------------------------------------- item 17


def test_largest_rows_say_what_they_are():
    grid = make_cube(n_candidates=4, detectors=["knn(k=3,l2)", "mahalanobis", "knn(k=3,l2)", "mahalanobis"])
    labels = [label for label, _, _ in default_strategies(grid)]
    assert "Largest backbone, all detectors averaged" in labels and "Largest backbone with detector knn(k=3,l2)" in labels
    assert not any(label.startswith("Fixed detector") or label == "Largest model" for label in labels)
    table = selection_table(grid)
    assert {"Largest backbone, all detectors averaged", "Largest backbone with detector knn(k=3,l2)"} <= set(table["strategy"])
    plain = [label for label, _, _ in default_strategies(make_cube(n_candidates=4))]
    assert "Largest model" in plain  # one detector: the paper's row name


def test_random_weights_are_announced_once():
    script = textwrap.dedent("""
        import logging
        from swsa_store.models.backbones import create_backbone
        create_backbone("timm/resnet10t", weights="random", image_size=32)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("RANDOM weights") == 1, result.stderr
