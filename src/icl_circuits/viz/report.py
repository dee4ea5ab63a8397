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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from icl_circuits.core.storage import atomic_write_text

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


def walk_files(root: Path, max_depth: int = 4) -> Iterator[Path]:
    """Files under root in sorted order (symlinked files included; symlinked folders are not entered),
    skipping hidden names and cache folders. The report and the viewer (icl_circuits.viz.viewer) both walk
    a run directory with this; each then decides what to do with a symlink."""
    for dirpath, dirnames, filenames in os.walk(root):  # followlinks=False
        depth = len(Path(dirpath).relative_to(root).parts)
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".") and depth < max_depth)
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def _walk(root: Path, max_depth: int = 4) -> Iterable[Path]:
    """Files under root in sorted order, skipping hidden and cache folders and symlinks (a static page
    links files by relative path, so a link could point the reader outside the run)."""
    return (p for p in walk_files(root, max_depth) if not p.is_symlink())


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


# -- inline SVG charts (server-side, no script; every label escaped) ----------------------------------
def _fnum(v: float) -> str:
    return f"{v:.3g}"


def svg_hbars(rows: list[tuple[str, float]], *, links: list[str | None] | None = None, width: int = 420, title: str = "",
              color_pos: str = "#1e88e5", color_neg: str = "#e53935", label_width: int = 150, css_class: str = "chart") -> str:  # fmt: skip
    """Horizontal bars, one per (label, value), zero in the middle when values have both signs.
    links: an optional href per row (the label becomes a link)."""
    if not rows:
        return ""
    vals = [v if isinstance(v, (int, float)) and v == v else 0.0 for _, v in rows]
    lo, hi = min(0.0, *vals), max(0.0, *vals)
    span = (hi - lo) or 1.0
    plot_w = width - label_width - 60
    zero_x = label_width + plot_w * (-lo) / span
    h = 16
    top = 18 if title else 4
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' class='{esc(css_class)}' width='{width}' height='{top + h * len(rows) + 6}' "
           f"viewBox='0 0 {width} {top + h * len(rows) + 6}' font-size='11' role='img'>"]  # fmt: skip
    if title:
        out.append(f"<text x='0' y='12' font-weight='600'>{esc(title)}</text>")
    for i, ((label, _), v) in enumerate(zip(rows, vals)):
        y = top + i * h
        x0 = zero_x if v >= 0 else zero_x - plot_w * (-v) / span
        w = plot_w * abs(v) / span
        lab = esc(str(label)[:28])
        text = f"<text x='{label_width - 4}' y='{y + 11}' text-anchor='end'>{lab}</text>"
        href = links[i] if links and i < len(links) else None
        if href:
            text = f"<a href='{esc(href)}'>{text}</a>"
        out.append(f"<g class='bar-row'>{text}<rect x='{x0:.1f}' y='{y + 2}' width='{max(w, 0.5):.1f}' height='{h - 4}' "
                   f"fill='{color_pos if v >= 0 else color_neg}'><title>{esc(label)}: {esc(_fnum(v))}</title></rect>"
                   f"<text x='{max(x0 + w, zero_x) + 3:.1f}' y='{y + 11}' fill='#555'>{esc(_fnum(v))}</text></g>")  # fmt: skip
    out.append(f"<line x1='{zero_x:.1f}' x2='{zero_x:.1f}' y1='{top}' y2='{top + h * len(rows)}' stroke='#999'/></svg>")
    return "".join(out)


def svg_grouped_bars(labels: list[str], series: list[tuple[str, str, list[float]]], *, links: list[str | None] | None = None,
                     width: int = 560, css_class: str = "chart") -> str:  # fmt: skip
    """Horizontal grouped bars: per label one bar per series (name, colour, values); a legend on top."""
    if not labels:
        return ""
    allv = [v for _, _, vs in series for v in vs if isinstance(v, (int, float))]
    lo, hi = min([0.0, *allv]), max([0.0, *allv])
    span = (hi - lo) or 1.0
    label_w, plot_w = 120, width - 120 - 60
    zero_x = label_w + plot_w * (-lo) / span
    bh = 7
    gh = bh * len(series) + 6
    top = 22
    height = top + gh * len(labels) + 4
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' class='{esc(css_class)}' width='{width}' height='{height}' viewBox='0 0 {width} {height}' font-size='11' role='img'>"]
    for j, (name, color, _) in enumerate(series):
        out.append(f"<rect x='{label_w + 130 * j}' y='4' width='10' height='10' fill='{esc(color)}'/><text x='{label_w + 14 + 130 * j}' y='13'>{esc(name)}</text>")
    for i, lab in enumerate(labels):
        y = top + i * gh
        text = f"<text x='{label_w - 4}' y='{y + gh / 2 + 3:.0f}' text-anchor='end'>{esc(lab)}</text>"
        href = links[i] if links and i < len(links) else None
        out.append(f"<a href='{esc(href)}'>{text}</a>" if href else text)
        for j, (name, color, vs) in enumerate(series):
            v = vs[i] if i < len(vs) and isinstance(vs[i], (int, float)) else 0.0
            x0 = zero_x if v >= 0 else zero_x - plot_w * (-v) / span
            out.append(f"<rect x='{x0:.1f}' y='{y + 2 + j * bh}' width='{max(plot_w * abs(v) / span, 0.5):.1f}' height='{bh - 1}' fill='{esc(color)}'>"
                       f"<title>{esc(lab)} {esc(name)}: {esc(_fnum(v))}</title></rect>")  # fmt: skip
    out.append(f"<line x1='{zero_x:.1f}' x2='{zero_x:.1f}' y1='{top}' y2='{height - 4}' stroke='#999'/></svg>")
    return "".join(out)


