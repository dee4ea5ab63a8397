"""Edge effects (App. E.1) and the circuit graph on tiny random models with tiny random SAEs.

The reference for edges is finite differences through the model with the other SAE sites frozen by hand.
"""

from __future__ import annotations

import pytest
import torch

from icl_circuits.core.sites import Intervention, Site
from icl_circuits.data.prompts import TYPE_ID
from icl_circuits.core.storage import BadFile
from icl_circuits.methods.circuits import (
    ERROR, NODE_TYPES, CircuitGraph, circuit_graph, edge_effects, edge_effects_from, load_graph, node_effects, parse_key, save_graph,
)  # fmt: skip

from tests.helpers import circuit_graph_of, setup


@pytest.mark.parametrize("source,target", [("resid.0", "resid.1"), ("resid.0", "transcoder.0"), ("attn.0", "resid.1"), ("transcoder.0", "resid.1")])
def test_edge_effect_matches_finite_differences(source, target):
    lm, cfg, saes, batch = setup(dtype=torch.float64)
    eff = node_effects(lm, batch, saes, cfg, keep_grads=True)
    tgt_key = target
    tsae = saes.saes[tgt_key]
    # the target: its largest-effect latent on arrow tokens
    t_type = "arrow"
    row = eff.effects[tgt_key][NODE_TYPES.index(t_type), :-1]
    j = int(row.abs().argmax())
    t_id = eff.flat_id(tgt_key, j, t_type)
    edges = edge_effects_from(lm, batch, saes, eff, source, [t_id])[t_id]  # [n_types, d_sae + 1]

    clean = lm.run(batch.input_ids, batch.attention_mask, read=[Site(0, k) for k in ("resid_pre", "attn_out", "resid_mid", "mlp_out")] + [Site(1, "resid_pre")])
    ssae = saes.saes[source]
    s_in, s_out = saes.in_site(source), saes.out_site(source)
    f_src = ssae.encode(clean.acts[s_in])  # [b, s, d_sae]
    err_src = clean.acts[s_out] - ssae.decode(f_src)
    g_lat = (eff.grads[tgt_key] @ tsae.W_dec[j]) / tsae.cfg.output_scale  # [b, s]: dm/d(target latent)
    t_mask = batch.token_types == TYPE_ID[t_type]

    def s_of(delta: torch.Tensor) -> float:
        """S = sum over target positions of dm/dt * t, with delta added at the source's output site and
        every other SAE site between source and target frozen at its clean value."""
        ivs = [Intervention(s_out, torch.ones_like(t_mask), delta, "add")]
        for other in ("attn.0", "transcoder.0"):
            o_site = saes.out_site(other)
            if o_site.order > s_out.order and o_site.order < saes.out_site(tgt_key).order:
                ivs.append(Intervention(o_site, torch.ones_like(t_mask), clean.acts[o_site], "replace"))
        with torch.no_grad():
            out = lm.run(batch.input_ids, batch.attention_mask, read=[saes.in_site(tgt_key)], interventions=ivs)
        f_t = tsae.encode(out.acts[saes.in_site(tgt_key)])[..., j]
        return float((g_lat * f_t * t_mask).sum().detach())

    checked = 0
    for u_type in ("input", "arrow", "output"):
        u_mask = (batch.token_types == TYPE_ID[u_type]).unsqueeze(-1)
        u = NODE_TYPES.index(u_type)
        i = int(edges[u, :-1].abs().argmax())
        for feat, direction in ((i, f_src[..., i : i + 1] * ssae.W_dec[i] / ssae.cfg.output_scale), (ERROR, err_src)):
            eps = 1e-4
            delta = direction * u_mask
            fd = (s_of(eps * delta) - s_of(-eps * delta)) / (2 * eps)  # d/d(scale of the source node)
            got = float(edges[u, -1 if feat == ERROR else feat])
            assert got == pytest.approx(fd, rel=1e-4, abs=1e-8), (u_type, feat)
            checked += abs(fd) > 1e-6
    assert checked >= 2, "all finite differences were ~0: the test would be vacuous"


def test_edges_and_graph_export():
    lm, cfg, saes, batch = setup()
    eff = node_effects(lm, batch, saes, cfg, keep_grads=True)
    edges = edge_effects(lm, batch, saes, eff, k=2, edges_per_target=3)
    assert edges and all(eff.node(i)[1] != ERROR for e in edges for i in (e.source, e.target))  # features only
    assert any(eff.node(i)[1] == ERROR for e in edge_effects(lm, batch, saes, eff, k=2, errors=True) for i in (e.source, e.target))
    for e in edges:
        s_key, t_key = eff.node(e.source)[0], eff.node(e.target)[0]
        (sk, sl), (tk, tl) = parse_key(s_key), parse_key(t_key)
        assert (sl, ("resid", "attn", "transcoder").index(sk)) < (tl, ("resid", "attn", "transcoder").index(tk))
        assert tl - sl <= 1
    graph = circuit_graph(eff, edges)
    ids = {n["id"] for n in graph["nodes"]}
    assert all(e["source"] in ids and e["target"] in ids for e in graph["edges"])


def test_circuit_graph_round_trips_and_reads_files_written_before_the_stamps(tmp_path):
    d = circuit_graph_of("ant", 4)  # 3 resid.0 nodes (one an error node) -> attn.1 #2
    assert d["schema"] == "graph/1" and d["task"] == "ant"
    g = CircuitGraph.from_dict(d)
    assert g.to_dict() == d and g.task == "ant" and len(g.nodes) == 4 and len(g.edges) == 3
    assert [n.is_error for n in g.nodes].count(True) == 1 and all(e.source in g.by_id() for e in g.edges)
    assert load_graph(save_graph(g, tmp_path / "graph.json")) == g
    assert load_graph(save_graph(d, tmp_path / "dict.json")) == g  # the dict form is written through the type too
    # a graph.json of circuit_graph before the stamps: no schema, no task (run_circuit_task appended it)
    legacy = {k: v for k, v in d.items() if k not in ("schema", "task")}
    old = CircuitGraph.from_dict(legacy, "old/graph.json")
    assert old.task is None and old.nodes == g.nodes and old.edges == g.edges
    with pytest.raises(BadFile, match=r"x/graph.json: holds a masses result, not a graph result"):
        CircuitGraph.from_dict({**d, "schema": "masses/1"}, "x/graph.json")
    with pytest.raises(BadFile, match=r"graph result version '2'"):
        CircuitGraph.from_dict({**d, "schema": "graph/2"}, "x/graph.json")
