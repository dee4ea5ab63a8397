"""SAE evaluation on held-out tokens: L0, variance explained, dead latents, CE loss recovered.

CE loss recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean), where CE_spliced replaces the
SAE's output site by its reconstruction (at every token but BOS) and CE_zero replaces it by zero.
One clean pass serves every SAE, one zero-ablated pass every SAE writing the same site, and each SAE
costs one more pass (spliced).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from icl_circuits.core.model import LM
from icl_circuits.core.sites import Intervention, Site
from icl_circuits.interventions.splice import in_out_sites, splice
from icl_circuits.sae.cache import ActivationCache
from icl_circuits.sae.dictionary import JumpReLUSAE


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


def zero_ablate(sae: JumpReLUSAE, positions: torch.Tensor) -> Intervention:
    _, dst = in_out_sites(sae)
    return Intervention(dst, positions, torch.zeros(sae.cfg.d_out or sae.cfg.d_in, device=sae.device), "replace")


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
        zero_ce: dict[Site, float] = {}  # zero-ablating a site is the same for every SAE writing it: once per site
        for sae, a in zip(saes, acc):
            src, dst = in_out_sites(sae)
            x = clean.acts[src][splice_at]  # [n_tok, d_in]
            y = clean.acts[dst][splice_at]  # [n_tok, d_out]
            f = sae.encode(x)  # [n_tok, d_sae]
            a.add_stats(f, sae.decode(f, x), y)
            out = lm.run(ids, mask, interventions=[splice(sae, splice_at)], logprob_positions=score_mask, targets=targets)
            a.ce["spliced"] += -out.target_logprobs.sum().item()  # type: ignore[union-attr]
            if dst not in zero_ce:
                out = lm.run(ids, mask, interventions=[zero_ablate(sae, splice_at)], logprob_positions=score_mask, targets=targets)
                zero_ce[dst] = -out.target_logprobs.sum().item()  # type: ignore[union-attr]
            a.ce["zero"] += zero_ce[dst]
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


# -- rows of an activation cache, and ICL prompts by token type ------------------------------
TOKEN_TYPES_SCORED = ("arrow", "input", "output")


@torch.no_grad()
def held_out_stats(sae: JumpReLUSAE, cache: ActivationCache, max_rows: int = 200_000) -> dict[str, float]:
    """FVE, L0 and dead fraction of `sae` on the rows of a held-out cache."""
    src, dst = in_out_sites(sae)
    n, l0, sq, y_sum, y_sq = 0, 0.0, 0.0, None, 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=sae.device)  # [d_sae]
    # cached rows come off disk on the CPU; the SAE may be on a GPU
    for batch in cache.batches(sorted({src, dst}, key=lambda s: s.order), 4096, seed=0, epoch=0, device=sae.device):
        x, y = batch[src], batch[dst]
        f = sae.encode(x)  # [rows, d_sae]
        err = sae.decode(f, x).float() - y  # [rows, d_out] (a skip transcoder adds x @ W_skip)
        n += y.shape[0]
        l0 += (f > 0).sum().item()
        sq += err.pow(2).sum().item()
        y_sum = y.sum(0) if y_sum is None else y_sum + y.sum(0)
        y_sq += y.pow(2).sum().item()
        fired |= (f > 0).any(0)
        if n >= max_rows:
            break
    var = y_sq - y_sum.pow(2).sum().item() / n  # type: ignore[union-attr]
    return dict(fve=1 - sq / var, l0=l0 / n, dead_fraction=1 - fired.float().mean().item(), rows=n)


@torch.no_grad()
def icl_rows(lm: LM, site: Site, out_site: Site, n_prompts: int = 2, n_shots: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Activations of every task's ICL prompts at the SAE's sites, with token types: {'x','y','types'}."""
    from icl_circuits.data.prompts import TOKEN_TYPES, icl_prompts
    from icl_circuits.data.tasks import PAPER_TASKS, load_task

    xs, ys, ts = [], [], []
    for name in PAPER_TASKS:
        batch = icl_prompts(lm.tokenizer, load_task(name), n_prompts, n_shots, seed=seed)
        acts = lm.activations(batch.input_ids, [site, out_site], attention_mask=batch.attention_mask)
        keep = batch.attention_mask.bool() & (batch.token_types != TOKEN_TYPES.index("bos"))  # [batch, seq]
        keep_dev = keep.to(acts[site].device)
        xs.append(acts[site][keep_dev].float())
        ys.append(acts[out_site][keep_dev].float())
        ts.append(batch.token_types[keep].to(lm.device))
    return {"x": torch.cat(xs), "y": torch.cat(ys), "types": torch.cat(ts)}


@torch.no_grad()
def icl_stats(sae: JumpReLUSAE, rows: dict[str, torch.Tensor]) -> tuple[dict[str, float], dict[str, float]]:
    """(FVE, L0) per token type on ICL prompts; FVE against each type's own mean."""
    from icl_circuits.data.prompts import TYPE_ID

    rows = {k: v.to(sae.device) for k, v in rows.items()}  # rows saved by `sae compare` load on the CPU
    f = sae.encode(rows["x"])  # [rows, d_sae]
    err = (sae.decode(f, rows["x"]).float() - rows["y"]).pow(2).sum(-1)  # [rows]
    fve, l0 = {}, {}
    for t in TOKEN_TYPES_SCORED:
        m = rows["types"] == TYPE_ID[t]
        y = rows["y"][m]
        var = (y - y.mean(0)).pow(2).sum().item()
        fve[t] = 1 - err[m].sum().item() / var if var > 0 else float("nan")
        l0[t] = (f[m] > 0).sum(-1).float().mean().item()
    return fve, l0


def cache_stats(
    lm: LM, saes: Sequence[JumpReLUSAE], eval_cache: str | Path, train_cache: str | Path,
    dead_rows: int = 1_000_000, progress: bool = True,
) -> list[dict[str, float]]:  # fmt: skip
    """Per SAE: FVE / L0 on held-out cached rows, the share of latents silent over `dead_rows` training
    rows, and FVE / L0 at the arrow, input and output tokens of the 23 tasks' ICL prompts."""
    ev, tr = ActivationCache(eval_cache), ActivationCache(train_cache)
    out = []
    icl: dict[tuple[Site, Site], dict[str, torch.Tensor]] = {}
    for sae in tqdm(saes, desc="SAE cache stats", disable=not progress):
        src, dst = in_out_sites(sae)
        held = held_out_stats(sae, ev)
        dead = held_out_stats(sae, tr, max_rows=dead_rows)
        if (src, dst) not in icl:
            icl[(src, dst)] = icl_rows(lm, src, dst)
        fve, l0 = icl_stats(sae, icl[(src, dst)])
        row = {"rows_fve": held["fve"], "rows_l0": held["l0"], "rows": held["rows"],
               "dead_fraction_train": dead["dead_fraction"], "dead_rows": dead["rows"]}  # fmt: skip
        row.update({f"icl_fve_{t}": v for t, v in fve.items()})
        row.update({f"icl_l0_{t}": v for t, v in l0.items()})
        out.append(row)
    return out
