"""Matryoshka BatchTopK SAE (Bussmann et al. 2025, "Learning multi-level features with Matryoshka
SAEs"; Nabeshima 2024).

Latents are selected exactly as in BatchTopK, but the reconstruction loss is taken over nested
prefixes of the latents: with prefix sizes m_1 < ... < m_G = d_sae (`matryoshka_groups`), every
prefix f[:, :m_g] must reconstruct y on its own, so early latents learn general features and later
ones refine them. Loss term = mean over g of ||y - (f[:, :m_g] @ W_dec[:m_g] + b_dec)||^2 (the mean,
not the sum, only rescales the loss by 1/G and keeps it in the units of the other archs' recon);
the reported `recon` is the full reconstruction's. Each entry is decoded once: per-group sparse
decodes, then a cumulative sum over groups. Threshold, AuxK and export as in BatchTopK.
"""

from __future__ import annotations

from typing import Any

import torch

from icl_circuits.sae.sparse import sparse_decode
from icl_circuits.sae.trainers.batchtopk import BatchTopKTrainer


class MatryoshkaTrainer(BatchTopKTrainer):
    arch = "matryoshka"

    def _forward(self, x_c: torch.Tensor, P: dict[str, torch.Tensor]) -> dict[str, Any]:
        assert self.cfg.matryoshka_groups is not None
        a = torch.relu(self._pre(x_c, P))  # [batch, d_sae]; the encoder stays dense
        batch = a.shape[0]
        rows, idx, vals = self._select(a)  # [nnz] each, rows sorted
        bounds = torch.tensor(self.cfg.matryoshka_groups, device=idx.device)  # [G] prefix ends
        group = torch.searchsorted(bounds, idx, right=True)  # [nnz] latent j is in group g iff m_{g-1} <= j < m_g
        prefix = P["b_dec"].expand(batch, -1)  # [batch, d_out] the empty prefix reconstructs b_dec
        prefixes = []
        for g in range(len(bounds)):
            m = group == g  # [nnz]
            prefix = prefix + sparse_decode(rows[m], idx[m], vals[m], P["W_dec"], batch)  # [batch, d_out]
            prefixes.append(prefix)
        on = vals.detach() > 0
        return {"rows": rows, "idx": idx, "vals": vals, "y_hat": prefixes[-1], "prefixes": prefixes,
                "fires": torch.bincount(idx[on], minlength=self.cfg.d_sae),
                "l0": torch.bincount(rows[on], minlength=batch).float(),
                "min_kept": self.comm.min_or_none(vals.detach())}  # fmt: skip

    def _recon_terms(self, out: dict[str, Any], y_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        errs = [(p - y_n).pow(2).sum(-1).mean() for p in out["prefixes"]]  # one per nested prefix
        return torch.stack(errs).mean(), errs[-1]
