"""Node effects by token type (paper Alg. 2): attribution patching with no SAE in the forward pass.

One forward + backward of the plain model gives, at every SAE's output site, the activation y
and g = dm/dy. Then per SAE

    effect(latent i, position p) = (g_p . W_dec[i] / output_scale) * f_i(p)     (grad x value)
    effect(error, p)             = g_p . (y_p - decode(f(p)))

summed over the positions of each token type: the first-order estimate of ablating the node.
Circuits rank nodes by the *mean* over those positions (per prompt, then over prompts): the
authors' average_over_positions=True, which keeps token types with many positions from crowding
out the others; rank_over='sum' ranks by the summed effect. Sign convention: effect = grad . value, the
first-order estimate of m(clean) - m(node zeroed), i.e. minus the eq. 3 IE of a zero
ablation. Positive = the node helps the metric (as in Alg. 2, which returns grad * latent).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from icl_circuits.core.model import LM
from icl_circuits.core.sites import Site
from icl_circuits.core.storage import atomic_write_bytes
from icl_circuits.data.prompts import PromptBatch, icl_prompts
from icl_circuits.data.tasks import DEFAULT_EVAL_SHARE, Task
from icl_circuits.methods.circuits.config import ERROR, RANK_BY, RANK_OVER, CircuitConfig, CircuitRunConfig
from icl_circuits.methods.circuits.metric import aggregate_by_type, metric_of, metric_scoring, type_index
from icl_circuits.methods.circuits.saes import CircuitSAEs, parse_key

def check_rank_over(over: str) -> str:
    if over not in RANK_OVER:
        raise ValueError(f"rank over one of {RANK_OVER} (positions of a token type), got {over!r}")
    return over


def ranking(effects: torch.Tensor, by: str = "signed") -> torch.Tensor:
    """Node order for circuits, largest first: by signed effect ('signed', the authors' do_abs=False, so a
    harmful node comes last) or by |effect| ('abs'). 'value' is the old name of 'signed'."""
    by = "signed" if by == "value" else by
    if by not in RANK_BY:
        raise ValueError(f"rank by one of {RANK_BY}, got {by!r}")
    key = effects.abs() if by == "abs" else effects
    return torch.argsort(key, descending=True, stable=True)


@dataclass
class NodeEffects:
    """Node effects of one batch: effects[key] is [n_types, d_sae + 1], column d_sae = the error node,
    summed over the positions of each type; means[key] the same averaged over them (per prompt, then
    over prompts), what circuits rank by."""

    keys: list[str]
    node_types: tuple[str, ...]
    effects: dict[str, torch.Tensor]
    metric: float  # m on this batch (clean model)
    grads: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # key -> dm/d(out site) [b, s, d]
    resid: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)  # layer -> resid_pre [b, s, d]
    means: dict[str, torch.Tensor] = field(default_factory=dict)  # key -> [n_types, d_sae + 1] per-position means

    def flat(self, over: str = "sum") -> torch.Tensor:
        """All node effects as one vector, keys in order, each [n_types, d_sae+1] row-major: summed over
        each type's positions ('sum') or averaged over them ('mean')."""
        if check_rank_over(over) == "mean" and set(self.means) != set(self.keys):
            raise ValueError("these node effects have no per-position means (saved before they existed): rank_over='sum'")
        src = self.means if over == "mean" else self.effects
        return torch.cat([src[k].reshape(-1) for k in self.keys])

    def order(self, by: str = "signed", over: str = "mean") -> torch.Tensor:
        """Node ids, best first: by signed or |effect|, on the per-position means or the sums."""
        return ranking(self.flat(over), by)

    def offsets(self) -> dict[str, int]:
        out, o = {}, 0
        for k in self.keys:
            out[k] = o
            o += self.effects[k].numel()
        return out

    def node(self, flat_id: int) -> tuple[str, int | str, str]:
        """flat index -> (key, feature or 'error', token type)."""
        for k, o in self.offsets().items():
            n = self.effects[k].numel()
            if o <= flat_id < o + n:
                t, f = divmod(flat_id - o, self.effects[k].shape[1])
                return k, (ERROR if f == self.effects[k].shape[1] - 1 else f), self.node_types[t]
        raise IndexError(flat_id)

    def flat_id(self, key: str, feature: int | str, token_type: str) -> int:
        width = self.effects[key].shape[1]
        f = width - 1 if feature == ERROR else int(feature)
        return self.offsets()[key] + self.node_types.index(token_type) * width + f

    def top(self, n: int, by: str = "signed", over: str = "mean") -> list[int]:
        return self.order(by, over)[:n].tolist()

    def table(self, n: int = 50, by: str = "signed", over: str = "mean") -> list[dict]:
        """The top-n nodes as rows (key, kind, layer, feature, token type, effect = summed, mean_effect)."""
        flat = self.flat()
        means = self.flat("mean") if self.means else None
        rows = []
        for i in self.top(n, by, over):
            key, feat, tt = self.node(i)
            kind, layer = parse_key(key)
            row = dict(node=i, key=key, kind=kind, layer=layer, feature=feat, token_type=tt, effect=float(flat[i]))
            if means is not None:
                row["mean_effect"] = float(means[i])
            rows.append(row)
        return rows

    def n_nonzero(self) -> int:
        return int((self.flat() != 0).sum())


