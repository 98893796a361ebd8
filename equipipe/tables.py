"""Tables of analysis folders rendered as one self-contained HTML page (a report item)."""

from __future__ import annotations

import html
import math
from pathlib import Path

import polars as pl

MAX_ROWS = 200  # long tables (landscape grids) are summarised by their first rows


def _cell(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return html.escape(str(v)[:80])
    return html.escape(str(v))


def frame_to_html(df: pl.DataFrame, caption: str) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in df.columns)
    rows = "".join(
        "<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>"
        for row in df.head(MAX_ROWS).iter_rows()
    )
    more = (
        f"<p>({df.height - MAX_ROWS} more rows in the parquet file)</p>"
        if df.height > MAX_ROWS
        else ""
    )
    return f"<h2>{html.escape(caption)}</h2><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>{more}"


def write_html_tables(folder: Path, out: Path, title: str = "") -> None:
    """Every ``*.parquet`` in ``folder`` (sorted) as a table on one page written to ``out``."""
    tables = sorted(Path(folder).glob("*.parquet"))
    if not tables:
        raise FileNotFoundError(f"no parquet tables in {folder}")
    body = "".join(frame_to_html(pl.read_parquet(p), p.stem) for p in tables)
    style = ("<style>body{font-family:sans-serif} table{border-collapse:collapse;margin-bottom:2em}"
             "td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px;text-align:right}</style>")  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        f"<html><head><meta charset='utf-8'>{style}</head><body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )
