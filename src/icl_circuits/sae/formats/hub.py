"""SAEs that are not local files: Hugging Face Hub ids and SAELens release names, downloaded and
read with our own loaders.

_hf_download is the one place that touches the Hub; tests swap it (formats.hub._hf_download) for a
fake hub folder, never the network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from icl_circuits.sae.dictionary import JumpReLUSAE
from icl_circuits.sae.formats.gemma_scope import GS2_REPO_RE, _gemma_scope_site, load_gemma_scope, load_gemma_scope_2
from icl_circuits.sae.formats.saelens import load_saelens


def _hf_download(repo: str, filename: str, subfolder: str | None) -> str:
    """hf_hub_download, in one place so tests can swap in a fake hub folder (never the network)."""
    from huggingface_hub import hf_hub_download  # lazy: only for ids that are not local paths

    from icl_circuits.core.loading import hub_reachable

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



def _download_gemma_scope_2(repo: str, folder: str) -> Path:
    """Fetch params.safetensors (+ config.json when the repo has one) into the HF cache; return the folder."""
    st = Path(_hf_download(repo, "params.safetensors", folder))
    try:
        _hf_download(repo, "config.json", folder)
    except Exception:  # noqa: BLE001 - older folders have none; the loader infers the hook from the name
        pass
    return st.parent



class MissingPackageError(ModuleNotFoundError, ValueError):
    """An optional package a spec needs is not installed. A ValueError too, so the CLI prints it as one
    `error:` line (rc 2) instead of a traceback; still a ModuleNotFoundError for library callers."""


def _no_sae_lens(spec: str = "") -> MissingPackageError:
    return MissingPackageError(
        (f"SAE {spec!r}: " if spec else "")
        + "saelens:RELEASE/ID names need the sae-lens package (pip install sae-lens); without it, pass the SAE's "
        "Hub path instead, e.g. google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82",
        name="sae_lens",
    )


def require_sae_lens(spec: str) -> None:
    """Fail now, before a slow model load, when a saelens: name cannot resolve (no sae-lens installed)."""
    import importlib.util

    try:
        found = importlib.util.find_spec("sae_lens") is not None
    except (ImportError, ValueError):  # a broken install, or a module without a spec
        found = False
    if not found:
        raise _no_sae_lens(spec)


def _saelens_directory() -> dict[str, Any]:
    """SAELens's release registry {release: lookup with .repo_id, .saes_map, .conversion_func, ...}."""
    try:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    except ImportError as e:  # not a dependency: it pulls a CUDA torch
        raise _no_sae_lens() from e
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

