"""Read SAEs from the formats people publish them in, always into a JumpReLUSAE.

    ours                 dir/ sae.safetensors + config.json            load_sae / save_sae
    SAELens              dir/ cfg.json + sae_weights.safetensors       load_saelens / save_saelens
    Gemma Scope          params.npz (metadata passed by the caller)    load_gemma_scope
    dictionary_learning  dir/ ae.pt + config.json                      load_dictionary_learning
    any of the above     (detected from the files present)             load_any

Every loader takes **overrides: SAEConfig fields that replace what the files say (e.g.
site="resid_mid.3" when a hook name has no icl_circuits site). Loaded SAEs are frozen
(requires_grad False); call .requires_grad_(True) to fine-tune one.
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

from ..sites import Site
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


def _make_cfg(base: dict[str, Any], overrides: dict[str, Any], where: Path | str) -> SAEConfig:
    """Merge what the files say with the caller's overrides into a validated SAEConfig."""
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
        d["kind"] = "transcoder" if d.get("out_site") else "attn" if site and site.kind == "attn_out" else "resid"
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
    tensors = safetensors.torch.load_file(str(st_path))
    _no_leftovers(tensors, {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}, st_path)
    check_shapes(cfg, tensors, str(st_path))
    return _finish(JumpReLUSAE(cfg, tensors, where=str(st_path)), device, dtype)


# -- SAELens -------------------------------------------------------------------------------
_SAELENS_NOTE = "icl_circuits"  # our own block in cfg.json, so save_saelens -> load_saelens is lossless
_SCALE_KEYS = ("scaling_factor", "norm_scaling_factor")


def _saelens_get(cfg: dict[str, Any], key: str, default: Any = None) -> Any:
    # newer SAELens moves model/hook facts under "metadata"
    if key in cfg:
        return cfg[key]
    return (cfg.get("metadata") or {}).get(key, default)


def load_saelens(
    path: PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, **overrides: Any
) -> JumpReLUSAE:
    """A SAELens directory (cfg.json + sae_weights.safetensors): standard, jumprelu, gated, topk, transcoders."""
    path = Path(path)
    cfg_path, st_path = _require_files(path, ("cfg.json", "sae_weights.safetensors"), "a SAELens SAE")
    cfg = read_json(cfg_path)
    t = safetensors.torch.load_file(str(st_path))

    arch = str(cfg.get("architecture", "standard"))
    if arch == "skip_transcoder" or "W_skip" in t:
        raise ValueError(f"{path}: skip transcoders (W_skip) are not supported")
    transcoder = "d_out" in cfg or "transcoder" in arch
    base_arch = {"transcoder": "standard"}.get(arch, arch.replace("_transcoder", ""))
    act_kwargs = cfg.get("activation_fn_kwargs") or {}
    k = act_kwargs.get("k", cfg.get("k"))
    act_fn = cfg.get("activation_fn_str", cfg.get("activation_fn", "relu"))
    if base_arch == "topk" or act_fn == "topk":
        if k is None:
            raise ValueError(f"{cfg_path}: a topk SAE needs 'k' (in cfg or activation_fn_kwargs)")
        base_arch = "topk"
    elif act_fn not in ("relu", None):
        raise ValueError(f"{cfg_path}: activation function {act_fn!r} is not supported")
    if base_arch not in ("standard", "jumprelu", "gated", "topk"):
        supported = "standard, jumprelu, gated, topk, transcoder, jumprelu_transcoder"
        raise ValueError(f"{cfg_path}: architecture {arch!r} is not supported ({supported})")

    try:
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    except KeyError as e:
        raise ValueError(f"{cfg_path}: missing key {e.args[0]!r}") from e
    d_out = int(cfg.get("d_out", d_in))
    # old SAELens configs omit it: standard/gated/topk SAEs subtracted b_dec, jumprelu and transcoders did not
    b_dec_on_input = bool(cfg.get("apply_b_dec_to_input", base_arch != "jumprelu" and not transcoder))

    # where it reads and writes
    hook = _saelens_get(cfg, "hook_name")
    hook_out = _saelens_get(cfg, "hook_name_out")
    site, out_site = _site_or_none(hook), _site_or_none(hook_out)
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

    # normalisation: a constant factor becomes input/output scale; a per-token one we cannot do
    norm = cfg.get("normalize_activations") or "none"
    factor = next((cfg[key] for key in _SCALE_KEYS if isinstance(cfg.get(key), (int, float))), None)
    if factor is not None:
        base["input_scale"] = base["output_scale"] = float(factor)
    elif norm not in ("none", None):
        extra["unapplied_normalization"] = norm
        warnings.warn(
            f"{cfg_path}: normalize_activations={norm!r} is not reproduced; pass input_scale=/output_scale= "
            "if it is a constant factor", stacklevel=2,
        )  # fmt: skip
    if isinstance(cfg.get(_SAELENS_NOTE), dict):  # written by save_saelens
        base.update(cfg[_SAELENS_NOTE])
        base["extra"] = {**extra, **cfg[_SAELENS_NOTE].get("extra", {})}
    sae_cfg = _make_cfg(base, overrides, cfg_path)

    W_enc = _need(t, "W_enc", (d_in, d_sae), st_path)  # [d_in, d_sae]
    W_dec = _need(t, "W_dec", (d_sae, d_out), st_path)  # [d_sae, d_out]
    b_dec = _need(t, "b_dec", (d_out,), st_path)  # [d_out]
    used = {"W_enc", "W_dec", "b_dec"}
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
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "threshold": threshold}
    return _finish(JumpReLUSAE(sae_cfg, tensors, where=str(st_path)), device, dtype)


