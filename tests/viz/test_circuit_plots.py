"""The circuit figures: each draws from the results of icl_circuits.methods.circuits and writes PNG + SVG."""

from __future__ import annotations

import math

from icl_circuits.methods.circuits import ERROR, CircuitGraph, CrossTask, FaithfulnessCurve, circuit_graph, edge_effects, node_effects
from icl_circuits.viz.circuit_plots import draw_graph, plot_cross_task, plot_faithfulness, plot_ie_quality

from tests.helpers import setup


def _written(paths) -> bool:
    return bool(paths) and all(p.stat().st_size > 0 for p in paths)


def test_graph_drawing(tmp_path):
    lm, cfg, saes, batch = setup()
    eff = node_effects(lm, batch, saes, cfg, keep_grads=True)
    graph = circuit_graph(eff, edge_effects(lm, batch, saes, eff, k=2, edges_per_target=3))
    assert graph["edges"]
    assert _written(draw_graph(graph, tmp_path / "g"))
    assert _written(draw_graph(CircuitGraph.from_dict(graph), tmp_path / "typed"))  # the type or its dict


def test_faithfulness_ie_quality_and_cross_task_figures(tmp_path):
    # grids differ between tasks: the mean is drawn over the sizes they share
    curves = [FaithfulnessCurve("a", [0, 2, 5], [-2.0, -1.0, -0.5], [-0.4, -1.5, -2.0], -0.4, -2.0, [0, 0, 0], 5),
              FaithfulnessCurve("b", [0, 3], [-2.0, -0.6], [-0.5, -1.9], -0.5, -2.0, [0, 0], 3)]  # fmt: skip
    assert _written(plot_faithfulness(curves, tmp_path / "faithfulness"))
    rows = [dict(kind=k, layer=l, feature=f, estimate=0.01 * (i + 1), actual=0.012 * (i + 1) - 0.001 * (i % 3))
            for i, (k, l, f) in enumerate([(k, l, f) for k in ("resid", "attn") for l in (0, 1) for f in (1, 2, 3, ERROR)])]  # fmt: skip
    assert _written(plot_ie_quality(rows, tmp_path / "ie_quality"))
    ct = CrossTask(["a", "b"], {"a": 3, "b": 2}, [[-0.7, -0.1], [math.nan, -0.8]], 0.3, {"a": True, "b": False})
    assert _written(plot_cross_task(ct, tmp_path / "cross_task", "a note"))
