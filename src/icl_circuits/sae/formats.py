"""Read SAEs from the formats people publish them in, always into a JumpReLUSAE.

    ours                 dir/ sae.safetensors + config.json            load_sae / save_sae
    SAELens              dir/ cfg.json + sae_weights.safetensors       load_saelens / save_saelens
    SAELens release      saelens:RELEASE/SAE_ID (needs sae-lens)        load_saelens_release
    Gemma Scope          params.npz (metadata passed by the caller)    load_gemma_scope
    Gemma Scope 2        dir/ params.safetensors [+ config.json]       load_gemma_scope_2
    saex (the paper's)   dir/ cfg.json + sae_weights.safetensors       load_saex
                         with s_gate / b_gate / mean_norm tensors
    dictionary_learning  dir/ ae.pt + config.json                      load_dictionary_learning
    any of the above     (detected from the files present)             load_any

Every loader takes **overrides: SAEConfig fields that replace what the files say (e.g.
site="resid_mid.3" when a hook name has no icl_circuits site). A site= / out_site= that
contradicts the hook the file itself names is refused unless force_site=True is passed too
(resid_post.L and resid_pre.L+1 count as the same site). Loaded SAEs are frozen
(requires_grad False); call .requires_grad_(True) to fine-tune one. docs/sae_formats.md
lists what each format's hooks map to.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from ..sites import Site, same_site
from ..storage import atomic_write_bytes, read_json
from .dictionary import JumpReLUSAE, SAEConfig, check_shapes, fold_b_dec_into_b_enc, gated_to_jumprelu

FORMAT_NAME = "icl-circuits-sae"
FORMAT_VERSION = 1
PathLike = str | os.PathLike
_CFG_FIELDS = {f.name for f in fields(SAEConfig)}


# -- shared helpers ------------------------------------------------------------------------
def _need(tensors: dict[str, torch.Tensor], key: str, shape: tuple[int, ...], where: Path | str) -> torch.Tensor:
    """tensors[key], checked to have `shape`; errors name the file and the key."""
    if key not in tensors:
        raise ValueError(f"{where}: missing tensor {key!r} (file has {sorted(tensors)})")
    t = tensors[key]
    if tuple(t.shape) != shape:
        raise ValueError(f"{where}: {key!r} has shape {tuple(t.shape)}, expected {shape}")
    return t


def _no_leftovers(tensors: dict[str, torch.Tensor], used: set[str], where: Path | str) -> None:
    # an unknown tensor may change the computation; refuse rather than silently ignore it
    left = sorted(set(tensors) - used)
    if left:
        raise ValueError(f"{where}: unsupported tensors {left}; this loader understands {sorted(used)}")


def _site_or_none(spec: Any) -> Site | None:
    try:
        return Site.parse(spec)
    except (ValueError, TypeError):
        return None


def _check_forced_sites(base: dict[str, Any], overrides: dict[str, Any], where: Path | str) -> None:
    """Refuse site=/out_site= overrides that contradict the hook the file names (see module doc)."""
    if not base.get("_own_sites", True):  # the site was only guessed from a path: overriding is fine
        return
    for key in ("site", "out_site"):
        mine, theirs = _site_or_none(base.get(key)), _site_or_none(overrides.get(key))
        if mine is not None and theirs is not None and not same_site(mine, theirs):
            hook = base.get("extra", {}).get("hook_name_out" if key == "out_site" else "hook_name") or base[key]
            raise ValueError(
                f"{where}: {key}={overrides[key]!r} contradicts the file's own hook {hook!r} (= {mine}); "
                "the SAE was trained on that site. Pass force_site=True as well to override it anyway."
            )


def _make_cfg(base: dict[str, Any], overrides: dict[str, Any], where: Path | str) -> SAEConfig:
    """Merge what the files say with the caller's overrides into a validated SAEConfig.

    base may carry "_own_sites": False when its site was guessed (from a path) rather than read
    from the file; overrides may carry force_site=True to replace a site the file names.
    """
    overrides = dict(overrides)
    force = bool(overrides.pop("force_site", False))
    base = dict(base)
    if not force:
        _check_forced_sites(base, overrides, where)
    base.pop("_own_sites", None)
    unknown = sorted(set(overrides) - _CFG_FIELDS)
    if unknown:
        raise TypeError(f"unknown override(s) {unknown}; overrides must be SAEConfig fields {sorted(_CFG_FIELDS)}")
    d = {**base, **overrides}
    d["extra"] = {**base.get("extra", {}), **overrides.get("extra", {})}
    if "site" in overrides and "layer" not in overrides:
        site = _site_or_none(overrides["site"])
        if site is not None:
            d["layer"] = site.layer
    if d.get("site") is None:
        hook = d["extra"].get("hook_name", "?")
        raise ValueError(f"{where}: hook {hook!r} has no icl_circuits site; pass site=... (e.g. site='resid_mid.12')")
    if d.get("kind") is None:
        site = _site_or_none(d["site"])
        attn = site is not None and site.kind in ("attn_out", "attn_z")
        d["kind"] = "transcoder" if d.get("out_site") else "attn" if attn else "resid"
    try:
        return SAEConfig(**d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from e


def _finish(sae: JumpReLUSAE, device: str | torch.device, dtype: torch.dtype | None) -> JumpReLUSAE:
    sae = sae.to(device=device, dtype=dtype) if dtype is not None else sae.to(device=device)
    return sae.requires_grad_(False)


def _publish_dir(target: PathLike, files: dict[str, bytes]) -> Path:
    """Write files into a temp dir next to `target`, then rename it into place.

    Readers see the old complete directory or the new complete one, never a mix. We refuse to
    replace a directory holding files we did not write, so a wrong path cannot delete data.
    """
    target = Path(target)
    if target.exists():
        if not target.is_dir():
            raise ValueError(f"{target} exists and is not a directory")
        foreign = sorted(p.name for p in target.iterdir() if p.name not in files)
        if foreign:
            raise ValueError(f"refusing to replace {target}: it holds files this writer did not make: {foreign}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        for name, data in files.items():
            atomic_write_bytes(tmp / name, data)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old)  # renaming onto an empty dir is allowed
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _read_safetensors(path: Path | str) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file; a truncated or damaged file is one clear error naming it."""
    try:
        return safetensors.torch.load_file(str(path))
    except (safetensors.SafetensorError, OSError) as e:
        raise ValueError(f"{path}: damaged or truncated safetensors file ({e})") from None


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def _st_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return safetensors.torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


