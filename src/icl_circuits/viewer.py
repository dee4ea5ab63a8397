"""`icl-circuits view RUN_DIR`: a local web page for browsing a run (paper App. C).

    tasks -> a task's task vector vs. its cleaned features (weights, steering effects)
          -> a feature's page (max-activating examples, tokens shaded by activation; token-type
             masses and steering-heatmap row when the run has them) -> the circuits it is in
    circuits -> nodes and edges, each node a link to its feature page; faithfulness tables
    plots -> every figure of the run

Two layers, kept apart so other modules' formats can be plugged in:
  * RunData reads a run directory defensively and returns plain dicts (it shows what is there and
    skips what it cannot read). Recognised files, anywhere under RUN_DIR (depth <= 4):
      - `examples.sqlite`                       max-activating example stores (icl_circuits.examples)
      - `<task>/cleaning.json`                  TVC: task, layer, sae_spec, weights, initial_weights, features
      - any JSON with "nodes" and "edges"       a circuit graph (node/edge key names are guessed tolerantly)
      - any JSON with "tasks", "features" and a matrix ("values"/"effects"/"matrix"/"heatmap")
                                                a steering heatmap, features x tasks
      - any JSON whose name has "token_type"    token-type masses per latent
      - PNG / SVG                               plots
  * Pages render those dicts as HTML. Every string from the run (task names, token texts, file
    names) goes through html.escape; pages carry no JavaScript and a CSP that forbids scripts.

Only files inside RUN_DIR are ever served: paths with '..', '.', backslashes or NUL (also when
percent-encoded) are refused with 403, and resolved paths (symlinks followed) must stay inside.
The server binds 127.0.0.1 by default and checks the Host header (no DNS rebinding).
"""

from __future__ import annotations

import html
import json
import mimetypes
import os
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from .examples import Example, ExampleStore
from .report import file_tables, html_table, json_tables

