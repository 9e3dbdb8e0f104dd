"""Hostile and unusual input (issue 22 items 8-11): image files in every mode Pillow opens
(16-bit, palette, CMYK, LA, GIF, animated, float), score tables with non-integer ids, source
names that would leave the store's files folder, and user text in the report's CSV, Markdown
and HTML. Each is a one-line error, a recorded skip or the right pixels — never a wrong number."""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from swsa_engine.app.cli import main
from swsa_engine.core.cube import AurocCube
from swsa_engine.report.html import write_html_report
from swsa_engine.report.summary import write_report
from swsa_engine.report.tables import FORMULA_START, csv_cell, markdown_table, md_cell, read_csv
from swsa_store import open_store
from swsa_store.auxiliary import sample_auxiliary
from swsa_store.catalog import catalog_dataset
from swsa_store.datasets import DEFAULT_EXTENSIONS
from swsa_store.samples import check_source_name, decode_rgb, inspect_image_file, path_inside, read_image, to_rgb
from swsa_store.scores import ScoreImportError, import_scores
from swsa_store.synthesize import synthesize


def _png(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- item 8: image modes


def test_16bit_greyscale_is_scaled_by_1_over_257_not_clipped(tmp_path):
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 65536, size=(9, 13), dtype=np.uint16)
    wide[0, :6] = [0, 1, 128, 257, 65534, 65535]  # edges and exact multiples of 257
    wide[1, :3] = wide[1, 3:6] = [1000, 1000, 1000]  # ties
    path = tmp_path / "wide.png"
    path.write_bytes(_png(Image.fromarray(wide)))
    assert Image.open(path).mode.startswith("I;16")
    got = np.asarray(read_image(path))
    expected = np.empty(wide.shape, dtype=np.uint8)
    for i in range(wide.shape[0]):  # the naive loop
        for j in range(wide.shape[1]):
            expected[i, j] = round(int(wide[i, j]) / 257)
    assert got.shape == (9, 13, 3)
    for channel in range(3):
        np.testing.assert_array_equal(got[:, :, channel], expected)
    assert got[0, :6, 0].tolist() == [0, 0, 0, 1, 255, 255]
    assert got.mean() < 200  # the old decode clipped nearly every pixel to 255
    # mode "I" (how 16-bit files open in some Pillow versions) and a 16-bit TIFF decode the same
    np.testing.assert_array_equal(np.asarray(to_rgb(Image.fromarray(wide.astype(np.int32), mode="I"))), got)
    tiff = tmp_path / "wide.tif"
    tiff.write_bytes(_png(Image.fromarray(wide), "TIFF"))
    np.testing.assert_array_equal(np.asarray(read_image(tiff)), got)


def test_palette_cmyk_la_and_float_images(tmp_path):
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette_bytes = _png(palette, transparency=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Pillow warning about palette transparency
        decoded = decode_rgb(palette_bytes)
    reference = Image.open(io.BytesIO(palette_bytes)).convert("RGBA")
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(reference)[:, :, :3])
    cmyk = rgb.convert("CMYK")
    np.testing.assert_array_equal(np.asarray(decode_rgb(_png(cmyk, "JPEG", quality=100))).shape, (8, 8, 3))
    np.testing.assert_array_equal(np.asarray(decode_rgb(_png(cmyk, "TIFF"))), np.asarray(cmyk.convert("RGB")))
    la = Image.fromarray(np.stack([np.arange(64, dtype=np.uint8).reshape(8, 8), np.full((8, 8), 7, np.uint8)], 2), "LA")
    got = np.asarray(decode_rgb(_png(la)))
    np.testing.assert_array_equal(got, np.repeat(np.arange(64, dtype=np.uint8).reshape(8, 8, 1), 3, axis=2))
    floats = tmp_path / "float.tif"
    floats.write_bytes(_png(Image.fromarray(rng.random((4, 4)).astype(np.float32), mode="F"), "TIFF"))
    status, reason, digest, width, height = inspect_image_file(floats)
    assert (status, width, height) == ("skipped", 0, 0) and digest
    assert reason.startswith("cannot decode image: ") and "mode F" in reason and "\n" not in reason


def test_gif_is_read_and_animated_gif_gives_its_first_frame(tmp_path, caplog):
    assert ".gif" in DEFAULT_EXTENSIONS
    frames = [Image.fromarray(np.full((6, 6, 3), v, dtype=np.uint8)) for v in (10, 200, 90)]
    animated = tmp_path / "anim.gif"
    frames[0].save(animated, save_all=True, append_images=frames[1:], duration=50, loop=0)
    still = tmp_path / "still.gif"
    frames[1].save(still)
    np.testing.assert_array_equal(np.asarray(read_image(animated)), np.full((6, 6, 3), 10, dtype=np.uint8))
    np.testing.assert_array_equal(np.asarray(read_image(still)), np.full((6, 6, 3), 200, dtype=np.uint8))
    with caplog.at_level(logging.WARNING, logger="swsa_store.samples"):
        assert inspect_image_file(animated)[0] == "ok"
        assert inspect_image_file(still)[0] == "ok"
    notes = [r.getMessage() for r in caplog.records if "animated" in r.getMessage()]
    assert len(notes) == 1 and "3 frames" in notes[0] and "first frame" in notes[0]