# -- our own format ------------------------------------------------------------------------
def save_sae(sae: JumpReLUSAE, directory: PathLike, weight_dtype: torch.dtype | None = None, card: str | None = None) -> Path:
    """Write `directory`/sae.safetensors + config.json, atomically. Bitwise round-trip with load_sae.

    weight_dtype (e.g. torch.bfloat16) stores W_enc and W_dec in that dtype and keeps biases and
    thresholds as they are, halving the file for shipping; load_sae then computes in float32.
    card: a model card written as README.md in the same atomic step (so a re-export may replace it).
    """
    config = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **sae.cfg.to_dict()}
    tensors = sae.tensors()
    if weight_dtype is not None:
        tensors = {k: v.to(weight_dtype) if k in ("W_enc", "W_dec") else v for k, v in tensors.items()}
    files = {"sae.safetensors": _st_bytes(tensors), "config.json": _json_bytes(config)}
    if card is not None:
        files["README.md"] = card.encode("utf-8")
    return _publish_dir(directory, files)


def _require_files(directory: Path, names: tuple[str, ...], what: str) -> list[Path]:
    """The paths of `names` inside `directory`; a clear error naming the first one missing."""
    paths = [directory / n for n in names]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{directory} is not {what}: missing {p.name}")
    return paths


def load_sae(
    directory: PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, **overrides: Any
) -> JumpReLUSAE:
    directory = Path(directory)
    cfg_path, st_path = _require_files(directory, ("config.json", "sae.safetensors"), "an icl-circuits SAE")
    raw = read_json(cfg_path)
    if raw.get("format") != FORMAT_NAME:
        raise ValueError(f"{cfg_path}: format is {raw.get('format')!r}, expected {FORMAT_NAME!r}")
    if raw.get("version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: version {raw.get('version')!r} is not supported (reads {FORMAT_VERSION})")
    base = {k: v for k, v in raw.items() if k not in ("format", "version")}
    unknown = sorted(set(base) - _CFG_FIELDS)
    if unknown:
        raise ValueError(f"{cfg_path}: unknown keys {unknown}")
    cfg = _make_cfg(base, overrides, cfg_path)
    tensors = _read_safetensors(st_path)
    _no_leftovers(tensors, {"W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip"}, st_path)
    check_shapes(cfg, tensors, str(st_path))
    return _finish(JumpReLUSAE(cfg, tensors, where=str(st_path)), device, dtype)


