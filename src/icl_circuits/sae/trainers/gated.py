"""Gated SAE (Rajamanoharan et al. 2024), the paper's App. B recipe.

A gate path decides which latents fire, a magnitude path (the same encoder rescaled by exp(r_mag))
how strongly: f = 1[x_c @ W_enc + b_gate > 0] * relu(x_c @ W_enc * exp(r_mag) + b_mag). Loss =
reconstruction + decoder-norm-weighted L1 on relu(gate) (Anthropic's penalty; decoder rows are never
renormalised) + the gate path's own reconstruction through a frozen decoder (so the gate learns to
reconstruct too), + ghost grads. `r_mag` is stored in param_dtype like the weights. The export is
exact (`gated_to_jumprelu`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from icl_circuits.sae.dictionary import gated_to_jumprelu
from icl_circuits.sae.trainers.base import SAETrainer


class GatedTrainer(SAETrainer):
    arch = "gated"

    def _arch_params(self) -> dict[str, torch.Tensor]:
        d_sae = self.cfg.d_sae
        return {"b_gate": torch.zeros(d_sae), "b_mag": torch.zeros(d_sae), "r_mag": torch.zeros(d_sae, dtype=self.wdt)}

    def _pre(self, x_c: torch.Tensor, P: dict[str, torch.Tensor]) -> torch.Tensor:
        # the magnitude path: the export's pre-activations (`gated_to_jumprelu`)
        return x_c @ (P["W_enc"] * torch.exp(P["r_mag"])) + P["b_mag"]  # [batch, d_sae]

    def _forward(self, x_c: torch.Tensor, P: dict[str, torch.Tensor]) -> dict[str, Any]:
        pi_gate = x_c @ P["W_enc"] + P["b_gate"]  # [batch, d_sae]
        mag = self._pre(x_c, P)  # [batch, d_sae] magnitude path
        f = (pi_gate > 0).float() * torch.relu(mag)  # [batch, d_sae]
        act = torch.relu(pi_gate)  # [batch, d_sae] what the sparsity penalty sees
        fired = f > 0  # [batch, d_sae]
        return {"f": f, "act": act, "y_hat": f @ P["W_dec"] + P["b_dec"],  # [batch, d_out]
                "y_gate": act @ P["W_dec"].detach() + P["b_dec"].detach(),  # [batch, d_out]
                "fires": fired.sum(0), "l0": fired.sum(-1).float()}  # fmt: skip

    def _dead_pre(self, x_det: torch.Tensor, P: dict[str, torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda idx: x_det @ (P["W_enc"][:, idx] * torch.exp(P["r_mag"][idx])) + P["b_mag"][idx]

    def _encode_inference(self, pre: torch.Tensor, P: dict[str, torch.Tensor]) -> torch.Tensor:
        # gate > 0  <=>  mag > b_mag - exp(r_mag) * b_gate (see gated_to_jumprelu)
        threshold = P["b_mag"] - torch.exp(P["r_mag"]) * P["b_gate"]  # [d_sae]
        return torch.relu(pre) * (pre > threshold)

    def _sparsity(self, out: dict[str, Any]) -> torch.Tensor:
        dec_norm = out["P"]["W_dec"].norm(dim=-1)  # [d_sae]
        return self.cfg.l1_coeff * (out["act"] * dec_norm).sum(-1).mean()  # type: ignore[operator]

    def _aux(self, out: dict[str, Any], y_n: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
        return (y_n - out["y_gate"]).pow(2).sum(-1).mean()

    def _export_tensors(self, P: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sae = gated_to_jumprelu(P["W_enc"], P["b_gate"], P["b_mag"], P["r_mag"], P["W_dec"], P["b_dec"],
                                self.sae_cfg, b_dec_on_input=False)  # fmt: skip
        return dict(sae.tensors())
