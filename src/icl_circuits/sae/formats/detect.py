"""Detect an SAE's format from the files present and load it (detect_format, load_any)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import safetensors

from icl_circuits.core.storage import read_json
from icl_circuits.sae.dictionary import JumpReLUSAE
from icl_circuits.sae.formats.common import PathLike
from icl_circuits.sae.formats.dictionary_learning import load_dictionary_learning
from icl_circuits.sae.formats.gemma_scope import _gemma_scope_site, load_gemma_scope, load_gemma_scope_2
from icl_circuits.sae.formats.hub import _from_hub, load_saelens_release
from icl_circuits.sae.formats.ours import load_sae
from icl_circuits.sae.formats.saelens import load_saelens
from icl_circuits.sae.formats.saex import _is_saex, load_saex


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
        from icl_circuits.core.loading import hub_offline, resolve_spec

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

