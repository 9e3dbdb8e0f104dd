"""The `swsa` command line: --help everywhere, one-line errors, and a reduced demo end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from swsa_engine.app.cli import build_parser, main
from swsa_engine.app.demo import DIGITS_DETECTORS

COMMANDS = ["demo", "catalog", "synth", "embed", "embed-text", "score", "report", "info", "bench", "import-scores", "export-validation"]


def test_every_command_has_help(capsys):
    for command in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: swsa " + command in capsys.readouterr().out
    assert set(COMMANDS) <= set(build_parser()._subparsers._group_actions[0].choices)


def test_console_script_help_runs():
    result = subprocess.run([sys.executable, "-m", "swsa_engine.app.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "demo" in result.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info", "--store", "/nonexistent/s.h5"], "does not exist; create it with `swsa catalog"),
        (["catalog", "folder", "--store", "{tmp}/s.h5"], "needs --root PATH"),
        (["catalog", "folder", "--root", "{tmp}/nope", "--store", "{tmp}/s.h5"], "does not exist"),
        (["catalog", "imagenet", "--store", "{tmp}/s.h5"], "unknown dataset 'imagenet'"),
        (["embed", "--store", "{tmp}/s.h5", "--backbone", "resnet18"], "does not exist"),
    ],
)
def test_errors_are_one_line(tmp_path, capsys, argv, message):
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith("swsa: error: ") and message in err
    assert len(err.splitlines()) == 1


def test_unknown_backbone_and_missing_weights_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("SWSA_WEIGHTS_DIR", raising=False)
    store = str(tmp_path / "s.h5")
    assert main(["catalog", "digits", "--store", store, "--image-size", "16"]) == 0
    capsys.readouterr()
    assert main(["embed", "--store", store, "--backbone", "resnet_18"]) == 1
    err = capsys.readouterr().err
    assert "unknown backbone 'resnet_18'" in err and "resnet18" in err and len(err.strip().splitlines()) == 1
    assert main(["embed", "--store", store, "--backbone", "resnet18"]) == 1
    err = capsys.readouterr().err
    assert "weights" in err and "random" in err and len(err.strip().splitlines()) == 1
    assert main(["score", "--store", store]) == 1
    assert "holds no embeddings" in capsys.readouterr().err


def test_reduced_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--dataset", "digits", "--out", str(out), "--backbones", "timm/resnet10t,timm/vit_tiny_patch16_224",
                 "--image-size", "32", "--count", "12", "--n-seed", "8", "--quiet"])
    assert code == 0
    report = out / "report"
    for name in ("report.md", "table1.csv", "table2.csv", "tasks.csv", "figure3.png", "summary.json", "skips.csv"):
        assert (report / name).stat().st_size > 0, name
    text = (report / "report.md").read_text()
    assert "Randomly initialised candidates" in text and "timm-resnet10t" in text
    table1 = pd.read_csv(report / "table1.csv")
    assert set(table1["setting"]) == {"one-vs-rest", "one-vs-closest"}
    assert {"SWSA (cutpaste)", "SWSA (cutpaste-scar)", "SWSA (perlin)", "Largest backbone, all detectors averaged",
            "Best model (oracle)"} <= set(table1["strategy"])
    assert table1["tasks"].eq(10).all()
    assert ((table1["auroc"] >= 0) & (table1["auroc"] <= table1["best"] + 1e-12)).all()
    summary = json.loads((report / "summary.json").read_text())
    assert summary["tasks"] == 10 and len(summary["candidates"]) == 2 * len(DIGITS_DETECTORS)  # backbones × detectors
    capsys.readouterr()
    assert main(["info", "--store", str(out / "store.h5"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["datasets"]["digits"]["tasks"] == 10
    assert info["datasets"]["digits"]["images"] == {"cutpaste": 120, "cutpaste-scar": 120, "perlin": 120, "real": 1797}
    assert all(b["done"] == b["of"] for b in info["backbones"].values())
    # report from the saved cube alone
    assert main(["report", "--store", str(out / "store.h5"), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "again" / "table1.csv"), table1)
