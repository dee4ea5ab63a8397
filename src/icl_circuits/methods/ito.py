"""Inference-time optimisation (ITO; Smith 2024): sparse codes by gradient pursuit, a baseline for TVC.

Gradient pursuit (Blumensath & Davies 2008), non-negative as in the paper's baseline: each of
`target_l0` iterations adds the atom most aligned with the residual to the support, then takes
an exact line-search gradient step on all supported weights and clips them at zero. So the code
has at most `target_l0` active latents.

For an SAE the signal is what the decoder must produce before its bias: x * output_scale - b_dec,
and reconstructions include b_dec again, exactly like `JumpReLUSAE.decode`, so ITO, plain SAE
reconstruction and TVC steer with vectors of the same form. Atoms are unit-normalised decoder rows
for the selection and the step; the returned weights are in the SAE's latent units.
"""

from __future__ import annotations

import torch

from icl_circuits.sae.dictionary import JumpReLUSAE


@torch.no_grad()
def gradient_pursuit(
    signal: torch.Tensor,  # [d]
    dictionary: torch.Tensor,  # [n_atoms, d], rows need not be unit norm
    target_l0: int,
    nonnegative: bool = True,
) -> torch.Tensor:
    """Weights w [n_atoms] with at most target_l0 non-zeros such that w @ dictionary ≈ signal."""
    if signal.dim() != 1 or dictionary.dim() != 2 or dictionary.shape[1] != signal.shape[0]:
        raise ValueError(f"need signal [d] and dictionary [n_atoms, d]; got {tuple(signal.shape)} and {tuple(dictionary.shape)}")
    if target_l0 < 1:
        raise ValueError(f"target_l0 must be >= 1, got {target_l0}")
    # float64 where the device has it (MPS does not); everything on the dictionary's device
    work = torch.float32 if dictionary.device.type == "mps" else torch.float64
    D = dictionary.to(work)
    norms = D.norm(dim=1).clamp_min(1e-12)  # [n_atoms]
    atoms = D / norms[:, None]  # [n_atoms, d]
    y = signal.to(device=D.device, dtype=work)  # [d]
    w = torch.zeros(D.shape[0], dtype=work, device=D.device)  # [n_atoms] weights of the unit atoms
    support = torch.zeros(D.shape[0], dtype=torch.bool, device=D.device)  # [n_atoms]
    for _ in range(target_l0):
        residual = y - w @ atoms  # [d]
        corr = atoms @ residual  # [n_atoms]
        pick = corr.masked_fill(support, -torch.inf) if nonnegative else corr.abs().masked_fill(support, -torch.inf)
        support[int(pick.argmax())] = True
        grad = torch.where(support, corr, torch.zeros_like(corr))  # [n_atoms]
        c = grad @ atoms  # [d]
        cc = c @ c
        if cc <= 0:
            break
        w = w + (c @ residual) / cc * grad
        if nonnegative:
            w = w.clamp_min(0)
    return (w / norms).to(signal.dtype)


def ito_weights(sae: JumpReLUSAE, vector: torch.Tensor, target_l0: int) -> torch.Tensor:
    """[d_sae] non-negative latent weights whose decoding (with b_dec) approximates `vector` [d_model]."""
    if vector.shape != (sae.cfg.d_out,):
        raise ValueError(f"vector must be [{sae.cfg.d_out}], got {tuple(vector.shape)}")
    W = sae.W_dec.detach().float()  # [d_sae, d_out]
    target = vector.to(W.device).float() * sae.cfg.output_scale - sae.b_dec.detach().float()  # [d_out]
    return gradient_pursuit(target, W, target_l0).float()
