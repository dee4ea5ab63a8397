"""The one SAE splice (icl_circuits.interventions.splice) on tiny random models.

References are independent of LM.run's hook machinery: plain torch hooks on the transformers modules
(named by hand per family below), and the SAE's formulas written out by hand.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from icl_circuits.sae.dictionary import JumpReLUSAE, SAEConfig
from icl_circuits.core.sites import Site
from icl_circuits.interventions.splice import SAESplice, in_out_sites, splice

from tests.helpers import FAMILIES, VOCAB, make_tiny

TOL = dict(rtol=1e-5, atol=1e-5)
# family -> (decoder blocks, the module inside a block whose output is mlp_out and whose input is mlp_in)
BLOCKS = {
    "llama": (lambda m: m.model.layers, "mlp"),
    "gpt2": (lambda m: m.transformer.h, "mlp"),
    "qwen2": (lambda m: m.model.layers, "mlp"),
}


def _sae(d_in: int, site: str, seed: int = 0, d_sae: int = 24, out_site: str | None = None, skip: bool = False,
         ) -> JumpReLUSAE:  # fmt: skip
    """A random JumpReLU SAE (or transcoder with out_site) with non-trivial scales; some latents fire, some don't."""
    g = torch.Generator().manual_seed(seed)
    layer = Site.parse(site).layer
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, site=site, layer=layer, out_site=out_site, kind="transcoder" if out_site else "resid",
                    input_scale=0.7, output_scale=1.3)  # fmt: skip
    t = {"W_enc": torch.randn(d_in, d_sae, generator=g) / d_in**0.5 * 2, "b_enc": torch.randn(d_sae, generator=g) * 0.2,
         "W_dec": torch.randn(d_sae, d_in, generator=g) * 0.5, "b_dec": torch.randn(d_in, generator=g) * 0.1,
         "threshold": torch.full((d_sae,), 0.05)}  # fmt: skip
    if skip:
        t["W_skip"] = torch.randn(d_in, d_in, generator=g) * 0.3
    return JumpReLUSAE(cfg, t)


def _ids(b: int = 2, s: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [b, s], positions [b, s]: every token but the first)."""
    ids = torch.randint(4, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 1
    pos = torch.ones(b, s, dtype=torch.bool)
    pos[:, 0] = False
    return ids, pos


def _logits(lm, ids: torch.Tensor, hooks: list) -> torch.Tensor:  # noqa: ANN001
    """[b, s, vocab] from the plain transformers forward with the given (module, kind, hook) registered."""
    handles = []
    for module, kind, fn in hooks:
        if kind == "pre":
            handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
        else:
            handles.append(module.register_forward_hook(fn))
    try:
        with torch.no_grad():
            return lm.model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()


def _replace_block_input(pos: torch.Tensor, new) -> object:  # noqa: ANN001
    """A forward pre-hook on a decoder block: hidden_states -> where(pos, new(hidden_states), hidden_states)."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        x = args[0] if args else kwargs["hidden_states"]  # [b, s, d]
        x = torch.where(pos[..., None], new(x), x)
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    return hook


def _spliced_logits(lm, ids: torch.Tensor, *splices: SAESplice) -> torch.Tensor:  # noqa: ANN001
    with torch.no_grad():
        return lm.run(ids, interventions=list(splices), full_logits=True).logits


# (a) ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_error_kept_and_no_edits_reproduces_the_model(family):
    lm, _ = make_tiny(family)
    ids, pos = _ids()
    d, dz = lm.d_model, lm.d_z
    saes = [_sae(d, "resid_pre.1", 0), _sae(d, "attn_out.0", 1), _sae(dz, "attn_z.1", 2),
            _sae(d, "mlp_in.0", 3, out_site="mlp_out.0", skip=True), _sae(d, "resid_mid.1", 4, out_site="mlp_out.1")]  # fmt: skip
    everywhere = torch.ones_like(pos)
    got = _spliced_logits(lm, ids, *(splice(s, everywhere, keep_error=True) for s in saes))
    want = _logits(lm, ids, [])
    torch.testing.assert_close(got, want, **TOL)
    # not vacuous: the same SAEs without their error change the logits
    assert not torch.allclose(_spliced_logits(lm, ids, *(splice(s, everywhere) for s in saes)), want, atol=1e-3)


