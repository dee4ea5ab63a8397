"""SAE evaluation and splicing on a tiny model with hand-built SAEs whose answers are known."""

from __future__ import annotations

import pytest
import torch

from icl_circuits.sae.dictionary import JumpReLUSAE, SAEConfig
from icl_circuits.sae.evaluation import evaluate_saes

from tests.helpers import VOCAB, make_tiny


def _batches(n=2, b=3, s=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(4, VOCAB, (b, s), generator=g)
        ids[:, 0] = 1  # BOS
        mask = torch.ones(b, s, dtype=torch.long)
        mask[1, 7:] = 0  # one padded row
        out.append((ids, mask))
    return out


def _exact_sae(d: int, site: str, name: str, kind: str = "resid") -> JumpReLUSAE:
    """relu(x) - relu(-x) = x: a 2d-latent SAE that reconstructs exactly."""
    eye = torch.eye(d)
    cfg = SAEConfig(d_in=d, d_sae=2 * d, kind=kind, model=name, site=site, layer=int(site.split(".")[1]))
    return JumpReLUSAE(cfg, {"W_enc": torch.cat([eye, -eye], 1), "W_dec": torch.cat([eye, -eye], 0)})


def _zero_sae(d: int, site: str, name: str, **kw) -> JumpReLUSAE:
    cfg = SAEConfig(d_in=d, d_sae=8, model=name, site=site, layer=int(site.split(".")[1]), **kw)
    return JumpReLUSAE(cfg, {"W_enc": torch.randn(d, 8)})  # decoder all zero


def _hf_ce(lm, batches, hook=None):
    """Mean next-token CE over real tokens from a plain HF forward (optionally with a module hook)."""
    total, n = 0.0, 0
    for ids, mask in batches:
        handle = hook() if hook else None
        with torch.no_grad():
            logits = lm.model(input_ids=ids, attention_mask=mask).logits
        if handle:
            handle.remove()
        lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        ok = (mask[:, :-1] * mask[:, 1:]).bool()
        total += -lp[ok].sum().item()
        n += int(ok.sum())
    return total / n


def test_exact_and_zero_saes_give_known_scores():
    lm, _ = make_tiny("gemma3")
    batches = _batches()
    exact = _exact_sae(lm.d_model, "resid_pre.1", lm.name)
    zero = _zero_sae(lm.d_model, "resid_pre.1", lm.name)
    r_exact, r_zero = evaluate_saes(lm, [exact, zero], batches, progress=False)
    assert r_exact.ce_clean == pytest.approx(_hf_ce(lm, batches), rel=1e-5)
    assert r_exact.ce_spliced == pytest.approx(r_exact.ce_clean, rel=1e-5)
    assert r_exact.ce_loss_recovered == pytest.approx(1.0, abs=1e-4)
    assert r_exact.fve == pytest.approx(1.0, abs=1e-5) and r_exact.mse < 1e-8
    assert r_exact.l0 == pytest.approx(lm.d_model, abs=0.5)  # one of each +/- pair is active
    assert r_zero.ce_spliced == pytest.approx(r_zero.ce_zero, rel=1e-6) and r_zero.ce_loss_recovered == pytest.approx(0.0, abs=1e-6)
    assert r_zero.dead_fraction < 1.0 and r_zero.n_tokens == 3 * 9 * 2 - 3 * 2  # BOS and padding excluded

    # zero ablation independently: a pre-hook zeroing block 1's input except at BOS
    def hook():
        def zero_input(m, args):
            h = args[0].clone()
            h[:, 1:] = 0
            return (h, *args[1:])

        return lm.adapter.blocks(lm.model)[1].register_forward_pre_hook(zero_input)

    assert r_zero.ce_zero == pytest.approx(_hf_ce(lm, batches, hook), rel=1e-4)


def test_transcoder_splice_replaces_mlp_out():
    lm, _ = make_tiny("llama")
    batches = _batches(n=1)
    tc = _zero_sae(lm.d_model, "resid_mid.0", lm.name, kind="transcoder", out_site="mlp_out.0")
    (r,) = evaluate_saes(lm, [tc], batches, progress=False)
    assert r.ce_spliced == pytest.approx(r.ce_zero, rel=1e-6)

    def hook():  # reference: zero the MLP's output (not at BOS) with a plain module hook
        def zero_out(m, args, out):
            out = out.clone()
            out[:, 1:] = 0
            return out

        return lm.adapter.blocks(lm.model)[0].mlp.register_forward_hook(zero_out)

    assert r.ce_zero == pytest.approx(_hf_ce(lm, batches, hook), rel=1e-4)
    assert r.ce_zero != r.ce_clean  # (the tiny MLP writes little, so the change is small)


def test_incompatible_sae_is_refused():
    lm, _ = make_tiny("gpt2")
    wrong = _exact_sae(lm.d_model + 2, "resid_pre.1", lm.name)
    with pytest.raises(ValueError, match="d_in"):
        evaluate_saes(lm, [wrong], _batches(n=1), progress=False)
    other = _exact_sae(lm.d_model, "resid_pre.1", "some-other-model")
    with pytest.raises(ValueError, match="trained for model"):
        evaluate_saes(lm, [other], _batches(n=1), progress=False)
