"""Re-run only the tokens a steering vector can change.

Adding a vector at position s of a causal LM changes nothing before s. So for a fixed batch we
run each prompt's prefix [0, s) once, keep its keys and values, and every steered evaluation
runs only the suffix [s, e) on top of that cache, where e - 1 is the prompt's last scored
position. For zero-shot prompts steered and scored at the query arrow the suffix is one token,
so the blocks cost ~1/seq of a full pass; the unembedding, done once for all groups, dominates.

Prompts are grouped by (s, e), so no group needs padding and positions come out right for every
family (absolute or rotary). Each evaluation works on a copy of the cache: the model appends
the suffix's keys and values to whatever cache it is given.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .model import LM
from .sites import Intervention, Site


@dataclass
class _Group:
    rows: torch.Tensor  # [g] prompt indices
    start: int  # first token that is re-run
    end: int  # one past the last scored token
    cache: object | None  # HF cache of tokens [0, start) for these prompts (None when start == 0)


class PrefixCache:
    """Keys/values of every prompt's unchanging prefix; `logprobs` runs the suffixes only."""

    def __init__(self, lm: LM, input_ids: torch.Tensor, changed: torch.Tensor, scored: torch.Tensor) -> None:
        """input_ids [batch, seq]; changed, scored: [batch, seq] bool (steered positions; scored positions)."""
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
        keys = sorted({(int(s), int(e) + 1) for s, e in zip(first, last)})
        self.groups: list[_Group] = []
        order = []
        for s, e in keys:
            rows = torch.nonzero((first == s) & (last + 1 == e)).flatten()
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
        # one unembedding for all groups: it reads the whole [vocab, d_model] matrix, which dominates on CPU
        return self.lm.logprobs_of(torch.cat(parts)[self.inverse], unembed_dtype)


def _rows(value: torch.Tensor | None, g: _Group) -> torch.Tensor | None:
    """Cut a per-position value [batch, seq, d] to the group; a vector [d] applies everywhere as is."""
    if value is None or value.dim() < 3:
        return value
    return value[g.rows, g.start : g.end]
