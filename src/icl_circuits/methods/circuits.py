"""Sparse feature circuits for ICL (paper Sec. 4, App. E, Alg. 2): node and edge effects by token type.

A *node* is (SAE, feature, token type): one latent of a residual SAE (reads and writes
resid_pre[l]), an attention SAE (attn_out[l]) or a transcoder (resid_mid[l] -> mlp_out[l]),
or that SAE's error node, with its effect summed over every position of one token type.

Node effects (Alg. 2) need no SAE in the forward pass: one forward + backward of the plain
model gives, at every SAE's output site, the activation y and g = dm/dy. Then per SAE

    effect(latent i, position p) = (g_p . W_dec[i] / output_scale) * f_i(p)     (grad x value)
    effect(error, p)             = g_p . (y_p - decode(f(p)))

summed over the positions of each token type. Sign convention: effect = grad . value, the
first-order estimate of m(clean) - m(node zeroed), i.e. minus the eq. 3 IE of a zero
ablation. Positive = the node helps the metric (as in Alg. 2, which returns grad * latent).

Token types: prompt, input, arrow, output, newline, extra (paper Sec. 4.1.1). BOS is not a node
type: SAEs never see the attention-sink token, so it is never spliced nor ablated. Padding is
never a node either.

Metric m (Sec. 4.1.2): the mean log-prob of the first output token of every pair but the first
(`metric_pairs='all_but_first'`), or of the query only ('last'). Mean, not sum, so m is per
token and comparable across batch sizes; faithfulness is a ratio, so the choice cancels there.

Edges (App. E.1): the top-K nodes per (layer, token type) are targets. For each target t the
scalar S_t = sum_{p in type(t)} (dm/d t_p) * t_p is back-propagated to the SAE sites one step
upstream (resid.l -> attn.l, transcoder.l, resid.l+1; attn.l -> transcoder.l, resid.l+1;
transcoder.l -> resid.l+1) with every other SAE site's output frozen (direct edges only, as in
Marks et al. 2024), and multiplied by the source values: edge(u -> t) = sum_q u_q dS_t/du_q.
By default error nodes are neither edge targets nor sources (the graph shows features, as Fig. 12).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from icl_circuits.core.model import LM, RunOutput
from icl_circuits.data.prompts import N_SCORE_TOKENS, TYPE_ID, PromptBatch, Scoring
from icl_circuits.sae.dictionary import JumpReLUSAE
from icl_circuits.sae.registry import SAERef
from icl_circuits.core.sites import Site
from icl_circuits.interventions.splice import in_out_sites, splice
from icl_circuits.core.storage import read_json, save_figure, write_json

NODE_TYPES: tuple[str, ...] = ("prompt", "input", "arrow", "output", "newline", "extra")
SAE_KINDS: tuple[str, ...] = ("resid", "attn", "transcoder")  # forward order within a layer
# every (site read, site replaced) pair a circuit accepts per kind, the starter suite's first: Gemma Scope 2
# SAEs read attn_z (the heads' outputs before o_proj) and transcoders read mlp_in (the normalised MLP
# input); resid_post.L-1 is resid_pre.L (Site.canonical)
KIND_SITE_OPTIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "resid": (("resid_pre", "resid_pre"),),
    "attn": (("attn_out", "attn_out"), ("attn_z", "attn_z")),
    "transcoder": (("resid_mid", "mlp_out"), ("mlp_in", "mlp_out")),
}
KIND_SITES: dict[str, tuple[str, str]] = {kind: options[0] for kind, options in KIND_SITE_OPTIONS.items()}  # the starter suite's


def sae_sites(sae: JumpReLUSAE) -> tuple[Site, Site]:
    """(site the SAE reads, site its output replaces), resid_post.L written as resid_pre.L+1."""
    return in_out_sites(sae, canonical=True)
ERROR = "error"  # the feature name of an error node


@dataclass(frozen=True)
class CircuitConfig:
    layers: tuple[int, ...] = (11, 12)
    kinds: tuple[str, ...] = SAE_KINDS
    node_types: tuple[str, ...] = NODE_TYPES
    metric_pairs: str = "all_but_first"  # 'all_but_first' (paper) or 'last' (original SFC)
    n_score_tokens: int = N_SCORE_TOKENS  # first n tokens of each scored output (the authors': 2)

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("CircuitConfig.layers is empty: give at least one layer")
        bad = [k for k in self.kinds if k not in SAE_KINDS]
        if bad or not self.kinds:
            raise ValueError(f"CircuitConfig.kinds must be a non-empty subset of {SAE_KINDS}, got {self.kinds}")
        bad = [t for t in self.node_types if t not in TYPE_ID or t == "bos"]
        if bad or not self.node_types:
            raise ValueError(f"node_types must be a non-empty subset of {NODE_TYPES}, got {self.node_types}")
        if self.metric_pairs not in ("all_but_first", "last", "all"):
            raise ValueError(f"metric_pairs must be 'all_but_first', 'last' or 'all', got {self.metric_pairs!r}")

    def to_dict(self) -> dict:
        return asdict(self)


# -- the SAE set ------------------------------------------------------------------------------
def sae_key(kind: str, layer: int) -> str:
    """('resid', 11) -> 'resid.11', the key of node names and graph files (SAERef.key)."""
    return SAERef(kind, layer).key


def parse_key(key: str) -> tuple[str, int]:
    """'resid.11', 'resid:11' or any other SAERef spelling of a kind and layer -> ('resid', 11)."""
    try:
        ref = SAERef.parse(key)
    except ValueError:
        ref = None
    if ref is None or ref.kind is None or ref.layer is None or not ref.is_starter:
        raise ValueError(f"bad SAE key {key!r}; use '<kind>.<layer>' with kind in {SAE_KINDS}, e.g. 'resid.11'")
    return ref.kind, ref.layer


@dataclass
class CircuitSAEs:
    """The SAEs of a circuit, one per (kind, layer), in forward order."""

    saes: dict[str, JumpReLUSAE]  # key 'kind.layer' -> SAE

    @property
    def keys(self) -> list[str]:
        return sorted(self.saes, key=lambda k: (parse_key(k)[1], SAE_KINDS.index(parse_key(k)[0])))

    def in_site(self, key: str) -> Site:
        return sae_sites(self.saes[key])[0]

    def out_site(self, key: str) -> Site:
        return sae_sites(self.saes[key])[1]

    @property
    def start_layer(self) -> int:
        return min(parse_key(k)[1] for k in self.saes)

    def sizes(self) -> dict[str, int]:
        """key -> number of features + 1 (the error node)."""
        return {k: self.saes[k].cfg.d_sae + 1 for k in self.keys}


def circuit_saes(
    lm: LM, cfg: CircuitConfig, saes: Mapping[str, JumpReLUSAE] | None = None, train_if_missing: bool = False
) -> CircuitSAEs:
    """One SAE per (kind, layer) of cfg: the user's (keys 'resid.11' / 'resid:11'), else the starter suite.

    SAEs are moved to the model's device and dtype.

    Raises a ValueError when an SAE does not fit the model (d_in, layer) or reads the wrong site.
    """
    given = {sae_key(*parse_key(k)): v for k, v in (saes or {}).items()}
    for layer in cfg.layers:
        if not 0 <= layer < lm.n_layers:
            raise ValueError(f"layer {layer} outside 0..{lm.n_layers - 1} of {lm.name!r}")
    out: dict[str, JumpReLUSAE] = {}
    for layer in sorted(set(cfg.layers)):
        for kind in cfg.kinds:
            key = sae_key(kind, layer)
            sae = given.get(key)
            if sae is None:
                if saes is not None and given:
                    raise ValueError(f"no SAE given for {key!r} (given: {sorted(given)}); pass one or drop the layer/kind")
                sae = SAERef(kind, layer).resolve(lm, train_if_missing=train_if_missing)
            check_sae(lm, key, sae)
            out[key] = sae.to(device=lm.device, dtype=lm.dtype)  # in place, like nn.Module.to
    return CircuitSAEs(out)


def check_sae(lm: LM, key: str, sae: JumpReLUSAE) -> None:
    kind, layer = parse_key(key)
    c = sae.cfg
    got_in, got_out = sae_sites(sae)
    allowed = [(Site(layer, i), Site(layer, o)) for i, o in KIND_SITE_OPTIONS[kind]]
    if (got_in, got_out) not in allowed:
        want = ", or ".join(f"read {i} and write {o}" for i, o in allowed)
        raise ValueError(f"SAE {key!r} must {want}; it reads {c.site} and writes {c.out_site or c.site}")
    sae.check_compatible(lm)


# -- metric and token types -------------------------------------------------------------------
def metric_scoring(batch: PromptBatch, cfg: CircuitConfig) -> Scoring:
    scoring = batch.scoring(cfg.metric_pairs, cfg.n_score_tokens)
    if not scoring.positions.any():
        raise ValueError(f"metric {cfg.metric_pairs!r} scores no position: prompts need >= 2 pairs for 'all_but_first'")
    return scoring


def metric_of(out: RunOutput, n_copies: int = 1) -> torch.Tensor:
    """[n_copies] mean target log-prob per copy (copies are stacked along the batch)."""
    lp = out.target_logprobs  # [n_copies * n]
    assert lp is not None
    return lp.view(n_copies, -1).mean(-1)


def type_index(batch: PromptBatch, node_types: Sequence[str]) -> torch.Tensor:
    """[batch, seq] long: index into node_types, or -1 where the token is not a node (bos, padding)."""
    idx = torch.full_like(batch.token_types, -1)
    for i, t in enumerate(node_types):
        idx[batch.token_types == TYPE_ID[t]] = i
    return idx


def aggregate_by_type(per_position: torch.Tensor, tix: torch.Tensor, n_types: int) -> torch.Tensor:
    """Sum per-position values over the positions of each token type.

    per_position [batch, seq, n], tix [batch, seq] (-1 = not a node) -> [n_types, n].
    """
    onehot = torch.zeros(*tix.shape, n_types + 1, dtype=per_position.dtype, device=per_position.device)
    onehot.scatter_(-1, (tix.to(per_position.device) % (n_types + 1)).unsqueeze(-1), 1.0)  # -1 -> last column
    return torch.einsum("bst,bsn->tn", onehot[..., :n_types], per_position)


# -- node effects (Alg. 2) --------------------------------------------------------------------
@dataclass
class NodeEffects:
    """Node effects of one batch: effects[key] is [n_types, d_sae + 1], column d_sae = the error node."""

    keys: list[str]
    node_types: tuple[str, ...]
    effects: dict[str, torch.Tensor]
    metric: float  # m on this batch (clean model)
    grads: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # key -> dm/d(out site) [b, s, d]
    resid: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)  # layer -> resid_pre [b, s, d]

    def flat(self) -> torch.Tensor:
        """All node effects as one vector, keys in order, each [n_types, d_sae+1] row-major."""
        return torch.cat([self.effects[k].reshape(-1) for k in self.keys])

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

    def top(self, n: int, by: str = "signed") -> list[int]:
        return ranking(self.flat(), by)[:n].tolist()

    def table(self, n: int = 50, by: str = "signed") -> list[dict]:
        """The top-n nodes as rows (key, kind, layer, feature, token type, effect)."""
        flat = self.flat()
        rows = []
        for i in self.top(n, by):
            key, feat, tt = self.node(i)
            kind, layer = parse_key(key)
            rows.append(dict(node=i, key=key, kind=kind, layer=layer, feature=feat, token_type=tt, effect=float(flat[i])))
        return rows

    def n_nonzero(self) -> int:
        return int((self.flat() != 0).sum())


RANK_BY: tuple[str, ...] = ("signed", "abs")


def ranking(effects: torch.Tensor, by: str = "signed") -> torch.Tensor:
    """Node order for circuits, largest first: by signed effect ('signed', the authors' do_abs=False, so a
    harmful node comes last) or by |effect| ('abs'). 'value' is the old name of 'signed'."""
    by = "signed" if by == "value" else by
    if by not in RANK_BY:
        raise ValueError(f"rank by one of {RANK_BY}, got {by!r}")
    key = effects.abs() if by == "abs" else effects
    return torch.argsort(key, descending=True, stable=True)


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
    effects, kept = {}, {}
    with torch.no_grad():
        for key in saes.keys:
            sae = saes.saes[key]
            x, y, g = acts[saes.in_site(key)], acts[saes.out_site(key)], grads[saes.out_site(key)]
            f = sae.encode(x)  # [b, s, d_sae]
            err = y - sae.decode(f, x)  # [b, s, d]; a skip transcoder's x @ W_skip counts as reconstruction
            g_lat = (g @ sae.W_dec.T) / sae.cfg.output_scale  # [b, s, d_sae]: dm/df
            per_pos = torch.cat([g_lat * f, (g * err).sum(-1, keepdim=True)], -1)  # [b, s, d_sae + 1]
            effects[key] = aggregate_by_type(per_pos, tix, len(cfg.node_types)).float().cpu()
            if keep_grads:
                kept[key] = g
    resid = {l: acts[Site(l, "resid_pre")] for l in layers} if keep_grads else {}
    return NodeEffects(saes.keys, tuple(cfg.node_types), effects, float(value), kept, resid)


# -- edges (App. E.1) -------------------------------------------------------------------------
@dataclass(frozen=True)
class Edge:
    source: int  # flat node ids (NodeEffects.flat order)
    target: int
    effect: float


def edge_sources(target_key: str, keys: Iterable[str]) -> list[str]:
    """SAE sites one step upstream of target_key (the Marks et al. graph, resid_pre layout)."""
    kind, layer = parse_key(target_key)
    wanted = {
        "attn": [sae_key("resid", layer)],
        "transcoder": [sae_key("resid", layer), sae_key("attn", layer)],
        "resid": [sae_key(k, layer - 1) for k in SAE_KINDS],
    }[kind]
    keys = set(keys)
    return [k for k in wanted if k in keys]


def edge_targets(effects: NodeEffects, k: int, by: str = "abs", errors: bool = False) -> list[int]:
    """Top-k nodes per (layer, token type), among nodes with a non-zero effect (error nodes only if `errors`)."""
    flat = effects.flat()
    order = ranking(flat, by).tolist()
    count: dict[tuple[int, str], int] = {}
    out = []
    for i in order:
        if flat[i] == 0:
            break
        key, feat, tt = effects.node(i)
        if feat == ERROR and not errors:
            continue
        slot = (parse_key(key)[1], tt)
        if count.get(slot, 0) < k:
            count[slot] = count.get(slot, 0) + 1
            out.append(i)
    return out


def edge_effects_from(
    lm: LM,
    batch: PromptBatch,
    saes: CircuitSAEs,
    effects: NodeEffects,
    source_key: str,
    targets: Sequence[int],
) -> dict[int, torch.Tensor]:
    """For each target node: [n_types, d_sae + 1] effects of every node of source_key on it.

    One forward pass from the source's layer with the source's latents and error as leaves and
    every other SAE site's output frozen, then one backward per target.
    """
    if not effects.grads:
        raise ValueError("edge effects need NodeEffects computed with keep_grads=True")
    n_types = len(effects.node_types)
    tix = type_index(batch, effects.node_types).to(lm.device)  # [b, s]
    node_pos = tix >= 0
    target_keys = {effects.node(t)[0] for t in targets}
    last = max((saes.out_site(k) for k in target_keys), key=lambda s: s.order)
    src_layer = parse_key(source_key)[1]
    everywhere = torch.ones_like(node_pos, dtype=torch.bool)
    # the source's latents and error as leaves; every other SAE site frozen (its output detached): direct edges only
    spliced = {
        k: splice(saes.saes[k], everywhere, keep_error=True, grad="leaves" if k == source_key else "stop",
                  sites=(saes.in_site(k), saes.out_site(k)))
        for k in saes.keys if parse_key(k)[1] >= src_layer
    }  # fmt: skip
    start = effects.resid.get(src_layer) if src_layer > 0 else None  # start the pass at the source's layer
    if src_layer > 0 and start is None:
        raise ValueError(f"NodeEffects holds no resid_pre.{src_layer}: compute it with keep_grads=True")
    with torch.enable_grad():
        lm.run(batch.input_ids, batch.attention_mask, read=[last], interventions=list(spliced.values()),
               start_layer=src_layer, start_resid=start)  # fmt: skip
        src = spliced[source_key]
        out: dict[int, torch.Tensor] = {}
        for t in targets:
            key, feat, tt = effects.node(t)
            sae, g = saes.saes[key], effects.grads[key]  # g: [b, s, d]
            in_type = (tix == effects.node_types.index(tt)).unsqueeze(-1)  # [b, s, 1]
            if feat == ERROR:
                s_t = (g * spliced[key].error * in_type).sum()
            else:
                g_lat = (g @ sae.W_dec[feat]) / sae.cfg.output_scale  # [b, s]
                s_t = (g_lat * spliced[key].latents[..., feat] * in_type[..., 0]).sum()
            gf, ge = torch.autograd.grad(s_t, [src.latent_leaf, src.error_leaf], retain_graph=True, allow_unused=True)
            gf = torch.zeros_like(src.latents) if gf is None else gf
            ge = torch.zeros_like(src.error) if ge is None else ge
            per_pos = torch.cat([gf * src.latents, (ge * src.error).sum(-1, keepdim=True)], -1)  # [b, s, d_sae+1]
            out[t] = aggregate_by_type(per_pos.detach(), tix, n_types).float().cpu()
    return out


def edge_effects(
    lm: LM,
    batch: PromptBatch,
    saes: CircuitSAEs,
    effects: NodeEffects,
    k: int = 5,
    edges_per_target: int = 5,
    min_fraction: float = 0.05,
    errors: bool = False,
    progress: bool = False,
) -> list[Edge]:
    """App. E.1: edges into the top-k nodes per (layer, token type), pruned.

    Keeps, per target, the `edges_per_target` largest |edge| whose size is at least
    `min_fraction` of the largest edge of the whole graph. With errors=False (default, like the
    paper's Fig. 12) error nodes are neither targets nor sources: the graph shows SAE features only.
    """
    from tqdm.auto import tqdm

    targets = edge_targets(effects, k, errors=errors)
    by_source: dict[str, list[int]] = {}
    for t in targets:
        for src in edge_sources(effects.node(t)[0], saes.keys):
            by_source.setdefault(src, []).append(t)
    offsets = effects.offsets()
    raw: list[Edge] = []
    for src, ts in tqdm(by_source.items(), desc="edges", disable=not progress):
        for t, m in edge_effects_from(lm, batch, saes, effects, src, ts).items():
            if not errors:
                m = m.clone()
                m[:, -1] = 0  # drop the source's error node
            flat = m.reshape(-1)
            for i in ranking(flat)[:edges_per_target].tolist():
                if flat[i] != 0:
                    raw.append(Edge(offsets[src] + i, t, float(flat[i])))
    if not raw:
        return []
    biggest = max(abs(e.effect) for e in raw)
    return [e for e in raw if abs(e.effect) >= min_fraction * biggest]


# -- graph export and drawing -----------------------------------------------------------------
def circuit_graph(effects: NodeEffects, edges: Sequence[Edge], extra_nodes: Iterable[int] = ()) -> dict:
    """JSON-ready {nodes, edges, metric}: nodes are the edge endpoints plus extra_nodes."""
    flat = effects.flat()
    ids = sorted({e.source for e in edges} | {e.target for e in edges} | set(extra_nodes))
    nodes = []
    for i in ids:
        key, feat, tt = effects.node(i)
        kind, layer = parse_key(key)
        nodes.append(dict(id=i, name=f"{key}/{feat}@{tt}", key=key, kind=kind, layer=layer, feature=feat,
                          token_type=tt, effect=float(flat[i])))  # fmt: skip
    return dict(
        metric=effects.metric,
        node_types=list(effects.node_types),
        sign_convention="effect = grad . value ~ m(clean) - m(node zero-ablated); positive helps the metric",
        nodes=nodes,
        edges=[asdict(e) for e in edges],
    )


def save_graph(graph: dict, path: str | Path) -> Path:
    return write_json(path, graph)


def load_graph(path: str | Path) -> dict:
    return read_json(path)


TYPE_COLORS = {"prompt": "#999999", "input": "#2ca02c", "arrow": "#1f77b4", "output": "#ff7f0e", "newline": "#9467bd", "extra": "#8c564b"}


def draw_graph(graph: dict, stem: str | Path, title: str = "") -> list[Path]:
    """Fig. 12 style: SAE sites bottom (early) to top (late), nodes coloured by token type,
    edges blue (positive) / red (negative) with width ~ |effect|."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = graph["nodes"]
    rows = sorted({(n["layer"], SAE_KINDS.index(n["kind"])) for n in nodes})
    row_of = {r: i for i, r in enumerate(rows)}
    by_row: dict[int, list[dict]] = {}
    for n in nodes:
        by_row.setdefault(row_of[(n["layer"], SAE_KINDS.index(n["kind"]))], []).append(n)
    pos = {}
    width = max((len(v) for v in by_row.values()), default=1)
    for r, ns in by_row.items():
        ns.sort(key=lambda n: (graph["node_types"].index(n["token_type"]), -abs(n["effect"])))
        for j, n in enumerate(ns):
            pos[n["id"]] = ((j + 0.5) * width / len(ns), r)
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * width), 1.6 + 1.5 * len(rows)))
    emax = max((abs(e["effect"]) for e in graph["edges"]), default=1.0) or 1.0
    for e in graph["edges"]:
        (x0, y0), (x1, y1) = pos[e["source"]], pos[e["target"]]
        ax.annotate("", (x1, y1 - 0.12), (x0, y0 + 0.12), arrowprops=dict(
            arrowstyle="-|>", lw=0.3 + 3.5 * abs(e["effect"]) / emax, alpha=0.6,
            color="#1f77b4" if e["effect"] > 0 else "#d62728", shrinkA=0, shrinkB=0))  # fmt: skip
    nmax = max((abs(n["effect"]) for n in nodes), default=1.0) or 1.0
    for n in nodes:
        x, y = pos[n["id"]]
        feat = "err" if n["feature"] == ERROR else str(n["feature"])
        ax.scatter([x], [y], s=120 + 900 * math.sqrt(abs(n["effect"]) / nmax), color=TYPE_COLORS[n["token_type"]],
                   edgecolor="black" if n["effect"] > 0 else "red", linewidth=1.2, zorder=3)  # fmt: skip
        ax.text(x, y, feat, ha="center", va="center", fontsize=6, zorder=4)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{SAE_KINDS[k]} L{l}" for l, k in rows])
    ax.set_xticks([])
    ax.set_ylim(-0.6, len(rows) - 0.4)
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=t) for t, c in TYPE_COLORS.items() if t in graph["node_types"]]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), title="token type")
    ax.set_title(title or "sparse feature circuit (node size ~ |effect|; black rim +, red rim -; edge blue +, red -)", fontsize=9)
    for spine in ("top", "right", "bottom"):
        ax.spines[spine].set_visible(False)
    paths = save_figure(fig, stem)
    plt.close(fig)
    return paths
