"""One self-contained HTML report that a person explores in a browser.

:func:`write_html_report` writes a single ``.html`` file with its styles, script, figures and
image thumbnails inside it (data URIs); it opens from disk with no network. It shows

* the overview: Table 1 (model selection), Table 2 (Kendall's tau), Table 3 (total variation)
  when computed — sortable by clicking a header and filterable by dataset, setting, source and
  strategy — and Figure 3 (real vs synthetic AUROC per candidate) per dataset and setting,
  drawn as inline SVG from the same numbers, plus the Figure 3/4 PNGs when present;
* one section per task, built on demand from the task's embedded JSON when it is opened
  (searchable by class name): seed images, the synthetic anomalies per generator (diffusion:
  style images as a row, content images as a column, each pair's result in the grid, as in the
  SWSA paper's Figure 2; CutPaste: each result beside its parent image), a sample of the real
  normal and anomalous validation images, every candidate's synthetic and real AUROC with
  SWSA's and the oracle's pick, the t-SNE figure when the task is in it, and recorded skips.

Every number shown is formatted in Python from the same DataFrames that ``write_report``
writes to CSV (read back from ``report_dir`` when given), so the HTML and the CSV agree.
Images without a readable file (e.g. the paper-shaped bench store, whose paths are empty) are
shown as "no image file" placeholders, never as broken images.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from swsa_engine.report.summary import RANDOM_CANDIDATES_NOTE, _all_skips, _random_candidates, _ReportTables, table1_display
from swsa_engine.core.selection import per_task_picks, ranking_table, selection_table
from swsa_engine.run.sweep import SETTINGS, AurocCube

#: Filterable columns of the overview tables.
FILTER_COLUMNS = ("dataset", "setting", "source", "strategy")


# --------------------------------------------------------------------------- formatting


def fmt_number(value, digits: int = 3) -> str:
    """How every float is shown: ``digits`` decimals, "–" for NaN / missing."""
    if value is None:
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        return "–" if math.isnan(value) else f"{float(value):.{digits}f}"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return str(value)


def _fmt_p(value) -> str:
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return "–"
    return f"{float(value):.3g}"


def _raw(value) -> str:
    """The exact value behind a cell (for sorting and for checking against the CSV)."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "1" if value else "0"
    if isinstance(value, (float, np.floating)):
        return "" if math.isnan(value) else repr(float(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return str(value)


#: Per-column display formats of the overview tables (default: 3 decimals for floats).
COLUMN_FORMATS = {"p_value": _fmt_p, "bonferroni_threshold": _fmt_p, "picks": lambda v: fmt_number(v, 1)}


def html_table(frame: pd.DataFrame, table_id: str, formats: dict | None = None) -> str:
    """A sortable ``<table>``: every cell's text formatted in Python, its exact value in ``data-v``."""
    formats = {**COLUMN_FORMATS, **(formats or {})}
    head = "".join(
        f'<th data-col="{html.escape(str(c))}" title="click to sort">{html.escape(str(c))}</th>' for c in frame.columns
    )
    body = []
    for row in frame.itertuples(index=False):
        cells = []
        for column, value in zip(frame.columns, row):
            text = formats.get(column, fmt_number)(value)
            numeric = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
            cls = ' class="num"' if numeric else ""
            cells.append(f'<td data-v="{html.escape(_raw(value))}"{cls}>{html.escape(text)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<table id="{table_id}" class="data"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


# --------------------------------------------------------------------------- images


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def thumbnail(path: str | os.PathLike | None, size: int = 64) -> str | None:
    """A small PNG or JPEG (whichever is smaller) data URI of the image at ``path``; None when
    there is no readable image file."""
    if not path:
        return None
    try:
        from PIL import Image

        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((size, size))
            best = None
            for fmt, mime, kwargs in (("PNG", "image/png", {"optimize": True}), ("JPEG", "image/jpeg", {"quality": 80})):
                buffer = io.BytesIO()
                image.save(buffer, fmt, **kwargs)
                if best is None or buffer.tell() < len(best[0]):
                    best = (buffer.getvalue(), mime)
        return _data_uri(*best)
    except Exception:  # missing, unreadable or not an image: shown as a placeholder
        return None


def _file_uri(path: Path | None) -> str | None:
    if path is None or not Path(path).is_file():
        return None
    return _data_uri(Path(path).read_bytes(), "image/png")


# --------------------------------------------------------------------------- data


def _read_csv(directory: Path | None, name: str) -> pd.DataFrame | None:
    if directory is None:
        return None
    path = Path(directory) / name
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path, keep_default_na=True)
    except pd.errors.EmptyDataError:
        return None


def _figure3_data(cube: AurocCube) -> dict:
    """Per dataset × setting: each candidate's mean real AUROC and mean synthetic AUROC per source."""
    out = {"candidates": cube.candidate_names, "sources": list(cube.sources), "panels": []}
    for dataset in sorted(cube.tasks["dataset"].unique()):
        rows = cube.tasks["dataset"].to_numpy() == dataset
        for s, setting in enumerate(SETTINGS):
            with np.errstate(all="ignore"), _quiet():
                real = np.nanmean(cube.real[rows, :, s], axis=0)
                synthetic = {src: np.nanmean(cube.synthetic[rows, :, v], axis=0) for v, src in enumerate(cube.sources)}
            out["panels"].append({
                "dataset": dataset, "setting": setting, "real": _floats(real),
                "synthetic": {k: _floats(v) for k, v in synthetic.items()},
            })
    return out


class _quiet:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


def _floats(values) -> list:
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(values, dtype=np.float64)]


def _sample(ids: np.ndarray, n: int) -> np.ndarray:
    """``n`` ids spread evenly over ``ids`` (deterministic)."""
    ids = np.asarray(ids)
    if len(ids) <= n:
        return ids
    return ids[np.linspace(0, len(ids) - 1, n).round().astype(int)]


class _StoreImages:
    """What the task sections read from the store: the images (their thumbnails, cached by id),
    each task's members and synthetic images, and the store's task table. Without a store
    (``store_path`` None or missing) every lookup is empty and every thumbnail None."""

    def __init__(self, store_path: str | os.PathLike | None, thumb_size: int):
        from swsa_store import open_store

        images = members = self.store_tasks = None
        if store_path is not None and Path(store_path).exists():
            with open_store(store_path) as store:
                images, members, self.store_tasks = store.images(), store.task_members(), store.tasks()
        self.store_path, self.thumb_size = store_path, thumb_size
        self.paths = images["path"].to_numpy() if images is not None else np.empty(0, dtype=object)
        self.status = images["status"].to_numpy() if images is not None else np.empty(0, dtype=object)
        self.members_by_task = _groups(members, "task_id")
        synthetic = images[(images["kind"] != "real") & (images["task_id"] >= 0)] if images is not None else None
        self.synthetic_by_task = _groups(synthetic, "task_id")
        #: synthetic image id -> the task it was made for
        self.task_of_synthetic = dict(zip(synthetic["image_id"], synthetic["task_id"])) if synthetic is not None else {}
        self._thumbs: dict[int, str | None] = {}

    def thumb(self, image_id: int) -> str | None:
        """The thumbnail data URI of ``image_id``; None when it has no readable file."""
        from swsa_store.catalog import resolve_path

        image_id = int(image_id)
        if image_id not in self._thumbs:
            paths, status = self.paths, self.status
            ok = 0 <= image_id < len(paths) and status[image_id] == "ok" and paths[image_id]
            self._thumbs[image_id] = thumbnail(resolve_path(self.store_path, paths[image_id]), self.thumb_size) if ok else None
        return self._thumbs[image_id]


class _TaskThumbs:
    """The thumbnails one task's payload carries, keyed by image id (a string), in the order the
    payload first names them."""

    def __init__(self, images: _StoreImages):
        self.images = images
        self.by_id: dict[str, str | None] = {}

    def use(self, image_id) -> int:
        """Carry ``image_id``'s thumbnail; returns the id as an int."""
        self.by_id[str(int(image_id))] = self.images.thumb(image_id)
        return int(image_id)


def _groups(frame: pd.DataFrame | None, column: str) -> dict:
    """``frame``'s rows grouped by ``column``: value -> sub-frame; empty for None or no rows."""
    if frame is None or not len(frame):
        return {}
    return {k: g for k, g in frame.groupby(column)}


def _records(groups: dict, task_id: int) -> list[dict]:
    """The rows of ``task_id``'s group as dicts; none when it has no group."""
    return groups[task_id].to_dict(orient="records") if task_id in groups else []


def _task_entry(task_id: int, dataset, normal_class, state: str) -> dict:
    """A task's line in the task index (and the head of its payload)."""
    return {"id": task_id, "dataset": str(dataset), "cls": str(normal_class), "status": state}


def _skips_by_task(skips: pd.DataFrame, task_of_synthetic: dict) -> dict:
    """The skips grouped by task: a skip of a synthetic image (task_id -1) counts for the task
    the image was made for."""
    skips = skips.copy()
    if len(skips):
        skips["task_of"] = [int(t) if int(t) >= 0 else int(task_of_synthetic.get(int(i), -1))
                            for t, i in zip(skips["task_id"], skips["image_id"])]
    return _groups(skips, "task_of")


def _skip_rows(skips_by_task: dict, task_id: int) -> list[list]:
    """[stage, image id, candidate, reason] per skip recorded for ``task_id``."""
    return [[str(r["stage"]), int(r["image_id"]), str(r["candidate"]), str(r["reason"])]
            for r in _records(skips_by_task, task_id)]


def _real_images(members: pd.DataFrame | None, thumbs: _TaskThumbs, n_real: int) -> tuple[list, list, list]:
    """A task's seed ids, ``n_real`` sampled real normal ids and ``n_real`` sampled
    [real anomaly id, its group]; all empty without the task's ``members``."""
    from swsa_store.tasks import ROLE_REAL_ANOMALY, ROLE_REAL_NORMAL, ROLE_SEED

    if members is None:
        return [], [], []
    use = thumbs.use
    seeds = [use(i) for i in np.sort(members.loc[members["role"] == ROLE_SEED, "image_id"].to_numpy())]
    normals = [use(i) for i in _sample(np.sort(members.loc[members["role"] == ROLE_REAL_NORMAL, "image_id"].to_numpy()), n_real)]
    anomaly_rows = members[members["role"] == ROLE_REAL_ANOMALY].sort_values(["group", "image_id"])
    chosen = _sample(np.arange(len(anomaly_rows)), n_real)
    anomalies = [[use(i), str(g)] for i, g in zip(anomaly_rows["image_id"].to_numpy()[chosen],
                                                  anomaly_rows["group"].to_numpy()[chosen])]
    return seeds, normals, anomalies


def _generators(made: pd.DataFrame | None, thumbs: _TaskThumbs, max_per_generator: int) -> list[dict]:
    """Per generator (image kind, sorted) of a task's synthetic images ``made``: its first
    ``max_per_generator`` images, their layout and its total count."""
    generators = []
    if made is None:
        return generators
    for source, rows in made.groupby("kind", sort=True):
        rows = rows.sort_values(["source_index", "image_id"])
        items, layout = _generator_items(rows.head(max_per_generator), thumbs)
        generators.append({"source": str(source), "layout": layout, "total": int(len(rows)), "items": items})
    return generators


def _generator_items(rows: pd.DataFrame, thumbs: _TaskThumbs) -> tuple[list[dict], str]:
    """One item per synthetic image (its id, parents, and style and content ids for diffusion)
    and the generator's layout: "diffusion" (style × content grid), "pairs" (beside its parents)
    or "plain"."""
    use = thumbs.use
    items, layout = [], "plain"
    for image_id, parents, params in zip(rows["image_id"], rows["parent_ids"], rows["params"]):
        try:
            parents = [int(p) for p in json.loads(parents or "[]")]
            params = json.loads(params or "{}")
        except (ValueError, TypeError):
            parents, params = [], {}
        item = {"id": use(image_id), "parents": [use(p) for p in parents]}
        if "style_id" in params and "content_id" in params:
            item["style"], item["content"] = use(params["style_id"]), use(params["content_id"])
            layout = "diffusion"
        elif parents and layout == "plain":
            layout = "pairs"
        items.append(item)
    return items, layout


def _auroc_payload(cube: AurocCube, t: int, closest: np.ndarray, base: list[str]) -> dict:
    """Task row ``t``'s formatted AUROCs: per candidate, per source (synthetic) and setting (real)."""
    return {
        "candidates": cube.candidate_names,
        "synthetic": {src: [fmt_number(v) for v in cube.synthetic[t, :, i]] for i, src in enumerate(cube.sources)},
        "real": {setting: [fmt_number(v) for v in cube.real[t, :, s]] for s, setting in enumerate(SETTINGS)},
        "closest": [str(c) for c in closest[t]],
        "base": list(base),
    }


def _picks_payload(picks: list[dict]) -> list[dict]:
    """A task's rows of ``tasks.csv`` (one per setting and source), formatted."""
    return [{
        "setting": row["setting"], "source": row["source"], "swsa": row["swsa_pick"],
        "swsa_synth": fmt_number(row["swsa_pick_synthetic_auroc"]), "swsa_real": fmt_number(row["swsa_pick_real_auroc"]),
        "oracle": row["oracle_pick"], "oracle_real": fmt_number(row["oracle_real_auroc"]), "hit": bool(row["hit"]),
    } for row in picks]


def _task_payloads(cube, store_path, picks, skips, *, thumb_size, max_per_generator, n_real, tsne_tasks):
    """Yield (task_id, index entry, JSON payload) per task, in the cube's task order, then the
    store's skipped tasks."""
    images = _StoreImages(store_path, thumb_size)
    picks_by_task = _groups(picks, "task_id")
    skips_by_task = _skips_by_task(skips, images.task_of_synthetic)
    closest = cube.closest_class()
    base = cube.config.get("base_sources", [s for s in cube.sources if "@" not in s])
    for t in range(len(cube.tasks)):
        task_id = int(cube.tasks["task_id"].iloc[t])
        entry = _task_entry(task_id, cube.tasks["dataset"].iloc[t], cube.tasks["normal_class"].iloc[t], "ok")
        thumbs = _TaskThumbs(images)
        seeds, normals, anomalies = _real_images(images.members_by_task.get(task_id), thumbs, n_real)
        generators = _generators(images.synthetic_by_task.get(task_id), thumbs, max_per_generator)
        payload = {
            **entry, "seeds": seeds, "generators": generators, "normals": normals, "anomalies": anomalies,
            "auroc": _auroc_payload(cube, t, closest, base), "picks": _picks_payload(_records(picks_by_task, task_id)),
            "skips": _skip_rows(skips_by_task, task_id), "tsne": task_id in tsne_tasks, "thumbs": thumbs.by_id,
        }
        yield task_id, entry, payload
    if images.store_tasks is not None:
        yield from _unscored_payloads(cube, images.store_tasks, skips_by_task)


def _unscored_payloads(cube: AurocCube, store_tasks: pd.DataFrame, skips_by_task: dict):
    """Yield (task_id, index entry, JSON payload) per store task that ``cube`` has no AUROCs for:
    skipped, or not scored yet."""
    scored = set(int(i) for i in cube.tasks["task_id"])
    for row in store_tasks.to_dict(orient="records"):
        if int(row["task_id"]) in scored:
            continue
        task_id = int(row["task_id"])
        state = "skipped" if row.get("status", "ok") != "ok" else "not scored"
        entry = _task_entry(task_id, row["dataset"], row["normal_class"], state)
        payload = {**entry, "reason": str(row.get("skip_reason", "")),
                   "seeds": [], "generators": [], "normals": [], "anomalies": [], "auroc": None, "picks": [],
                   "skips": _skip_rows(skips_by_task, task_id), "tsne": False, "thumbs": {}}
        yield task_id, entry, payload


def _json_script(element_id: str, value) -> str:
    text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    text = text.replace("</", "<\\/")  # never close the script element early
    return f'<script type="application/json" id="{element_id}">{text}</script>'


# --------------------------------------------------------------------------- the report


def write_html_report(
    cube: AurocCube,
    store_path: str | os.PathLike | None,
    path: str | os.PathLike,
    *,
    report_dir: str | os.PathLike | None = None,
    store_skips: pd.DataFrame | None = None,
    title: str = "SWSA report",
    notes: list[str] | None = None,
    thumb_size: int = 64,
    max_per_generator: int = 30,
    n_real: int = 8,
) -> Path:
    """Write the self-contained HTML report of ``cube`` to ``path``; returns the path.

    ``report_dir``: a folder written by :func:`swsa_engine.report.summary.write_report`; its CSV tables
    (table1/2/3, tasks, skips) and PNG figures (figure3, figure4) are shown as they are, so the
    HTML's numbers equal the CSV's. Without it, Tables 1 and 2 and the per-task picks are
    computed from ``cube`` with the same functions. ``store_path`` gives the images (thumbnails
    of ``thumb_size`` px) and the tasks' members; ``max_per_generator`` synthetic images per
    generator and ``n_real`` real normal / anomalous images are shown per task.
    """
    report_dir = Path(report_dir) if report_dir is not None else None
    tables = _report_tables(cube, report_dir, store_skips)
    figures = _ReportFigures.read(cube, report_dir)
    index, sections = [], []
    for task_id, entry, payload in _task_payloads(
        cube, store_path, tables.picks, tables.skips, thumb_size=thumb_size, max_per_generator=max_per_generator,
        n_real=n_real, tsne_tasks=figures.tsne_tasks,
    ):
        index.append(entry)
        sections.append(_json_script(f"task-{task_id}", payload))
    random_candidates = _random_candidates(cube)
    meta = {
        "title": title, "candidates": cube.candidate_names, "sources": list(cube.sources), "settings": list(SETTINGS),
        "random_candidates": random_candidates, "k": cube.config.get("k"), "n_tasks": len(cube.tasks),
        "thumb_size": thumb_size, "max_per_generator": max_per_generator,
    }
    parts = [
        *_page_head(title), *_intro_html(cube, notes, random_candidates), *_tables_html(tables), *_figures_html(figures),
        *_tasks_html(thumb_size, max_per_generator, n_real),
        _json_script("meta", meta), _json_script("task-index", index), _json_script("fig3-data", _figure3_data(cube)),
        *sections,
        f"<script>{_JS}</script></body></html>",
    ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _report_tables(cube: AurocCube, report_dir: Path | None, store_skips: pd.DataFrame | None) -> _ReportTables:
    """The tables as ``write_report`` wrote them to ``report_dir``; each one missing there is
    computed from ``cube`` (and ``store_skips``), except Table 3, which stays None."""
    table1 = _read_csv(report_dir, "table1.csv")
    table1 = selection_table(cube) if table1 is None else table1
    table2 = _read_csv(report_dir, "table2.csv")
    table2 = ranking_table(cube) if table2 is None else table2
    table3 = _read_csv(report_dir, "table3.csv")
    picks = _read_csv(report_dir, "tasks.csv")
    picks = per_task_picks(cube) if picks is None else picks
    skips = _read_csv(report_dir, "skips.csv")
    if skips is None:
        skips = _all_skips(cube, store_skips)
    skips = skips.fillna({"candidate": "", "reason": "", "stage": ""})
    return _ReportTables(table1, table2, picks, skips, table3)


@dataclass
class _ReportFigures:
    """``report_dir``'s Figure 3 and Figure 4 PNGs as data URIs (None where absent) and the ids
    of the tasks Figure 4 shows."""

    figure3_png: str | None
    figure4_png: str | None
    tsne_tasks: set[int]

    @classmethod
    def read(cls, cube: AurocCube, report_dir: Path | None) -> _ReportFigures:
        figure3_png = _file_uri(report_dir / "figure3.png") if report_dir else None
        figure4_png = _file_uri(report_dir / "figure4.png") if report_dir else None
        tsne_tasks: set[int] = set()
        if figure4_png:
            from swsa_engine.report.distribution import sample_tasks

            tsne_tasks = {int(cube.tasks["task_id"].iloc[r]) for r in sample_tasks(cube, 1, 0)}
        return cls(figure3_png, figure4_png, tsne_tasks)


def _page_head(title: str) -> list[str]:
    """From the doctype to the opening of the overview section."""
    return [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">', f"<title>{html.escape(title)}</title>", f"<style>{_CSS}</style></head><body>",
        f'<header><h1>{html.escape(title)}</h1><nav><a href="#overview">Overview</a> · <a href="#tasks">Tasks</a></nav></header>',
        '<main><section id="overview"><h2>Overview</h2>',
    ]


def _intro_html(cube: AurocCube, notes: list[str] | None, random_candidates: list[str]) -> list[str]:
    """The warning about random candidates, the notes, one sentence on what was scored and the
    (script-filled) filter bar."""
    parts = []
    if random_candidates:
        parts.append(f'<p class="warn"><b>Randomly initialised candidates:</b> {html.escape(", ".join(random_candidates))}. '
                     f"{html.escape(RANDOM_CANDIDATES_NOTE)}</p>")
    for note in notes or []:
        parts.append(f"<p class=note>{html.escape(note)}</p>")
    parts.append(
        f"<p>{len(cube.tasks)} tasks over {cube.tasks['dataset'].nunique()} dataset(s); {len(cube.candidates)} candidates: "
        f"{html.escape(', '.join(cube.candidate_names))}; synthetic validation sources: {html.escape(', '.join(cube.sources))}; "
        f"kNN score with k = {html.escape(str(cube.config.get('k')))}.</p>"
    )
    parts.append('<div id="filters" class="filters"></div>')
    return parts


def _tables_html(tables: _ReportTables) -> list[str]:
    """Tables 1 and 2, and Table 3 when it was computed, with their captions."""
    shown1 = table1_display(tables.table1)
    shown1.insert(4, "pick_rate", tables.table1["pick_rate"].to_numpy())
    parts = [
        "<h3>Table 1 — model selection</h3>",
        "<p class=cap>Pick rate = tasks where the strategy picks a candidate with the best real AUROC (ties count); "
        "AUROC of pick = mean real AUROC of the picked candidate; best possible = mean best real AUROC.</p>",
        html_table(shown1, "table1"),
        "<h3>Table 2 — ranking agreement (Kendall's tau)</h3>",
        "<p class=cap>Kendall's tau-b between the candidates' synthetic and real AUROCs (averaged over tasks), its "
        "p-value and significance after Bonferroni correction; mean_task_tau averages the per-task taus.</p>",
        html_table(tables.table2, "table2"),
    ]
    if tables.table3 is not None:
        parts += [
            "<h3>Table 3 — total variation between real and synthetic validation sets</h3>",
            "<p class=cap>TV = Σ|p_i − q_i| of k-means cluster histograms (0 = same, 2 = disjoint).</p>",
            html_table(tables.table3, "table3"),
        ]
    return parts


def _figures_html(figures: _ReportFigures) -> list[str]:
    """Figure 3 (drawn by the script, plus the PNG when present), Figure 4 when present, and the
    end of the overview section."""
    parts = [
        "<h3>Figure 3 — real vs synthetic AUROC per candidate</h3>",
        '<p class=cap>Mean over each dataset\'s tasks; one panel per dataset and setting; the dashed line is y = x. '
        'Synthetic source: <select id="fig3-source"></select></p>',
        '<div id="fig3" class="panels"></div>',
    ]
    if figures.figure3_png:
        parts.append(f'<details><summary>Figure 3 as rendered for the Markdown report</summary><img class="fig" alt="figure 3" src="{figures.figure3_png}"></details>')
    if figures.figure4_png:
        parts += ["<h3>Figure 4 — t-SNE of one task per dataset</h3>",
                  f'<img id="figure4" class="fig" alt="figure 4" src="{figures.figure4_png}">']
    parts.append("</section>")
    return parts


def _tasks_html(thumb_size: int, max_per_generator: int, n_real: int) -> list[str]:
    """The tasks section (filled by the script from the task payloads) and the footer."""
    return [
        '<section id="tasks"><h2>Tasks</h2>',
        '<p><input id="task-search" type="search" placeholder="search a class name…" autocomplete="off" size="40"> '
        '<span id="task-count"></span></p>',
        '<div class="task-layout"><ul id="task-list"></ul><div id="task-view"><p class=cap>Open a task to see its '
        "images and results.</p></div></div></section></main>",
        f'<footer>Written by swsa. Thumbnails {thumb_size} px; up to {max_per_generator} synthetic images per generator '
        f"and {n_real} real normal / anomalous images per task are shown.</footer>",
    ]


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#243447;color:#fff;padding:10px 20px}header h1{margin:0;font-size:20px}header a{color:#cde}
main{padding:0 20px 40px}footer{padding:10px 20px;color:#666;font-size:12px}
h2{border-bottom:2px solid #243447;padding-bottom:2px}h3{margin-bottom:4px}
.cap{color:#555;font-size:13px;margin:2px 0 6px}.warn{background:#fff3cd;border:1px solid #e0c36c;padding:6px 10px}
.note{color:#444;font-size:13px}
table.data{border-collapse:collapse;font-size:13px;background:#fff}
table.data th,table.data td{border:1px solid #ddd;padding:3px 7px;text-align:left}
table.data th{background:#eef1f5;cursor:pointer;user-select:none;white-space:nowrap}
table.data th.asc:after{content:" ▲"}table.data th.desc:after{content:" ▼"}
table.data td.num{text-align:right;font-variant-numeric:tabular-nums}
table.data tr:nth-child(even) td{background:#f8f9fb}
.filters{display:flex;gap:14px;flex-wrap:wrap;margin:8px 0;padding:6px 10px;background:#eef1f5;border-radius:4px}
.filters label{font-size:13px}
.panels{display:flex;flex-wrap:wrap;gap:10px}.panel{background:#fff;border:1px solid #ddd}
.fig{max-width:100%;border:1px solid #ddd;background:#fff}
.task-layout{display:flex;gap:16px;align-items:flex-start}
#task-list{list-style:none;margin:0;padding:0;width:240px;max-height:80vh;overflow:auto;border:1px solid #ddd;background:#fff;flex:none}
#task-list li{padding:3px 8px;cursor:pointer;border-bottom:1px solid #eee}#task-list li:hover{background:#eef1f5}
#task-list li.active{background:#d6e4f5}#task-list .ds{color:#888;font-size:12px}
#task-view{flex:1;min-width:0}
.thumbs{display:flex;flex-wrap:wrap;gap:4px;margin:4px 0 10px}
.thumb{display:inline-flex;flex-direction:column;align-items:center;font-size:10px;color:#666}
.thumb img,.ph{width:var(--t);height:var(--t);object-fit:contain;image-rendering:pixelated;border:1px solid #ccc;background:#fff}
.ph{display:flex;align-items:center;justify-content:center;text-align:center;font-size:9px;color:#999;background:#f0f0f0}
.pair{display:inline-flex;align-items:center;gap:2px;border:1px solid #e3e3e3;padding:2px;background:#fff}
.pair .arrow{color:#999}
table.grid{border-collapse:collapse}table.grid td,table.grid th{padding:2px;font-size:10px;color:#666;font-weight:normal}
table.grid th.corner{text-align:right}
.gen{margin:6px 0 14px}.gen h5{margin:2px 0}
tr.swsa td{outline:none}.badge{display:inline-block;padding:0 5px;border-radius:3px;font-size:11px;margin-left:3px}
.b-swsa{background:#d9ecd9}table.picks{margin-top:8px}.nowrap{white-space:nowrap}.scroll{overflow-x:auto;max-width:100%}.b-oracle{background:#f3dfc1}
"""


_JS = r"""
(function(){
'use strict';
const $=(s,r)=>(r||document).querySelector(s), $$=(s,r)=>Array.from((r||document).querySelectorAll(s));
const data=id=>JSON.parse(document.getElementById(id).textContent);
const esc=s=>String(s).replace(/[&<>"']/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c]));
const meta=data('meta');
document.documentElement.style.setProperty('--t', meta.thumb_size+'px');

// ---- sortable tables
$$('table.data').forEach(table=>{
  $$('th',table).forEach((th,col)=>th.addEventListener('click',()=>{
    const asc=!th.classList.contains('asc');
    $$('th',table).forEach(h=>h.classList.remove('asc','desc'));
    th.classList.add(asc?'asc':'desc');
    const body=table.tBodies[0], rows=Array.from(body.rows);
    const key=r=>r.cells[col].dataset.v;
    const numeric=rows.every(r=>key(r)===''||!isNaN(parseFloat(key(r))));
    rows.sort((a,b)=>{
      let x=key(a),y=key(b);
      if(numeric){x=x===''?-Infinity:parseFloat(x);y=y===''?-Infinity:parseFloat(y);return asc?x-y:y-x;}
      return asc?x.localeCompare(y):y.localeCompare(x);
    });
    rows.forEach(r=>body.appendChild(r));
  }));
});

// ---- filters by dataset, setting, source, strategy
const FILTERS=['dataset','setting','source','strategy'], chosen={};
const filterBox=$('#filters');
FILTERS.forEach(name=>{
  const values=new Set();
  $$('table.data').forEach(t=>{
    const col=$$('th',t).findIndex(th=>th.dataset.col===name);
    if(col<0)return;
    Array.from(t.tBodies[0].rows).forEach(r=>values.add(r.cells[col].dataset.v));
  });
  if(!values.size)return;
  const label=document.createElement('label');
  label.innerHTML=esc(name)+' <select data-filter="'+esc(name)+'"><option value="">all</option>'+
    Array.from(values).sort().map(v=>'<option>'+esc(v)+'</option>').join('')+'</select>';
  filterBox.appendChild(label);
});
filterBox.addEventListener('change',e=>{
  const sel=e.target; if(!sel.dataset.filter)return;
  chosen[sel.dataset.filter]=sel.value; applyFilters();
});
function applyFilters(){
  $$('table.data').forEach(t=>{
    const cols={}; $$('th',t).forEach((th,i)=>cols[th.dataset.col]=i);
    Array.from(t.tBodies[0].rows).forEach(r=>{
      r.hidden=!Object.entries(chosen).every(([k,v])=>!v||!(k in cols)||r.cells[cols[k]].dataset.v===v);
    });
  });
  drawFigure3();
}

// ---- Figure 3 as inline SVG
const fig3=data('fig3-data'), srcSel=$('#fig3-source');
fig3.sources.forEach(s=>{const o=document.createElement('option');o.textContent=s;srcSel.appendChild(o);});
srcSel.addEventListener('change',drawFigure3);
function scatter(xs,ys,labels,title,w,h){
  const pts=[];xs.forEach((x,i)=>{if(x!==null&&ys[i]!==null)pts.push([x,ys[i],labels[i]]);});
  let lo=1,hi=0;pts.forEach(p=>{lo=Math.min(lo,p[0],p[1]);hi=Math.max(hi,p[0],p[1]);});
  if(!pts.length){lo=0;hi=1;}
  const pad=Math.max(0.02,0.08*(hi-lo));lo-=pad;hi+=pad;
  const m=36,X=v=>m+(v-lo)/(hi-lo)*(w-m-10),Y=v=>h-m+10-(v-lo)/(hi-lo)*(h-m-10);
  let s='<svg xmlns="http://www.w3.org/2000/svg" class="panel" width="'+w+'" height="'+h+'" viewBox="0 0 '+w+' '+h+'">';
  s+='<text x="'+(w/2)+'" y="13" font-size="11" text-anchor="middle">'+esc(title)+'</text>';
  s+='<line x1="'+X(lo)+'" y1="'+Y(lo)+'" x2="'+X(hi)+'" y2="'+Y(hi)+'" stroke="#999" stroke-dasharray="4 3"/>';
  s+='<rect x="'+m+'" y="20" width="'+(w-m-10)+'" height="'+(h-m-10)+'" fill="none" stroke="#ccc"/>';
  [lo,(lo+hi)/2,hi].forEach(v=>{s+='<text x="'+X(v)+'" y="'+(h-m+22)+'" font-size="9" text-anchor="middle">'+v.toFixed(2)+'</text>'+
    '<text x="'+(m-3)+'" y="'+(Y(v)+3)+'" font-size="9" text-anchor="end">'+v.toFixed(2)+'</text>';});
  s+='<text x="'+(w/2)+'" y="'+(h-4)+'" font-size="10" text-anchor="middle">synthetic AUROC</text>';
  s+='<text transform="translate(10 '+(h/2)+') rotate(-90)" font-size="10" text-anchor="middle">real AUROC</text>';
  pts.forEach(p=>{s+='<circle cx="'+X(p[0])+'" cy="'+Y(p[1])+'" r="4" fill="#3b75af" stroke="#123"><title>'+esc(p[2])+
    ': synthetic '+p[0].toFixed(3)+', real '+p[1].toFixed(3)+'</title></circle><text x="'+(X(p[0])+5)+'" y="'+(Y(p[1])-4)+
    '" font-size="9">'+esc(p[2])+'</text>';});
  return s+'</svg>';
}
function drawFigure3(){
  const src=srcSel.value||fig3.sources[0];
  $('#fig3').innerHTML=fig3.panels.filter(p=>(!chosen.dataset||p.dataset===chosen.dataset)&&(!chosen.setting||p.setting===chosen.setting))
    .map(p=>scatter(p.synthetic[src]||[],p.real,fig3.candidates,p.dataset+' · '+p.setting+' · '+src,300,260)).join('');
}
drawFigure3();

// ---- tasks: index, search, sections built on demand
const index=data('task-index'), list=$('#task-list'), search=$('#task-search');
list.innerHTML=index.map(t=>'<li data-id="'+t.id+'" data-cls="'+esc(t.cls.toLowerCase())+'" data-ds="'+esc(t.dataset.toLowerCase())+
  '">'+esc(t.cls)+' <span class="ds">'+esc(t.dataset)+(t.status!=='ok'?' · '+esc(t.status):'')+'</span></li>').join('');
function filterTasks(){
  const q=search.value.trim().toLowerCase(); let n=0;
  Array.from(list.children).forEach(li=>{const hit=!q||li.dataset.cls.includes(q)||li.dataset.ds.includes(q);li.hidden=!hit;n+=hit;});
  $('#task-count').textContent=n+' of '+index.length+' tasks';
}
search.addEventListener('input',filterTasks); filterTasks();
list.addEventListener('click',e=>{const li=e.target.closest('li');if(li)openTask(li.dataset.id);});
function img(task,id,cls,caption){
  const uri=task.thumbs[String(id)];
  const inner=uri?'<img alt="image '+id+'" title="image '+id+'" src="'+uri+'">':'<div class="ph" title="image '+id+'">no image file</div>';
  return '<span class="thumb '+(cls||'')+'" data-id="'+id+'">'+inner+(caption!==undefined?'<span>'+esc(caption)+'</span>':'')+'</span>';
}
function generatorHtml(task,g){
  let s='<div class="gen" data-source="'+esc(g.source)+'"><h5>'+esc(g.source)+' — '+g.items.length+
    (g.total>g.items.length?' of '+g.total:'')+' synthetic images</h5>';
  if(g.layout==='diffusion'){
    const styles=[...new Set(g.items.map(i=>i.style))], contents=[...new Set(g.items.map(i=>i.content))];
    const at={};g.items.forEach(i=>at[i.style+'/'+i.content]=i);
    s+='<table class="grid"><tr><th class="corner">content ↓ · style →</th>'+styles.map(st=>'<th>'+img(task,st,'style')+'</th>').join('')+'</tr>';
    contents.forEach(c=>{s+='<tr><th>'+img(task,c,'content')+'</th>'+styles.map(st=>{const i=at[st+'/'+c];
      return '<td>'+(i?img(task,i.id,'synth'):'')+'</td>';}).join('')+'</tr>';});
    s+='</table>';
  }else if(g.layout==='pairs'){
    s+='<div class="thumbs">'+g.items.map(i=>'<span class="pair">'+i.parents.map(p=>img(task,p,'parent')).join('')+
      '<span class="arrow">→</span>'+img(task,i.id,'synth')+'</span>').join('')+'</div>';
  }else{
    s+='<div class="thumbs">'+g.items.map(i=>img(task,i.id,'synth')).join('')+'</div>';
  }
  return s+'</div>';
}
function aurocHtml(task){
  const a=task.auroc; if(!a)return '<p>No AUROCs: '+esc(task.reason||task.status)+'</p>';
  const picks={};task.picks.forEach(p=>picks[p.setting]=p);
  let s='<div class="scroll"><table class="data auroc"><thead><tr><th>candidate</th><th>picked by</th>'+Object.keys(a.synthetic).map(k=>'<th>synthetic · '+esc(k)+'</th>').join('')+
    Object.keys(a.real).map(k=>'<th>real · '+esc(k)+'</th>').join('')+'<th>closest class</th></tr></thead><tbody>';
  a.candidates.forEach((c,i)=>{
    let badges='';Object.values(picks).forEach(p=>{if(p.swsa===c)badges+='<span class="badge b-swsa" title="SWSA pick ('+esc(p.setting)+')">SWSA '+esc(p.setting)+'</span>';
      if(p.oracle===c)badges+='<span class="badge b-oracle" title="oracle pick ('+esc(p.setting)+')">oracle '+esc(p.setting)+'</span>';});
    s+='<tr><td>'+esc(c)+'</td><td class="nowrap">'+(badges||'–')+'</td>'+Object.values(a.synthetic).map(v=>'<td class="num">'+v[i]+'</td>').join('')+
      Object.values(a.real).map(v=>'<td class="num">'+v[i]+'</td>').join('')+'<td>'+esc(a.closest[i])+'</td></tr>';
  });
  s+='</tbody></table></div>';
  if(task.picks.length){
    s+='<table class="data picks"><thead><tr><th>setting</th><th>source</th><th>SWSA pick</th><th>its synthetic AUROC</th><th>its real AUROC</th>'+
      '<th>oracle pick</th><th>best real AUROC</th><th>hit</th></tr></thead><tbody>'+task.picks.map(p=>'<tr><td>'+esc(p.setting)+'</td><td>'+esc(p.source)+
      '</td><td>'+esc(p.swsa)+'</td><td class="num">'+p.swsa_synth+'</td><td class="num">'+p.swsa_real+'</td><td>'+esc(p.oracle)+
      '</td><td class="num">'+p.oracle_real+'</td><td>'+(p.hit?'yes':'no')+'</td></tr>').join('')+'</tbody></table>';
  }
  return s;
}
function openTask(id){
  const el=document.getElementById('task-'+id); if(!el)return;
  const task=JSON.parse(el.textContent);
  $$('#task-list li').forEach(li=>li.classList.toggle('active',li.dataset.id===String(id)));
  let s='<article class="task" data-task="'+task.id+'"><h3>'+esc(task.cls)+' <span class="cap">'+esc(task.dataset)+' · task '+task.id+
    (task.status!=='ok'?' · '+esc(task.status)+': '+esc(task.reason||''):'')+'</span></h3>';
  s+='<h4>Seed images ('+task.seeds.length+')</h4><div class="thumbs seeds">'+task.seeds.map(i=>img(task,i,'seed')).join('')+'</div>';
  s+='<h4>Synthetic anomalies</h4>'+(task.generators.length?task.generators.map(g=>generatorHtml(task,g)).join(''):'<p>none</p>');
  s+='<h4>Real validation images (a sample)</h4><h5>normal</h5><div class="thumbs real-normal">'+task.normals.map(i=>img(task,i,'real')).join('')+
    '</div><h5>anomalous</h5><div class="thumbs real-anomaly">'+task.anomalies.map(a=>img(task,a[0],'real',a[1])).join('')+'</div>';
  s+='<h4>Candidates: synthetic vs real AUROC</h4>'+aurocHtml(task);
  if(task.tsne&&$('#figure4'))s+='<h4>t-SNE (Figure 4; this task is one of its panels)</h4><img class="fig" alt="figure 4" src="'+$('#figure4').src+'">';
  s+='<h4>Recorded skips</h4>'+(task.skips.length?'<table class="data"><thead><tr><th>stage</th><th>image</th><th>candidate</th><th>reason</th></tr></thead><tbody>'+
    task.skips.map(r=>'<tr>'+r.map(v=>'<td>'+esc(v)+'</td>').join('')+'</tr>').join('')+'</tbody></table>':'<p>none</p>');
  $('#task-view').innerHTML=s+'</article>';
  try{if(location.hash!=='#task-'+id)history.replaceState(null,'','#task-'+id);}catch(err){}
}
const m=location.hash.match(/^#task-(\d+)$/); if(m)openTask(m[1]);
document.body.dataset.ready='1';
})();
"""
