"""Node effects (Alg. 2) on tiny random models with tiny random SAEs.

References are independent of the code under test: autograd through SAEs spliced in by the
test itself and per-position loops for the token-type sums.
"""

from __future__ import annotations

import pytest
import torch

from icl_circuits.core.sites import Intervention, Site
from icl_circuits.data.prompts import TYPE_ID, icl_prompts
from icl_circuits.methods.circuits import ERROR, NODE_TYPES, CircuitConfig, circuit_saes, node_effects
from icl_circuits.sae.dictionary import JumpReLUSAE, SAEConfig

from tests.helpers import make_tiny, setup, tiny_saes, toy_batch


def _autograd_reference(lm, batch, saes, cfg):
    """Splice every SAE with latent/error probes; effect = probe grad x value, summed by a loop."""
    scoring = batch.scoring(cfg.metric_pairs)
    store, ivs = {}, []
    everywhere = torch.ones_like(batch.input_ids, dtype=torch.bool)
    for key, sae in saes.saes.items():
        # the sites the SAE's own config names (resid_post.L written as resid_pre.L+1)
        in_site, out_site = (Site.parse(s).canonical() for s in (sae.cfg.site, sae.cfg.out_site or sae.cfg.site))

        def fn(y, value_of, key=key, sae=sae, in_site=in_site, out_site=out_site):
            x = value_of(in_site) if in_site != out_site else y
            f = sae.encode(x)
            pf = torch.zeros_like(f, requires_grad=True)
            pe = torch.zeros_like(y, requires_grad=True)
            err = y - sae(x)  # the SAE's full output: a skip transcoder's x @ W_skip is not error
            store[key] = (f.detach(), err.detach(), pf, pe)
            return sae.decode(f + pf, x) + err + pe  # == y; d/dy = identity, d/dpf = W_dec / scale

        ivs.append(Intervention(out_site, everywhere, mode="fn", fn=fn))
    out = lm.run(batch.input_ids, batch.attention_mask, interventions=ivs, logprob_positions=scoring.positions, targets=scoring.targets)
    m = out.target_logprobs.mean()
    m.backward()
    types = batch.token_types
    ref = {}
    for key, (f, err, pf, pe) in store.items():
        e = torch.zeros(len(cfg.node_types), f.shape[-1] + 1, dtype=torch.float64)
        for b in range(types.shape[0]):
            for s in range(types.shape[1]):
                name = [t for t in cfg.node_types if TYPE_ID[t] == int(types[b, s])]
                if not name:
                    continue
                t = cfg.node_types.index(name[0])
                e[t, :-1] += (pf.grad[b, s] * f[b, s]).double()
                e[t, -1] += float((pe.grad[b, s] * err[b, s]).sum())
        ref[key] = e
    return float(m.detach()), ref


@pytest.mark.parametrize("family,pairs", [("gemma3", "all_but_first"), ("llama", "last"), ("gpt2", "all_but_first")])
def test_node_effects_equal_autograd_through_spliced_saes(family, pairs):
    lm, cfg, saes, batch = setup(family, metric_pairs=pairs)
    eff = node_effects(lm, batch, saes, cfg)
    m, ref = _autograd_reference(lm, batch, saes, cfg)
    assert eff.metric == pytest.approx(m, abs=1e-5)
    for key in saes.keys:
        got, want = eff.effects[key].double(), ref[key]
        assert got.shape == (len(NODE_TYPES), 13)
        assert torch.allclose(got, want, atol=1e-5 * max(1.0, float(want.abs().max()))), key
        assert (want[:, :-1] != 0).any(), f"{key}: no active latent, the test would be vacuous"