def _hook_name(site: str) -> str:
    s = Site.parse(site)
    return f"blocks.{s.layer}.hook_{s.kind}"  # TransformerLens names for all five site kinds


def save_saelens(sae: JumpReLUSAE, path: PathLike) -> Path:
    """Write a SAELens jumprelu (or topk) directory, scales folded in, so other tools can open it."""
    folded = sae.folded()
    c = folded.cfg
    t = folded.tensors()
    if c.k is not None and bool((t["threshold"] != 0).any()):
        raise ValueError("SAELens has no TopK SAE with non-zero JumpReLU thresholds; cannot save this SAE")
    arch = "topk" if c.k is not None else "jumprelu"
    if c.kind == "transcoder" and arch == "jumprelu":
        arch = "jumprelu_transcoder"
    weights = dict(t)
    if arch == "topk":
        del weights["threshold"]  # topk files have no threshold
    facts = {"model_name": c.model, "hook_name": _hook_name(c.site), "hook_layer": c.layer, "hook_head_index": None}
    cfg: dict[str, Any] = {
        "architecture": arch, "d_in": c.d_in, "d_sae": c.d_sae, "dtype": str(sae.dtype).removeprefix("torch."),
        "device": "cpu", **facts, "apply_b_dec_to_input": False, "normalize_activations": "none",
        "metadata": facts,
        _SAELENS_NOTE: {"kind": c.kind, "site": c.site, "out_site": c.out_site, "source": c.source, "extra": c.extra},
    }  # fmt: skip
    if c.k is not None:
        cfg["activation_fn_kwargs"] = {"k": c.k}
        cfg["k"] = c.k
    if c.kind == "transcoder":
        cfg["d_out"] = c.d_out
        if c.out_site:
            cfg["hook_name_out"] = _hook_name(c.out_site)
            cfg["hook_layer_out"] = Site.parse(c.out_site).layer
    return _publish_dir(path, {"sae_weights.safetensors": _st_bytes(weights), "cfg.json": _json_bytes(cfg)})


# -- Gemma Scope ---------------------------------------------------------------------------
_GS_LAYER = re.compile(r"layer_(\d+)")
_GS_SITE = {"res": "resid_post", "mlp": "mlp_out"}  # gemma-scope-2b-pt-res -> blocks.L.hook_resid_post


def _gemma_scope_site(path: Path) -> str | None:
    """Guess the site from a Hub-style path like gemma-scope-2b-pt-res/layer_12/width_16k/..."""
    text = path.as_posix()
    layer = _GS_LAYER.search(text)
    kind = re.search(r"gemma-scope-[^/]*-(res|mlp)(?:-canonical)?(?:/|$)", text)
    return f"{_GS_SITE[kind[1]]}.{layer[1]}" if layer and kind else None


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
    }  # fmt: skip
    cfg = _make_cfg(base, overrides, npz)
    return _finish(JumpReLUSAE(cfg, tensors, where=str(npz)), device, dtype)


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
    "Gemma Scope: params.npz (or a path to a .npz file)",
    "dictionary_learning: ae.pt + config.json",
)


def detect_format(path: PathLike) -> str | None:
    """'icl_circuits' | 'saelens' | 'gemma_scope' | 'dictionary_learning', or None."""
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
        return "saelens"
    if {"ae.pt", "config.json"} <= has:
        return "dictionary_learning"
    if "params.npz" in has:
        return "gemma_scope"
    return None


_LOADERS = {
    "icl_circuits": load_sae, "saelens": load_saelens,
    "gemma_scope": load_gemma_scope, "dictionary_learning": load_dictionary_learning,
}  # fmt: skip


def _from_hub(spec: str) -> Path:
    """Download 'owner/repo/sub/folder' from the Hugging Face Hub (lazy import; never in tests)."""
    from huggingface_hub import hf_hub_download  # lazy: only for ids that are not local paths

    parts = spec.strip("/").split("/")
    if len(parts) < 2:
        raise FileNotFoundError(f"{spec!r} is neither a local path nor a Hub id 'owner/repo[/folder]'")
    repo, folder = "/".join(parts[:2]), "/".join(parts[2:]) or None
    tries = (("params.npz",), ("cfg.json", "sae_weights.safetensors"))
    errors = []
    for names in tries:
        try:
            got = [hf_hub_download(repo, n, subfolder=folder) for n in names]
            return Path(got[0]) if names == ("params.npz",) else Path(got[0]).parent
        except Exception as e:  # noqa: BLE001 - try the next layout, report all at the end
            errors.append(f"{names}: {e}")
    raise FileNotFoundError(f"could not fetch {spec!r} from the Hub: " + "; ".join(errors))


def load_any(path: PathLike, **overrides: Any) -> JumpReLUSAE:
    """Detect the format from the files present and load. Hub ids work unless HF_HUB_OFFLINE=1."""
    p = Path(path)
    if not p.exists():
        if os.environ.get("HF_HUB_OFFLINE") == "1":
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
