"""The feature pages: one latent's dashboard and max-activating examples, an SAE's sortable feature list, the search form.

A feature page joins everything the run knows about the latent (RunData.feature): the precomputed
dashboard (logit lens, density, ICL-prompt activations, neighbours), steering effects from heatmaps
and cleaning runs, the cleaned task vectors and circuits it is in, and its corpus examples.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from icl_circuits.methods.dashboards import SORT_COLUMNS
from icl_circuits.methods.examples import Example
from icl_circuits.viz.report import esc, svg_histogram, svg_hbars
from icl_circuits.viz.viewer.data import RunData
from icl_circuits.viz.viewer.layout import feature_link, feature_url, num, page, table, task_href


def render_example(e: Example, scale: float) -> str:
    """Tokens shaded by the latent's activation (the firing token outlined); text escaped."""
    spans = []
    for i, (t, a) in enumerate(zip(e.tokens, e.acts)):
        alpha = 0.0 if scale <= 0 else min(max(a, 0.0) / scale, 1.0)
        text = t.replace("\n", "⏎")
        cls = "tok target" if i == e.target else "tok"
        spans.append(f"<span class='{cls}' style='background:rgba(229,57,53,{alpha:.2f})' title='{a:.3g}'>{esc(text)}</span>")
    where = "top" if e.bin < 0 else f"bin {e.bin}"
    return f"<div class='ex'><span class='act' title='{esc(where)}, doc {e.doc}'>{e.act:.3g}</span>{''.join(spans)}</div>"


def _spread(examples: list[Example], n_top: int = 8, n_bins: int = 6, per_bin: int = 2) -> list[Example]:
    """The top n_top, then per_bin examples from n_bins bins spread evenly from the highest to the lowest."""
    top = [e for e in examples if e.bin < 0][:n_top]
    bins = sorted({e.bin for e in examples if e.bin >= 0}, reverse=True)
    if len(bins) > n_bins:
        bins = [bins[round(i * (len(bins) - 1) / (n_bins - 1))] for i in range(n_bins)]
    return top + [e for b in bins for e in [x for x in examples if x.bin == b][:per_bin]]


def _tokens(tokens: list[str], acts: list[float], types: list[str], scale: float) -> str:
    """An ICL prompt as coloured tokens: background by activation, underline by token type."""
    spans = []
    for t, a, ty in zip(tokens, acts, types):
        alpha = 0.0 if scale <= 0 else min(max(a, 0.0) / scale, 1.0)
        text = t.replace("\n", "⏎")
        spans.append(f"<span class='tok ty-{esc(ty)}' style='background:rgba(229,57,53,{alpha:.2f})' title='{esc(ty)}: {a:.3g}'>{esc(text)}</span>")
    return "".join(spans)


def lens_text(t: Any) -> str:
    """How the logit lens shows a token: newlines as ⏎, a token without text (special, unused) as [id N]."""
    return t.text.replace("\n", "⏎") if t.text else f"[id {t.token_id}]"


def _lens_table(tokens: list[Any], sign: str) -> str:
    top = max((abs(t.value) for t in tokens), default=1.0) or 1.0
    rows = [[f"<code class='lens-token' title='token id {t.token_id}'>{esc(lens_text(t))}</code>", esc(f"{t.value:+.3f}"),
             f"<span class='bar {sign}' style='width:{int(100 * abs(t.value) / top)}px'></span>"] for t in tokens]  # fmt: skip
    return table(["token", "logit", ""], rows)


