"""`icl-circuits view RUN_DIR`: a local web page for browsing a run (paper App. C).

    tasks -> a task's TV encoding vs. cleaned weights (bar chart), TVC curves, steering effects
          -> a feature's dashboard (logit lens, density + histogram, activations on the tasks' ICL
             prompts by token type, steering effect per task, nearest features by decoder cosine;
             precomputed by icl_circuits.methods.dashboards.build_dashboards) and its max-activating
             examples -> the circuits it is in
    features -> search by SAE + feature id; a run's features sortable by any column
    circuits -> the graph as SVG (nodes link to feature pages, hover: node, token type, effect),
             filters by layer / site / token type, the faithfulness curve beside it
    plots -> every figure of the run
Charts are inline SVG drawn on the server (icl_circuits.viz.report.svg_*); docs/viewer.md has the details.

One idea per module:
    formats.py  what each result file means: typed views built with the writers' own loaders
                (load_cleaning, HeatmapResult.from_dict, FaithfulnessCurve.from_dict, CircuitGraph.from_dict)
    data.py     RunData: a run directory scanned into those views, every read contained in RUN_DIR
    layout.py   the frame every page shares (style, CSP, navigation, tables, links)
    pages.py    index, tasks, circuits, plots;  feature.py: feature pages, SAE feature lists, search
    server.py   HTTP: routes, Host check, file serving, headers; make_server / serve
"""

from __future__ import annotations

from icl_circuits.viz.viewer.data import MAX_DEPTH, MAX_JSON_BYTES, RunData, contained
from icl_circuits.viz.viewer.feature import feature_page, features_page, lens_text, render_example, sae_page
from icl_circuits.viz.viewer.formats import CircuitEdge, CircuitNode, CircuitView, CleanedFeature, EncodedFeature, HeatmapView, TaskView, store_name
from icl_circuits.viz.viewer.layout import CSP, STYLE, feature_link, feature_url, page, table
from icl_circuits.viz.viewer.pages import circuit_page, circuit_svg, index_page, plots_page, task_page
from icl_circuits.viz.viewer.server import ViewerHandler, ViewerServer, allowed_host_headers, make_server, safe_path, serve

__all__ = [
    "CSP", "MAX_DEPTH", "MAX_JSON_BYTES", "STYLE", "CircuitEdge", "CircuitNode", "CircuitView", "CleanedFeature", "EncodedFeature",
    "HeatmapView", "RunData", "TaskView", "ViewerHandler", "ViewerServer", "allowed_host_headers", "circuit_page", "circuit_svg",
    "contained", "feature_link", "feature_page", "feature_url", "features_page", "index_page", "lens_text", "make_server", "page",
    "plots_page", "render_example", "store_name", "sae_page", "safe_path", "serve", "table", "task_page",
]  # fmt: skip
