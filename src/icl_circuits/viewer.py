"""`icl-circuits view RUN_DIR`: a local web page for browsing a run (paper App. C).

    tasks -> a task's TV encoding vs. cleaned weights (bar chart), TVC curves, steering effects
          -> a feature's dashboard (logit lens, density + histogram, activations on the tasks' ICL
             prompts by token type, steering effect per task, nearest features by decoder cosine;
             precomputed by icl_circuits.dashboards.build_dashboards) and its max-activating
             examples -> the circuits it is in
    features -> search by SAE + feature id; a run's features sortable by any column
    circuits -> the graph as SVG (nodes link to feature pages, hover: node, token type, effect),
             filters by layer / site / token type, the faithfulness curve beside it
    plots -> every figure of the run
Charts are inline SVG drawn on the server (icl_circuits.report.svg_*); docs/viewer.md has the details.

Two layers, kept apart so other modules' formats can be plugged in:
  * RunData reads a run directory defensively and returns plain dicts (it shows what is there and
    skips what it cannot read). Recognised files, anywhere under RUN_DIR (depth <= 4):
      - `examples.sqlite`                       max-activating example stores (icl_circuits.examples)
      - `<task>/cleaning.json`                  TVC: task, layer, sae_spec, weights, initial_weights, features
      - any JSON with "nodes" and "edges"       a circuit graph (node/edge key names are guessed tolerantly)
      - any JSON with "tasks", "features" and a matrix ("values"/"effects"/"matrix"/"heatmap")
                                                a steering heatmap, features x tasks
      - any JSON whose name has "token_type"    token-type masses per latent
      - `dashboards.sqlite`                     precomputed feature dashboards (icl_circuits.dashboards)
      - PNG / SVG                               plots
  * Pages render those dicts as HTML. Every string from the run (task names, token texts, file
    names) goes through html.escape; pages carry no JavaScript and a CSP that forbids scripts.

Only files inside RUN_DIR are ever served or read: paths with '..', '.', backslashes or NUL (also
when percent-encoded) are refused with 403, and every read, by the file server and by the data
layer alike, goes through `contained()` (resolved path, symlinks followed, must stay inside).
The server binds 127.0.0.1 by default and always checks the Host header (no DNS rebinding), also
on a wildcard bind, where only the machine's own names and `allow_hosts` are added. Every
response, errors and redirects included, carries the CSP.
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

from .dashboards import FILE_NAME as DASHBOARD_FILE
from .dashboards import SORT_COLUMNS, DashboardStore
from .examples import Example, ExampleStore
from .report import file_tables, html_table, json_tables, svg_grouped_bars, svg_histogram, svg_hbars, svg_lines

MAX_JSON_BYTES = 20 * 2**20
MAX_DEPTH = 4
SKIP_DIRS = {".git", "__pycache__", "node_modules"}


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def contained(root: Path, p: str | os.PathLike) -> Path | None:
    """p resolved (symlinks followed) if it is a regular file inside root (itself resolved), else None.
    The data layer (RunData.contained) and the file server (safe_path) both go through this."""
    try:
        r = Path(p).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return None
    if not r.is_relative_to(root) or not r.is_file():
        return None
    return r


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
    def contained(self, p: str | os.PathLike) -> Path | None:
        """The one containment check every read goes through: p resolved (symlinks followed) if it
        is a regular file inside RUN_DIR, else None. Example stores named on the command line
        (`--examples`) are the only files read from outside, because the user named them."""
        return contained(self.root, p)

    def _files(self) -> list[Path]:
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root):  # followlinks=False: symlinked folders are not entered
            depth = len(Path(dirpath).relative_to(self.root).parts)
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".") and depth < MAX_DEPTH)
            for f in sorted(filenames):
                if f.startswith(".") or f.endswith(".partial"):
                    continue
                p = Path(dirpath) / f
                if self.contained(p) is None:
                    self.problems.append(f"{p.relative_to(self.root).as_posix()}: leads outside the run directory (not read)")
                    continue
                out.append(p)
        return out

    def read_json(self, p: Path) -> Any:
        """A JSON file of the run, through the containment check (ValueError when outside or too big)."""
        r = self.contained(p)
        if r is None:
            raise ValueError(f"{p.name}: not a file inside the run directory")
        if r.stat().st_size > MAX_JSON_BYTES:
            raise ValueError(f"{p.name}: larger than {MAX_JSON_BYTES} bytes")
        return json.loads(r.read_text(encoding="utf-8"))

    def refresh(self) -> None:
        self.problems: list[str] = []
        files = self._files()
        self.stores: list[ExampleStore] = []
        for p in [f for f in files if f.name == "examples.sqlite"] + self.extra_stores:
            try:
                self.stores.append(ExampleStore(p))
            except (ValueError, FileNotFoundError) as e:
                self.problems.append(str(e))
        self.dashboards: list[DashboardStore] = []
        for p in [f for f in files if f.name == DASHBOARD_FILE]:
            try:
                self.dashboards.append(DashboardStore(p))
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
                obj = self.read_json(p)
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
        st = self.contained(p.with_name("cleaning.safetensors"))
        if (not weights or not initial) and st is not None:  # TVC keeps the [d_sae] vectors next to the JSON
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
        curves = {k: obj[k] for k in ("l0_history", "train_loss", "eval_loss") if isinstance(obj.get(k), list) and obj[k]}
        return {
            "name": name, "task": name, "file": self.rel(p), "dir": self.rel(p.parent), "sae": _sae_key(sae) if sae else "",
            "layer": obj.get("layer"), "setting": obj.get("setting"), "features": feats, "tv_features": tv,
            "summary": scalars, "extra": extra, "curves": curves,
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
            "index": index, "file": self.rel(p), "dir": self.rel(p.parent), "task": str(obj.get("task") or p.parent.name),
            "title": str(obj.get("title") or obj.get("task") or p.stem), "nodes": nodes, "edges": edges, "extras": extras,
            "curve": self._faithfulness(p, obj),
        }  # fmt: skip

    def _faithfulness(self, p: Path, obj: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
        """Faithfulness curves of a circuit: the ablation module's faithfulness.json next to the graph
        (sizes, faith_C, faith_M), or records [{n_nodes, faithfulness}] inside the graph."""
        out: dict[str, list[tuple[float, float]]] = {}
        try:
            f = self.read_json(p.with_name("faithfulness.json")) if p.with_name("faithfulness.json").exists() else None
        except (ValueError, UnicodeDecodeError, OSError) as e:
            self.problems.append(f"{self.rel(p.with_name('faithfulness.json'))}: {e}")
            f = None
        if isinstance(f, dict) and isinstance(f.get("sizes"), list):
            for key, name in (("faith_C", "circuit C_N"), ("faith_M", "complement M − C_N")):
                if isinstance(f.get(key), list):
                    out[name] = [(x, y) for x, y in zip(f["sizes"], f[key]) if isinstance(x, (int, float)) and isinstance(y, (int, float))]
        recs = obj.get("faithfulness")
        if not out and isinstance(recs, list):
            pts = [(_first(r, "n_nodes", "size", "n"), _first(r, "faithfulness", "faith_C", "value")) for r in recs if isinstance(r, dict)]
            out["circuit"] = [(x, y) for x, y in pts if isinstance(x, (int, float)) and isinstance(y, (int, float))]
        return {k: v for k, v in out.items() if v}

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
        return list(dict.fromkeys([s["name"] for st in self.stores for s in st.saes()] + [s["name"] for d in self.dashboards for s in d.saes()]))

    def sae_info(self, sae: str) -> dict[str, Any]:
        return next((s for st in [*self.stores, *self.dashboards] for s in st.saes() if s["name"] == sae), {"name": sae})

    def dashboard_for(self, sae: str) -> DashboardStore | None:
        return next((d for d in self.dashboards if d.has(sae)), None)

    def resolve_sae(self, key: Any) -> str | None:
        """A store's SAE name for 'resid_12', 'resid:12' or a site like 'resid_pre.12'."""
        if key is None:
            return None
        names = self.sae_names()
        k = _sae_key(key)
        if k in names:
            return k
        for st in [*self.stores, *self.dashboards]:
            for s in st.saes():
                if s["site"] == str(key):
                    return s["name"]
        if isinstance(key, str) and re.match(r"^[a-z]+[._:]\d+$", key):  # a circuit key 'resid.12' names the SAE at resid_pre.12
            from .circuits import KIND_SITES

            kind, _, layer = re.split(r"([._:])", key)
            site = f"{KIND_SITES[kind][0]}.{layer}" if kind in KIND_SITES else None
            for st in [*self.stores, *self.dashboards]:
                for s in st.saes():
                    if site and s["site"] == site:
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
        info = self.sae_info(sae)
        dash = self.dashboard_for(sae)
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
        alone = {  # the cleaning run's own measurement: steering with this feature alone, per task
            t["name"]: e.get("alone")
            for t in self.tasks.values() if not t["sae"] or self.same_sae(t["sae"], sae)
            for e in t["extra"].get("feature_effects", []) if isinstance(e, dict) and e.get("index") == latent
        }  # fmt: skip
        return {
            "dashboard": dash.feature(sae, latent) if dash else None, "has_dashboard": dash is not None,
            "alone": {k: v for k, v in alone.items() if isinstance(v, (int, float))},
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
.panel{border:1px solid #e0e0e0;border-radius:4px;padding:.4em 1em;margin:1em 0} .row{display:flex;flex-wrap:wrap;gap:1.5em;align-items:flex-start}
.grow{flex:1 1 600px} .bar.neg{background:#e53935} .icl-task h4{margin:.6em 0 .2em;font-weight:600}
.ty-prompt{border-bottom:2px solid #9e9e9e} .ty-input{border-bottom:2px solid #2ca02c} .ty-arrow{border-bottom:2px solid #1f77b4}
.ty-output{border-bottom:2px solid #ff7f0e} .ty-newline{border-bottom:2px solid #9467bd} .ty-extra{border-bottom:2px solid #8c564b}
.legend .tok{margin-right:.6em;font-size:12px} code.lens-token{white-space:pre} th a.sort{color:inherit} form label{margin-right:.8em}
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


def _task_href(data: RunData, task: str) -> str | None:
    """The task page of a task name (also 'name (setting, layer n)' variants), or None."""
    if task in data.tasks:
        return f"/task/{quote(task, safe='')}"
    same = [t["name"] for t in data.tasks.values() if t["task"] == task]
    return f"/task/{quote(same[0], safe='')}" if same else None


def task_page(data: RunData, name: str) -> str | None:
    t = data.tasks.get(name)
    if t is None:
        return None
    # a heatmap's effect (scale x direction) when there is one, else the cleaning run's own: the feature alone
    own = {e["index"]: e.get("alone") for e in t["extra"].get("feature_effects", []) if isinstance(e, dict) and "index" in e}
    steer = {**own, **data.task_steering(t["task"], t["setting"])}
    parts = [html_table([t["summary"]]) if t["summary"] else ""]
    # the TV's SAE encoding against the cleaned weights, for the latents in either
    shown = {f["latent"]: f for f in t["tv_features"][:30]}
    for f in t["features"]:
        shown.setdefault(f["latent"], {"latent": f["latent"], "initial_weight": f.get("initial_weight")})
    latents = sorted(shown, key=lambda i: -max(abs(shown[i].get("initial_weight") or 0),
                                               abs(next((f["weight"] or 0 for f in t["features"] if f["latent"] == i), 0))))  # fmt: skip
    cleaned = {f["latent"]: f["weight"] for f in t["features"]}
    sae = data.resolve_sae(t["sae"])
    parts.append("<section id='task-weights' class='panel'><h2>TV's SAE encoding vs cleaned weights</h2>" + svg_grouped_bars(
        [f"#{i}" for i in latents],
        [("TV encoding", "#90a4ae", [shown[i].get("initial_weight") or 0.0 for i in latents]),
         ("after cleaning", "#1e88e5", [cleaned.get(i) or 0.0 for i in latents])],
        links=[feature_url(sae, i) if sae else None for i in latents], css_class="chart weights") + "</section>")  # fmt: skip
    curves = t.get("curves") or {}
    if curves:
        charts = []
        if curves.get("l0_history"):
            charts.append(svg_lines([("L0", list(enumerate(curves["l0_history"], 1)))], xlabel="step", ylabel="L0", title="L0 per step", css_class="chart tvc-l0"))
        loss = []
        if curves.get("train_loss"):
            loss.append(("train NLL", list(enumerate(curves["train_loss"], 1))))
        if curves.get("eval_loss"):
            loss.append(("eval NLL", [(r[0], r[1]) for r in curves["eval_loss"] if isinstance(r, (list, tuple)) and len(r) == 2]))
        if loss:
            charts.append(svg_lines(loss, xlabel="step", ylabel="NLL", title="loss per step", css_class="chart tvc-loss"))
        parts.append("<section id='tvc-curves' class='panel'><h2>TVC curves</h2><div class='row'>" + "".join(charts) + "</div></section>")
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


TYPE_COLORS = {"prompt": "#9e9e9e", "input": "#2ca02c", "arrow": "#1f77b4", "output": "#ff7f0e", "newline": "#9467bd", "extra": "#8c564b", "bos": "#cfd8dc"}


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
                href = _task_href(data, t.task)
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
        steer.append(svg_hbars(vals, title=r["title"], links=[_task_href(data, k) for k, _ in vals], css_class="chart steering"))
    if fd["alone"]:
        vals = list(fd["alone"].items())
        steer.append(svg_hbars(vals, title="cleaning runs: steering with this feature alone", links=[_task_href(data, k) for k, _ in vals], css_class="chart steering"))
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
            [[f"<a href='/task/{esc(quote(t['task'], safe=''))}'>{esc(t['task'])}</a>", _num(t["weight"]), _num(t["initial_weight"])] for t in fd["tasks"]]))  # fmt: skip
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
        rows = [[feature_link(data, sae, r["latent"]), esc(f"{r['n_fired']:,}"), _num(r["max_act"])] for r in store.top_latents(sae, limit=300)]  # type: ignore[union-attr]
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
        cells = [feature_link(data, sae, r["latent"]), esc(f"{r['density']:.3g}"), esc(f"{r['n_fired']:,}"), _num(r["max_act"]), _num(r["mean_act"]),
                 f"<code>{esc(r['top_token'])}</code>", _num(r["top_logit"]), esc(r["top_type"]), esc(r["n_tasks"])]  # fmt: skip
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


KIND_RANK = {"resid": 0, "attn": 1, "mlp": 2, "transcoder": 2}


def _node_filter(c: dict[str, Any], query: dict[str, list[str]]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The circuit's nodes kept by ?layer=&site=&type= (empty: all)."""
    chosen = {k: query.get(k, [""])[0] for k in ("layer", "site", "type")}
    nodes = [
        n for n in c["nodes"]
        if (not chosen["layer"] or str(n["layer"]) == chosen["layer"]) and (not chosen["site"] or n["kind"] == chosen["site"])
        and (not chosen["type"] or str(n["where"]) == chosen["type"])
    ]  # fmt: skip
    return nodes, chosen


def circuit_svg(data: RunData, c: dict[str, Any], nodes: list[dict[str, Any]] | None = None) -> str:
    """Nodes in rows by (layer, resid < attn < mlp), earliest at the bottom; edges as lines
    (blue positive, red negative, width by |weight|); nodes with an example store or dashboard link
    to feature pages; hovering a node shows its name, token type and effect."""
    nodes = c["nodes"] if nodes is None else nodes
    ids = {n["id"] for n in nodes}
    edges = [e for e in c["edges"] if e["source"] in ids and e["target"] in ids]

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
    width = max(600, 110 * max((len(r) for r in rows.values()), default=1) + 90)
    height = 80 * len(keys) + 40
    pos = {}
    for yi, k in enumerate(keys):
        for xi, n in enumerate(rows[k]):
            pos[n["id"]] = (90 + (xi + 0.5) * (width - 90) / len(rows[k]), height - 30 - 80 * yi)
    wmax = max((abs(e["weight"]) for e in edges if isinstance(e["weight"], (int, float))), default=1.0) or 1.0
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' id='circuit-graph' viewBox='0 0 {width:.0f} {height}' width='100%' "
           f"style='max-width:{width:.0f}px' font-size='11'>"]  # fmt: skip
    for e in edges:
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
        linked = sae and n["latent"] is not None
        fill = TYPE_COLORS.get(str(n["where"]), "#ffb300") if linked else "#b0bec5"
        hover = f"{n['label']} — token type: {n['where'] if n['where'] is not None else '?'} — effect: {_num(n['effect'])}"
        circle = (f"<circle cx='{x:.0f}' cy='{y:.0f}' r='8' fill='{fill}' stroke='#555'/>"
                  f"<text x='{x:.0f}' y='{y + 20:.0f}' text-anchor='middle'>{esc(label)}</text>"
                  f"<title>{esc(hover)}</title>")  # fmt: skip
        if linked:
            out.append(f"<a href='{esc(feature_url(sae, n['latent']))}' class='node' data-node='{esc(n['id'])}'>{circle}</a>")
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
    task_href = _task_href(data, c["task"])
    task = f"<a href='{esc(task_href)}'>{esc(c['task'])}</a>" if task_href else esc(c["task"])
    parts = [f"<p class='muted'>{esc(c['file'])}; task {task}; {len(c['nodes'])} nodes, {len(c['edges'])} edges. "
             "Coloured nodes (by token type) link to feature pages; hover a node for its token type and effect.</p>"]  # fmt: skip
    layers = sorted({str(n["layer"]) for n in c["nodes"] if n["layer"] is not None}, key=lambda x: (len(x), x))
    kinds = sorted({n["kind"] for n in c["nodes"] if n["kind"]})
    types = list(dict.fromkeys([str(t) for t in c["extras"].get("node_types") or []] + sorted({str(n["where"]) for n in c["nodes"] if n["where"] is not None})))
    parts.append(f"<form id='circuit-filter' method='get' action='/circuit/{index}'>" + _select("layer", "layer", layers, chosen["layer"])
                 + _select("site", "site", kinds, chosen["site"]) + _select("type", "token type", types, chosen["type"])
                 + f"<button>filter</button> <a href='/circuit/{index}'>reset</a> <span class='muted'>{len(nodes)} of {len(c['nodes'])} nodes shown</span></form>")  # fmt: skip
    curve = ""
    if c.get("curve"):
        curve = ("<div id='faithfulness-curve' class='panel'><h3>Faithfulness</h3>"
                 + svg_lines(list(c["curve"].items()), width=360, height=240, xlabel="nodes kept (N)", ylabel="faithfulness", css_class="chart faithfulness")
                 + "</div>")  # fmt: skip
    parts.append(f"<div class='row'><div class='grow'>{circuit_svg(data, c, nodes)}</div>{curve}</div>")
    parts.append("<h2>Nodes</h2>" + table(
        ["node", "feature", "layer", "where", "effect"],
        [[esc(n["label"]), feature_link(data, n["sae"] or n["site"], n["latent"]), _num(n["layer"]), esc(n["where"] or ""), _num(n["effect"])]
         for n in sorted(nodes, key=lambda n: -abs(n["effect"]) if isinstance(n["effect"], (int, float)) else 0)]))  # fmt: skip
    label = {n["id"]: n["label"] for n in c["nodes"]}
    ids = {n["id"] for n in nodes}
    parts.append("<h2>Edges</h2>" + table(["from", "to", "weight"], [[esc(label[e["source"]]), esc(label[e["target"]]), _num(e["weight"])]
                                                                     for e in c["edges"] if e["source"] in ids and e["target"] in ids]))  # fmt: skip
    for k, v in c["extras"].items():
        if isinstance(v, dict) or (isinstance(v, list) and v and all(isinstance(r, dict) for r in v)):
            for caption, rows in json_tables(v):
                parts.append(f"<h2>{esc(k)} {esc(caption)}</h2>" + html_table(rows))
    figs = [f for f in data.figures if f.endswith(".png") and (f.rsplit("/", 1)[0] if "/" in f else ".") == c["dir"]]
    parts += [f"<h3>{esc(f)}</h3><img src='/files/{esc(quote(f))}' alt='{esc(f)}'>" for f in figs]
    if c["dir"] != ".":  # the circuit's other tables (faithfulness curve, summary, node list)
        for p in sorted((data.root / c["dir"]).glob("*")):
            inside = data.contained(p)
            if inside is not None and p.suffix in (".json", ".csv") and data.rel(p) != c["file"]:
                parts.append(f"<h2>{esc(p.name)}</h2>")
                parts += [(f"<h3>{esc(cap)}</h3>" if cap else "") + html_table(rows) for cap, rows in file_tables(inside)]
    return page(f"Circuit: {c['title']}", "".join(parts))


def plots_page(data: RunData) -> str:
    pngs = [f for f in data.figures if f.endswith(".png")]
    lone = [f for f in data.figures if f.endswith(".svg") and f[:-4] + ".png" not in pngs]
    body = "".join(f"<h3>{esc(f)}</h3><img src='/files/{esc(quote(f))}' alt='{esc(f)}'>" for f in pngs + lone)
    return page("Plots", body or "<p class='muted'>No PNG/SVG files in this run.</p>")


# ==================================================================================================
# HTTP
# ==================================================================================================
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")
WILDCARD = ("0.0.0.0", "::", "")


class ViewerServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, data: RunData, host: str, port: int, allow_hosts: list[str] | None = None) -> None:
        self.data = data
        super().__init__((host, port), ViewerHandler)
        self.allowed_hosts = allowed_host_headers(host, self.server_address[1], allow_hosts)


def allowed_host_headers(host: str, port: int, allow_hosts: list[str] | None = None) -> set[str]:
    """Host headers the server answers (anything else is refused: no DNS rebinding). Always the
    loopback names; the bound address when it is a real one; for a wildcard bind (0.0.0.0, ::) the
    machine's own names; plus the names given in allow_hosts. Never any host at all."""
    import socket

    names = set(LOOPBACK) | {h.lower() for h in allow_hosts or []}
    if host in WILDCARD:
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    else:
        names.add(f"[{host}]" if ":" in host and not host.startswith("[") else host.lower())
    return names | {f"{n}:{port}" for n in names}


def safe_path(root: Path, rel: str) -> Path | None:
    """root/rel if it is a file inside root; None for anything that could escape (or does not exist)."""
    if any(c in rel for c in ("\\", "\0")) or rel.startswith("/"):
        return None
    parts = rel.split("/")
    if any(p in ("..", ".") for p in parts):
        return None
    return contained(root, root / rel)


class ViewerHandler(BaseHTTPRequestHandler):
    server: ViewerServer
    server_version = "icl-circuits-viewer"

    def log_message(self, format: str, *args: Any) -> None:  # quiet by default
        pass

    def _headers(self) -> None:
        """The security headers every response carries (pages, files, errors, redirects)."""
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")

    def _send(self, status: int, body: bytes, ctype: str = "text/html; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self._headers()
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._send(status, page(f"{status} {HTTPStatus(status).phrase}", f"<p>{esc(message)}</p>").encode())

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (400, 414, 431, 501, ...) as our pages, with the same headers."""
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "Error"
        self.close_connection = True
        body = page(f"{code} {phrase}", f"<p>{esc(message or phrase)}</p>").encode()
        self.send_response(code, phrase)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Connection", "close")
        self.send_header("Content-Length", str(len(body)))
        self._headers()
        self.end_headers()
        if self.command != "HEAD" and code >= 200 and code not in (HTTPStatus.NO_CONTENT, HTTPStatus.NOT_MODIFIED):
            self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(303)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self._headers()
        self.end_headers()

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        host = self.headers.get("Host", "").lower()
        if host not in self.server.allowed_hosts:
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
            html_out = sae_page(data, parts[1], query)
        elif parts[0] == "feature" and len(parts) in (3, 4) and parts[1] in data.sae_names() + [_sae_key(t["sae"]) for t in data.tasks.values()]:
            if len(parts) == 4 and parts[3] != "examples":
                raise ValueError(path)
            if not parts[2].isdigit():
                raise ValueError(f"latent {parts[2]!r} is not a number")
            html_out = feature_page(data, parts[1], int(parts[2]), all_examples=len(parts) == 4)
        elif parts == ["goto"]:
            sae, latent = query.get("sae", [""])[0], query.get("latent", [""])[0].strip().lstrip("#")
            if sae not in data.sae_names():
                return self._error(400, f"no SAE {sae!r} in this run")
            if not latent.isdigit():
                return self._error(400, f"feature id must be a whole number, got {latent!r}")
            return self._redirect(feature_url(sae, int(latent)))
        elif parts == ["circuits"]:
            html_out = page("Circuits", _circuit_list(data))
        elif parts[0] == "circuit" and len(parts) == 2:
            html_out = circuit_page(data, int(parts[1]), query)
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
                example_stores: list[str | os.PathLike] | None = None, allow_hosts: list[str] | None = None) -> ViewerServer:  # fmt: skip
    """A ready server (port 0 picks a free one: server.server_address[1]); call serve_forever().
    allow_hosts: extra Host names to answer (e.g. this machine's LAN name when binding 0.0.0.0)."""
    return ViewerServer(RunData(run_dir, example_stores), host, port, allow_hosts)


def serve(run_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000,
          example_stores: list[str | os.PathLike] | None = None, allow_hosts: list[str] | None = None) -> None:  # fmt: skip
    server = make_server(run_dir, host, port, example_stores, allow_hosts)
    d = server.data
    print(f"serving {d.root}: {len(d.tasks)} tasks, {len(d.circuits)} circuits, {len(d.stores)} example stores, "
          f"{len(d.dashboards)} dashboard files, {len(d.figures)} figures\nopen http://{host}:{server.server_address[1]}/  (Ctrl-C stops)")  # fmt: skip
    if host not in ("127.0.0.1", "localhost", "::1"):
        names = sorted(h for h in server.allowed_hosts if ":" not in h.strip("[]").split("]")[-1] or h.startswith("["))
        print(f"warning: listening on {host}: anyone who can reach this machine can read the run; "
              f"answering only Host headers {', '.join(names)} (add names with allow_hosts / --allow-host)")  # fmt: skip
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
