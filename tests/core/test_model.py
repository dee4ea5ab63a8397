"""Hook sites, interventions and gradients on tiny random models of every family, vs. plain transformers."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from icl_circuits import LM, Intervention, Site
from icl_circuits.core.sites import SITE_KINDS

from tests.helpers import VOCAB, make_tiny

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


# -- attn_z and mlp_in: module-input sites -----------------------------------------------------
def _o_proj(lm, layer):
    return lm.adapter.o_proj_module(_block(lm, layer))


def _project(lm, layer, z):
    """o_proj / c_proj applied by hand: z [b, s, d_z] -> [b, s, d_model]."""
    proj = _o_proj(lm, layer)
    if isinstance(proj, torch.nn.Linear):
        return torch.nn.functional.linear(z, proj.weight, proj.bias)
    return z @ proj.weight + proj.bias  # GPT-2 Conv1D: weight [in, out]


@torch.no_grad()
def test_attn_z_and_mlp_in_against_transformers(tiny):
    lm, norm_name = tiny
    ids = _ids()
    # references from plain HF hooks: what o_proj gets and returns, what the MLP module gets
    o_in, o_out, mlp_got, norm_in = {}, {}, {}, {}
    handles = []
    for l in range(2):
        block = _block(lm, l)
        def keep(m, a, out, l=l):
            o_in[l], o_out[l] = a[0], out

        handles.append(_o_proj(lm, l).register_forward_hook(keep))
        handles.append(lm.adapter.mlp_in_module(block).register_forward_pre_hook(lambda m, a, l=l: mlp_got.__setitem__(l, a[0])))
        handles.append(getattr(block, norm_name).register_forward_pre_hook(lambda m, a, l=l: norm_in.__setitem__(l, a[0])))
    ref = lm.model(ids).logits
    for h in handles:
        h.remove()

    sites = [Site(l, k) for l in range(2) for k in ("attn_z", "attn_out", "resid_mid", "mlp_in")]
    out = lm.run(ids, read=sites, full_logits=True)
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-5)  # reading changes nothing
    n_heads = lm.model.config.num_attention_heads if hasattr(lm.model.config, "num_attention_heads") else lm.model.config.n_head
    for l in range(2):
        z = out.acts[Site(l, "attn_z")]
        assert z.shape[-1] == lm.site_width(f"attn_z.{l}") == lm.d_z
        assert lm.d_z % n_heads == 0
        torch.testing.assert_close(z, o_in[l])
        torch.testing.assert_close(_project(lm, l, z), o_out[l], rtol=1e-5, atol=1e-5)  # z @ W_o.T (+b) = attention output
        torch.testing.assert_close(out.acts[Site(l, "mlp_in")], mlp_got[l])
        # mlp_in is the MLP-input norm applied to resid_mid
        norm = getattr(_block(lm, l), norm_name)
        torch.testing.assert_close(out.acts[Site(l, "mlp_in")], norm(out.acts[Site(l, "resid_mid")]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(norm_in[l], out.acts[Site(l, "resid_mid")], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_attn_z_has_its_own_width_in_gemma():
    """Gemma's n_heads * head_dim need not equal d_model: shapes follow the site."""
    config = tf.GemmaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16)  # fmt: skip
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    lm = LM(tf.AutoModelForCausalLM.from_config(config).eval())
    ids = _ids()
    assert lm.site_width("attn_z.1") == 64 and lm.d_model == 32
    out = lm.run(ids, read=["attn_z.1", "attn_out.1"])
    z = out.acts[Site(1, "attn_z")]
    assert z.shape == (*ids.shape, 64)
    mask = torch.ones(ids.shape, dtype=torch.bool)
    # replace z by zeros: attention then adds exactly o_proj(0) = 0 (Gemma's o_proj has no bias)
    zeroed = lm.run(ids, read=["attn_out.1"], interventions=[Intervention("attn_z.1", mask, torch.zeros(64), "replace")])
    assert zeroed.acts[Site(1, "attn_out")].abs().max() == 0
    with pytest.raises(ValueError, match="width 64"):
        lm.run(ids, read=["attn_out.1"], interventions=[Intervention("attn_z.1", mask, torch.zeros(32))])


