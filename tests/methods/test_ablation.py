"""The SAE-spliced model, faithfulness, cross-task ablation and IE quality on tiny random models.

References: the plain transformers forward, zero-ablation written as plain 'replace'
interventions, and single-latent ablations spliced in by the test itself.
"""

from __future__ import annotations

import pytest
import torch

from icl_circuits.methods.ablation import (
    CircuitRunConfig,
    circuit_order,
    SplicedModel,
    cross_task_ablation,
    faithfulness,
    faithfulness_curve,
    ie_correlations,
    ie_quality,
    nodes_needed,
    pearson,
    run_circuits,
    spearman,
)
from icl_circuits.methods.circuits import ERROR, NODE_TYPES, CircuitConfig, node_effects
from icl_circuits.data.prompts import TYPE_ID
from icl_circuits.core.sites import Intervention

from tests.helpers import PAIRS, setup, tiny_saes, toy_batch, toy_task


def _hf_metric(lm, batch, pairs="all_but_first"):
    """Mean log-prob of the scored targets from a plain transformers forward with full logits."""
    sc = batch.scoring(pairs)
    with torch.no_grad():
        logits = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    lp = torch.log_softmax(logits.double(), -1)[sc.positions]
    return float(lp.gather(-1, sc.targets[:, None]).mean())


@pytest.mark.parametrize("family", ["gemma3", "gemma2", "gpt2"])
def test_no_ablation_reproduces_the_model_exactly(family):
    lm, cfg, saes, batch = setup(family)
    sp = SplicedModel(lm, batch, saes, cfg)
    assert sp.full == pytest.approx(_hf_metric(lm, batch), abs=1e-5)
    # a pattern that makes every SAE site run its splice but zeroes only never-active latents:
    eff = node_effects(lm, batch, saes, cfg)
    dead = [i for i, v in enumerate(eff.flat().tolist()) if v == 0 and eff.node(i)[1] != ERROR]
    per_key = {eff.node(i)[0] for i in dead}
    assert per_key == set(saes.keys), "need an inactive latent in every SAE for this test"
    assert sp.metric(sp.ablation(dead)) == pytest.approx(sp.full, abs=1e-6)
    assert sp.metrics(torch.zeros(2, sp.n_nodes, dtype=torch.bool)).tolist() == [sp.full, sp.full]


def test_ablating_all_nodes_is_zero_ablation_to_b_dec():
    lm, cfg, saes, batch = setup()
    sp = SplicedModel(lm, batch, saes, cfg)
    nodes = batch.token_types >= 1  # every token but bos and padding (bos is type 0, padding -1)
    ivs = [Intervention(saes.out_site(k), nodes, saes.saes[k].b_dec / saes.saes[k].cfg.output_scale, "replace") for k in saes.keys]
    sc = batch.scoring("all_but_first")
    with torch.no_grad():
        out = lm.run(batch.input_ids, batch.attention_mask, interventions=ivs, logprob_positions=sc.positions, targets=sc.targets)
    assert sp.empty == pytest.approx(float(out.target_logprobs.mean()), abs=1e-5)
    assert sp.empty != pytest.approx(sp.full, abs=1e-4)  # the ablation did something (random model: either sign)


def test_faithfulness_of_everything_and_nothing():
    lm, cfg, saes, batch = setup()
    sp = SplicedModel(lm, batch, saes, cfg)
    everything = range(sp.n_nodes)
    assert sp.faithfulness(sp.metric(sp.ablation(everything, complement=True))) == 1.0  # C = all nodes
    assert sp.faithfulness(sp.metric(sp.ablation(everything))) == 0.0  # M \ C = nothing left
    assert faithfulness(0.5, 1.0, 0.0) == 0.5 and faithfulness(-2.0, -1.0, -3.0) == 0.5


def test_single_node_ablation_matches_hand_spliced_zeroing():
    """Zero latent i of one SAE at the arrow tokens only, spliced by hand; compare with SplicedModel."""
    lm, cfg, saes, batch = setup()
    sp = SplicedModel(lm, batch, saes, cfg)
    eff = node_effects(lm, batch, saes, cfg)
    for key in ("resid.1", "transcoder.0", "attn.1"):
        sae = saes.saes[key]
        i = int(eff.effects[key][NODE_TYPES.index("arrow"), :-1].abs().argmax())
        arrows = batch.token_types == TYPE_ID["arrow"]
        in_site = saes.in_site(key)

        def fn(y, value_of, sae=sae, i=i, in_site=in_site):
            x = value_of(in_site) if in_site != saes.out_site(key) else y
            f = sae.encode(x)
            kept = f.clone()
            kept[..., i] = 0
            return sae.decode(kept) + (y - sae.decode(f))

        sc = batch.scoring("all_but_first")
        with torch.no_grad():
            out = lm.run(batch.input_ids, batch.attention_mask, interventions=[Intervention(saes.out_site(key), arrows, mode="fn", fn=fn)],
                         logprob_positions=sc.positions, targets=sc.targets)  # fmt: skip
        want = float(out.target_logprobs.mean())
        got = sp.metric(sp.ablation([eff.flat_id(key, i, "arrow")]))
        assert got == pytest.approx(want, abs=1e-5), key
        assert got != pytest.approx(sp.full, abs=1e-7), f"{key}: ablation had no effect, vacuous"


