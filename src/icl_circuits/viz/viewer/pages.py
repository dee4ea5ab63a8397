"""The run's pages other than a feature's: index, task list and task page, circuits (SVG graph), plots.

Pages take the typed views of data.py / formats.py and return escaped HTML; charts are inline SVG
drawn here (icl_circuits.viz.report.svg_*), so no page carries JavaScript.
"""

from __future__ import annotations

from urllib.parse import quote

from icl_circuits.viz.report import esc, file_tables, html_table, json_tables, svg_grouped_bars, svg_lines
from icl_circuits.viz.viewer.data import RunData
from icl_circuits.viz.viewer.formats import CircuitNode, CircuitView
from icl_circuits.viz.viewer.layout import TYPE_COLORS, feature_link, feature_url, figure, num, page, table, task_href


def index_page(data: RunData) -> str:
    parts = [f"<p class='muted'>run directory <code>{esc(data.root)}</code></p>"]
    parts.append(f"<h2>Tasks ({len(data.tasks)})</h2>")
    parts.append(task_list(data) if data.tasks else "<p class='muted'>No cleaned task vectors (cleaning.json) in this run.</p>")
    parts.append(f"<h2>Circuits ({len(data.circuits)})</h2>" + circuit_list(data))
    parts.append(f"<h2>Example stores ({len(data.stores)})</h2>")
    rows = []
    for st in data.stores:
        prog = st.progress()
        for s in st.saes():
            rows.append([f"<a href='/sae/{esc(quote(s['name'], safe=''))}'>{esc(s['name'])}</a>", esc(s["site"]), esc(s["d_sae"]),
                         esc(f"{prog.get('tokens', 0):,}"), esc(f"{st.count(s['name']):,}"), esc(data.rel(st.path))])  # fmt: skip
    parts.append(table(["SAE", "site", "latents", "tokens read", "examples stored", "file"], rows) if rows else "<p class='muted'>none</p>")
    if data.dashboards:
        rows = [[f"<a href='/sae/{esc(quote(s['name'], safe=''))}'>{esc(s['name'])}</a>", esc(s["site"]), esc(s["d_sae"]),
                 esc(f"{s['n_tokens']:,}"), esc(len(d.tasks)), esc(data.rel(d.path))] for d in data.dashboards for s in d.saes()]  # fmt: skip
        parts.append(f"<h2>Feature dashboards ({len(rows)})</h2>" + table(["SAE", "site", "latents", "ICL-prompt tokens", "tasks", "file"], rows))
    if data.reports:
        parts.append("<h2>Reports</h2><ul>" + "".join(f"<li><a href='/files/{esc(quote(r))}'>{esc(r)}</a></li>" for r in data.reports) + "</ul>")
    parts.append(f"<p><a href='/plots'>{len(data.figures)} plots</a></p>")
    if data.problems:
        parts.append("<h2>Files not shown</h2><ul>" + "".join(f"<li class='muted'>{esc(p)}</li>" for p in data.problems) + "</ul>")
    return page("icl-circuits viewer", "".join(parts))


def task_list(data: RunData) -> str:
    rows = [
        [f"<a href='/task/{esc(quote(t.name, safe=''))}'>{esc(t.name)}</a>", esc(t.setting or ""), esc(t.sae),
         num(t.layer), esc(len(t.tv_features)), esc(len(t.features))]
        for t in sorted(data.tasks.values(), key=lambda t: t.name)
    ]  # fmt: skip
    return table(["task", "setting", "SAE", "layer", "features in TV encoding", "features after cleaning"], rows)


def circuit_list(data: RunData) -> str:
    if not data.circuits:
        return "<p class='muted'>No circuit graphs (graph.json) in this run.</p>"
    rows = [[f"<a href='/circuit/{c.index}'>{esc(c.title)}</a>", esc(c.task), esc(len(c.nodes)), esc(len(c.edges)), esc(c.file)]
            for c in data.circuits]  # fmt: skip
    return table(["circuit", "task", "nodes", "edges", "file"], rows)


