"""Re-run only the tokens a steering vector can change.

Adding a vector at position s of a causal LM changes nothing before s. So for a fixed batch we
run each prompt's prefix [0, s) once, keep its keys and values, and every steered evaluation
runs only the suffix [s, e) on top of that cache, where e - 1 is the prompt's last scored
position. For zero-shot prompts steered and scored at the query arrow the suffix is one token,
so the blocks cost ~1/seq of a full pass; the unembedding, done once for all groups, dominates.

A group of prompts shares one pass: a cache of [0, start) for all of them (no padding, so positions
come out right for every family, absolute or rotary) and the tokens [start, end), where start is
the smallest s and end the largest e in the group. A prompt with a later s re-runs a few unchanged
tokens; one with an earlier e runs a few tokens after its last scored one, which the causal model
ignores. Since a pass on CPU costs about the same for 1 or 10 tokens (it reads every block weight),
`_partition` merges prompt shapes into as few passes as pays (PASS_COST); pass_cost=0 gives one
group per (s, e). Each evaluation works on a copy of the cache: the model appends the suffix's
keys and values to whatever cache it is given.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from icl_circuits.core.model import LM
from icl_circuits.core.sites import Intervention, Site


PASS_COST = 8.0  # on CPU one suffix pass reads every block weight (~20 MB a layer for Gemma 3 270M) whatever its
#                  size: about the cost of re-running 8 more tokens through them (forward + backward)


@dataclass
class _Group:
    rows: torch.Tensor  # [g] prompt indices
    start: int  # first token that is re-run
    end: int  # one past the last scored token
    cache: object | None  # HF cache of tokens [0, start) for these prompts (None when start == 0)


class PrefixCache:
    """Keys/values of every prompt's unchanging prefix; `logprobs` runs the suffixes only."""

    def __init__(
        self, lm: LM, input_ids: torch.Tensor, changed: torch.Tensor, scored: torch.Tensor, pass_cost: float = PASS_COST
    ) -> None:
        """input_ids [batch, seq]; changed, scored: [batch, seq] bool (steered positions; scored positions).

        pass_cost: what one more suffix pass costs, in re-run tokens (see `_partition`); 0 keeps one group
        per (first changed, last scored) pair as before."""
        from transformers import DynamicCache

        self.lm = lm
        if not scored.any(1).all():
            raise ValueError("every prompt needs at least one scored position")
        n_rows = int(scored.sum())
        row_of = torch.full(scored.shape, -1, dtype=torch.long)
        row_of[scored] = torch.arange(n_rows)  # global row of each scored position (torch.nonzero order)
        first = torch.where(changed.any(1), changed.float().argmax(1), torch.full((len(scored),), scored.shape[1]))
        first = torch.minimum(first, scored.float().argmax(1))  # [batch] first token whose output may change
        last = scored.shape[1] - 1 - scored.flip(1).float().argmax(1)  # [batch] last scored position
        self.groups: list[_Group] = []
        order = []
        for rows, s, e in _partition(first, last + 1, pass_cost):
            cache = None
            if s > 0:
                cache = DynamicCache(config=lm.model.config)
                with torch.no_grad():  # fills the cache for every layer (the last site read is the last block's)
                    lm.run(input_ids[rows, :s], read=[Site(lm.n_layers - 1, "resid_post")], past_key_values=cache)
            self.groups.append(_Group(rows, s, e, cache))
            order.append(row_of[rows, s:e][scored[rows, s:e]])
        self.inverse = torch.argsort(torch.cat(order))  # group-major rows -> global row order
        self.input_ids, self.changed, self.scored = input_ids, changed, scored

    def logprobs(
        self, layer: int, start_resid: torch.Tensor, interventions: list[Intervention], unembed_dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """[n_scored, vocab] log-probs in torch.nonzero(scored) order.

        start_resid: resid_pre[layer] of the whole batch [batch, seq, d_model] (the clean values);
        interventions: full-batch interventions at layers >= layer (their masks are cut per group).
        """
        return self.lm.logprobs_of(self.hidden(layer, start_resid, interventions), unembed_dtype)

    def hidden(self, layer: int, start_resid: torch.Tensor, interventions: list[Intervention]) -> torch.Tensor:
        """[n_scored, d_model] final hidden states in torch.nonzero(scored) order (see `logprobs`)."""
        parts = []
        for g in self.groups:
            cut = [
                Intervention(iv.site, iv.positions[g.rows, g.start : g.end], _rows(iv.value, g), iv.mode, iv.fn)
                for iv in interventions
            ]
            out = self.lm.run(
                self.input_ids[g.rows, g.start : g.end],
                start_layer=layer,
                start_resid=start_resid[g.rows, g.start : g.end],
                interventions=cut,
                logprob_positions=self.scored[g.rows, g.start : g.end],
                past_key_values=copy.deepcopy(g.cache) if g.cache is not None else None,
                unembed=False,
            )
            parts.append(out.hidden)
        # one unembedding for all groups (by the caller): it reads the whole [vocab, d_model] matrix, the CPU's main cost
        return torch.cat(parts)[self.inverse]


def _partition(first: torch.Tensor, end: torch.Tensor, pass_cost: float) -> list[tuple[torch.Tensor, int, int]]:
    """Prompts [batch] -> groups (rows, start, end) that re-run tokens [start, end) on a cache of [0, start).

    A group may start before some of its prompts' first changed token (those tokens are then re-run
    unchanged, the values the cache would hold) and end after some of their last scored token (the
    model is causal, so the extra tokens change nothing earlier). So any partition gives the same
    log-probs, up to float summation order; this one minimises  sum over groups of
    pass_cost + rows * (end - start)  by dynamic programming over the sorted distinct (start, end) keys.
    With pass_cost = 0 that is one group per distinct (start, end), the exact-fit grouping."""
    keys = sorted({(int(s), int(e)) for s, e in zip(first, end)})  # grouped in this order, runs of consecutive keys
    n_of = [int(((first == s) & (end == e)).sum()) for s, e in keys]
    best = [0.0] + [math.inf] * len(keys)  # best[j]: cheapest cover of keys[:j]
    cut = [0] * (len(keys) + 1)
    for j in range(1, len(keys) + 1):
        rows, stop = 0, 0
        for i in range(j - 1, -1, -1):  # group = keys[i:j], starting at keys[i]'s start
            rows, stop = rows + n_of[i], max(stop, keys[i][1])
            cost = best[i] + pass_cost + rows * (stop - keys[i][0])
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(keys)
    while j > 0:
        i = cut[j]
        member = torch.zeros(len(first), dtype=torch.bool, device=first.device)
        for s, e in keys[i:j]:
            member |= (first == s) & (end == e)
        groups.append((torch.nonzero(member).flatten(), keys[i][0], max(e for _, e in keys[i:j])))
        j = i
    return groups[::-1]


def _rows(value: torch.Tensor | None, g: _Group) -> torch.Tensor | None:
    """Cut a per-position value [batch, seq, d] to the group; a vector [d] applies everywhere as is."""
    if value is None or value.dim() < 3:
        return value
    return value[g.rows, g.start : g.end]
