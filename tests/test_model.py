"""Hook sites, interventions and gradients on tiny random models of every family, vs. plain transformers."""

from __future__ import annotations

import pytest
import torch

from icl_circuits import Intervention, Site
from icl_circuits.sites import SITE_KINDS

from .conftest import VOCAB, make_tiny

ALL_SITES = [Site(l, k) for l in range(2) for k in SITE_KINDS]


def _ids(batch: int = 3, seq: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _block(lm, layer):
    return lm.adapter.blocks(lm.model)[layer]


@torch.no_grad()
def test_sites_against_transformers(tiny):
    lm, mlp_in = tiny
    ids = _ids()
    # independent references: HF's own hidden states, and the tensor HF feeds into each MLP norm
    fed_to_mlp = {}
    handles = [
        getattr(_block(lm, l), mlp_in).register_forward_pre_hook(lambda m, a, l=l: fed_to_mlp.__setitem__(l, a[0]))
        for l in range(2)
    ]
    ref = lm.model(ids, output_hidden_states=True)
    for h in handles:
        h.remove()

    out = lm.run(ids, read=ALL_SITES, full_logits=True)
    a = {(s.kind, s.layer): v for s, v in out.acts.items()}
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)
    for l in range(2):
        torch.testing.assert_close(a["resid_pre", l], ref.hidden_states[l])
        torch.testing.assert_close(a["resid_mid", l], fed_to_mlp[l], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a["resid_mid", l], a["resid_pre", l] + a["attn_out", l])
        torch.testing.assert_close(a["resid_post", l], a["resid_mid", l] + a["mlp_out", l])
    torch.testing.assert_close(a["resid_post", 0], a["resid_pre", 1])
    # what the two sublayers add is exactly the change of the residual stream across block 0
    torch.testing.assert_close(a["attn_out", 0] + a["mlp_out", 0], ref.hidden_states[1] - ref.hidden_states[0], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_run_from_layer_matches_full_run(tiny):
    lm, _ = tiny
    ids = _ids()
    full = lm.run(ids, read=["resid_pre.1", "resid_post.1"], full_logits=True)
    resumed = lm.run(ids, start_layer=1, start_resid=full.acts[Site(1, "resid_pre")], read=["resid_post.1"], full_logits=True)
    torch.testing.assert_close(resumed.logits, full.logits)
    torch.testing.assert_close(resumed.acts[Site(1, "resid_post")], full.acts[Site(1, "resid_post")])
    # the skipped block really is skipped: garbage in its place changes nothing
    blocks = lm.adapter.blocks(lm.model)
    calls = []
    h = blocks[0].register_forward_hook(lambda *a: calls.append(1))
    lm.run(ids, start_layer=1, start_resid=full.acts[Site(1, "resid_pre")], full_logits=True)
    h.remove()
    assert calls == [] and blocks[0].__class__.__name__ != "_SkipBlock"  # restored afterwards


@torch.no_grad()
def test_run_from_layer_with_intervention_matches_full_run(tiny):
    lm, _ = tiny
    ids = _ids()
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    mask[:, 4] = True
    v = torch.randn(lm.d_model)
    iv = [Intervention(Site(1, "resid_pre"), mask, v)]
    full = lm.run(ids, interventions=iv, full_logits=True)
    cache = lm.run(ids, read=["resid_pre.1"]).acts[Site(1, "resid_pre")]
    resumed = lm.run(ids, start_layer=1, start_resid=cache, interventions=iv, full_logits=True)
    torch.testing.assert_close(resumed.logits, full.logits)


@pytest.mark.parametrize("kind", SITE_KINDS)
@torch.no_grad()
def test_added_vector_changes_only_later_positions(kind):
    lm, _ = make_tiny("gemma2")
    ids = _ids(batch=2, seq=8)
    clean = lm.run(ids, full_logits=True).logits
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    mask[0, 5] = True  # row 0, position 5 only
    out = lm.run(ids, interventions=[Intervention(Site(0, kind), mask, 3 * torch.randn(lm.d_model))], full_logits=True)
    torch.testing.assert_close(out.logits[0, :5], clean[0, :5], rtol=0, atol=0)  # causal: earlier positions untouched
    torch.testing.assert_close(out.logits[1], clean[1], rtol=0, atol=0)  # other prompts untouched
    assert (out.logits[0, 5:] - clean[0, 5:]).abs().amax(-1).min() > 1e-4  # every later position changed


@torch.no_grad()
def test_every_family_added_vector_is_causal(tiny):
    lm, _ = tiny
    ids = _ids(batch=1, seq=8)
    clean = lm.run(ids, full_logits=True).logits
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    mask[0, 3] = True
    out = lm.run(ids, interventions=[Intervention(Site(1, "resid_pre"), mask, 3 * torch.randn(lm.d_model))], full_logits=True)
    assert torch.equal(out.logits[0, :3], clean[0, :3])
    assert (out.logits[0, 3:] - clean[0, 3:]).abs().amax(-1).min() > 1e-4


@torch.no_grad()
def test_replace_and_read_back():
    lm, _ = make_tiny("llama")
    ids = _ids()
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    mask[:, 2] = True
    value = torch.randn(lm.d_model)
    for kind in SITE_KINDS:
        out = lm.run(ids, read=[Site(0, kind)], interventions=[Intervention(Site(0, kind), mask, value, "replace")])
        got = out.acts[Site(0, kind)]
        torch.testing.assert_close(got[:, 2], value.expand(3, -1), rtol=1e-5, atol=1e-5)
    # replacing resid_mid really reaches the MLP: resid_post - mlp_out == the replaced value
    out = lm.run(ids, read=["resid_post.0", "mlp_out.0"], interventions=[Intervention("resid_mid.0", mask, value, "replace")])
    diff = out.acts[Site(0, "resid_post")] - out.acts[Site(0, "mlp_out")]
    torch.testing.assert_close(diff[:, 2], value.expand(3, -1), rtol=1e-5, atol=1e-5)


def test_gradients_match_autograd_on_hf_hidden_states(tiny):
    lm, _ = tiny
    ids = _ids()
    target = ids[:, 1:]

    def metric_from_logits(logits):
        return torch.log_softmax(logits[:, :-1], -1).gather(-1, target[..., None]).mean()

    # reference: HF forward, retain_grad on its own hidden states (inputs of each block); the
    # weights are frozen, so block 0's input is made a leaf that requires grad
    leaf = {}

    def make_leaf(module, args):
        leaf["x"] = args[0].detach().requires_grad_()
        return (leaf["x"], *args[1:])

    h0 = _block(lm, 0).register_forward_pre_hook(make_leaf)
    ref = lm.model(ids, output_hidden_states=True)
    h0.remove()
    ref.hidden_states[1].retain_grad()
    metric_from_logits(ref.logits).backward()
    ref_grads = [leaf["x"].grad, ref.hidden_states[1].grad]

    value, acts, grads = lm.gradients(ids, lambda o: metric_from_logits(o.logits), ["resid_pre.0", "resid_pre.1", "resid_mid.1"], full_logits=True)
    torch.testing.assert_close(value, metric_from_logits(ref.logits).detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grads[Site(0, "resid_pre")], ref_grads[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[Site(1, "resid_pre")], ref_grads[1], rtol=1e-4, atol=1e-5)
    # finite-difference check of the resid_mid gradient at one position, along the gradient's own
    # direction there (largest directional derivative, so fp32 noise cannot swamp it)
    g = grads[Site(1, "resid_mid")]
    d = torch.zeros_like(g)
    d[1, 4] = g[1, 4] / g[1, 4].norm() * 10
    eps = 1e-3
    with torch.no_grad():
        mask = torch.ones(ids.shape, dtype=torch.bool)
        up = metric_from_logits(lm.run(ids, interventions=[Intervention("resid_mid.1", mask, eps * d)], full_logits=True).logits)
        dn = metric_from_logits(lm.run(ids, interventions=[Intervention("resid_mid.1", mask, -eps * d)], full_logits=True).logits)
    fd = (up - dn) / (2 * eps)
    torch.testing.assert_close((grads[Site(1, "resid_mid")] * d).sum(), fd, rtol=2e-2, atol=1e-4)
    assert all(p.grad is None for p in lm.model.parameters())  # weights never collect gradients


@torch.no_grad()
def test_logprobs_only_at_requested_positions(tiny):
    lm, _ = tiny
    ids = _ids()
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    mask[0, 3] = mask[2, 8] = mask[2, 1] = True
    out = lm.run(ids, logprob_positions=mask, full_logits=True)
    ref = torch.log_softmax(out.logits, -1)[mask]
    assert out.logprobs.shape == (3, VOCAB)
    torch.testing.assert_close(out.logprobs, ref)


def test_stops_after_last_needed_layer():
    lm, _ = make_tiny("qwen2")
    calls = []
    h = lm.adapter.blocks(lm.model)[1].register_forward_pre_hook(lambda *a: calls.append(1))
    acts = lm.activations(_ids(), ["resid_post.0"])
    h.remove()
    assert calls == [] and set(acts) == {Site(0, "resid_post")}


def test_bad_input_is_a_clear_error():
    lm, _ = make_tiny("gemma3")
    ids = _ids()
    with pytest.raises(ValueError, match="past the last layer"):
        lm.run(ids, read=["resid_pre.5"])
    with pytest.raises(ValueError, match="start_resid"):
        lm.run(ids, start_layer=1, full_logits=True)
    with pytest.raises(ValueError, match="d_model"):
        lm.run(ids, start_layer=1, start_resid=torch.zeros(3, 9, 7), full_logits=True)
    with pytest.raises(ValueError, match="before start_layer"):
        lm.run(ids, start_layer=1, start_resid=torch.zeros(3, 9, lm.d_model), read=["resid_pre.0"])
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    with pytest.raises(ValueError, match="last dim"):
        lm.run(ids, interventions=[Intervention("resid_pre.0", mask, torch.zeros(5))], full_logits=True)
    with pytest.raises(ValueError, match="unknown site kind"):
        Site.parse("resid_foo.1")
    assert Site.parse("blocks.1.hook_resid_pre") == Site.parse("resid_pre[1]") == Site(1, "resid_pre")


@torch.no_grad()
def test_fn_intervention_reads_earlier_site_like_a_transcoder():
    """Replace mlp_out.1 with a function of resid_mid.1 computed in the same pass."""
    lm, _ = make_tiny("gemma3")
    ids = _ids()
    W = torch.randn(lm.d_model, lm.d_model) / lm.d_model**0.5
    mask = torch.ones(ids.shape, dtype=torch.bool)
    mask[:, 0] = False  # leave position 0 alone
    iv = Intervention("mlp_out.1", mask, mode="fn", fn=lambda x, value_of: value_of(Site(1, "resid_mid")) @ W)
    out = lm.run(ids, read=["resid_mid.1", "mlp_out.1", "resid_post.1"], interventions=[iv])
    a = out.acts
    expected = torch.where(mask[..., None], a[Site(1, "resid_mid")] @ W, a[Site(1, "mlp_out")])
    torch.testing.assert_close(a[Site(1, "mlp_out")][:, 1:], (a[Site(1, "resid_mid")] @ W)[:, 1:])
    torch.testing.assert_close(a[Site(1, "resid_post")], a[Site(1, "resid_mid")] + expected)
    # reference: the same replacement through a plain hook on the MLP output module
    clean = lm.run(ids, read=["mlp_out.1"]).acts[Site(1, "mlp_out")]
    assert not torch.allclose(clean[:, 1:], a[Site(1, "mlp_out")][:, 1:])
    torch.testing.assert_close(a[Site(1, "mlp_out")][:, 0], clean[:, 0])


@torch.no_grad()
def test_target_logprobs_are_chunked_gathers(tiny):
    lm, _ = tiny
    ids = _ids()
    mask = torch.ones(ids.shape, dtype=torch.bool)
    mask[:, -1] = False
    targets = ids[:, 1:].reshape(-1)
    out = lm.run(ids, logprob_positions=mask, targets=targets, full_logits=True)
    ref = torch.log_softmax(out.logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0].reshape(-1)
    torch.testing.assert_close(out.target_logprobs, ref)
    assert out.logprobs is None
    small = lm._target_logprobs(lm.model.get_output_embeddings().weight[:5] * 0 + 1, torch.arange(5), chunk=2)
    assert small.shape == (5,)
