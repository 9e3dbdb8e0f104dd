"""Property-based tests (Hypothesis) for every parser of user input: the import-scores CSV,
folder dataset layouts, CLI option values and image files. Whatever the input, no traceback
escapes: the parser returns, raises a one-line ``ValueError`` (our errors derive from it), or
records a skip; and a store given bad input is byte-identical afterwards.

The default profile keeps the module under about a minute; ``-m slow`` runs the heavier profile.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from swsa_engine.app.cli import main
from swsa_engine.app.cli.common import task_id_list
from swsa_engine.core.detectors.base import parse_detector
from swsa_store import open_store
from swsa_store.catalog import catalog_dataset
from swsa_store.models.preprocessing import parse_preprocess
from swsa_store.registry import UnknownNameError
from swsa_store.samples import check_source_name, decode_rgb, inspect_image_file, path_inside, read_image
from swsa_store.scores import import_scores

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HEAVY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _one_line(error: BaseException) -> str:
    message = str(error)
    assert message.strip(), f"{type(error).__name__} without a message"
    assert "\n" not in message.strip(), f"multi-line error: {message!r}"
    assert "Traceback" not in message
    return message


def _png(pixels: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two classes of 8 random images, catalogued (tasks, members, no embeddings)."""
    root = tmp_path_factory.mktemp("props")
    rng = np.random.default_rng(5)
    for label in ("a", "b"):
        folder = root / "img" / label
        folder.mkdir(parents=True)
        for i in range(8):
            (folder / f"{i}.png").write_bytes(_png(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)))
    path = root / "s.h5"
    catalog_dataset(path, "folder", root=root / "img", name="toy", n_seed=2)
    return path


# --------------------------------------------------------------------------- import-scores CSV

_CELLS = st.one_of(
    st.integers(-3, 40), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(), st.just(""), st.sampled_from(["=1+1", "+cmd", "@SUM(A1)", "nan", "1e30", "1.7", "0x10", "-0"]),
    st.text(max_size=6),
)
_HEADERS = st.sampled_from([["task", "image_id", "score"], ["task_id", "path", "score"], ["task", "image_id"],
                            ["task", "image_id", "score", "extra"], ["Task", "image_id", "score"], []])


def _csv_text(header: list[str], rows: list[list]) -> str:
    frame = pd.DataFrame([row[:len(header)] + [""] * (len(header) - len(row)) for row in rows], columns=header)
    return frame.to_csv(index=False)


def _check_import(store_path: Path, data: bytes, folder: Path) -> None:
    """Import ``data`` as a CSV: success, or a one-line ValueError with the store unchanged."""
    file = folder / "scores.csv"
    file.write_bytes(data)
    before = _digest(store_path)
    backup = folder / "backup.h5"
    shutil.copyfile(store_path, backup)
    try:
        import_scores(store_path, "imported", file, replace=True)
    except ValueError as error:
        _one_line(error)
        assert _digest(store_path) == before, f"a refused import changed the store: {error}"
    else:  # a valid table: fine; put the store back for the next example
        shutil.copyfile(backup, store_path)


@FAST
@given(header=_HEADERS, rows=st.lists(st.lists(_CELLS, max_size=4), max_size=6))
def test_score_csv_tables_never_raise_a_traceback_and_keep_the_store(store, header, rows):
    with tempfile.TemporaryDirectory() as tmp:
        _check_import(store, _csv_text(header, rows).encode(), Path(tmp))


@FAST
@given(data=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_score_files_of_random_bytes_are_refused_in_one_line(store, data):
    with tempfile.TemporaryDirectory() as tmp:
        _check_import(store, data, Path(tmp))


def test_the_cli_refuses_a_bad_table_in_one_line_and_keeps_the_store(store, tmp_path):
    file = tmp_path / "bad.csv"
    file.write_text("task,image_id,score\n0,1e30,0.5\n=1+1,0,x\n")
    before = _digest(store)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = main(["import-scores", "--store", str(store), "--candidate", "c", str(file)])
    assert status == 1 and _digest(store) == before
    lines = stderr.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("swsa: error:") and "1e+30" in lines[0]


# --------------------------------------------------------------------------- folder dataset layouts

_NAME = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\\x00"),
                min_size=1, max_size=12).filter(lambda s: s not in (".", "..") and len(s.encode()) < 100)
