"""Gemma Scope (params.npz, metadata passed by the caller) and Gemma Scope 2 (dir/ params.safetensors
[+ config.json]): load_gemma_scope / load_gemma_scope_2."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from icl_circuits.core.sites import Site, same_site
from icl_circuits.core.storage import read_json
from icl_circuits.sae.dictionary import JumpReLUSAE
from icl_circuits.sae.formats.common import PathLike, _finish, _make_cfg, _need, _no_leftovers, _read_safetensors
from icl_circuits.sae.formats.saelens import _hf_hook_site


_GS_LAYER = re.compile(r"layer_(\d+)")
def _gemma_scope_site(path: Path) -> str | None:
    """Guess the site from a Hub-style path like gemma-scope-2b-pt-res/layer_12/width_16k/...

    -res SAEs read blocks.L.hook_resid_post, which is our resid_pre.(L+1): the residual site every
    algorithm here uses (as for Gemma Scope 2). -mlp SAEs read mlp_out.L. Pass site='resid_post.L'
    for the last layer, which has no resid_pre after it.
    """
    text = path.as_posix()
    layer = _GS_LAYER.search(text)
    kind = re.search(r"gemma-scope-[^/]*-(res|mlp)(?:-canonical)?(?:/|$)", text)
    if not (layer and kind):
        return None
    return f"resid_pre.{int(layer[1]) + 1}" if kind[1] == "res" else f"mlp_out.{layer[1]}"


def load_gemma_scope(
    path: PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, **overrides: Any
) -> JumpReLUSAE:
    """Gemma Scope params.npz (a file, or a directory holding one). pre = x @ W_enc + b_enc.

    The file has no metadata: pass site= (and model=); kind defaults from the site, and
    out_site= makes it a transcoder. For Hub-style paths the site is guessed from the path.
    """
    path = Path(path)
    npz = path / "params.npz" if path.is_dir() else path
    if not npz.is_file():
        raise FileNotFoundError(f"no Gemma Scope params.npz at {path}")
    with np.load(npz, allow_pickle=False) as z:
        t = {k: torch.from_numpy(np.array(z[k])) for k in z.files}
    if "W_enc" not in t or t["W_enc"].dim() != 2:
        raise ValueError(f"{npz}: missing 2-D 'W_enc' (file has {sorted(t)})")
    d_in, d_sae = t["W_enc"].shape
    d_out = t["W_dec"].shape[-1] if "W_dec" in t else d_in
    tensors = {
        "W_enc": t["W_enc"], "b_enc": _need(t, "b_enc", (d_sae,), npz),
        "W_dec": _need(t, "W_dec", (d_sae, d_out), npz), "b_dec": _need(t, "b_dec", (d_out,), npz),
        "threshold": _need(t, "threshold", (d_sae,), npz),
    }  # fmt: skip
    _no_leftovers(t, set(tensors), npz)
    site = overrides.get("site") or _gemma_scope_site(npz.parent)
    if site is None:
        raise ValueError(f"{npz}: Gemma Scope files carry no metadata; pass site=... (and model=...)")
    transcoder = d_out != d_in or overrides.get("out_site") is not None
    base = {
        "d_in": d_in, "d_sae": d_sae, "d_out": d_out, "kind": "transcoder" if transcoder else None,
        "site": site, "layer": Site.parse(site).layer, "source": "gemma_scope", "extra": {"path": str(npz)},
        "_own_sites": False,  # params.npz names no hook: the site is the caller's or a guess from the path
    }  # fmt: skip
    cfg = _make_cfg(base, overrides, npz)
    return _finish(JumpReLUSAE(cfg, tensors, where=str(npz)), device, dtype)



# -- Gemma Scope 2 -------------------------------------------------------------------------
GS2_REPO_RE = re.compile(r"^(?:google/)?(?P<repo>gemma-scope-2-[^/]+)/(?P<folder>.+)$")
_GS2_FOLDER = re.compile(r"(?:^|/)(?P<kind>resid_post|attn_out|mlp_out|transcoder|clt)(?:_all)?/layer_(?P<layer>\d+)_")


def _gs2_sites_from_folder(folder: str) -> tuple[Site | None, Site | None]:
    """(in, out) site from a folder like 'resid_post/layer_12_width_16k_l0_medium' (SAELens does the same)."""
    m = _GS2_FOLDER.search(folder.replace("\\", "/"))
    if not m:
        return None, None
    layer, kind = int(m["layer"]), m["kind"]
    if kind == "clt":
        raise ValueError(f"{folder}: Gemma Scope 2 cross-layer transcoders (clt) are not supported")
    return {
        "resid_post": (Site(layer + 1, "resid_pre"), None), "attn_out": (Site(layer, "attn_z"), None),
        "mlp_out": (Site(layer, "mlp_out"), None), "transcoder": (Site(layer, "mlp_in"), Site(layer, "mlp_out")),
    }[kind]  # fmt: skip


def _gs2_model_name(name: str) -> str:
    # config.json says e.g. 'gemma-v3-270m-pt'; SAELens maps it to the HF id google/gemma-3-270m
    name = name.rsplit("/", 1)[-1].replace("-v3", "-3")
    return name.removesuffix("-pt") if "270m" in name else name


def load_gemma_scope_2(
    path: PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, **overrides: Any
) -> JumpReLUSAE:
    """A Gemma Scope 2 folder: params.safetensors (+ config.json), e.g. resid_post/layer_12_width_16k_l0_medium.

    Tensors w_enc [d_in, d_sae], w_dec [d_sae, d_out], b_enc, b_dec, threshold, and for affine
    transcoders affine_skip_connection [d_in, d_out]:
        pre = x @ w_enc + b_enc;  f = relu(pre) * (pre > threshold);  out = f @ w_dec + b_dec (+ x @ A)
    No b_dec is subtracted and nothing is normalised. Sites (config.json hf_hook_point_in/out,
    else the folder name): resid_post L -> resid_pre.(L+1); attn_out L -> attn_z.L (o_proj input,
    heads x head_dim wide: the SAE reconstructs z, and o_proj carries a splice on to attn_out);
    mlp_out L -> mlp_out.L; transcoder L -> mlp_in.L -> mlp_out.L.
    """
    path = Path(path)
    st = path / "params.safetensors" if path.is_dir() else path
    if not st.is_file():
        raise FileNotFoundError(f"no Gemma Scope 2 params.safetensors at {path}")
    cfg_path = st.parent / "config.json"
    raw: dict[str, Any] = read_json(cfg_path) if cfg_path.is_file() else {}
    if raw.get("architecture", "jump_relu") != "jump_relu":
        raise ValueError(f"{cfg_path}: architecture {raw.get('architecture')!r} is not supported (jump_relu)")
    t = _read_safetensors(st)
    if "w_enc" not in t or t["w_enc"].dim() != 2:
        raise ValueError(f"{st}: missing 2-D 'w_enc' (file has {sorted(t)})")
    d_in, d_sae = t["w_enc"].shape
    d_out = t["w_dec"].shape[-1] if "w_dec" in t and t["w_dec"].dim() == 2 else d_in
    tensors = {
        "W_enc": t["w_enc"], "b_enc": _need(t, "b_enc", (d_sae,), st), "W_dec": _need(t, "w_dec", (d_sae, d_out), st),
        "b_dec": _need(t, "b_dec", (d_out,), st), "threshold": _need(t, "threshold", (d_sae,), st),
    }  # fmt: skip
    used = {"w_enc", "b_enc", "w_dec", "b_dec", "threshold"}
    if "affine_skip_connection" in t:  # stored [d_in, d_out]: out += x @ A, our W_skip as is
        tensors["W_skip"] = _need(t, "affine_skip_connection", (d_in, d_out), st)
        used.add("affine_skip_connection")
    elif raw.get("affine_connection"):
        raise ValueError(f"{cfg_path}: affine_connection is true but {st.name} has no 'affine_skip_connection'")
    _no_leftovers(t, used, st)

    hook_in, hook_out = raw.get("hf_hook_point_in"), raw.get("hf_hook_point_out")
    site, note = _hf_hook_site(hook_in)
    out_site = _hf_hook_site(hook_out)[0]
    own = site is not None  # the file names its hook; a folder-name guess can be overridden freely
    if site is None:
        if hook_in is not None:
            raise ValueError(f"{cfg_path}: hf_hook_point_in {hook_in!r} has no icl_circuits site; pass site=...")
        site, out_site = _gs2_sites_from_folder(st.parent.as_posix())
    if out_site is not None and same_site(out_site, site):
        out_site = None  # an SAE (not a transcoder) may name its one hook twice
    extra: dict[str, Any] = {"path": str(st), "hf_hook_point_in": hook_in, "hf_hook_point_out": hook_out}
    if note:
        extra["note"] = note
    base = {
        "d_in": d_in, "d_sae": d_sae, "d_out": d_out, "kind": "transcoder" if out_site is not None else None,
        "site": str(site) if site else None, "out_site": str(out_site) if out_site else None,
        "layer": site.layer if site else None, "model": _gs2_model_name(str(raw.get("model_name", ""))),
        "source": "gemma_scope_2", "extra": extra, "_own_sites": own,
    }  # fmt: skip
    if site is None and "site" not in overrides:
        raise ValueError(f"{st}: no config.json hook and no Gemma Scope 2 folder name; pass site= (and out_site=)")
    if base["layer"] is None:
        base["layer"] = 0  # replaced by the site override's layer in _make_cfg
    cfg = _make_cfg(base, overrides, st)
    return _finish(JumpReLUSAE(cfg, tensors, where=str(st)), device, dtype)

