"""Token rows into padded batches: the one batch-and-pad of the package.

    chunk_rows(tok, docs, seq_len, min_tokens)     -- ([BOS] + chunk of seq_len-1 tokens, doc, cursor after)
    padded_batches(((row, tag), ...), batch_size, pad_id)
                                                   -- (ids [batch, seq], mask [batch, seq], tags), right-padded
    pad_rows(rows, pad_id)                         -- one batch of rows, right-padded

Tags ride along with their rows (a document index, a resume cursor, ...) so a caller can map each
row of a batch back to where it came from.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor

from icl_circuits.data.corpus import bos_id, skip_docs

Cursor = tuple[int, int]  # (document index, chunk index within it) of the next chunk to read
T = TypeVar("T")


def chunk_rows(
    tokenizer: Any, docs: Iterable[str], seq_len: int, min_tokens: int, start: Cursor = (0, 0)
) -> Iterator[tuple[list[int], int, Cursor]]:
    """(row, its document's index, cursor of the chunk after it), resuming at `start`.

    Each document is tokenised without special tokens and cut into chunks of seq_len-1 tokens; a
    row is BOS (EOS if the tokenizer has no BOS) + a chunk. Chunks under min_tokens are dropped.
    """
    bos = bos_id(tokenizer)
    start_doc, start_chunk = start
    n = seq_len - 1
    for d, doc in enumerate(skip_docs(docs, start_doc), start_doc):
        ids = tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"]
        pieces = [ids[i : i + n] for i in range(0, len(ids), n)]
        first = start_chunk if d == start_doc else 0
        keep = [c for c in range(first, len(pieces)) if len(pieces[c]) >= min_tokens]
        for j, c in enumerate(keep):
            # after a document's last kept chunk the cursor moves to the next document
            yield [bos, *pieces[c]], d, ((d, keep[j + 1]) if j + 1 < len(keep) else (d + 1, 0))


def pad_rows(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(ids [batch, seq], attention mask [batch, seq]: 1 on real tokens) of rows right-padded with pad_id
    to the longest row. On the CPU: LM.run moves token batches to the model's device."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device="cpu")  # [batch, seq]
    mask = torch.zeros((len(rows), width), dtype=torch.long, device="cpu")  # [batch, seq]
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long, device="cpu")
        mask[i, : len(r)] = 1
    return ids, mask


def padded_batches(
    tagged_rows: Iterable[tuple[list[int], T]], batch_size: int, pad_id: int
) -> Iterator[tuple[Tensor, Tensor, list[T]]]:
    """(ids [batch, seq], attention mask [batch, seq], the rows' tags) of batch_size rows each, in order.

    Rows are right-padded with pad_id to the longest row of their batch; the last batch may hold
    fewer rows. Lazy: rows are read only as far as the batches asked for.
    """
    if batch_size < 1:
        raise ValueError(f"need batch_size >= 1; got {batch_size}")
    rows: list[list[int]] = []
    tags: list[T] = []
    for row, tag in tagged_rows:
        rows.append(row)
        tags.append(tag)
        if len(rows) == batch_size:
            yield *pad_rows(rows, pad_id), tags
            rows, tags = [], []
    if rows:
        yield *pad_rows(rows, pad_id), tags
