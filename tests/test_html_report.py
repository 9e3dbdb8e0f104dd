"""The HTML report: its numbers equal the CSV tables', and — in headless Chromium driven by
Playwright, with the network blocked — it loads without console errors, every image loads,
Table 1 has its rows, and a task found by searching shows its grid of synthetic images."""

from __future__ import annotations

import html.parser
import json
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from swsa_engine.app.cli import main

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
COUNT = 6  # synthetic images per task and generator in the reduced demo
LAUNCH_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("html") / "demo"
    assert main(["demo", "--dataset", "digits", "--out", str(out), "--backbones", "timm/resnet10t", "--image-size", "32",
                 "--count", str(COUNT), "--n-seed", "6", "--quiet"]) == 0
    assert (out / "report" / "report.html").is_file()
    return out


# --------------------------------------------------------------------------- without a browser


class _Tables(html.parser.HTMLParser):
    """Collects every ``<table id=...>``: header names and, per row, (text, data-v) of each cell."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, dict] = {}
        self._table = self._cell = None
        self._row: list | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and attrs.get("id"):
            self._table = self.tables.setdefault(attrs["id"], {"columns": [], "rows": []})
        elif self._table is not None and tag == "th":
            self._cell = ["", attrs.get("data-col")]
        elif self._table is not None and tag == "tr":
            self._row = []
        elif self._table is not None and tag == "td":
            self._cell = ["", attrs.get("data-v")]

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[0] += data

    def handle_endtag(self, tag):
        if self._table is None:
            return
        if tag == "th" and self._cell is not None:
            self._table["columns"].append(self._cell[1])
            self._cell = None
        elif tag == "td" and self._cell is not None:
            self._row.append(tuple(self._cell))
            self._cell = None
        elif tag == "tr" and self._row:
            self._table["rows"].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None


def _tables(path: Path) -> dict:
    parser = _Tables()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser.tables


def _same(csv_value, cell: tuple[str, str], column: str) -> bool:
    text, raw = cell
    if isinstance(csv_value, float) and math.isnan(csv_value):
        return raw == "" and text == "–"
    if isinstance(csv_value, bool) or str(csv_value) in ("True", "False"):
        return raw == ("1" if str(csv_value) == "True" else "0")
    if isinstance(csv_value, (int, float)):
        if float(raw) != float(csv_value):
            return False
        if column in ("p_value", "p_one_sided", "bonferroni_threshold"):
            return text == f"{float(csv_value):.3g}"
        if column == "picks":
            return text == f"{float(csv_value):.1f}"
        return text == (str(csv_value) if isinstance(csv_value, int) else f"{float(csv_value):.3f}")
    return raw == str(csv_value) and text == str(csv_value)


@pytest.mark.parametrize("name, csv_columns", [
    ("table1", ["dataset", "setting", "strategy", "pick_rate", "auroc", "best"]),
    ("table2", None),
    ("table3", None),
    ("strategies", None),
])
def test_html_numbers_equal_csv(demo, name, csv_columns):
    report = demo / "report"
    csv = pd.read_csv(report / f"{name}.csv")
    table = _tables(report / "report.html")[name]
    html_names = {"auroc": "AUROC of pick", "best": "best possible"}
    columns = csv_columns or list(csv.columns)
    assert len(table["rows"]) == len(csv) > 0
    for row, cells in zip(csv.to_dict(orient="records"), table["rows"]):
        by_column = dict(zip(table["columns"], cells))
        for column in columns:
            cell = by_column[html_names.get(column, column)]
            assert _same(row[column], cell, column), (name, column, row[column], cell)
    if name == "table1":  # the "picks / tasks" string as in the Markdown table
        for row, cells in zip(csv.to_dict(orient="records"), table["rows"]):
            text = dict(zip(table["columns"], cells))["pick rate"][0]
            assert text == "–" or text.endswith(f" / {row['tasks']}")


def _generators(demo: Path) -> list[str]:
    """The demo's synthetic sources (cutpaste, cutpaste-scar, and whatever else the demo makes)."""
    from swsa_store import open_store

    with open_store(demo / "store.h5") as store:
        return sorted(set(store.images()["kind"]) - {"real"})