# --------------------------------------------------------------------------- a small store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two classes of 10 images each (class ``a`` partly GIFs, one animated), catalogued."""
    root = tmp_path_factory.mktemp("bad-input")
    rng = np.random.default_rng(2)
    for label in ("a", "b"):
        folder = root / "img" / label
        folder.mkdir(parents=True)
        for i in range(10):
            pixels = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
            if label == "a" and i < 3:
                second = Image.fromarray(255 - pixels)
                Image.fromarray(pixels).save(folder / f"{i:02d}.gif", save_all=i == 0, append_images=[second])
            else:
                Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    path = root / "s.h5"
    catalog_dataset(path, "folder", root=root / "img", name="toy", n_seed=3)
    return path


def test_gifs_are_catalogued(store):
    with open_store(store) as s:
        images = s.images()
    gifs = images[images["path"].str.endswith(".gif")]
    assert len(gifs) == 3 and (gifs["status"] == "ok").all() and (gifs["width"] == 16).all()


# --------------------------------------------------------------------------- item 9: import-scores


def _score_table(store) -> pd.DataFrame:
    with open_store(store) as s:
        images, tasks = s.images(), s.tasks()
    task_id = int(tasks["task_id"].iloc[0])
    return pd.DataFrame({"task": task_id, "image_id": images["image_id"].to_numpy()[:4], "score": [0.1, 0.2, 0.3, 0.4]})


@pytest.mark.parametrize("column, value, shown", [
    ("task", 1.7, "task 1.7 is not an integer"),
    ("task", "x", "task 'x' is not an integer"),
    ("task", True, "task True is not an integer"),
    ("image_id", 1e30, "image_id 1e+30 is not an integer"),
    ("image_id", -1e30, "image_id -1e+30 is not an integer"),
    ("image_id", 2.5, "image_id 2.5 is not an integer"),
    ("image_id", float("nan"), "image_id nan is not an integer"),
])
def test_non_integer_ids_name_row_and_value(store, column, value, shown):
    table = _score_table(store)
    table[column] = table[column].astype(object)
    table.loc[1, column] = value
    before = _digest(store)
    with pytest.raises(ScoreImportError) as info:
        import_scores(store, "mine", table)
    message = str(info.value)
    assert message == f"row 3: {shown}", message
    assert "9223372036854775808" not in message
    assert _digest(store) == before


