"""The SAE-spliced model and what it measures: faithfulness (eq. 4, Fig. 7), cross-task ablation
(Fig. 8) and the quality of the attribution estimates (Fig. 20, 21).

At every SAE site of the circuit the spliced model computes, in the same pass,

    out = y - decode_linear(f * a_f) - a_e * (y - decode(f)),   f = encode(x)

where a_f [.., d_sae] and a_e [.., 1] are 1 where a node is ablated (by token type) and 0
elsewhere. That is decode(f * keep) + keep_e * error, written so that with no ablation the
output is y itself, bit for bit: the spliced model reproduces the original exactly. Ablating
everything leaves decode(0) = b_dec (zero ablation of latents and error, as in the paper).
Runs start at the first SAE layer from a cached resid_pre and score only the metric positions;
several ablation patterns run as stacked copies of the batch in one forward.

Faithfulness(C) = (m(C) - m(empty)) / (m(M) - m(empty)) where m(C) keeps only the nodes of C
(everything else ablated) and m(M) is the full model. As the authors ran it, error nodes are never
ablated: C, M \\ C and the node counts cover feature nodes only, and m(empty) ablates every feature
with the errors kept (keep_errors=True, the default). keep_errors=False also ranks and zero-ablates
error nodes (m(empty) then ablates everything). Nodes are ranked by signed effect (the authors'
do_abs=False); by |effect| is an option.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from icl_circuits.methods.circuits import (
    ERROR,
    CircuitConfig,
    CircuitSAEs,
    NodeEffects,
    circuit_graph,
    circuit_saes,
    draw_graph,
    edge_effects,
    metric_of,
    metric_scoring,
    node_effects,
    parse_key,
    ranking,
    save_graph,
    type_index,
)
from icl_circuits.core.distributed import gather_in_order, is_main, my_share, shared_run
from icl_circuits.core.model import LM
from icl_circuits.data.prompts import PromptBatch, icl_prompts
from icl_circuits.core.sites import Site
from icl_circuits.interventions.splice import splice
from icl_circuits.core.storage import RunDir, atomic_write_bytes, read_json, save_figure, tensor_digest, write_csv, write_json
from icl_circuits.data.tasks import Task, check_unique_names

DEFAULT_SIZES: tuple[int, ...] = (0, 1, 2, 3, 5, 10, 20, 30, 50, 100, 200, 500, 1000, 2000, 5000)


def faithfulness(m: float, m_full: float, m_empty: float) -> float:
    """Eq. 4: (m(C) - m(empty)) / (m(M) - m(empty))."""
    return (m - m_empty) / (m_full - m_empty) if m_full != m_empty else float("nan")


class SplicedModel:
    """The model with the circuit's SAEs spliced in (error terms kept), on one fixed batch.

    An ablation pattern is a bool vector over all nodes (NodeEffects.flat order): True = zeroed.
    """

    def __init__(self, lm: LM, batch: PromptBatch, saes: CircuitSAEs, cfg: CircuitConfig) -> None:
        self.lm, self.batch, self.saes, self.cfg = lm, batch, saes, cfg
        self.scoring = metric_scoring(batch, cfg)
        self.keys = saes.keys
        self.sizes = saes.sizes()
        self.n_types = len(cfg.node_types)
        self.offsets, o = {}, 0
        for k in self.keys:
            self.offsets[k] = o
            o += self.n_types * self.sizes[k]
        self.n_nodes = o
        self.tix = type_index(batch, cfg.node_types).to(lm.device)  # [b, s]
        self.start = saes.start_layer
        start_site = Site(self.start, "resid_pre")
        with torch.no_grad():
            out = lm.run(
                batch.input_ids, batch.attention_mask, read=[start_site] if self.start > 0 else [],
                logprob_positions=self.scoring.positions, targets=self.scoring.targets,
            )  # fmt: skip
        self.start_resid = out.acts.get(start_site)  # [b, s, d] or None at layer 0
        self.clean = float(metric_of(out)[0])  # m of the plain model
        self._empty: float | None = None

    @property
    def full(self) -> float:
        """m(M): nothing ablated. Equal to the plain model's metric by construction."""
        return self.clean

    @property
    def empty(self) -> float:
        """m(empty): every node ablated."""
        if self._empty is None:
            self._empty = float(self.metrics(torch.ones(1, self.n_nodes, dtype=torch.bool))[0])
        return self._empty

    def faithfulness(self, m: float) -> float:
        return faithfulness(m, self.full, self.empty)

    def ablation(self, nodes: Sequence[int], complement: bool = False) -> torch.Tensor:
        """[n_nodes] bool: ablate `nodes` (or, with complement=True, everything except them)."""
        a = torch.zeros(self.n_nodes, dtype=torch.bool)
        a[torch.as_tensor(list(nodes), dtype=torch.long)] = True
        return ~a if complement else a

    @torch.no_grad()
    def metrics(self, ablated: torch.Tensor, chunk: int = 4) -> torch.Tensor:
        """ablated [k, n_nodes] bool -> [k] metric values, `chunk` patterns per forward pass."""
        if ablated.dim() != 2 or ablated.shape[1] != self.n_nodes:
            raise ValueError(f"ablation patterns must be [k, n_nodes={self.n_nodes}], got {tuple(ablated.shape)}")
        return torch.cat([self._run(ablated[i : i + chunk]) for i in range(0, len(ablated), chunk)])

    def metric(self, ablated: torch.Tensor) -> float:
        return float(self.metrics(ablated[None])[0])

    def _run(self, ablated: torch.Tensor) -> torch.Tensor:
        k = ablated.shape[0]
        b = self.batch
        node_pos = (self.tix >= 0)[None, ..., None]  # [1, b, s, 1]
        ivs = []
        for key in self.keys:
            o, w = self.offsets[key], self.sizes[key]
            a = ablated[:, o : o + self.n_types * w].reshape(k, self.n_types, w).to(self.lm.device)
            if not a.any():
                continue  # nothing ablated here: the site is untouched (exactly the original)
            per_pos = (a[:, self.tix.clamp(min=0)] & node_pos).flatten(0, 1)  # [k*b, s, d_sae+1]
            # the SAE spliced with its error kept: only the ablated latents and error nodes change the site
            everywhere = torch.ones(per_pos.shape[:2], dtype=torch.bool, device=per_pos.device)  # [k*b, s]
            ivs.append(splice(self.saes.saes[key], everywhere, keep_error=True, ablate=per_pos[..., :-1],
                              ablate_error=per_pos[..., -1:], sites=(self.saes.in_site(key), self.saes.out_site(key))))  # fmt: skip
        out = self.lm.run(
            b.input_ids.repeat(k, 1), b.attention_mask.repeat(k, 1), interventions=ivs,
            start_layer=self.start, start_resid=None if self.start_resid is None else self.start_resid.repeat(k, 1, 1),
            logprob_positions=self.scoring.positions.repeat(k, 1), targets=self.scoring.targets.repeat(k),
        )  # fmt: skip
        return metric_of(out, k).float().cpu()