_FILE_KIND = st.sampled_from(["png", "zero", "truncated", "text", "gif", "jpeg"])


def _file_bytes(kind: str, seed: int) -> tuple[str, bytes]:
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    if kind == "zero":
        return ".png", b""
    if kind == "text":
        return ".txt", b"not an image"
    if kind == "truncated":
        return ".png", _png(pixels)[:40]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format={"png": "PNG", "gif": "GIF", "jpeg": "JPEG"}[kind])
    return {"png": ".png", "gif": ".gif", "jpeg": ".jpg"}[kind], buffer.getvalue()


_TREES = st.dictionaries(_NAME, st.lists(st.tuples(_NAME, _FILE_KIND), max_size=7), max_size=4)


def _write_tree(root: Path, tree: dict, nested: bool) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for c, (cls, files) in enumerate(tree.items()):
        folder = root / cls / ("sub" if nested else "")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:  # a name the file system refuses (too long in bytes, ...)
            continue
        for i, (name, kind) in enumerate(files):
            suffix, data = _file_bytes(kind, c * 100 + i)
            with contextlib.suppress(OSError):
                (folder / f"{name}{suffix}").write_bytes(data)


@FAST
@given(tree=_TREES, nested=st.booleans(), n_seed=st.integers(0, 4))
def test_random_folder_trees_catalog_or_refuse_in_one_line(tree, nested, n_seed):
    with tempfile.TemporaryDirectory() as tmp:
        root, path = Path(tmp) / "img", Path(tmp) / "s.h5"
        _write_tree(root, tree, nested)
        try:
            summary = catalog_dataset(path, "folder", root=root, name="toy", n_seed=n_seed)
        except ValueError as error:
            _one_line(error)
            return
        with open_store(path) as s:
            images = s.images()
        bad = images[images["status"] != "ok"]
        assert (bad["skip_reason"].str.len() > 0).all(), "a skipped image without its reason"
        assert not bad["skip_reason"].str.contains("\n").any()
        assert isinstance(summary, dict)


def test_a_second_catalog_of_a_bad_tree_leaves_the_store_byte_identical(store, tmp_path):
    (tmp_path / "empty").mkdir()
    before = _digest(store)
    for root in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises((ValueError, FileNotFoundError)) as caught:  # a missing root: the OS's error, one line
            catalog_dataset(store, "folder", root=root, name="other", n_seed=2)
        _one_line(caught.value)
    assert _digest(store) == before


# --------------------------------------------------------------------------- CLI option values

_OPTION_TEXT = st.text(max_size=40) | st.from_regex(r"[a-z_]{1,8}(\((\w+(=[\w.,-]*)?,?){0,3}\))?", fullmatch=True)


@FAST
@given(text=_OPTION_TEXT)
def test_detector_labels_parse_or_refuse_in_one_line(text):
    try:
        parse_detector(text)
    except (ValueError, UnknownNameError) as error:  # UnknownNameError: ours, a KeyError naming the valid names
        _one_line(error)


@FAST
@given(text=st.text(max_size=40) | st.from_regex(
    r"((size|crop_pct|crop_mode|interpolation|mean|std|x)=[-\w.,]{0,12};?){0,3}", fullmatch=True))
def test_preprocess_strings_parse_or_refuse_in_one_line(text):
    try:
        overrides = parse_preprocess(text)
    except ValueError as error:
        _one_line(error)
    else:
        assert isinstance(overrides, dict)


@FAST
@given(text=st.text(max_size=30) | st.lists(st.integers(-5, 10**20).map(str) | st.text(max_size=3)).map(",".join))
def test_task_lists_parse_or_refuse_in_one_line(text):
    try:
        ids = task_id_list(text)
    except ValueError as error:
        _one_line(error)
    else:
        assert ids is None or (ids == sorted(set(ids)) and all(isinstance(i, int) and i >= 0 for i in ids))


