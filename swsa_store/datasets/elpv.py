"""ELPV: electroluminescence images of solar cells, read in place from the ``elpv-dataset`` package.

Deitsch et al., "Automatic classification of defective photovoltaic module cells in
electroluminescence images" (Solar Energy, 2019); licence CC BY-NC-SA 4.0. 2,624 300x300 8-bit
grayscale PNGs; ``labels.csv`` lists one image a line, whitespace separated::

    images/cell0001.png  1.0                 mono

(path, defect probability in {0, 1/3, 2/3, 1}, cell type ``mono`` or ``poly``). Counts:
mono 588 / 117 / 56 / 313 and poly 920 / 178 / 50 / 402 for p = 0, 1/3, 2/3, 1.

As a dataset (registered as ``elpv``, protocol ``"defect"``):

* ``class_name`` = the cell type (one task per type); ``defect`` = ``"good"`` for p = 0, else the
  probability bucket ``"p=1/3"``, ``"p=2/3"`` or ``"p=1"`` (the probability rounded to the
  nearest third; anything else is a skipped row with its reason); the extra samples column
  ``defect_probability`` (float, NaN when unreadable) is not kept by the catalog;
* ELPV has no official split: the normals (p = 0) of each type are shuffled with a generator
  seeded by ``(seed, crc32(type))`` and the first ``round(n * test_fraction)`` become "test" (real
  normals), the rest "train" (the support: seeds + held-out normals). Every defective image is
  "test": anomalies appear only in real validation;
* one-vs-rest = normals vs the buckets of ``anomalies`` (``"1"``: p = 1; ``"2/3"``: p >= 2/3),
  recorded as the dataset's :attr:`ElpvDataset.rest_groups`; one-vs-closest = the hardest of
  all three defective buckets (p = 1/3 takes part there, as the paper takes the worst defect type);
* caps per cell type (``n_support``, ``n_test_normal``, and ``n_anomaly`` per bucket): a seeded
  subset is catalogued and the rest not at all. The split is made before capping and each cap
  takes a prefix of a seeded order, so the catalogued rows are a function of (labels, seed,
  test_fraction, caps) only, and a larger cap adds rows without moving any.

A line of ``labels.csv`` that does not hold three fields, or repeats a path, names no usable
row: it is recorded in :attr:`ElpvDataset.skipped_entries` (the catalog writes them to the skips
table). Nothing is copied: ``path`` points into the installed package (or ``root``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import math
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from swsa_store.datasets.base import NORMAL_DEFECT, PaperDataset, require_path
from swsa_store.datasets.registry import register_dataset

__all__ = [
    "ELPV_ANOMALIES",
    "ELPV_BUCKETS",
    "ELPV_CITATION",
    "ELPV_LICENCE",
    "ELPV_PACKAGE",
    "ElpvDataset",
    "elpv_bucket",
    "elpv_data_root",
    "read_elpv_labels",
]

logger = logging.getLogger(__name__)

ELPV_PACKAGE = "elpv-dataset"
ELPV_MODULE = "elpv_dataset"
ELPV_LICENCE = "CC BY-NC-SA 4.0"
ELPV_CITATION = ("Deitsch et al., \"Automatic classification of defective photovoltaic module cells in "
                 "electroluminescence images\", Solar Energy 185 (2019) 455-468, doi:10.1016/j.solener.2019.02.067")
ELPV_LAYOUT = ("expected root/labels.csv (one '<images/cellNNNN.png> <defect probability> <mono|poly>' a line) "
               "and root/images/")

#: Defect probability in thirds (0..3) -> the image's ``defect``.
ELPV_BUCKETS = {0: NORMAL_DEFECT, 1: "p=1/3", 2: "p=2/3", 3: "p=1"}
#: ``anomalies`` option -> the buckets that enter one-vs-rest.
ELPV_ANOMALIES = {"1": ("p=1",), "2/3": ("p=2/3", "p=1")}
#: Cleaned class names for prompts.
ELPV_CELL_LABELS = {"mono": "monocrystalline solar cell", "poly": "polycrystalline solar cell"}
#: How far (in thirds) a probability may sit from a third and still count as that third.
_THIRD_TOLERANCE = 0.05


def elpv_data_root() -> tuple[Path, str]:
    """``(data folder, version)`` of the installed ``elpv-dataset`` package (not copied).

    Raises a one-line :class:`FileNotFoundError` naming ``pip install elpv-dataset`` when absent.
    """
    spec = importlib.util.find_spec(ELPV_MODULE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(f"ELPV: the {ELPV_PACKAGE} package is not installed; install it with "
                                f"`pip install {ELPV_PACKAGE}`, or pass root= a folder holding labels.csv and images/")
    try:
        version = importlib.metadata.version(ELPV_PACKAGE)
    except importlib.metadata.PackageNotFoundError:  # importable but without metadata (a source tree)
        version = ""
    return Path(locations[0]) / "data", version


def elpv_bucket(text: str) -> tuple[str, float, str]:
    """``(defect, probability, reason)`` of a ``labels.csv`` probability field.

    The probability is rounded to the nearest third (``"0.3333333333333333"``, ``"0.333"`` and
    ``"1/3"`` all give ``"p=1/3"``); anything else gives ``defect ""`` and a reason.
    """
    parts = text.split("/")
    try:
        value = float(parts[0]) if len(parts) == 1 else float(parts[0]) / float(parts[1]) if len(parts) == 2 else math.nan
    except (ValueError, ZeroDivisionError):
        value = math.nan
    if math.isnan(value):
        return "", math.nan, f"defect probability {text!r} is not a number"
    thirds = round(value * 3) if math.isfinite(value) else -1
    if thirds not in ELPV_BUCKETS or abs(value * 3 - thirds) > _THIRD_TOLERANCE:
        return "", value, f"defect probability {text!r} is not 0, 1/3, 2/3 or 1"
    return ELPV_BUCKETS[thirds], value, ""


def read_elpv_labels(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Parse ``labels.csv``: ``(entries, skipped_entries)``.

    ``entries``: one dict per usable line (``rel_path, class_name, defect, defect_probability,
    source_index`` = the line's index among non-empty lines, as in ``elpv_dataset.load_dataset``,
    ``skip_reason`` = "" or why the row is skipped). ``skipped_entries``: reasons for lines that
    name no row (not three fields, a repeated path).
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"ELPV: cannot read {path}: {type(exc).__name__}: {exc}; {ELPV_LAYOUT}") from None
    entries: list[dict[str, Any]] = []
    skipped: list[str] = []
    seen: dict[str, int] = {}
    index = -1
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        index += 1
        if len(fields) != 3:
            skipped.append(f"{path.name} line {number}: expected '<path> <defect probability> <cell type>', "
                           f"got {line.strip()[:80]!r}")
            continue
        rel, probability, cell_type = fields
        if rel in seen:
            skipped.append(f"{path.name} line {number}: {rel} is already listed on line {seen[rel]}")
            continue
        seen[rel] = number
        defect, value, reason = elpv_bucket(probability)
        entries.append({"rel_path": rel, "class_name": cell_type, "defect": defect, "defect_probability": value,
                        "source_index": index, "skip_reason": f"{path.name} line {number}: {reason}" if reason else ""})
    for reason in skipped:
        logger.warning("ELPV: skipping %s", reason)
    return entries, skipped


def _positive_or_none(name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer or None (all images), got {value!r}")
    return int(value)


def _n_test(n: int, test_fraction: float) -> int:
    """How many of ``n`` normals go to test: half rounded up, at least 1 and at most n-1 (n >= 2)."""
    if n < 2:
        return 0
    return min(max(int(np.floor(n * test_fraction + 0.5)), 1), n - 1)


@register_dataset("elpv")
class ElpvDataset(PaperDataset):
    """ELPV solar cells (see the module docstring); ``root=None`` reads the installed package.

    Attributes beyond the samples-table contract: ``licence``, ``citation``, ``source_package``
    and ``source_version`` ("" when ``root`` is not the package's), ``rest_groups`` (the buckets of
    ``anomalies``), ``skipped_entries`` (reasons for unusable ``labels.csv`` lines).
    """

    name = "elpv"
    protocol = "defect"
    licence = ELPV_LICENCE
    citation = ELPV_CITATION
    extra_columns = {"defect_probability": "float64"}

    def __init__(self, root: str | os.PathLike | None = None, name: str | None = None, *, anomalies: str = "1",
                 n_support: int | None = None, n_test_normal: int | None = None, n_anomaly: int | None = None,
                 seed: int = 0, test_fraction: float = 0.5):
        if not isinstance(anomalies, str) or anomalies not in ELPV_ANOMALIES:
            raise ValueError(f"anomalies must be one of {list(ELPV_ANOMALIES)} (the defect probabilities that count "
                             f"as anomalies in one-vs-rest), got {anomalies!r}")
        self.caps = {"n_support": _positive_or_none("n_support", n_support),
                     "n_test_normal": _positive_or_none("n_test_normal", n_test_normal),
                     "n_anomaly": _positive_or_none("n_anomaly", n_anomaly)}
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if not isinstance(test_fraction, (int, float)) or not 0.0 < float(test_fraction) < 1.0:
            raise ValueError(f"test_fraction must be strictly between 0 and 1, got {test_fraction!r}")
        package_root, version = elpv_data_root() if root is None else (None, "")
        super().__init__(package_root if root is None else root, name, ELPV_LAYOUT, "ELPV")
        self.source_package = ELPV_PACKAGE if root is None else ""
        self.source_version = version
        self.anomalies, self.seed, self.test_fraction = anomalies, int(seed), float(test_fraction)
        self.rest_groups = list(ELPV_ANOMALIES[anomalies])
        require_path(self.root / "images", ELPV_LAYOUT, "ELPV")
        self.labels, self.skipped_entries = read_elpv_labels(require_path(self.root / "labels.csv", ELPV_LAYOUT, "ELPV"))
        types = sorted({e["class_name"] for e in self.labels})
        self.class_labels = {t: ELPV_CELL_LABELS.get(t, f"{t} solar cell") for t in types}
        capped = ", ".join(f"{k}={v}" for k, v in self.caps.items() if v is not None)
        self.validation_source = (
            f"{self.name}: no official split; per cell type the defect-free cells (p=0) are split "
            f"(seed {self.seed}, test fraction {self.test_fraction}): support = train, real normal = test; "
            f"anomalies = the type's defective cells, grouped by defect probability (one-vs-rest: "
            f"{' and '.join(self.rest_groups)}; one-vs-closest: the worst of p=1/3, p=2/3, p=1)"
            + (f"; a seeded subset per cell type ({capped}; n_anomaly per bucket)" if capped else ""))

    def __repr__(self) -> str:
        caps = "".join(f", {k}={v}" for k, v in self.caps.items() if v is not None)
        return (f"ElpvDataset(root={str(self.root)!r}, name={self.name!r}, anomalies={self.anomalies!r}, "
                f"seed={self.seed}, test_fraction={self.test_fraction}{caps})")

    @classmethod
    def describe(cls, root: str | os.PathLike | None = None) -> dict[str, Any]:
        """What a report prints about the data, without decoding any image: ``citation``, ``licence``,
        ``source_package``, ``source_version``, ``root``, ``images`` (lines of labels.csv naming an
        image) and ``counts`` ``{cell type: {defect: n}}``."""
        dataset = cls(root)
        return {"citation": cls.citation, "licence": cls.licence, "source_package": dataset.source_package,
                "source_version": dataset.source_version, "root": str(dataset.root),
                "images": len(dataset.labels), "counts": dataset.label_counts()}

    def label_counts(self) -> dict[str, dict[str, int]]:
        """``{cell type: {defect: n}}`` over every labelled image (before split and caps; ``""``:
        an unreadable probability)."""
        pairs = pd.DataFrame([(e["class_name"], e["defect"]) for e in self.labels], columns=["type", "defect"])
        sizes = pairs.groupby(["type", "defect"]).size()
        return {t: {d: int(n) for d, n in sizes[t].items()} for t in sizes.index.get_level_values(0).unique()}

    def entries(self) -> pd.DataFrame:
        """The rows :meth:`samples` will hold, before any image is read: ``rel_path, class_name,
        split, defect, defect_probability, source_index, skip_reason`` (cheap: no decoding)."""
        columns = ["rel_path", "class_name", "split", "defect", "defect_probability", "source_index", "skip_reason"]
        rows = sorted(self._entries(), key=lambda e: (e["class_name"], e["split"], e["rel_path"]))
        return pd.DataFrame(rows, columns=columns).reset_index(drop=True)

    def _entries(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for cell_type in sorted({e["class_name"] for e in self.labels}):
            mine = [e for e in self.labels if e["class_name"] == cell_type]
            out += self._normal_entries(cell_type, mine)
            for bucket in list(ELPV_BUCKETS.values())[1:]:
                members = sorted((e for e in mine if e["defect"] == bucket and not e["skip_reason"]),
                                 key=lambda e: e["rel_path"])
                order = np.random.default_rng([self.seed, _crc(cell_type), _crc(bucket)]).permutation(len(members))
                out += [{**members[i], "split": "test"} for i in order[: self.caps["n_anomaly"]]]
            # a row whose probability is unreadable is catalogued as a skipped row (never a task member)
            out += [{**e, "split": "test"} for e in mine if e["skip_reason"]]
        return out

    def _normal_entries(self, cell_type: str, mine: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The type's p=0 cells split (seeded per type) into train and test, then each part capped
        (a prefix of the seeded order, so a larger cap only adds rows)."""
        normals = sorted((e for e in mine if e["defect"] == NORMAL_DEFECT and not e["skip_reason"]),
                         key=lambda e: e["rel_path"])
        order = np.random.default_rng([self.seed, _crc(cell_type)]).permutation(len(normals))
        n_test = _n_test(len(normals), self.test_fraction)
        test, train = order[:n_test], order[n_test:]
        return ([{**normals[i], "split": "train"} for i in train[: self.caps["n_support"]]]
                + [{**normals[i], "split": "test"} for i in test[: self.caps["n_test_normal"]]])


def _crc(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))
