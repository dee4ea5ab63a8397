"""Token-type activation masses (Tables 1-2): where on an ICL prompt a feature's activation falls.

The share of a feature's summed activation on prompt / input / arrow / output / newline / extra tokens of
ICL prompts. Executors (layer-12 cleaning) should sit on arrows, detectors (fake-pair cleaning) on outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from icl_circuits.core.model import LM
from icl_circuits.core.sites import Site
from icl_circuits.core.storage import BadFile, check_schema, stamp
from icl_circuits.data.prompts import TYPE_ID
from icl_circuits.sae.dictionary import JumpReLUSAE


# BOS is left out: its residual is an attention sink with a huge norm, dropped from SAE training too.
MASS_TYPES: tuple[str, ...] = ("prompt", "input", "arrow", "output", "newline", "extra")


# Paper, Gemma 1 2B (Tables 1, 2), in %; the paper has no 'extra' row.
PAPER_EXECUTOR_MASS = {"arrow": 89.80, "output": 6.46, "input": 3.2, "newline": 0.54, "prompt": 0.0}


PAPER_DETECTOR_MASS = {"output": 96.76, "input": 3.22, "newline": 0.01, "arrow": 0.0, "prompt": 0.0}


def token_type_masses(latents: torch.Tensor, token_types: torch.Tensor, types: Sequence[str] = MASS_TYPES) -> torch.Tensor:
    """Summed activation of each feature on each token type: latents [batch, seq, F], token_types [batch, seq] -> [F, n_types]."""
    if latents.dim() != 3 or latents.shape[:2] != token_types.shape:
        raise ValueError(f"latents must be [batch, seq, F] matching token_types {tuple(token_types.shape)}, got {tuple(latents.shape)}")
    unknown = [t for t in types if t not in TYPE_ID]
    if unknown or not types:
        raise ValueError(f"unknown token types {unknown}; choose from {sorted(TYPE_ID)}")
    if (latents < 0).any():
        raise ValueError("activation masses need non-negative latents (SAE feature activations)")
    token_types = token_types.to(latents.device)  # prompt tensors are built on the CPU, latents are on the model's device
    return torch.stack([latents[token_types == TYPE_ID[t]].sum(0) for t in types], dim=1).float()  # [F, n_types]


def mass_shares(masses: torch.Tensor) -> torch.Tensor:
    """[F, n_types] masses -> shares summing to 1 per feature (NaN for a feature that never fires)."""
    total = masses.sum(-1, keepdim=True)
    return torch.where(total > 0, masses / total.clamp_min(1e-30), torch.full_like(masses, float("nan")))


@dataclass(frozen=True)
class MassConfig:
    n_prompts: int = 16
    n_shots: int = 16
    seed: int = 0
    batch_size: int = 8

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MassesResult:
    """masses.json: the rows of `activation_masses` (task, role, n_features, total_mass, a share per MASS_TYPES)."""

    rows: list[dict]
    model: str | None = None  # None: a file written before the stamps (a bare row list) names neither
    config: dict | None = None  # MassConfig.to_dict()

    def to_dict(self) -> dict:
        return stamp("masses", dict(model=self.model, config=self.config, rows=self.rows))

    @classmethod
    def from_dict(cls, d: dict | list, where: str = "") -> "MassesResult":
        # masses.json was a bare row list before the stamps (docs/results/gemma-3-270m/detectors/masses.json
        # among them): a list cannot carry a stamp, so it is accepted explicitly as version 1
        d = check_schema("masses", {"rows": d} if isinstance(d, list) else d, where)
        if not isinstance(d.get("rows"), list):
            raise BadFile(f"{where or 'a masses result'}: no 'rows' list (not a masses.json of the detectors command)")
        return cls(d["rows"], d.get("model"), d.get("config"))

    def roles(self) -> list[str]:
        return sorted({r["role"] for r in self.rows})


def activation_masses(
    lm: LM, tasks: Sequence[Any], roles: dict[str, tuple[JumpReLUSAE, dict[str, list[int]]]], cfg: MassConfig = MassConfig(),
    progress: bool = True,
) -> list[dict]:  # fmt: skip
    """Rows (task, role, n_features, share per type) for each role {name: (SAE, {task: features})}.

    Per task, the masses of the role's features on that task's ICL prompts are pooled, then
    turned into shares; `mean_masses` averages the shares over tasks (Tables 1-2).
    One pass per task reads every SAE's site.
    """
    from tqdm.auto import tqdm

    from icl_circuits.methods.task_vectors import TaskVectorConfig, collect_resid, icl_batch

    for role, (sae, _) in roles.items():
        if Site.parse(sae.cfg.site).canonical().kind != "resid_pre":
            raise ValueError(f"role {role}: activation masses read resid_pre SAEs, got {sae.cfg.site}")
    layers = sorted({Site.parse(sae.cfg.site).canonical().layer for sae, _ in roles.values()})
    rows = []
    for task in tqdm(tasks, desc="activation masses", disable=not progress):
        icl = icl_batch(lm, task, TaskVectorConfig(n_prompts=cfg.n_prompts, n_shots=cfg.n_shots, seed=cfg.seed))
        resid, _ = collect_resid(lm, icl, layers, cfg.batch_size)
        for role, (sae, sets) in roles.items():
            feats = sets.get(task.name, [])
            if not feats:
                continue
            with torch.no_grad():
                lat = sae.encode(resid[Site.parse(sae.cfg.site).canonical().layer])[..., feats]  # [batch, seq, F]
            masses = token_type_masses(lat, icl.token_types).sum(0, keepdim=True)  # pooled over the task's features
            shares = mass_shares(masses)[0]
            rows.append(dict(task=task.name, role=role, n_features=len(feats), total_mass=float(masses.sum()),
                             **{t: float(shares[i]) for i, t in enumerate(MASS_TYPES)}))  # fmt: skip
    return rows


def mean_masses(rows: list[dict], role: str) -> dict[str, float]:
    """Shares averaged over the tasks where the role's features fired at all."""
    rs = [r for r in rows if r["role"] == role and r["total_mass"] > 0]
    if not rs:
        raise ValueError(f"no rows with mass for role {role!r}")
    return {t: sum(r[t] for r in rs) / len(rs) for t in MASS_TYPES}


def mass_table(rows: list[dict]) -> list[dict]:
    """Side-by-side table (%): ours for executors / detectors next to the paper's Tables 1-2."""
    roles = sorted({r["role"] for r in rows})
    means = {role: mean_masses(rows, role) for role in roles}
    out = []
    for t in MASS_TYPES:
        row: dict[str, Any] = {"token_type": t}
        for role in roles:
            row[f"{role}_ours_%"] = round(100 * means[role][t], 2)
        row["executor_paper_%"] = PAPER_EXECUTOR_MASS.get(t, "")
        row["detector_paper_%"] = PAPER_DETECTOR_MASS.get(t, "")
        out.append(row)
    return out
