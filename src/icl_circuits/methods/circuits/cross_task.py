"""Cross-task ablation (Fig. 8): ablate task A's top nodes until A's faithfulness falls to a target,
and measure how much every other task B loses."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from icl_circuits.core.storage import check_schema, stamp
from icl_circuits.methods.circuits.faithfulness_curves import (
    FaithfulnessCurve,
    circuit_order,
    circuit_pattern,
    faithfulness_curve,
    n_candidates,
    nodes_needed,
)
from icl_circuits.methods.circuits.nodes import NodeEffects
from icl_circuits.methods.circuits.spliced import SplicedModel


@dataclass
class CrossTask:
    tasks: list[str]
    n_ablated: dict[str, int | None]  # nodes of task A ablated to bring A's faithfulness to target
    change: list[list[float]]  # [ablated task A][tested task B]: faithfulness(B) - 1
    target: float
    reached: dict[str, bool] = field(default_factory=dict)  # False: the target was never reached, so A's whole
    #                                                         circuit (every candidate node) was ablated instead

    def to_dict(self) -> dict:
        return stamp("cross_task", asdict(self))

    @classmethod
    def from_dict(cls, d: dict, where: str = "") -> "CrossTask":
        d = check_schema("cross_task", d, where)
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def cross_task_ablation(
    spliced: Mapping[str, SplicedModel], effects: Mapping[str, NodeEffects], target: float = 0.3, by: str = "signed",
    curves: Mapping[str, FaithfulnessCurve] | None = None, progress: bool = False, keep_errors: bool = True,
    over: str = "mean",
) -> CrossTask:  # fmt: skip
    """For each task A ablate its top-IE nodes until faithfulness(A) <= target; measure every task B.

    keep_errors=True (the authors' method): only feature nodes are ranked and ablated, error nodes always
    stay, and each task's faithfulness is measured against its all-features-ablated baseline. When no
    number of A's nodes brings A down to the target, all of A's candidate nodes are ablated and
    `reached[A]` is False.
    """
    from tqdm.auto import tqdm

    tasks = list(spliced)
    n_abl, change, reached = {}, [], {}
    for a in tqdm(tasks, desc="cross-task", disable=not progress):
        curve = (curves or {}).get(a)
        if curve is None or (curve.keep_errors, curve.rank_by, curve.rank_over) != (keep_errors, by, over):  # other method
            curve = faithfulness_curve(spliced[a], effects[a], by=by, keep_errors=keep_errors, over=over)
        n = nodes_needed(spliced[a], effects[a], target, complement=True, curve=curve)
        order, errs = circuit_order(effects[a], by, keep_errors, over)
        reached[a] = n is not None
        if n is None:
            n = n_candidates(effects[a], order, by, over)
        n_abl[a] = n
        row = []
        for b in tasks:
            sp = spliced[b]
            row.append(sp.faithfulness(sp.metric(circuit_pattern(sp, order[:n], False, errs)), keep_errors) - 1.0)
        change.append(row)
    return CrossTask(tasks, n_abl, change, target, reached)
