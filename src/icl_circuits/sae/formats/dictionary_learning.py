"""dictionary_learning (saprmarks): dir/ ae.pt + config.json (load_dictionary_learning)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from icl_circuits.core.sites import Site
from icl_circuits.core.storage import read_json
from icl_circuits.sae.dictionary import JumpReLUSAE, fold_b_dec_into_b_enc, gated_to_jumprelu
from icl_circuits.sae.formats.common import PathLike, _finish, _make_cfg, _need, _no_leftovers, _require_files, _site_or_none


_DL_SUBMODULE = re.compile(
    r"^(?P<kind>resid_post|resid_pre|resid_mid|mlp_out|attn_out|resid|mlp|attn)(?:_layer)?_(?P<layer>\d+)$"
)
_DL_KINDS = {"resid": "resid_post", "mlp": "mlp_out", "attn": "attn_out"}  # feature-circuits naming


def _dl_site(submodule: Any) -> Site | None:
    m = _DL_SUBMODULE.match(str(submodule)) if submodule is not None else None
    if m:
        return Site(int(m["layer"]), _DL_KINDS.get(m["kind"], m["kind"]))
    return _site_or_none(submodule)


def load_dictionary_learning(
    path: PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, **overrides: Any
) -> JumpReLUSAE:
    """A dictionary_learning directory (ae.pt + config.json).

    Supports AutoEncoder, JumpReluAutoEncoder, GatedAutoEncoder, AutoEncoderTopK, and
    BatchTopKSAE with a learned inference threshold. Latents are the raw ones each class's
    encode() returns (no decoder-norm rescaling).
    """
    path = Path(path)
    pt, cfg_path = _require_files(path, ("ae.pt", "config.json"), "a dictionary_learning SAE")
    trainer = read_json(cfg_path).get("trainer")
    if not isinstance(trainer, dict):
        raise ValueError(f"{cfg_path}: missing the 'trainer' block")
    cls = trainer.get("dict_class")
    try:
        d_in, d_sae = int(trainer["activation_dim"]), int(trainer["dict_size"])
    except KeyError as e:
        raise ValueError(f"{cfg_path}: trainer has no {e.args[0]!r}") from e
    t = torch.load(pt, map_location="cpu", weights_only=True)
    if not isinstance(t, dict):
        raise ValueError(f"{pt}: expected a state dict, got {type(t).__name__}")

    site = _dl_site(trainer.get("submodule_name"))
    base: dict[str, Any] = {
        "d_in": d_in, "d_sae": d_sae, "model": trainer.get("lm_name") or "", "site": str(site) if site else None,
        "layer": site.layer if site else trainer.get("layer"), "source": "dictionary_learning",
        "extra": {"dict_class": cls, "hook_name": trainer.get("submodule_name")},
    }  # fmt: skip

    def need(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        return _need(t, key, shape, pt)

    if cls == "GatedAutoEncoder":
        _no_leftovers(t, {"encoder.weight", "decoder.weight", "decoder_bias", "r_mag", "gate_bias", "mag_bias"}, pt)
        cfg = _make_cfg(base, overrides, cfg_path)
        sae = gated_to_jumprelu(
            need("encoder.weight", (d_sae, d_in)).T, need("gate_bias", (d_sae,)), need("mag_bias", (d_sae,)),
            need("r_mag", (d_sae,)), need("decoder.weight", (d_in, d_sae)).T, need("decoder_bias", (d_in,)),
            cfg, b_dec_on_input=True,
        )  # fmt: skip
        return _finish(sae, device, dtype)

    if cls == "JumpReluAutoEncoder":
        shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,),
                  "threshold": (d_sae,)}  # fmt: skip
        _no_leftovers(t, set(shapes), pt)
        tensors = {k: need(k, shape) for k, shape in shapes.items()}
    elif cls in ("AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE"):
        bias_key = "bias" if cls == "AutoEncoder" else "b_dec"
        _no_leftovers(t, {"encoder.weight", "encoder.bias", "decoder.weight", bias_key, "k", "threshold"}, pt)
        W_enc = need("encoder.weight", (d_sae, d_in)).T  # [d_in, d_sae]
        bias = need(bias_key, (d_in,))  # [d_in], subtracted before encoding, added after decoding
        tensors = {
            "W_enc": W_enc, "b_enc": fold_b_dec_into_b_enc(W_enc, need("encoder.bias", (d_sae,)), bias),
            "W_dec": need("decoder.weight", (d_in, d_sae)).T, "b_dec": bias,
        }  # fmt: skip
        if cls != "AutoEncoder":
            k = int(t["k"]) if "k" in t else trainer.get("k")
            if k is None:
                raise ValueError(f"{pt}: {cls} needs k (a 'k' buffer or trainer.k in {cfg_path.name})")
            if trainer.get("k") is not None and int(trainer["k"]) != k:
                raise ValueError(f"{pt}: k buffer {k} disagrees with {cfg_path.name} trainer.k={trainer['k']}")
            base["k"] = k
        if cls == "BatchTopKSAE":
            # batch top-k depends on the whole batch; at inference the class uses a learned threshold
            thr = float(t["threshold"]) if "threshold" in t else -1.0
            if thr < 0:
                raise ValueError(f"{pt}: BatchTopKSAE without a learned threshold depends on the batch; not supported")
            base["k"] = None
            base["extra"]["batch_topk_k"] = k
            tensors["threshold"] = torch.full((d_sae,), thr, dtype=W_enc.dtype)
    else:
        raise ValueError(
            f"{cfg_path}: dict_class {cls!r} is not supported "
            "(AutoEncoder, JumpReluAutoEncoder, GatedAutoEncoder, AutoEncoderTopK, BatchTopKSAE)"
        )
    cfg = _make_cfg(base, overrides, cfg_path)
    return _finish(JumpReLUSAE(cfg, tensors, where=str(pt)), device, dtype)

