"""CSV files a spreadsheet cannot turn into formulas: the one rule for every CSV swsa writes.

Text from user data (class names, image paths, candidate names, skip reasons) ends up in CSV cells.
A spreadsheet reads a cell that starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return
as a formula (CSV injection, OWASP). :func:`csv_cell` puts one single quote in front of such a
text cell — and of a text cell that starts with a single quote, so that :func:`read_csv` gives every
string back exactly. Numbers are left as they are (a negative score stays a number).

Used by the report's tables (:mod:`swsa_engine.report.tables` re-exports these names), the export
manifests (:mod:`swsa_store.export`) and ``swsa predict``'s output. Pure: pandas only, no store.
"""

from __future__ import annotations

import csv
import os

import pandas as pd

__all__ = ["FORMULA_START", "csv_cell", "plain_cell", "text_columns", "escape_text_cells", "write_csv", "read_csv"]

#: First characters that make a spreadsheet read a CSV cell as a formula (CSV injection).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value):
    """``value`` as written to a CSV swsa writes: a string starting with a formula character
    (:data:`FORMULA_START`) or with a single quote gets one single quote in front, so a
    spreadsheet shows it as text (and :func:`read_csv` gives the string back); other values as is."""
    if isinstance(value, str) and value.startswith((*FORMULA_START, "'")):
        return "'" + value
    return value


def plain_cell(value):
    """The inverse of :func:`csv_cell`: a string starting with a single quote loses it."""
    if isinstance(value, str) and value.startswith("'"):
        return value[1:]
    return value


def text_columns(frame: pd.DataFrame) -> list:
    """The columns of ``frame`` that hold text (object or string dtype)."""
    return [c for c in frame.columns if frame[c].dtype == object or isinstance(frame[c].dtype, pd.StringDtype)]


def escape_text_cells(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``frame`` with every text cell through :func:`csv_cell` (numbers untouched)."""
    return frame.assign(**{str(c): frame[c].map(csv_cell) for c in text_columns(frame)})


def write_csv(frame: pd.DataFrame, path_or_buffer: str | os.PathLike | None = None, **kwargs):
    """``frame`` as CSV (no index) with every text cell through :func:`csv_cell`, to ``path_or_buffer``
    (a path or an open text stream; None: returned as a string). ``kwargs`` go to ``DataFrame.to_csv``.
    When a text cell holds a carriage return every field is quoted: pandas leaves a lone ``\r``
    unquoted, and a reader would split the row there."""
    safe = escape_text_cells(frame)
    if "quoting" not in kwargs and any(safe[c].map(lambda v: isinstance(v, str) and "\r" in v).any()
                                       for c in text_columns(safe)):
        kwargs["quoting"] = csv.QUOTE_ALL
    return safe.to_csv(path_or_buffer, index=False, **kwargs)


def read_csv(path_or_buffer, **kwargs) -> pd.DataFrame:
    """A CSV written by :func:`write_csv`, its text cells as they were before :func:`csv_cell`."""
    frame = pd.read_csv(path_or_buffer, **kwargs)
    for c in text_columns(frame):
        frame[c] = frame[c].map(plain_cell)
    return frame
