"""Faithfulness curves of C and M \\ C, nodes needed and the circuit order on tiny random models."""

from __future__ import annotations

import pytest
import torch

from icl_circuits.core.sites import Intervention
from icl_circuits.methods.circuits import SplicedModel, circuit_order, faithfulness_curve, node_effects, nodes_needed, type_index

from tests.helpers import hf_metric, setup, toy_batch


def test_faithfulness_curve_and_nodes_needed():
    lm, cfg, saes, batch = setup()
    eff = node_effects(lm, batch, saes, cfg)
    held_out, _ = toy_batch(seed=7)
    sp = SplicedModel(lm, held_out, saes, cfg)
    curve = faithfulness_curve(sp, eff, sizes=(0, 1, 5, 20, 100), by="abs", keep_errors=False, over="sum")  # the options
    assert curve.sizes[0] == 0 and curve.sizes[-1] == eff.n_nonzero()
    assert curve.faith_C[0] == pytest.approx(0.0) and curve.faith_M[0] == pytest.approx(1.0)
    n = nodes_needed(sp, eff, 0.6, curve=curve)
    if n is not None:  # the returned N reaches the target, N - 1 does not (checked directly)
        order = torch.argsort(eff.flat().abs(), descending=True, stable=True).tolist()
        f = lambda k: sp.faithfulness(sp.metric(sp.ablation(order[:k], complement=True)), keep_errors=False)  # noqa: E731
        assert f(n) >= 0.6
        assert n == 0 or f(n - 1) < 0.6


def test_default_keeps_error_nodes_mM_is_the_model_and_m_empty_ablates_features_only():
    """The authors' faithfulness: m(M) = the model itself, m(empty) = every feature zeroed, every error kept."""
    lm, cfg, saes, batch = setup()
    eff = node_effects(lm, batch, saes, cfg)
    sp = SplicedModel(lm, batch, saes, cfg)
    curve = faithfulness_curve(sp, eff, sizes=(0, 3, 10))
    assert curve.keep_errors and curve.rank_by == "signed" and curve.rank_over == "mean" and curve.n_error_nodes == [0] * len(curve.sizes)
    assert curve.m_full == pytest.approx(hf_metric(lm, batch), abs=1e-5)
    # the curve ends with every feature node of positive effect in C (zero and negative ones come after)
    order, _ = circuit_order(eff)
    assert curve.sizes[-1] == curve.n_nonzero == int((eff.flat("mean")[order] > 0).sum()) < len(order)
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
    from icl_circuits.methods.circuits import NodeEffects, ranking

    e = torch.tensor([0.5, -2.0, 1.0, 0.0])
    assert ranking(e).tolist() == [2, 0, 3, 1]  # signed (default): the harmful node (-2) is last
    assert ranking(e, "abs").tolist() == [1, 2, 0, 3]  # by |effect| it would come first
    # through the circuit order, with an error node (last column) that is never ranked by default
    e = {"resid.0": torch.tensor([[0.5, -2.0, 1.0, 3.0]])}
    eff = NodeEffects(["resid.0"], ("arrow",), e, 0.0, means=e)  # one position: mean = sum
    order, errs = circuit_order(eff)
    assert order.tolist() == [2, 0, 1] and errs.tolist() == [False, False, False, True]
    order, errs = circuit_order(eff, "signed", keep_errors=False)
    assert order.tolist() == [3, 2, 0, 1] and errs is None


def test_the_default_ranks_by_the_mean_over_a_token_types_positions():
    """The authors' average_over_positions: a node on a type with many positions (a summed effect of 6
    over 12 arrows) ranks below one on a type with one position (2 on the single prompt token)."""
    from icl_circuits.methods.circuits import NodeEffects

    sums = {"resid.0": torch.tensor([[2.0, 0.0, 0.0], [0.0, 6.0, 0.0]])}  # [prompt, arrow] x [latent 0, latent 1, error]
    means = {"resid.0": torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.5, 0.0]])}
    eff = NodeEffects(["resid.0"], ("prompt", "arrow"), sums, 0.0, means=means)
    prompt0, arrow1 = eff.flat_id("resid.0", 0, "prompt"), eff.flat_id("resid.0", 1, "arrow")
    assert circuit_order(eff)[0][:2].tolist() == [prompt0, arrow1]
    assert circuit_order(eff, over="sum")[0][:2].tolist() == [arrow1, prompt0]
    assert [r["node"] for r in eff.table(2)] == [prompt0, arrow1] and eff.table(1)[0]["mean_effect"] == 2.0
    with pytest.raises(ValueError, match="per-position means"):  # effects saved before means existed
        circuit_order(NodeEffects(["resid.0"], ("prompt", "arrow"), sums, 0.0))


def test_node_effects_means_on_types_with_equal_counts_are_sums_over_all_positions():
    """Where every prompt has the same n positions of a type (arrows, newlines, the instruction), the
    per-prompt-then-over-prompts mean is the summed effect / (n x prompts)."""
    lm, cfg, saes, batch = setup()
    eff = node_effects(lm, batch, saes, cfg)
    tix = type_index(batch, cfg.node_types)
    counts = torch.stack([(tix == t).sum(1) for t in range(len(cfg.node_types))])  # [types, batch]
    equal = [t for t in range(len(cfg.node_types)) if counts[t].min() == counts[t].max() > 0]
    assert equal and len(equal) < len(cfg.node_types)  # both cases occur in the toy batch
    for key in saes.keys:
        for t in equal:
            want = eff.effects[key][t] / (int(counts[t, 0]) * counts.shape[1])
            torch.testing.assert_close(eff.means[key][t], want, atol=1e-6, rtol=1e-5)
