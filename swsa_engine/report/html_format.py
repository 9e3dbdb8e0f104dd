"""How the HTML report formats values: every number shown is formatted here, in Python, from
the same DataFrames that the CSV files hold (:func:`fmt_number`, :func:`html_table`), and every
JSON payload is embedded with :func:`json_script`."""

from __future__ import annotations

import html
import json
import math

import numpy as np
import pandas as pd

__all__ = ["fmt_number", "fmt_p", "raw_value", "COLUMN_FORMATS", "html_table", "json_script"]


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


def fmt_p(value) -> str:
    """A p-value (or threshold): three significant digits, "–" for NaN / missing."""
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return "–"
    return f"{float(value):.3g}"


def raw_value(value) -> str:
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
COLUMN_FORMATS = {"p_value": fmt_p, "p_one_sided": fmt_p, "bonferroni_threshold": fmt_p,
                  "picks": lambda v: fmt_number(v, 1)}


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
            cells.append(f'<td data-v="{html.escape(raw_value(value))}"{cls}>{html.escape(text)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<table id="{table_id}" class="data"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def json_script(element_id: str, value) -> str:
    """``value`` as JSON in a ``<script type="application/json" id=element_id>`` element (NaN refused)."""
    text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    # "<", ">" and "&" only occur inside JSON strings: as \u escapes they can never close the script
    # element early nor open a comment or a script inside it (user text such as "<!--<script>")
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f'<script type="application/json" id="{element_id}">{text}</script>'