def task_page(data: RunData, name: str) -> str | None:
    t = data.tasks.get(name)
    if t is None:
        return None
    # a heatmap's effect (scale x direction) when there is one, else the cleaning run's own: the feature alone
    steer = {**t.alone(), **data.task_steering(t.task, t.setting)}
    parts = [html_table([t.summary]) if t.summary else ""]
    # the TV's SAE encoding against the cleaned weights, for the latents in either
    initial = {f.latent: f.initial_weight for f in t.tv_features[:30]}
    initial.update({f.latent: f.initial_weight for f in t.features if f.latent not in initial})
    cleaned = {f.latent: f.weight for f in t.features}
    latents = sorted(initial, key=lambda i: -max(abs(initial[i] or 0), abs(cleaned.get(i) or 0)))
    sae = data.resolve_sae(t.sae)
    parts.append("<section id='task-weights' class='panel'><h2>TV's SAE encoding vs cleaned weights</h2>" + svg_grouped_bars(
        [f"#{i}" for i in latents],
        [("TV encoding", "#90a4ae", [initial[i] or 0.0 for i in latents]), ("after cleaning", "#1e88e5", [cleaned.get(i) or 0.0 for i in latents])],
        links=[feature_url(sae, i) if sae else None for i in latents], css_class="chart weights") + "</section>")  # fmt: skip
    parts.append(_tvc_curves(t.curves))
    parts.append(f"<h2>Cleaned features ({len(t.features)})</h2>")
    rows = [[feature_link(data, t.sae, f.latent), num(f.weight), num(f.initial_weight), num(steer.get(f.latent))] for f in t.features]
    parts.append(table(["feature", "weight after cleaning", "weight in TV encoding", "steering effect"], rows))
    parts.append(f"<h2>Task vector's SAE encoding ({len(t.tv_features)} features)</h2>")
    rows = [[feature_link(data, t.sae, f.latent), num(f.initial_weight), "kept" if f.kept else "", num(steer.get(f.latent))]
            for f in t.tv_features[:200]]  # fmt: skip
    parts.append(table(["feature", "weight", "after cleaning", "steering effect"], rows))
    for k, v in t.extra.items():  # scores: one row per method
        for caption, rows in json_tables(v if not isinstance(v, dict) else [{"method": m, **r} for m, r in v.items()]):
            parts.append(f"<h2>{esc(k)} {esc(caption)}</h2>" + html_table(rows))
    circuits = [c for c in data.circuits if c.task == t.task or c.dir == t.dir]
    if circuits:
        parts.append("<h2>Circuits</h2><ul>" + "".join(f"<li><a href='/circuit/{c.index}'>{esc(c.title)}</a></li>" for c in circuits) + "</ul>")
    figs = [f for f in data.figures if f.startswith(t.dir + "/") and f.endswith(".png")] if t.dir != "." else []
    parts += [figure(f) for f in figs]
    return page(f"Task {name}", "".join(parts))


def _tvc_curves(curves: dict[str, list]) -> str:
    """L0 and train / eval NLL per TVC step."""
    charts = []
    if curves.get("l0_history"):
        charts.append(svg_lines([("L0", list(enumerate(curves["l0_history"], 1)))], xlabel="step", ylabel="L0", title="L0 per step", css_class="chart tvc-l0"))
    loss = []
    if curves.get("train_loss"):
        loss.append(("train NLL", list(enumerate(curves["train_loss"], 1))))
    if curves.get("eval_loss"):
        loss.append(("eval NLL", [(step, nll) for step, nll in curves["eval_loss"]]))
    if loss:
        charts.append(svg_lines(loss, xlabel="step", ylabel="NLL", title="loss per step", css_class="chart tvc-loss"))
    return "<section id='tvc-curves' class='panel'><h2>TVC curves</h2><div class='row'>" + "".join(charts) + "</div></section>" if charts else ""


KIND_RANK = {"resid": 0, "attn": 1, "mlp": 2, "transcoder": 2}


def _node_filter(c: CircuitView, query: dict[str, list[str]]) -> tuple[list[CircuitNode], dict[str, str]]:
    """The circuit's nodes kept by ?layer=&site=&type= (empty: all)."""
    chosen = {k: query.get(k, [""])[0] for k in ("layer", "site", "type")}
    nodes = [
        n for n in c.nodes
        if (not chosen["layer"] or str(n.layer) == chosen["layer"]) and (not chosen["site"] or n.kind == chosen["site"])
        and (not chosen["type"] or str(n.where) == chosen["type"])
    ]  # fmt: skip
    return nodes, chosen