@FAST
@given(name=st.text(max_size=20) | st.sampled_from(["..", ".", "../x", "a/b", "/abs", "ok-name", "a\\b", "a\x00b"]))
def test_source_names_stay_inside_the_files_folder(name):
    files = Path(tempfile.gettempdir()) / "swsa-props-files"
    try:
        checked = check_source_name(name)
    except ValueError as error:
        _one_line(error)
    else:
        assert path_inside(files / "synth" / checked, files) == (files / "synth" / checked).resolve()


def test_bad_cli_values_leave_the_store_byte_identical(store):
    before = _digest(store)
    for argv in (["synth", "--store", str(store), "--method", "cutpaste", "--source", "../x", "--quiet"],
                 ["synth", "--store", str(store), "--method", "cutpaste", "--tasks", "1.5", "--quiet"],
                 ["embed", "--store", str(store), "--backbone", "timm/resnet10t", "--preprocess", "mean=1,2", "--quiet"]):
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            status = main(argv)
        assert status != 0, argv
        message = stderr.getvalue().strip()
        assert "Traceback" not in message and len(message.splitlines()) == 1, (argv, message)
    assert _digest(store) == before


# --------------------------------------------------------------------------- image files

_MODES = st.sampled_from(["1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "I;16", "I", "F"])
_FORMATS = {"1": ["PNG", "TIFF", "BMP", "GIF"], "L": ["PNG", "TIFF", "JPEG", "GIF", "BMP", "WEBP"],
            "P": ["PNG", "GIF", "TIFF", "BMP"], "RGB": ["PNG", "JPEG", "TIFF", "WEBP", "BMP"],
            "RGBA": ["PNG", "TIFF", "WEBP"], "LA": ["PNG", "TIFF"], "CMYK": ["JPEG", "TIFF"],
            "I;16": ["PNG", "TIFF"], "I": ["PNG", "TIFF"], "F": ["TIFF"]}


def _image(mode: str, width: int, height: int, seed: int, frames: int, fmt: str) -> bytes:
    rng = np.random.default_rng(seed)
    if mode in ("I;16", "I"):
        im = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16)).convert(mode) \
            if mode == "I" else Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16), "I;16")
    elif mode == "F":
        im = Image.fromarray(rng.random((height, width), dtype=np.float32), "F")
    else:
        im = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)
    buffer = io.BytesIO()
    if frames > 1 and fmt in ("GIF", "PNG", "WEBP", "TIFF"):
        others = [im.point(lambda v, k=k: (v + 40 * k) % 256) if mode not in ("I", "I;16", "F") else im
                  for k in range(1, frames)]
        im.save(buffer, format=fmt, save_all=True, append_images=others)
    else:
        im.save(buffer, format=fmt)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width × height`` but carries one tiny IDAT (a decompression bomb's header)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _check_image_bytes(data: bytes, folder: Path) -> None:
    """Every reader of image files on ``data``: a decoded RGB image, or a one-line error / a skip."""
    file = folder / "x.img"
    file.write_bytes(data)
    status, reason, digest, width, height = inspect_image_file(file)
    assert digest == (hashlib.sha256(data).hexdigest() if data is not None else "")
    if status == "ok":
        image = read_image(file)
        assert image.mode == "RGB" and image.size == (width, height) and reason == ""
    else:
        assert status == "skipped" and reason and "\n" not in reason and width == height == 0
        with pytest.raises(ValueError) as caught:
            read_image(file)
        _one_line(caught.value)
    try:
        decode_rgb(data)
    except Exception as error:  # decode_rgb is the raw decoder: callers wrap it; it must not crash the process
        assert status == "skipped", f"inspect said ok but decode_rgb raised {error!r}"


@FAST
@given(mode=_MODES, width=st.integers(1, 24), height=st.integers(1, 24), seed=st.integers(0, 9),
       frames=st.integers(1, 3), fmt_index=st.integers(0, 5), cut=st.none() | st.floats(0, 1))
def test_image_files_decode_or_skip_with_a_one_line_reason(mode, width, height, seed, frames, fmt_index, cut):
    formats = _FORMATS[mode]
    try:
        data = _image(mode, width, height, seed, frames, formats[fmt_index % len(formats)])
    except (OSError, ValueError, KeyError):  # Pillow cannot write this combination: nothing to read
        return
    if cut is not None:
        data = data[:int(len(data) * cut)]
    with tempfile.TemporaryDirectory() as tmp:
        _check_image_bytes(data, Path(tmp))


@FAST
@given(data=st.binary(max_size=300), prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"\xff\xd8\xff",
                                                           b"II*\x00", b"BM", b"RIFF"]))