def _dashboard_panels(data: RunData, fd: dict[str, Any]) -> list[str]:
    d = fd["dashboard"]
    sae = fd["sae"]
    parts = []
    if d is None:
        if not fd["has_dashboard"]:
            parts.append("<p class='muted'>No dashboard data for this SAE in the run (precompute it with <code>build_dashboards</code>, "
                         "<code>icl-circuits dashboards</code>).</p>")  # fmt: skip
        else:
            parts.append("<p class='muted'>This latent is not in the run's dashboard file.</p>")
    else:
        where = "the final norm and the unembedding" if d.final_norm else "the unembedding"
        parts.append(
            f"<section id='logit-lens' class='panel'><h2>Logit lens</h2><p class='muted'>the decoder direction through {where}</p>"
            f"<div class='row'><div><h3>top +</h3>{_lens_table(d.logit_pos, 'pos')}</div><div><h3>top −</h3>{_lens_table(d.logit_neg, 'neg')}</div></div></section>"
        )  # fmt: skip
        parts.append(
            f"<section id='density' class='panel'><h2>Activation density</h2><p>fires on <b>{d.n_fired:,}</b> of {d.n_tokens:,} tokens of the tasks' "
            f"ICL prompts (density <b>{d.density:.3g}</b>); mean when firing {d.mean_act:.3g}, max {d.max_act:.3g}.</p>"
            + (svg_histogram(d.hist, 0.0, d.max_act, xlabel="non-zero activation", css_class="chart histogram") if d.n_fired else
               "<p class='muted'>It never fired on these prompts.</p>") + "</section>"
        )  # fmt: skip
        icl = ["<section id='icl-prompts' class='panel'><h2>On the tasks' ICL prompts</h2>"]
        if not d.tasks:
            icl.append("<p class='muted'>It fires on no task's prompts.</p>")
        else:
            total = {ty: sum(t.masses.get(ty, 0.0) for t in d.tasks) for ty in d.mass_types}
            s = sum(total.values()) or 1.0
            icl.append(svg_hbars([(ty, v / s) for ty, v in total.items()], title="share of activation mass by token type (all tasks)", css_class="chart masses"))
            icl.append("<div class='legend'>" + "".join(f"<span class='tok ty-{esc(ty)}'>{esc(ty)}</span> " for ty in d.mass_types) + "</div>")
            scale = max((a for t in d.tasks for a in t.acts), default=0.0)
            for t in sorted(d.tasks, key=lambda t: -t.total):
                href = task_href(data, t.task)
                name = f"<a href='{esc(href)}'>{esc(t.task)}</a>" if href else esc(t.task)
                shares = " ".join(f"{esc(ty)} {100 * v / (t.total or 1):.0f}%" for ty, v in t.masses.items() if v > 0)
                icl.append(f"<div class='icl-task'><h4>{name} <span class='muted'>mass {t.total:.3g}: {shares}</span></h4>"
                           f"<div class='ex'>{_tokens(t.tokens, t.acts, t.types, scale)}</div></div>")  # fmt: skip
        parts.append("".join(icl) + "</section>")
        nb = [[feature_link(data, sae, j), esc(f"{c:.3f}")] for j, c in d.neighbours]
        parts.append("<section id='neighbours' class='panel'><h2>Nearest features by decoder cosine</h2>" + table(["feature", "cosine"], nb) + "</section>")
    steer = []
    for r in fd["heatmap_rows"]:
        vals = [(k, v) for k, v in r["values"].items() if isinstance(v, (int, float))]
        steer.append(svg_hbars(vals, title=r["title"], links=[task_href(data, k) for k, _ in vals], css_class="chart steering"))
    if fd["alone"]:
        vals = list(fd["alone"].items())
        steer.append(svg_hbars(vals, title="cleaning runs: steering with this feature alone", links=[task_href(data, k) for k, _ in vals], css_class="chart steering"))
    if steer:
        parts.append("<section id='steering' class='panel'><h2>Steering effect per task</h2><p class='muted'>relative loss decrease when steering with the feature</p>"
                     + "".join(steer) + "</section>")  # fmt: skip
    return parts


def feature_page(data: RunData, sae: str, latent: int, all_examples: bool = False) -> str:
    fd = data.feature(sae, latent, limit=None)
    if not all_examples:
        fd["examples"] = _spread(fd["examples"])
    parts = []
    info = fd["info"]
    d_sae = info.get("d_sae")
    nav = []
    if latent > 0:
        nav.append(f"<a rel='prev' href='{esc(feature_url(sae, latent - 1))}'>← #{latent - 1}</a>")
    if not isinstance(d_sae, int) or latent + 1 < d_sae:
        nav.append(f"<a rel='next' href='{esc(feature_url(sae, latent + 1))}'>#{latent + 1} →</a>")
    parts.append(f"<p>SAE <b><a href='/sae/{esc(quote(sae, safe=''))}'>{esc(sae)}</a></b> at <code>{esc(info.get('site', '?'))}</code>, latent {latent}. "
                 + " ".join(nav) + "</p>")  # fmt: skip
    if fd["stats"]:
        s = fd["stats"]
        parts.append(f"<p>on the corpus: fires on {s['n_fired']:,} tokens (density {s['density']:.3g}); mean activation {s['mean_act']:.3g}, max {s['max_act']:.3g}.</p>")
    if not all_examples:
        parts += _dashboard_panels(data, fd)
    if fd["tasks"]:
        parts.append("<h2>In cleaned task vectors</h2>" + table(
            ["task", "weight after cleaning", "weight in TV encoding"],
            [[f"<a href='/task/{esc(quote(t['task'], safe=''))}'>{esc(t['task'])}</a>", num(t["weight"]), num(t["initial_weight"])] for t in fd["tasks"]]))  # fmt: skip
    if fd["circuits"]:
        parts.append("<h2>In circuits</h2>" + table(
            ["circuit", "node", "effect"],
            [[f"<a href='/circuit/{c['index']}'>{esc(c['title'])}</a>", esc(c["node"]), num(c["effect"])] for c in fd["circuits"]]))  # fmt: skip
    parts.append("<h2 id='examples'>Max-activating examples</h2>")
    if not fd["has_store"]:
        parts.append("<p class='muted'>No example store for this SAE in the run (make one with <code>icl-circuits examples</code>).</p>")
    elif not fd["examples"]:
        parts.append("<p class='muted'>This latent never fired on the corpus.</p>")
    else:
        scale = max(e.act for e in fd["examples"]) or 1.0
        top = [e for e in fd["examples"] if e.bin < 0]
        parts.append(f"<h3>Top {len(top)}</h3>" + "".join(render_example(e, scale) for e in top))
        bins = [e for e in fd["examples"] if e.bin >= 0]
        w = fd["bin_width"]
        for b in sorted({e.bin for e in bins}, reverse=True):
            parts.append(f"<h3>Activation in [{b * w:g}, {(b + 1) * w:g})</h3>" + "".join(render_example(e, scale) for e in bins if e.bin == b))
        if not all_examples:
            parts.append(f"<p><a id='all-examples' href='{esc(feature_url(sae, latent))}/examples'>All examples, every activation bin</a></p>")
    title = f"Feature {sae} #{latent}" + (" — all examples" if all_examples else "")
    return page(title, "".join(parts))


