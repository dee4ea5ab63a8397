"""A corpus from a command-line spec ('generated:N', 'python-docs', 'debian:PKG', 'hf:NAME', files,
'A+B' mixes), and what a spec is built from (provenance)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from icl_circuits.data.corpus.base import CorpusError
from icl_circuits.data.corpus.debian import debian_docs, debian_header
from icl_circuits.data.corpus.files import _expand, text_files
from icl_circuits.data.corpus.generated import generated
from icl_circuits.data.corpus.hf import hf_dataset


def python_docs() -> list[str]:
    """The Python reference documentation bundled with CPython (pydoc_data): offline English prose, one doc per topic."""
    from pydoc_data.topics import topics

    return [topics[k].strip() for k in sorted(topics) if topics[k].strip()]


def from_spec(spec: str, lm: Any, progress: bool = True) -> list[str] | Iterable[str]:
    """A corpus from a command-line spec; 'A+B' concatenates sources (list sources only).

    'generated:N'          N documents the model samples from BOS (top-k 50, seed 0), cached on disk;
                           sampled with a bfloat16 copy of the bundled model (only the text is used)
    'python-docs'          CPython's bundled reference documentation (offline, deterministic)
    'debian:PKG'           documents parsed from a Debian package (apt-get download once, then a JSONL
                           cache), e.g. debian:dict-gcide (a dictionary), debian:python3-doc (manuals)
    'hf:NAME[:CONFIG]'     a streaming Hugging Face dataset (online only), e.g. hf:HuggingFaceFW/fineweb:sample-10BT
    'PATH[,PATH...]'       .txt / .jsonl files, directories or globs
    """
    if "+" in spec:
        parts = [from_spec(p, lm, progress) for p in spec.split("+")]
        if not all(isinstance(p, list) for p in parts):
            raise CorpusError(
                f"{spec!r}: only finite sources (generated, python-docs, debian, files) can be joined with '+'"
            )
        return [doc for p in parts for doc in p]  # type: ignore[union-attr]
    if spec == "python-docs":
        return python_docs()
    if spec.startswith("debian:"):
        return debian_docs(spec.split(":", 1)[1])
    if spec.startswith("generated:"):
        from icl_circuits.core.loading import cache_dir, load_model

        n = int(spec.split(":", 1)[1])
        # a bf16 copy samples ~2.7x faster on CPU; it is loaded only if the cache falls short
        sampler = (lambda: load_model(lm.name, dtype=torch.bfloat16, device=lm.device)) if lm.name == "gemma-3-270m" else None
        name = lm.name.replace("/", "_")
        cache = cache_dir() / "corpus" / f"{name}-top50-seed0.jsonl"
        return generated(lm, n, top_k=50, seed=0, batch_size=128, cache_path=cache, progress=progress, sampler=sampler)
    if spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        return hf_dataset(name, config=config or None)
    return text_files([p for p in spec.split(",") if p])



def provenance(spec: str) -> dict[str, Any]:
    """What the corpus `spec` is built from, for model cards: one record per '+' part.

    debian:PKG -> the packages, versions and .deb sha256s (from the cache header; building the
    cache if needed); python-docs -> the Python version; files -> paths with sha256; others the spec.
    """
    import hashlib
    import sys

    parts = []
    for part in spec.split("+"):
        if part.startswith("debian:"):
            h = debian_header(part.split(":", 1)[1])
            parts.append({"source": part, "parser": h["parser"], "parser_version": h["parser_version"],
                          "debs": h["debs"], "n_docs": h["n_docs"], "n_chars": h["n_chars"]})  # fmt: skip
        elif part == "python-docs":
            parts.append({"source": part, "python": sys.version.split()[0]})
        elif part.startswith(("generated:", "hf:")):
            parts.append({"source": part})
        else:
            files = _expand([p for p in part.split(",") if p])
            parts.append({"source": part, "files": [
                {"path": str(f), "sha256": hashlib.sha256(f.read_bytes()).hexdigest()} for f in files]})  # fmt: skip
    return {"spec": spec, "parts": parts}