def test_html_per_task_numbers_equal_tasks_csv(demo):
    report = demo / "report"
    text = (report / "report.html").read_text(encoding="utf-8")
    picks = pd.read_csv(report / "tasks.csv")
    for row in picks.to_dict(orient="records"):
        match = re.search(rf'<script type="application/json" id="task-{row["task_id"]}">(.*?)</script>', text, re.S)
        payload = json.loads(match.group(1))
        mine = [p for p in payload["picks"] if p["setting"] == row["setting"]]
        assert len(mine) == 1
        assert mine[0]["swsa"] == row["swsa_pick"] and mine[0]["oracle"] == row["oracle_pick"]
        assert mine[0]["swsa_real"] == f"{row['swsa_pick_real_auroc']:.3f}"
        assert mine[0]["oracle_real"] == f"{row['oracle_real_auroc']:.3f}"
        assert sum(len(g["items"]) for g in payload["generators"]) == len(_generators(demo)) * COUNT


def test_html_report_placeholders_without_image_files(tmp_path):
    """The paper-shaped bench store has no image files: the report shows placeholders (no
    broken images), one section per task, and stays small."""
    from swsa_engine.app.bench import make_paper_store
    from swsa_engine.report.html import write_html_report
    from swsa_engine.run.sweep import run_sweep

    store = tmp_path / "paper.h5"
    make_paper_store(store, task_fraction=0.05, image_fraction=0.05, progress=False)
    cube = run_sweep(store, progress=False)
    out = write_html_report(cube, store, tmp_path / "paper.html")
    text = out.read_text(encoding="utf-8")
    index = json.loads(re.search(r'<script type="application/json" id="task-index">(.*?)</script>', text, re.S).group(1))
    assert len(index) >= len(cube.tasks) > 0
    first = json.loads(re.search(rf'<script type="application/json" id="task-{index[0]["id"]}">(.*?)</script>', text, re.S).group(1))
    assert first["thumbs"] and all(v is None for v in first["thumbs"].values())
    assert first["generators"]


# --------------------------------------------------------------------------- in a browser


def _playwright():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium; .ci/run installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright for Python is absent (pip install playwright; .ci/run installs it)")
    return sync_playwright


def open_report(page_factory, path: Path):
    """Open ``path`` with every non-file request aborted; return (page, console errors,
    blocked requests, seconds to the load event and the page's first render)."""
    page = page_factory()
    errors, blocked = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))

    def route(r):
        if r.request.url.startswith(("file:", "data:")):
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    started = time.perf_counter()
    page.goto(path.resolve().as_uri(), wait_until="load")
    page.wait_for_selector("body[data-ready='1']")
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    return page, errors, blocked, time.perf_counter() - started


@pytest.fixture(scope="module")
def browser():
    sync_playwright = _playwright()
    user_data = tempfile.mkdtemp(prefix="swsa-chromium-")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            user_data, executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS, viewport={"width": 1280, "height": 900},
        )
        try:
            yield context
        finally:
            context.close()
            shutil.rmtree(user_data, ignore_errors=True)


def _all_images_loaded(page) -> tuple[int, list]:
    return page.evaluate(
        "() => { const imgs = Array.from(document.images);"
        " return [imgs.length, imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt)]; }"
    )


