"""What each result file of a run means to the viewer: one small typed view per file kind.

Each view is built from the writer's own typed loader where the writer has one, so the viewer reads
exactly what the commands write and no key name of those files is repeated here:

    <task>/cleaning.json + cleaning.safetensors   cleaning.load_cleaning -> CleaningResult -> TaskView
    heatmap.json                                  steering.HeatmapResult.from_dict -> HeatmapView
    <task>/faithfulness.json                      circuits.FaithfulnessCurve.from_dict -> CircuitView.curve
    <task>/graph.json                             circuits.CircuitGraph.from_dict -> CircuitView

Example stores and dashboards are SQLite files read by their own modules (ExampleStore, DashboardStore).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from icl_circuits.methods.circuits import CircuitGraph, Edge, FaithfulnessCurve, GraphNode
from icl_circuits.methods.cleaning import CleaningResult
from icl_circuits.sae.registry import SAERef
from icl_circuits.methods.heatmaps import HeatmapResult

CLEANING_FILE = "cleaning.json"
GRAPH_FILE = "graph.json"
FAITHFULNESS_FILE = "faithfulness.json"
HEATMAP_FILE = "heatmap.json"


def store_name(spec: Any) -> str:
    """'resid:12' / 'resid_12' / 'resid.12' / 'resid_pre.12' -> 'resid_12' (the names example stores use);
    any other name with ':', '.', '-', '/' or ' ' in it gets '_' there (store names are written that way)."""
    ref = starter_ref(spec)
    return ref.name if ref is not None else re.sub(r"[:.\-/ ]", "_", str(spec).strip())


def starter_ref(spec: Any) -> SAERef | None:
    """The starter-suite SAE a spec names, or None for a path, a free name or a bad spec."""
    try:
        ref = SAERef.parse(str(spec))
    except ValueError:
        return None
    return ref if ref.is_starter else None


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def cleaning_sae(spec: str, layer: int) -> str:
    """The viewer's name of a TVC result's SAE. sae_spec is a starter spec ('resid:12' -> 'resid_12') or,
    for `clean --sae FOLDER`, the folder; cleaning always steers with the residual SAE at resid_pre.{layer}
    (cleaning.check_steering_sae), so a folder is named 'resid_{layer}', as heatmaps of that layer are."""
    ref = starter_ref(spec)
    return ref.name if ref is not None else SAERef("resid", layer).name


# -- cleaning.json ---------------------------------------------------------------------------------
@dataclass
class CleanedFeature:
    """A latent TVC kept: its weight after cleaning and in the TV's SAE encoding."""

    latent: int
    weight: float
    initial_weight: float


@dataclass
class EncodedFeature:
    """A latent of the raw task vector's SAE encoding, and whether cleaning kept it."""

    latent: int
    initial_weight: float
    kept: bool


@dataclass
class TaskView:
    """One cleaned task vector (a CleaningResult) as the task pages show it."""

    name: str  # unique page name: 'task', or 'task (setting, layer L)' when cleaned in several settings
    task: str
    file: str  # cleaning.json, relative to the run
    dir: str
    sae: str  # the viewer's SAE name, cleaning_sae(sae_spec, layer)
    layer: int
    setting: str
    features: list[CleanedFeature]  # largest |weight| first
    tv_features: list[EncodedFeature]  # largest |initial weight| first
    summary: dict[str, Any]  # the scalars of cleaning.json, named as its writer names them
    scores: dict[str, dict[str, float]]  # method -> l0, nll, accuracy, relative_loss_decrease
    feature_effects: list[dict[str, float]]  # per cleaned feature (methods.cleaning_task.feature_effects)
    curves: dict[str, list[Any]] = field(default_factory=dict)  # l0_history, train_loss, eval_loss (non-empty only)

    @classmethod
    def from_result(cls, r: CleaningResult, file: str, folder: str, default_task: str) -> TaskView:
        weights, initial = r.weights.tolist(), r.initial_weights.tolist()
        feats = [CleanedFeature(i, weights[i], initial[i]) for i in r.features]
        feats.sort(key=lambda f: -abs(f.weight))
        kept = set(r.features)
        tv = sorted((EncodedFeature(i, w, i in kept) for i, w in enumerate(initial) if w), key=lambda f: -abs(f.initial_weight))
        written = r.to_json()  # exactly what CleaningResult.save wrote into cleaning.json
        curves = {k: v for k, v in (("l0_history", r.l0_history), ("train_loss", r.train_loss), ("eval_loss", r.eval_loss)) if v}
        return cls(
            name=r.task or default_task, task=r.task or default_task, file=file, dir=folder, sae=cleaning_sae(r.sae_spec, r.layer),
            layer=r.layer, setting=r.setting, features=feats, tv_features=tv,
            summary={k: v for k, v in written.items() if not isinstance(v, (list, dict))},
            scores=r.scores, feature_effects=r.feature_effects, curves=curves,
        )  # fmt: skip

    @property
    def extra(self) -> dict[str, Any]:
        """The result's tables beside the summary (scores per method, per-feature effects), the non-empty ones."""
        return {k: v for k, v in (("scores", self.scores), ("feature_effects", self.feature_effects)) if v}

    def alone(self) -> dict[int, float]:
        """latent -> the cleaning run's steering effect of that feature alone (relative loss decrease)."""
        return {int(e["index"]): e["alone"] for e in self.feature_effects if _is_num(e.get("alone"))}


