"""SAE evaluation on held-out tokens: L0, variance explained, dead latents, CE loss recovered.

CE loss recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean), where CE_spliced replaces the
SAE's output site by its reconstruction (at every token but BOS) and CE_zero replaces it by zero.
One clean pass serves every SAE; each SAE then costs two more passes (spliced, zero-ablated).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..model import LM
from ..sites import Intervention, Site
from .dictionary import JumpReLUSAE


@dataclass
class SAEEval:
    site: str
    n_tokens: int
    l0: float  # mean active latents per token
    fve: float  # fraction of variance explained
    mse: float  # mean squared error per token (summed over features)
    dead_fraction: float  # latents that never fired on these tokens
    ce_clean: float
    ce_spliced: float
    ce_zero: float
    ce_loss_recovered: float

    def to_dict(self) -> dict:
        return asdict(self)


def in_out_sites(sae: JumpReLUSAE) -> tuple[Site, Site]:
    """(site the SAE reads, site its output replaces)."""
    cfg = sae.cfg
    return Site.parse(cfg.site), Site.parse(cfg.out_site or cfg.site)


def splice(sae: JumpReLUSAE, positions: torch.Tensor) -> Intervention:
    """Replace the SAE's output site by its reconstruction at `positions` [batch, seq]."""
    src, dst = in_out_sites(sae)
    if src == dst:
        return Intervention(dst, positions, mode="fn", fn=lambda x, value_of: sae(x))
    return Intervention(dst, positions, mode="fn", fn=lambda x, value_of: sae(value_of(src)))


def zero_ablate(sae: JumpReLUSAE, positions: torch.Tensor) -> Intervention:
    _, dst = in_out_sites(sae)
    return Intervention(dst, positions, torch.zeros(sae.cfg.d_out or sae.cfg.d_in), "replace")


@torch.no_grad()
def evaluate_saes(
    lm: LM,
    saes: Sequence[JumpReLUSAE],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],  # (input_ids [b, s], attention_mask [b, s]), BOS first
    progress: bool = True,
) -> list[SAEEval]:
    for sae in saes:
        sae.check_compatible(lm)
    sites = sorted({s for sae in saes for s in in_out_sites(sae)}, key=lambda s: s.order)
    acc = [_Acc(sae.cfg.d_sae) for sae in saes]
    ce_clean_sum, n_pred = 0.0, 0
    for ids, mask in tqdm(list(batches), desc="SAE eval", disable=not progress):
        real = mask.bool()  # [b, s]
        splice_at = real.clone()
        splice_at[:, 0] = False  # SAEs never saw BOS
        scored = real[:, :-1] & real[:, 1:]  # positions whose next token is real
        score_mask = torch.cat([scored, torch.zeros_like(real[:, :1])], 1)  # [b, s]
        targets = ids[:, 1:][scored]  # [n]
        clean = lm.run(ids, mask, read=sites, logprob_positions=score_mask, targets=targets)
        ce_clean_sum += -clean.target_logprobs.sum().item()  # type: ignore[union-attr]
        n_pred += targets.numel()
        for sae, a in zip(saes, acc):
            src, dst = in_out_sites(sae)
            x = clean.acts[src][splice_at]  # [n_tok, d_in]
            y = clean.acts[dst][splice_at]  # [n_tok, d_out]
            f = sae.encode(x)  # [n_tok, d_sae]
            a.add_stats(f, sae.decode(f), y)
            for name, iv in (("spliced", splice(sae, splice_at)), ("zero", zero_ablate(sae, splice_at))):
                out = lm.run(ids, mask, interventions=[iv], logprob_positions=score_mask, targets=targets)
                a.ce[name] += -out.target_logprobs.sum().item()  # type: ignore[union-attr]
    ce_clean = ce_clean_sum / max(n_pred, 1)
    return [a.result(sae.cfg.site, ce_clean, n_pred) for sae, a in zip(saes, acc)]


class _Acc:
    """Running sums for one SAE."""

    def __init__(self, d_sae: int) -> None:
        self.n = 0
        self.l0 = 0.0
        self.sq_err = 0.0
        self.y_sum: torch.Tensor | None = None
        self.y_sq = 0.0
        self.fired = torch.zeros(d_sae, dtype=torch.bool)
        self.ce = {"spliced": 0.0, "zero": 0.0}

    def add_stats(self, f: torch.Tensor, y_hat: torch.Tensor, y: torch.Tensor) -> None:
        self.n += y.shape[0]
        self.l0 += (f > 0).sum().item()
        self.sq_err += (y_hat.float() - y.float()).pow(2).sum().item()
        s = y.float().sum(0)
        self.y_sum = s if self.y_sum is None else self.y_sum + s
        self.y_sq += y.float().pow(2).sum().item()
        self.fired |= (f > 0).any(0).cpu()

    def result(self, site: str, ce_clean: float, n_pred: int) -> SAEEval:
        n = max(self.n, 1)
        total_var = self.y_sq - (self.y_sum.pow(2).sum().item() / n if self.y_sum is not None else 0.0)
        ce_s, ce_z = self.ce["spliced"] / max(n_pred, 1), self.ce["zero"] / max(n_pred, 1)
        return SAEEval(
            site=site,
            n_tokens=self.n,
            l0=self.l0 / n,
            fve=1.0 - self.sq_err / total_var if total_var > 0 else float("nan"),
            mse=self.sq_err / n,
            dead_fraction=1.0 - self.fired.float().mean().item(),
            ce_clean=ce_clean,
            ce_spliced=ce_s,
            ce_zero=ce_z,
            ce_loss_recovered=(ce_z - ce_s) / (ce_z - ce_clean) if ce_z != ce_clean else float("nan"),
        )