MAX_JSON_BYTES = 20 * 2**20
MAX_DEPTH = 4
SKIP_DIRS = {".git", "__pycache__", "node_modules"}


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _first(d: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        if k in d and d[k] is not None:
            return d[k]
    return default


def _sae_key(spec: str) -> str:
    """'resid:12' / 'resid_12' / 'resid.12' -> 'resid_12' (the names example stores use)."""
    return re.sub(r"[:.\-/ ]", "_", str(spec).strip())


# ==================================================================================================
# data layer: a run directory as plain dicts
# ==================================================================================================
class RunData:
    """What a run directory holds. Scans once at start; `refresh()` scans again."""

    def __init__(self, run_dir: str | os.PathLike, example_stores: list[str | os.PathLike] | None = None) -> None:
        self.root = Path(run_dir).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"run directory not found: {run_dir}")
        self.extra_stores = [Path(p) for p in example_stores or []]
        self._lock = threading.Lock()
        self.refresh()

    # -- scanning ----------------------------------------------------------------------------------
    def _files(self) -> list[Path]:
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            depth = len(Path(dirpath).relative_to(self.root).parts)
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".") and depth < MAX_DEPTH)
            out += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
        return out

    def refresh(self) -> None:
        files = self._files()
        self.stores: list[ExampleStore] = []
        self.problems: list[str] = []
        for p in [f for f in files if f.name == "examples.sqlite"] + self.extra_stores:
            try:
                self.stores.append(ExampleStore(p))
            except (ValueError, FileNotFoundError) as e:
                self.problems.append(str(e))
        self.figures = [self.rel(p) for p in files if p.suffix in (".png", ".svg")]
        self.reports = [self.rel(p) for p in files if p.name == "report.html"]
        self.tasks: dict[str, dict[str, Any]] = {}
        self.circuits: list[dict[str, Any]] = []
        self.heatmaps: list[dict[str, Any]] = []
        self.masses: list[dict[str, Any]] = []
        for p in files:
            if p.suffix != ".json" or p.stat().st_size > MAX_JSON_BYTES:
                continue
            try:
                obj = json.loads(p.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError, OSError) as e:
                self.problems.append(f"{self.rel(p)}: {e}")
                continue
            try:
                self._classify(p, obj)
            except (TypeError, ValueError, KeyError, IndexError) as e:  # a format we do not know: list it only
                self.problems.append(f"{self.rel(p)}: not understood ({e})")

    def _classify(self, p: Path, obj: Any) -> None:
        if p.name == "cleaning.json" and isinstance(obj, dict):
            task = self._cleaning(p, obj)
            same = [t for t in self.tasks.values() if t["task"] == task["task"]]
            if same:  # one task cleaned in several settings or layers: name them all by setting and layer
                for t in same + [task]:
                    self.tasks.pop(t["name"], None)
                    t["name"] = f"{t['task']} ({t['setting'] or '?'}, layer {t['layer']})"
                    self.tasks[t["name"]] = t
            else:
                self.tasks[task["name"]] = task
        elif isinstance(obj, dict) and isinstance(obj.get("nodes"), (list, dict)) and "edges" in obj:
            self.circuits.append(self._circuit(p, obj, len(self.circuits)))
        elif isinstance(obj, dict) and "tasks" in obj and "features" in obj and _matrix_key(obj):
            self.heatmaps.append(self._heatmap(p, obj))
        elif "token_type" in p.name:
            self.masses.append({"file": self.rel(p), "data": obj})

    def rel(self, p: Path) -> str:
        try:
            return p.resolve().relative_to(self.root).as_posix()
        except ValueError:
            return str(p)

    # -- readers (plug other formats in here) -------------------------------------------------------
    def _cleaning(self, p: Path, obj: dict[str, Any]) -> dict[str, Any]:
        weights = obj.get("weights") or []
        initial = obj.get("initial_weights") or []
        st = p.with_name("cleaning.safetensors")
        if (not weights or not initial) and st.is_file():  # TVC keeps the [d_sae] vectors next to the JSON
            from safetensors.numpy import load_file

            t = load_file(str(st))
            weights = weights or t.get("weights", []).tolist()
            initial = initial or t.get("initial_weights", []).tolist()
        feats = []
        for f in obj.get("features") or []:
            if isinstance(f, dict):
                lat = _first(f, "latent", "feature", "index", "id")
                w = _first(f, "weight", "value", default=weights[lat] if lat is not None and lat < len(weights) else None)
                feats.append({**f, "latent": int(lat), "weight": w})
            else:
                feats.append({"latent": int(f), "weight": weights[int(f)] if int(f) < len(weights) else None})
        if not feats and weights:
            feats = [{"latent": i, "weight": w} for i, w in enumerate(weights) if w]
        for f in feats:
            f.setdefault("initial_weight", initial[f["latent"]] if f["latent"] < len(initial) else None)
        feats.sort(key=lambda f: -abs(f["weight"] or 0))
        kept = {f["latent"] for f in feats}
        tv = sorted(
            ({"latent": i, "initial_weight": w, "kept": i in kept} for i, w in enumerate(initial) if w),
            key=lambda f: -abs(f["initial_weight"]),
        )
        name = str(obj.get("task") or p.parent.name)
        sae = obj.get("sae_spec") or obj.get("sae") or ""
        scalars = {k: v for k, v in obj.items() if not isinstance(v, (list, dict))}
        extra = {k: v for k, v in obj.items() if k in ("scores", "feature_effects") and v}
        return {
            "name": name, "task": name, "file": self.rel(p), "dir": self.rel(p.parent), "sae": _sae_key(sae) if sae else "",
            "layer": obj.get("layer"), "setting": obj.get("setting"), "features": feats, "tv_features": tv,
            "summary": scalars, "extra": extra,
        }  # fmt: skip

    def _circuit(self, p: Path, obj: dict[str, Any], index: int) -> dict[str, Any]:
        raw_nodes = obj["nodes"]
        if isinstance(raw_nodes, dict):  # {id: {...}}
            raw_nodes = [{"id": k, **(v if isinstance(v, dict) else {"effect": v})} for k, v in raw_nodes.items()]
        nodes = [self._node(n, i) for i, n in enumerate(raw_nodes)]
        by_id = {n["id"]: n for n in nodes}
        edges = []
        for e in obj["edges"] or []:
            if isinstance(e, dict):
                u, v = _first(e, "source", "src", "from", "u", "upstream"), _first(e, "target", "dst", "to", "v", "downstream")
                w = _first(e, "weight", "effect", "ie", "value", "attribution")
            elif isinstance(e, (list, tuple)) and len(e) >= 2:
                u, v, w = e[0], e[1], e[2] if len(e) > 2 else None
            else:
                continue
            edges.append({"source": str(u), "target": str(v), "weight": w})
            for x in (str(u), str(v)):
                if x not in by_id:  # an edge to a node not listed: make it visible anyway
                    by_id[x] = self._node({"id": x}, len(nodes))
                    nodes.append(by_id[x])
        extras = {k: v for k, v in obj.items() if k not in ("nodes", "edges")}
        return {
            "index": index, "file": self.rel(p), "dir": self.rel(p.parent), "task": obj.get("task") or p.parent.name,
            "title": str(obj.get("title") or obj.get("task") or p.stem), "nodes": nodes, "edges": edges, "extras": extras,
        }  # fmt: skip

    def _node(self, n: Any, i: int) -> dict[str, Any]:
        if not isinstance(n, dict):
            n = {"id": n}
        nid = str(_first(n, "id", "name", "node", default=i))
        latent = _first(n, "latent", "feature", "index")  # an int, or e.g. 'error' for an SAE-error node
        latent = int(latent) if isinstance(latent, int) or (isinstance(latent, str) and latent.isdigit()) else None
        sae = _first(n, "sae", "sae_name", "key", "submodule", "dictionary")
        site = _first(n, "site", "hook", "module")
        m = re.match(r"^(?P<sae>[a-z_]+[._:]?\d+)\D+(?P<latent>\d+)$", nid)
        if latent is None and m and "feature" not in n:
            latent, sae = int(m["latent"]), sae or m["sae"]
        layer = _first(n, "layer")
        if layer is None:
            found = re.search(r"(\d+)", str(sae or site or ""))
            layer = int(found.group(1)) if found else None
        return {
            **{k: v for k, v in n.items() if not isinstance(v, (list, dict))},
            "id": nid, "label": str(_first(n, "name", "label", default=nid)), "latent": latent, "sae": sae, "site": site,
            "layer": layer, "kind": str(_first(n, "kind", default=re.sub(r"[^a-z].*$", "", str(sae or site or "")))),
            "effect": _first(n, "effect", "ie", "score", "attribution", "weight"),
            "where": _first(n, "token_type", "position", "pos", "type"),
        }  # fmt: skip

    def _heatmap(self, p: Path, obj: dict[str, Any]) -> dict[str, Any]:
        tasks = [str(t) for t in obj["tasks"]]
        feats = [int(_first(f, "latent", "feature", "index")) if isinstance(f, dict) else int(f) for f in obj["features"]]
        key = _matrix_key(obj)
        m = obj[key]
        # the steering module stores 'raw' as tasks x features; otherwise guess from the lengths
        if key == "raw" or (len(m) == len(tasks) and len(m) != len(feats)):
            m = [list(r) for r in zip(*m)]
        cfg = obj.get("config") if isinstance(obj.get("config"), dict) else {}
        sae = obj.get("sae") or obj.get("sae_spec") or cfg.get("sae_spec") or cfg.get("sae")
        if not sae and cfg.get("layer") is not None:
            sae = f"resid_{cfg['layer']}"  # heatmaps steer with residual SAE latents at their layer
        title = str(obj.get("title") or p.stem) + (f" ({cfg['setting']})" if cfg.get("setting") else "")
        return {"file": self.rel(p), "sae": _sae_key(sae or ""), "tasks": tasks, "features": feats, "values": m,
                "title": title, "setting": cfg.get("setting") or obj.get("setting")}  # fmt: skip

    # -- queries the pages use ----------------------------------------------------------------------
    def sae_names(self) -> list[str]:
        return list(dict.fromkeys(s["name"] for st in self.stores for s in st.saes()))

    def resolve_sae(self, key: Any) -> str | None:
        """A store's SAE name for 'resid_12', 'resid:12' or a site like 'resid_pre.12'."""
        if key is None:
            return None
        names = self.sae_names()
        k = _sae_key(key)
        if k in names:
            return k
        for st in self.stores:
            for s in st.saes():
                if s["site"] == str(key):
                    return s["name"]
        return None

    def same_sae(self, key: Any, sae: str) -> bool:
        """Does `key` (a spec, name or site from some file) name the SAE `sae`?"""
        return key is not None and (_sae_key(key) == sae or self.resolve_sae(key) == sae)

    def store_for(self, sae: str) -> ExampleStore | None:
        return next((st for st in self.stores if sae in {s["name"] for s in st.saes()}), None)

    def feature(self, sae: str, latent: int, limit: int | None = 12) -> dict[str, Any]:
        """Everything known about one latent: stats, examples, tasks, circuits, heatmap rows, masses."""
        store = self.store_for(sae)
        examples: list[Example] = store.examples(sae, latent, limit=limit) if store else []
        info = next((s for st in self.stores for s in st.saes() if s["name"] == sae), {"name": sae})
        tasks = [
            {"task": t["name"], "weight": f["weight"], "initial_weight": f.get("initial_weight")}
            for t in self.tasks.values() if not t["sae"] or self.same_sae(t["sae"], sae)
            for f in t["features"] if f["latent"] == latent
        ]  # fmt: skip
        circuits = [
            {"index": c["index"], "title": c["title"], "node": n["label"], "effect": n["effect"]}
            for c in self.circuits for n in c["nodes"]
            if n["latent"] == latent and self.same_sae(n["sae"] or n["site"], sae)
        ]  # fmt: skip
        rows = []
        for h in self.heatmaps:
            if (h["sae"] and not self.same_sae(h["sae"], sae)) or latent not in h["features"]:
                continue
            r = h["values"][h["features"].index(latent)]
            rows.append({"file": h["file"], "title": h["title"], "values": dict(zip(h["tasks"], r))})
        return {
            "sae": sae, "latent": latent, "info": info, "has_store": store is not None,
            "stats": store.latent_stats(sae, latent) if store else None, "examples": examples,
            "tasks": tasks, "circuits": circuits, "heatmap_rows": rows, "masses": self._masses(sae, latent),
            "bin_width": store.config.bin_width if store else None,
        }  # fmt: skip

    def _masses(self, sae: str, latent: int) -> list[dict[str, Any]]:
        """Token-type masses of a latent from any token_type*.json (records with a latent key, or {latent: {...}})."""
        out = []
        for m in self.masses:
            data = m["data"]
            if isinstance(data, dict) and isinstance(data.get("rows"), list):
                data = data["rows"]
            if isinstance(data, list):
                for r in data:
                    if isinstance(r, dict) and _first(r, "latent", "feature") == latent and (
                        not _first(r, "sae") or self.same_sae(_first(r, "sae"), sae)
                    ):
                        out.append({"file": m["file"], **{k: v for k, v in r.items() if k not in ("latent", "feature", "sae")}})
            elif isinstance(data, dict) and isinstance(data.get(str(latent)), dict):
                out.append({"file": m["file"], **data[str(latent)]})
        return out

    def task_steering(self, task: str, setting: str | None = None) -> dict[int, float]:
        """latent -> steering effect on `task`, from the heatmaps of that setting (last file wins)."""
        out: dict[int, float] = {}
        for h in self.heatmaps:
            if task in h["tasks"] and (not setting or not h["setting"] or h["setting"] == setting):
                j = h["tasks"].index(task)
                out.update({f: row[j] for f, row in zip(h["features"], h["values"])})
        return out


