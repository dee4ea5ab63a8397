"""The settings of a sparse feature circuit (paper Sec. 4, App. E): which SAEs, which token types, which metric.

A *node* is (SAE, feature, token type): one latent of a residual SAE (reads and writes
resid_pre[l]), an attention SAE (attn_out[l]) or a transcoder (resid_mid[l] -> mlp_out[l]),
or that SAE's error node, with its effect over the positions of one token type (summed: the
first-order estimate of ablating the node; averaged: what circuits rank by, as the authors did).

Token types: prompt, input, arrow, output, newline, extra (paper Sec. 4.1.1). BOS is not a node
type: SAEs never see the attention-sink token, so it is never spliced nor ablated. Padding is
never a node either.

Metric m (Sec. 4.1.2): the mean log-prob of the first `n_score_tokens` (2) tokens of the output of every
pair but the first (`metric_pairs='all_but_first'`, the paper's text), of the query only ('last'), or of
every pair ('all', the authors' code). Mean, not sum, so m is per
token and comparable across batch sizes; faithfulness is a ratio, so the choice cancels there.

CircuitRunConfig adds what the experiment over tasks needs: batch sizes, the faithfulness grid,
the error-node choice, edge pruning and the IE-quality sample.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from icl_circuits.core.sites import SAE_KIND_SITES, SAE_KINDS
from icl_circuits.data.prompts import N_SCORE_TOKENS, TYPE_ID

NODE_TYPES: tuple[str, ...] = ("prompt", "input", "arrow", "output", "newline", "extra")
# the kinds and their (site read, site replaced) options live once in core.sites; these names are kept for importers
KIND_SITE_OPTIONS: dict[str, tuple[tuple[str, str], ...]] = SAE_KIND_SITES
KIND_SITES: dict[str, tuple[str, str]] = {kind: options[0] for kind, options in SAE_KIND_SITES.items()}
ERROR = "error"  # the feature name of an error node
RANK_BY: tuple[str, ...] = ("signed", "abs")  # circuit order by signed effect (the authors' do_abs=False) or |effect|
RANK_OVER: tuple[str, ...] = ("mean", "sum")  # a node's effect averaged over its token type's positions, or summed
DEFAULT_SIZES: tuple[int, ...] = (0, 1, 2, 3, 5, 10, 20, 30, 50, 100, 200, 500, 1000, 2000, 5000)  # circuit sizes N of the curves


@dataclass(frozen=True)
class CircuitConfig:
    layers: tuple[int, ...] = (11, 12)
    kinds: tuple[str, ...] = SAE_KINDS
    node_types: tuple[str, ...] = NODE_TYPES
    metric_pairs: str = "all_but_first"  # 'all_but_first' (paper) or 'last' (original SFC)
    n_score_tokens: int = N_SCORE_TOKENS  # first n tokens of each scored output (the authors': 2)

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("CircuitConfig.layers is empty: give at least one layer")
        bad = [k for k in self.kinds if k not in SAE_KINDS]
        if bad or not self.kinds:
            raise ValueError(f"CircuitConfig.kinds must be a non-empty subset of {SAE_KINDS}, got {self.kinds}")
        bad = [t for t in self.node_types if t not in TYPE_ID or t == "bos"]
        if bad or not self.node_types:
            raise ValueError(f"node_types must be a non-empty subset of {NODE_TYPES}, got {self.node_types}")
        if self.metric_pairs not in ("all_but_first", "last", "all"):
            raise ValueError(f"metric_pairs must be 'all_but_first', 'last' or 'all', got {self.metric_pairs!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CircuitRunConfig:
    circuit: CircuitConfig = field(default_factory=CircuitConfig)
    n_prompts: int = 8  # prompts per batch (IE batch and held-out batch)
    n_shots: int = 12  # the authors: 8 prompts x 12 shots (circuit_ablation_script_2.py; 8 shots for algo tasks)
    seed: int = 0
    sizes: tuple[int, ...] = DEFAULT_SIZES
    rank_by: str = "signed"  # the authors' do_abs=False; 'abs' ranks by |effect|
    rank_over: str = "mean"  # rank by the effect averaged over a token type's positions (the authors'
    #                          average_over_positions=True); 'sum' ranks by the summed effect
    ablate_errors: bool = False  # the authors never ablate error nodes; True also ranks and zero-ablates them
    faith_target: float = 0.6  # report the nodes needed for this faithfulness of C
    cross_target: float = 0.3  # cross-task: ablate A's nodes until faithfulness(A) <= this
    edge_k: int = 3  # edge targets per (layer, token type)
    edges_per_target: int = 4
    ie_quality_per_sae: int | None = None  # IE quality: None = every non-zero feature node (the authors'), n = a
    #                                       seeded sample of n per (SAE, token type), 0 = skip
    other_errors_curve: bool = False  # also the faithfulness curves and cross-task ablation with the other error-node choice
    chunk: int = 4  # ablation patterns per forward pass

    def __post_init__(self) -> None:
        if self.rank_by not in RANK_BY:
            raise ValueError(f"rank_by must be one of {RANK_BY}, got {self.rank_by!r}")
        if self.rank_over not in RANK_OVER:
            raise ValueError(f"rank_over must be one of {RANK_OVER}, got {self.rank_over!r}")

    def to_dict(self) -> dict:
        return asdict(self)
