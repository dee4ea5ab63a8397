"""BatchTopK SAE (Bussmann, Leask & Nanda 2024, "BatchTopK sparse autoencoders").

Training keeps the k * batch largest activations relu(x_c @ W_enc + b_enc) of the whole batch (a
row may keep more or fewer than k), decoded sparsely (`sparse_decode`, COO form), plus AuxK on dead
latents as for TopK. Rows are not independent in training, so inference uses one global threshold
theta instead: f = relu(pre) * (pre > theta), theta an exponential moving average (momentum
`threshold_momentum`) of the smallest activation the batch top-k kept. The export is a JumpReLUSAE
with threshold theta for every latent and k = None, equal to `encode` (threshold mode).
"""

from __future__ import annotations

from typing import Any

import torch

from icl_circuits.sae.dictionary import SAEConfig
from icl_circuits.sae.trainers.base import SAETrainer, TrainerConfig
from icl_circuits.sae.trainers.topk import TopKTrainer


def batch_topk_indices(a: torch.Tensor, k: int, candidates: int = 4) -> torch.Tensor:
    """Sorted flat indices of the k * batch largest entries of a [batch, d_sae] (ties broken arbitrarily).

    A flat top-k over batch * d_sae entries is slow on CPU (~0.2 s for 4096 x 4096), so first each
    row's `candidates * k` largest are taken, and the batch top-k among those. That is exact whenever
    every row's smallest candidate lies below the selected cut-off (then no entry left out of the
    candidates can beat it); otherwise (a row holding very many of the batch's largest entries, or
    ties at zero) it falls back to the flat top-k.
    """
    batch, d_sae = a.shape
    n_keep = min(k * batch, a.numel())
    per_row = candidates * k
    if per_row < d_sae:
        cand = a.topk(per_row, dim=-1)  # [batch, per_row] sorted descending
        top = cand.values.reshape(-1).topk(n_keep, sorted=False)  # [n_keep] among the candidates
        cutoff = top.values.min()  # the n_keep-th largest candidate
        if bool((cand.values[:, -1] < cutoff).all()):  # nothing outside the candidates reaches the cut-off
            rows = top.indices // per_row  # [n_keep]
            cols = cand.indices.reshape(-1)[top.indices]  # [n_keep]
            return (rows * d_sae + cols).sort().values
    return a.reshape(-1).topk(n_keep, sorted=False).indices.sort().values


class BatchTopKTrainer(TopKTrainer):
    arch = "batchtopk"
    _STATE = ("threshold", "threshold_set")

    def __init__(self, cfg: TrainerConfig, sae_cfg: SAEConfig) -> None:
        super().__init__(cfg, sae_cfg)
        self.threshold = torch.zeros(())  # [] float32 global inference threshold (normalised units)
        self.threshold_set = False  # the first successful step sets it outright

    def _export_k(self) -> int | None:
        return None

    def _select(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, d_sae = a.shape
        if self.comm.world == 1:
            flat = batch_topk_indices(a.detach(), self.cfg.k)  # [n_keep] flat indices into a, sorted
        else:  # rows split over ranks: the top k * (global rows) of the global batch (sae/distributed.py)
            flat = self.comm.global_topk_flat(a, self.cfg.k * self.comm.rows(batch))  # [<= n_keep] this rank's
        vals = a.reshape(-1)[flat]  # [n_keep] (gradient flows to the kept pre-activations)
        pos = vals.detach() > 0  # drop kept zeros (fewer positive activations than k * batch)
        flat, vals = flat[pos], vals[pos]
        return flat // d_sae, flat % d_sae, vals  # row-major order: rows sorted, as the CSR decode wants

    def _forward(self, x_c: torch.Tensor, P: dict[str, torch.Tensor]) -> dict[str, Any]:
        out = super()._forward(x_c, P)
        vals = out["vals"].detach()  # [nnz]
        out["min_kept"] = self.comm.min_or_none(vals)  # [] the (global) batch's effective threshold
        return out

    def _commit(self, out: dict[str, Any]) -> None:
        m = out["min_kept"]
        if m is None:
            return
        if not self.threshold_set:
            self.threshold = m.detach().float().clone()
            self.threshold_set = True
        else:
            mom = self.cfg.threshold_momentum
            self.threshold = mom * self.threshold + (1 - mom) * m.detach().float()

    def _encode_inference(self, pre: torch.Tensor, P: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.relu(pre) * (pre > self.threshold)  # same formula as JumpReLUSAE.encode

    def _export_tensors(self, P: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        t = SAETrainer._export_tensors(self, P)
        t["threshold"] = self.threshold.expand(self.cfg.d_sae).clone()  # [d_sae] one threshold for all
        return t
