"""Edges between circuit nodes (paper App. E.1) and the circuit graph they make.

The top-K nodes per (layer, token type) are targets. For each target t the scalar
S_t = sum_{p in type(t)} (dm/d t_p) * t_p is back-propagated to the SAE sites one step upstream
(resid.l -> attn.l, transcoder.l, resid.l+1; attn.l -> transcoder.l, resid.l+1; transcoder.l -> resid.l+1)
with every other SAE site's output frozen (direct edges only, as in Marks et al. 2024), and
multiplied by the source values: edge(u -> t) = sum_q u_q dS_t/du_q. By default error nodes are
neither edge targets nor sources (the graph shows features, as Fig. 12).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from icl_circuits.core.model import LM
from icl_circuits.core.storage import check_schema, read_json, stamp, write_json
from icl_circuits.data.prompts import PromptBatch
from icl_circuits.interventions.splice import splice
from icl_circuits.methods.circuits.config import ERROR, SAE_KINDS
from icl_circuits.methods.circuits.metric import aggregate_by_type, type_index
from icl_circuits.methods.circuits.nodes import NodeEffects, ranking
from icl_circuits.methods.circuits.saes import CircuitSAEs, parse_key, sae_key


@dataclass(frozen=True)
class Edge:
    source: int  # flat node ids (NodeEffects.flat order)
    target: int
    effect: float


def edge_sources(target_key: str, keys: Iterable[str]) -> list[str]:
    """SAE sites one step upstream of target_key (the Marks et al. graph, resid_pre layout)."""
    kind, layer = parse_key(target_key)
    wanted = {
        "attn": [sae_key("resid", layer)],
        "transcoder": [sae_key("resid", layer), sae_key("attn", layer)],
        "resid": [sae_key(k, layer - 1) for k in SAE_KINDS],
    }[kind]
    keys = set(keys)
    return [k for k in wanted if k in keys]


def edge_targets(effects: NodeEffects, k: int, by: str = "abs", errors: bool = False) -> list[int]:
    """Top-k nodes per (layer, token type), among nodes with a non-zero effect (error nodes only if `errors`)."""
    flat = effects.flat()
    order = ranking(flat, by).tolist()
    count: dict[tuple[int, str], int] = {}
    out = []
    for i in order:
        if flat[i] == 0:
            break
        key, feat, tt = effects.node(i)
        if feat == ERROR and not errors:
            continue
        slot = (parse_key(key)[1], tt)
        if count.get(slot, 0) < k:
            count[slot] = count.get(slot, 0) + 1
            out.append(i)
    return out


def edge_effects_from(
    lm: LM,
    batch: PromptBatch,
    saes: CircuitSAEs,
    effects: NodeEffects,
    source_key: str,
    targets: Sequence[int],
) -> dict[int, torch.Tensor]:
    """For each target node: [n_types, d_sae + 1] effects of every node of source_key on it.

    One forward pass from the source's layer with the source's latents and error as leaves and
    every other SAE site's output frozen, then one backward per target.
    """
    if not effects.grads:
        raise ValueError("edge effects need NodeEffects computed with keep_grads=True")
    n_types = len(effects.node_types)
    tix = type_index(batch, effects.node_types).to(lm.device)  # [b, s]
    node_pos = tix >= 0
    target_keys = {effects.node(t)[0] for t in targets}
    last = max((saes.out_site(k) for k in target_keys), key=lambda s: s.order)
    src_layer = parse_key(source_key)[1]
    everywhere = torch.ones_like(node_pos, dtype=torch.bool)
    # the source's latents and error as leaves; every other SAE site frozen (its output detached): direct edges only
    spliced = {
        k: splice(saes.saes[k], everywhere, keep_error=True, grad="leaves" if k == source_key else "stop",
                  sites=(saes.in_site(k), saes.out_site(k)))
        for k in saes.keys if parse_key(k)[1] >= src_layer
    }  # fmt: skip
    start = effects.resid.get(src_layer) if src_layer > 0 else None  # start the pass at the source's layer
    if src_layer > 0 and start is None:
        raise ValueError(f"NodeEffects holds no resid_pre.{src_layer}: compute it with keep_grads=True")
    with torch.enable_grad():
        lm.run(batch.input_ids, batch.attention_mask, read=[last], interventions=list(spliced.values()),
               start_layer=src_layer, start_resid=start)  # fmt: skip
        src = spliced[source_key]
        out: dict[int, torch.Tensor] = {}
        for t in targets:
            key, feat, tt = effects.node(t)
            sae, g = saes.saes[key], effects.grads[key]  # g: [b, s, d]
            in_type = (tix == effects.node_types.index(tt)).unsqueeze(-1)  # [b, s, 1]
            if feat == ERROR:
                s_t = (g * spliced[key].error * in_type).sum()
            else:
                g_lat = (g @ sae.W_dec[feat]) / sae.cfg.output_scale  # [b, s]
                s_t = (g_lat * spliced[key].latents[..., feat] * in_type[..., 0]).sum()
            gf, ge = torch.autograd.grad(s_t, [src.latent_leaf, src.error_leaf], retain_graph=True, allow_unused=True)
            gf = torch.zeros_like(src.latents) if gf is None else gf
            ge = torch.zeros_like(src.error) if ge is None else ge
            per_pos = torch.cat([gf * src.latents, (ge * src.error).sum(-1, keepdim=True)], -1)  # [b, s, d_sae+1]
            out[t] = aggregate_by_type(per_pos.detach(), tix, n_types).float().cpu()
    return out


def edge_effects(
    lm: LM,
    batch: PromptBatch,
    saes: CircuitSAEs,
    effects: NodeEffects,
    k: int = 5,
    edges_per_target: int = 5,
    min_fraction: float = 0.05,
    errors: bool = False,
    progress: bool = False,
) -> list[Edge]:
    """App. E.1: edges into the top-k nodes per (layer, token type), pruned.

    Keeps, per target, the `edges_per_target` largest signed edges (the authors' choice) whose size is at least
    `min_fraction` of the largest edge of the whole graph. With errors=False (default, like the
    paper's Fig. 12) error nodes are neither targets nor sources: the graph shows SAE features only.
    """
    from tqdm.auto import tqdm

    targets = edge_targets(effects, k, errors=errors)
    by_source: dict[str, list[int]] = {}
    for t in targets:
        for src in edge_sources(effects.node(t)[0], saes.keys):
            by_source.setdefault(src, []).append(t)
    offsets = effects.offsets()
    raw: list[Edge] = []
    for src, ts in tqdm(by_source.items(), desc="edges", disable=not progress):
        for t, m in edge_effects_from(lm, batch, saes, effects, src, ts).items():
            if not errors:
                m = m.clone()
                m[:, -1] = 0  # drop the source's error node
            flat = m.reshape(-1)
            for i in ranking(flat)[:edges_per_target].tolist():  # largest signed, as the authors kept their edges
                if flat[i] != 0:
                    raw.append(Edge(offsets[src] + i, t, float(flat[i])))
    if not raw:
        return []
    biggest = max(abs(e.effect) for e in raw)
    return [e for e in raw if abs(e.effect) >= min_fraction * biggest]


SIGN_CONVENTION = "effect = grad . value ~ m(clean) - m(node zero-ablated); positive helps the metric"


@dataclass(frozen=True)
class GraphNode:
    """A node of the circuit graph: one SAE latent (or its error node) at one token type."""

    id: int  # flat node id (NodeEffects.flat order), what Edge.source / Edge.target name
    name: str  # 'resid.12/3164@arrow'
    key: str  # the circuit's SAE key, 'resid.12'
    kind: str  # 'resid' | 'attn' | 'transcoder'
    layer: int
    feature: int | str  # latent index, or ERROR for the SAE's error node
    token_type: str
    effect: float

    @property
    def is_error(self) -> bool:
        return self.feature == ERROR

    @classmethod
    def from_dict(cls, d: dict) -> "GraphNode":
        feat = d["feature"]
        return cls(int(d["id"]), str(d["name"]), str(d["key"]), str(d["kind"]), int(d["layer"]),
                   ERROR if feat == ERROR else int(feat), str(d["token_type"]), float(d["effect"]))  # fmt: skip


@dataclass
class CircuitGraph:
    """graph.json: the nodes of a circuit with the edges between them (Fig. 12)."""

    metric: float  # m on the estimation batch (clean model)
    node_types: list[str]
    nodes: list[GraphNode]
    edges: list[Edge]
    task: str | None = None  # None when built outside a run (run_circuit_task names it)
    sign_convention: str = SIGN_CONVENTION

    @classmethod
    def of(
        cls, effects: NodeEffects, edges: Sequence[Edge], extra_nodes: Iterable[int] = (), task: str | None = None
    ) -> "CircuitGraph":
        """The graph of `edges`: its nodes are the edge endpoints plus extra_nodes."""
        flat = effects.flat()
        ids = sorted({e.source for e in edges} | {e.target for e in edges} | set(extra_nodes))
        nodes = []
        for i in ids:
            key, feat, tt = effects.node(i)
            kind, layer = parse_key(key)
            nodes.append(GraphNode(i, f"{key}/{feat}@{tt}", key, kind, layer, feat, tt, float(flat[i])))
        return cls(float(effects.metric), list(effects.node_types), nodes, list(edges), task)

    def to_dict(self) -> dict:
        # the keys of the unstamped files written before (circuit_graph's dict), so both read alike
        return stamp("graph", dict(
            metric=self.metric, node_types=list(self.node_types), sign_convention=self.sign_convention,
            nodes=[asdict(n) for n in self.nodes], edges=[asdict(e) for e in self.edges], task=self.task,
        ))  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict, where: str = "") -> "CircuitGraph":
        d = check_schema("graph", d, where)  # an unstamped graph.json predates the stamps: version 1, same keys
        task = d.get("task")  # absent in a graph saved by circuit_graph alone, before the stamps
        return cls(
            metric=float(d["metric"]), node_types=[str(t) for t in d["node_types"]],
            nodes=[GraphNode.from_dict(n) for n in d["nodes"]],
            edges=[Edge(int(e["source"]), int(e["target"]), float(e["effect"])) for e in d["edges"]],
            task=None if task is None else str(task), sign_convention=str(d.get("sign_convention", SIGN_CONVENTION)),
        )  # fmt: skip

    def by_id(self) -> dict[int, GraphNode]:
        return {n.id: n for n in self.nodes}


def circuit_graph(
    effects: NodeEffects, edges: Sequence[Edge], extra_nodes: Iterable[int] = (), task: str | None = None
) -> dict:
    """The graph's JSON form: CircuitGraph.of(...).to_dict(); save_graph and draw_graph take either form."""
    return CircuitGraph.of(effects, edges, extra_nodes, task).to_dict()


def as_graph(graph: CircuitGraph | dict, where: str = "") -> CircuitGraph:
    """A CircuitGraph from either form; a dict goes through from_dict, so a malformed one is refused."""
    return graph if isinstance(graph, CircuitGraph) else CircuitGraph.from_dict(graph, where)


def save_graph(graph: CircuitGraph | dict, path: str | Path) -> Path:
    return write_json(path, as_graph(graph, str(path)).to_dict())


def load_graph(path: str | Path) -> CircuitGraph:
    return CircuitGraph.from_dict(read_json(path), str(path))
