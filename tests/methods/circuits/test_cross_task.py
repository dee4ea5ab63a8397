"""Cross-task ablation on two toy tasks."""

from __future__ import annotations

import torch

from icl_circuits.methods.circuits import SplicedModel, circuit_order, cross_task_ablation, node_effects

from tests.helpers import PAIRS, setup, toy_batch, toy_task


def _two_tasks():
    """(spliced models on held-out batches, node effects on IE batches) of two toy tasks."""
    lm, cfg, saes, _ = setup()
    tasks = {"a": toy_task("a", PAIRS[:6]), "b": toy_task("b", PAIRS[6:])}
    sp, eff = {}, {}
    for name, task in tasks.items():
        est, _ = toy_batch(task=task, n_shots=2, seed=1)
        held, _ = toy_batch(task=task, n_shots=2, seed=2)
        eff[name] = node_effects(lm, est, saes, cfg)
        sp[name] = SplicedModel(lm, held, saes, cfg)
    return sp, eff


def test_cross_task_shapes():
    sp, eff = _two_tasks()
    for keep in (False, True):
        ct = cross_task_ablation(sp, eff, target=0.3, keep_errors=keep)
        assert ct.tasks == ["a", "b"] and len(ct.change) == 2 and all(len(r) == 2 for r in ct.change)
        for i, t in enumerate(ct.tasks):
            if ct.reached[t]:
                assert ct.change[i][i] <= 0.3 - 1.0 + 1e-6  # A itself fell to the target
            else:  # never reached: A's whole circuit (every candidate node) is ablated
                order, _ = circuit_order(eff[t], "signed", keep)
                assert ct.n_ablated[t] == int((eff[t].flat()[order] > 0).sum())


def test_cross_task_default_ablates_features_only(monkeypatch):
    """Cross-task ablation keeps every error node by default: each pattern it runs leaves error nodes alone."""
    sp, eff = _two_tasks()
    errs = torch.zeros(sp["a"].n_nodes, dtype=torch.bool)
    for k, o in eff["a"].offsets().items():
        n_types, width = eff["a"].effects[k].shape
        errs[o + width - 1 : o + n_types * width : width] = True
    seen = []
    for s in sp.values():
        orig = s.metrics
        monkeypatch.setattr(s, "metrics", lambda pats, chunk=4, orig=orig: (seen.append(pats.clone()), orig(pats, chunk))[1])
    cross_task_ablation(sp, eff, target=0.3)
    assert seen and all(not (p & errs).any() for p in seen)
