"""Standard ReLU SAE with Anthropic's decoder-norm-weighted L1 penalty (Conerly et al. 2024).

f = relu(x_c @ W_enc + b_enc); loss = reconstruction + l1_coeff * sum_j f_j * ||W_dec[j]|| + ghost
grads. Export: threshold 0.
"""

from __future__ import annotations

from typing import Any

import torch

from icl_circuits.sae.trainers.base import SAETrainer


class ReLUTrainer(SAETrainer):
    arch = "relu"

    def _forward(self, x_c: torch.Tensor, P: dict[str, torch.Tensor]) -> dict[str, Any]:
        f = torch.relu(self._pre(x_c, P))  # [batch, d_sae]
        fired = f > 0  # [batch, d_sae]
        return {"f": f, "y_hat": f @ P["W_dec"] + P["b_dec"], "fires": fired.sum(0), "l0": fired.sum(-1).float()}

    def _encode_inference(self, pre: torch.Tensor, P: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.relu(pre)

    def _sparsity(self, out: dict[str, Any]) -> torch.Tensor:
        dec_norm = out["P"]["W_dec"].norm(dim=-1)  # [d_sae]
        return self.cfg.l1_coeff * (out["f"] * dec_norm).sum(-1).mean()  # type: ignore[operator]