def test_huge_image_id_from_a_csv_is_refused_not_wrapped(store, tmp_path, capsys):
    table = _score_table(store)
    path = tmp_path / "scores.csv"
    table.to_csv(path, index=False)
    lines = path.read_text().splitlines()
    fields = lines[2].split(",")
    fields[1] = "1e30"
    lines[2] = ",".join(fields)
    path.write_text("\n".join(lines) + "\n")
    assert main(["import-scores", "--store", str(store), "--candidate", "mine", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "swsa: error: row 3: image_id 1e+30 is not an integer", err


def test_import_errors_are_one_line_keep_their_cause_and_no_h5py_text(store, tmp_path):
    with pytest.raises(ScoreImportError, match=r"^candidate name '\.' cannot name a candidate"):
        import_scores(store, ".", _score_table(store))
    with pytest.raises(ScoreImportError, match="cannot name a candidate"):
        import_scores(store, "a\x00b", _score_table(store))
    folder = tmp_path / "a-folder.csv"
    folder.mkdir()
    with pytest.raises(ScoreImportError) as info:
        import_scores(store, "mine", folder)
    assert str(info.value).startswith(f"cannot read score file {folder}: ") and "\n" not in str(info.value)
    assert info.value.__cause__ is not None  # --debug shows the library's own error
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(ScoreImportError) as info:
        import_scores(store, "mine", broken)
    assert info.value.__cause__ is not None and "\n" not in str(info.value)


# --------------------------------------------------------------------------- item 10: source names


@pytest.mark.parametrize("source", ["../x", "a/b", "..", ".", "a\\b", "", "x y", "/abs"])
def test_source_names_with_paths_are_refused(source):
    with pytest.raises(ValueError, match="is not allowed: use letters, digits and _ . @ -"):
        check_source_name(source)


def test_synth_source_outside_the_files_folder_is_refused(store, tmp_path, capsys):
    before = _digest(store)
    outside = store.parent / "x"
    assert main(["synth", "--store", str(store), "--source", "../x", "--count", "2", "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("swsa: error: source name '../x' is not allowed") and "\n" not in err
    assert not outside.exists() and not (store.parent / (store.name + ".files") / "x").exists()
    assert _digest(store) == before
    with pytest.raises(ValueError, match="source name 'a/b' is not allowed"):
        sample_auxiliary(store, tmp_path, count=1, source="a/b")
    for good in ("cutpaste-scar", "tiny_imagenet.v2", "perlin@0.5"):
        assert check_source_name(good) == good
    with pytest.raises(ValueError, match="outside the store's files folder"):
        path_inside(tmp_path / "files" / ".." / "elsewhere.png", tmp_path / "files")
    assert path_inside(tmp_path / "files" / "s" / "0.png", tmp_path / "files") == (tmp_path / "files" / "s" / "0.png").resolve()


def test_synth_with_a_good_source_stays_inside(store):
    summary = synthesize(store, "cutpaste", count=2, source="cp.v1", progress=False)
    assert summary["images"] > 0
    with open_store(store) as s:
        made = s.images().query("kind == 'cp.v1'")
        files = (store.parent / (store.name + ".files")).resolve()
    assert all(p.startswith(str(files / "synth" / "cp.v1")) for p in made.loc[made["status"] == "ok", "path"])


# --------------------------------------------------------------------------- item 11: user text in reports

HOSTILE_CLASS = "=HYPERLINK(\"x\")|<!--<script>alert(1)</script>\nnext"
HOSTILE_CANDIDATE = "@SUM(1+1)<img src=x onerror=alert(1)>"


def hostile_cube(n_tasks: int = 4, n_candidates: int = 3, seed: int = 0) -> AurocCube:
    rng = np.random.default_rng(seed)
    real = rng.uniform(0.4, 1.0, size=(n_tasks, n_candidates, 2)).round(2)
    synthetic = rng.uniform(0.4, 1.0, size=(n_tasks, n_candidates, 1)).round(2)
    names = [HOSTILE_CANDIDATE, "+cmd", "plain"] + [f"m{i}" for i in range(3, n_candidates)]
    return AurocCube(
        tasks=pd.DataFrame({"task_id": np.arange(n_tasks), "dataset": "-ds\ttab",
                            "normal_class": [HOSTILE_CLASS] + [f"c{i}" for i in range(1, n_tasks)]}),
        candidates=pd.DataFrame({"name": names[:n_candidates], "n_params": 10 + np.arange(n_candidates),
                                 "feature_dim": 8, "weights_kind": "random", "family": "resnet"}),
        sources=["s1"], real=real, synthetic=synthetic,
        per_class=np.full((n_tasks, n_candidates, 1), np.nan), class_names=np.full((n_tasks, 1), "", dtype=object),
        config={"k": 3, "base_sources": ["s1"]},
    )


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def test_csv_cells_cannot_start_a_formula(tmp_path):
    cube = hostile_cube()
    paths = write_report(cube, tmp_path / "r")
    for key in ("table1_csv", "table2_csv", "tasks_csv", "strategies_csv", "skips_csv"):
        with open(paths[key], newline="", encoding="utf-8") as handle:
            for row in csv.reader(handle):
                for cell in row:
                    assert not cell.startswith(FORMULA_START) or _is_number(cell), (key, cell)
    tasks = read_csv(paths["tasks_csv"], keep_default_na=False)
    assert HOSTILE_CLASS in set(tasks["normal_class"]) and set(tasks["dataset"]) == {"-ds\ttab"}
    assert set(tasks["swsa_pick"]) <= {HOSTILE_CANDIDATE, "+cmd", "plain"}
    raw = pd.read_csv(paths["tasks_csv"], keep_default_na=False)
    assert ("'" + HOSTILE_CLASS) in set(raw["normal_class"])
    for value in ("=1", "+1", "-1", "@a", "\tx", "\rx", "'quoted", "plain", 3, None):
        escaped = csv_cell(value)
        assert not (isinstance(escaped, str) and escaped.startswith(FORMULA_START))
        assert (escaped[1:] if isinstance(escaped, str) and escaped.startswith("'") else escaped) == value


def test_markdown_cells_escape_pipes_and_line_breaks(tmp_path):
    frame = pd.DataFrame({"a|b": [HOSTILE_CLASS, "x"], "n": [0.5, np.nan]})
    lines = markdown_table(frame).splitlines()
    assert len(lines) == 4  # header, rule, two rows: no cell broke its line

    def columns(line: str) -> int:  # cell separators: pipes not escaped by a backslash
        return sum(1 for i, ch in enumerate(line) if ch == "|" and (i == 0 or line[i - 1] != "\\"))

    assert {columns(line) for line in lines} == {3}
    assert "<script" not in markdown_table(frame) and md_cell("a\r\nb|c") == "a b\\|c"
    paths = write_report(hostile_cube(), tmp_path / "r")
    table1 = (tmp_path / "r" / "table1.md").read_text(encoding="utf-8").splitlines()
    table_lines = [line for line in table1 if line.startswith("|")]
    assert table_lines and len({columns(line) for line in table_lines}) == 1


def test_html_escapes_user_text(tmp_path):
    cube = hostile_cube()
    report = tmp_path / "r"
    write_report(cube, report)
    page = write_html_report(cube, None, tmp_path / "r.html", report_dir=report).read_text(encoding="utf-8")
    assert "<!--<script" not in page and "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page  # escaped in the tables
    assert page.count("<script") == page.count("</script>")
