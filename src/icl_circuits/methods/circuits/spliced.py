"""The model with the circuit's SAEs spliced in, and the faithfulness of eq. 4 it measures.

At every SAE site of the circuit the spliced model computes, in the same pass,

    out = y - decode_linear(f * a_f) - a_e * (y - decode(f)),   f = encode(x)

where a_f [.., d_sae] and a_e [.., 1] are 1 where a node is ablated (by token type) and 0
elsewhere. That is decode(f * keep) + keep_e * error, written so that with no ablation the
output is y itself, bit for bit: the spliced model reproduces the original exactly. Ablating
everything leaves decode(0) = b_dec (zero ablation of latents and error, as in the paper).
Runs start at the first SAE layer from a cached resid_pre and score only the metric positions;
several ablation patterns run as stacked copies of the batch in one forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from icl_circuits.core.model import LM
from icl_circuits.core.sites import Site
from icl_circuits.data.prompts import PromptBatch
from icl_circuits.interventions.splice import splice
from icl_circuits.methods.circuits.config import CircuitConfig
from icl_circuits.methods.circuits.metric import error_node_mask, metric_of, metric_scoring, type_index
from icl_circuits.methods.circuits.nodes import NodeEffects
from icl_circuits.methods.circuits.saes import CircuitSAEs


def faithfulness(m: float, m_full: float, m_empty: float) -> float:
    """Eq. 4: (m(C) - m(empty)) / (m(M) - m(empty))."""
    return (m - m_empty) / (m_full - m_empty) if m_full != m_empty else float("nan")


class SplicedModel:
    """The model with the circuit's SAEs spliced in (error terms kept), on one fixed batch.

    An ablation pattern is a bool vector over all nodes (NodeEffects.flat order): True = zeroed.
    """

    def __init__(self, lm: LM, batch: PromptBatch, saes: CircuitSAEs, cfg: CircuitConfig) -> None:
        self.lm, self.batch, self.saes, self.cfg = lm, batch, saes, cfg
        self.scoring = metric_scoring(batch, cfg)
        self.keys = saes.keys
        self.sizes = saes.sizes()
        self.n_types = len(cfg.node_types)
        self.offsets, o = {}, 0
        for k in self.keys:
            self.offsets[k] = o
            o += self.n_types * self.sizes[k]
        self.n_nodes = o
        self.tix = type_index(batch, cfg.node_types).to(lm.device)  # [b, s]
        self.start = saes.start_layer
        start_site = Site(self.start, "resid_pre")
        with torch.no_grad():
            out = lm.run(
                batch.input_ids, batch.attention_mask, read=[start_site] if self.start > 0 else [],
                logprob_positions=self.scoring.positions, targets=self.scoring.targets,
            )  # fmt: skip
        self.start_resid = out.acts.get(start_site)  # [b, s, d] or None at layer 0
        self.clean = float(metric_of(out)[0])  # m of the plain model
        self._empty: dict[bool, float] = {}  # keep_errors -> m(empty)
        self.error_nodes = error_node_mask([self.sizes[k] for k in self.keys], self.n_types)  # [n_nodes]

    @property
    def full(self) -> float:
        """m(M): nothing ablated. Equal to the plain model's metric by construction."""
        return self.clean

    def empty_metric(self, keep_errors: bool = True) -> float:
        """m(empty): every feature node ablated with the error nodes kept (the authors' baseline, the
        default), or every node, error nodes too (keep_errors=False)."""
        if keep_errors not in self._empty:
            everything = ~self.error_nodes if keep_errors else torch.ones(self.n_nodes, dtype=torch.bool)
            self._empty[keep_errors] = self.metric(everything)
        return self._empty[keep_errors]

    @property
    def empty(self) -> float:
        """m(empty) of the default method: every feature ablated, error nodes kept."""
        return self.empty_metric(True)

    def faithfulness(self, m: float, keep_errors: bool = True) -> float:
        return faithfulness(m, self.full, self.empty_metric(keep_errors))

    def ablation(self, nodes: Sequence[int], complement: bool = False) -> torch.Tensor:
        """[n_nodes] bool: ablate `nodes` (or, with complement=True, everything except them)."""
        a = torch.zeros(self.n_nodes, dtype=torch.bool)
        a[torch.as_tensor(list(nodes), dtype=torch.long)] = True
        return ~a if complement else a

    @torch.no_grad()
    def metrics(self, ablated: torch.Tensor, chunk: int = 4) -> torch.Tensor:
        """ablated [k, n_nodes] bool -> [k] metric values, `chunk` patterns per forward pass."""
        if ablated.dim() != 2 or ablated.shape[1] != self.n_nodes:
            raise ValueError(f"ablation patterns must be [k, n_nodes={self.n_nodes}], got {tuple(ablated.shape)}")
        return torch.cat([self._run(ablated[i : i + chunk]) for i in range(0, len(ablated), chunk)])

    def metric(self, ablated: torch.Tensor) -> float:
        return float(self.metrics(ablated[None])[0])

    def _run(self, ablated: torch.Tensor) -> torch.Tensor:
        k = ablated.shape[0]
        b = self.batch
        node_pos = (self.tix >= 0)[None, ..., None]  # [1, b, s, 1]
        ivs = []
        for key in self.keys:
            o, w = self.offsets[key], self.sizes[key]
            a = ablated[:, o : o + self.n_types * w].reshape(k, self.n_types, w).to(self.lm.device)
            if not a.any():
                continue  # nothing ablated here: the site is untouched (exactly the original)
            per_pos = (a[:, self.tix.clamp(min=0)] & node_pos).flatten(0, 1)  # [k*b, s, d_sae+1]
            # the SAE spliced with its error kept: only the ablated latents and error nodes change the site
            everywhere = torch.ones(per_pos.shape[:2], dtype=torch.bool, device=per_pos.device)  # [k*b, s]
            ivs.append(splice(self.saes.saes[key], everywhere, keep_error=True, ablate=per_pos[..., :-1],
                              ablate_error=per_pos[..., -1:], sites=(self.saes.in_site(key), self.saes.out_site(key))))  # fmt: skip
        out = self.lm.run(
            b.input_ids.repeat(k, 1), b.attention_mask.repeat(k, 1), interventions=ivs,
            start_layer=self.start, start_resid=None if self.start_resid is None else self.start_resid.repeat(k, 1, 1),
            logprob_positions=self.scoring.positions.repeat(k, 1), targets=self.scoring.targets.repeat(k),
        )  # fmt: skip
        return metric_of(out, k).float().cpu()


def check_same_nodes(spliced: SplicedModel, effects: NodeEffects) -> None:
    """Raise when the node effects were not computed over the spliced model's SAEs and token types."""
    n = sum(e.numel() for e in effects.effects.values())
    if effects.keys != spliced.keys or n != spliced.n_nodes or tuple(effects.node_types) != tuple(spliced.cfg.node_types):
        raise ValueError("node effects and spliced model disagree on SAEs or node types")
