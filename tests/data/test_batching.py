"""data/batching.py: token rows into right-padded batches, checked on hand-worked rows."""

from __future__ import annotations

import pytest
import torch

from icl_circuits.data.batching import chunk_rows, pad_rows, padded_batches
from tests.helpers import word_tokenizer


def test_pad_rows_right_pads_with_the_pad_id():
    ids, mask = pad_rows([[5, 6, 7], [8], [9, 10]], pad_id=3)
    assert ids.tolist() == [[5, 6, 7], [8, 3, 3], [9, 10, 3]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert ids.dtype == mask.dtype == torch.long


def test_padded_batches_keep_order_and_tags():
    rows = [([1, 2], "a"), ([3], "b"), ([4, 5, 6], "c"), ([7], "d"), ([8, 9], "e")]
    out = list(padded_batches(rows, batch_size=2, pad_id=0))
    assert [ids.tolist() for ids, _, _ in out] == [[[1, 2], [3, 0]], [[4, 5, 6], [7, 0, 0]], [[8, 9]]]
    assert [m.tolist() for _, m, _ in out] == [[[1, 1], [1, 0]], [[1, 1, 1], [1, 0, 0]], [[1, 1]]]
    assert [tags for _, _, tags in out] == [["a", "b"], ["c", "d"], ["e"]]  # the last batch is shorter
    assert list(padded_batches([], batch_size=2, pad_id=0)) == []
    with pytest.raises(ValueError, match="batch_size"):
        next(padded_batches(rows, batch_size=0, pad_id=0))


def test_chunk_rows_by_hand():
    tok = word_tokenizer(["a", "b", "c", "d", "e", "f", "g"])
    # ids: <pad>=0 <bos>=1; "a"=4, " a"=5, "b"=6, " b"=7, ... so " x" = "x" + 1
    a, b, c, d, e, f, g = 4, 6, 8, 10, 12, 14, 16
    docs = ["a b c d e f g", "b", "a b c"]  # chunks of 4: [a b c d] [e f g] | [b] | [a b c]
    rows = list(chunk_rows(tok, docs, seq_len=5, min_tokens=2))
    assert rows == [
        ([1, a, b + 1, c + 1, d + 1], 0, (0, 1)),
        ([1, e + 1, f + 1, g + 1], 0, (1, 0)),  # after doc 0's last chunk the cursor moves to doc 1
        ([1, a, b + 1, c + 1], 2, (3, 0)),  # doc 1's one chunk was under min_tokens
    ]
    # resuming at a cursor gives the rest of the same stream
    assert list(chunk_rows(tok, docs, seq_len=5, min_tokens=2, start=(0, 1))) == rows[1:]