# -- SAELens -------------------------------------------------------------------------------
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


# -- SAELens release registry ---------------------------------------------------------------
def _saelens_directory() -> dict[str, Any]:
    """SAELens's release registry {release: lookup with .repo_id, .saes_map, .conversion_func, ...}."""
    try:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    except ImportError as e:  # not a dependency: it pulls a CUDA torch
        raise ModuleNotFoundError(
            "resolving saelens:RELEASE/SAE_ID needs the sae-lens package (pip install sae-lens); "
            "without it, pass the Hub path instead, e.g. google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82"
        ) from e
    return get_pretrained_saes_directory()


def resolve_saelens_release(release: str, sae_id: str) -> dict[str, Any]:
    """Look up RELEASE/SAE_ID in SAELens's registry: {repo_id, folder, conversion_func, norm_scaling_factor,
    config_overrides, model}. Raises ModuleNotFoundError without sae-lens, ValueError for unknown names."""
    directory = _saelens_directory()
    if release not in directory:
        close = sorted(r for r in directory if release.split("-")[0] in r)[:8]
        raise ValueError(f"SAELens has no release {release!r}" + (f"; similar: {close}" if close else ""))
    info = directory[release]
    if sae_id not in info.saes_map:
        some = sorted(info.saes_map)[:8]
        raise ValueError(f"SAELens release {release!r} has no SAE {sae_id!r}; e.g. {some}")
    return {
        "repo_id": info.repo_id, "folder": info.saes_map[sae_id],
        "conversion_func": getattr(info, "conversion_func", None),
        "norm_scaling_factor": (getattr(info, "norm_scaling_factor", None) or {}).get(sae_id),
        "config_overrides": getattr(info, "config_overrides", None), "model": getattr(info, "model", ""),
    }  # fmt: skip


def load_saelens_release(spec: str, **overrides: Any) -> JumpReLUSAE:
    """Load 'RELEASE/SAE_ID' (or 'saelens:RELEASE/SAE_ID') from SAELens's release registry.

    The registry says which Hub repo and folder hold the SAE and in which layout; we download
    the files and read them with our own loaders. Needs sae-lens installed (a clear error otherwise).
    Supported layouts: SAELens's own, Gemma Scope (conversion gemma_2) and Gemma Scope 2 (gemma_3).
    """
    spec = spec.removeprefix("saelens:")
    if "/" not in spec:
        raise ValueError(f"expected saelens:RELEASE/SAE_ID, got {spec!r}")
    release, sae_id = spec.split("/", 1)
    info = resolve_saelens_release(release, sae_id)
    repo, folder, conv = info["repo_id"], info["folder"], info["conversion_func"]
    if info["model"] and "model" not in overrides:
        overrides["model"] = info["model"]
    if info["norm_scaling_factor"] is not None and "input_scale" not in overrides:
        # SAELens folds this factor into the weights at load: the same as our input/output scale
        overrides["input_scale"] = overrides["output_scale"] = float(info["norm_scaling_factor"])
    if conv is None:
        files = [_hf_download(repo, n, folder) for n in ("cfg.json", "sae_weights.safetensors")]
        cfg_overrides = info["config_overrides"] or None  # SAELens applies these to cfg.json too
        return load_saelens(Path(files[0]).parent, cfg_overrides=cfg_overrides, **overrides)
    if conv == "gemma_2":
        npz = Path(_hf_download(repo, "params.npz", folder))
        if "site" not in overrides:
            guess = _gemma_scope_site(Path(f"{repo}/{folder}"))
            if guess is not None:
                overrides["site"] = guess
        return load_gemma_scope(npz, **overrides)
    if conv == "gemma_3":
        return load_gemma_scope_2(_download_gemma_scope_2(repo, folder), **overrides)
    raise ValueError(
        f"SAELens release {release!r} uses conversion {conv!r}, which icl_circuits does not read; "
        "supported: SAELens's own layout, gemma_2 (Gemma Scope), gemma_3 (Gemma Scope 2)"
    )


