"""Held-out splits and packing of a finite corpus, as `sae harvest` uses them; a fingerprint of its documents."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from icl_circuits.data.corpus.base import CorpusError
from icl_circuits.data.corpus.spec import from_spec


def docs_fingerprint(docs: Iterable[str]) -> str:
    """sha256 over the documents in order (length-prefixed, so boundaries count)."""
    import hashlib

    h = hashlib.sha256()
    for d in docs:
        b = d.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()



def split_docs(docs: Sequence[str], n_eval: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, eval): eval holds the n_eval documents with the smallest sha256(seed, text), so the
    same texts are held out on every machine and in every order; both keep the input order.
    Duplicated texts share a hash, so an eval text never also appears in train unless n_eval cuts
    through a group of duplicates."""
    import hashlib

    if not 0 <= n_eval <= len(docs):
        raise ValueError(f"n_eval must be in [0, {len(docs)}], got {n_eval}")
    keys = [hashlib.sha256(f"{seed}\0{d}".encode("utf-8")).digest() for d in docs]
    held = set(sorted(range(len(docs)), key=lambda i: (keys[i], i))[:n_eval])
    train = [d for i, d in enumerate(docs) if i not in held]
    return train, [d for i, d in enumerate(docs) if i in held]


def pack_docs(docs: Iterable[str], target_chars: int = 2000, sep: str = "\n\n") -> list[str]:
    """Consecutive short documents joined with `sep` into documents of about target_chars
    (a longer document stays alone). Dictionary entries (median ~100 characters for GCIDE) are
    otherwise mostly padding in a 128-token batch, and those under min_tokens are dropped."""
    out: list[str] = []
    cur: list[str] = []
    size = 0
    for d in docs:
        if cur and size + len(sep) + len(d) > target_chars:
            out.append(sep.join(cur))
            cur, size = [], 0
        cur.append(d)
        size += len(d) + (len(sep) if size else 0)
    if cur:
        out.append(sep.join(cur))
    return out


def harvest_docs(spec: str, n_eval: int, seed: int = 0, lm: Any = None, progress: bool = True) -> tuple[list[str], list[str]]:
    """(training documents, held-out documents) of a finite corpus, as `sae harvest` uses them: the
    held-out ones chosen by content hash (`split_docs`), the training ones shuffled by `seed` (a harvest
    takes the first N tokens, so the sources mix), and both packed into ~2,000-character documents
    (`pack_docs`), so forward passes run on full-length chunks."""
    import random

    docs = from_spec(spec, lm, progress=progress)
    if not isinstance(docs, list):
        raise CorpusError(f"corpus {spec!r} is a stream; harvesting needs a finite corpus (files, debian:, python-docs)")
    train, held = split_docs(docs, n_eval, seed=seed)
    random.Random(seed).shuffle(train)
    return pack_docs(train), pack_docs(held)

