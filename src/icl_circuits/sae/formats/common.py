"""Shared by every SAE format: tensor checks, merging file facts with overrides into an SAEConfig,
and atomic directory writes."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from icl_circuits.core.sites import Site, same_site
from icl_circuits.core.storage import atomic_write_bytes
from icl_circuits.sae.dictionary import JumpReLUSAE, SAEConfig

PathLike = str | os.PathLike
_CFG_FIELDS = {f.name for f in fields(SAEConfig)}


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



def _require_files(directory: Path, names: tuple[str, ...], what: str) -> list[Path]:
    """The paths of `names` inside `directory`; a clear error naming the first one missing."""
    paths = [directory / n for n in names]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{directory} is not {what}: missing {p.name}")
    return paths