def test_html_report_in_chromium(demo, browser):
    ARTIFACTS.mkdir(exist_ok=True)
    page, errors, blocked, seconds = open_report(browser.new_page, demo / "report" / "report.html")
    try:
        # Table 1: one row per dataset × setting × strategy, as in table1.csv
        table1 = pd.read_csv(demo / "report" / "table1.csv")
        assert page.locator("#table1 tbody tr").count() == len(table1)
        strategies = page.locator("#table1 tbody tr td:nth-child(3)").all_inner_texts()
        assert strategies == table1["strategy"].tolist()
        assert "SWSA (cutpaste)" in strategies and "Best model (oracle)" in strategies
        # filtering by setting hides the other setting's rows; sorting reorders
        page.select_option("select[data-filter='setting']", "one-vs-closest")
        assert page.locator("#table1 tbody tr:visible").count() == (table1["setting"] == "one-vs-closest").sum()
        page.select_option("select[data-filter='setting']", "")
        page.click("#table1 th[data-col='AUROC of pick']")
        assert page.locator("#table1 tbody tr:visible").count() == len(table1)
        assert page.locator("#fig3 svg").count() == 2  # digits × two settings
        n, broken = _all_images_loaded(page)
        assert n >= 2 and not broken, broken
        page.screenshot(path=str(ARTIFACTS / "html_report_overview.png"), full_page=True)

        # search a task by class name and open it
        page.fill("#task-search", "7")
        visible = page.locator("#task-list li:visible")
        assert visible.count() == 1
        visible.first.click()
        view = page.locator("#task-view article.task")
        view.wait_for()
        assert "7" in view.locator("h3").inner_text()
        assert view.locator(".gen").count() == len(_generators(demo)) >= 2  # cutpaste, cutpaste-scar, ...
        for generator in view.locator(".gen").all():
            assert generator.locator(".synth").count() == COUNT
            assert generator.locator(".synth img").count() == COUNT  # every image has a file here
        assert view.locator(".seeds .thumb").count() == 6
        assert view.locator(".real-normal .thumb").count() > 0 and view.locator(".real-anomaly .thumb").count() > 0
        assert view.locator(".b-swsa").count() >= 1 and view.locator(".b-oracle").count() >= 1
        n, broken = _all_images_loaded(page)
        assert n > len(_generators(demo)) * COUNT and not broken, broken
        view.scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS / "html_report_task.png"), full_page=True)
        assert not errors, errors
        assert not blocked, blocked  # the report asks for nothing outside itself
        (ARTIFACTS / "html_report_timing.json").write_text(json.dumps({
            "html_bytes": os.path.getsize(demo / "report" / "report.html"), "load_and_render_s": seconds}))
    finally:
        page.close()


def test_html_report_diffusion_grid_in_chromium(demo, browser, tmp_path):
    """Diffusion anomalies are shown as the paper's Figure 2: style images as a row, content
    images as a column, each pair's result in the grid; an image without a file is a
    placeholder, not a broken image."""
    from swsa_engine.report.html import write_html_report
    from swsa_engine.run.cube_io import load_cube
    from swsa_store import open_store
    from swsa_store.catalog import add_images
    from swsa_store.tasks import ROLE_SEED

    store = tmp_path / "store.h5"
    shutil.copyfile(demo / "store.h5", store)
    shutil.copytree(demo / "store.h5.results", tmp_path / "store.h5.results")
    with open_store(store) as s:
        images, members = s.images(), s.task_members()
    seeds = members.loc[(members["task_id"] == 0) & (members["role"] == ROLE_SEED), "image_id"].to_numpy()
    styles, contents = seeds[:3], seeds[3:5]
    rows = []
    for i, (style, content) in enumerate((s_, c_) for c_ in contents for s_ in styles):
        rows.append({
            "dataset": "digits", "class_name": "0", "split": "synthetic", "kind": "diffusion",
            # the last result has no file: it must show as a placeholder
            "path": images.loc[int(content), "path"] if i < 5 else "", "status": "ok", "task_id": 0,
            "parent_ids": json.dumps([int(style), int(content)]), "source_index": i, "seed": 0,
            "params": json.dumps({"generator": "diffusion", "style_id": int(style), "content_id": int(content)}),
        })
    add_images(store, pd.DataFrame(rows))
    out = write_html_report(load_cube(store), store, tmp_path / "diffusion.html", report_dir=demo / "report")
    page, errors, blocked, _ = open_report(browser.new_page, out)
    try:
        page.fill("#task-search", "0")
        page.locator("#task-list li:visible").first.click()
        grid = page.locator("#task-view .gen[data-source='diffusion'] table.grid")
        grid.wait_for()
        assert grid.locator("tr").first.locator(".style").count() == 3
        assert grid.locator("th .content").count() == 2
        assert grid.locator(".synth").count() == 6
        assert grid.locator(".synth .ph").count() == 1 and grid.locator(".synth img").count() == 5
        n, broken = _all_images_loaded(page)
        assert n > 0 and not broken, broken
        assert not errors and not blocked, (errors, blocked)
        page.locator("#task-view .gen[data-source='diffusion']").screenshot(path=str(ARTIFACTS / "html_report_diffusion.png"))
    finally:
        page.close()