def test_node_ids_round_trip_and_table():
    lm, cfg, saes, batch = setup()
    eff = node_effects(lm, batch, saes, cfg)
    flat = eff.flat()
    for i in [0, 5, 13 * 6 + 12, len(flat) - 1]:
        key, feat, tt = eff.node(i)
        assert eff.flat_id(key, feat, tt) == i
        f = eff.effects[key].shape[1] - 1 if feat == ERROR else feat
        assert flat[i] == eff.effects[key][NODE_TYPES.index(tt), f]
    rows = eff.table(5)  # the default: signed, by the per-position mean
    assert [r["mean_effect"] for r in rows] == sorted((r["mean_effect"] for r in rows), reverse=True)
    assert rows[0]["mean_effect"] == float(eff.flat("mean").max())
    rows = eff.table(5, "abs", "sum")
    assert [abs(r["effect"]) for r in rows] == sorted((abs(r["effect"]) for r in rows), reverse=True)
    assert abs(rows[0]["effect"]) == float(flat.abs().max())


@pytest.mark.bundled
def test_bundled_node_effects_and_exact_splice(bundled):
    """The real Gemma 3 270M with the starter SAEs of layer 12: Alg. 2 equals autograd through
    the spliced SAEs, and the spliced model with nothing ablated is the model."""
    from icl_circuits.methods.circuits import SplicedModel
    from icl_circuits.data.tasks import load_task

    torch.set_num_threads(1)
    cfg = CircuitConfig(layers=(12,))
    saes = circuit_saes(bundled, cfg)
    batch = icl_prompts(bundled.tokenizer, load_task("antonyms"), 2, 3, seed=0)
    eff = node_effects(bundled, batch, saes, cfg)
    m, ref = _autograd_reference(bundled, batch, saes, cfg)
    assert eff.metric == pytest.approx(m, abs=1e-4)
    for key in saes.keys:
        want = ref[key]
        assert torch.allclose(eff.effects[key].double(), want, atol=1e-4 * float(want.abs().max())), key
    sp = SplicedModel(bundled, batch, saes, cfg)
    assert sp.full == pytest.approx(eff.metric, abs=1e-5)
    inactive = [i for i, v in enumerate(eff.flat().tolist()) if v == 0][:50]
    assert sp.metric(sp.ablation(inactive)) == pytest.approx(sp.full, abs=1e-5)


def test_user_saes_in_another_dtype_are_converted():
    lm, _ = make_tiny("gemma3")
    cfg = CircuitConfig(layers=(0,), kinds=("resid", "transcoder"))
    saes = circuit_saes(lm, cfg, tiny_saes(lm, (0,), cfg.kinds, dtype=torch.bfloat16))
    assert all(s.dtype == lm.dtype for s in saes.saes.values())
    batch, _ = toy_batch()
    assert torch.isfinite(node_effects(lm, batch, saes, cfg).flat()).all()


def _gemma_scope_2_style_saes(lm, seed: int = 0) -> dict:
    """resid as resid_post.L-1, attn at attn_z (width heads x head_dim), transcoders mlp_in -> mlp_out with W_skip."""
    g = torch.Generator().manual_seed(seed)
    d, dz, n = lm.d_model, lm.d_z, 12

    def t(d_in, d_out, skip=False):
        out = {"W_enc": torch.randn(d_in, n, generator=g) / d_in**0.5 * 2, "b_enc": torch.randn(n, generator=g) * 0.2,
               "W_dec": torch.randn(n, d_out, generator=g) * 0.5, "b_dec": torch.randn(d_out, generator=g) * 0.1,
               "threshold": torch.full((n,), 0.05)}  # fmt: skip
        if skip:
            out["W_skip"] = torch.randn(d_in, d_out, generator=g) * 0.3
        return out

    saes = {}
    for layer in (1,):
        saes[f"resid.{layer}"] = JumpReLUSAE(SAEConfig(d_in=d, d_sae=n, site=f"resid_post.{layer - 1}", layer=layer - 1, model=lm.name), t(d, d))
        saes[f"attn.{layer}"] = JumpReLUSAE(SAEConfig(d_in=dz, d_sae=n, kind="attn", site=f"attn_z.{layer}", layer=layer, model=lm.name), t(dz, dz))
        saes[f"transcoder.{layer}"] = JumpReLUSAE(SAEConfig(d_in=d, d_sae=n, d_out=d, kind="transcoder", site=f"mlp_in.{layer}",
                                                            out_site=f"mlp_out.{layer}", layer=layer, model=lm.name), t(d, d, True))  # fmt: skip
    return saes