def test_batched_copies_equal_one_by_one():
    lm, cfg, saes, batch = setup()
    sp = SplicedModel(lm, batch, saes, cfg)
    g = torch.Generator().manual_seed(0)
    pats = torch.rand(5, sp.n_nodes, generator=g) < 0.3
    together = sp.metrics(pats, chunk=5)
    alone = torch.tensor([sp.metric(p) for p in pats])
    assert torch.allclose(together, alone, atol=1e-5)
    with pytest.raises(ValueError, match="n_nodes"):
        sp.metrics(torch.zeros(1, sp.n_nodes + 1, dtype=torch.bool))


def test_faithfulness_curve_and_nodes_needed():
    lm, cfg, saes, batch = setup()
    eff = node_effects(lm, batch, saes, cfg)
    held_out, _ = toy_batch(seed=7)
    sp = SplicedModel(lm, held_out, saes, cfg)
    curve = faithfulness_curve(sp, eff, sizes=(0, 1, 5, 20, 100), by="abs", keep_errors=False)  # the options
    assert curve.sizes[0] == 0 and curve.sizes[-1] == eff.n_nonzero()
    assert curve.faith_C[0] == pytest.approx(0.0) and curve.faith_M[0] == pytest.approx(1.0)
    n = nodes_needed(sp, eff, 0.6, curve=curve)
    if n is not None:  # the returned N reaches the target, N - 1 does not (checked directly)
        order = torch.argsort(eff.flat().abs(), descending=True, stable=True).tolist()
        f = lambda k: sp.faithfulness(sp.metric(sp.ablation(order[:k], complement=True)))  # noqa: E731
        assert f(n) >= 0.6
        assert n == 0 or f(n - 1) < 0.6


def test_ie_quality_rows_and_correlations():
    lm, cfg, saes, batch = setup()
    eff = node_effects(lm, batch, saes, cfg)
    sp = SplicedModel(lm, batch, saes, cfg)
    rows = ie_quality(sp, eff, max_per_sae=3, chunk=4)
    assert rows and all(r["token_type"] in ("input", "output", "arrow") and r["estimate"] != 0 for r in rows)
    r0 = rows[0]
    assert r0["actual"] == pytest.approx(sp.full - sp.metric(sp.ablation([r0["node"]])), abs=1e-6)
    errors = [r for r in rows if r["feature"] == ERROR]
    nonzero_errors = sum(int(eff.effects[k][NODE_TYPES.index(t), -1] != 0) for k in saes.keys for t in ("input", "output", "arrow"))
    assert len(errors) == nonzero_errors > 0  # every non-zero error node, beyond the feature sample
    assert all(sum(r["key"] == k and r["token_type"] == t and r["feature"] != ERROR for r in rows) <= 3
               for k in saes.keys for t in ("input", "output", "arrow"))  # fmt: skip
    per_layer = ie_correlations(rows)
    assert {r["layer"] for r in per_layer} == {0, 1}
    # the headline is the authors' metric: feature nodes only; error nodes are the separate diagnostic
    (pooled,) = ie_correlations(rows, ())
    feats = [r for r in rows if r["feature"] != ERROR]
    assert pooled["n"] == len(feats) and pooled["n_errors"] == len(errors)
    assert pooled["r"] == pytest.approx(pearson([r["estimate"] for r in feats], [r["actual"] for r in feats]))
    assert pooled["r_with_errors"] == pytest.approx(pearson([r["estimate"] for r in rows], [r["actual"] for r in rows]))
    # by default every non-zero feature node is ablated (no sample)
    every = ie_quality(sp, eff, token_types=("arrow",), chunk=8, all_errors=False)
    assert len(every) == sum(int((eff.effects[k][NODE_TYPES.index("arrow"), :-1] != 0).sum()) for k in saes.keys)
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0) and pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0) and spearman([1, 2, 3], [3, 1, 2]) == pytest.approx(-0.5)


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


