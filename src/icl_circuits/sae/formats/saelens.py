"""SAELens: dir/ cfg.json + sae_weights.safetensors (load_saelens / save_saelens)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch

from icl_circuits.core.sites import Site
from icl_circuits.core.storage import read_json
from icl_circuits.sae.dictionary import JumpReLUSAE, fold_b_dec_into_b_enc, gated_to_jumprelu
from icl_circuits.sae.formats.common import (
    PathLike,
    _finish,
    _json_bytes,
    _make_cfg,
    _need,
    _no_leftovers,
    _publish_dir,
    _read_safetensors,
    _require_files,
    _site_or_none,
    _st_bytes,
)
from icl_circuits.sae.formats.saex import _is_saex, load_saex


_SAELENS_NOTE = "icl_circuits"  # our own block in cfg.json, so save_saelens -> load_saelens is lossless
_SCALE_KEYS = ("scaling_factor", "norm_scaling_factor")
_PRE6_RENAMES = {"hook_point": "hook_name", "hook_point_layer": "hook_layer",
                 "hook_point_head_index": "hook_head_index", "activation_fn_str": "activation_fn"}  # fmt: skip
# per-token normalisations: the scale depends on the input, so decode(f) alone (TVC, circuits,
# steering) cannot undo it; refused rather than silently computing something else
_PER_TOKEN_NORMS = ("layer_norm", "constant_norm_rescale", "covariance_whitening")


def _saelens_get(cfg: dict[str, Any], key: str, default: Any = None) -> Any:
    # newer SAELens moves model/hook facts under "metadata"
    if key in cfg:
        return cfg[key]
    return (cfg.get("metadata") or {}).get(key, default)


def _saelens_version(cfg: dict[str, Any]) -> tuple[int, ...] | None:
    v = _saelens_get(cfg, "sae_lens_version")
    m = re.match(r"^(\d+)(?:\.(\d+))?", str(v)) if v else None
    return tuple(int(x) for x in m.groups() if x is not None) if m else None


def normalise_saelens_cfg(cfg: dict[str, Any]) -> dict[str, Any]:
    """The cfg.json as SAELens 6 reads it: pre-6 key names renamed, SAELens's defaults filled in.

    SAELens treats a config without a version (or < 6) as pre-6: hook_point -> hook_name,
    activation_fn_str -> activation_fn, apply_b_dec_to_input defaults to True, a boolean
    normalize_activations means expected_average_only_in. 6.x dataclasses also default
    apply_b_dec_to_input to True (transcoders must say False).
    """
    cfg = dict(cfg)
    version = _saelens_version(cfg)
    if version is None or version[0] < 6:
        cfg = {_PRE6_RENAMES.get(k, k): v for k, v in cfg.items()}
        if isinstance(cfg.get("normalize_activations"), bool):
            cfg["normalize_activations"] = "expected_average_only_in" if cfg["normalize_activations"] else "none"
        kwargs = cfg.get("activation_fn_kwargs") or {}
        if cfg.get("activation_fn") == "topk" and kwargs.get("k") is not None:
            cfg.setdefault("k", kwargs["k"])
    return cfg


def _hf_hook_site(name: Any) -> tuple[Site | None, str]:
    """Map a Hugging Face module path (Gemma Scope 2 'hf_hook_point_in') to our site.

    Returns (site, note). model.layers.L.output is resid_post.L, i.e. resid_pre.L+1; we return
    resid_pre.(L+1) because every residual algorithm here reads resid_pre.
    """
    if not isinstance(name, str):
        return None, ""
    m = re.match(r"^(?:model\.)?(?:language_model\.)?(?:model\.)?layers\.(\d+)(?:\.(.+))?$", name.strip())
    if not m:
        return None, ""
    layer, rest = int(m[1]), (m[2] or "output")
    table = {
        "output": Site(layer + 1, "resid_pre"), "input": Site(layer, "resid_pre"),
        "self_attn.o_proj.input": Site(layer, "attn_z"),
        "post_attention_layernorm.output": Site(layer, "attn_out"),
        "pre_feedforward_layernorm.output": Site(layer, "mlp_in"), "mlp.input": Site(layer, "mlp_in"),
        "post_feedforward_layernorm.output": Site(layer, "mlp_out"),
    }  # fmt: skip
    site = table.get(rest)
    return site, (f"{name} = resid_post.{layer}" if rest == "output" else "")


def load_saelens(
    path: PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    cfg_overrides: dict[str, Any] | None = None,
    **overrides: Any,
) -> JumpReLUSAE:
    """A SAELens directory (cfg.json + sae_weights.safetensors).

    cfg_overrides: SAELens cfg.json keys to replace before reading (what SAELens's release
    registry calls config_overrides); overrides: SAEConfig fields, as for every loader.

    Exact for standard, jumprelu, gated, topk (incl. rescale_acts_by_decoder_norm), transcoder,
    jumprelu_transcoder, skip_transcoder and jumprelu_skip_transcoder, and for pre-6 configs.
    Refused with an error: per-token normalize_activations (layer_norm, constant_norm_rescale,
    covariance_whitening), per-head hooks, and architectures outside that list.
    """
    path = Path(path)
    cfg_path, st_path = _require_files(path, ("cfg.json", "sae_weights.safetensors"), "a SAELens SAE")
    raw = {**read_json(cfg_path), **(cfg_overrides or {})}
    t = _read_safetensors(st_path)
    if _is_saex(raw, t):  # the paper's own saex files share SAELens's file names
        return load_saex(path, device=device, dtype=dtype, **overrides)
    cfg = normalise_saelens_cfg(raw)

    arch = str(cfg.get("architecture", "standard"))
    skip = "skip_transcoder" in arch
    transcoder = "d_out" in cfg or "transcoder" in arch
    base_arch = {"transcoder": "standard", "skip_transcoder": "standard"}.get(arch, arch)
    base_arch = base_arch.replace("_skip_transcoder", "").replace("_transcoder", "")
    if "W_skip" in t and not skip:
        raise ValueError(f"{st_path}: has W_skip but architecture {arch!r} is not a skip transcoder")
    act_kwargs = cfg.get("activation_fn_kwargs") or {}
    k = cfg.get("k", act_kwargs.get("k"))
    act_fn = cfg.get("activation_fn", "relu")
    if base_arch == "topk" or act_fn == "topk":
        if k is None:
            raise ValueError(f"{cfg_path}: a topk SAE needs 'k' (in cfg or activation_fn_kwargs)")
        base_arch = "topk"
    elif act_fn not in ("relu", None):
        raise ValueError(f"{cfg_path}: activation function {act_fn!r} is not supported")
    if base_arch not in ("standard", "jumprelu", "gated", "topk"):
        supported = ("standard, jumprelu, gated, topk, transcoder, jumprelu_transcoder, skip_transcoder, "
                     "jumprelu_skip_transcoder")  # fmt: skip
        raise ValueError(f"{cfg_path}: architecture {arch!r} is not supported ({supported})")
    rescale = bool(cfg.get("rescale_acts_by_decoder_norm", False))
    if rescale and base_arch != "topk":
        raise ValueError(f"{cfg_path}: rescale_acts_by_decoder_norm is only understood for topk SAEs, not {arch!r}")

    try:
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    except KeyError as e:
        raise ValueError(f"{cfg_path}: missing key {e.args[0]!r}") from e
    d_out = int(cfg.get("d_out", d_in))
    # SAELens's default is True for every SAE (pre-6 and 6.x alike); transcoders must say False
    b_dec_on_input = bool(cfg.get("apply_b_dec_to_input", not transcoder))
    if _saelens_get(cfg, "hook_head_index") is not None:
        head = _saelens_get(cfg, "hook_head_index")
        raise ValueError(f"{cfg_path}: per-head SAEs (hook_head_index={head}) are not supported")

    # where it reads and writes: the HF module path (Gemma Scope 2 via SAELens) is the unambiguous one
    hook, hook_out = _saelens_get(cfg, "hook_name"), _saelens_get(cfg, "hook_name_out")
    site = _hf_hook_site(_saelens_get(cfg, "hf_hook_name"))[0] or _site_or_none(hook)
    out_site = _hf_hook_site(_saelens_get(cfg, "hf_hook_name_out"))[0] or _site_or_none(hook_out)
    extra: dict[str, Any] = {"architecture": arch, "hook_name": hook}
    if hook_out is not None:
        extra["hook_name_out"] = hook_out
    base: dict[str, Any] = {
        "d_in": d_in, "d_sae": d_sae, "d_out": d_out, "kind": "transcoder" if transcoder else None,
        "model": _saelens_get(cfg, "model_name") or "", "site": str(site) if site else None,
        "out_site": str(out_site) if out_site else None,
        "layer": site.layer if site else _saelens_get(cfg, "hook_layer"),
        "k": None if k is None else int(k), "source": "saelens", "extra": extra,
    }  # fmt: skip

    # normalisation: a constant factor becomes input/output scale; a per-token one we refuse
    norm = cfg.get("normalize_activations") or "none"
    if norm in _PER_TOKEN_NORMS:
        raise ValueError(
            f"{cfg_path}: normalize_activations={norm!r} rescales every token by its own statistics, which "
            "decode(latents) alone (task vectors, steering, circuits) cannot reproduce; not supported. "
            "Fold it into the weights first, or retrain with 'none' / 'expected_average_only_in'."
        )
    if norm not in ("none", "expected_average_only_in"):
        raise ValueError(f"{cfg_path}: unknown normalize_activations={norm!r}")
    factor = next((cfg[key] for key in _SCALE_KEYS if isinstance(cfg.get(key), (int, float))), None)
    if factor is not None:
        base["input_scale"] = base["output_scale"] = float(factor)
    elif norm == "expected_average_only_in":
        # SAELens itself applies nothing at run time here (it folds a factor only when its release
        # registry has one), so unscaled is what SAELens computes too; say so
        extra["unapplied_normalization"] = norm
        warnings.warn(
            f"{cfg_path}: normalize_activations='expected_average_only_in' without a scaling factor: computing "
            "without normalisation, as SAELens does; pass input_scale=/output_scale= if you know the factor",
            stacklevel=2,
        )
    tl_kwargs = _saelens_get(cfg, "model_from_pretrained_kwargs") or {}
    if tl_kwargs and tl_kwargs.get("center_writing_weights") is not False:
        # trained on a TransformerLens-processed model (e.g. center_writing_weights): its residual
        # stream can differ from the Hugging Face model's by a per-token shift we do not apply
        extra["model_from_pretrained_kwargs"] = tl_kwargs
        warnings.warn(
            f"{cfg_path}: trained with TransformerLens model_from_pretrained_kwargs={tl_kwargs}; the Hugging Face "
            "model's activations may differ from what this SAE saw (e.g. centred writing weights)",
            stacklevel=2,
        )
    if isinstance(cfg.get(_SAELENS_NOTE), dict):  # written by save_saelens
        base.update(cfg[_SAELENS_NOTE])
        base["extra"] = {**extra, **cfg[_SAELENS_NOTE].get("extra", {})}
    sae_cfg = _make_cfg(base, overrides, cfg_path)

    W_enc = _need(t, "W_enc", (d_in, d_sae), st_path)  # [d_in, d_sae]
    W_dec = _need(t, "W_dec", (d_sae, d_out), st_path)  # [d_sae, d_out]
    b_dec = _need(t, "b_dec", (d_out,), st_path)  # [d_out]
    used = {"W_enc", "W_dec", "b_dec"}
    extra_tensors: dict[str, torch.Tensor] = {}
    if skip:  # SAELens stores W_skip as [d_out, d_in] and adds x @ W_skip.T; ours is [d_in, d_out]
        extra_tensors["W_skip"] = _need(t, "W_skip", (d_out, d_in), st_path).T.contiguous()
        used.add("W_skip")
    if "scaling_factor" in t:  # old SAELens finetuning factor: f -> f * s before W_dec
        W_dec = W_dec * _need(t, "scaling_factor", (d_sae,), st_path)[:, None]
        used.add("scaling_factor")
    if b_dec_on_input and d_out != d_in:
        raise ValueError(f"{cfg_path}: apply_b_dec_to_input with d_out != d_in cannot subtract b_dec from the input")

    if base_arch == "gated":
        used |= {"b_gate", "b_mag", "r_mag"}
        _no_leftovers(t, used, st_path)
        sae = gated_to_jumprelu(
            W_enc, _need(t, "b_gate", (d_sae,), st_path), _need(t, "b_mag", (d_sae,), st_path),
            _need(t, "r_mag", (d_sae,), st_path), W_dec, b_dec, sae_cfg, b_dec_on_input,
        )  # fmt: skip
        if extra_tensors:
            sae = JumpReLUSAE(sae_cfg, {**sae.tensors(), **extra_tensors}, where=str(st_path))
        return _finish(sae, device, dtype)

    b_enc = _need(t, "b_enc", (d_sae,), st_path)
    used.add("b_enc")
    threshold = torch.zeros(d_sae, dtype=W_enc.dtype)  # [d_sae]
    if base_arch == "jumprelu":
        if "log_threshold" in t:  # training checkpoints store log(threshold)
            threshold = _need(t, "log_threshold", (d_sae,), st_path).exp()
            used.add("log_threshold")
        else:
            threshold = _need(t, "threshold", (d_sae,), st_path)
            used.add("threshold")
    _no_leftovers(t, used, st_path)
    if b_dec_on_input:
        b_enc = fold_b_dec_into_b_enc(W_enc, b_enc, b_dec)
    if rescale:
        # SAELens TopK: pre' = pre * |W_dec_i|, f = topk(relu(pre')), decode = (f / |W_dec_i|) @ W_dec.
        # Scaling column i of W_enc and b_enc by n_i > 0 and row i of W_dec by 1/n_i gives exactly that
        # (relu and top-k commute with a positive per-latent scale only through pre', which we reproduce).
        norms = W_dec.norm(dim=-1)  # [d_sae]
        if not bool((norms > 0).all()):
            raise ValueError(f"{st_path}: rescale_acts_by_decoder_norm with an all-zero decoder row divides by zero")
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
        extra["rescale_acts_by_decoder_norm"] = "folded"
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "threshold": threshold}
    return _finish(JumpReLUSAE(sae_cfg, {**tensors, **extra_tensors}, where=str(st_path)), device, dtype)


def _hook_name(site: str) -> str:
    """TransformerLens hook name of a site (what SAELens files record)."""
    s = Site.parse(site)
    if s.kind == "attn_z":
        return f"blocks.{s.layer}.attn.hook_z"
    if s.kind == "mlp_in":
        return f"blocks.{s.layer}.ln2.hook_normalized"  # TL's hook_mlp_in is the *un*normalised resid_mid
    return f"blocks.{s.layer}.hook_{s.kind}"


SAELENS_WRITE_VERSION = "6.0.0"  # the cfg.json layout save_saelens writes (SAELens reads it as 6.x)


def save_saelens(sae: JumpReLUSAE, path: PathLike) -> Path:
    """Write a SAELens 6 directory (jumprelu, topk, jumprelu_transcoder or jumprelu_skip_transcoder),
    scales folded in, so other tools can open it."""
    folded = sae.folded()
    c = folded.cfg
    t = folded.tensors()
    if c.k is not None and bool((t["threshold"] != 0).any()):
        raise ValueError("SAELens has no TopK SAE with non-zero JumpReLU thresholds; cannot save this SAE")
    if c.k is not None and "W_skip" in t:
        raise ValueError("SAELens has no TopK skip transcoder; cannot save this SAE")
    arch = "topk" if c.k is not None else "jumprelu"
    if c.kind == "transcoder" and arch == "jumprelu":
        arch = "jumprelu_skip_transcoder" if "W_skip" in t else "jumprelu_transcoder"
    weights = dict(t)
    if arch == "topk":
        del weights["threshold"]  # topk files have no threshold
    if "W_skip" in weights:
        if c.kind != "transcoder":
            raise ValueError("W_skip is only saved for transcoders (SAELens has no skip SAE)")
        weights["W_skip"] = weights["W_skip"].T.contiguous()  # SAELens layout [d_out, d_in]
    facts = {"model_name": c.model, "hook_name": _hook_name(c.site), "hook_layer": c.layer, "hook_head_index": None,
             "sae_lens_version": SAELENS_WRITE_VERSION}  # fmt: skip
    if c.kind == "transcoder" and c.out_site:
        facts["hook_name_out"] = _hook_name(c.out_site)
    reshape = "hook_z" if Site.parse(c.site).kind == "attn_z" else "none"  # TL hook_z is [.., heads, d_head]
    cfg: dict[str, Any] = {
        "architecture": arch, "d_in": c.d_in, "d_sae": c.d_sae, "dtype": str(sae.dtype).removeprefix("torch."),
        "device": "cpu", **facts, "apply_b_dec_to_input": False, "normalize_activations": "none",
        "reshape_activations": reshape, "metadata": facts,
        _SAELENS_NOTE: {"kind": c.kind, "site": c.site, "out_site": c.out_site, "source": c.source, "extra": c.extra},
    }  # fmt: skip
    if c.k is not None:
        cfg["activation_fn_kwargs"] = {"k": c.k}
        cfg["k"] = c.k
        cfg["rescale_acts_by_decoder_norm"] = False
    if c.kind == "transcoder":
        cfg["d_out"] = c.d_out
        if c.out_site:
            cfg["hook_name_out"] = _hook_name(c.out_site)
            cfg["hook_layer_out"] = Site.parse(c.out_site).layer
    return _publish_dir(path, {"sae_weights.safetensors": _st_bytes(weights), "cfg.json": _json_bytes(cfg)})