# -- faithfulness curves (Fig. 7) -------------------------------------------------------------
@dataclass
class FaithfulnessCurve:
    task: str
    sizes: list[int]
    m_C: list[float]  # circuit = top-N nodes kept, everything else ablated
    m_M: list[float]  # complement: top-N nodes ablated
    m_full: float
    m_empty: float
    n_error_nodes: list[int]  # error nodes among the top N (0 when error nodes are kept)
    n_nonzero: int  # nodes that can enter a circuit: positive effect on the IE batch (signed), non-zero (abs)
    keep_errors: bool = True  # error nodes never ablated nor counted (the authors' method)
    rank_by: str = "signed"

    @property
    def faith_C(self) -> list[float]:
        return [faithfulness(m, self.m_full, self.m_empty) for m in self.m_C]

    @property
    def faith_M(self) -> list[float]:
        return [faithfulness(m, self.m_full, self.m_empty) for m in self.m_M]

    def to_dict(self) -> dict:
        return {**asdict(self), "faith_C": self.faith_C, "faith_M": self.faith_M}

    @classmethod
    def from_dict(cls, d: dict) -> "FaithfulnessCurve":
        """The inverse of to_dict: derived keys (faith_C, faith_M, nodes_for_target) are recomputed or dropped."""
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})


def faithfulness_curve(
    spliced: SplicedModel, effects: NodeEffects, sizes: Sequence[int] = DEFAULT_SIZES, by: str = "signed",
    task: str = "", chunk: int = 4, keep_errors: bool = True,
) -> FaithfulnessCurve:  # fmt: skip
    """m(C_N) and m(M \\ C_N) for circuits C_N = the top-N nodes by effect, on spliced's batch.

    keep_errors=True (the authors' method): error nodes are never ablated and never counted, so C_N
    is N feature nodes plus every error node, and m(empty) ablates all features only. keep_errors=False
    ranks error nodes with the features and zero-ablates them too.
    """
    _check_same_nodes(spliced, effects)
    order, errs = circuit_order(effects, by, keep_errors)
    n_nonzero = n_candidates(effects, order, by)
    sizes = sorted({min(int(n), n_nonzero) for n in sizes} | {n_nonzero})
    pats = [circuit_pattern(spliced, order[:n], c, errs) for n in sizes for c in (True, False)]
    m = spliced.metrics(torch.stack(pats), chunk).tolist()
    n_err = [sum(effects.node(i)[1] == ERROR for i in order[:n].tolist()) for n in sizes]
    m_empty = spliced.empty if errs is None else spliced.metric(~errs)
    return FaithfulnessCurve(task, sizes, m[0::2], m[1::2], spliced.full, m_empty, n_err, n_nonzero, keep_errors, by)