# (b) ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_without_error_equals_a_manual_reconstruction_hook(family):
    lm, _ = make_tiny(family)
    ids, pos = _ids()
    blocks, mlp = BLOCKS[family]
    resid, out = _sae(lm.d_model, "resid_pre.1", 0), _sae(lm.d_model, "mlp_out.0", 1)

    def mlp_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return torch.where(pos[..., None], out.decode(out.encode(output)), output)

    want = _logits(lm, ids, [(blocks(lm.model)[1], "pre", _replace_block_input(pos, lambda x: resid.decode(resid.encode(x)))),
                             (getattr(blocks(lm.model)[0], mlp), "post", mlp_hook)])  # fmt: skip
    got = _spliced_logits(lm, ids, splice(resid, pos), splice(out, pos))
    torch.testing.assert_close(got, want, **TOL)
    assert not torch.allclose(got, _logits(lm, ids, []), atol=1e-3)


# (c) ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gemma3", "gpt2"])
def test_ablating_one_latent_subtracts_its_activation_times_its_decoder_row(family):
    lm, _ = make_tiny(family)
    ids, pos = _ids()
    sae = _sae(lm.d_model, "resid_pre.1", 0)
    with torch.no_grad():
        x = lm.run(ids, read=["resid_pre.1"]).acts[Site(1, "resid_pre")]  # [b, s, d]
        i = int(sae.encode(x)[pos].sum(0).argmax())  # the most active latent: the ablation does something
        f_i = sae.encode(x)[..., i : i + 1]  # [b, s, 1]
    blocks = lm.model.transformer.h if family == "gpt2" else lm.model.model.layers
    want = _logits(lm, ids, [(blocks[1], "pre", _replace_block_input(pos, lambda h: h - f_i * sae.W_dec[i] / 1.3))])
    assert not torch.allclose(want, _logits(lm, ids, []), atol=1e-3)
    got_ids = _spliced_logits(lm, ids, splice(sae, pos, keep_error=True, ablate=[i]))
    torch.testing.assert_close(got_ids, want, **TOL)
    # the same as a per-position mask [b, s, d_sae], with the splice active everywhere
    mask = torch.zeros(*ids.shape, sae.d_sae, dtype=torch.bool)
    mask[..., i] = pos
    got_mask = _spliced_logits(lm, ids, splice(sae, torch.ones_like(pos), keep_error=True, ablate=mask))
    torch.testing.assert_close(got_mask, want, **TOL)


# (d) ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("reads", ["mlp_in", "resid_mid"])
def test_transcoder_splice_matches_a_manual_hook(family, reads):
    lm, _ = make_tiny(family)
    ids, pos = _ids()
    blocks, mlp = BLOCKS[family]
    block = blocks(lm.model)[1]
    tc = _sae(lm.d_model, f"{reads}.1", 5, out_site="mlp_out.1", skip=True)
    assert in_out_sites(tc) == (Site(1, reads), Site(1, "mlp_out"))
    seen: dict[str, torch.Tensor] = {}

    def keep_norm_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen["resid_mid"] = args[0] if args else next(iter(kwargs.values()))  # the MLP norm's input is resid_mid

    def mlp_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0] if reads == "mlp_in" else seen["resid_mid"]  # [b, s, d]
        return torch.where(pos[..., None], tc.decode(tc.encode(x)) + x @ tc.W_skip, output)

    norm = getattr(block, FAMILIES[family][1])
    want = _logits(lm, ids, [(norm, "pre", keep_norm_input), (getattr(block, mlp), "post", mlp_hook)])
    torch.testing.assert_close(_spliced_logits(lm, ids, splice(tc, pos)), want, **TOL)

    # error kept, one latent zeroed at some positions and the error zeroed at others (the spliced model of methods/circuits/spliced.py)
    a_f = torch.zeros(*ids.shape, tc.d_sae, dtype=torch.bool)
    a_f[0, 3:, 2] = a_f[1, :5, 7] = True
    a_e = torch.zeros(*ids.shape, 1, dtype=torch.bool)
    a_e[:, 4:6] = True

    def mlp_ablated(module: nn.Module, args: tuple, y: torch.Tensor) -> torch.Tensor:
        x = args[0] if reads == "mlp_in" else seen["resid_mid"]
        f = tc.encode(x)
        err = y - (tc.decode(f) + x @ tc.W_skip)
        return y - (f * a_f) @ tc.W_dec / 1.3 - a_e * err

    want = _logits(lm, ids, [(norm, "pre", keep_norm_input), (getattr(block, mlp), "post", mlp_ablated)])
    got = _spliced_logits(lm, ids, splice(tc, torch.ones_like(pos), keep_error=True, ablate=a_f, ablate_error=a_e))
    torch.testing.assert_close(got, want, **TOL)
    assert not torch.allclose(got, _logits(lm, ids, []), atol=1e-4)


