"""The SAE-spliced model on tiny random models: exact with nothing ablated, zero ablation, batched copies.

References: the plain transformers forward, zero-ablation written as plain 'replace'
interventions, and single-latent ablations spliced in by the test itself.
"""

from __future__ import annotations

import pytest
import torch

from icl_circuits.core.sites import Intervention
from icl_circuits.data.prompts import TYPE_ID
from icl_circuits.methods.circuits import ERROR, NODE_TYPES, SplicedModel, faithfulness, node_effects

from tests.helpers import hf_metric, setup


@pytest.mark.parametrize("family", ["gemma3", "gemma2", "gpt2"])
def test_no_ablation_reproduces_the_model_exactly(family):
    lm, cfg, saes, batch = setup(family)
    sp = SplicedModel(lm, batch, saes, cfg)
    assert sp.full == pytest.approx(hf_metric(lm, batch), abs=1e-5)
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
    assert sp.empty_metric(keep_errors=False) == pytest.approx(float(out.target_logprobs.mean()), abs=1e-5)
    assert sp.empty_metric(keep_errors=False) != pytest.approx(sp.full, abs=1e-4)  # it did something (random model: either sign)


def test_faithfulness_of_everything_and_nothing():
    lm, cfg, saes, batch = setup()
    sp = SplicedModel(lm, batch, saes, cfg)
    everything = range(sp.n_nodes)
    assert sp.faithfulness(sp.metric(sp.ablation(everything, complement=True))) == 1.0  # C = all nodes
    assert sp.faithfulness(sp.metric(sp.ablation(everything)), keep_errors=False) == 0.0  # M \ C = nothing left
    # the default (the authors'): error nodes are never ablated, so "nothing left" = every feature zeroed
    features = [i for i in everything if not sp.error_nodes[i]]
    assert len(features) == sp.n_nodes - len(saes.keys) * sp.n_types
    assert sp.faithfulness(sp.metric(sp.ablation(features))) == 0.0
    assert sp.faithfulness(sp.metric(sp.ablation(everything))) != pytest.approx(0.0, abs=1e-4)
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
