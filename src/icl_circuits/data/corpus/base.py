"""What every corpus source shares: the error type, and skipping into / taking from a source."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence


class CorpusError(ValueError):
    """A corpus that cannot be read: missing or malformed file, missing field, no documents."""


def skip_docs(docs: Iterable[str], n: int) -> Iterable[str]:
    """The documents after the first n: sliced for a list, `docs.skip(n)` where the source has it."""
    if n == 0:
        return docs
    if isinstance(docs, Sequence):
        return docs[n:]
    if hasattr(docs, "skip"):
        return docs.skip(n)  # e.g. a streaming dataset skips without yielding
    return itertools.islice(docs, n, None)


def take_docs(docs: Iterable[str], n: int) -> list[str]:
    """The first n documents (e.g. a held-out set; train on skip_docs(docs, n))."""
    return list(itertools.islice(docs, n))