def test_random_bytes_with_image_magic_are_skipped_not_raised(data, prefix):
    with tempfile.TemporaryDirectory() as tmp:
        _check_image_bytes(prefix + data, Path(tmp))


def test_a_cut_multi_frame_tiff_is_read_the_same_way_by_the_catalog_and_the_reader(tmp_path):
    """Found by this suite: the first frame decodes fully but the cut second frame cannot be counted;
    the catalog skipped the file while read_image read it. Now both use the first frame."""
    image = Image.fromarray(np.zeros((1, 1), np.uint8)).convert("1")
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF", save_all=True, append_images=[image])
    _check_image_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2], tmp_path)
    assert inspect_image_file(tmp_path / "x.img")[0] == "ok"


@pytest.mark.parametrize("width, height", [(100_000, 100_000), (2**31 - 1, 2**31 - 1), (1, 2**31 - 1), (20_000, 20_000)])
def test_huge_declared_dimensions_are_skipped_quickly(tmp_path, width, height):
    """A decompression bomb's header: Pillow's bomb guard or a truncated-data error, as a recorded skip."""
    _check_image_bytes(_png_header_only(width, height), tmp_path)
    status, reason, *_ = inspect_image_file(tmp_path / "x.img")
    assert status == "skipped" and reason.startswith("cannot decode image:")


def test_zero_byte_and_bomb_files_in_a_dataset_are_recorded_skips(tmp_path):
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        folder = tmp_path / "img" / label
        folder.mkdir(parents=True)
        for i in range(6):
            (folder / f"{i}.png").write_bytes(_png(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)))
    (tmp_path / "img" / "a" / "zero.png").write_bytes(b"")
    (tmp_path / "img" / "a" / "bomb.png").write_bytes(_png_header_only(100_000, 100_000))
    (tmp_path / "img" / "b" / "cut.png").write_bytes(_png(np.zeros((8, 8), np.uint8))[:30])
    catalog_dataset(tmp_path / "s.h5", "folder", root=tmp_path / "img", name="toy", n_seed=2)
    with open_store(tmp_path / "s.h5") as s:
        images = s.images().set_index("path")
    reasons = {Path(p).name: r for p, r in images["skip_reason"].items() if r}
    assert set(reasons) == {"zero.png", "bomb.png", "cut.png"}, reasons
    assert all(r.startswith("cannot decode image:") and "\n" not in r for r in reasons.values())


# --------------------------------------------------------------------------- heavier profiles (-m slow)


@pytest.mark.slow
@HEAVY
@given(mode=_MODES, width=st.integers(1, 64), height=st.integers(1, 64), seed=st.integers(0, 99),
       frames=st.integers(1, 4), fmt_index=st.integers(0, 5), cut=st.none() | st.floats(0, 1))
def test_image_files_heavy(mode, width, height, seed, frames, fmt_index, cut):
    test_image_files_decode_or_skip_with_a_one_line_reason.hypothesis.inner_test(
        mode, width, height, seed, frames, fmt_index, cut)


@pytest.mark.slow
@HEAVY
@given(header=_HEADERS, rows=st.lists(st.lists(_CELLS, max_size=4), max_size=12))
def test_score_csv_heavy(store, header, rows):
    with tempfile.TemporaryDirectory() as tmp:
        _check_import(store, _csv_text(header, rows).encode(), Path(tmp))


@pytest.mark.slow
@HEAVY
@given(tree=_TREES, nested=st.booleans(), n_seed=st.integers(0, 4))
def test_folder_trees_heavy(tree, nested, n_seed):
    test_random_folder_trees_catalog_or_refuse_in_one_line.hypothesis.inner_test(tree, nested, n_seed)
