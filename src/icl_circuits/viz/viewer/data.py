"""A run directory as typed objects: what the viewer's pages are made from.

RunData scans RUN_DIR once (depth <= 4, the walk report.py uses too) and reads, through one
containment check, the files the commands write (formats.py says which and how):

    examples.sqlite                     max-activating example stores (icl_circuits.methods.examples)
    dashboards.sqlite                   precomputed feature dashboards (icl_circuits.methods.dashboards)
    <task>/cleaning.json (+ .safetensors)  TVC results                 -> tasks
    <task>/graph.json (+ faithfulness.json) circuits                   -> circuits
    heatmap.json                        steering heatmaps              -> heatmaps
    PNG / SVG, report.html              figures and reports
A file it cannot read is listed in `problems` (the index page shows them), never fatal.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from icl_circuits.methods.circuits import CircuitGraph
from icl_circuits.methods.cleaning import load_cleaning
from icl_circuits.methods.dashboards import FILE_NAME as DASHBOARD_FILE
from icl_circuits.methods.dashboards import DashboardStore
from icl_circuits.methods.examples import Example, ExampleStore
from icl_circuits.viz.report import walk_files
from icl_circuits.methods.heatmaps import HeatmapResult
from icl_circuits.viz.viewer.formats import (
    CLEANING_FILE, FAITHFULNESS_FILE, GRAPH_FILE, HEATMAP_FILE, CircuitView, HeatmapView, TaskView, faithfulness_series, store_name, starter_ref,
)  # fmt: skip

MAX_JSON_BYTES = 20 * 2**20
MAX_DEPTH = 4
# what a result file that is not what its writer writes can raise while being read: listed, not fatal
UNREADABLE = (ValueError, TypeError, KeyError, IndexError, OSError, RuntimeError, SafetensorError)


def contained(root: Path, p: str | os.PathLike) -> Path | None:
    """p resolved (symlinks followed) if it is a regular file inside root (itself resolved), else None.
    The data layer (RunData.contained) and the file server (server.safe_path) both go through this."""
    try:
        r = Path(p).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return None
    if not r.is_relative_to(root) or not r.is_file():
        return None
    return r


class RunData:
    """What a run directory holds. Scans once at start; `refresh()` scans again."""

    def __init__(self, run_dir: str | os.PathLike, example_stores: list[str | os.PathLike] | None = None) -> None:
        self.root = Path(run_dir).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"run directory not found: {run_dir}")
        self.extra_stores = [Path(p) for p in example_stores or []]
        self.refresh()

    # -- scanning ----------------------------------------------------------------------------------
    def contained(self, p: str | os.PathLike) -> Path | None:
        """The one containment check every read goes through: p resolved (symlinks followed) if it
        is a regular file inside RUN_DIR, else None. Example stores named on the command line
        (`--examples`) are the only files read from outside, because the user named them."""
        return contained(self.root, p)

    def _files(self) -> list[Path]:
        out = []
        for p in walk_files(self.root, MAX_DEPTH):
            if p.name.endswith(".partial"):  # a store or file still being written
                continue
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
        self.tasks: dict[str, TaskView] = {}
        self.circuits: list[CircuitView] = []
        self.heatmaps: list[HeatmapView] = []
        for p in files:
            if p.suffix != ".json" or p.stat().st_size > MAX_JSON_BYTES:
                continue
            try:  # every JSON is parsed once, so that a broken one is listed even when it is no result file
                obj = self.read_json(p)
            except (ValueError, UnicodeDecodeError, OSError) as e:
                self.problems.append(f"{self.rel(p)}: {e}")
                continue
            try:
                self._classify(p, obj)
            except UNREADABLE as e:  # not what the writer of that file writes: list it only
                self.problems.append(f"{self.rel(p)}: not understood ({type(e).__name__}: {e})")

    def _classify(self, p: Path, obj: Any) -> None:
        if p.name == CLEANING_FILE:
            self._add_task(self._cleaning(p))
        elif p.name == GRAPH_FILE:
            self.circuits.append(self._circuit(p, obj, len(self.circuits)))
        elif p.name == HEATMAP_FILE:
            self.heatmaps.append(HeatmapView.from_result(HeatmapResult.from_dict(obj, str(p)), self.rel(p), p.stem))

    def _add_task(self, task: TaskView) -> None:
        same = [t for t in self.tasks.values() if t.task == task.task]
        if same:  # one task cleaned in several settings or layers: name them all by setting and layer
            for t in same + [task]:
                self.tasks.pop(t.name, None)
                t.name = f"{t.task} ({t.setting or '?'}, layer {t.layer})"
                self.tasks[t.name] = t
        else:
            self.tasks[task.name] = task

    def rel(self, p: Path) -> str:
        try:
            return p.resolve().relative_to(self.root).as_posix()
        except ValueError:
            return str(p)

    # -- readers -----------------------------------------------------------------------------------
    def _cleaning(self, p: Path) -> TaskView:
        """cleaning.json and cleaning.safetensors (the [d_sae] vectors) through load_cleaning, both contained."""
        st = p.with_name("cleaning.safetensors")
        if self.contained(st) is None:
            raise ValueError(f"{st.name} is missing or leads outside the run directory")
        return TaskView.from_result(load_cleaning(p.parent), self.rel(p), self.rel(p.parent), p.parent.name)

    def _circuit(self, p: Path, graph: Any, index: int) -> CircuitView:
        g = CircuitGraph.from_dict(graph, self.rel(p))  # the writer's loader: checks the schema stamp
        c = CircuitView.from_graph(g, index, self.rel(p), self.rel(p.parent), p.parent.name)
        fp = p.with_name(FAITHFULNESS_FILE)  # run_circuit_task writes it beside graph.json
        if fp.exists():
            try:
                c.curve = faithfulness_series(self.read_json(fp))
            except (UnicodeDecodeError, *UNREADABLE) as e:
                self.problems.append(f"{self.rel(fp)}: {e}")
        return c

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
        k = store_name(key)
        if k in names:
            return k
        for st in [*self.stores, *self.dashboards]:
            for s in st.saes():
                if s["site"] == str(key):
                    return s["name"]
        ref = starter_ref(key) if isinstance(key, str) else None
        if ref is not None:  # a circuit key 'resid.12' names the SAE at resid_pre.12
            from icl_circuits.methods.circuits import KIND_SITES

            site = f"{KIND_SITES[ref.kind][0]}.{ref.layer}"
            for st in [*self.stores, *self.dashboards]:
                for s in st.saes():
                    if s["site"] == site:
                        return s["name"]
        return None

    def same_sae(self, key: Any, sae: str) -> bool:
        """Does `key` (a spec, name or site from some file) name the SAE `sae`?"""
        return key is not None and (store_name(key) == sae or self.resolve_sae(key) == sae)

    def store_for(self, sae: str) -> ExampleStore | None:
        return next((st for st in self.stores if sae in {s["name"] for s in st.saes()}), None)

    def tasks_of(self, sae: str) -> list[TaskView]:
        """The cleaned tasks whose SAE is `sae` (or that name none)."""
        return [t for t in self.tasks.values() if not t.sae or self.same_sae(t.sae, sae)]

    def feature(self, sae: str, latent: int, limit: int | None = 12) -> dict[str, Any]:
        """Everything known about one latent: stats, examples, tasks, circuits, heatmap rows."""
        store = self.store_for(sae)
        examples: list[Example] = store.examples(sae, latent, limit=limit) if store else []
        dash = self.dashboard_for(sae)
        tasks = [{"task": t.name, "weight": f.weight, "initial_weight": f.initial_weight}
                 for t in self.tasks_of(sae) for f in t.features if f.latent == latent]  # fmt: skip
        circuits = [{"index": c.index, "title": c.title, "node": n.label, "effect": n.effect}
                    for c in self.circuits for n in c.nodes if n.latent == latent and self.same_sae(n.key, sae)]  # fmt: skip
        rows = [{"file": h.file, "title": h.title, "values": h.row(latent)}
                for h in self.heatmaps if (not h.sae or self.same_sae(h.sae, sae)) and latent in h.features]  # fmt: skip
        alone = {t.name: t.alone()[latent] for t in self.tasks_of(sae) if latent in t.alone()}  # the cleaning run's own measurement
        return {
            "dashboard": dash.feature(sae, latent) if dash else None, "has_dashboard": dash is not None, "alone": alone,
            "sae": sae, "latent": latent, "info": self.sae_info(sae), "has_store": store is not None,
            "stats": store.latent_stats(sae, latent) if store else None, "examples": examples,
            "tasks": tasks, "circuits": circuits, "heatmap_rows": rows, "bin_width": store.config.bin_width if store else None,
        }  # fmt: skip

    def task_steering(self, task: str, setting: str | None = None) -> dict[int, float]:
        """latent -> steering effect on `task`, from the heatmaps of that setting (last file wins)."""
        out: dict[int, float] = {}
        for h in self.heatmaps:
            if task in h.tasks and (not setting or not h.setting or h.setting == setting):
                j = h.tasks.index(task)
                out.update({f: row[j] for f, row in zip(h.features, h.values)})
        return out
