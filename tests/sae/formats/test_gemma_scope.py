"""Gemma Scope 2: a fake folder tree (every site, an affine skip transcoder included) against the
documented formula, the Hub short form and SAELens release names resolved offline, and splicing
Gemma Scope 2 style SAEs (attn_z, mlp_in -> mlp_out with W_skip) into a tiny Gemma 3."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors.torch
import torch
from torch.testing import assert_close

from icl_circuits import Site
from icl_circuits.sae import JumpReLUSAE, SAEConfig, detect_format, formats, load_any, load_sae, save_sae
from icl_circuits.sae.evaluation import in_out_sites, splice, zero_ablate
from icl_circuits.sae.formats import hub_path, load_gemma_scope_2, load_saelens_release
from icl_circuits.sae.presets import PRESETS

D, DZ, D_SAE, L = 16, 24, 48, 5  # d_model, heads x head_dim, latents, layer
TOL = dict(atol=1e-5, rtol=1e-5)
REPO = "gemma-scope-2-270m-pt"


def gs2_tensors(d_in: int, d_out: int, seed: int, affine: bool = False) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    t = {
        "w_enc": r.standard_normal((d_in, D_SAE)) / d_in**0.5, "b_enc": r.standard_normal(D_SAE) * 0.2,
        "w_dec": r.standard_normal((D_SAE, d_out)) / D_SAE**0.5, "b_dec": r.standard_normal(d_out) * 0.3,
        "threshold": r.uniform(0.1, 0.8, D_SAE),
    }  # fmt: skip
    if affine:
        t["affine_skip_connection"] = r.standard_normal((d_in, d_out)) * 0.2
    return {k: v.astype(np.float32) for k, v in t.items()}


def write_gs2(folder: Path, t: dict[str, np.ndarray], config: dict | None) -> Path:
    folder.mkdir(parents=True)
    safetensors.torch.save_file({k: torch.from_numpy(v) for k, v in t.items()}, str(folder / "params.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def gs2_config(hook_in: str, hook_out: str | None = None, affine: bool | None = None) -> dict:
    cfg = {"architecture": "jump_relu", "model_name": "gemma-v3-270m-pt", "hf_hook_point_in": hook_in}
    if hook_out is not None:
        cfg["hf_hook_point_out"] = hook_out
    if affine is not None:
        cfg["affine_connection"] = affine
    return cfg


# site folder -> (d_in, d_out, hf hook in, hf hook out, our site, our out site, affine)
CASES = {
    "resid_post": (D, D, f"model.layers.{L}.output", None, f"resid_pre.{L + 1}", None, False),
    "attn_out": (DZ, DZ, f"model.layers.{L}.self_attn.o_proj.input", None, f"attn_z.{L}", None, False),
    "mlp_out": (D, D, f"model.layers.{L}.post_feedforward_layernorm.output", None, f"mlp_out.{L}", None, False),
    "transcoder": (D, D, f"model.layers.{L}.pre_feedforward_layernorm.output",
                   f"model.layers.{L}.post_feedforward_layernorm.output", f"mlp_in.{L}", f"mlp_out.{L}", False),
    "transcoder_affine": (D, D, f"model.layers.{L}.pre_feedforward_layernorm.output",
                          f"model.layers.{L}.post_feedforward_layernorm.output", f"mlp_in.{L}", f"mlp_out.{L}", True),
}  # fmt: skip


def folder_of(case: str) -> str:
    kind = "transcoder" if case.startswith("transcoder") else case
    return f"{kind}/layer_{L}_width_16k_l0_small" + ("_affine" if case.endswith("affine") else "")


@pytest.fixture
def fake_hub(tmp_path: Path) -> Path:
    """root/google/gemma-scope-2-270m-pt/<site>/layer_5_width_16k_l0_small[_affine]/{params.safetensors, config.json}."""
    root = tmp_path / "hub"
    for i, (case, (d_in, d_out, h_in, h_out, *_rest, affine)) in enumerate(CASES.items()):
        cfg = gs2_config(h_in, h_out, affine if case.startswith("transcoder") else None)
        write_gs2(root / "google" / REPO / folder_of(case), gs2_tensors(d_in, d_out, i, affine), cfg)
    return root


def documented(t: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Gemma Scope 2 formula: f = relu(pre) * (pre > threshold), no b_dec subtracted, out += x @ A."""
    pre = x.astype(np.float64) @ t["w_enc"] + t["b_enc"]
    f = np.where(pre > t["threshold"], np.maximum(pre, 0), 0.0)
    out = f @ t["w_dec"] + t["b_dec"]
    if "affine_skip_connection" in t:
        out = out + x @ t["affine_skip_connection"]
    return f, out


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_site_matches_the_documented_formula(fake_hub: Path, case: str) -> None:
    d_in, d_out, _, _, site, out_site, affine = CASES[case]
    folder = fake_hub / "google" / REPO / folder_of(case)
    assert detect_format(folder) == "gemma_scope_2"
    sae = load_any(folder)
    c = sae.cfg
    assert (c.site, c.out_site, c.d_in, c.d_out, c.source, c.model) == (site, out_site, d_in, d_out, "gemma_scope_2",
                                                                        "gemma-3-270m")  # fmt: skip
    assert c.kind == {"resid_post": "resid", "attn_out": "attn", "mlp_out": "resid"}.get(case, "transcoder")
    assert sae.has_skip == affine
    t = {k: v.numpy() for k, v in safetensors.torch.load_file(str(folder / "params.safetensors")).items()}
    x = (np.random.default_rng(9).standard_normal((64, d_in)) * 1.5).astype(np.float32)
    f_ref, out_ref = documented(t, x)
    pre = x @ t["w_enc"] + t["b_enc"]
    assert ((pre > 0) & (pre <= t["threshold"])).mean() > 0.05  # the threshold really is exercised
    xt = torch.from_numpy(x)
    f = sae.encode(xt)
    assert_close(f, torch.from_numpy(f_ref).float(), **TOL)
    assert_close(sae(xt), torch.from_numpy(out_ref).float(), **TOL)
    if affine:  # decode(f) alone leaves the skip path out; decode(f, x) adds it
        assert_close(sae.decode(f, xt), sae(xt))
        assert (sae.decode(f) - sae(xt)).abs().max() > 0.1


