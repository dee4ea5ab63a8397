"""The circuit metric m and the token-type bookkeeping shared by node effects, edges and the spliced model."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from icl_circuits.core.model import RunOutput
from icl_circuits.data.prompts import TYPE_ID, PromptBatch, Scoring
from icl_circuits.methods.circuits.config import CircuitConfig


def metric_scoring(batch: PromptBatch, cfg: CircuitConfig) -> Scoring:
    scoring = batch.scoring(cfg.metric_pairs, cfg.n_score_tokens)
    if not scoring.positions.any():
        raise ValueError(f"metric {cfg.metric_pairs!r} scores no position: prompts need >= 2 pairs for 'all_but_first'")
    return scoring


def metric_of(out: RunOutput, n_copies: int = 1) -> torch.Tensor:
    """[n_copies] mean target log-prob per copy (copies are stacked along the batch)."""
    lp = out.target_logprobs  # [n_copies * n]
    assert lp is not None
    return lp.view(n_copies, -1).mean(-1)


def type_index(batch: PromptBatch, node_types: Sequence[str]) -> torch.Tensor:
    """[batch, seq] long: index into node_types, or -1 where the token is not a node (bos, padding)."""
    idx = torch.full_like(batch.token_types, -1)
    for i, t in enumerate(node_types):
        idx[batch.token_types == TYPE_ID[t]] = i
    return idx


def error_node_mask(widths: Sequence[int], n_types: int) -> torch.Tensor:
    """[n_nodes] bool, True at every SAE's error node, in the flat node order of NodeEffects and SplicedModel:
    SAE by SAE, each [n_types, width] row-major with the error node last (width = d_sae + 1)."""
    mask = torch.zeros(n_types * sum(widths), dtype=torch.bool)
    o = 0
    for w in widths:
        mask[o + w - 1 : o + n_types * w : w] = True
        o += n_types * w
    return mask


def aggregate_by_type(per_position: torch.Tensor, tix: torch.Tensor, n_types: int, mean: bool = False) -> torch.Tensor:
    """Sum per-position values over the positions of each token type, or (mean=True) average them over
    each prompt's positions of that type, then over the prompts that have it (the authors' mask_average
    with average_over_positions=True).

    per_position [batch, seq, n], tix [batch, seq] (-1 = not a node) -> [n_types, n].
    """
    onehot = torch.zeros(*tix.shape, n_types + 1, dtype=per_position.dtype, device=per_position.device)
    onehot.scatter_(-1, (tix.to(per_position.device) % (n_types + 1)).unsqueeze(-1), 1.0)  # -1 -> last column
    onehot = onehot[..., :n_types]  # [b, s, t]
    if mean:
        count = onehot.sum(1, keepdim=True)  # [b, 1, t] positions of each type per prompt
        prompts = (count > 0).sum(0).clamp(min=1)  # [1, t] prompts that have the type
        onehot = onehot / count.clamp(min=1) / prompts
    return torch.einsum("bst,bsn->tn", onehot, per_position)
