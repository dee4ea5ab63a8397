"""The quality of the attribution estimates (Fig. 20, 21): single-node ablations vs. grad . value."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from icl_circuits.methods.circuits.config import ERROR
from icl_circuits.methods.circuits.nodes import NodeEffects
from icl_circuits.methods.circuits.saes import parse_key
from icl_circuits.methods.circuits.spliced import SplicedModel, check_same_nodes


def ie_quality(
    spliced: SplicedModel, effects: NodeEffects, token_types: Sequence[str] = ("input", "output", "arrow"),
    max_per_sae: int | None = None, seed: int = 0, chunk: int = 8, progress: bool = False, all_errors: bool = True,
) -> list[dict]:  # fmt: skip
    """Actual single-node ablation effect m(M) - m(M without node) vs. the attribution estimate,
    for the non-zero feature nodes of the given token types: all of them (the authors' check), or a
    seeded uniform sample of at most max_per_sae per SAE and token type. With all_errors every non-zero
    error node is ablated too, for the separate error-node diagnostic (ie_correlations keeps them out of
    the headline). Use the batch the effects were estimated on."""
    from tqdm.auto import tqdm

    check_same_nodes(spliced, effects)
    flat = effects.flat()
    rng = random.Random(seed)
    chosen = []
    for key in effects.keys:
        for tt in token_types:
            t = effects.node_types.index(tt)
            row = effects.effects[key][t]
            ids = [effects.flat_id(key, f, tt) for f in torch.nonzero(row[:-1]).flatten().tolist()]
            if max_per_sae is not None and len(ids) > max_per_sae:
                ids = rng.sample(ids, max_per_sae)
            chosen += ids
            if all_errors and row[-1] != 0:
                chosen.append(effects.flat_id(key, ERROR, tt))
    actual: list[float] = []
    for i in tqdm(range(0, len(chosen), chunk), desc="single-node ablations", disable=not progress):
        pats = torch.stack([spliced.ablation([n]) for n in chosen[i : i + chunk]])
        actual += (spliced.full - spliced.metrics(pats, chunk)).tolist()
    rows = []
    for n, act in zip(chosen, actual):
        key, feat, tt = effects.node(n)
        kind, layer = parse_key(key)
        rows.append(dict(node=n, key=key, kind=kind, layer=layer, feature=feat, token_type=tt, estimate=float(flat[n]), actual=act))
    return rows


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    if len(x) < 3:
        return float("nan")
    t = torch.tensor([list(x), list(y)], dtype=torch.float64)
    t = t - t.mean(1, keepdim=True)
    den = t.norm(dim=1).prod()
    return float((t[0] * t[1]).sum() / den) if den > 0 else float("nan")


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Rank correlation (ties get distinct ranks in input order; effects are continuous)."""
    rank = lambda v: torch.argsort(torch.argsort(torch.tensor(list(v), dtype=torch.float64))).double().tolist()  # noqa: E731
    return pearson(rank(x), rank(y)) if len(x) >= 3 else float("nan")


def ie_correlations(rows: Sequence[dict], by: Sequence[str] = ("layer",)) -> list[dict]:
    """Pearson r of estimate vs. actual per group (by=('layer',), ('kind', 'layer'), ...).

    The headline r / rho / n are the authors' metric: feature nodes only. Error nodes are a separate
    diagnostic (r_with_errors, n_errors): a few large, badly estimated error nodes can carry r."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in by), []).append(r)
    out = []
    for g, rs in sorted(groups.items()):
        lat = [r for r in rs if str(r["feature"]) != ERROR]
        est, act = [r["estimate"] for r in lat], [r["actual"] for r in lat]
        out.append({**dict(zip(by, g)), "n": len(lat), "r": pearson(est, act), "rho": spearman(est, act),
                    "n_errors": len(rs) - len(lat),
                    "r_with_errors": pearson([r["estimate"] for r in rs], [r["actual"] for r in rs])})  # fmt: skip
    return out