SAE_COLUMNS = [("latent", "latent"), ("density", "density"), ("n_fired", "tokens fired"), ("max_act", "max act"), ("mean_act", "mean act"),
               ("top_token", "top logit token"), ("top_logit", "its logit"), ("top_type", "main token type"), ("n_tasks", "tasks fired on")]  # fmt: skip
PAGE_SIZE = 200


def sae_page(data: RunData, sae: str, query: dict[str, list[str]] | None = None) -> str | None:
    """A run's features of one SAE, sorted by any column (?sort=COLUMN&order=asc|desc&page=N)."""
    query = query or {}
    dash = data.dashboard_for(sae)
    store = data.store_for(sae)
    if dash is None and store is None:
        return None
    if dash is None:
        rows = [[feature_link(data, sae, r["latent"]), esc(f"{r['n_fired']:,}"), num(r["max_act"])] for r in store.top_latents(sae, limit=300)]  # type: ignore[union-attr]
        return page(f"SAE {sae}: latents by max activation", table(["latent", "tokens fired", "max activation"], rows))
    sort = query.get("sort", ["density"])[0]
    if sort not in SORT_COLUMNS:
        raise ValueError(f"unknown sort column {sort!r}")
    order = query.get("order", ["asc" if sort in ("latent", "top_token", "top_type") else "desc"])[0]
    if order not in ("asc", "desc"):
        raise ValueError(f"order must be asc or desc, got {order!r}")
    pg = query.get("page", ["0"])[0]
    if not pg.isdigit():
        raise ValueError(f"page must be a number, got {pg!r}")
    n = dash.count(sae)
    rows = dash.features(sae, sort, order == "desc", PAGE_SIZE, int(pg) * PAGE_SIZE)
    base = f"/sae/{quote(sae, safe='')}"
    head = []
    for col, label in SAE_COLUMNS:
        flip = "asc" if (col == sort and order == "desc") else "desc"
        mark = (" ▼" if order == "desc" else " ▲") if col == sort else ""
        head.append(f"<th><a class='sort' href='{esc(base)}?sort={col}&amp;order={flip}'>{esc(label)}{mark}</a></th>")
    body = []
    for r in rows:
        cells = [feature_link(data, sae, r["latent"]), esc(f"{r['density']:.3g}"), esc(f"{r['n_fired']:,}"), num(r["max_act"]), num(r["mean_act"]),
                 f"<code>{esc(r['top_token'])}</code>", num(r["top_logit"]), esc(r["top_type"]), esc(r["n_tasks"])]  # fmt: skip
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    pages = []
    if int(pg) > 0:
        pages.append(f"<a href='{esc(base)}?sort={sort}&amp;order={order}&amp;page={int(pg) - 1}'>← previous</a>")
    if (int(pg) + 1) * PAGE_SIZE < n:
        pages.append(f"<a href='{esc(base)}?sort={sort}&amp;order={order}&amp;page={int(pg) + 1}'>next →</a>")
    html_out = (f"<p class='muted'>{n:,} latents; density and activations on the tasks' ICL prompts. Click a column to sort.</p>"
                f"<table id='feature-list'><thead><tr>{''.join(head)}</tr></thead><tbody>{''.join(body)}</tbody></table><p>{' '.join(pages)}</p>")  # fmt: skip
    return page(f"SAE {sae}: features", html_out)


def features_page(data: RunData) -> str:
    parts = ["<form id='search' action='/goto' method='get'>SAE <select name='sae'>"]
    parts += [f"<option>{esc(n)}</option>" for n in data.sae_names()]
    parts.append("</select> feature <input name='latent' size='8' inputmode='numeric' pattern='[0-9]+' required> <button>open</button></form>")
    parts.append("<ul>" + "".join(f"<li><a href='/sae/{esc(quote(n, safe=''))}'>{esc(n)}</a></li>" for n in data.sae_names()) + "</ul>")
    return page("Features", "".join(parts))
