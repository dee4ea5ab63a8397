"""Sparse feature circuits for ICL (paper Sec. 4, App. E, Alg. 2), one idea per module:

    config.py               CircuitConfig, CircuitRunConfig, node types, SAE kinds and their sites
    saes.py                 the circuit's SAE set (CircuitSAEs, circuit_saes), keys 'kind.layer'
    metric.py               the metric m and the token-type bookkeeping
    nodes.py                node effects by token type (Alg. 2), the IE / held-out batches, saving them
    edges.py                edge effects (App. E.1) and the circuit graph (CircuitGraph, graph.json)
    spliced.py              the SAE-spliced model that ablates nodes, and eq. 4 (`faithfulness`)
    faithfulness_curves.py  faithfulness curves of C and M \\ C (Fig. 7), nodes needed
    cross_task.py           cross-task ablation (Fig. 8)
    ie_check.py             the IE-quality check: single-node ablations vs. estimates (Fig. 20, 21)

No module is named like a function this package exports (`faithfulness`, `ie_quality`): the function would
hide the module from `import icl_circuits.methods.circuits.<name> as m`.

The run over tasks with files and resume is icl_circuits.experiments.circuits; the figures are
icl_circuits.viz.circuit_plots.
"""

from icl_circuits.methods.circuits.config import (
    DEFAULT_SIZES,
    ERROR,
    KIND_SITE_OPTIONS,
    KIND_SITES,
    NODE_TYPES,
    SAE_KINDS,
    CircuitConfig,
    CircuitRunConfig,
)
from icl_circuits.methods.circuits.cross_task import CrossTask, cross_task_ablation
from icl_circuits.methods.circuits.edges import (
    CircuitGraph,
    Edge,
    GraphNode,
    as_graph,
    circuit_graph,
    edge_effects,
    edge_effects_from,
    edge_sources,
    edge_targets,
    load_graph,
    save_graph,
)
from icl_circuits.methods.circuits.faithfulness_curves import (
    FaithfulnessCurve,
    circuit_order,
    circuit_pattern,
    faithfulness_curve,
    n_candidates,
    nodes_needed,
)
from icl_circuits.methods.circuits.ie_check import ie_correlations, ie_quality, pearson, spearman
from icl_circuits.methods.circuits.metric import aggregate_by_type, metric_of, metric_scoring, type_index
from icl_circuits.methods.circuits.nodes import (
    RANK_BY,
    NodeEffects,
    circuit_batches,
    load_effects,
    node_effects,
    ranking,
    save_effects,
)
from icl_circuits.methods.circuits.saes import CircuitSAEs, check_sae, circuit_saes, parse_key, sae_key, sae_sites
from icl_circuits.methods.circuits.spliced import SplicedModel, check_same_nodes, faithfulness

__all__ = [
    "DEFAULT_SIZES", "ERROR", "KIND_SITE_OPTIONS", "KIND_SITES", "NODE_TYPES", "RANK_BY", "SAE_KINDS",
    "CircuitConfig", "CircuitGraph", "CircuitRunConfig", "CircuitSAEs", "CrossTask", "Edge", "FaithfulnessCurve",
    "GraphNode", "NodeEffects", "SplicedModel", "aggregate_by_type", "as_graph", "check_same_nodes", "check_sae",
    "circuit_batches", "circuit_graph",
    "circuit_order", "circuit_pattern", "circuit_saes", "cross_task_ablation", "edge_effects", "edge_effects_from",
    "edge_sources", "edge_targets", "faithfulness", "faithfulness_curve", "ie_correlations", "ie_quality",
    "load_effects", "load_graph", "metric_of", "metric_scoring", "n_candidates", "node_effects", "nodes_needed",
    "parse_key", "pearson", "ranking", "sae_key", "sae_sites", "save_effects", "save_graph", "spearman", "type_index",
]  # fmt: skip