# gradients ------------------------------------------------------------------------------------------
def test_leaves_give_latent_and_error_gradients_and_stop_cuts_the_graph():
    lm, _ = make_tiny("gemma3")
    ids, pos = _ids()
    sae = _sae(lm.d_model, "resid_pre.1", 0)
    everywhere = torch.ones_like(pos)
    score = torch.zeros_like(pos)
    score[:, -3:] = True
    targets = ids[score]  # [n] any tokens will do
    # reference: d m / d resid_pre.1 from a zero probe added there
    metric = lambda o: o.target_logprobs.sum()  # noqa: E731
    value, acts, grads = lm.gradients(ids, metric, ["resid_pre.1"], logprob_positions=score, targets=targets)
    g, y = grads[Site(1, "resid_pre")], acts[Site(1, "resid_pre")]  # [b, s, d]
    sp = splice(sae, everywhere, keep_error=True, grad="leaves")
    out = lm.run(ids, interventions=[sp], logprob_positions=score, targets=targets)
    out.target_logprobs.sum().backward()
    assert float(out.target_logprobs.sum().detach()) == pytest.approx(float(value), abs=1e-6)  # zero leaves: the model as it was
    torch.testing.assert_close(sp.latent_leaf.grad, g @ sae.W_dec.detach().T / 1.3, **TOL)  # d m / d f
    torch.testing.assert_close(sp.error_leaf.grad, g, **TOL)  # d m / d error
    torch.testing.assert_close(sp.latents, sae.encode(y).detach(), **TOL)
    torch.testing.assert_close(sp.error, (y - sae(y)).detach(), **TOL)
    assert not sp.latents.requires_grad and not sp.error.requires_grad
    # stop: everything from layer 0 reaches the logits through resid_pre.1, so nothing flows back to resid_pre.0
    for grad in ("through", "stop"):
        sp = splice(sae, everywhere, keep_error=True, grad=grad)
        out = lm.run(ids, probe=["resid_pre.0"], interventions=[sp], logprob_positions=score, targets=targets)
        out.target_logprobs.sum().backward(retain_graph=True)
        reached = out.grad("resid_pre.0").abs().max()
        assert reached == 0 if grad == "stop" else reached > 0, grad
    assert sp.error.requires_grad  # the recorded values keep their graph (edges differentiate them)
    (gx,) = torch.autograd.grad(sp.error.sum(), [out.probes[Site(0, "resid_pre")]])
    assert gx.abs().max() > 0


def test_bad_options_are_clear_errors():
    lm, _ = make_tiny("gemma3")
    sae = _sae(lm.d_model, "resid_pre.1", 0)
    pos = torch.ones(2, 9, dtype=torch.bool)
    with pytest.raises(ValueError, match="keep_error=True"):
        splice(sae, pos, ablate_error=torch.ones(2, 9, 1))
    with pytest.raises(ValueError, match="grad must be"):
        splice(sae, pos, grad="none")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="latent ids"):
        splice(sae, pos, keep_error=True, ablate=[sae.d_sae])
    with pytest.raises(ValueError, match="d_sae=24"):
        splice(sae, pos, keep_error=True, ablate=torch.ones(2, 9, 5, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="no pass"):
        splice(sae, pos).error


def test_a_used_splice_is_freed_without_the_garbage_collector() -> None:
    """A splice that ran a pass holds that pass's latents; it must go as soon as the caller drops it.
    (Its fn was once a bound method: a reference cycle that kept ~3 GB per call alive at layers 10-17
    until the collector ran, and the process was killed for memory.)"""
    import gc
    import weakref

    lm, _ = make_tiny("gemma3")
    ids, _ = _ids()
    sp = splice(_sae(lm.d_model, "resid_pre.1"), torch.ones_like(ids, dtype=torch.bool), keep_error=True, ablate=[0, 3])
    lm.run(ids, interventions=[sp], read=["resid_pre.1"])
    assert sp.latents is not None  # the pass reached it and kept its latents
    gone, latents = weakref.ref(sp), weakref.ref(sp.latents)
    gc.disable()
    try:
        del sp
        assert gone() is None and latents() is None
    finally:
        gc.enable()
