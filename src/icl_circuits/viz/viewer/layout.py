"""The frame every viewer page shares: style, CSP, navigation, tables and links between pages.

Every string from the run goes through `esc` (report.esc, the one HTML escape of the package);
cells handed to `table` are HTML already, escaped by the caller.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from icl_circuits.viz.report import esc
from icl_circuits.viz.viewer.data import RunData

STYLE = """
body{font-family:system-ui,sans-serif;margin:0;color:#222}
nav{background:#263238;padding:.6em 2em} nav a{color:#eceff1;margin-right:1.5em;text-decoration:none;font-weight:600}
main{padding:1em 2em;max-width:1300px}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top} th{background:#f3f3f3}
.ex{font-family:ui-monospace,monospace;font-size:13px;white-space:pre-wrap;border-bottom:1px solid #eee;padding:3px 0}
.ex .act{display:inline-block;width:5.5em;color:#555}
.tok{border-radius:2px} .tok.target{outline:1.5px solid #b71c1c}
.muted{color:#777} .bar{display:inline-block;height:10px;background:#1e88e5}
img{max-width:100%;border:1px solid #eee} svg a:hover circle{stroke:#000;stroke-width:2}
.panel{border:1px solid #e0e0e0;border-radius:4px;padding:.4em 1em;margin:1em 0} .row{display:flex;flex-wrap:wrap;gap:1.5em;align-items:flex-start}
.grow{flex:1 1 600px} .bar.neg{background:#e53935} .icl-task h4{margin:.6em 0 .2em;font-weight:600}
.ty-prompt{border-bottom:2px solid #9e9e9e} .ty-input{border-bottom:2px solid #2ca02c} .ty-arrow{border-bottom:2px solid #1f77b4}
.ty-output{border-bottom:2px solid #ff7f0e} .ty-newline{border-bottom:2px solid #9467bd} .ty-extra{border-bottom:2px solid #8c564b}
.legend .tok{margin-right:.6em;font-size:12px} code.lens-token{white-space:pre} th a.sort{color:inherit} form label{margin-right:.8em}
"""
CSP = "default-src 'self'; script-src 'none'; object-src 'none'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; base-uri 'none'; form-action 'self'"
TYPE_COLORS = {"prompt": "#9e9e9e", "input": "#2ca02c", "arrow": "#1f77b4", "output": "#ff7f0e", "newline": "#9467bd", "extra": "#8c564b", "bos": "#cfd8dc"}


def page(title: str, body: str) -> str:
    nav = "<nav><a href='/'>Run</a><a href='/tasks'>Tasks</a><a href='/features'>Features</a><a href='/circuits'>Circuits</a><a href='/plots'>Plots</a></nav>"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{STYLE}</style></head>"
        f"<body>{nav}<main><h1>{esc(title)}</h1>{body}</main></body></html>"
    )


def feature_url(sae: str, latent: int) -> str:
    return f"/feature/{quote(sae, safe='')}/{int(latent)}"


def feature_link(data: RunData, sae_spec: Any, latent: Any) -> str:
    """A link to the feature page when the SAE has an example store; plain text otherwise."""
    if latent is None:
        return ""
    sae = data.resolve_sae(sae_spec)
    label = f"{sae or sae_spec or ''} #{latent}".strip()
    return f"<a href='{esc(feature_url(sae, int(latent)))}'>{esc(label)}</a>" if sae else esc(label)


def task_href(data: RunData, task: str) -> str | None:
    """The task page of a task name (also 'name (setting, layer n)' variants), or None."""
    if task in data.tasks:
        return f"/task/{quote(task, safe='')}"
    same = [t.name for t in data.tasks.values() if t.task == task]
    return f"/task/{quote(same[0], safe='')}" if same else None


def num(x: Any) -> str:
    return esc(f"{x:.4g}") if isinstance(x, float) else esc("" if x is None else x)


def table(cols: list[str], rows: list[list[str]]) -> str:
    """Cells are already HTML (escaped by the caller)."""
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figure(rel: str) -> str:
    """A PNG/SVG of the run, served by /files/."""
    return f"<h3>{esc(rel)}</h3><img src='/files/{esc(quote(rel))}' alt='{esc(rel)}'>"