def node_effects(lm: LM, batch: PromptBatch, saes: CircuitSAEs, cfg: CircuitConfig, keep_grads: bool = False) -> NodeEffects:
    """Alg. 2: one forward + backward of the plain model, then per SAE grad . value by token type."""
    scoring = metric_scoring(batch, cfg)
    sites = {s for k in saes.keys for s in (saes.in_site(k), saes.out_site(k))}
    layers = sorted({parse_key(k)[1] for k in saes.keys})
    sites = sorted(sites | {Site(l, "resid_pre") for l in layers}, key=lambda s: s.order)
    value, acts, grads = lm.gradients(
        batch.input_ids,
        lambda out: metric_of(out)[0],
        sites,
        attention_mask=batch.attention_mask,
        logprob_positions=scoring.positions,
        targets=scoring.targets,
    )
    tix = type_index(batch, cfg.node_types).to(lm.device)  # [b, s]
    effects, means, kept = {}, {}, {}
    with torch.no_grad():
        for key in saes.keys:
            sae = saes.saes[key]
            x, y, g = acts[saes.in_site(key)], acts[saes.out_site(key)], grads[saes.out_site(key)]
            f = sae.encode(x)  # [b, s, d_sae]
            err = y - sae.decode(f, x)  # [b, s, d]; a skip transcoder's x @ W_skip counts as reconstruction
            g_lat = (g @ sae.W_dec.T) / sae.cfg.output_scale  # [b, s, d_sae]: dm/df
            per_pos = torch.cat([g_lat * f, (g * err).sum(-1, keepdim=True)], -1)  # [b, s, d_sae + 1]
            effects[key] = aggregate_by_type(per_pos, tix, len(cfg.node_types)).float().cpu()
            means[key] = aggregate_by_type(per_pos, tix, len(cfg.node_types), mean=True).float().cpu()
            if keep_grads:
                kept[key] = g
    resid = {l: acts[Site(l, "resid_pre")] for l in layers} if keep_grads else {}
    return NodeEffects(saes.keys, tuple(cfg.node_types), effects, float(value), kept, resid, means)


def circuit_batches(lm: LM, task: Task, cfg: CircuitRunConfig) -> tuple[PromptBatch, PromptBatch]:
    """(IE batch from one half of the task's pairs, held-out evaluation batch from the other half)."""
    est, held = task.split(DEFAULT_EVAL_SHARE, cfg.seed)
    for part in (est, held):
        if len(part) < cfg.n_shots + 1:
            raise ValueError(f"task {task.name}: {len(part)} pairs per half, need n_shots + 1 = {cfg.n_shots + 1}")
    return (
        icl_prompts(lm.tokenizer, est, cfg.n_prompts, cfg.n_shots, seed=cfg.seed),
        icl_prompts(lm.tokenizer, held, cfg.n_prompts, cfg.n_shots, seed=cfg.seed + 1),
    )


def save_effects(effects: NodeEffects, path: str | Path) -> Path:
    from safetensors.torch import save

    meta = {"metric": str(effects.metric), "node_types": ",".join(effects.node_types), "keys": ",".join(effects.keys)}
    tensors = {k: v.contiguous() for k, v in effects.effects.items()}
    tensors.update({f"mean/{k}": v.contiguous() for k, v in effects.means.items()})
    return atomic_write_bytes(path, save(tensors, metadata=meta))


def load_effects(path: str | Path) -> NodeEffects:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = meta["keys"].split(",")
        eff = {k: f.get_tensor(k) for k in keys}
        names = set(f.keys())
        means = {k: f.get_tensor(f"mean/{k}") for k in keys if f"mean/{k}" in names}
    return NodeEffects(keys, tuple(meta["node_types"].split(",")), eff, float(meta["metric"]), means=means)