# -- Gemma Scope ---------------------------------------------------------------------------
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


def _download_gemma_scope_2(repo: str, folder: str) -> Path:
    """Fetch params.safetensors (+ config.json when the repo has one) into the HF cache; return the folder."""
    st = Path(_hf_download(repo, "params.safetensors", folder))
    try:
        _hf_download(repo, "config.json", folder)
    except Exception:  # noqa: BLE001 - older folders have none; the loader infers the hook from the name
        pass
    return st.parent


# -- saex (the paper's own SAEs, neverix/saex, e.g. nev/gemma-2b-saex-test) -------------------
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


# -- dictionary_learning (saprmarks) ------------------------------------------------------
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


# -- detection -----------------------------------------------------------------------------
EXPECTED_LAYOUTS = (
    "icl-circuits: config.json (format icl-circuits-sae) + sae.safetensors",
    "SAELens: cfg.json + sae_weights.safetensors",
    "saex: cfg.json + sae_weights.safetensors holding s_gate / b_gate / mean_norm",
    "Gemma Scope: params.npz (or a path to a .npz file)",
    "Gemma Scope 2: params.safetensors (+ config.json)",
    "dictionary_learning: ae.pt + config.json",
)


def _safetensors_keys(path: Path) -> set[str]:
    """Tensor names from a safetensors header, without reading the tensors."""
    with safetensors.safe_open(str(path), "pt") as f:
        return set(f.keys())