# -- graph.json + faithfulness.json ---------------------------------------------------------------
@dataclass
class CircuitNode:
    """A node of a CircuitGraph: an SAE latent (or its error node) at one token type."""

    id: str
    label: str  # 'resid.12/3164@arrow'
    key: str  # the circuit's SAE key, 'resid.12'
    kind: str  # 'resid' | 'attn' | 'transcoder' ...
    layer: int | None
    latent: int | None  # None for the error node
    where: str | None  # token type
    effect: float | None

    @classmethod
    def from_graph(cls, n: GraphNode) -> CircuitNode:
        return cls(
            id=str(n.id), label=n.name, key=n.key, kind=n.kind, layer=n.layer,
            latent=None if n.is_error else int(n.feature), where=n.token_type, effect=n.effect,
        )  # fmt: skip


@dataclass
class CircuitEdge:
    source: str  # node ids
    target: str
    weight: float

    @classmethod
    def from_graph(cls, e: Edge) -> CircuitEdge:
        return cls(str(e.source), str(e.target), e.effect)


@dataclass
class CircuitView:
    """One task's circuit: graph.json with the faithfulness curves of faithfulness.json beside it."""

    index: int
    file: str
    dir: str
    task: str
    title: str
    metric: float | None
    node_types: list[str]
    nodes: list[CircuitNode]
    edges: list[CircuitEdge]
    curve: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # series name -> (N, faithfulness)

    @classmethod
    def from_graph(cls, g: CircuitGraph, index: int, file: str, folder: str, default_task: str) -> CircuitView:
        task = g.task or default_task  # a graph saved outside run_circuit_task names no task: its folder does
        return cls(
            index=index, file=file, dir=folder, task=task, title=task, metric=g.metric, node_types=list(g.node_types),
            nodes=[CircuitNode.from_graph(n) for n in g.nodes], edges=[CircuitEdge.from_graph(e) for e in g.edges],
        )  # fmt: skip

    def by_id(self) -> dict[str, CircuitNode]:
        return {n.id: n for n in self.nodes}


def faithfulness_series(d: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """faithfulness.json -> {'circuit C_N': [(N, faithfulness)], 'complement M − C_N': [...]}, finite points only."""
    c = FaithfulnessCurve.from_dict(d)
    out = {}
    for name, ys in (("circuit C_N", c.faith_C), ("complement M − C_N", c.faith_M)):
        pts = [(x, y) for x, y in zip(c.sizes, ys) if _is_num(x) and _is_num(y)]
        if pts:
            out[name] = pts
    return out


# -- heatmap.json ----------------------------------------------------------------------------------
@dataclass
class HeatmapView:
    """A steering heatmap (HeatmapResult) as features x tasks."""

    file: str
    sae: str  # heatmaps steer with the residual SAE of their layer: 'resid_L'
    tasks: list[str]
    features: list[int]
    values: list[list[float]]  # [feature][task] relative loss decrease
    title: str
    setting: str | None

    @classmethod
    def from_result(cls, h: HeatmapResult, file: str, stem: str) -> HeatmapView:
        cfg = h.config if isinstance(h.config, dict) else {}
        setting, layer = cfg.get("setting"), cfg.get("layer")  # HeatmapConfig.to_dict()
        return cls(
            file=file, sae=SAERef("resid", int(layer)).name if layer is not None else "", tasks=[str(t) for t in h.tasks], features=list(h.features),
            values=h.raw.T.tolist(), title=stem + (f" ({setting})" if setting else ""), setting=setting,
        )  # fmt: skip

    def row(self, latent: int) -> dict[str, float]:
        """task -> effect of one feature."""
        return dict(zip(self.tasks, self.values[self.features.index(latent)]))
