"""Our own format: dir/ sae.safetensors + config.json (load_sae / save_sae), and with_config."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from icl_circuits.core.storage import read_json
from icl_circuits.sae.dictionary import JumpReLUSAE, check_shapes
from icl_circuits.sae.formats.common import (
    _CFG_FIELDS,
    PathLike,
    _finish,
    _json_bytes,
    _make_cfg,
    _no_leftovers,
    _publish_dir,
    _read_safetensors,
    _require_files,
    _st_bytes,
)

FORMAT_NAME = "icl-circuits-sae"
FORMAT_VERSION = 1


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



def with_config(sae: JumpReLUSAE, **changes: Any) -> JumpReLUSAE:
    """A copy of `sae` with some SAEConfig fields changed (validated), same tensors."""
    new = JumpReLUSAE(replace(sae.cfg, **changes), sae.tensors())
    return new.to(sae.device).requires_grad_(sae.W_enc.requires_grad)

