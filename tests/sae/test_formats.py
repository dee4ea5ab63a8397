"""SAE formats: each loader against the format's own documented formula, computed here in numpy."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors.torch
import torch
from torch.testing import assert_close

from icl_circuits.sae import (
    JumpReLUSAE,
    SAEConfig,
    detect_format,
    gated_to_jumprelu,
    load_any,
    load_dictionary_learning,
    load_gemma_scope,
    load_sae,
    load_saelens,
    save_sae,
    save_saelens,
)

D_IN, D_SAE, D_OUT, K = 16, 48, 24, 6
TOL = dict(atol=1e-4, rtol=1e-4)


# -- random weights and independent references (numpy, float64) ----------------------------
def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def f32(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32)


def inputs(seed: int = 1, n: int = 64) -> np.ndarray:
    return f32(rng(seed).standard_normal((n, D_IN)))  # [n, d_in]


def weights(seed: int = 0, d_out: int = D_IN) -> dict[str, np.ndarray]:
    """Pre-activations of std ~1, thresholds in [0.1, 1]: many latents land between 0 and threshold."""
    r = rng(seed)
    return {
        "W_enc": f32(r.standard_normal((D_IN, D_SAE)) / 4),
        "b_enc": f32(r.standard_normal(D_SAE) * 0.2),
        "W_dec": f32(r.standard_normal((D_SAE, d_out)) / 4),
        "b_dec": f32(r.standard_normal(d_out) * 0.3),
        "threshold": f32(r.uniform(0.1, 1.0, D_SAE)),
    }


def jumprelu_ref(pre: np.ndarray, thr: np.ndarray | float) -> np.ndarray:
    return np.where(pre > thr, np.maximum(pre, 0), 0.0)


def topk_ref(f: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros_like(f)
    idx = np.argsort(-f, axis=-1)[:, :k]
    np.put_along_axis(out, idx, np.take_along_axis(f, idx, -1), -1)
    return out


def check(sae: JumpReLUSAE, x: np.ndarray, f_ref: np.ndarray, xhat_ref: np.ndarray) -> None:
    xt = torch.from_numpy(x)
    f = sae.encode(xt)
    assert_close(f, torch.from_numpy(f32(f_ref)), **TOL)
    assert_close(sae.decode(f), torch.from_numpy(f32(xhat_ref)), **TOL)
    assert_close(sae(xt), torch.from_numpy(f32(xhat_ref)), **TOL)


def assert_exercised(pre: np.ndarray, thr: np.ndarray | float) -> None:
    """A decent fraction of latents fire, and a decent fraction sit in (0, threshold)."""
    assert (pre > thr).mean() > 0.1
    assert ((pre > 0) & (pre <= thr)).mean() > 0.1


def write_saelens(path: Path, cfg: dict, tensors: dict[str, np.ndarray]) -> Path:
    path.mkdir(parents=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    as_torch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}
    safetensors.torch.save_file(as_torch, str(path / "sae_weights.safetensors"))
    return path


def write_dl(path: Path, trainer: dict, state: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"trainer": trainer}))
    torch.save(state, path / "ae.pt")
    return path


def saelens_cfg(arch: str, **more: object) -> dict:
    return {"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "hook_name": "blocks.3.hook_resid_pre",
            "hook_layer": 3, "model_name": "gemma-3-270m", **more}  # fmt: skip


def dl_trainer(cls: str, **more: object) -> dict:
    return {"dict_class": cls, "activation_dim": D_IN, "dict_size": D_SAE, "layer": 2,
            "lm_name": "EleutherAI/pythia-70m-deduped", "submodule_name": "resid_post_layer_2", **more}  # fmt: skip


def base_cfg(**more: object) -> SAEConfig:
    kw = dict(d_in=D_IN, d_sae=D_SAE, site="resid_pre.3", layer=3, model="gemma-3-270m")
    return SAEConfig(**{**kw, **more})  # type: ignore[arg-type]


def random_sae(seed: int = 0, **cfg: object) -> JumpReLUSAE:
    return JumpReLUSAE(base_cfg(**cfg), {k: torch.from_numpy(v) for k, v in weights(seed).items()})


# -- SAELens -------------------------------------------------------------------------------
def test_saelens_standard_subtracts_b_dec(tmp_path: Path) -> None:
    w, x = weights(), inputs()
    write_saelens(tmp_path / "s", saelens_cfg("standard", apply_b_dec_to_input=True),
                  {k: w[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")})  # fmt: skip
    sae = load_saelens(tmp_path / "s")
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    f = np.maximum(pre, 0)
    check(sae, x, f, f @ w["W_dec"] + w["b_dec"])
    assert (sae.cfg.site, sae.cfg.layer, sae.cfg.kind, sae.cfg.model) == ("resid_pre.3", 3, "resid", "gemma-3-270m")
    assert sae.cfg.source == "saelens" and not sae.W_enc.requires_grad


def test_saelens_jumprelu(tmp_path: Path) -> None:
    w, x = weights(), inputs()
    write_saelens(tmp_path / "s", saelens_cfg("jumprelu", apply_b_dec_to_input=False), w)
    pre = x @ w["W_enc"] + w["b_enc"]
    assert_exercised(pre, w["threshold"])
    f = jumprelu_ref(pre, w["threshold"])
    check(load_saelens(tmp_path / "s"), x, f, f @ w["W_dec"] + w["b_dec"])


def test_saelens_old_jumprelu_defaults_to_subtracting_b_dec(tmp_path: Path) -> None:
    """SAELens's default apply_b_dec_to_input is True (pre-6 and 6.x dataclass alike), jumprelu included."""
    w, x = weights(), inputs()
    write_saelens(tmp_path / "s", saelens_cfg("jumprelu"), w)  # no apply_b_dec_to_input at all
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    f = jumprelu_ref(pre, w["threshold"])
    check(load_saelens(tmp_path / "s"), x, f, f @ w["W_dec"] + w["b_dec"])