def n_candidates(effects: NodeEffects, order: torch.Tensor, by: str = "signed") -> int:
    """How many nodes of `order` can enter a circuit: those with a positive effect (signed ranking; the
    zero and negative ones come after them) or a non-zero one (abs ranking)."""
    e = effects.flat()[order]
    return int((e > 0).sum()) if by in ("signed", "value") else int((e != 0).sum())


def circuit_order(effects: NodeEffects, by: str = "signed", keep_errors: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(node ids by decreasing effect, bool mask of error nodes or None): with keep_errors the
    error nodes are left out of the order (they stay in the model)."""
    order = ranking(effects.flat(), by)
    if not keep_errors:
        return order, None
    errs = torch.zeros(effects.flat().numel(), dtype=torch.bool)
    for k, o in effects.offsets().items():
        n_types, width = effects.effects[k].shape
        errs[o + width - 1 : o + n_types * width : width] = True
    return order[~errs[order]], errs


def circuit_pattern(spliced: SplicedModel, nodes: torch.Tensor, complement: bool, errs: torch.Tensor | None) -> torch.Tensor:
    """Ablation pattern for circuit `nodes` (complement=True: keep only them), never ablating `errs`."""
    pat = spliced.ablation(nodes.tolist(), complement=complement)
    return pat if errs is None else pat & ~errs


def nodes_needed(
    spliced: SplicedModel, effects: NodeEffects, target: float, complement: bool = False, by: str = "signed",
    curve: FaithfulnessCurve | None = None, keep_errors: bool = True,
) -> int | None:  # fmt: skip
    """Fewest top-N nodes with faithfulness(C_N) >= target (complement=False), or with
    faithfulness(M \\ C_N) <= target (complement=True). Scans the curve's grid, then bisects
    between its two grid points (assumes monotonicity there). None if never reached."""
    if curve is None:
        curve = faithfulness_curve(spliced, effects, by=by, keep_errors=keep_errors)
    order, errs = circuit_order(effects, curve.rank_by, curve.keep_errors)
    vals = curve.faith_M if complement else curve.faith_C

    def ok(f: float) -> bool:
        return f <= target if complement else f >= target

    hit = next((i for i, f in enumerate(vals) if ok(f)), None)
    if hit is None:
        return None
    lo, hi = (curve.sizes[hit - 1], curve.sizes[hit]) if hit > 0 else (curve.sizes[0], curve.sizes[0])
    while hi - lo > 1:
        mid = (lo + hi) // 2
        m = spliced.metric(circuit_pattern(spliced, order[:mid], not complement, errs))
        lo, hi = (lo, mid) if ok(faithfulness(m, curve.m_full, curve.m_empty)) else (mid, hi)
    return hi


def _check_same_nodes(spliced: SplicedModel, effects: NodeEffects) -> None:
    n = sum(e.numel() for e in effects.effects.values())
    if effects.keys != spliced.keys or n != spliced.n_nodes or tuple(effects.node_types) != tuple(spliced.cfg.node_types):
        raise ValueError("node effects and spliced model disagree on SAEs or node types")


# -- cross-task ablation (Fig. 8) -------------------------------------------------------------
@dataclass
class CrossTask:
    tasks: list[str]
    n_ablated: dict[str, int | None]  # nodes of task A ablated to bring A's faithfulness to target
    change: list[list[float]]  # [ablated task A][tested task B]: faithfulness(B) - 1
    target: float
    reached: dict[str, bool] = field(default_factory=dict)  # False: the target was never reached, so A's whole
    #                                                         circuit (every candidate node) was ablated instead

    def to_dict(self) -> dict:
        return asdict(self)


def cross_task_ablation(
    spliced: Mapping[str, SplicedModel], effects: Mapping[str, NodeEffects], target: float = 0.3, by: str = "signed",
    curves: Mapping[str, FaithfulnessCurve] | None = None, progress: bool = False, keep_errors: bool = True,
) -> CrossTask:  # fmt: skip
    """For each task A ablate its top-IE nodes until faithfulness(A) <= target; measure every task B.

    keep_errors=True (the authors' method): only feature nodes are ranked and ablated, error nodes always
    stay, and each task's faithfulness is measured against its all-features-ablated baseline. When no
    number of A's nodes brings A down to the target, all of A's candidate nodes are ablated and
    `reached[A]` is False.
    """
    from tqdm.auto import tqdm

    tasks = list(spliced)
    n_abl, change, reached = {}, [], {}
    empty: dict[str, float] = {}
    for a in tqdm(tasks, desc="cross-task", disable=not progress):
        curve = (curves or {}).get(a)
        if curve is None or curve.keep_errors != keep_errors or curve.rank_by != by:  # a curve of another method
            curve = faithfulness_curve(spliced[a], effects[a], by=by, keep_errors=keep_errors)
        n = nodes_needed(spliced[a], effects[a], target, complement=True, by=by, curve=curve)
        order, errs = circuit_order(effects[a], by, keep_errors)
        reached[a] = n is not None
        if n is None:
            n = n_candidates(effects[a], order, by)
        n_abl[a] = n
        row = []
        for b in tasks:
            sp = spliced[b]
            if b not in empty:
                empty[b] = sp.empty if errs is None else sp.metric(~errs)
            row.append(faithfulness(sp.metric(circuit_pattern(sp, order[:n], False, errs)), sp.full, empty[b]) - 1.0)
        change.append(row)
    return CrossTask(tasks, n_abl, change, target, reached)


# -- IE quality (Fig. 20, 21) -----------------------------------------------------------------
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

    _check_same_nodes(spliced, effects)
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


# -- the experiment ---------------------------------------------------------------------------
@dataclass(frozen=True)
class CircuitRunConfig:
    circuit: CircuitConfig = field(default_factory=CircuitConfig)
    n_prompts: int = 8  # prompts per batch (IE batch and held-out batch)
    n_shots: int = 12  # the authors: 8 prompts x 12 shots (circuit_ablation_script_2.py; 8 shots for algo tasks)
    seed: int = 0
    sizes: tuple[int, ...] = DEFAULT_SIZES
    rank_by: str = "signed"  # the authors' do_abs=False; 'abs' ranks by |effect|
    ablate_errors: bool = False  # the authors never ablate error nodes; True also ranks and zero-ablates them
    faith_target: float = 0.6  # report the nodes needed for this faithfulness of C
    cross_target: float = 0.3  # cross-task: ablate A's nodes until faithfulness(A) <= this
    edge_k: int = 3  # edge targets per (layer, token type)
    edges_per_target: int = 4
    ie_quality_per_sae: int | None = None  # IE quality: None = every non-zero feature node (the authors'), n = a
    #                                       seeded sample of n per (SAE, token type), 0 = skip
    other_errors_curve: bool = False  # also the faithfulness curves and cross-task ablation with the other error-node choice
    chunk: int = 4  # ablation patterns per forward pass

    def to_dict(self) -> dict:
        return asdict(self)


def circuit_batches(lm: LM, task: Task, cfg: CircuitRunConfig) -> tuple[PromptBatch, PromptBatch]:
    """(IE batch from one half of the task's pairs, held-out evaluation batch from the other half)."""
    est, held = task.split(0.5, cfg.seed)
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
    return atomic_write_bytes(path, save({k: v.contiguous() for k, v in effects.effects.items()}, metadata=meta))


def load_effects(path: str | Path) -> NodeEffects:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = meta["keys"].split(",")
        eff = {k: f.get_tensor(k) for k in keys}
    return NodeEffects(keys, tuple(meta["node_types"].split(",")), eff, float(meta["metric"]))


def run_circuit_task(lm: LM, task: Task, saes: CircuitSAEs, cfg: CircuitRunConfig, out: str | Path, progress: bool = True) -> dict:
    """Nodes, edges, faithfulness curves and IE quality for one task; files under out/<task>/."""
    import time

    out = Path(out) / task.name
    t0 = time.perf_counter()
    est_batch, eval_batch = circuit_batches(lm, task, cfg)
    effects = node_effects(lm, est_batch, saes, cfg.circuit, keep_grads=True)
    t_nodes = time.perf_counter() - t0
    save_effects(effects, out / "node_effects.safetensors")
    write_csv(out / "nodes.csv", effects.table(200, cfg.rank_by))

    edges = edge_effects(lm, est_batch, saes, effects, k=cfg.edge_k, edges_per_target=cfg.edges_per_target)
    graph = circuit_graph(effects, edges)
    graph["task"] = task.name
    save_graph(graph, out / "graph.json")
    draw_graph(graph, out / "graph", title=f"{task.name}: top-{cfg.edge_k} nodes per (layer, token type) and their edges")

    spliced = SplicedModel(lm, eval_batch, saes, cfg.circuit)
    curve = faithfulness_curve(spliced, effects, cfg.sizes, cfg.rank_by, task.name, cfg.chunk, keep_errors=not cfg.ablate_errors)
    need = nodes_needed(spliced, effects, cfg.faith_target, by=cfg.rank_by, curve=curve)
    write_json(out / "faithfulness.json", curve.to_dict())

    rows: list[dict] = []
    if cfg.ie_quality_per_sae != 0:
        spliced_est = SplicedModel(lm, est_batch, saes, cfg.circuit)
        rows = ie_quality(spliced_est, effects, max_per_sae=cfg.ie_quality_per_sae, seed=cfg.seed, chunk=cfg.chunk * 2)
        write_csv(out / "ie_quality.csv", rows)
    summary = dict(
        task=task.name, metric_est=effects.metric, metric_eval=spliced.full, metric_empty=curve.m_empty,
        errors=("ablated" if cfg.ablate_errors else "kept"), rank_by=cfg.rank_by,
        n_nonzero_nodes=effects.n_nonzero(), nodes_for_target=need, faith_target=cfg.faith_target,
        n_edges=len(edges), n_ie_quality=len(rows), node_effects_s=t_nodes, seconds=time.perf_counter() - t0,
        top_nodes=effects.table(10, cfg.rank_by),
        error_share_top50=sum(r["feature"] == ERROR for r in effects.table(50, cfg.rank_by)) / 50,
    )  # fmt: skip
    write_json(out / "summary.json", summary)  # written last: marks the task done (resume)
    return summary


def run_circuits(
    lm: LM, tasks: Sequence[Task], cfg: CircuitRunConfig, out: str | Path, saes: Mapping | None = None,
    cross_task: bool = True, progress: bool = True, train_missing: bool = False,
) -> dict:  # fmt: skip
    """Every task (resuming those finished with the same content and settings), then the figures over
    tasks and the cross-task ablation. Returns {'summaries', 'files'}. `out` is a RunDir.
    train_missing: train and cache the starter SAEs the shipped suite lacks (e.g. layers 10-17)."""
    out = Path(out)
    check_unique_names(list(tasks))
    circ = circuit_saes(lm, cfg.circuit, saes, train_if_missing=train_missing)
    header = dict(model=lm.name, config=cfg.to_dict(), saes={k: sae_digest(circ.saes[k]) for k in circ.keys})
    # one writer (under torchrun: the ranks of one run, tasks split over them, see distributed.py); a resume
    # under another config / other SAEs is refused
    with shared_run(out, header, kind="circuits") as run:
        return _run_circuits(lm, tasks, cfg, out, circ, run, cross_task, progress)


UNIT_FILE = "unit.json"  # written last into a task's folder: the content key of the finished task


def sae_digest(sae) -> str:  # noqa: ANN001 - a JumpReLUSAE
    """Identity of an SAE for resume keys: its site and a content hash of its tensors."""
    return f"{sae.cfg.site}:{tensor_digest(*sae.tensors().values())}"


def _run_circuits(
    lm: LM, tasks: Sequence[Task], cfg: CircuitRunConfig, out: Path, circ: CircuitSAEs, run: RunDir, cross_task: bool, progress: bool
) -> dict:  # fmt: skip
    from tqdm.auto import tqdm

    write_json(out / "config.json", cfg.to_dict())
    keys = {t.name: run.key(t.digest) for t in tasks}
    todo = [t for t in tasks if not _finished(out / t.name, keys[t.name])]
    if todo:  # figures over tasks made from the old results are stale
        for stem in ("cross_task", f"cross_task_{_other(cfg)}"):
            (out / f"{stem}.json").unlink(missing_ok=True)
    summaries = []
    bar = tqdm(my_share(tasks), desc="circuits", disable=not progress)
    for task in bar:
        bar.set_postfix_str(task.name)
        folder = out / task.name
        if task in todo:
            for stale in (UNIT_FILE, "summary.json", f"faithfulness_{_other(cfg)}.json"):
                (folder / stale).unlink(missing_ok=True)
            summaries.append(run_circuit_task(lm, task, circ, cfg, out, progress))
            write_json(folder / UNIT_FILE, dict(key=keys[task.name], task=task.name, task_digest=task.digest))
        else:
            summaries.append(read_json(folder / "summary.json"))
    summaries = gather_in_order(tasks, summaries)  # every rank's tasks, once all are done
    if not is_main():  # the figures over tasks and the cross-task ablation: rank 0 alone
        return dict(summaries=summaries, files=[])
    curves = [_read_curve(out / t.name / "faithfulness.json") for t in tasks]
    files = plot_faithfulness(curves, out / "faithfulness")
    other: list[FaithfulnessCurve] = []
    if cfg.other_errors_curve:  # the diagnostic with the other error-node choice
        for t in tqdm(tasks, desc=f"curves with {_other(cfg).replace('_', ' ')}", disable=not progress):
            path = out / t.name / f"faithfulness_{_other(cfg)}.json"
            if not path.is_file():
                _, eval_batch = circuit_batches(lm, t, cfg)
                sp, eff = SplicedModel(lm, eval_batch, circ, cfg.circuit), load_effects(out / t.name / "node_effects.safetensors")
                c = faithfulness_curve(sp, eff, cfg.sizes, cfg.rank_by, t.name, cfg.chunk, keep_errors=cfg.ablate_errors)
                write_json(path, {**c.to_dict(), "nodes_for_target": nodes_needed(sp, eff, cfg.faith_target, by=cfg.rank_by, curve=c)})
            other.append(_read_curve(path))
        files += plot_faithfulness(other, out / f"faithfulness_{_other(cfg)}")
    rows = [r for t in tasks if (out / t.name / "ie_quality.csv").is_file() for r in _read_csv(out / t.name / "ie_quality.csv")]
    if rows:
        files += plot_ie_quality(rows, out / "ie_quality")
        write_json(out / "ie_correlations.json", {"by_layer": ie_correlations(rows), "by_kind_layer": ie_correlations(rows, ("kind", "layer")),
                                                   "all": ie_correlations(rows, ())})  # fmt: skip
    table = [
        dict(task=s["task"], m_full=round(s["metric_eval"], 4), m_empty=round(s["metric_empty"], 4),
             nonzero_nodes=s["n_nonzero_nodes"], nodes_for_faith=s["nodes_for_target"], error_share_top50=s["error_share_top50"],
             edges=s["n_edges"], node_effects_s=round(s["node_effects_s"], 2))
        for s in summaries
    ]  # fmt: skip
    write_csv(out / "summary.csv", table)
    if cross_task and len(tasks) > 1:
        spl: dict[str, SplicedModel] = {}
        eff: dict[str, NodeEffects] = {}

        def setup() -> None:  # the held-out batches, built once and only when something is missing
            for t in tqdm([t for t in tasks if t.name not in spl], desc="cross-task setup", disable=not progress):
                _, eval_batch = circuit_batches(lm, t, cfg)
                spl[t.name] = SplicedModel(lm, eval_batch, circ, cfg.circuit)
                eff[t.name] = load_effects(out / t.name / "node_effects.safetensors")

        keep = not cfg.ablate_errors
        variants = [("cross_task", keep, curves)] + ([(f"cross_task_{_other(cfg)}", not keep, other)] if cfg.other_errors_curve else [])
        for stem, keep, cs in variants:
            ct_path = out / f"{stem}.json"
            if ct_path.is_file():
                ct = CrossTask(**read_json(ct_path))
            else:
                setup()
                ct = cross_task_ablation(spl, eff, cfg.cross_target, cfg.rank_by, {c.task: c for c in cs}, progress, keep)
                write_json(ct_path, ct.to_dict())
            files += plot_cross_task(ct, out / stem, "feature nodes only, error nodes kept" if keep else "error nodes ranked and ablated too")
    return dict(summaries=summaries, files=files)


def _other(cfg: CircuitRunConfig) -> str:
    """File-name tag of the diagnostic variant: the error-node choice the run did not make."""
    return "errors_kept" if cfg.ablate_errors else "errors_ablated"


def _finished(folder: Path, key: str) -> bool:
    """The task's folder holds a complete result made from the same task content, config, model and SAEs."""
    try:
        return (folder / "summary.json").is_file() and read_json(folder / UNIT_FILE).get("key") == key
    except (OSError, ValueError, AttributeError):
        return False


def _read_curve(path: Path) -> FaithfulnessCurve:
    return FaithfulnessCurve.from_dict(read_json(path))


def _read_csv(path: Path) -> list[dict]:
    import csv

    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            r["layer"] = int(r["layer"])
            r["estimate"], r["actual"] = float(r["estimate"]), float(r["actual"])
            rows.append(r)
    return rows


# -- figures ----------------------------------------------------------------------------------
def _plt():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_faithfulness(curves: Sequence[FaithfulnessCurve], stem: str | Path) -> list[Path]:
    """Fig. 7: faithfulness of C (top-N kept) and of M \\ C (top-N ablated) vs N, per task and mean."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    # the mean is taken at the sizes every curve has (plus the largest), so grids may differ between tasks
    grid = sorted(set.intersection(*(set(c.sizes) for c in curves)) | {max(n for c in curves for n in c.sizes)}) if curves else []
    for ax, attr, ideal in ((axes[0], "faith_C", 1.0), (axes[1], "faith_M", 0.0)):
        for c in curves:
            ax.plot([max(n, 0.5) for n in c.sizes], getattr(c, attr), lw=0.9, alpha=0.6, label=c.task)
        mean = []
        for n in grid:  # a task's curve is flat after its last (all non-zero nodes) point
            vals = [getattr(c, attr)[max(i for i, s in enumerate(c.sizes) if s <= n)] for c in curves]
            mean.append(sum(vals) / len(vals))
        ax.plot([max(n, 0.5) for n in grid], mean, lw=3, color="black", label="mean over tasks")
        ax.axhline(ideal, color="grey", ls="--", lw=0.8)
        ax.set_xscale("log")
        by = curves[0].rank_by if curves else "signed"
        ax.set_xlabel(f"number of nodes N (top by {'|effect|' if by == 'abs' else 'signed effect'}; N=0 drawn at 0.5)")
        ax.grid(alpha=0.3)
    axes[0].axhline(0.6, color="red", ls=":", lw=0.8)
    if curves:
        fig.suptitle("error nodes always kept, N counts feature nodes (the authors' method)" if curves[0].keep_errors
                     else "error nodes ranked and zero-ablated with the features", fontsize=10)  # fmt: skip
    axes[0].set_title("faithfulness of circuit C (top-N nodes kept; ideal 1)")
    axes[1].set_title("faithfulness of complement M \\ C (top-N nodes ablated; ideal 0)")
    axes[0].set_ylabel("faithfulness (eq. 4)")
    axes[1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    paths = save_figure(fig, stem)
    plt.close(fig)
    return paths


def plot_ie_quality(rows: Sequence[dict], stem: str | Path) -> list[Path]:
    """Fig. 20/21: estimated vs. actual single-node effects; correlation per layer and per SAE type."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    colors = {"resid": "#1f77b4", "attn": "#2ca02c", "transcoder": "#d62728"}
    for kind, c in colors.items():
        for err in (False, True):
            rs = [r for r in rows if r["kind"] == kind and (str(r["feature"]) == ERROR) == err]
            axes[0].scatter([r["estimate"] for r in rs], [r["actual"] for r in rs], s=40 if err else 8, alpha=0.7, color=c,
                            marker="x" if err else "o", label=f"{kind} {'error nodes' if err else 'features'}")  # fmt: skip
    lim = max([abs(r["estimate"]) for r in rows] + [abs(r["actual"]) for r in rows] + [1e-6])
    axes[0].plot([-lim, lim], [-lim, lim], color="grey", lw=0.8, ls="--")
    thresh = 10 ** math.floor(math.log10(lim / 1e3))
    ticks = [t for e in range(3, -1, -1) for t in (-(10**e) * thresh,)] + [0.0] + [(10**e) * thresh for e in range(0, 4)]
    ticks = sorted({round(t, 12) for t in ticks if abs(t) <= lim * 10})
    for set_scale, set_ticks in ((axes[0].set_xscale, axes[0].set_xticks), (axes[0].set_yscale, axes[0].set_yticks)):
        set_scale("symlog", linthresh=thresh)
        set_ticks(ticks, [f"{t:g}" for t in ticks])
    axes[0].tick_params(labelsize=7)
    axes[0].set_xlabel("attribution estimate (grad . value)")
    axes[0].set_ylabel("actual: m(M) - m(M without node)")
    feats = [r for r in rows if str(r["feature"]) != ERROR]
    axes[0].set_title(f"single-node ablations ({len(feats)} feature nodes, r={pearson([r['estimate'] for r in feats], [r['actual'] for r in feats]):.2f})")
    axes[0].legend(fontsize=6)
    by_layer = ie_correlations(rows)
    xs = range(len(by_layer))
    axes[1].bar([x - 0.2 for x in xs], [r["r"] for r in by_layer], width=0.4, color="black", label="feature nodes (the paper's metric)")
    axes[1].bar([x + 0.2 for x in xs], [r["r_with_errors"] for r in by_layer], width=0.4, color="grey", label="with error nodes (diagnostic)")
    axes[1].set_xticks(list(xs), [str(r["layer"]) for r in by_layer])
    axes[1].set_title("Fig. 20: correlation per layer (all SAE types)")
    axes[1].set_xlabel("layer")
    axes[1].legend(fontsize=7)
    by_kind = ie_correlations(rows, ("kind", "layer"))
    labels = [f"{r['kind']}\nL{r['layer']}" for r in by_kind]
    xs = range(len(by_kind))
    axes[2].bar([x - 0.2 for x in xs], [r["r"] for r in by_kind], width=0.4, color=[colors[r["kind"]] for r in by_kind], label="feature nodes")
    axes[2].bar([x + 0.2 for x in xs], [r["r_with_errors"] for r in by_kind], width=0.4, color=[colors[r["kind"]] for r in by_kind],
                alpha=0.45, hatch="//", label="with error nodes")  # fmt: skip
    axes[2].set_xticks(list(xs), labels, fontsize=7)
    axes[2].set_title("Fig. 21: correlation per SAE type and layer")
    axes[2].legend(fontsize=7)
    finite = [v for r in by_kind + by_layer for v in (r["r"], r["r_with_errors"]) if not math.isnan(v)]
    for ax in axes[1:]:
        ax.set_ylabel("Pearson r (estimate vs actual)")
        ax.set_ylim(min([0.0, *finite]) - 0.05, 1.05)
        ax.axhline(0, color="grey", lw=0.8)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    paths = save_figure(fig, stem)
    plt.close(fig)
    return paths


def plot_cross_task(ct: CrossTask, stem: str | Path, note: str = "") -> list[Path]:
    """Fig. 8: faithfulness change of tested task B when task A's top nodes are ablated."""
    plt = _plt()
    n = len(ct.tasks)
    fig, ax = plt.subplots(figsize=(2 + 0.55 * n, 1.5 + 0.5 * n))
    m = torch.tensor(ct.change, dtype=torch.float32)
    vmax = float(torch.nan_to_num(m).abs().max()) or 1.0
    im = ax.imshow(m.numpy(), cmap="RdBu", vmin=-vmax, vmax=vmax)
    ax.set_xticks(range(n), ct.tasks, rotation=90, fontsize=7)
    ax.set_yticks(range(n), [f"{t} ({ct.n_ablated[t]}{'' if ct.reached.get(t, True) else ', all: target not reached'})" for t in ct.tasks],
                  fontsize=7)  # fmt: skip
    for i in range(n):
        for j in range(n):
            if not math.isnan(ct.change[i][j]):
                ax.text(j, i, f"{ct.change[i][j]:.2f}", ha="center", va="center", fontsize=5)
    ax.set_xlabel("tested task B")
    ax.set_ylabel("ablated task A (nodes ablated)")
    ax.set_title(f"faithfulness change of B when A's top nodes are ablated (A to {ct.target})" + (f"\n{note}" if note else ""), fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.7, label="faithfulness change")
    fig.tight_layout()
    paths = save_figure(fig, stem)
    plt.close(fig)
    return paths