def test_folder_name_without_config_json(tmp_path: Path) -> None:
    t = gs2_tensors(DZ, DZ, 0)
    folder = write_gs2(tmp_path / REPO / f"attn_out_all/layer_{L}_width_65k_l0_big", t, None)
    assert load_gemma_scope_2(folder).cfg.site == f"attn_z.{L}"
    tc = write_gs2(tmp_path / REPO / "transcoder/layer_3_width_16k_l0_medium_affine", gs2_tensors(D, D, 1, True), None)
    sae = load_gemma_scope_2(tc)
    assert (sae.cfg.site, sae.cfg.out_site, sae.has_skip) == ("mlp_in.3", "mlp_out.3", True)
    bare = write_gs2(tmp_path / "somewhere", t, None)
    with pytest.raises(ValueError, match="site="):
        load_gemma_scope_2(bare)
    assert load_gemma_scope_2(bare, site="attn_z.2").cfg.layer == 2


def test_bad_files_are_clear_errors(tmp_path: Path) -> None:
    t = gs2_tensors(D, D, 0)
    folder = write_gs2(tmp_path / "a", {**t, "extra": np.zeros(3, np.float32)}, gs2_config("model.layers.1.output"))
    with pytest.raises(ValueError, match="unsupported tensors.*extra"):
        load_gemma_scope_2(folder)
    folder = write_gs2(tmp_path / "b", t, gs2_config("model.layers.1.pre_feedforward_layernorm.output",
                                                      "model.layers.1.post_feedforward_layernorm.output", affine=True))
    with pytest.raises(ValueError, match="affine_skip_connection"):
        load_gemma_scope_2(folder)
    folder = write_gs2(tmp_path / "c", t, gs2_config("model.layers.1.output"))
    with pytest.raises(ValueError, match="force_site"):
        load_gemma_scope_2(folder, site="mlp_out.1")
    assert load_gemma_scope_2(folder, site="resid_post.1").cfg.site == "resid_post.1"  # the same tensor
    w_clt = write_gs2(tmp_path / "clt/layer_2_width_16k", t, None)
    with pytest.raises(ValueError, match="cross-layer"):
        load_gemma_scope_2(w_clt)


