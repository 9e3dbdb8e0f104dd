"""Size and load time of an HTML report in headless Chromium (Playwright, network blocked).

    python scripts/measure_html_report.py swsa-demo/report/report.html
    python scripts/measure_html_report.py --paper-store /tmp/paper.h5 /tmp/paper.html   # builds both if missing

Load time = from ``page.goto`` to the ``load`` event, the report's script having run, and two
animation frames (the first render); the median of ``--repeats`` fresh pages is printed, with
the time to open the first task.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def build_paper_report(store: Path, html: Path, task_fraction: float) -> dict:
    from swsa_engine.app.bench import make_paper_store
    from swsa_engine.report.html import write_html_report
    from swsa_engine.run.cube_io import load_cube
    from swsa_engine.run.sweep import run_sweep

    timings = {}
    if not store.exists():
        started = time.perf_counter()
        make_paper_store(store, task_fraction=task_fraction, progress=False)
        timings["make_store_s"] = time.perf_counter() - started
    try:
        cube = load_cube(store)
    except Exception:
        started = time.perf_counter()
        cube = run_sweep(store, progress=False)
        timings["sweep_s"] = time.perf_counter() - started
    started = time.perf_counter()
    write_html_report(cube, store, html, title="SWSA — paper-shaped bench store")
    timings["write_html_s"] = time.perf_counter() - started
    timings["tasks"] = len(cube.tasks)
    return timings


def measure(html: Path, repeats: int) -> dict:
    from playwright.sync_api import sync_playwright
    from test_html_report import CHROMIUM, LAUNCH_ARGS, open_report

    user_data = tempfile.mkdtemp(prefix="swsa-chromium-")
    loads, opens = [], []
    try:
        with sync_playwright() as p:
            context = p.chromium.launch_persistent_context(user_data, executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
            for _ in range(repeats):
                page, errors, blocked, seconds = open_report(context.new_page, html)
                assert not errors and not blocked, (errors, blocked)
                loads.append(seconds)
                started = time.perf_counter()
                page.locator("#task-list li").first.click()
                page.locator("#task-view article.task").wait_for()
                opens.append(time.perf_counter() - started)
                page.close()
            context.close()
    finally:
        shutil.rmtree(user_data, ignore_errors=True)
    return {"html": str(html), "bytes": os.path.getsize(html), "MB": round(os.path.getsize(html) / 1e6, 2),
            "load_and_first_render_s": round(statistics.median(loads), 3), "open_first_task_s": round(statistics.median(opens), 3),
            "repeats": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path)
    parser.add_argument("--paper-store", type=Path, help="build a paper-shaped store here (if missing) and its report at HTML")
    parser.add_argument("--task-fraction", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    result = {}
    if args.paper_store:
        result["build"] = build_paper_report(args.paper_store, args.html, args.task_fraction)
    result.update(measure(args.html, args.repeats))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