def _by_effect(n: CircuitNode) -> float:
    return -abs(n.effect) if isinstance(n.effect, (int, float)) else 0


def circuit_svg(data: RunData, c: CircuitView, nodes: list[CircuitNode] | None = None) -> str:
    """Nodes in rows by (layer, resid < attn < mlp), earliest at the bottom; edges as lines
    (blue positive, red negative, width by |weight|); nodes with an example store or dashboard link
    to feature pages; hovering a node shows its name, token type and effect."""
    nodes = c.nodes if nodes is None else nodes
    ids = {n.id for n in nodes}
    edges = [e for e in c.edges if e.source in ids and e.target in ids]

    def row_key(n: CircuitNode) -> tuple[float, int, str]:
        layer = n.layer if isinstance(n.layer, (int, float)) else float("inf")
        return (layer, KIND_RANK.get(n.kind, 3), n.kind)

    rows: dict[tuple[float, int, str], list[CircuitNode]] = {}
    for n in nodes:
        rows.setdefault(row_key(n), []).append(n)
    types = c.node_types
    for r in rows.values():  # within a row: by token type (prompt order), then by |effect|
        r.sort(key=lambda n: (types.index(n.where) if n.where in types else len(types), _by_effect(n)))
    keys = sorted(rows)
    width = max(600, 110 * max((len(r) for r in rows.values()), default=1) + 90)
    height = 80 * len(keys) + 40
    pos = {}
    for yi, k in enumerate(keys):
        for xi, n in enumerate(rows[k]):
            pos[n.id] = (90 + (xi + 0.5) * (width - 90) / len(rows[k]), height - 30 - 80 * yi)
    wmax = max((abs(e.weight) for e in edges if isinstance(e.weight, (int, float))), default=1.0) or 1.0
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' id='circuit-graph' viewBox='0 0 {width:.0f} {height}' width='100%' "
           f"style='max-width:{width:.0f}px' font-size='11'>"]  # fmt: skip
    for e in edges:
        (x1, y1), (x2, y2) = pos[e.source], pos[e.target]
        w = e.weight if isinstance(e.weight, (int, float)) else 0.5 * wmax
        r = min(abs(w) / wmax, 1.0)
        color = "#1e88e5" if w >= 0 else "#e53935"
        out.append(f"<line x1='{x1:.0f}' y1='{y1:.0f}' x2='{x2:.0f}' y2='{y2:.0f}' stroke='{color}' stroke-opacity='{0.2 + 0.8 * r:.2f}' "
                   f"stroke-width='{1 + 4 * r:.1f}'><title>{esc(e.source)} → {esc(e.target)}: {num(e.weight)}</title></line>")  # fmt: skip
    for yi, k in enumerate(keys):
        label = f"{k[2]} {k[0]:g}" if k[0] != float("inf") else k[2]
        out.append(f"<text x='4' y='{height - 26 - 80 * yi:.0f}' fill='#888'>{esc(label)}</text>")
    for n in nodes:
        x, y = pos[n.id]
        sae = data.resolve_sae(n.key)
        label = (f"#{n.latent}" if n.latent is not None else "err") + (f" @{n.where}" if n.where else "")
        linked = sae and n.latent is not None
        fill = TYPE_COLORS.get(str(n.where), "#ffb300") if linked else "#b0bec5"
        hover = f"{n.label} — token type: {n.where if n.where is not None else '?'} — effect: {num(n.effect)}"
        circle = (f"<circle cx='{x:.0f}' cy='{y:.0f}' r='8' fill='{fill}' stroke='#555'/>"
                  f"<text x='{x:.0f}' y='{y + 20:.0f}' text-anchor='middle'>{esc(label)}</text>"
                  f"<title>{esc(hover)}</title>")  # fmt: skip
        if linked:
            out.append(f"<a href='{esc(feature_url(sae, n.latent))}' class='node' data-node='{esc(n.id)}'>{circle}</a>")
        else:
            out.append(f"<g class='node-plain'>{circle}</g>")
    out.append("</svg>")
    return "".join(out)


