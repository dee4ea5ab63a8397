"""saex (the paper's own SAEs, neverix/saex, e.g. nev/gemma-2b-saex-test): dir/ cfg.json +
sae_weights.safetensors with s_gate / b_gate / mean_norm tensors (load_saex)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from icl_circuits.core.sites import Site
from icl_circuits.core.storage import read_json
from icl_circuits.sae.dictionary import JumpReLUSAE, fold_b_dec_into_b_enc
from icl_circuits.sae.formats.common import PathLike, _finish, _make_cfg, _need, _no_leftovers, _read_safetensors, _require_files


_SAEX_MARKERS = {"s_gate", "mean_norm", "tgt_mean_norm"}  # (SAELens gated SAEs have b_gate too, never these)
_SAEX_FOLDER = re.compile(r"(?:^|[/-])l(?P<layer>\d+)-(?:(?P<kind>residual|attn_out|transcoder)-)?")


def _is_saex(cfg: dict[str, Any], tensors: dict[str, torch.Tensor] | set[str]) -> bool:
    names = set(tensors)
    bare_cfg = not ({"hook_name", "hook_point", "architecture"} & set(cfg))  # saex's cfg.json names no hook
    return bool(_SAEX_MARKERS & names) or ("expansion_factor" in cfg and bare_cfg)


def _saex_sites(path: Path) -> tuple[Site | None, Site | None]:
    """saex folder names: 'l12-test-run-5-3.00E-05', 'it-l12-residual-test-run-0-...', 'l5-transcoder-...'.

    saex's micrlhf model: residual = input of block L (resid_pre.L); attn_out = attention output
    (Gemma 1 has no post-attention norm: attn_out.L); transcoder = the MLP's input -> its output.
    """
    m = _SAEX_FOLDER.search(path.name) or _SAEX_FOLDER.search(path.as_posix())
    if not m:
        return None, None
    layer, kind = int(m["layer"]), m["kind"] or "residual"
    return {"residual": (Site(layer, "resid_pre"), None), "attn_out": (Site(layer, "attn_out"), None),
            "transcoder": (Site(layer, "mlp_in"), Site(layer, "mlp_out"))}[kind]  # fmt: skip


def load_saex(
    path: PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    gated: bool = True,
    remove_decoder_bias: bool = False,
    **overrides: Any,
) -> JumpReLUSAE:
    """An SAE trained with neverix/saex (cfg.json + sae_weights.safetensors, tensors W_enc, b_enc,
    scaling_factor (saex's `s`), W_dec, b_dec, s_gate, b_gate, mean_norm[, tgt_mean_norm]).

    saex encodes (norm_input 'wes-mean-fixed', as the paper's SAEs were trained):
        x' = x * sqrt(d_in) / mean_norm            (then x' - b_dec if remove_decoder_bias)
        e  = x' @ W_enc
        gated:     f = 1[e + b_enc > 0] * relu(e * softplus(s_gate) * s + b_gate)
        not gated: f = relu(e + b_enc) * s
        out = (f @ W_dec + b_dec) / (sqrt(d_out) / tgt_mean_norm)   (mean_norm when tgt_mean_norm is absent)
    With m = softplus(s_gate) * s > 0, the gate e + b_enc > 0 is mag := e*m + b_gate > b_gate - m*b_enc,
    so this is exactly a JumpReLU SAE: W_enc' = W_enc * m, b_enc' = b_gate, threshold = b_gate - m * b_enc,
    input_scale = sqrt(d_in) / mean_norm, output_scale = sqrt(d_out) / tgt_mean_norm.

    cfg.json does not record is_gated / remove_decoder_bias (saex's config does): the defaults are the
    paper's (gated, no b_dec subtraction); pass gated=False / remove_decoder_bias=True otherwise.
    """
    path = Path(path)
    cfg_path, st_path = _require_files(path, ("cfg.json", "sae_weights.safetensors"), "a saex SAE")
    raw = read_json(cfg_path)
    t = {k: v.float() for k, v in _read_safetensors(st_path).items()}  # saex may ship bf16
    W_enc = t.get("W_enc")
    if W_enc is None or W_enc.dim() != 2:
        raise ValueError(f"{st_path}: missing 2-D 'W_enc' (file has {sorted(t)})")
    d_in, d_sae = W_enc.shape
    for key, val in (("d_in", d_in), ("d_sae", d_sae)):
        if key in raw and int(raw[key]) != val:
            raise ValueError(f"{cfg_path}: {key}={raw[key]} but W_enc is {tuple(W_enc.shape)}")
    d_out = t["W_dec"].shape[-1] if "W_dec" in t and t["W_dec"].dim() == 2 else d_in
    W_dec = _need(t, "W_dec", (d_sae, d_out), st_path)  # [d_sae, d_out]
    b_dec = _need(t, "b_dec", (d_out,), st_path)  # [d_out]
    b_enc = _need(t, "b_enc", (d_sae,), st_path)  # [d_sae]
    s = _need(t, "scaling_factor", (d_sae,), st_path) if "scaling_factor" in t else torch.ones(d_sae)
    used = {"W_enc", "W_dec", "b_dec", "b_enc", "scaling_factor", "s_gate", "b_gate", "mean_norm", "tgt_mean_norm"}
    _no_leftovers(t, used, st_path)

    def scalar(key: str) -> float | None:
        if key not in t:
            return None
        if t[key].numel() != 1:
            raise ValueError(f"{st_path}: {key!r} should be a scalar, has shape {tuple(t[key].shape)}")
        return float(t[key].reshape(()))

    mean_norm, tgt_mean_norm = scalar("mean_norm"), scalar("tgt_mean_norm")
    input_scale = d_in**0.5 / mean_norm if mean_norm is not None else 1.0
    out_norm = tgt_mean_norm if tgt_mean_norm is not None else mean_norm
    output_scale = d_out**0.5 / out_norm if out_norm is not None else 1.0
    if remove_decoder_bias and d_out != d_in:
        raise ValueError(f"{cfg_path}: remove_decoder_bias needs d_out == d_in")
    # b_dec is subtracted from the *scaled* input x' = x * input_scale, so it folds as-is into b_enc
    # (our pre-activation is (x * input_scale) @ W_enc + b_enc)
    if gated:
        m = torch.nn.functional.softplus(_need(t, "s_gate", (d_sae,), st_path)) * s  # [d_sae]
        if not bool((m > 0).all()):
            raise ValueError(f"{st_path}: softplus(s_gate) * scaling_factor must be > 0 for an exact conversion")
        b_gate = _need(t, "b_gate", (d_sae,), st_path)
        W = W_enc * m  # [d_in, d_sae]
        pre_bias = b_gate.clone()
        threshold = b_gate - m * b_enc
        if remove_decoder_bias:
            # mag and the gate both shift by -b_dec @ W_enc (times m for mag): the threshold is unchanged
            pre_bias = fold_b_dec_into_b_enc(W, pre_bias, b_dec)
    else:
        if not bool((s > 0).all()):
            raise ValueError(f"{st_path}: scaling_factor must be > 0 for an exact conversion to JumpReLU")
        W, pre_bias, threshold = W_enc * s, b_enc * s, torch.zeros(d_sae)
        if remove_decoder_bias:
            pre_bias = fold_b_dec_into_b_enc(W, pre_bias, b_dec)

    site, out_site = _saex_sites(path)
    model = ("gemma-2b-it" if re.search(r"(?:^|/)it-l\d+", path.as_posix()) else "gemma-2b") \
        if "gemma-2b-saex" in path.as_posix() else ""  # fmt: skip
    base = {
        "d_in": d_in, "d_sae": d_sae, "d_out": d_out, "kind": "transcoder" if out_site is not None else None,
        "site": str(site) if site else None, "out_site": str(out_site) if out_site else None,
        "layer": site.layer if site else 0, "model": model, "input_scale": input_scale,
        "output_scale": output_scale, "source": "saex", "_own_sites": False,
        "extra": {"gated": gated, "remove_decoder_bias": remove_decoder_bias, "saex_cfg": raw, "hook_name": path.name},
    }  # fmt: skip
    if site is None and "site" not in overrides:
        raise ValueError(f"{path}: saex files name no hook and the folder name has no 'l<layer>-'; pass site=...")
    cfg = _make_cfg(base, overrides, cfg_path)
    tensors = {"W_enc": W, "b_enc": pre_bias, "W_dec": W_dec, "b_dec": b_dec, "threshold": threshold}
    return _finish(JumpReLUSAE(cfg, tensors, where=str(st_path)), device, dtype)