def test_attn_z_and_mlp_in_interventions_and_gradients(tiny):
    lm, _ = tiny
    ids = _ids()
    target = ids[:, 1:]

    def metric(o):
        return torch.log_softmax(o.logits[:, :-1], -1).gather(-1, target[..., None]).mean()

    # reference gradient at o_proj's input / the MLP's input, from leaves made in plain HF hooks
    leaves = {}

    def leaf(name):
        def hook(module, args):
            leaves[name] = args[0].detach().requires_grad_()
            return (leaves[name], *args[1:])
        return hook

    for name, module in (("z", _o_proj(lm, 1)), ("mlp_in", lm.adapter.mlp_in_module(_block(lm, 0)))):
        h = module.register_forward_pre_hook(leaf(name))  # one leaf per pass: a leaf cuts the paths through it
        metric(lm.model(ids)).backward()
        h.remove()
    _, acts, grads = lm.gradients(ids, metric, ["mlp_in.0", "attn_z.1"], full_logits=True)
    torch.testing.assert_close(acts[Site(1, "attn_z")], leaves["z"].detach())
    torch.testing.assert_close(grads[Site(1, "attn_z")], leaves["z"].grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[Site(0, "mlp_in")], leaves["mlp_in"].grad, rtol=1e-4, atol=1e-6)

    # 'fn' at mlp_out reading mlp_in (a transcoder splice) and an add at attn_z, both in one pass
    with torch.no_grad():
        W = torch.randn(lm.d_model, lm.d_model) / lm.d_model**0.5
        mask = torch.zeros(ids.shape, dtype=torch.bool)
        mask[:, 3:] = True
        v = torch.randn(lm.d_z)
        ivs = [Intervention("attn_z.0", mask, v),
               Intervention("mlp_out.0", mask, mode="fn", fn=lambda x, value_of: value_of(Site(0, "mlp_in")) @ W)]
        out = lm.run(ids, read=["attn_z.0", "mlp_in.0", "mlp_out.0"], interventions=ivs)
        clean = lm.run(ids, read=["attn_z.0"]).acts[Site(0, "attn_z")]
        a = out.acts
        torch.testing.assert_close(a[Site(0, "attn_z")], clean + mask[..., None] * v)
        torch.testing.assert_close(a[Site(0, "mlp_out")][:, 3:], (a[Site(0, "mlp_in")] @ W)[:, 3:])


@pytest.mark.bundled
@torch.no_grad()
def test_bundled_gemma3_attn_z_and_mlp_in(bundled):
    """Real Gemma 3 270M: attn_z is 4 heads x 256 = 1024 wide (d_model 640), the o_proj input; mlp_in
    is pre_feedforward_layernorm(resid_mid): the sites Gemma Scope 2 attention SAEs and transcoders read."""
    lm = bundled
    assert (lm.d_z, lm.d_model, lm.site_width("attn_z.12")) == (1024, 640, 1024)
    ids = torch.tensor([[2, 7614, 506, 5619, 236787, 107, 18993, 3921]])
    block = _block(lm, 12)
    got = {}
    h = block.self_attn.o_proj.register_forward_hook(lambda m, a, out: got.update(z=a[0], o=out) and None)
    out = lm.run(ids, read=["attn_z.12", "attn_out.12", "resid_mid.12", "mlp_in.12"])
    h.remove()
    a = out.acts
    assert a[Site(12, "attn_z")].shape == (1, 8, 1024)
    torch.testing.assert_close(a[Site(12, "attn_z")], got["z"])
    torch.testing.assert_close(block.post_attention_layernorm(got["o"]), a[Site(12, "attn_out")])
    torch.testing.assert_close(a[Site(12, "mlp_in")], block.pre_feedforward_layernorm(a[Site(12, "resid_mid")]))