def _select(name: str, label: str, options: list[str], chosen: str) -> str:
    opts = [f"<option value=''{' selected' if not chosen else ''}>all</option>"]
    opts += [f"<option value='{esc(o)}'{' selected' if o == chosen else ''}>{esc(o)}</option>" for o in options]
    return f"<label>{esc(label)} <select name='{esc(name)}'>{''.join(opts)}</select></label> "


def circuit_page(data: RunData, index: int, query: dict[str, list[str]] | None = None) -> str | None:
    if not 0 <= index < len(data.circuits):
        return None
    c = data.circuits[index]
    nodes, chosen = _node_filter(c, query or {})
    href = task_href(data, c.task)
    task = f"<a href='{esc(href)}'>{esc(c.task)}</a>" if href else esc(c.task)
    parts = [f"<p class='muted'>{esc(c.file)}; task {task}; {len(c.nodes)} nodes, {len(c.edges)} edges. "
             "Coloured nodes (by token type) link to feature pages; hover a node for its token type and effect.</p>"]  # fmt: skip
    layers = sorted({str(n.layer) for n in c.nodes if n.layer is not None}, key=lambda x: (len(x), x))
    kinds = sorted({n.kind for n in c.nodes if n.kind})
    types = list(dict.fromkeys(c.node_types + sorted({str(n.where) for n in c.nodes if n.where is not None})))
    parts.append(f"<form id='circuit-filter' method='get' action='/circuit/{index}'>" + _select("layer", "layer", layers, chosen["layer"])
                 + _select("site", "site", kinds, chosen["site"]) + _select("type", "token type", types, chosen["type"])
                 + f"<button>filter</button> <a href='/circuit/{index}'>reset</a> <span class='muted'>{len(nodes)} of {len(c.nodes)} nodes shown</span></form>")  # fmt: skip
    curve = ""
    if c.curve:
        curve = ("<div id='faithfulness-curve' class='panel'><h3>Faithfulness</h3>"
                 + svg_lines(list(c.curve.items()), width=360, height=240, xlabel="nodes kept (N)", ylabel="faithfulness", css_class="chart faithfulness")
                 + "</div>")  # fmt: skip
    parts.append(f"<div class='row'><div class='grow'>{circuit_svg(data, c, nodes)}</div>{curve}</div>")
    parts.append("<h2>Nodes</h2>" + table(
        ["node", "feature", "layer", "where", "effect"],
        [[esc(n.label), feature_link(data, n.key, n.latent), num(n.layer), esc(n.where or ""), num(n.effect)] for n in sorted(nodes, key=_by_effect)]))  # fmt: skip
    label = {n.id: n.label for n in c.nodes}
    ids = {n.id for n in nodes}
    parts.append("<h2>Edges</h2>" + table(["from", "to", "weight"], [[esc(label[e.source]), esc(label[e.target]), num(e.weight)]
                                                                     for e in c.edges if e.source in ids and e.target in ids]))  # fmt: skip
    figs = [f for f in data.figures if f.endswith(".png") and (f.rsplit("/", 1)[0] if "/" in f else ".") == c.dir]
    parts += [figure(f) for f in figs]
    if c.dir != ".":  # the circuit's other tables (faithfulness curve, summary, node list)
        for p in sorted((data.root / c.dir).glob("*")):
            inside = data.contained(p)
            if inside is not None and p.suffix in (".json", ".csv") and data.rel(p) != c.file:
                parts.append(f"<h2>{esc(p.name)}</h2>")
                parts += [(f"<h3>{esc(cap)}</h3>" if cap else "") + html_table(rows) for cap, rows in file_tables(inside)]
    return page(f"Circuit: {c.title}", "".join(parts))


def plots_page(data: RunData) -> str:
    pngs = [f for f in data.figures if f.endswith(".png")]
    lone = [f for f in data.figures if f.endswith(".svg") and f[:-4] + ".png" not in pngs]
    body = "".join(figure(f) for f in pngs + lone)
    return page("Plots", body or "<p class='muted'>No PNG/SVG files in this run.</p>")
