"""TopK SAE with the AuxK loss (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

f = the k largest of relu(x_c @ W_enc + b_enc) per row, the rest zeroed; the decoder product only
touches those k rows of W_dec (`sparse_decode_topk`). No sparsity penalty: k sets L0.

AuxK: the dead latents (the shared dead tracking's `dead_mask`) get a job of their own: the top
aux_k of their pre-activations (relu'd) must reconstruct the main model's residual error e = y - y_hat
(detached) through their decoder rows, without b_dec. Gao et al. add alpha * ||e - e_hat||^2 / var(e)
to a normalised MSE ||y - y_hat||^2 / var(y); our reconstruction term is not normalised, so the same
relative weight is aux = alpha * ||e - e_hat||^2 * var(y) / var(e) (ratio detached). The dead
latents' pre-activations read inputs centred by a detached centre, so AuxK moves only dead latents'
encoder columns, biases and decoder rows.
"""

from __future__ import annotations

from typing import Any

import torch

from icl_circuits.sae.distributed import LOCAL, RowComm
from icl_circuits.sae.sparse import sparse_decode, sparse_decode_topk
from icl_circuits.sae.trainers.base import SAETrainer


def auxk_loss(
    out: dict[str, Any], y_n: torch.Tensor, dead: torch.Tensor, aux_k: int, aux_coeff: float, comm: RowComm = LOCAL
) -> torch.Tensor:
    """AuxK term (see the module docstring); 0 when there are no dead latents or aux_coeff is 0.

    The variances are the global batch's when its rows are split over ranks (`comm`)."""
    y_hat = out["y_hat"]  # [batch, d_out]
    if aux_coeff == 0 or not dead.any():
        return y_hat.new_zeros(())
    dead_idx = dead.nonzero().squeeze(-1)  # [n_dead]
    pre = torch.relu(out["dead_pre"](dead_idx))  # [batch, n_dead]
    top = pre.topk(min(aux_k, dead_idx.numel()), dim=-1)  # [batch, k_aux] among the dead only
    e_hat = sparse_decode_topk(dead_idx[top.indices], top.values, out["P"]["W_dec"])  # [batch, d_out]
    e = (y_n - y_hat).detach()  # [batch, d_out] what the live latents failed to reconstruct
    sse = (e_hat - e).pow(2).sum(-1).mean()
    with torch.no_grad():  # Gao et al.'s normalisation, expressed in our (unnormalised) units
        var_y = comm.row_mean((y_n - comm.col_mean(y_n)).pow(2).sum(-1))
        var_e = comm.row_mean((e - comm.col_mean(e)).pow(2).sum(-1)).clamp(min=1e-12)
    return aux_coeff * sse * (var_y / var_e)


class TopKTrainer(SAETrainer):
    arch = "topk"

    def _export_k(self) -> int | None:
        return self.cfg.k

    def _select(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """a = relu(pre) [batch, d_sae] -> kept entries as COO rows, idx, vals [nnz] (rows sorted)."""
        top = a.topk(self.cfg.k, dim=-1)  # [batch, k]
        rows = torch.arange(a.shape[0], device=a.device).repeat_interleave(self.cfg.k)  # [batch * k]
        return rows, top.indices.reshape(-1), top.values.reshape(-1)

    def _forward(self, x_c: torch.Tensor, P: dict[str, torch.Tensor]) -> dict[str, Any]:
        a = torch.relu(self._pre(x_c, P))  # [batch, d_sae]; the encoder stays dense
        rows, idx, vals = self._select(a)  # [nnz] each
        y_hat = sparse_decode(rows, idx, vals, P["W_dec"], a.shape[0]) + P["b_dec"]  # [batch, d_out]
        on = vals.detach() > 0  # [nnz] a kept entry can be 0 when a row has < k positive pre-activations
        fires = torch.bincount(idx[on], minlength=self.cfg.d_sae)  # [d_sae]
        l0 = torch.bincount(rows[on], minlength=a.shape[0]).float()  # [batch]
        return {"rows": rows, "idx": idx, "vals": vals, "y_hat": y_hat, "fires": fires, "l0": l0}

    def _encode_inference(self, pre: torch.Tensor, P: dict[str, torch.Tensor]) -> torch.Tensor:
        f = torch.relu(pre)  # [batch, d_sae]
        top = f.topk(self.cfg.k, dim=-1)
        return torch.zeros_like(f).scatter(-1, top.indices, top.values)  # [batch, d_sae]

    def _aux(self, out: dict[str, Any], y_n: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
        assert self.cfg.aux_k is not None
        return auxk_loss(out, y_n, dead, self.cfg.aux_k, self.cfg.aux_coeff, self.comm)