def _matrix_key(obj: dict[str, Any]) -> str | None:
    for k in ("values", "raw", "effects", "matrix", "heatmap", "data"):
        if isinstance(obj.get(k), list) and obj[k] and isinstance(obj[k][0], list):
            return k
    return None


# ==================================================================================================
# pages: dicts -> escaped HTML
# ==================================================================================================
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
"""
CSP = "default-src 'self'; script-src 'none'; object-src 'none'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; base-uri 'none'; form-action 'self'"


def page(title: str, body: str) -> str:
    nav = "<nav><a href='/'>Run</a><a href='/tasks'>Tasks</a><a href='/features'>Features</a><a href='/circuits'>Circuits</a><a href='/plots'>Plots</a></nav>"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{STYLE}</style></head>"
        f"<body>{nav}<main><h1>{esc(title)}</h1>{body}</main></body></html>"
    )


def feature_url(sae: str, latent: int) -> str:
    return f"/feature/{quote(sae, safe='')}/{int(latent)}"


def feature_link(data: RunData, sae_key: Any, latent: Any) -> str:
    """A link to the feature page when the SAE has an example store; plain text otherwise."""
    if latent is None:
        return ""
    sae = data.resolve_sae(sae_key)
    label = f"{sae or sae_key or ''} #{latent}".strip()
    return f"<a href='{esc(feature_url(sae, int(latent)))}'>{esc(label)}</a>" if sae else esc(label)


def _num(x: Any) -> str:
    return esc(f"{x:.4g}") if isinstance(x, float) else esc("" if x is None else x)


def table(cols: list[str], rows: list[list[str]]) -> str:
    """Cells are already HTML (escaped by the caller)."""
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


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


def index_page(data: RunData) -> str:
    parts = [f"<p class='muted'>run directory <code>{esc(data.root)}</code></p>"]
    parts.append(f"<h2>Tasks ({len(data.tasks)})</h2>")
    parts.append(_task_list(data) if data.tasks else "<p class='muted'>No cleaned task vectors (cleaning.json) in this run.</p>")
    parts.append(f"<h2>Circuits ({len(data.circuits)})</h2>" + _circuit_list(data))
    parts.append(f"<h2>Example stores ({len(data.stores)})</h2>")
    rows = []
    for st in data.stores:
        prog = st.progress()
        for s in st.saes():
            rows.append([f"<a href='/sae/{esc(quote(s['name'], safe=''))}'>{esc(s['name'])}</a>", esc(s["site"]), esc(s["d_sae"]),
                         esc(f"{prog.get('tokens', 0):,}"), esc(f"{st.count(s['name']):,}"), esc(data.rel(st.path))])  # fmt: skip
    parts.append(table(["SAE", "site", "latents", "tokens read", "examples stored", "file"], rows) if rows else "<p class='muted'>none</p>")
    if data.reports:
        parts.append("<h2>Reports</h2><ul>" + "".join(f"<li><a href='/files/{esc(quote(r))}'>{esc(r)}</a></li>" for r in data.reports) + "</ul>")
    parts.append(f"<p><a href='/plots'>{len(data.figures)} plots</a></p>")
    if data.problems:
        parts.append("<h2>Files not shown</h2><ul>" + "".join(f"<li class='muted'>{esc(p)}</li>" for p in data.problems) + "</ul>")
    return page("icl-circuits viewer", "".join(parts))


def _task_list(data: RunData) -> str:
    rows = [
        [f"<a href='/task/{esc(quote(t['name'], safe=''))}'>{esc(t['name'])}</a>", esc(t["setting"] or ""), esc(t["sae"]),
         _num(t["layer"]), esc(len(t["tv_features"])), esc(len(t["features"]))]
        for t in sorted(data.tasks.values(), key=lambda t: t["name"])
    ]  # fmt: skip
    return table(["task", "setting", "SAE", "layer", "features in TV encoding", "features after cleaning"], rows)


def _circuit_list(data: RunData) -> str:
    if not data.circuits:
        return "<p class='muted'>No circuit graphs (JSON with nodes and edges) in this run.</p>"
    rows = [[f"<a href='/circuit/{c['index']}'>{esc(c['title'])}</a>", esc(c["task"]), esc(len(c["nodes"])), esc(len(c["edges"])), esc(c["file"])]
            for c in data.circuits]  # fmt: skip
    return table(["circuit", "task", "nodes", "edges", "file"], rows)


def task_page(data: RunData, name: str) -> str | None:
    t = data.tasks.get(name)
    if t is None:
        return None
    # a heatmap's effect (scale x direction) when there is one, else the cleaning run's own: the feature alone
    own = {e["index"]: e.get("alone") for e in t["extra"].get("feature_effects", []) if isinstance(e, dict) and "index" in e}
    steer = {**own, **data.task_steering(t["task"], t["setting"])}
    parts = [html_table([t["summary"]]) if t["summary"] else ""]
    parts.append(f"<h2>Cleaned features ({len(t['features'])})</h2>")
    rows = [[feature_link(data, t["sae"], f["latent"]), _num(f["weight"]), _num(f.get("initial_weight")), _num(steer.get(f["latent"]))]
            for f in t["features"]]  # fmt: skip
    parts.append(table(["feature", "weight after cleaning", "weight in TV encoding", "steering effect"], rows))
    parts.append(f"<h2>Task vector's SAE encoding ({len(t['tv_features'])} features)</h2>")
    rows = [[feature_link(data, t["sae"], f["latent"]), _num(f["initial_weight"]), "kept" if f["kept"] else "", _num(steer.get(f["latent"]))]
            for f in t["tv_features"][:200]]  # fmt: skip
    parts.append(table(["feature", "weight", "after cleaning", "steering effect"], rows))
    for k, v in t["extra"].items():
        for caption, rows in json_tables(v if not isinstance(v, dict) else [{"method": m, **r} if isinstance(r, dict) else {"method": m, "value": r} for m, r in v.items()]):
            parts.append(f"<h2>{esc(k)} {esc(caption)}</h2>" + html_table(rows))
    circuits = [c for c in data.circuits if c["task"] == t["task"] or c["dir"] == t["dir"]]
    if circuits:
        parts.append("<h2>Circuits</h2><ul>" + "".join(f"<li><a href='/circuit/{c['index']}'>{esc(c['title'])}</a></li>" for c in circuits) + "</ul>")
    figs = [f for f in data.figures if f.startswith(t["dir"] + "/") and f.endswith(".png")] if t["dir"] != "." else []
    parts += [f"<h3>{esc(f)}</h3><img src='/files/{esc(quote(f))}' alt='{esc(f)}'>" for f in figs]
    return page(f"Task {name}", "".join(parts))


def _spread(examples: list[Example], n_top: int = 8, n_bins: int = 6, per_bin: int = 2) -> list[Example]:
    """The top n_top, then per_bin examples from n_bins bins spread evenly from the highest to the lowest."""
    top = [e for e in examples if e.bin < 0][:n_top]
    bins = sorted({e.bin for e in examples if e.bin >= 0}, reverse=True)
    if len(bins) > n_bins:
        bins = [bins[round(i * (len(bins) - 1) / (n_bins - 1))] for i in range(n_bins)]
    return top + [e for b in bins for e in [x for x in examples if x.bin == b][:per_bin]]


def feature_page(data: RunData, sae: str, latent: int, all_examples: bool = False) -> str:
    fd = data.feature(sae, latent, limit=None)
    if not all_examples:
        fd["examples"] = _spread(fd["examples"])
    parts = []
    info = fd["info"]
    parts.append(f"<p>SAE <b>{esc(sae)}</b> at <code>{esc(info.get('site', '?'))}</code>, latent {latent}.</p>")
    if fd["stats"]:
        s = fd["stats"]
        parts.append(f"<p>fires on {s['n_fired']:,} tokens (density {s['density']:.3g}); mean activation {s['mean_act']:.3g}, max {s['max_act']:.3g}.</p>")
    if fd["tasks"]:
        parts.append("<h2>In cleaned task vectors</h2>" + table(
            ["task", "weight after cleaning", "weight in TV encoding"],
            [[f"<a href='/task/{esc(quote(t['task'], safe=''))}'>{esc(t['task'])}</a>", _num(t["weight"]), _num(t["initial_weight"])] for t in fd["tasks"]]))  # fmt: skip
    if fd["heatmap_rows"]:
        parts.append("<h2>Steering heatmap row</h2>")
        for r in fd["heatmap_rows"]:
            vals = r["values"]
            top = max((abs(v) for v in vals.values() if isinstance(v, (int, float))), default=1.0) or 1.0
            rows = [[esc(k), _num(v), f"<span class='bar' style='width:{int(120 * abs(v) / top) if isinstance(v, (int, float)) else 0}px'></span>"]
                    for k, v in vals.items()]  # fmt: skip
            parts.append(f"<h3>{esc(r['title'])}</h3>" + table(["task", "effect", ""], rows))
    if fd["masses"]:
        parts.append("<h2>Token-type masses</h2>" + html_table(fd["masses"]))
    if fd["circuits"]:
        parts.append("<h2>In circuits</h2>" + table(
            ["circuit", "node", "effect"],
            [[f"<a href='/circuit/{c['index']}'>{esc(c['title'])}</a>", esc(c["node"]), _num(c["effect"])] for c in fd["circuits"]]))  # fmt: skip
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


def sae_page(data: RunData, sae: str) -> str | None:
    store = data.store_for(sae)
    if store is None:
        return None
    rows = [[feature_link(data, sae, r["latent"]), esc(f"{r['n_fired']:,}"), _num(r["max_act"])] for r in store.top_latents(sae, limit=300)]
    return page(f"SAE {sae}: latents by max activation", table(["latent", "tokens fired", "max activation"], rows))


def features_page(data: RunData) -> str:
    parts = ["<form action='/goto' method='get'><select name='sae'>"]
    parts += [f"<option>{esc(n)}</option>" for n in data.sae_names()]
    parts.append("</select> latent <input name='latent' size='6'> <button>open</button></form>")
    parts.append("<ul>" + "".join(f"<li><a href='/sae/{esc(quote(n, safe=''))}'>{esc(n)}</a></li>" for n in data.sae_names()) + "</ul>")
    return page("Features", "".join(parts))


KIND_RANK = {"resid": 0, "attn": 1, "mlp": 2, "transcoder": 2}


def circuit_svg(data: RunData, c: dict[str, Any]) -> str:
    """Nodes in rows by (layer, resid < attn < mlp), earliest at the bottom; edges as lines
    (blue positive, red negative, width by |weight|); nodes with an example store link to feature pages."""
    nodes = c["nodes"]

    def row_key(n: dict[str, Any]) -> tuple[float, int, str]:
        layer = n["layer"] if isinstance(n["layer"], (int, float)) else float("inf")
        return (layer, KIND_RANK.get(n["kind"], 3), n["kind"])

    rows: dict[tuple[float, int, str], list[dict[str, Any]]] = {}
    for n in nodes:
        rows.setdefault(row_key(n), []).append(n)
    types = [str(t) for t in c["extras"].get("node_types") or []]
    for r in rows.values():  # within a row: by token type (prompt order), then by |effect|
        r.sort(key=lambda n: (types.index(n["where"]) if n["where"] in types else len(types),
                              -abs(n["effect"]) if isinstance(n["effect"], (int, float)) else 0))  # fmt: skip
    keys = sorted(rows)
    width = max(700, 110 * max((len(r) for r in rows.values()), default=1) + 90)
    height = 80 * len(keys) + 40
    pos = {}
    for yi, k in enumerate(keys):
        for xi, n in enumerate(rows[k]):
            pos[n["id"]] = (90 + (xi + 0.5) * (width - 90) / len(rows[k]), height - 30 - 80 * yi)
    wmax = max((abs(e["weight"]) for e in c["edges"] if isinstance(e["weight"], (int, float))), default=1.0) or 1.0
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 {width:.0f} {height}' width='100%' "
           f"style='max-width:{width:.0f}px' font-size='11'>"]  # fmt: skip
    for e in c["edges"]:
        (x1, y1), (x2, y2) = pos[e["source"]], pos[e["target"]]
        w = e["weight"] if isinstance(e["weight"], (int, float)) else 0.5 * wmax
        r = min(abs(w) / wmax, 1.0)
        color = "#1e88e5" if w >= 0 else "#e53935"
        out.append(f"<line x1='{x1:.0f}' y1='{y1:.0f}' x2='{x2:.0f}' y2='{y2:.0f}' stroke='{color}' stroke-opacity='{0.2 + 0.8 * r:.2f}' "
                   f"stroke-width='{1 + 4 * r:.1f}'><title>{esc(e['source'])} → {esc(e['target'])}: {_num(e['weight'])}</title></line>")  # fmt: skip
    for yi, k in enumerate(keys):
        label = f"{k[2]} {k[0]:g}" if k[0] != float("inf") else k[2]
        out.append(f"<text x='4' y='{height - 26 - 80 * yi:.0f}' fill='#888'>{esc(label)}</text>")
    for n in nodes:
        x, y = pos[n["id"]]
        sae = data.resolve_sae(n["sae"] or n["site"])
        label = (f"#{n['latent']}" if n["latent"] is not None else "err") + (f" @{n['where']}" if n["where"] else "")
        fill = "#ffb300" if sae and n["latent"] is not None else "#b0bec5"
        circle = (f"<circle cx='{x:.0f}' cy='{y:.0f}' r='8' fill='{fill}' stroke='#555'/>"
                  f"<text x='{x:.0f}' y='{y + 20:.0f}' text-anchor='middle'>{esc(label)}</text>"
                  f"<title>{esc(n['label'])}: effect {_num(n['effect'])}</title>")  # fmt: skip
        if sae and n["latent"] is not None:
            out.append(f"<a href='{esc(feature_url(sae, n['latent']))}' class='node'>{circle}</a>")
        else:
            out.append(f"<g>{circle}</g>")
    out.append("</svg>")
    return "".join(out)


def circuit_page(data: RunData, index: int) -> str | None:
    if not 0 <= index < len(data.circuits):
        return None
    c = data.circuits[index]
    parts = [f"<p class='muted'>{esc(c['file'])}; task {esc(c['task'])}; {len(c['nodes'])} nodes, {len(c['edges'])} edges. Yellow nodes link to feature pages.</p>"]
    parts.append(circuit_svg(data, c))
    parts.append("<h2>Nodes</h2>" + table(
        ["node", "feature", "layer", "where", "effect"],
        [[esc(n["label"]), feature_link(data, n["sae"] or n["site"], n["latent"]), _num(n["layer"]), esc(n["where"] or ""), _num(n["effect"])]
         for n in sorted(c["nodes"], key=lambda n: -abs(n["effect"]) if isinstance(n["effect"], (int, float)) else 0)]))  # fmt: skip
    label = {n["id"]: n["label"] for n in c["nodes"]}
    parts.append("<h2>Edges</h2>" + table(["from", "to", "weight"], [[esc(label[e["source"]]), esc(label[e["target"]]), _num(e["weight"])] for e in c["edges"]]))
    for k, v in c["extras"].items():
        if isinstance(v, dict) or (isinstance(v, list) and v and all(isinstance(r, dict) for r in v)):
            for caption, rows in json_tables(v):
                parts.append(f"<h2>{esc(k)} {esc(caption)}</h2>" + html_table(rows))
    figs = [f for f in data.figures if f.endswith(".png") and (f.rsplit("/", 1)[0] if "/" in f else ".") == c["dir"]]
    parts += [f"<h3>{esc(f)}</h3><img src='/files/{esc(quote(f))}' alt='{esc(f)}'>" for f in figs]
    if c["dir"] != ".":  # the circuit's other tables (faithfulness curve, summary, node list)
        for p in sorted((data.root / c["dir"]).glob("*")):
            if p.suffix in (".json", ".csv") and data.rel(p) != c["file"]:
                parts.append(f"<h2>{esc(p.name)}</h2>")
                parts += [(f"<h3>{esc(cap)}</h3>" if cap else "") + html_table(rows) for cap, rows in file_tables(p)]
    return page(f"Circuit: {c['title']}", "".join(parts))


def plots_page(data: RunData) -> str:
    pngs = [f for f in data.figures if f.endswith(".png")]
    lone = [f for f in data.figures if f.endswith(".svg") and f[:-4] + ".png" not in pngs]
    body = "".join(f"<h3>{esc(f)}</h3><img src='/files/{esc(quote(f))}' alt='{esc(f)}'>" for f in pngs + lone)
    return page("Plots", body or "<p class='muted'>No PNG/SVG files in this run.</p>")


# ==================================================================================================
# HTTP
# ==================================================================================================
class ViewerServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, data: RunData, host: str, port: int) -> None:
        self.data = data
        super().__init__((host, port), ViewerHandler)
        bound = self.server_address[1]
        self.allowed_hosts = {f"{h}:{bound}" for h in ("127.0.0.1", "localhost", "[::1]", host)} | {"127.0.0.1", "localhost", host}


def safe_path(root: Path, rel: str) -> Path | None:
    """root/rel if it is a file inside root; None for anything that could escape (or does not exist)."""
    if any(c in rel for c in ("\\", "\0")) or rel.startswith("/"):
        return None
    parts = rel.split("/")
    if any(p in ("..", ".") for p in parts):
        return None
    p = (root / rel).resolve()
    if not p.is_relative_to(root) or not p.is_file():
        return None
    return p


class ViewerHandler(BaseHTTPRequestHandler):
    server: ViewerServer
    server_version = "icl-circuits-viewer"

    def log_message(self, format: str, *args: Any) -> None:  # quiet by default
        pass

    def _send(self, status: int, body: bytes, ctype: str = "text/html; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._send(status, page(f"{status} {HTTPStatus(status).phrase}", f"<p>{esc(message)}</p>").encode())

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        host = self.headers.get("Host", "")
        if self.server.server_address[0] not in ("0.0.0.0", "::") and host not in self.server.allowed_hosts:
            return self._error(403, "unexpected Host header")
        url = urlsplit(self.path)
        raw = url.path
        decoded = unquote(raw)
        # refuse traversal however it is spelled: '..' segments raw, percent-encoded, or with backslashes
        segments = decoded.replace("\\", "/").split("/")
        if any(s in ("..", ".") for s in segments) or "\0" in decoded:
            return self._error(403, "path outside the run directory")
        try:
            self._route(decoded, parse_qs(url.query))
        except (ValueError, KeyError) as e:
            self._error(404, f"not found: {e}")

    def _route(self, path: str, query: dict[str, list[str]]) -> None:
        data = self.server.data
        parts = [p for p in path.split("/") if p]
        html_out: str | None = None
        if not parts:
            html_out = index_page(data)
        elif parts[0] == "files" and len(parts) > 1:
            return self._file("/".join(parts[1:]))
        elif parts == ["tasks"]:
            html_out = page("Tasks", _task_list(data) if data.tasks else "<p class='muted'>No cleaned task vectors in this run.</p>")
        elif parts[0] == "task" and len(parts) == 2:
            html_out = task_page(data, parts[1])
        elif parts == ["features"]:
            html_out = features_page(data)
        elif parts[0] == "sae" and len(parts) == 2:
            html_out = sae_page(data, parts[1])
        elif parts[0] == "feature" and len(parts) in (3, 4) and parts[1] in data.sae_names() + [_sae_key(t["sae"]) for t in data.tasks.values()]:
            if len(parts) == 4 and parts[3] != "examples":
                raise ValueError(path)
            html_out = feature_page(data, parts[1], int(parts[2]), all_examples=len(parts) == 4)
        elif parts == ["goto"]:
            sae, latent = query.get("sae", [""])[0], query.get("latent", [""])[0]
            self.send_response(303)
            self.send_header("Location", feature_url(sae, int(latent)))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        elif parts == ["circuits"]:
            html_out = page("Circuits", _circuit_list(data))
        elif parts[0] == "circuit" and len(parts) == 2:
            html_out = circuit_page(data, int(parts[1]))
        elif parts == ["plots"]:
            html_out = plots_page(data)
        elif parts[0] == "api" and len(parts) == 4 and parts[1] == "examples":
            ex = data.feature(parts[2], int(parts[3]), limit=None)["examples"]
            return self._send(200, json.dumps([e.to_dict() for e in ex], ensure_ascii=True).encode(), "application/json")
        if html_out is None:
            return self._error(404, f"no page {path}")
        self._send(200, html_out.encode("utf-8"))

    def _file(self, rel: str) -> None:
        p = safe_path(self.server.data.root, rel)
        if p is None:
            return self._error(404 if ".." not in rel else 403, "no such file in the run directory")
        ctype = mimetypes.guess_type(p.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype in ("application/json", "image/svg+xml"):
            ctype += "; charset=utf-8"
        self._send(200, p.read_bytes(), ctype)


def make_server(run_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000,
                example_stores: list[str | os.PathLike] | None = None) -> ViewerServer:  # fmt: skip
    """A ready server (port 0 picks a free one: server.server_address[1]); call serve_forever()."""
    return ViewerServer(RunData(run_dir, example_stores), host, port)


def serve(run_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000,
          example_stores: list[str | os.PathLike] | None = None) -> None:  # fmt: skip
    server = make_server(run_dir, host, port, example_stores)
    d = server.data
    print(f"serving {d.root}: {len(d.tasks)} tasks, {len(d.circuits)} circuits, {len(d.stores)} example stores, "
          f"{len(d.figures)} figures\nopen http://{host}:{server.server_address[1]}/  (Ctrl-C stops)")  # fmt: skip
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host}: anyone who can reach this machine can read the run")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()

