"""The paper's own SAEs (neverix/saex, e.g. nev/gemma-2b-saex-test): a folder in saex's layout, built
here, against a direct numpy re-implementation of saex's encoder (SAE.encode / SAE.forward)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from torch.testing import assert_close

from icl_circuits.sae import detect_format, load_any
from icl_circuits.sae.formats import load_saex

D_IN, EXPANSION = 16, 3
D_SAE = D_IN * EXPANSION
TOL = dict(atol=2e-5, rtol=2e-5)


def softplus(x: np.ndarray) -> np.ndarray:
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0)


def saex_tensors(seed: int = 0, d_out: int = D_IN) -> dict[str, np.ndarray]:
    """What saex's SAE.save writes: W_enc, b_enc, scaling_factor (= s), W_dec, b_dec, s_gate, b_gate, mean norms."""
    r = np.random.default_rng(seed)
    t = {
        "W_enc": r.standard_normal((D_IN, D_SAE)) / D_IN**0.5, "b_enc": r.standard_normal(D_SAE) * 0.3,
        "scaling_factor": r.uniform(0.5, 1.5, D_SAE), "W_dec": r.standard_normal((D_SAE, d_out)) / D_SAE**0.5,
        "b_dec": r.standard_normal(d_out) * 0.2, "s_gate": r.standard_normal(D_SAE) * 0.5,
        "b_gate": r.standard_normal(D_SAE) * 0.3, "mean_norm": np.array(7.5), "tgt_mean_norm": np.array(3.25),
    }  # fmt: skip
    return {k: np.asarray(v, dtype=np.float32) for k, v in t.items()}


def write_saex(folder: Path, t: dict[str, np.ndarray], d_out: int = D_IN) -> Path:
    folder.mkdir(parents=True)
    cfg = {"d_in": D_IN, "dtype": "float32", "expansion_factor": EXPANSION, "l1_coefficient": 3e-5,
           "train_batch_size": 1024, "dead_feature_window": 50, "use_ghost_grads": True, "d_sae": D_SAE}  # fmt: skip
    (folder / "cfg.json").write_text(json.dumps(cfg))
    safetensors.torch.save_file({k: torch.from_numpy(v) for k, v in t.items()}, str(folder / "sae_weights.safetensors"))
    return folder


def saex_reference(t: dict[str, np.ndarray], x: np.ndarray, gated: bool = True,
                   remove_decoder_bias: bool = False) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """saex SAE.encode / SAE.forward with norm_input='wes-mean-fixed', use_encoder_bias=True."""
    x = x.astype(np.float64)
    inputs = x * (x.shape[-1] ** 0.5 / t["mean_norm"])
    if remove_decoder_bias:
        inputs = inputs - t["b_dec"]
    pre_relu = inputs @ t["W_enc"] + t["b_enc"]
    post_relu = np.maximum(pre_relu, 0)
    if gated:
        hidden = (post_relu > 0) * np.maximum(
            (inputs @ t["W_enc"]) * softplus(t["s_gate"]) * t["scaling_factor"] + t["b_gate"], 0
        )
    else:
        hidden = post_relu * t["scaling_factor"]
    out = hidden @ t["W_dec"] + t["b_dec"]
    out_norm = t["tgt_mean_norm"] if "tgt_mean_norm" in t else t["mean_norm"]
    return hidden, out / (out.shape[-1] ** 0.5 / out_norm)


def inputs(n: int = 128) -> np.ndarray:
    return (np.random.default_rng(4).standard_normal((n, D_IN)) * 5).astype(np.float32)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("remove_decoder_bias", [False, True])
def test_saex_matches_saex_encoder(tmp_path: Path, gated: bool, remove_decoder_bias: bool) -> None:
    t = saex_tensors()
    folder = write_saex(tmp_path / "gemma-2b-saex-test" / "l12-residual-test-run-5-3.00E-05", t)
    x = inputs()
    f_ref, out_ref = saex_reference(t, x, gated, remove_decoder_bias)
    assert 0.1 < (f_ref > 0).mean() < 0.9
    if gated:  # the gate and the magnitude really disagree somewhere: the conversion must handle both
        pre = x * (D_IN**0.5 / t["mean_norm"]) @ t["W_enc"] + t["b_enc"]
        assert ((pre > 0) & (f_ref == 0)).mean() > 0.02
    sae = load_saex(folder, gated=gated, remove_decoder_bias=remove_decoder_bias)
    xt = torch.from_numpy(x)
    assert_close(sae.encode(xt), torch.from_numpy(f_ref).float(), **TOL)
    assert_close(sae(xt), torch.from_numpy(out_ref).float(), **TOL)
    c = sae.cfg
    assert (c.site, c.kind, c.model, c.source, c.d_sae) == ("resid_pre.12", "resid", "gemma-2b", "saex", D_SAE)
    assert c.input_scale == pytest.approx(D_IN**0.5 / 7.5) and c.output_scale == pytest.approx(D_IN**0.5 / 3.25)


def test_saex_layout_is_detected_and_sites_follow_the_folder_name(tmp_path: Path) -> None:
    t = saex_tensors()
    folder = write_saex(tmp_path / "nev" / "gemma-2b-saex-test" / "it-l6-attn_out-test-run-1-3.00E-05", t)
    assert detect_format(folder) == "saex"
    sae = load_any(folder)  # the SAELens file names, but saex's tensors: routed to load_saex
    assert (sae.cfg.site, sae.cfg.kind, sae.cfg.model, sae.cfg.source) == ("attn_out.6", "attn", "gemma-2b-it", "saex")
    f_ref, out_ref = saex_reference(t, inputs())
    assert_close(sae(torch.from_numpy(inputs())), torch.from_numpy(out_ref).float(), **TOL)

    tc = write_saex(tmp_path / "l3-transcoder-test-run-0-1e-5", saex_tensors(1, d_out=D_IN), d_out=D_IN)
    assert (load_any(tc).cfg.site, load_any(tc).cfg.out_site) == ("mlp_in.3", "mlp_out.3")

    older = {k: v for k, v in t.items() if k != "tgt_mean_norm"}  # older saex: one norm for input and output
    old = write_saex(tmp_path / "l12-test-run-5-3.00E-05", older)
    _, out_ref = saex_reference(older, inputs())
    sae = load_saex(old)
    assert sae.cfg.site == "resid_pre.12" and sae.cfg.output_scale == pytest.approx(D_IN**0.5 / 7.5)
    assert_close(sae(torch.from_numpy(inputs())), torch.from_numpy(out_ref).float(), **TOL)


def test_saex_errors(tmp_path: Path) -> None:
    t = saex_tensors()
    nowhere = write_saex(tmp_path / "weights", t)
    with pytest.raises(ValueError, match="site="):
        load_saex(nowhere)
    assert load_saex(nowhere, site="resid_pre.4").cfg.layer == 4
    bad = dict(t, s_gate=np.full(D_SAE, -200.0, np.float32))  # softplus underflows to 0: no exact conversion
    with pytest.raises(ValueError, match="softplus"):
        load_saex(write_saex(tmp_path / "l1-x", bad))
    with pytest.raises(ValueError, match="unsupported tensors"):
        load_saex(write_saex(tmp_path / "l2-x", dict(t, mystery=np.zeros(2, np.float32))))
