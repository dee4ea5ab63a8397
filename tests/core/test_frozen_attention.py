"""Frozen attention: patterns recorded on a clean run are replayed bit-identically, on every family."""

from __future__ import annotations

import pytest
import torch

from icl_circuits import icl_prompts
from icl_circuits.core.frozen_attention import FrozenAttention
from icl_circuits.core.sites import Intervention, Site

from tests.helpers import FAMILIES, make_tiny


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_frozen_attention_keeps_patterns_bit_identical(family):
    lm, _ = make_tiny(family)
    ids = torch.randint(4, 150, (2, 9))
    where = torch.zeros(2, 9, dtype=torch.bool)
    where[:, 3] = True
    iv = Intervention(Site(0, "resid_pre"), where, 3 * torch.randn(lm.d_model))
    with FrozenAttention(lm, [0, 1]) as fa:
        fa.record()
        clean = lm.run(ids, read=["resid_post.1"]).acts[Site(1, "resid_post")]
        recorded = {l: p.clone() for l, p in fa.patterns().items()}
        fa.freeze()
        same = lm.run(ids, read=["resid_post.1"]).acts[Site(1, "resid_post")]
        lm.run(ids, read=["resid_post.1"], interventions=[iv])
        frozen = fa.used_patterns()
        fa.release()
        lm.run(ids, read=["resid_post.1"], interventions=[iv])
        free = fa.used_patterns()
    assert torch.equal(same, clean)  # freezing alone changes nothing, bit for bit
    for l in (0, 1):
        assert torch.equal(frozen[l], recorded[l])  # the ablated pass used exactly the clean patterns
    assert not torch.equal(free[1], recorded[1])  # without freezing the perturbation moves attention
    assert lm.model.config._attn_implementation == "eager"  # restored on exit
    plain = lm.run(ids, read=["resid_post.1"]).acts[Site(1, "resid_post")]
    torch.testing.assert_close(plain, clean)


def test_frozen_attention_output_matches_manual_value_path():
    """Llama layer 0 by hand: attention = o_proj(P_clean @ V(ablated input)), P from transformers' own output_attentions."""
    lm, _ = make_tiny("llama")
    m = lm.model.model
    ids = torch.randint(4, 150, (1, 8))
    delta = torch.zeros(1, 8, lm.d_model)
    delta[0, 2] = 2 * torch.randn(lm.d_model)
    with torch.no_grad():
        P = lm.model(ids, output_attentions=True).attentions[0]  # [1, heads, 8, 8] clean pattern of layer 0
        x = m.embed_tokens(ids) + delta  # ablated resid_pre.0
        blk = m.layers[0]
        at = blk.self_attn
        v = at.v_proj(blk.input_layernorm(x)).view(1, 8, -1, at.head_dim).transpose(1, 2)  # [1, kv, 8, hd]
        v = v.repeat_interleave(P.shape[1] // v.shape[1], dim=1)
        a = at.o_proj((P @ v).transpose(1, 2).reshape(1, 8, -1))
        mid = x + a
        expected = mid + blk.mlp(blk.post_attention_layernorm(mid))  # resid_pre.1
    iv = Intervention(Site(0, "resid_pre"), torch.ones(1, 8, dtype=torch.bool), delta[0])
    with FrozenAttention(lm, [0]) as fa:
        fa.record()
        lm.run(ids, read=["resid_pre.1"])
        fa.freeze()
        got = lm.run(ids, read=["resid_pre.1"], interventions=[iv]).acts[Site(1, "resid_pre")]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)



@pytest.mark.bundled
def test_frozen_attention_on_the_bundled_model(bundled):
    torch.set_num_threads(1)
    lm = bundled
    from icl_circuits.data.tasks import load_task

    batch = icl_prompts(lm.tokenizer, load_task("antonyms"), 2, 4, seed=0)
    plain = lm.run(batch.input_ids, batch.attention_mask, read=["resid_pre.12"]).acts[Site(12, "resid_pre")]
    with FrozenAttention(lm, [11]) as fa:
        fa.record()
        clean = lm.run(batch.input_ids, batch.attention_mask, read=["resid_pre.12"]).acts[Site(12, "resid_pre")]
        fa.freeze()
        same = lm.run(batch.input_ids, batch.attention_mask, read=["resid_pre.12"]).acts[Site(12, "resid_pre")]
    assert torch.equal(same, clean)
    m = batch.attention_mask.bool()
    # eager (ours) vs. the model's default sdpa: equal up to float rounding
    torch.testing.assert_close(clean[m], plain[m], rtol=1e-3, atol=1e-2)
    assert lm.model.config._attn_implementation == "sdpa"
