"""Faithfulness curves (eq. 4, Fig. 7): circuits C_N = the top-N nodes, kept (C) or ablated (M \\ C).

Faithfulness(C) = (m(C) - m(empty)) / (m(M) - m(empty)) where m(C) keeps only the nodes of C
(everything else ablated) and m(M) is the full model. As the authors ran it, error nodes are never
ablated: C, M \\ C and the node counts cover feature nodes only, and m(empty) ablates every feature
with the errors kept (keep_errors=True, the default). keep_errors=False also ranks and zero-ablates
error nodes (m(empty) then ablates everything). Nodes are ranked by signed effect (the authors'
do_abs=False), averaged over the positions of their token type (the authors' average_over_positions);
by |effect| and by the summed effect are options.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from icl_circuits.core.storage import check_schema, stamp
from icl_circuits.methods.circuits.config import DEFAULT_SIZES, ERROR
from icl_circuits.methods.circuits.metric import error_node_mask
from icl_circuits.methods.circuits.nodes import NodeEffects, check_rank_over
from icl_circuits.methods.circuits.spliced import SplicedModel, check_same_nodes, faithfulness


@dataclass
class FaithfulnessCurve:
    task: str
    sizes: list[int]
    m_C: list[float]  # circuit = top-N nodes kept, everything else ablated
    m_M: list[float]  # complement: top-N nodes ablated
    m_full: float
    m_empty: float
    n_error_nodes: list[int]  # error nodes among the top N (0 when error nodes are kept)
    n_nonzero: int  # nodes that can enter a circuit: positive effect on the IE batch (signed), non-zero (abs)
    keep_errors: bool = True  # error nodes never ablated nor counted (the authors' method)
    rank_by: str = "signed"
    rank_over: str = "sum"  # 'mean' since per-position ranking became the default; files from before it ranked by sums

    @property
    def faith_C(self) -> list[float]:
        return [faithfulness(m, self.m_full, self.m_empty) for m in self.m_C]

    @property
    def faith_M(self) -> list[float]:
        return [faithfulness(m, self.m_full, self.m_empty) for m in self.m_M]

    def to_dict(self) -> dict:
        return stamp("faithfulness", {**asdict(self), "faith_C": self.faith_C, "faith_M": self.faith_M})

    @classmethod
    def from_dict(cls, d: dict, where: str = "") -> "FaithfulnessCurve":
        """The inverse of to_dict: derived keys (faith_C, faith_M, nodes_for_target) are recomputed or dropped."""
        d = check_schema("faithfulness", d, where)
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})


def faithfulness_curve(
    spliced: SplicedModel, effects: NodeEffects, sizes: Sequence[int] = DEFAULT_SIZES, by: str = "signed",
    task: str = "", chunk: int = 4, keep_errors: bool = True, over: str = "mean",
) -> FaithfulnessCurve:  # fmt: skip
    """m(C_N) and m(M \\ C_N) for circuits C_N = the top-N nodes by effect, on spliced's batch.

    keep_errors=True (the authors' method): error nodes are never ablated and never counted, so C_N
    is N feature nodes plus every error node, and m(empty) ablates all features only. keep_errors=False
    ranks error nodes with the features and zero-ablates them too.
    """
    check_same_nodes(spliced, effects)
    order, errs = circuit_order(effects, by, keep_errors, over)
    n_nonzero = n_candidates(effects, order, by, over)
    sizes = sorted({min(int(n), n_nonzero) for n in sizes} | {n_nonzero})
    pats = [circuit_pattern(spliced, order[:n], c, errs) for n in sizes for c in (True, False)]
    m = spliced.metrics(torch.stack(pats), chunk).tolist()
    n_err = [sum(effects.node(i)[1] == ERROR for i in order[:n].tolist()) for n in sizes]
    m_empty = spliced.empty_metric(keep_errors)
    return FaithfulnessCurve(task, sizes, m[0::2], m[1::2], spliced.full, m_empty, n_err, n_nonzero, keep_errors, by, over)


def n_candidates(effects: NodeEffects, order: torch.Tensor, by: str = "signed", over: str = "mean") -> int:
    """How many nodes of `order` can enter a circuit: those with a positive effect (signed ranking; the
    zero and negative ones come after them) or a non-zero one (abs ranking)."""
    e = effects.flat(over)[order]
    return int((e > 0).sum()) if by in ("signed", "value") else int((e != 0).sum())


def circuit_order(
    effects: NodeEffects, by: str = "signed", keep_errors: bool = True, over: str = "mean"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(node ids by decreasing effect, bool mask of error nodes or None): with keep_errors the
    error nodes are left out of the order (they stay in the model)."""
    order = effects.order(by, check_rank_over(over))
    if not keep_errors:
        return order, None
    errs = error_node_mask([effects.effects[k].shape[1] for k in effects.keys], len(effects.node_types))
    return order[~errs[order]], errs


def circuit_pattern(spliced: SplicedModel, nodes: torch.Tensor, complement: bool, errs: torch.Tensor | None) -> torch.Tensor:
    """Ablation pattern for circuit `nodes` (complement=True: keep only them), never ablating `errs`."""
    pat = spliced.ablation(nodes.tolist(), complement=complement)
    return pat if errs is None else pat & ~errs


def nodes_needed(
    spliced: SplicedModel, effects: NodeEffects, target: float, complement: bool = False, by: str = "signed",
    curve: FaithfulnessCurve | None = None, keep_errors: bool = True, over: str = "mean",
) -> int | None:  # fmt: skip
    """Fewest top-N nodes with faithfulness(C_N) >= target (complement=False), or with
    faithfulness(M \\ C_N) <= target (complement=True). Scans the curve's grid, then bisects
    between its two grid points (assumes monotonicity there). None if never reached."""
    if curve is None:
        curve = faithfulness_curve(spliced, effects, by=by, keep_errors=keep_errors, over=over)
    order, errs = circuit_order(effects, curve.rank_by, curve.keep_errors, curve.rank_over)
    vals = curve.faith_M if complement else curve.faith_C

    def ok(f: float) -> bool:
        return f <= target if complement else f >= target

    hit = next((i for i, f in enumerate(vals) if ok(f)), None)
    if hit is None:
        return None
    lo, hi = (curve.sizes[hit - 1], curve.sizes[hit]) if hit > 0 else (curve.sizes[0], curve.sizes[0])
    while hi - lo > 1:
        mid = (lo + hi) // 2
        m = spliced.metric(circuit_pattern(spliced, order[:mid], not complement, errs))
        lo, hi = (lo, mid) if ok(faithfulness(m, curve.m_full, curve.m_empty)) else (mid, hi)
    return hi
