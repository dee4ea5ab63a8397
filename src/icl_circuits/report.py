"""A static report.html for a run directory: its figures and tables, opening without a server.

    write_report("runs/task_vectors", "Task-vector layer sweep")

Figures (PNG, with the SVG linked) are embedded by relative path; JSON and CSV files are rendered
as HTML tables (long lists are summarised, long tables cut). Every piece of text (file names,
cells, corpus text) is HTML-escaped. Commands call `write_report` at the end of a run; it can
also be called on any directory after the fact.
"""

from __future__ import annotations

import csv
import html
import io
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .storage import atomic_write_text

MAX_ROWS = 200  # table rows shown per file
MAX_FILE_BYTES = 5 * 2**20  # bigger JSON/CSV files are linked, not rendered
MAX_LIST = 12  # longer lists of numbers are summarised
SKIP_DIRS = {".git", "__pycache__", "node_modules"}
SKIP_NAMES = {"partial.jsonl"}


@dataclass
class Section:
    """Extra content a command puts first: a paragraph, a table, images (paths relative to the run)."""

    title: str
    text: str = ""
    table: list[dict[str, Any]] = field(default_factory=list)
    images: list[str] = field(default_factory=list)


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v: Any) -> str:
    """One table cell as escaped text: floats rounded, long lists summarised."""
    if isinstance(v, float):
        return esc(f"{v:.4g}")
    if isinstance(v, str) and re.fullmatch(r"-?\d+\.\d{5,}(e[-+]?\d+)?|-?\d(\.\d+)?e[-+]?\d+", v):
        return esc(f"{float(v):.4g}")  # long decimals from CSV cells
    if isinstance(v, list):
        if len(v) > MAX_LIST and all(isinstance(x, (int, float)) for x in v):
            nz = sum(1 for x in v if x)
            return esc(f"[{len(v)} numbers, {nz} non-zero]")
        if len(v) > MAX_LIST:
            return esc(f"[{len(v)} items]")
        return esc(json.dumps(v, ensure_ascii=False)[:300])
    if isinstance(v, dict):
        return esc(json.dumps(v, ensure_ascii=False)[:300])
    return esc("" if v is None else v)


def html_table(rows: list[dict[str, Any]], max_rows: int = MAX_ROWS) -> str:
    """A list of dicts as an escaped HTML table (columns: the union of keys, in first-seen order)."""
    if not rows:
        return "<p><i>(empty)</i></p>"
    cols: list[str] = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows[:max_rows])
    more = f"<p><i>{len(rows) - max_rows} more rows not shown</i></p>" if len(rows) > max_rows else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}"


def json_tables(obj: Any) -> list[tuple[str, list[dict[str, Any]]]]:
    """(caption, rows) for the tabular parts of a JSON document."""
    if isinstance(obj, list):
        if obj and all(isinstance(r, dict) for r in obj):
            return [("", obj)]
        return [("", [{"value": _fmt_raw(obj)}])]
    if not isinstance(obj, dict):
        return [("", [{"value": obj}])]
    records = {k for k, v in obj.items() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)}
    # parallel lists of scalars (e.g. sizes, m_C, faithfulness) read best as the columns of one table
    lengths = [len(v) for v in obj.values() if _scalar_list(v)]
    n = max(set(lengths), key=lengths.count) if lengths else 0
    parallel = 1 < n <= MAX_ROWS and lengths.count(n) >= 2  # long vectors (e.g. [d_sae] weights) are summarised instead
    columns = {k for k, v in obj.items() if _scalar_list(v) and len(v) == n} if parallel else set()
    scalars = {k: v for k, v in obj.items() if k not in records and k not in columns}
    out: list[tuple[str, list[dict[str, Any]]]] = []
    if scalars:
        out.append(("", [{"key": k, "value": v} for k, v in scalars.items()]))
    if columns:
        cols = [k for k in obj if k in columns]
        out.append((", ".join(cols), [{c: obj[c][i] for c in cols} for i in range(n)]))
    for k in obj:
        if k in records:
            out.append((k, obj[k]))
    return out