def detect_format(path: PathLike) -> str | None:
    """'icl_circuits' | 'saelens' | 'saex' | 'gemma_scope' | 'gemma_scope_2' | 'dictionary_learning', or None."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".npz":
            return "gemma_scope"
        path = path.parent  # a file inside an SAE directory stands for the directory
    if not path.is_dir():
        return None
    has = {p.name for p in path.iterdir()}
    if {"config.json", "sae.safetensors"} <= has:
        return "icl_circuits"
    if {"cfg.json", "sae_weights.safetensors"} <= has:
        keys = _safetensors_keys(path / "sae_weights.safetensors")
        return "saex" if _is_saex(read_json(path / "cfg.json"), keys) else "saelens"
    if {"ae.pt", "config.json"} <= has:
        return "dictionary_learning"
    if "params.npz" in has:
        return "gemma_scope"
    if "params.safetensors" in has:
        return "gemma_scope_2"
    return None


_LOADERS = {
    "icl_circuits": load_sae, "saelens": load_saelens, "saex": load_saex, "gemma_scope": load_gemma_scope,
    "gemma_scope_2": load_gemma_scope_2, "dictionary_learning": load_dictionary_learning,
}  # fmt: skip


def _hf_download(repo: str, filename: str, subfolder: str | None) -> str:
    """hf_hub_download, in one place so tests can swap in a fake hub folder (never the network)."""
    from huggingface_hub import hf_hub_download  # lazy: only for ids that are not local paths

    from ..loading import hub_reachable

    why = hub_reachable()  # one quick connect instead of the hub client's retries (~46 s) when offline
    if why is not None:
        raise FileNotFoundError(f"{repo}: not a local path, and the Hugging Face Hub is unreachable ({why})")
    return hf_hub_download(repo, filename, subfolder=subfolder or None)


def hub_path(spec: str) -> tuple[str, str | None]:
    """'owner/repo[/folder...]' -> (repo_id, folder). The Gemma Scope 2 short form
    'gemma-scope-2-270m-pt/resid_post/layer_12_width_16k_l0_medium' means google/gemma-scope-2-270m-pt."""
    spec = spec.strip().strip("/")
    m = GS2_REPO_RE.match(spec)
    if m:
        return f"google/{m['repo']}", m["folder"]
    parts = spec.split("/")
    if len(parts) < 2:
        raise FileNotFoundError(f"{spec!r} is neither a local path nor a Hub id 'owner/repo[/folder]'")
    return "/".join(parts[:2]), "/".join(parts[2:]) or None


def _from_hub(spec: str) -> Path:
    """Download an SAE folder from the Hugging Face Hub, trying each known layout in turn."""
    repo, folder = hub_path(spec)
    if repo.split("/")[-1].startswith("gemma-scope-2-"):
        if folder is None:
            raise FileNotFoundError(f"{spec!r}: name a folder, e.g. {repo}/resid_post/layer_12_width_16k_l0_medium")
        return _download_gemma_scope_2(repo, folder)
    tries = (("params.npz",), ("cfg.json", "sae_weights.safetensors"), ("params.safetensors",))
    errors = []
    for names in tries:
        try:
            got = [_hf_download(repo, n, folder) for n in names]
            return Path(got[0]) if names == ("params.npz",) else Path(got[0]).parent
        except Exception as e:  # noqa: BLE001 - try the next layout, report all at the end
            errors.append(f"{names}: {e}")
    raise FileNotFoundError(f"could not fetch {spec!r} from the Hub: " + "; ".join(errors))


def load_any(path: PathLike, **overrides: Any) -> JumpReLUSAE:
    """Detect the format from the files present and load.

    Also accepts 'saelens:RELEASE/SAE_ID' (SAELens's registry; needs sae-lens) and Hub ids
    ('owner/repo/folder', or the Gemma Scope 2 short form 'gemma-scope-2-270m-pt/resid_post/...'),
    which download unless HF_HUB_OFFLINE=1.
    """
    if isinstance(path, str) and path.startswith("saelens:"):
        return load_saelens_release(path, **overrides)
    p = Path(path).expanduser()
    if not p.exists():
        from ..loading import hub_offline, resolve_spec

        resolve_spec(str(path), "SAE", hub_subfolders=True)  # a missing path that looks local fails here, offline
        if hub_offline():
            raise FileNotFoundError(f"{path} does not exist (and HF_HUB_OFFLINE=1, so no Hub download)")
        p = _from_hub(str(path))
        guess = _gemma_scope_site(Path(str(path)))
        if p.suffix == ".npz" and "site" not in overrides and guess is not None:
            overrides["site"] = guess
    fmt = detect_format(p)
    if fmt is None:
        found = sorted(x.name for x in p.iterdir()) if p.is_dir() else [p.name]
        layouts = "\n  ".join(EXPECTED_LAYOUTS)
        raise ValueError(f"{p}: no known SAE format (found {found}); expected one of:\n  {layouts}")
    target = p if p.is_dir() or fmt == "gemma_scope" else p.parent
    return _LOADERS[fmt](target, **overrides)


def with_config(sae: JumpReLUSAE, **changes: Any) -> JumpReLUSAE:
    """A copy of `sae` with some SAEConfig fields changed (validated), same tensors."""
    new = JumpReLUSAE(replace(sae.cfg, **changes), sae.tensors())
    return new.to(sae.device).requires_grad_(sae.W_enc.requires_grad)