def test_circuits_take_attn_z_saes_skip_transcoders_and_resid_post_saes():
    """Gemma Scope 2 layouts: node effects equal autograd through the spliced SAEs, and the spliced model's
    full ablation equals the SAEs' outputs at zero latents and zero error (b_dec, plus x @ W_skip)."""
    import transformers as tf

    from icl_circuits import LM
    from icl_circuits.methods.circuits import SplicedModel

    from tests.helpers import D, VOCAB

    # heads x head_dim (4 x 12) != d_model, as in real Gemma 3, so attn_z has its own width
    config = tf.Gemma3TextConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=1, head_dim=12, query_pre_attn_scalar=12, sliding_window=4,
                                 layer_types=["sliding_attention", "full_attention"])  # fmt: skip
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    lm = LM(tf.AutoModelForCausalLM.from_config(config).eval(), None, name="tiny-gemma3-dz")
    assert lm.d_z == 48 != lm.d_model
    cfg = CircuitConfig(layers=(1,))
    saes = circuit_saes(lm, cfg, _gemma_scope_2_style_saes(lm))
    assert saes.in_site("resid.1") == saes.out_site("resid.1") == Site(1, "resid_pre")
    assert (saes.in_site("attn.1"), saes.out_site("attn.1")) == (Site(1, "attn_z"), Site(1, "attn_z"))
    assert (saes.in_site("transcoder.1"), saes.out_site("transcoder.1")) == (Site(1, "mlp_in"), Site(1, "mlp_out"))
    batch, _ = toy_batch()
    eff = node_effects(lm, batch, saes, cfg)
    m, ref = _autograd_reference(lm, batch, saes, cfg)
    assert eff.metric == pytest.approx(m, abs=1e-5)
    for key in saes.keys:
        want = ref[key]
        assert torch.allclose(eff.effects[key].double(), want, atol=1e-5 * max(1.0, float(want.abs().max()))), key
        assert (want[:, :-1] != 0).any(), f"{key}: no active latent, the test would be vacuous"
    sp = SplicedModel(lm, batch, saes, cfg)
    nodes = batch.token_types >= 1
    ivs = []
    for key in saes.keys:
        sae, src, dst = saes.saes[key], saes.in_site(key), saes.out_site(key)
        fn = lambda y, value_of, sae=sae, src=src, dst=dst: (sae.b_dec / sae.cfg.output_scale).expand_as(y) + (  # noqa: E731
            sae.skip(value_of(src)) if src != dst else 0)
        ivs.append(Intervention(dst, nodes, mode="fn", fn=fn))
    sc = batch.scoring(cfg.metric_pairs)
    with torch.no_grad():
        out = lm.run(batch.input_ids, batch.attention_mask, interventions=ivs, logprob_positions=sc.positions, targets=sc.targets)
    assert sp.empty_metric(keep_errors=False) == pytest.approx(float(out.target_logprobs.mean()), abs=1e-5)
    with pytest.raises(ValueError, match="must read attn_out.1 and write attn_out.1, or read attn_z.1"):
        circuit_saes(lm, CircuitConfig(layers=(1,), kinds=("attn",)), {"attn.1": saes.saes["transcoder.1"]})


def test_saved_effects_keep_sums_and_means(tmp_path):
    from icl_circuits.methods.circuits import load_effects, save_effects

    lm, cfg, saes, batch = setup()
    eff = node_effects(lm, batch, saes, cfg)
    back = load_effects(save_effects(eff, tmp_path / "e.safetensors"))
    assert back.keys == eff.keys and back.node_types == eff.node_types and back.metric == pytest.approx(eff.metric)
    assert torch.equal(back.flat(), eff.flat()) and torch.equal(back.flat("mean"), eff.flat("mean"))
    assert not torch.equal(eff.flat(), eff.flat("mean"))  # two different rankings are stored