def _scalar_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, (int, float, str, bool)) or x is None for x in v)


def _fmt_raw(v: Any) -> Any:
    return v if not isinstance(v, list) or len(v) <= MAX_LIST else f"[{len(v)} items]"


def file_tables(path: Path) -> list[tuple[str, list[dict[str, Any]]]]:
    """The tables of one JSON/CSV file ([] if it is too big or unreadable)."""
    if path.stat().st_size > MAX_FILE_BYTES:
        return []
    try:
        if path.suffix == ".csv":
            return [("", list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8")))))]
        return json_tables(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, UnicodeDecodeError) as e:
        return [("", [{"error": f"could not read: {e}"}])]


def _walk(root: Path, max_depth: int = 4) -> Iterable[Path]:
    """Files under root in sorted order, skipping hidden and cache folders and symlinks out of root."""
    for dirpath, dirnames, filenames in os.walk(root):
        depth = len(Path(dirpath).relative_to(root).parts)
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".") and depth < max_depth)
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if not name.startswith(".") and not p.is_symlink():
                yield p


STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}
th{background:#f3f3f3} img{max-width:100%;border:1px solid #eee} h2{border-bottom:1px solid #ddd}
code{background:#f5f5f5;padding:0 3px} .muted{color:#777}
"""


def render_report(run_dir: str | os.PathLike, title: str, sections: list[Section] | None = None) -> str:
    """The report's HTML (see write_report)."""
    root = Path(run_dir)
    files = [p for p in _walk(root) if p.name != "report.html" and p.name not in SKIP_NAMES]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{STYLE}</style></head><body>"]
    parts.append(f"<h1>{esc(title)}</h1><p class='muted'>run directory <code>{esc(root)}</code></p>")
    for s in sections or []:
        parts.append(f"<h2>{esc(s.title)}</h2>")
        if s.text:
            parts.append(f"<p>{esc(s.text)}</p>")
        if s.table:
            parts.append(html_table(s.table))
        for img in s.images:
            parts.append(f"<p><img src='{esc(img)}' alt='{esc(img)}'></p>")
    figures = [p for p in files if p.suffix == ".png"]
    svgs = {p.with_suffix("") for p in files if p.suffix == ".svg"}
    lone_svgs = [p for p in files if p.suffix == ".svg" and not p.with_suffix(".png").exists()]
    if figures or lone_svgs:
        parts.append("<h2>Figures</h2>")
    for p in figures + lone_svgs:
        rel = p.relative_to(root).as_posix()
        link = f" (<a href='{esc(p.with_suffix('.svg').relative_to(root).as_posix())}'>SVG</a>)" if p.with_suffix("") in svgs and p.suffix == ".png" else ""
        parts.append(f"<h3>{esc(rel)}{link}</h3><p><img src='{esc(rel)}' alt='{esc(rel)}'></p>")
    tables = [p for p in files if p.suffix in (".json", ".csv")]
    if tables:
        parts.append("<h2>Tables</h2>")
    for p in tables:
        rel = p.relative_to(root).as_posix()
        parts.append(f"<h3><a href='{esc(rel)}'>{esc(rel)}</a></h3>")
        found = file_tables(p)
        if not found:
            parts.append("<p class='muted'>(too large to show here; open the file)</p>")
        for caption, rows in found:
            if caption:
                parts.append(f"<h4>{esc(caption)}</h4>")
            parts.append(html_table(rows))
    others = [p for p in files if p.suffix not in (".png", ".svg", ".json", ".csv")]
    if others:
        parts.append("<h2>Other files</h2><ul>")
        for p in others:
            rel = p.relative_to(root).as_posix()
            parts.append(f"<li><a href='{esc(rel)}'>{esc(rel)}</a> <span class='muted'>({p.stat().st_size:,} bytes)</span></li>")
        parts.append("</ul>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(run_dir: str | os.PathLike, title: str, sections: list[Section] | None = None) -> Path:
    """Write `<run_dir>/report.html` (atomically) showing the run's figures and tables."""
    root = Path(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"run directory not found: {root}")
    return atomic_write_text(root / "report.html", render_report(root, title, sections))