@pytest.mark.device_audit  # no stray CPU tensors in the whole command (tests/test_device.py)
def test_run_circuits_end_to_end_with_resume(tmp_path, monkeypatch):
    import icl_circuits.methods.ablation as ab

    lm, cfg, _, _ = setup()
    lm.tokenizer = toy_batch()[1]
    saes = tiny_saes(lm, (0, 1))
    tasks = [toy_task("a", PAIRS), toy_task("b", list(reversed(PAIRS)))]
    rc = CircuitRunConfig(circuit=CircuitConfig(layers=(0, 1)), n_prompts=2, n_shots=3, sizes=(0, 2, 10), edge_k=1, ie_quality_per_sae=2,
                          other_errors_curve=True)
    res = run_circuits(lm, tasks, rc, tmp_path, saes=saes, progress=False)
    assert len(res["summaries"]) == 2
    for name in ("faithfulness.png", "faithfulness_errors_ablated.png", "ie_quality.png", "cross_task.png", "summary.csv", "a/graph.json",
                 "a/graph.png", "b/summary.json", "b/faithfulness_errors_ablated.json", "cross_task_errors_ablated.png"):
        assert (tmp_path / name).is_file(), name
    import json

    main = json.loads((tmp_path / "a" / "faithfulness.json").read_text())
    assert main["keep_errors"] and main["rank_by"] == "signed" and set(main["n_error_nodes"]) == {0}
    monkeypatch.setattr(ab, "run_circuit_task", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed a finished task")))
    again = run_circuits(lm, tasks, rc, tmp_path, saes=saes, progress=False)
    assert [s["task"] for s in again["summaries"]] == ["a", "b"]


def test_default_keeps_error_nodes_mM_is_the_model_and_m_empty_ablates_features_only():
    """The authors' faithfulness: m(M) = the model itself, m(empty) = every feature zeroed, every error kept."""
    lm, cfg, saes, batch = setup()
    eff = node_effects(lm, batch, saes, cfg)
    sp = SplicedModel(lm, batch, saes, cfg)
    curve = faithfulness_curve(sp, eff, sizes=(0, 3, 10))
    assert curve.keep_errors and curve.rank_by == "signed" and curve.n_error_nodes == [0] * len(curve.sizes)
    assert curve.m_full == pytest.approx(_hf_metric(lm, batch), abs=1e-5)
    # the curve ends with every feature node of positive effect in C (zero and negative ones come after)
    order, _ = circuit_order(eff)
    assert curve.sizes[-1] == curve.n_nonzero == int((eff.flat()[order] > 0).sum()) < len(order)
    assert curve.faith_C[0] == pytest.approx(0.0) and curve.faith_M[0] == pytest.approx(1.0)
    # m(empty) here = every latent zeroed, every error node kept: out = y - (f @ W_dec) / scale, by hand
    nodes = batch.token_types >= 1
    ivs = []
    for k in saes.keys:
        sae, in_site = saes.saes[k], saes.in_site(k)
        fn = lambda y, value_of, sae=sae, in_site=in_site, k=k: y - (sae.encode(value_of(in_site) if in_site != saes.out_site(k) else y) @ sae.W_dec) / sae.cfg.output_scale  # noqa: E731
        ivs.append(Intervention(saes.out_site(k), nodes, mode="fn", fn=fn))
    sc = batch.scoring("all_but_first")
    with torch.no_grad():
        out = lm.run(batch.input_ids, batch.attention_mask, interventions=ivs, logprob_positions=sc.positions, targets=sc.targets)
    assert curve.m_empty == pytest.approx(float(out.target_logprobs.mean()), abs=1e-5)
    n = nodes_needed(sp, eff, 0.5, curve=curve)
    assert n is None or n <= curve.n_nonzero


def test_signed_ranking_puts_a_harmful_node_last():
    from icl_circuits.methods.ablation import circuit_order
    from icl_circuits.methods.circuits import NodeEffects, ranking

    e = torch.tensor([0.5, -2.0, 1.0, 0.0])
    assert ranking(e).tolist() == [2, 0, 3, 1]  # signed (default): the harmful node (-2) is last
    assert ranking(e, "abs").tolist() == [1, 2, 0, 3]  # by |effect| it would come first
    # through the circuit order, with an error node (last column) that is never ranked by default
    eff = NodeEffects(["resid.0"], ("arrow",), {"resid.0": torch.tensor([[0.5, -2.0, 1.0, 3.0]])}, 0.0)
    order, errs = circuit_order(eff)
    assert order.tolist() == [2, 0, 1] and errs.tolist() == [False, False, False, True]
    order, errs = circuit_order(eff, "signed", keep_errors=False)
    assert order.tolist() == [3, 2, 0, 1] and errs is None


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