def test_skip_transcoder_survives_our_format(fake_hub: Path, tmp_path: Path) -> None:
    sae = load_any(fake_hub / "google" / REPO / folder_of("transcoder_affine"))
    back = load_sae(save_sae(sae, tmp_path / "ours"))
    assert back.has_skip
    x = torch.randn(8, D)
    assert_close(back(x), sae(x))
    assert torch.equal(back.W_skip, sae.W_skip)


# -- the Hub, offline ---------------------------------------------------------------------------
@pytest.fixture
def offline_hub(fake_hub: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, str | None]]:
    """formats.hub._hf_download reads the fake hub folder; every call is recorded; the network is never touched."""
    calls: list[tuple[str, str, str | None]] = []

    def fake_download(repo: str, filename: str, subfolder: str | None) -> str:
        calls.append((repo, filename, subfolder))
        path = fake_hub / repo / (subfolder or "") / filename
        if not path.is_file():
            raise FileNotFoundError(f"fake hub has no {repo}/{subfolder}/{filename}")
        return str(path)

    monkeypatch.setattr(formats.hub, "_hf_download", fake_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return calls


def test_hub_short_form_resolves(offline_hub: list, monkeypatch: pytest.MonkeyPatch) -> None:
    short = f"{REPO}/resid_post/layer_{L}_width_16k_l0_small"
    assert hub_path(short) == (f"google/{REPO}", f"resid_post/layer_{L}_width_16k_l0_small")
    assert hub_path(f"google/{short}") == hub_path(short)
    monkeypatch.chdir(Path(__file__).parent)  # the short form must not exist as a local path
    sae = load_any(short)
    assert sae.cfg.site == f"resid_pre.{L + 1}"
    assert (f"google/{REPO}", "params.safetensors", f"resid_post/layer_{L}_width_16k_l0_small") in offline_hub
    tc = load_any(f"google/{REPO}/{folder_of('transcoder_affine')}")
    assert tc.has_skip and tc.cfg.out_site == f"mlp_out.{L}"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        load_any(short)


# -- SAELens release names, offline --------------------------------------------------------------
def test_saelens_release_needs_sae_lens(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_sae_lens(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("sae_lens"):
            raise ImportError("No module named 'sae_lens'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sae_lens)
    with pytest.raises(ModuleNotFoundError, match="pip install sae-lens"):
        load_any("saelens:gemma-scope-2-270m-pt-res/layer_12_width_16k_l0_medium")


@pytest.mark.parametrize("command", [["clean", "--tasks", "antonyms"], ["sae", "eval", "--corpus", "generated:8"]])
def test_cli_saelens_name_without_sae_lens_is_one_line(command: list[str], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """No sae-lens: `--sae saelens:...` is one `error:` line and rc 2, before the model loads (no traceback)."""
    from icl_circuits.cli import main

    monkeypatch.setitem(sys.modules, "sae_lens", None)  # absent whether or not it is installed: import raises
    spec = "saelens:gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82"
    # a missing --model: had the model load come first, its error (not sae-lens's) would be the line
    assert main([*command, "--model", str(tmp_path / "no_model"), "--sae", spec, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "pip install sae-lens" in err and spec in err


def test_saelens_release_resolves_through_the_registry(offline_hub: list, monkeypatch: pytest.MonkeyPatch) -> None:
    lookup = SimpleNamespace(
        repo_id=f"google/{REPO}", model="google/gemma-3-270m", conversion_func="gemma_3",
        saes_map={f"layer_{L}_width_16k_l0_small": folder_of("attn_out")}, norm_scaling_factor={}, config_overrides=None,
    )  # fmt: skip
    monkeypatch.setattr(formats.hub, "_saelens_directory", lambda: {"gemma-scope-2-270m-pt-att": lookup})
    sae = load_any(f"saelens:gemma-scope-2-270m-pt-att/layer_{L}_width_16k_l0_small")
    assert sae.cfg.site == f"attn_z.{L}" and sae.cfg.model == "google/gemma-3-270m"
    with pytest.raises(ValueError, match="has no SAE"):
        load_saelens_release("gemma-scope-2-270m-pt-att/layer_99")
    with pytest.raises(ValueError, match="no release"):
        load_saelens_release("nope/x")
    lookup.conversion_func = "llama_scope"
    with pytest.raises(ValueError, match="llama_scope"):
        load_saelens_release(f"gemma-scope-2-270m-pt-att/layer_{L}_width_16k_l0_small")


# -- Gemma Scope 2 style SAEs spliced into a tiny Gemma 3 -----------------------------------------
@torch.no_grad()
def test_splice_attn_z_sae_and_skip_transcoder_into_gemma3() -> None:
    import transformers as tf

    from icl_circuits import LM

    # heads x head_dim (4 x 12 = 48) != d_model (32), as in real Gemma 3 (270m: 4 x 256 = 1024 vs 640)
    config = tf.Gemma3TextConfig(vocab_size=160, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=1, head_dim=12, query_pre_attn_scalar=12,
                                 sliding_window=4, layer_types=["sliding_attention", "full_attention"])  # fmt: skip
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    lm = LM(tf.AutoModelForCausalLM.from_config(config).eval(), None, name="tiny-gemma3")
    assert lm.d_z == 48 and lm.d_model == 32
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    dz, d = lm.d_z, lm.d_model

    def tensors(d_in: int, d_out: int, skip: bool) -> dict[str, torch.Tensor]:
        t = {"W_enc": torch.randn(d_in, 40, generator=g) / d_in**0.5, "b_enc": torch.randn(40, generator=g) * 0.1,
             "W_dec": torch.randn(40, d_out, generator=g) * 0.2, "b_dec": torch.randn(d_out, generator=g) * 0.1,
             "threshold": torch.rand(40, generator=g) * 0.3}  # fmt: skip
        if skip:
            t["W_skip"] = torch.randn(d_in, d_out, generator=g) * 0.3
        return t

    attn = JumpReLUSAE(SAEConfig(d_in=dz, d_sae=40, site="attn_z.1", layer=1, kind="attn"), tensors(dz, dz, False))
    tc = JumpReLUSAE(SAEConfig(d_in=d, d_sae=40, d_out=d, site="mlp_in.1", out_site="mlp_out.1", layer=1,
                               kind="transcoder"), tensors(d, d, True))  # fmt: skip
    for sae in (attn, tc):
        sae.check_compatible(lm)
    bad = JumpReLUSAE(SAEConfig(d_in=d, d_sae=40, site="attn_z.1", layer=1), tensors(d, d, False))
    with pytest.raises(ValueError, match="n_heads\\*head_dim=48"):
        bad.check_compatible(lm)
    assert in_out_sites(tc) == (Site(1, "mlp_in"), Site(1, "mlp_out"))
    mask = torch.ones(ids.shape, dtype=torch.bool)
    clean = lm.run(ids, read=["attn_z.1", "mlp_in.1"]).acts
    out = lm.run(ids, read=["attn_z.1", "attn_out.1", "mlp_in.1", "mlp_out.1"],
                 interventions=[splice(attn, mask), splice(tc, mask)]).acts  # fmt: skip
    # attn_z replaced by the SAE's reconstruction of z; o_proj carries it on to attn_out
    assert_close(out[Site(1, "attn_z")], attn(clean[Site(1, "attn_z")]), **TOL)
    # the transcoder writes decode(f) + mlp_in @ W_skip, reading the (changed) mlp_in of this pass
    assert_close(out[Site(1, "mlp_out")], tc(out[Site(1, "mlp_in")]), **TOL)
    assert (tc(out[Site(1, "mlp_in")]) - tc.decode(tc.encode(out[Site(1, "mlp_in")]))).abs().max() > 1e-2
    zero = lm.run(ids, read=["mlp_out.1"], interventions=[zero_ablate(tc, mask)]).acts[Site(1, "mlp_out")]
    assert zero.abs().max() == 0


# -- presets: the paper's settings, resolved against a fake hub folder -----------------------------
def test_paper_preset_resolves_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from icl_circuits.sae.presets import get_preset, load_preset_sae

    preset = get_preset("gemma-2-2b-gemma-scope")
    assert preset.model == "google/gemma-2-2b" and preset.layer == 17
    assert {s.label: s.tvc_lr for s in preset.saes} == {"16k": 0.3, "65k": 0.15}  # the paper's App. D
    # a fake hub: Gemma Scope params.npz files (tiny stand-ins) at exactly the preset's paths
    root = tmp_path / "hub"
    for i, s in enumerate(preset.saes):
        repo, folder = hub_path(s.hub_path)
        t = gs2_tensors(D, D, i)
        (root / repo / folder).mkdir(parents=True)
        np.savez(root / repo / folder / "params.npz", W_enc=t["w_enc"], b_enc=t["b_enc"], W_dec=t["w_dec"],
                 b_dec=t["b_dec"], threshold=t["threshold"])  # fmt: skip
    seen = []

    def fake_download(repo: str, filename: str, subfolder: str | None) -> str:
        seen.append(f"{repo}/{subfolder}/{filename}")
        path = root / repo / (subfolder or "") / filename
        if not path.is_file():
            raise FileNotFoundError(path)
        return str(path)

    monkeypatch.setattr(formats.hub, "_hf_download", fake_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for s in preset.saes:
        sae = load_preset_sae(preset.name, s.label)
        assert (sae.cfg.site, sae.cfg.model, sae.cfg.source) == ("resid_pre.17", "google/gemma-2-2b", "gemma_scope")
        assert sae.cfg.site == s.site == f"resid_pre.{preset.layer}"
    assert seen == [f"google/gemma-scope-2b-pt-res/layer_16/width_{w}/average_l0_{l0}/params.npz"
                    for w, l0 in (("16k", 78), ("65k", 128))]  # fmt: skip
    # the one command the docs show
    assert preset.command("65k") == ("icl-circuits clean --tasks all --model google/gemma-2-2b --layer 17 --sae "
                                     "google/gemma-scope-2b-pt-res/layer_16/width_65k/average_l0_128 --lr 0.15 "
                                     "--device cuda --dtype bfloat16")  # fmt: skip
    with pytest.raises(KeyError, match="no preset"):
        get_preset("nope")
    with pytest.raises(KeyError, match="no SAE"):
        preset.sae("1m")
    assert "gemma-3-270m-gemma-scope-2" in PRESETS


@pytest.mark.parametrize("name,label", [(n, s.label) for n, p in PRESETS.items() for s in p.saes])
def test_preset_command_parses(name: str, label: str) -> None:
    """Every preset's printed command is one the CLI accepts (clean needs --task/--tasks), with the preset's values."""
    from icl_circuits.cli import build_parser

    preset, s = PRESETS[name], PRESETS[name].sae(label)
    args = build_parser().parse_args(preset.clean_args(label))  # a bad command: SystemExit(2) here
    got = (args.command, args.tasks, args.model, args.layers, args.sae, args.lr, args.device, args.dtype)
    assert got == ("clean", "all", preset.model, str(preset.layer), s.hub_path, s.tvc_lr, "cuda", "bfloat16")
    assert preset.command(label).split() == ["icl-circuits", *preset.clean_args(label)]


def test_bundled_model_preset_resolves_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from icl_circuits.sae.presets import get_preset, load_preset_sae

    preset = get_preset("gemma-3-270m-gemma-scope-2")
    root = tmp_path / "hub"
    for i, s in enumerate(preset.saes):
        repo, folder = hub_path(s.hub_path)
        write_gs2(root / repo / folder, gs2_tensors(D, D, i), gs2_config("model.layers.11.output"))
    monkeypatch.setattr(formats.hub, "_hf_download", lambda repo, name, sub: str(root / repo / (sub or "") / name))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    sae = load_preset_sae(preset.name, "16k")
    assert (sae.cfg.site, sae.cfg.model, sae.cfg.source) == ("resid_pre.12", "gemma-3-270m", "gemma_scope_2")


def test_saelens_release_in_saelens_layout_applies_config_overrides(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from icl_circuits.sae import save_saelens

    g = torch.Generator().manual_seed(0)
    sae = JumpReLUSAE(SAEConfig(d_in=D, d_sae=D_SAE, site="resid_pre.2", layer=2),
                      {"W_enc": torch.randn(D, D_SAE, generator=g), "b_dec": torch.randn(D, generator=g)})  # fmt: skip
    save_saelens(sae, tmp_path / "hub" / "someone" / "saes" / "v5_layer_0")
    cfg_path = tmp_path / "hub" / "someone" / "saes" / "v5_layer_0" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["icl_circuits"]  # as a plain SAELens file, whose hook the registry overrides
    cfg_path.write_text(json.dumps(cfg))
    lookup = SimpleNamespace(repo_id="someone/saes", model="gpt2-small", conversion_func=None,
                             saes_map={"blocks.0.hook_resid_mid": "v5_layer_0"}, norm_scaling_factor={"blocks.0.hook_resid_mid": 2.5},
                             config_overrides={"hook_name": "blocks.0.hook_resid_mid", "hook_layer": 0,
                                               "metadata": {"hook_name": "blocks.0.hook_resid_mid"}})  # fmt: skip
    monkeypatch.setattr(formats.hub, "_saelens_directory", lambda: {"gpt2-small-oai": lookup})
    monkeypatch.setattr(formats.hub, "_hf_download", lambda repo, name, sub: str(tmp_path / "hub" / repo / (sub or "") / name))
    got = load_any("saelens:gpt2-small-oai/blocks.0.hook_resid_mid")
    assert (got.cfg.site, got.cfg.model, got.cfg.input_scale, got.cfg.output_scale) == ("resid_mid.0", "gpt2-small", 2.5, 2.5)


def test_transformerlens_processed_models_warn(tmp_path: Path) -> None:
    from icl_circuits.sae import load_saelens, save_saelens

    sae = JumpReLUSAE(SAEConfig(d_in=D, d_sae=D_SAE, site="resid_pre.2", layer=2))
    for name, kwargs, warns in (("a", {"fold_ln": True}, True), ("b", {"center_writing_weights": False}, False)):
        path = save_saelens(sae, tmp_path / name)
        cfg = json.loads((path / "cfg.json").read_text())
        cfg["model_from_pretrained_kwargs"] = kwargs
        (path / "cfg.json").write_text(json.dumps(cfg))
        if warns:
            with pytest.warns(UserWarning, match="TransformerLens"):
                load_saelens(path)
        else:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("error")
                load_saelens(path)
