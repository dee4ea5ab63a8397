"""The circuit metric's token-type bookkeeping: which tokens are nodes, and sums by token type."""

from __future__ import annotations

import torch

from icl_circuits.data.prompts import TYPE_ID
from icl_circuits.methods.circuits import NODE_TYPES, aggregate_by_type, type_index

from tests.helpers import toy_batch


def test_aggregation_hand_worked():
    tix = torch.tensor([[-1, 0, 1, 1], [2, 0, -1, -1]])  # -1: bos / padding, never a node
    per_pos = torch.arange(16, dtype=torch.float32).reshape(2, 4, 2)  # value (b, s, n) = 8b + 2s + n
    agg = aggregate_by_type(per_pos, tix, 3)
    # type 0 at (0,1) and (1,1): [2+10, 3+11]; type 1 at (0,2), (0,3): [4+6, 5+7]; type 2 at (1,0): [8, 9]
    assert agg.tolist() == [[12.0, 14.0], [10.0, 12.0], [8.0, 9.0]]
    # mean (the authors' average_over_positions): per prompt over its positions of the type, then over the
    # prompts that have the type. type 0: prompt 0 [2, 3], prompt 1 [10, 11] -> [6, 7]; type 1: only prompt 0,
    # mean of [4, 5] and [6, 7] -> [5, 6]; type 2: only prompt 1 -> [8, 9]
    mean = aggregate_by_type(per_pos, tix, 3, mean=True)
    assert mean.tolist() == [[6.0, 7.0], [5.0, 6.0], [8.0, 9.0]]


def test_type_index_marks_node_types_only():
    batch, tok = toy_batch(n_prompts=2, n_shots=1)
    tix = type_index(batch, NODE_TYPES)
    # prompt 0: <bos> Follow the pattern: \n x -> y \n x -> y
    names = [None if i < 0 else NODE_TYPES[i] for i in tix[0].tolist()]
    assert names == [None, "prompt", "prompt", "prompt", "newline", "input", "arrow", "output", "newline", "input", "arrow", "output"]
    assert (tix[batch.token_types == TYPE_ID["bos"]] == -1).all() and (tix[batch.attention_mask == 0] == -1).all()
