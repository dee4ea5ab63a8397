"""Positive steering heatmaps: which single SAE feature helps which task (Sec. 3.2, App. F).

For every task t and every feature f of the cleaned task vectors, add scale x f's *unit-norm* decoder
direction at the arrow of zero-shot prompts (or at a fake pair's output, for detectors, App. G) and record
the relative loss decrease M(t, f) (Fig. 6, 22, 24, 25). By default the scale is one value shared by every
feature and task, calibrated once on a calibration split (zero-shot prompts from the tasks' training pairs,
disjoint from the evaluation prompts): the paper's Gemma 1 procedure, which found 15 there. One scale per
feature (the grid value with the largest loss decrease on any task, the Gemma 2 procedure) and a fixed scale
are options. The paper's normalisation: clip at 1, per-task min-max, zero below 0.2, drop features with a
low maximum effect. Each task's vectors are scored in batches by `interventions.steer.Steerer.score`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from icl_circuits.core.distributed import main_first, merge_across_ranks, my_share, open_shared
from icl_circuits.core.model import LM
from icl_circuits.core.sites import Site
from icl_circuits.core.storage import AppendLog, check_schema, fingerprint, stamp
from icl_circuits.data.prompts import N_SCORE_TOKENS, eval_prompts
from icl_circuits.data.tasks import DEFAULT_EVAL_SHARE
from icl_circuits.interventions.steer import Steerer, feature_directions
from icl_circuits.sae.dictionary import JumpReLUSAE, sae_digest

# -- positive steering heatmap -----------------------------------------------------------------


@dataclass
class FeatureSet:
    """The features one task contributes: cleaned (kept by TVC), and those in the raw task vector."""

    task: str
    features: list[int]  # active after cleaning, strongest first
    in_task_vector: list[int] = field(default_factory=list)  # nonzero in the SAE encoding of the raw TV
    weights: list[float] = field(default_factory=list)  # cleaned weights, same order as features


def feature_set_from_cleaning(result: Any, top_k: int | None = None) -> FeatureSet:
    """Adapter for `icl_circuits.methods.cleaning.CleaningResult` (features sorted by weight, descending)."""
    feats = [int(f) for f in result.features][:top_k]
    w = result.weights
    in_tv = [int(i) for i in torch.as_tensor(result.initial_weights).nonzero().flatten().tolist()]
    return FeatureSet(result.task, feats, in_tv, [float(w[f]) for f in feats])


def log_grid(lo: float, hi: float, n: int) -> tuple[float, ...]:
    """n log-spaced values from lo to hi, rounded to 3 significant digits."""
    if not (0 < lo <= hi) or n < 1:
        raise ValueError(f"need 0 < lo <= hi and n >= 1, got lo={lo} hi={hi} n={n}")
    if n == 1:
        return (float(lo),)
    return tuple(float(f"{lo * (hi / lo) ** (i / (n - 1)):.3g}") for i in range(n))


@dataclass(frozen=True)
class HeatmapConfig:
    setting: str = "execution"  # 'execution': query arrow of zero-shot prompts; 'detection': fake pair's output
    layer: int = 12
    scale_mode: str = "shared"  # 'shared' (one scale calibrated on the calibration split, the paper's Gemma 1
    #                             procedure), 'per_feature' (Gemma 2), 'fixed' (`scale`, e.g. a scale calibrated before)
    scale: float = 15.0  # used when scale_mode == 'fixed' (the paper's Gemma 1 scale)
    # unit directions: the bundled model's residual norm is ~3,500 at layer 12, so useful scales are in the thousands
    scale_grid: tuple[float, ...] = (128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0)
    n_score_tokens: int = N_SCORE_TOKENS  # first n tokens of the query's output scored (the authors': 2)
    select_on: str = "owner"  # scales chosen on the tasks the feature came from ('owner') or on every task ('all')
    top_only: bool = False  # heatmap of each task's strongest feature only (Fig. 10)
    n_eval: int = 32  # zero-shot prompts (32 random pairs)
    eval_share: float = DEFAULT_EVAL_SHARE
    seed: int = 0
    vectors_per_pass: int = 8

    def __post_init__(self) -> None:
        if self.setting not in ("execution", "detection"):
            raise ValueError(f"setting must be 'execution' or 'detection', got {self.setting!r}")
        if self.scale_mode not in ("per_feature", "shared", "fixed"):
            raise ValueError(f"scale_mode must be 'per_feature', 'shared' or 'fixed', got {self.scale_mode!r}")
        if self.select_on not in ("owner", "all"):
            raise ValueError(f"select_on must be 'owner' or 'all', got {self.select_on!r}")
        if not self.scale_grid or any(s <= 0 for s in self.scale_grid):
            raise ValueError(f"scale_grid must be positive values, got {self.scale_grid}")

    def to_dict(self) -> dict:
        return asdict(self)


def heatmap_steerer(lm: LM, task: Any, cfg: HeatmapConfig, split: str = "eval") -> Steerer:
    """Zero-shot (execution) or fake-pair (detection) prompts: of the task's held-out pairs ('eval',
    what the heatmap reports), or of its training pairs ('calibration', where scales are chosen)."""
    e = eval_prompts(lm.tokenizer, task, cfg.setting, split, cfg.n_eval, cfg.seed, cfg.eval_share)
    return Steerer(lm, e.batch, [cfg.layer], cfg.n_score_tokens, e.steer_at, prefix_cache=False)  # only `score` is used


@dataclass
class HeatmapResult:
    tasks: list[str]
    features: list[int]
    raw: torch.Tensor  # [n_tasks, n_features] relative loss decrease
    scales: list[float]  # per feature
    owners: dict[int, list[str]]  # feature -> tasks whose cleaned vector holds it
    in_task_vector: dict[int, list[str]]  # feature -> tasks whose raw TV holds it
    baselines: dict[str, float]  # task -> zero-shot NLL
    grid: dict[str, dict[int, list[float]]]  # task -> feature -> effect at each grid scale (calibration split)
    config: dict
    shared_scale: float | None = None  # the one calibrated scale (scale_mode 'shared' or 'fixed')

    def top_feature(self, task: str) -> int:
        """The task's own feature with the largest effect on it. Only a feature with a positive effect on
        its own task can be its top executor / detector (the authors'); raises if the task has none."""
        t = self.tasks.index(task)
        own = [i for i, f in enumerate(self.features) if task in self.owners.get(f, [])]
        if not own:
            raise ValueError(f"task {task!r} contributes no feature to this heatmap")
        best = max(own, key=lambda i: float(self.raw[t, i]))
        if not float(self.raw[t, best]) > 0:
            raise ValueError(f"none of task {task!r}'s features has a positive effect on it")
        return self.features[best]

    def marks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([n_tasks, n_features] bool in raw TV, [n_tasks, n_features] bool kept by cleaning)."""
        in_tv = torch.tensor([[t in self.in_task_vector.get(f, []) for f in self.features] for t in self.tasks])
        kept = torch.tensor([[t in self.owners.get(f, []) for f in self.features] for t in self.tasks])
        return in_tv.reshape(len(self.tasks), len(self.features)), kept.reshape(len(self.tasks), len(self.features))

    def to_dict(self) -> dict:
        return stamp("heatmap", dict(
            tasks=self.tasks, features=self.features, raw=self.raw.tolist(), scales=self.scales,
            owners={str(k): v for k, v in self.owners.items()},
            in_task_vector={str(k): v for k, v in self.in_task_vector.items()},
            baselines=self.baselines, grid={t: {str(f): v for f, v in g.items()} for t, g in self.grid.items()},
            config=self.config, shared_scale=self.shared_scale,
        ))  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict, where: str = "") -> "HeatmapResult":
        d = check_schema("heatmap", d, where)
        return cls(
            d["tasks"], [int(f) for f in d["features"]], torch.tensor(d["raw"]).reshape(len(d["tasks"]), len(d["features"])),
            [float(s) for s in d["scales"]], {int(k): v for k, v in d["owners"].items()},
            {int(k): v for k, v in d["in_task_vector"].items()}, d["baselines"],
            {t: {int(f): v for f, v in g.items()} for t, g in d["grid"].items()}, d["config"], d.get("shared_scale"),
        )  # fmt: skip


def choose_scales(
    grid: dict[str, dict[int, list[float]]], features: Sequence[int], scale_grid: Sequence[float], mode: str,
) -> tuple[list[float], float | None]:
    """Per-feature scales from grid effects {task: {feature: [effect per grid scale]}}.

    per_feature: the grid scale with the largest effect on any task it was tried on.
    shared: the grid scale maximising the mean over tasks of the best own-feature effect (calibration).
    """
    if mode == "per_feature":
        scales = []
        for f in features:
            rows = [g[f] for g in grid.values() if f in g]
            if not rows:
                raise ValueError(f"feature {f} has no grid evaluation")
            best = max(range(len(scale_grid)), key=lambda j: max(r[j] for r in rows))
            scales.append(float(scale_grid[best]))
        return scales, None
    if mode == "shared":
        per_task = [g for g in grid.values() if g]
        if not per_task:
            raise ValueError("no grid evaluations to calibrate the shared scale on")
        means = [sum(max(v[j] for v in g.values()) for g in per_task) / len(per_task) for j in range(len(scale_grid))]
        best = max(range(len(scale_grid)), key=lambda j: means[j])
        return [float(scale_grid[best])] * len(features), float(scale_grid[best])
    raise ValueError(f"mode must be 'per_feature' or 'shared', got {mode!r}")


def positive_heatmap(
    lm: LM, tasks: Sequence[Any], feature_sets: dict[str, FeatureSet], sae: JumpReLUSAE, cfg: HeatmapConfig,
    out_dir: str | Path | None = None, progress: bool = True,
) -> HeatmapResult:  # fmt: skip
    """Steer every task with every feature of the tasks' cleaned vectors (Fig. 22/24; Fig. 10 with top_only).

    With out_dir, resumes through a RunDir there (name 'heatmap_run': its config holds the prompt settings, the
    model and the SAE's digest, so a retrained SAE is refused, never served old cells). Every evaluated (task,
    feature, scale) cell is appended to heatmap_cells.jsonl as soon as its task is done, keyed by the task's
    content; a rerun, also one with more tasks or features, computes only missing cells.
    """
    if Site.parse(sae.cfg.site).canonical() != Site(cfg.layer, "resid_pre"):  # resid_post.L-1 is the same tensor
        raise ValueError(f"SAE reads {sae.cfg.site} but the heatmap steers resid_pre.{cfg.layer}")
    names = [t.name for t in tasks]
    missing = [n for n in names if n not in feature_sets]
    if missing:
        raise ValueError(f"no features for tasks {missing}")
    owners: dict[int, list[str]] = {}
    in_tv: dict[int, list[str]] = {}
    for n in names:
        for f in feature_sets[n].features:
            owners.setdefault(int(f), []).append(n)
        for f in feature_sets[n].in_task_vector:
            in_tv.setdefault(int(f), []).append(n)
    features = sorted(owners)
    if not features:
        raise ValueError("the feature sets hold no features")
    directions = dict(zip(features, feature_directions(sae, features)))  # feature -> [d_model]

    # cells depend only on the prompts, the model and the SAE's weights; anything else may change between runs
    ident = dict(setting=cfg.setting, layer=cfg.layer, n_eval=cfg.n_eval, eval_share=cfg.eval_share, seed=cfg.seed,
                 n_score_tokens=cfg.n_score_tokens, directions="unit", model=lm.name, sae=sae_digest(sae))  # fmt: skip
    run, log = None, None
    if out_dir is not None:  # (torchrun: every rank opens it; rank 0 holds the lock and creates the log)
        run = open_shared(Path(out_dir), ident, kind="steering heatmap", name="heatmap_run")
        log = main_first(lambda: run.log("heatmap_cells.jsonl"))
    try:
        return _heatmap_cells(lm, tasks, names, feature_sets, owners, in_tv, features, directions, cfg, log, progress)
    finally:
        if run is not None:
            run.close()


def _heatmap_cells(
    lm: LM, tasks: Sequence[Any], names: list[str], feature_sets: dict[str, FeatureSet], owners: dict[int, list[str]],
    in_tv: dict[int, list[str]], features: list[int], directions: dict[int, torch.Tensor], cfg: HeatmapConfig,
    log: AppendLog | None, progress: bool,
) -> HeatmapResult:  # fmt: skip
    """positive_heatmap's work: the cells it lacks, each task's appended to `log` (keyed by the task's content,
    so a same-named task with other pairs starts afresh), then scales, feature choice and the matrix."""
    from tqdm.auto import tqdm

    unit = {(split, t.name): fingerprint(split, t.digest) for t in tasks for split in ("eval", "calibration")}
    saved = log.done if log is not None else {}
    stores: dict[str, dict[str, dict[str, float]]] = {"eval": {}, "calibration": {}}  # split -> task -> "f@s" -> effect
    baselines: dict[str, float] = {}
    for (split, name), k in unit.items():
        if k in saved:
            stores[split][name] = dict(saved[k]["cells"])
            if saved[k].get("baseline") is not None:
                baselines[name] = saved[k]["baseline"]
    cells = stores["eval"]

    def fill(todo: dict[str, list[tuple[int, float]]], desc: str, split: str = "eval") -> None:
        """Evaluate the missing (feature, scale) cells of each task on one split, one steering batch per task."""
        store = stores[split]
        for task in tqdm(my_share([t for t in tasks if todo.get(t.name)]), desc=desc, disable=not progress):
            need = [(f, s) for f, s in dict.fromkeys(todo[task.name]) if f"{f}@{s:g}" not in store.get(task.name, {})]
            if not need:
                continue
            st = heatmap_steerer(lm, task, cfg, split)
            if split == "eval":
                baselines[task.name] = st.baseline.nll
            vectors = torch.stack([s * directions[f] for f, s in need])  # [n_need, d_model]
            eff = st.relative_loss_decrease(st.score(cfg.layer, vectors, vectors_per_pass=cfg.vectors_per_pass).nll)
            store.setdefault(task.name, {}).update({f"{f}@{s:g}": float(e) for (f, s), e in zip(need, eff)})
            if log is not None:  # the task's cells so far (the last record of a key wins on reading)
                log.add(unit[split, task.name], dict(task=task.name, cells=store[task.name], baseline=baselines.get(task.name)))
        merge_across_ranks(store, baselines)  # under torchrun: every rank's tasks' cells

    # 1. scale selection on a grid of the calibration split (skipped for a fixed scale)
    grid: dict[str, dict[int, list[float]]] = {}
    shared: float | None = cfg.scale if cfg.scale_mode == "fixed" else None
    if cfg.scale_mode == "fixed":
        scales = {f: cfg.scale for f in features}
    else:
        tried = {n: (feature_sets[n].features if cfg.select_on == "owner" else features) for n in names}
        fill({n: [(int(f), s) for f in fs for s in cfg.scale_grid] for n, fs in tried.items()}, "scale grid (calibration)", "calibration")
        cal = stores["calibration"]
        grid = {n: {int(f): [cal[n][f"{f}@{s:g}"] for s in cfg.scale_grid] for f in fs} for n, fs in tried.items() if fs}
        chosen, shared = choose_scales(grid, features, cfg.scale_grid, cfg.scale_mode)
        scales = dict(zip(features, chosen))

    # 2. which features go in the heatmap: all, or each task's strongest on itself (Fig. 10)
    if cfg.top_only:
        fill({n: [(int(f), scales[int(f)]) for f in feature_sets[n].features] for n in names}, "own effects")
        top = [max(feature_sets[n].features, key=lambda f: cells[n][f"{f}@{scales[int(f)]:g}"]) for n in names if feature_sets[n].features]
        top = [f for n, f in zip([n for n in names if feature_sets[n].features], top) if cells[n][f"{f}@{scales[int(f)]:g}"] > 0]
        keep = [int(f) for f in dict.fromkeys(top)]
    else:
        keep = features

    # 3. every task x every kept feature at its scale
    fill({n: [(f, scales[f]) for f in keep] for n in names}, "heatmap")
    raw = torch.tensor([[cells[n][f"{f}@{scales[f]:g}"] for f in keep] for n in names]).reshape(len(names), len(keep))
    return HeatmapResult(
        names, keep, raw, [scales[f] for f in keep], {f: owners[f] for f in keep},
        {f: in_tv.get(f, []) for f in keep}, {n: baselines[n] for n in names}, grid, cfg.to_dict(), shared,
    )  # fmt: skip


# -- the paper's normalisation and ordering -------------------------------------------------------


def normalize_effects(raw: torch.Tensor, clip: float = 1.0, floor: float = 0.2, min_effect: float = 0.0) -> tuple[torch.Tensor, list[int]]:
    """App. F post-processing of the effects D [n_tasks, n_features] (relative loss decrease, 1 - L_steered / L_zero).

    The paper writes it for M = L_steered / L_zero: 1. M = min(M, clip), so steering that hurts
    counts as no effect (D = max(D, 1 - clip)); 2. per task (row) min-max over features, higher =
    stronger; 3. values below `floor` become 0; 4. drop features whose largest raw effect over tasks
    is below min_effect, and features left all zero. Returns (normalised [n_tasks, n_kept], kept
    column indices). A row with max == min becomes 0.
    """
    if raw.dim() != 2 or raw.numel() == 0:
        raise ValueError(f"raw must be a non-empty [n_tasks, n_features] matrix, got shape {tuple(raw.shape)}")
    if not torch.isfinite(raw).all():
        raise ValueError("raw effects contain NaN or inf")
    m = raw.clamp(min=1 - clip)
    lo, hi = m.min(1, keepdim=True).values, m.max(1, keepdim=True).values
    span = hi - lo
    m = torch.where(span > 0, (m - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(m))
    m = torch.where(m < floor, torch.zeros_like(m), m)
    kept = [j for j in range(raw.shape[1]) if float(raw[:, j].max()) >= min_effect and bool((m[:, j] > 0).any())]
    return m[:, kept], kept


def cluster_order(matrix: torch.Tensor) -> list[int]:
    """Row order that puts similar rows together: average-linkage clustering on cosine distance, leaf order."""
    n = matrix.shape[0]
    if n <= 2:
        return list(range(n))
    x = matrix.float()
    norms = x.norm(dim=1, keepdim=True)
    unit = torch.where(norms > 0, x / norms.clamp_min(1e-12), torch.zeros_like(x))
    dist = 1 - unit @ unit.T  # [n, n]; an all-zero row is at distance 1 from everything
    clusters: dict[int, list[int]] = {i: [i] for i in range(n)}
    while len(clusters) > 1:
        keys = sorted(clusters)
        best, pair = math.inf, (keys[0], keys[1])
        for a_i, a in enumerate(keys):
            for b in keys[a_i + 1 :]:
                d = float(dist[clusters[a]][:, clusters[b]].mean())
                if d < best - 1e-12:
                    best, pair = d, (a, b)
        a, b = pair
        clusters[a] = clusters[a] + clusters.pop(b)
    return next(iter(clusters.values()))


def column_order(matrix: torch.Tensor, row_order: Sequence[int]) -> list[int]:
    """Columns sorted by the (ordered) row where they peak, strongest first: a near-diagonal picture."""
    rank = {r: i for i, r in enumerate(row_order)}
    return sorted(range(matrix.shape[1]), key=lambda j: (rank[int(matrix[:, j].argmax())], -float(matrix[:, j].max())))


def specificity(result: HeatmapResult) -> list[dict]:
    """Per task: its own best feature's effect on it, and the largest effect that feature has on another task."""
    out = []
    for t, name in enumerate(result.tasks):
        try:
            f = result.top_feature(name)
        except ValueError:
            out.append(dict(task=name, top_feature=None, scale=None, own_effect=None, best_other_effect=None, best_other_task=None, specific=None))
            continue
        j = result.features.index(f)
        others = [(float(result.raw[u, j]), result.tasks[u]) for u in range(len(result.tasks)) if u != t]
        off, off_task = max(others) if others else (float("nan"), "")
        own = float(result.raw[t, j])
        out.append(dict(task=name, top_feature=f, scale=result.scales[j], own_effect=round(own, 4),
                        best_other_effect=round(off, 4), best_other_task=off_task,
                        specific=bool(own > 0.05 and own >= 2 * max(off, 0.0))))
    return out


def load_feature_sets(results_dir: str | Path, tasks: Sequence[str] | None = None, top_k: int | None = None) -> tuple[dict[str, FeatureSet], dict]:
    """Feature sets from a folder of TVC results (`<dir>/<task>/cleaning.json`), and their shared layer / setting / SAE."""
    from icl_circuits.methods.cleaning import load_cleaning

    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder of cleaning results")
    names = list(tasks) if tasks is not None else sorted(p.name for p in root.iterdir() if (p / "cleaning.json").is_file())
    if not names:
        raise FileNotFoundError(f"{root}: holds no <task>/cleaning.json")
    sets, meta = {}, None
    for n in names:
        r = load_cleaning(root / n)
        m = dict(layer=int(r.layer), setting=r.setting, sae_spec=r.sae_spec)
        if meta is None:
            meta = m
        elif m != meta:
            raise ValueError(f"{root / n}: cleaned with {m}, but other tasks with {meta}")
        sets[n] = feature_set_from_cleaning(r, top_k)
    return sets, meta  # type: ignore[return-value]