def test_saelens_pre6_hook_point(tmp_path: Path) -> None:
    """Pre-6 configs: hook_point / hook_point_layer / activation_fn_str, no version: read like SAELens does."""
    w, x = weights(), inputs()
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "hook_point": "blocks.4.hook_resid_post", "hook_point_layer": 4,
           "activation_fn_str": "relu", "model_name": "gpt2-small", "normalize_activations": False}  # fmt: skip
    write_saelens(tmp_path / "s", cfg, {k: w[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")})
    sae = load_saelens(tmp_path / "s")
    assert (sae.cfg.site, sae.cfg.layer, sae.cfg.model) == ("resid_post.4", 4, "gpt2-small")
    f = np.maximum((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 0)  # standard + pre-6 default: b_dec subtracted
    check(sae, x, f, f @ w["W_dec"] + w["b_dec"])


def test_saelens_topk_rescale_acts_by_decoder_norm(tmp_path: Path) -> None:
    """SAELens TopK with rescale: pre' = pre * |W_dec_i|, f = topk(relu(pre')), out = (f / |W_dec_i|) @ W_dec + b_dec."""
    w, x = weights(), inputs()
    w["W_dec"] = w["W_dec"] * f32(rng(5).uniform(0.1, 6.0, (D_SAE, 1)))  # very unequal norms: selection changes
    tensors = {k: w[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    write_saelens(tmp_path / "s", saelens_cfg("topk", k=K, rescale_acts_by_decoder_norm=True,
                                              apply_b_dec_to_input=False), tensors)  # fmt: skip
    n = np.linalg.norm(w["W_dec"], axis=-1)
    f = topk_ref(np.maximum((x @ w["W_enc"] + w["b_enc"]) * n, 0), K)
    sae = load_saelens(tmp_path / "s")
    check(sae, x, f, (f / n) @ w["W_dec"] + w["b_dec"])
    plain = topk_ref(np.maximum(x @ w["W_enc"] + w["b_enc"], 0), K)
    assert np.abs(plain - f).max() > 0.5  # ignoring the flag would be wrong, not just imprecise
    write_saelens(tmp_path / "g", saelens_cfg("gated", rescale_acts_by_decoder_norm=True), gated_weights())
    with pytest.raises(ValueError, match="rescale_acts_by_decoder_norm"):
        load_saelens(tmp_path / "g")


@pytest.mark.parametrize("norm", ["layer_norm", "constant_norm_rescale"])
def test_saelens_per_token_normalisation_is_refused(tmp_path: Path, norm: str) -> None:
    write_saelens(tmp_path / "s", saelens_cfg("jumprelu", normalize_activations=norm), weights())
    with pytest.raises(ValueError, match=f"normalize_activations='{norm}'.*not supported"):
        load_saelens(tmp_path / "s")


def test_forced_site_contradicting_the_file_is_refused(tmp_path: Path) -> None:
    w = weights()
    write_saelens(tmp_path / "s", saelens_cfg("jumprelu"), w)  # the file says resid_pre.3
    with pytest.raises(ValueError, match="contradicts the file's own hook.*force_site=True"):
        load_saelens(tmp_path / "s", site="resid_pre.7")
    assert load_saelens(tmp_path / "s", site="resid_pre.7", force_site=True).cfg.site == "resid_pre.7"
    assert load_saelens(tmp_path / "s", site="resid_post.2").cfg.site == "resid_post.2"  # the same tensor
    assert load_saelens(tmp_path / "s", site="resid_pre.3").cfg.site == "resid_pre.3"
    sae_dir = save_sae(random_sae(), tmp_path / "ours")
    with pytest.raises(ValueError, match="force_site"):
        load_sae(sae_dir, site="mlp_out.3")


def gated_weights(seed: int = 0, d_out: int = D_IN) -> dict[str, np.ndarray]:
    r = rng(seed)
    w = weights(seed, d_out)
    half = lambda: f32(r.standard_normal(D_SAE) * 0.5)  # noqa: E731
    gated = {"b_gate": half(), "b_mag": half(), "r_mag": half()}
    return {"W_enc": w["W_enc"], **gated, "W_dec": w["W_dec"], "b_dec": w["b_dec"]}


def gated_ref(g: dict[str, np.ndarray], x: np.ndarray, b_dec_on_input: bool) -> tuple[np.ndarray, ...]:
    """Rajamanoharan et al. 2024: (f, gate pre, mag pre)."""
    xp = x - g["b_dec"] if b_dec_on_input else x
    gate = xp @ g["W_enc"] + g["b_gate"]
    mag = xp @ (g["W_enc"] * np.exp(g["r_mag"])) + g["b_mag"]
    return (gate > 0) * np.maximum(mag, 0), gate, mag


def test_saelens_gated(tmp_path: Path) -> None:
    g, x = gated_weights(), inputs()
    write_saelens(tmp_path / "s", saelens_cfg("gated"), g)  # old config: apply_b_dec_to_input defaults to True
    f, gate, _ = gated_ref(g, x, b_dec_on_input=True)
    sae = load_saelens(tmp_path / "s")
    keep = torch.from_numpy(np.abs(gate) > 1e-4)  # ignore float ties exactly at the gate boundary
    got = sae.encode(torch.from_numpy(x))
    assert_close(got[keep], torch.from_numpy(f32(f))[keep], **TOL)
    assert_close(sae.decode(torch.from_numpy(f32(f))), torch.from_numpy(f32(f @ g["W_dec"] + g["b_dec"])), **TOL)


def test_saelens_topk_both_spellings(tmp_path: Path) -> None:
    w, x = weights(), inputs()
    std = {k: w[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    cfg_a = saelens_cfg("standard", activation_fn_kwargs={"k": K}, apply_b_dec_to_input=True)
    write_saelens(tmp_path / "a", cfg_a, std)
    write_saelens(tmp_path / "b", saelens_cfg("topk", k=K), std)
    f = topk_ref(np.maximum((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 0), K)
    assert ((f > 0).sum(-1) == K).all()
    for name in ("a", "b"):
        sae = load_saelens(tmp_path / name)
        assert sae.cfg.k == K
        check(sae, x, f, f @ w["W_dec"] + w["b_dec"])


@pytest.mark.parametrize("arch", ["transcoder", "jumprelu_transcoder"])
def test_saelens_transcoder(tmp_path: Path, arch: str) -> None:
    w, x = weights(d_out=D_OUT), inputs()
    tensors = w if arch == "jumprelu_transcoder" else {k: w[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    cfg = saelens_cfg(arch, d_out=D_OUT, hook_name="blocks.3.hook_resid_mid", hook_name_out="blocks.3.hook_mlp_out")
    write_saelens(tmp_path / "t", cfg, tensors)
    sae = load_saelens(tmp_path / "t")
    c = sae.cfg
    assert (c.kind, c.site, c.out_site, c.d_out) == ("transcoder", "resid_mid.3", "mlp_out.3", D_OUT)
    pre = x @ w["W_enc"] + w["b_enc"]
    f = jumprelu_ref(pre, w["threshold"]) if arch == "jumprelu_transcoder" else np.maximum(pre, 0)
    check(sae, x, f, f @ w["W_dec"] + w["b_dec"])


def test_saelens_unmapped_hook_needs_site(tmp_path: Path) -> None:
    w = weights(d_out=D_OUT)
    cfg = saelens_cfg("jumprelu_transcoder", d_out=D_OUT, hook_name="blocks.3.attn.hook_pattern")
    write_saelens(tmp_path / "t", cfg, w)
    with pytest.raises(ValueError, match="site="):
        load_saelens(tmp_path / "t", out_site="mlp_out.3")
    sae = load_saelens(tmp_path / "t", site="resid_mid.3", out_site="mlp_out.3")
    assert sae.cfg.layer == 3 and sae.cfg.extra["hook_name"] == "blocks.3.attn.hook_pattern"
    # TransformerLens names: ln2.hook_normalized is the MLP's normalised input; hook_mlp_in is resid_mid
    cfg = saelens_cfg("jumprelu_transcoder", d_out=D_OUT, hook_name="blocks.3.ln2.hook_normalized",
                      hook_name_out="blocks.3.hook_mlp_out", apply_b_dec_to_input=False)  # fmt: skip
    write_saelens(tmp_path / "n", cfg, w)
    assert (load_saelens(tmp_path / "n").cfg.site, load_saelens(tmp_path / "n").cfg.out_site) == ("mlp_in.3", "mlp_out.3")


def test_saelens_scaling_factor_and_unsupported_norm(tmp_path: Path) -> None:
    w, x = weights(), inputs()
    cfg_a = saelens_cfg("jumprelu", normalize_activations="expected_average_only_in", scaling_factor=2.0,
                        apply_b_dec_to_input=False)
    write_saelens(tmp_path / "a", cfg_a, w)
    sae = load_saelens(tmp_path / "a")
    assert sae.cfg.input_scale == sae.cfg.output_scale == 2.0
    f = jumprelu_ref((x * 2.0) @ w["W_enc"] + w["b_enc"], w["threshold"])
    check(sae, x, f, (f @ w["W_dec"] + w["b_dec"]) / 2.0)
    # no factor: SAELens applies nothing at run time either, so neither do we (with a warning)
    write_saelens(tmp_path / "b", saelens_cfg("jumprelu", normalize_activations="expected_average_only_in"), w)
    with pytest.warns(UserWarning, match="expected_average_only_in"):
        sae = load_saelens(tmp_path / "b")
    assert sae.cfg.extra["unapplied_normalization"] == "expected_average_only_in"


def test_saelens_bad_shape_names_file_and_key(tmp_path: Path) -> None:
    w = weights()
    w["W_enc"] = w["W_enc"][:, :40]
    write_saelens(tmp_path / "s", saelens_cfg("jumprelu"), w)
    with pytest.raises(ValueError, match=r"sae_weights\.safetensors.*'W_enc'.*\(16, 48\)"):
        load_saelens(tmp_path / "s")


def test_saelens_unknown_tensor_is_refused(tmp_path: Path) -> None:
    w = weights()
    w["W_skip"] = f32(np.zeros((D_IN, D_IN)))
    write_saelens(tmp_path / "s", saelens_cfg("jumprelu"), w)
    with pytest.raises(ValueError, match="W_skip"):
        load_saelens(tmp_path / "s")


@pytest.mark.parametrize("variant", ["scaled", "topk", "transcoder"])
def test_save_saelens_round_trip(tmp_path: Path, variant: str) -> None:
    if variant == "scaled":
        sae = random_sae(input_scale=2.0, output_scale=0.5)
    elif variant == "topk":
        sae = JumpReLUSAE(base_cfg(k=K), {k: torch.from_numpy(v) for k, v in weights().items() if k != "threshold"})
    else:
        cfg = base_cfg(kind="transcoder", site="resid_mid.3", out_site="mlp_out.3", d_out=D_OUT)
        sae = JumpReLUSAE(cfg, {k: torch.from_numpy(v) for k, v in weights(d_out=D_OUT).items()})
    back = load_saelens(save_saelens(sae, tmp_path / "out"))
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert cfg["apply_b_dec_to_input"] is False and cfg["architecture"] in ("jumprelu", "topk", "jumprelu_transcoder")
    x = torch.from_numpy(inputs())
    assert_close(back.encode(x), sae.encode(x), **TOL)
    assert_close(back(x), sae(x), **TOL)
    facts = lambda c: (c.site, c.out_site, c.kind, c.k, c.model)  # noqa: E731
    assert facts(back.cfg) == facts(sae.cfg)


# -- Gemma Scope ---------------------------------------------------------------------------
def test_gemma_scope(tmp_path: Path) -> None:
    w, x = weights(), inputs()
    np.savez(tmp_path / "params.npz", **w)
    sae = load_gemma_scope(tmp_path / "params.npz", site="resid_post.5", model="gemma-2-2b")
    pre = x @ w["W_enc"] + w["b_enc"]
    assert_exercised(pre, w["threshold"])
    f = jumprelu_ref(pre, w["threshold"])
    check(sae, x, f, f @ w["W_dec"] + w["b_dec"])
    assert (sae.cfg.site, sae.cfg.layer, sae.cfg.kind, sae.cfg.source) == ("resid_post.5", 5, "resid", "gemma_scope")
    with pytest.raises(ValueError, match="site="):
        load_gemma_scope(tmp_path)
    hub_like = tmp_path / "gemma-scope-2b-pt-res" / "layer_7" / "width_16k" / "average_l0_20"
    hub_like.mkdir(parents=True)
    np.savez(hub_like / "params.npz", **w)
    assert load_any(hub_like).cfg.site == "resid_pre.8"  # blocks.7.hook_resid_post = resid_pre.8
    assert load_any(hub_like, site="resid_post.7").cfg.site == "resid_post.7"  # the same tensor, e.g. for the last layer


# -- dictionary_learning -------------------------------------------------------------------
def test_dl_autoencoder(tmp_path: Path) -> None:
    w, x = weights(), inputs()
    enc, dec = w["W_enc"].T.copy(), w["W_dec"].T.copy()  # nn.Linear layouts [d_sae, d_in], [d_in, d_sae]
    state = {"encoder.weight": enc, "encoder.bias": w["b_enc"], "decoder.weight": dec, "bias": w["b_dec"]}
    write_dl(tmp_path / "ae", dl_trainer("AutoEncoder"), {k: torch.from_numpy(v) for k, v in state.items()})
    sae = load_dictionary_learning(tmp_path / "ae")
    f = np.maximum((x - w["b_dec"]) @ enc.T + w["b_enc"], 0)
    check(sae, x, f, f @ dec.T + w["b_dec"])
    assert (sae.cfg.site, sae.cfg.model) == ("resid_post.2", "EleutherAI/pythia-70m-deduped")


def test_dl_jumprelu(tmp_path: Path) -> None:
    w, x = weights(), inputs()
    write_dl(tmp_path / "ae", dl_trainer("JumpReluAutoEncoder"), {k: torch.from_numpy(v) for k, v in w.items()})
    pre = x @ w["W_enc"] + w["b_enc"]
    f = jumprelu_ref(pre, w["threshold"])
    check(load_dictionary_learning(tmp_path / "ae"), x, f, f @ w["W_dec"] + w["b_dec"])


def test_dl_gated(tmp_path: Path) -> None:
    g, x = gated_weights(), inputs()
    state = {"encoder.weight": g["W_enc"].T.copy(), "decoder.weight": g["W_dec"].T.copy(), "decoder_bias": g["b_dec"],
             "r_mag": g["r_mag"], "gate_bias": g["b_gate"], "mag_bias": g["b_mag"]}  # fmt: skip
    trainer = dl_trainer("GatedAutoEncoder", submodule_name="mlp_2")
    write_dl(tmp_path / "ae", trainer, {k: torch.from_numpy(v) for k, v in state.items()})
    sae = load_dictionary_learning(tmp_path / "ae")
    assert sae.cfg.site == "mlp_out.2"
    f, gate, _ = gated_ref(g, x, b_dec_on_input=True)
    keep = torch.from_numpy(np.abs(gate) > 1e-4)
    assert_close(sae.encode(torch.from_numpy(x))[keep], torch.from_numpy(f32(f))[keep], **TOL)
    assert_close(sae.decode(torch.from_numpy(f32(f))), torch.from_numpy(f32(f @ g["W_dec"] + g["b_dec"])), **TOL)


def test_dl_topk(tmp_path: Path) -> None:
    w, x = weights(), inputs()
    state = {"encoder.weight": torch.from_numpy(w["W_enc"].T.copy()), "encoder.bias": torch.from_numpy(w["b_enc"]),
             "decoder.weight": torch.from_numpy(w["W_dec"].T.copy()), "b_dec": torch.from_numpy(w["b_dec"]),
             "k": torch.tensor(K)}  # fmt: skip
    write_dl(tmp_path / "ae", dl_trainer("AutoEncoderTopK", k=K), state)
    sae = load_dictionary_learning(tmp_path / "ae")
    f = topk_ref(np.maximum((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 0), K)
    check(sae, x, f, f @ w["W_dec"] + w["b_dec"])
    assert sae.cfg.k == K


def test_dl_batch_topk_threshold(tmp_path: Path) -> None:
    w, x = weights(), inputs()
    state = {"encoder.weight": torch.from_numpy(w["W_enc"].T.copy()), "encoder.bias": torch.from_numpy(w["b_enc"]),
             "decoder.weight": torch.from_numpy(w["W_dec"].T.copy()), "b_dec": torch.from_numpy(w["b_dec"]),
             "k": torch.tensor(K), "threshold": torch.tensor(0.5)}  # fmt: skip
    write_dl(tmp_path / "ae", dl_trainer("BatchTopKSAE", k=K), state)
    post = np.maximum((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 0)
    f = post * (post > 0.5)
    check(load_dictionary_learning(tmp_path / "ae"), x, f, f @ w["W_dec"] + w["b_dec"])


def test_dl_bad_shape_and_class(tmp_path: Path) -> None:
    w = weights()
    state = {"encoder.weight": torch.from_numpy(w["W_enc"]), "encoder.bias": torch.from_numpy(w["b_enc"]),
             "decoder.weight": torch.from_numpy(w["W_dec"].T.copy()), "bias": torch.from_numpy(w["b_dec"])}  # fmt: skip
    write_dl(tmp_path / "a", dl_trainer("AutoEncoder"), state)  # encoder.weight not transposed
    with pytest.raises(ValueError, match=r"ae\.pt.*'encoder\.weight'"):
        load_dictionary_learning(tmp_path / "a")
    write_dl(tmp_path / "b", dl_trainer("CrossCoder"), state)
    with pytest.raises(ValueError, match="CrossCoder"):
        load_dictionary_learning(tmp_path / "b")


# -- our format, conversions, semantics ----------------------------------------------------
def test_own_format_round_trip_is_bitwise(tmp_path: Path) -> None:
    sae = random_sae(input_scale=1.5, output_scale=0.7, k=K, extra={"note": "x"})
    save_sae(sae, tmp_path / "sae")
    back = load_sae(tmp_path / "sae")
    assert back.cfg == sae.cfg
    for name, t in sae.tensors().items():
        assert torch.equal(getattr(back, name), t), name
    assert json.loads((tmp_path / "sae" / "config.json").read_text())["format"] == "icl-circuits-sae"
    save_sae(random_sae(seed=3), tmp_path / "sae")  # overwriting our own directory is fine
    assert not torch.equal(load_sae(tmp_path / "sae").W_enc, sae.W_enc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]  # no temp dirs left behind
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing"):
        save_sae(sae, tmp_path / "other")


def test_gated_to_jumprelu_matches_gated_formula() -> None:
    for seed, b_dec_on_input in [(0, True), (1, False), (2, True)]:
        g, x = gated_weights(seed), inputs(seed + 10, n=256)
        t = {k: torch.from_numpy(v) for k, v in g.items()}
        args = [t[k] for k in ("W_enc", "b_gate", "b_mag", "r_mag", "W_dec", "b_dec")]
        sae = gated_to_jumprelu(*args, base_cfg(), b_dec_on_input)
        thr = sae.threshold.detach().numpy()
        assert (thr < 0).mean() > 0.1 and (thr > 0).mean() > 0.1  # both signs of threshold exercised
        f, gate, mag = gated_ref(g, x, b_dec_on_input)
        assert ((gate <= 0) & (mag > 0)).mean() > 0.05  # magnitude positive but gated off
        assert ((gate > 0) & (mag <= 0)).mean() > 0.02  # gate open but relu zeroes it
        keep = torch.from_numpy(np.abs(gate) > 1e-4)
        got = sae.encode(torch.from_numpy(x))
        assert_close(got[keep], torch.from_numpy(f32(f))[keep], **TOL)
        assert (got[keep] > 0).eq(torch.from_numpy(f > 0)[keep]).all()


def test_scales_and_folded() -> None:
    w, x = weights(), inputs()
    sae = random_sae(input_scale=2.0, output_scale=4.0)
    f = jumprelu_ref((x * 2.0) @ w["W_enc"] + w["b_enc"], w["threshold"])
    check(sae, x, f, (f @ w["W_dec"] + w["b_dec"]) / 4.0)
    folded = sae.folded()
    assert folded.cfg.input_scale == folded.cfg.output_scale == 1.0
    xt = torch.from_numpy(x)
    assert_close(folded.encode(xt), sae.encode(xt), **TOL)
    assert_close(folded(xt), sae(xt), **TOL)
    assert sae.cfg.input_scale == 2.0  # the original is untouched


def test_input_check_and_compatibility() -> None:
    sae = random_sae()
    with pytest.raises(ValueError, match="d_in=16"):
        sae.encode(torch.zeros(3, D_IN + 1))
    lm = SimpleNamespace(name="gemma-3-270m", d_model=D_IN, n_layers=4)
    sae.check_compatible(lm)
    sae.check_compatible(SimpleNamespace(name="google/gemma-3-270m", d_model=D_IN, n_layers=4))
    with pytest.raises(ValueError, match="trained for model 'gemma-3-270m'"):
        sae.check_compatible(SimpleNamespace(name="llama", d_model=D_IN, n_layers=4))
    with pytest.raises(ValueError, match="d_model=32"):
        sae.check_compatible(SimpleNamespace(name="gemma-3-270m", d_model=32, n_layers=4))
    with pytest.raises(ValueError, match="layer 3"):
        sae.check_compatible(SimpleNamespace(name="gemma-3-270m", d_model=D_IN, n_layers=3))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="kind"):
        base_cfg(kind="mlp")
    with pytest.raises(ValueError, match="out_site"):
        base_cfg(kind="transcoder")
    with pytest.raises(ValueError, match="d_out"):
        base_cfg(d_out=D_OUT)
    with pytest.raises(ValueError, match="cannot parse site"):
        base_cfg(site="nonsense")
    with pytest.raises(ValueError, match="layer"):
        base_cfg(layer=4)
    assert base_cfg(site="blocks.3.hook_resid_pre").site == "resid_pre.3"


def test_load_any_dispatch_and_unknown(tmp_path: Path) -> None:
    w = weights()
    write_saelens(tmp_path / "lens", saelens_cfg("jumprelu"), w)
    save_sae(random_sae(), tmp_path / "ours")
    np.savez(tmp_path / "gs.npz", **w)
    state = {k: torch.from_numpy(v) for k, v in w.items()}
    write_dl(tmp_path / "dl", dl_trainer("JumpReluAutoEncoder"), state)
    assert detect_format(tmp_path / "lens") == "saelens" and load_any(tmp_path / "lens").cfg.source == "saelens"
    assert load_any(tmp_path / "ours").cfg.site == "resid_pre.3"
    assert load_any(tmp_path / "gs.npz", site="resid_pre.1").cfg.source == "gemma_scope"
    assert load_any(tmp_path / "dl").cfg.source == "dictionary_learning"
    assert load_any(tmp_path / "lens" / "cfg.json").cfg.source == "saelens"  # a file inside stands for its dir
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"(?s)no known SAE format.*weights\.bin.*SAELens"):
        load_any(tmp_path / "junk")
