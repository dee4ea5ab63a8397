"""JumpReLU SAE trained directly (Rajamanoharan et al. 2024, "Jumping ahead: improving reconstruction
fidelity with JumpReLU sparse autoencoders"; the Gemma Scope recipe).

f = pre * H(pre - theta) with pre = x_c @ W_enc + b_enc and a learned per-latent threshold
theta = exp(log_threshold) > 0 (so this equals relu(pre) * (pre > theta), JumpReLUSAE's formula).
Loss = reconstruction + l0_coeff * L0, L0 = sum_j H(pre_j - theta_j) (mean over rows). H has zero
gradient almost everywhere, so both theta-gradients use straight-through estimators with the
rectangle kernel K(u) = 1[|u| < 1/2] of bandwidth eps = `jumprelu_bandwidth`:
    d JumpReLU / d theta = -(theta / eps) * K((pre - theta) / eps)
    d H(pre - theta) / d theta = -(1 / eps) * K((pre - theta) / eps)
while d JumpReLU / d pre = H(pre - theta) (exact) and H passes no gradient to pre, so the L0 penalty
acts through the thresholds only. theta starts at `jumprelu_init_threshold`. The export is exact:
threshold = theta, k = None.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from icl_circuits.sae.trainers.base import SAETrainer


def _rect(pre: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
    """K((pre - theta) / eps) with K the unit rectangle: [batch, d_sae] float."""
    return ((pre - theta).abs() < eps / 2).to(pre.dtype)


class JumpReLUFn(torch.autograd.Function):
    """pre [batch, d_sae], theta [d_sae] -> pre * H(pre - theta), STE for theta."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        pre, theta = ctx.saved_tensors
        grad_pre = g * (pre > theta)  # [batch, d_sae]
        grad_theta = (g * (-(theta / ctx.eps)) * _rect(pre, theta, ctx.eps)).sum(0)  # [d_sae]
        return grad_pre, grad_theta, None


class HeavisideFn(torch.autograd.Function):
    """pre [batch, d_sae], theta [d_sae] -> H(pre - theta) as float, STE for theta, no gradient to pre."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        pre, theta = ctx.saved_tensors
        grad_theta = (g * (-1.0 / ctx.eps) * _rect(pre, theta, ctx.eps)).sum(0)  # [d_sae]
        return None, grad_theta, None


class JumpReLUTrainer(SAETrainer):
    arch = "jumprelu"

    def _arch_params(self) -> dict[str, torch.Tensor]:
        d_sae = self.cfg.d_sae
        # the threshold is learned in log space so it stays > 0 (then pre * H(pre - theta) = relu(pre) * ...)
        log_theta = torch.full((d_sae,), math.log(self.cfg.jumprelu_init_threshold))  # [d_sae]
        return {"b_enc": torch.zeros(d_sae), "log_threshold": log_theta}

    def _theta(self, P: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.exp(P["log_threshold"])  # [d_sae]

    def _forward(self, x_c: torch.Tensor, P: dict[str, torch.Tensor]) -> dict[str, Any]:
        pre = self._pre(x_c, P)  # [batch, d_sae]
        theta = self._theta(P)  # [d_sae]
        eps = self.cfg.jumprelu_bandwidth
        f = JumpReLUFn.apply(pre, theta, eps)  # [batch, d_sae]
        on = HeavisideFn.apply(pre, theta, eps)  # [batch, d_sae] 0/1, STE to theta
        fired = f.detach() > 0
        return {"f": f, "l0_soft": on.sum(-1).mean(), "y_hat": f @ P["W_dec"] + P["b_dec"],
                "fires": fired.sum(0), "l0": fired.sum(-1).float()}  # fmt: skip

    def _encode_inference(self, pre: torch.Tensor, P: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.relu(pre) * (pre > self._theta(P))  # JumpReLUSAE.encode's formula

    def _sparsity(self, out: dict[str, Any]) -> torch.Tensor:
        return self.cfg.l0_coeff * out["l0_soft"]  # type: ignore[operator]

    def _export_tensors(self, P: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        t = super()._export_tensors(P)
        t["threshold"] = self._theta(P)
        return t