def svg_histogram(counts: list[int], lo: float, hi: float, *, width: int = 420, height: int = 150, xlabel: str = "activation",
                  css_class: str = "chart") -> str:  # fmt: skip
    """Bars for equal bins over [lo, hi]; counts on hover."""
    if not counts:
        return ""
    m = max(counts) or 1
    pad_l, pad_b, pad_t = 34, 28, 6
    pw, ph = width - pad_l - 6, height - pad_b - pad_t
    bw = pw / len(counts)
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' class='{esc(css_class)}' width='{width}' height='{height}' viewBox='0 0 {width} {height}' font-size='10' role='img'>"]
    for i, c in enumerate(counts):
        bh = ph * c / m
        a, b = lo + (hi - lo) * i / len(counts), lo + (hi - lo) * (i + 1) / len(counts)
        out.append(f"<rect x='{pad_l + i * bw:.1f}' y='{pad_t + ph - bh:.1f}' width='{max(bw - 1, 0.5):.1f}' height='{bh:.1f}' fill='#43a047'>"
                   f"<title>[{esc(_fnum(a))}, {esc(_fnum(b))}): {c}</title></rect>")  # fmt: skip
    out.append(f"<line x1='{pad_l}' x2='{pad_l + pw}' y1='{pad_t + ph}' y2='{pad_t + ph}' stroke='#999'/>")
    out.append(f"<text x='{pad_l}' y='{height - 14}'>{esc(_fnum(lo))}</text><text x='{pad_l + pw}' y='{height - 14}' text-anchor='end'>{esc(_fnum(hi))}</text>")
    out.append(f"<text x='{pad_l + pw / 2:.0f}' y='{height - 3}' text-anchor='middle' fill='#555'>{esc(xlabel)}</text>")
    out.append(f"<text x='{pad_l - 3}' y='{pad_t + 8}' text-anchor='end'>{m}</text><text x='{pad_l - 3}' y='{pad_t + ph}' text-anchor='end'>0</text></svg>")
    return "".join(out)


SERIES_COLORS = ("#1e88e5", "#e53935", "#43a047", "#fb8c00", "#8e24aa", "#00897b")


def svg_lines(series: list[tuple[str, list[tuple[float, float]]]], *, width: int = 420, height: int = 200, xlabel: str = "",
              ylabel: str = "", title: str = "", css_class: str = "chart") -> str:  # fmt: skip
    """A line chart of named (x, y) series; points show their values on hover; a legend on top."""
    pts = [(x, y) for _, s in series for x, y in s if isinstance(x, (int, float)) and isinstance(y, (int, float)) and y == y and x == x]
    if not pts:
        return ""
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad_l, pad_r, pad_t, pad_b = 46, 10, 22 if title or len(series) > 1 else 8, 30
    pw, ph = width - pad_l - pad_r, height - pad_t - pad_b

    def X(x: float) -> float:
        return pad_l + pw * (x - x0) / (x1 - x0)

    def Y(y: float) -> float:
        return pad_t + ph * (1 - (y - y0) / (y1 - y0))

    out = [f"<svg xmlns='http://www.w3.org/2000/svg' class='{esc(css_class)}' width='{width}' height='{height}' viewBox='0 0 {width} {height}' font-size='10' role='img'>"]
    if title:
        out.append(f"<text x='{pad_l}' y='12' font-weight='600'>{esc(title)}</text>")
    out.append(f"<rect x='{pad_l}' y='{pad_t}' width='{pw}' height='{ph}' fill='none' stroke='#ccc'/>")
    for k, (name, s) in enumerate(series):
        color = SERIES_COLORS[k % len(SERIES_COLORS)]
        good = [(x, y) for x, y in s if isinstance(y, (int, float)) and y == y]
        if len(series) > 1 or not title:
            out.append(f"<text x='{pad_l + 8 + 110 * k + (140 if title else 0)}' y='{12 if pad_t > 8 else pad_t + 10}' fill='{color}'>{esc(name)}</text>")
        if len(good) > 1:
            path = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in good)
            out.append(f"<polyline class='series' points='{path}' fill='none' stroke='{color}' stroke-width='1.5'/>")
        if len(good) <= 60:
            out += [f"<circle cx='{X(x):.1f}' cy='{Y(y):.1f}' r='2.5' fill='{color}'><title>{esc(name)}: {esc(_fnum(x))}, {esc(_fnum(y))}</title></circle>"
                    for x, y in good]  # fmt: skip
    out.append(f"<text x='{pad_l - 3}' y='{pad_t + 8}' text-anchor='end'>{esc(_fnum(y1))}</text>"
               f"<text x='{pad_l - 3}' y='{pad_t + ph}' text-anchor='end'>{esc(_fnum(y0))}</text>"
               f"<text x='{pad_l}' y='{pad_t + ph + 12}'>{esc(_fnum(x0))}</text>"
               f"<text x='{pad_l + pw}' y='{pad_t + ph + 12}' text-anchor='end'>{esc(_fnum(x1))}</text>"
               f"<text x='{pad_l + pw / 2:.0f}' y='{height - 3}' text-anchor='middle' fill='#555'>{esc(xlabel)}</text>"
               f"<text x='10' y='{pad_t + ph / 2:.0f}' fill='#555' transform='rotate(-90 10 {pad_t + ph / 2:.0f})' text-anchor='middle'>{esc(ylabel)}</text></svg>")  # fmt: skip
    return "".join(out)
