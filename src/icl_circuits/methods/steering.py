"""Steering with single SAE features: heatmaps of which feature helps which task (Sec. 3.2, App. F).

Positive steering (Fig. 6, 22, 24, 25): for every task t and every feature f of the cleaned task
vectors, add scale x f's *unit-norm* decoder direction at the arrow of zero-shot prompts (or at a
fake pair's output, for detectors, App. G) and record the relative loss decrease M(t, f). By default
the scale is one value shared by every feature and task, calibrated once on a calibration split
(zero-shot prompts from the tasks' training pairs, disjoint from the evaluation prompts): the paper's
Gemma 1 procedure, which found 15 there. One scale per feature (the grid value with the largest loss
decrease on any task, the Gemma 2 procedure) and a fixed scale are options. The paper's
normalisation: clip at 1, per-task min-max, zero below 0.2, drop features with a low maximum effect.

Negative steering (App. F.1, Fig. 23): subtract scale x the same unit direction at every arrow of
full ICL prompts (16 prompts x 32 shots); accuracy over all pairs; per feature the smallest scale that
lowers accuracy by >= 0.1 on some task. The paper tries 50 log-spaced scales from 1 to 31.6 around its
shared scale 15; by default we try the same range relative to our calibrated scale (x 1/15 .. x 2.1).

`PromptSteering` evaluates many steering vectors on one prompt batch, several per forward pass,
resuming from the cached resid_pre of the steered layer. Negative steering needs only accuracy at the
arrows: `ArrowAccuracy` resumes from the cached resid_pre too, unembeds the arrows only, and
`ArgmaxCheck` decides "is the target the argmax?" with a bf16 screen and exact fp32 logits for the few
tokens that may beat it, instead of fp32 log-softmax over the vocabulary at every scored token.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from icl_circuits.core.adapters import logit_softcap
from icl_circuits.core.distributed import is_main, merge_across_ranks, my_share
from icl_circuits.core.model import LM
from icl_circuits.data.prompts import N_SCORE_TOKENS, PromptBatch
from icl_circuits.sae.dictionary import JumpReLUSAE
from icl_circuits.core.sites import Intervention, Site
from icl_circuits.core.storage import read_json, write_json

# -- one feature as a steering vector ----------------------------------------------------------


def feature_directions(sae: JumpReLUSAE, features: Sequence[int], unit: bool = True) -> torch.Tensor:
    """Steering directions of `features` [n, d_out]: unit-norm decoder rows (the paper's), or with
    unit=False the decoder rows in the model's units (what a latent of 1 adds)."""
    feats = list(features)
    if not feats:
        raise ValueError("no features given")
    bad = [f for f in feats if not 0 <= int(f) < sae.d_sae]
    if bad:
        raise ValueError(f"features {bad[:5]} outside 0..{sae.d_sae - 1} of the SAE at {sae.cfg.site}")
    rows = sae.W_dec.detach()[torch.tensor(feats, dtype=torch.long, device=sae.device)].float() / sae.cfg.output_scale
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12) if unit else rows


def feature_intervention(
    sae: JumpReLUSAE, feature: int, scale: float, positions: torch.Tensor, site: str | Site | None = None
) -> Intervention:
    """Add scale x the feature's unit-norm decoder direction at `positions` [batch, seq] of the SAE's output site."""
    site = Site.parse(site or sae.cfg.out_site or sae.cfg.site)
    return Intervention(site, positions, scale * feature_directions(sae, [feature])[0])


# -- many steering vectors on one batch -------------------------------------------------------


@dataclass(frozen=True)
class SteeringScores:
    nll: torch.Tensor  # [n_vectors]
    accuracy: torch.Tensor | None  # [n_vectors], when asked for


class PromptSteering:
    """Scores steering vectors added to resid_pre[layer] at `steer_at` of a fixed batch.

    scoring: which outputs the loss / accuracy covers ('last' for zero-shot and fake-pair
    prompts, 'all' for negative steering on ICL prompts). The batch is cut after the last
    scored position (the model is causal, so nothing later matters), resid_pre[layer] is cached
    once, and each evaluation runs blocks layer..end on `vectors_per_pass` copies of the batch.
    """

    def __init__(
        self, lm: LM, batch: PromptBatch, layer: int, steer_at: torch.Tensor, scoring: str = "last",
        n_score_tokens: int = N_SCORE_TOKENS, vectors_per_pass: int = 8, prompts_per_pass: int | None = None,
    ) -> None:  # fmt: skip
        if steer_at.dtype != torch.bool or steer_at.shape != batch.input_ids.shape:
            raise ValueError(f"steer_at must be a bool mask {tuple(batch.input_ids.shape)}, got {steer_at.dtype} {tuple(steer_at.shape)}")
        if not 0 <= layer < lm.n_layers:
            raise ValueError(f"layer {layer} outside 0..{lm.n_layers - 1}")
        if vectors_per_pass < 1:
            raise ValueError(f"vectors_per_pass must be >= 1, got {vectors_per_pass}")
        self.lm, self.layer, self.batch = lm, layer, batch
        sc = batch.scoring(scoring, n_score_tokens)
        seq = int(sc.positions.nonzero()[:, 1].max()) + 1  # positions after the last scored one never matter
        self.ids, self.mask = batch.input_ids[:, :seq], batch.attention_mask[:, :seq]
        self.steer_at, self.positions = steer_at[:, :seq], sc.positions[:, :seq]
        if not self.steer_at.any():
            raise ValueError("steer_at selects no position before the last scored token")
        self.targets, self.is_first = sc.targets, sc.is_first
        self.vectors_per_pass = vectors_per_pass
        self.prompts_per_pass = prompts_per_pass or len(batch)
        site = Site(layer, "resid_pre")
        with torch.no_grad():
            self.cache = torch.cat([
                lm.run(self.ids[i : i + self.prompts_per_pass], self.mask[i : i + self.prompts_per_pass], read=[site]).acts[site]
                for i in range(0, len(batch), self.prompts_per_pass)
            ])  # [batch, seq, d_model]  # fmt: skip
        self.baseline = self._score(torch.zeros(1, lm.d_model, device=lm.device), need_accuracy=True)
        self.baseline_nll = float(self.baseline.nll[0])
        self.baseline_accuracy = float(self.baseline.accuracy[0])  # type: ignore[index]

    @torch.no_grad()
    def score(self, vectors: torch.Tensor, need_accuracy: bool = False) -> SteeringScores:
        """vectors [n, d_model] -> NLL (and accuracy) of the scored tokens with each one added."""
        if vectors.dim() != 2 or vectors.shape[1] != self.lm.d_model:
            raise ValueError(f"vectors must be [n, d_model={self.lm.d_model}], got {tuple(vectors.shape)}")
        parts = [self._score(vectors[i : i + self.vectors_per_pass], need_accuracy) for i in range(0, len(vectors), self.vectors_per_pass)]
        nll = torch.cat([p.nll for p in parts]) if parts else torch.zeros(0)
        acc = torch.cat([p.accuracy for p in parts]) if need_accuracy and parts else None  # type: ignore[misc]
        return SteeringScores(nll, acc)

    def relative_loss_decrease(self, vectors: torch.Tensor) -> torch.Tensor:
        """[n]: (L_zero - L_steered) / L_zero for each vector [n, d_model]."""
        return (self.baseline_nll - self.score(vectors).nll) / self.baseline_nll

    def _score(self, vectors: torch.Tensor, need_accuracy: bool) -> SteeringScores:
        k, n_prompts = len(vectors), len(self.ids)
        nll_sum = torch.zeros(k)
        hits = torch.zeros(k)
        n_rows = n_first = 0
        for s in range(0, n_prompts, self.prompts_per_pass):
            e = min(s + self.prompts_per_pass, n_prompts)
            b = e - s
            pos = self.positions[s:e]
            n = int(pos.sum())
            if n == 0:
                continue
            first_rows = int(self.positions[:s].sum())
            targets = self.targets[first_rows : first_rows + n]
            value = vectors.float().repeat_interleave(b, 0)[:, None, :]  # [k*b, 1, d_model]; copy j = rows j*b..
            out = self.lm.run(
                self.ids[s:e].repeat(k, 1), self.mask[s:e].repeat(k, 1),
                start_layer=self.layer, start_resid=self.cache[s:e].repeat(k, 1, 1),
                interventions=[Intervention(Site(self.layer, "resid_pre"), self.steer_at[s:e].repeat(k, 1), value)],
                logprob_positions=pos.repeat(k, 1),
                targets=None if need_accuracy else targets.repeat(k),
            )  # fmt: skip
            if need_accuracy:
                lp = out.logprobs.view(k, n, -1)  # type: ignore[union-attr]  # [k, n, vocab]
                tl = lp.gather(-1, targets.to(lp.device)[None, :, None].expand(k, n, 1))[..., 0]  # [k, n]
                first = self.is_first[first_rows : first_rows + n].to(lp.device)
                hits += (lp[:, first].argmax(-1) == targets.to(lp.device)[first]).float().sum(1).cpu()
                n_first += int(first.sum())
            else:
                tl = out.target_logprobs.view(k, n)  # type: ignore[union-attr]
            nll_sum += -tl.float().sum(1).cpu()
            n_rows += n
        return SteeringScores(nll_sum / n_rows, hits / n_first if need_accuracy else None)


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


def _jsonable(d: dict) -> dict:
    """As it reads back from JSON (tuples become lists), so saved and current configs compare equal."""
    return json.loads(json.dumps(d))


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
    eval_share: float = 0.5
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


SPLITS: tuple[str, ...] = ("eval", "calibration")


def steering_batch(lm: LM, task: Any, cfg: HeatmapConfig, split: str = "eval") -> PromptSteering:
    """Zero-shot (execution) or fake-pair (detection) prompts: of the task's held-out pairs ('eval',
    what the heatmap reports), or of its training pairs ('calibration', where scales are chosen)."""
    from icl_circuits.data.prompts import fake_pair_prompts, zero_shot_prompts

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    train, held_out = task.split(cfg.eval_share, cfg.seed)
    pairs, seed = (held_out, cfg.seed + 1) if split == "eval" else (train, cfg.seed + 2)
    if cfg.setting == "execution":
        batch = zero_shot_prompts(lm.tokenizer, pairs, cfg.n_eval, seed=seed)
        steer_at = batch.arrow_mask("last")
    else:
        batch = fake_pair_prompts(lm.tokenizer, pairs, cfg.n_eval, seed=seed)
        steer_at = batch.output_mask("first")
    return PromptSteering(lm, batch, cfg.layer, steer_at, "last", n_score_tokens=cfg.n_score_tokens, vectors_per_pass=cfg.vectors_per_pass)


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
        return dict(
            tasks=self.tasks, features=self.features, raw=self.raw.tolist(), scales=self.scales,
            owners={str(k): v for k, v in self.owners.items()},
            in_task_vector={str(k): v for k, v in self.in_task_vector.items()},
            baselines=self.baselines, grid={t: {str(f): v for f, v in g.items()} for t, g in self.grid.items()},
            config=self.config, shared_scale=self.shared_scale,
        )  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> "HeatmapResult":
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

    Every evaluated (task, feature, scale) cell is saved to out_dir/heatmap_cells.json as soon
    as its task is done; a rerun, also one with more tasks or features, computes only missing cells.
    """
    from tqdm.auto import tqdm

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

    # cells depend only on the prompts and the SAE; anything else may change between runs
    key = _jsonable(dict(setting=cfg.setting, layer=cfg.layer, n_eval=cfg.n_eval, eval_share=cfg.eval_share, seed=cfg.seed,
                         n_score_tokens=cfg.n_score_tokens, directions="unit",
                         sae=sae.cfg.site, sae_model=sae.cfg.model, d_sae=sae.d_sae))  # fmt: skip
    path = Path(out_dir) / "heatmap_cells.json" if out_dir else None
    state: dict[str, Any] = {"key": key, "cells": {}, "calibration": {}, "baselines": {}}
    if path and path.is_file():
        saved = read_json(path)
        if saved.get("key") != key:
            raise ValueError(f"{path} was written for other prompts or another SAE ({saved.get('key')}); use a new --out or delete it")
        state = saved
    state.setdefault("calibration", {})
    cells: dict[str, dict[str, float]] = state["cells"]

    def fill(todo: dict[str, list[tuple[int, float]]], desc: str, split: str = "eval") -> None:
        """Evaluate the missing (feature, scale) cells of each task on one split, one steering batch per task."""
        store = cells if split == "eval" else state["calibration"]
        for task in tqdm(my_share([t for t in tasks if todo.get(t.name)]), desc=desc, disable=not progress):
            need = [(f, s) for f, s in dict.fromkeys(todo[task.name]) if f"{f}@{s:g}" not in store.get(task.name, {})]
            if not need:
                continue
            st = steering_batch(lm, task, cfg, split)
            if split == "eval":
                state["baselines"][task.name] = st.baseline_nll
            eff = st.relative_loss_decrease(torch.stack([s * directions[f] for f, s in need]))
            store.setdefault(task.name, {}).update({f"{f}@{s:g}": float(e) for (f, s), e in zip(need, eff)})
            if path and is_main():  # under torchrun rank 0 saves its progress; the rest after the merge
                write_json(path, state)
        if merge_across_ranks(store, state["baselines"]) and path and is_main():  # every rank's tasks' cells
            write_json(path, state)

    # 1. scale selection on a grid of the calibration split (skipped for a fixed scale)
    grid: dict[str, dict[int, list[float]]] = {}
    shared: float | None = cfg.scale if cfg.scale_mode == "fixed" else None
    if cfg.scale_mode == "fixed":
        scales = {f: cfg.scale for f in features}
    else:
        tried = {n: (feature_sets[n].features if cfg.select_on == "owner" else features) for n in names}
        fill({n: [(int(f), s) for f in fs for s in cfg.scale_grid] for n, fs in tried.items()}, "scale grid (calibration)", "calibration")
        cal = state["calibration"]
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
        {f: in_tv.get(f, []) for f in keep}, {n: state["baselines"][n] for n in names}, grid, cfg.to_dict(), shared,
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


# -- negative steering -----------------------------------------------------------------------------


PAPER_SCALE = 15.0  # the paper's shared steering scale (Gemma 1 2B)
PAPER_NEGATIVE_SCALES = log_grid(1.0, 10**1.5, 50)  # the authors' negative-steering scales, np.logspace(0, 1.5, 50)


def paper_negative_scales(shared_scale: float, n: int = 50) -> tuple[float, ...]:
    """The authors' negative-steering range (1 .. 31.6 around their scale 15), carried over to a model whose
    calibrated shared scale is `shared_scale`: shared_scale x (1/15 .. 2.1), n log-spaced values."""
    if not shared_scale > 0:
        raise ValueError(f"shared_scale must be positive, got {shared_scale}")
    return log_grid(shared_scale / PAPER_SCALE, shared_scale * 10**1.5 / PAPER_SCALE, n)


@dataclass(frozen=True)
class NegativeConfig:
    layer: int = 12
    n_prompts: int = 16
    n_shots: int = 32
    scales: tuple[float, ...] | None = None  # None: paper_negative_scales of the heatmap's calibrated shared scale
    min_drop: float = 0.1  # a feature's scale: the smallest lowering accuracy by this much on some task
    seed: int = 0
    prompts_per_pass: int = 2  # speed only: prompts per forward pass (times vectors_per_pass copies)
    vectors_per_pass: int = 4  # speed only: steering vectors (features at their current scale) per forward pass

    def __post_init__(self) -> None:
        if self.scales is not None and (not self.scales or any(s <= 0 for s in self.scales) or list(self.scales) != sorted(self.scales)):
            raise ValueError(f"scales must be positive and ascending, got {self.scales}")
        if self.prompts_per_pass < 1 or self.vectors_per_pass < 1:
            raise ValueError(f"prompts_per_pass and vectors_per_pass must be >= 1, got {self.prompts_per_pass}, {self.vectors_per_pass}")

    def to_dict(self) -> dict:
        return asdict(self)


_SPEED_ONLY = ("prompts_per_pass", "vectors_per_pass")  # NegativeConfig fields that cannot change a result


@dataclass
class NegativeResult:
    tasks: list[str]
    features: list[int]
    drop: torch.Tensor  # [n_tasks, n_features] accuracy decrease at the chosen scale
    scales: list[float]  # per feature
    baseline_accuracy: dict[str, float]
    owners: dict[int, list[str]]
    config: dict

    def to_dict(self) -> dict:
        return dict(tasks=self.tasks, features=self.features, drop=self.drop.tolist(), scales=self.scales,
                    baseline_accuracy=self.baseline_accuracy, owners={str(k): v for k, v in self.owners.items()}, config=self.config)


_BF16_EPS = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)


class ArgmaxCheck:
    """Is the target the argmax of the full-vocabulary logits? Answered without fp32 logits over the whole vocabulary.

    Accuracy needs only that yes / no, and on the CPU an fp32 argmax over 262k tokens cost more than the
    steered blocks. There the logits come first from a bf16 copy of the output matrix (~2.5x faster), each
    row with a guaranteed error bound e = 4u |h| max_v |w_v| + 2u max_v |logit_v| + 1e-3, u = 2^-8 (rounding
    h and W costs <= (2u + u^2) |h| |w_v|, the fp32 accumulation ~1e-4 of that, the bf16 output u |logit_v|;
    the rest is margin, and 1e-3 covers fp32 summation-order differences). A row is a miss when some
    token's logit is surely above the target's (approx - e > target); otherwise the few tokens that may tie
    or beat it (approx + e >= target) get exact fp32 logits, compared as torch.argmax does (the first index
    wins a tie). So the answer is that of argmax over the model's fp32 log-softmax. Elsewhere (GPU,
    low-precision heads) it is exactly that argmax, a chunk of rows at a time.
    """

    def __init__(self, lm: LM, chunk: int = 128) -> None:
        head = lm.model.get_output_embeddings()
        self.lm, self.chunk = lm, chunk
        self.weight = head.weight.detach()  # [vocab, d_model]
        bias = getattr(head, "bias", None)
        self.bias = None if bias is None else bias.detach().float()  # [vocab]
        self.softcap = logit_softcap(lm.model)
        self.screen = self.weight.dtype == torch.float32 and self.weight.device.type == "cpu"
        if self.screen:
            self.weight16 = self.weight.to(torch.bfloat16)  # [vocab, d_model]
            self.w_max = float(self.weight.norm(dim=1).max())

    @torch.no_grad()
    def hits(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """hidden [n, d_model] final (normed) states, targets [n] token ids -> [n] bool: target == argmax of the logits."""
        targets = targets.to(hidden.device)
        parts = []
        for i in range(0, len(hidden), self.chunk):
            h, t = hidden[i : i + self.chunk], targets[i : i + self.chunk]  # [c, d_model], [c]
            parts.append(self._screened(h.float(), t) if self.screen else self.lm.logprobs_of(h).argmax(-1) == t)
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool, device=hidden.device)

    def _raw(self, h: torch.Tensor, rows: torch.Tensor, vocab: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """[m] fp32 logits of token vocab[j] at row rows[j] of h [c, d_model] (before any softcap)."""
        parts = [(h[rows[j : j + chunk]] * self.weight[vocab[j : j + chunk]]).sum(-1) for j in range(0, len(vocab), chunk)]
        out = torch.cat(parts) if parts else h.new_zeros(0)
        return out if self.bias is None else out + self.bias[vocab]

    def _cap(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits

    def _screened(self, h: torch.Tensor, t: torch.Tensor, k: int = 16) -> torch.Tensor:
        rows = torch.arange(len(h), device=h.device)  # [c]
        approx = h.to(torch.bfloat16) @ self.weight16.T  # [c, vocab] bf16: kept so, the passes over it are the cost
        if self.bias is not None:
            approx = approx.float() + self.bias
        target = self._raw(h, rows, t)  # [c] exact
        top_v, top_i = approx.topk(min(k + 1, approx.shape[1]), dim=1)  # [c, k+1]: the best others are among these, whatever the target's rank
        top_v = top_v.float()
        boundary = top_v[:, -1]  # [c]: no token outside the top k+1 has a larger approx logit
        biggest = torch.maximum(top_v[:, 0].abs(), approx.amin(1).float().abs())  # [c] max_v |approx logit|
        top_v = top_v.masked_fill(top_i == t[:, None], -math.inf)  # others only
        err = 4 * _BF16_EPS * h.norm(dim=1) * self.w_max + 2 * _BF16_EPS * biggest + 1e-3  # [c] bound on |approx - exact|
        # surely beaten (raw logits; the softcap is monotone and, short of fp32 saturation, keeps the order)
        lost = top_v.amax(1) - err > target  # [c]
        floor = target - err  # [c]: a token whose approx logit is below it cannot tie or beat the target
        many = (boundary >= floor) & ~lost  # [c], rare: candidates may lie outside the top k+1
        r, j = ((top_v >= floor[:, None]) & ~(lost | many)[:, None]).nonzero(as_tuple=True)
        rs, vs = [r], [top_i[r, j]]
        for row in many.nonzero().flatten().tolist():
            more = (approx[row].float() >= floor[row]).nonzero().flatten()  # [m_row]; compared in fp32, not bf16
            rs.append(torch.full_like(more, row))
            vs.append(more)
        r, v = torch.cat(rs), torch.cat(vs)  # [m], [m]: (row, token) pairs that get exact logits
        v_ok = v != t[r]
        r, v = r[v_ok], v[v_ok]
        other, mine = self._cap(self._raw(h, r, v)), self._cap(target)[r]  # [m], [m]
        beats = (other > mine) | ((other == mine) & (v < t[r]))  # [m]; torch.argmax takes the first maximum
        beaten = torch.zeros(len(h), dtype=torch.bool, device=h.device)
        beaten[r[beats]] = True
        return ~lost & ~beaten


class ArrowAccuracy:
    """One task's ICL prompts with a vector subtracted at every arrow of resid_pre[layer] (App. F.1).

    accuracy = share of pairs (demonstrations and query) whose output's first token is the argmax at
    their arrow. The steered positions are the scored ones (the arrows), so each prompt is cut after its
    last arrow; resid_pre[layer] is cached once, and each evaluation runs blocks layer..end on
    vectors_per_pass copies of prompts_per_pass prompts (sorted by length: little padding), unembeds only
    the arrows, and asks ArgmaxCheck whether the target wins. The baseline comes from the caching pass.
    """

    def __init__(
        self, lm: LM, batch: PromptBatch, layer: int, check: ArgmaxCheck, prompts_per_pass: int = 2, vectors_per_pass: int = 4,
    ) -> None:  # fmt: skip
        if not 0 <= layer < lm.n_layers:
            raise ValueError(f"layer {layer} outside 0..{lm.n_layers - 1}")
        self.lm, self.layer, self.check, self.vectors_per_pass = lm, layer, check, vectors_per_pass
        sc = batch.scoring("all", 1)  # rows: each pair's arrow, predicting its output's first token
        arrows = batch.arrow_mask("all")  # [batch, seq]
        if not torch.equal(sc.positions, arrows):  # build_prompt guarantees that an output starts right after its arrow
            raise ValueError("first output tokens are not predicted at the arrows")
        ends = [p.pairs[-1].arrow + 1 for p in batch.prompts]  # the model is causal: nothing after the last arrow matters
        order = sorted(range(len(batch)), key=lambda b: ends[b])
        site = Site(layer, "resid_pre")
        self.chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        hits = []
        for i in range(0, len(order), prompts_per_pass):
            idx = torch.tensor(order[i : i + prompts_per_pass], device=batch.input_ids.device)
            seq = max(ends[b] for b in order[i : i + prompts_per_pass])
            ids, mask, at = batch.input_ids[idx, :seq], batch.attention_mask[idx, :seq], arrows[idx, :seq]  # [b, seq]
            targets = batch.input_ids[idx, 1 : seq + 1][at]  # [n]: the token after each arrow
            with torch.no_grad():
                out = lm.run(ids, mask, read=[site], logprob_positions=at, unembed=False)
            self.chunks.append((ids, mask, at, targets, out.acts[site]))  # ..., resid_pre[layer] [b, seq, d_model]
            hits.append(check.hits(out.hidden, targets))  # type: ignore[arg-type]
        self.n_rows = int(arrows.sum())
        self.baseline = float(torch.cat(hits).float().sum() / self.n_rows)

    @torch.no_grad()
    def accuracy(self, vectors: torch.Tensor) -> torch.Tensor:
        """vectors [k, d_model], added at every arrow -> [k] accuracy (float32, as counted by PromptSteering)."""
        if vectors.dim() != 2 or vectors.shape[1] != self.lm.d_model:
            raise ValueError(f"vectors must be [k, d_model={self.lm.d_model}], got {tuple(vectors.shape)}")
        hits = torch.zeros(len(vectors), device=vectors.device)  # [k]
        site = Site(self.layer, "resid_pre")
        for s in range(0, len(vectors), self.vectors_per_pass):
            vec = vectors[s : s + self.vectors_per_pass].float()  # [k', d_model]
            k = len(vec)
            for ids, mask, at, targets, cache in self.chunks:
                b, n = len(ids), len(targets)
                out = self.lm.run(
                    ids.repeat(k, 1), mask.repeat(k, 1), start_layer=self.layer, start_resid=cache.repeat(k, 1, 1),
                    interventions=[Intervention(site, at.repeat(k, 1), vec.repeat_interleave(b, 0)[:, None, :])],  # copy j: rows j*b..
                    logprob_positions=at.repeat(k, 1), unembed=False,
                )  # fmt: skip
                ok = self.check.hits(out.hidden, targets.repeat(k))  # type: ignore[arg-type]  # [k * n], copy-major
                hits[s : s + k] += ok.view(k, n).float().sum(1).to(hits.device)
        return (hits / self.n_rows).cpu()


def negative_steering(
    lm: LM, tasks: Sequence[Any], feature_sets: dict[str, FeatureSet], sae: JumpReLUSAE, cfg: NegativeConfig,
    out_dir: str | Path | None = None, progress: bool = True,
) -> NegativeResult:  # fmt: skip
    """App. F.1: subtract scale x direction at every arrow of ICL prompts; accuracy over all pairs.

    Scales are tried in ascending order; a feature stops at the first one that lowers accuracy by
    >= min_drop on some task (or the largest). Features advance together, one scale per round, so a
    forward pass carries several of them and no scale past a feature's stopping one is evaluated.
    Resumes from out_dir/negative_progress.json (saved after every round).
    """
    from tqdm.auto import tqdm

    from icl_circuits.data.prompts import icl_prompts

    names = [t.name for t in tasks]
    owners: dict[int, list[str]] = {}
    for n in names:
        if n not in feature_sets:
            raise ValueError(f"no features for task {n!r}")
        for f in feature_sets[n].features:
            owners.setdefault(int(f), []).append(n)
    features = sorted(owners)
    if not features:
        raise ValueError("the feature sets hold no features")
    if cfg.scales is None:
        raise ValueError("NegativeConfig.scales is None: give scales, e.g. paper_negative_scales(shared_scale)")
    directions = feature_directions(sae, features)  # [n_features, d_model], unit norm
    path = Path(out_dir) / "negative_progress.json" if out_dir else None
    state: dict[str, Any] = {"config": _jsonable(cfg.to_dict()), "features": features, "done": {}}
    if path and path.is_file():
        saved = read_json(path)
        same = {k: v for k, v in saved.get("config", {}).items() if k not in _SPEED_ONLY} == {
            k: v for k, v in state["config"].items() if k not in _SPEED_ONLY
        }  # fmt: skip
        if not same or saved.get("features") != features:
            raise ValueError(f"{path} was written with another config or feature list; use a new --out or delete it")
        state = {**saved, "config": state["config"]}

    check = ArgmaxCheck(lm)
    evals: dict[str, ArrowAccuracy] = {}
    for task in tqdm(tasks, desc="ICL prompts", disable=not progress):
        train, _ = task.split(0.5, cfg.seed)
        batch = icl_prompts(lm.tokenizer, train, cfg.n_prompts, cfg.n_shots, seed=cfg.seed)
        evals[task.name] = ArrowAccuracy(lm, batch, cfg.layer, check, cfg.prompts_per_pass, cfg.vectors_per_pass)
    base = {n: e.baseline for n, e in evals.items()}
    step = {i: 0 for i, f in enumerate(features) if str(f) not in state["done"]}  # feature index -> index of its next scale
    bar = tqdm(total=len(features), initial=len(features) - len(step), desc="negative steering", disable=not progress)
    while step:
        todo = list(step)
        vectors = torch.stack([-cfg.scales[step[i]] * directions[i] for i in todo])  # [n_todo, d_model]
        acc = {n: e.accuracy(vectors) for n, e in evals.items()}  # task -> [n_todo]
        for j, i in enumerate(todo):
            scale = cfg.scales[step[i]]
            drops = [base[n] - float(acc[n][j]) for n in names]
            if max(drops) >= cfg.min_drop or step[i] == len(cfg.scales) - 1:
                state["done"][str(features[i])] = {"scale": scale, "drop": drops}
                del step[i]
                bar.update()
            else:
                step[i] += 1
        if path:
            write_json(path, state)
    bar.close()
    drop = torch.tensor([[state["done"][str(f)]["drop"][t] for f in features] for t in range(len(names))])
    return NegativeResult(names, features, drop, [state["done"][str(f)]["scale"] for f in features], base, owners, cfg.to_dict())


# -- figures ----------------------------------------------------------------------------------------


def plot_feature_heatmap(
    values: torch.Tensor, tasks: Sequence[str], features: Sequence[int | str], stem: str | Path, *,
    in_tv: torch.Tensor | None = None, kept: torch.Tensor | None = None, title: str = "",
    cbar: str = "Effect strength", vmin: float | None = 0.0, vmax: float | None = None, cmap: str = "viridis",
    xlabel: str = "Feature", ylabel: str = "Task",
) -> list[Path]:  # fmt: skip
    """Tasks x features heatmap; red dots: feature in the task's raw TV, green: kept by cleaning (Fig. 22)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from icl_circuits.core.storage import save_figure

    n_t, n_f = values.shape
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * n_f + 3), max(4.0, 0.3 * n_t + 1.5)))
    im = ax.imshow(values.numpy(), aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(n_f), [str(f) for f in features], rotation=90, fontsize=6)
    ax.set_yticks(range(n_t), list(tasks), fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    handles = []
    if in_tv is not None and in_tv.any():
        r, c = in_tv.nonzero(as_tuple=True)
        handles.append(ax.scatter(c.numpy() - 0.18, r.numpy(), s=9, c="red", label="in raw task vector"))
    if kept is not None and kept.any():
        r, c = kept.nonzero(as_tuple=True)
        handles.append(ax.scatter(c.numpy() + 0.18, r.numpy(), s=9, c="lime", edgecolors="black", linewidths=0.3, label="kept by cleaning"))
    if handles:
        ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=7, frameon=False)
    fig.colorbar(im, ax=ax, label=cbar, fraction=0.03, pad=0.01)
    if title:
        ax.set_title(title, fontsize=9, pad=18 if handles else 6)
    paths = save_figure(fig, stem)
    plt.close(fig)
    return paths


def heatmap_figures(result: HeatmapResult, out_dir: str | Path, name: str = "heatmap", clip: float = 1.0, floor: float = 0.2,
                    min_effect: float = 0.0, what: str = "task-execution features") -> dict[str, Any]:
    """Raw and normalised heatmaps (PNG + SVG), ordered so similar tasks sit together; CSV tables."""
    from icl_circuits.core.storage import write_csv

    out = Path(out_dir)
    norm, kept_cols = normalize_effects(result.raw, clip, floor, min_effect)
    in_tv, kept = result.marks()
    basis = norm if norm.shape[1] else result.raw.clamp(max=clip)
    rows = cluster_order(basis)
    files: list[Path] = []
    cols = column_order(result.raw, rows)
    v = max(float(result.raw.max()), 0.05)  # symmetric colours: harmful steering shows blue, clipped at -v
    files += plot_feature_heatmap(
        result.raw[rows][:, cols], [result.tasks[r] for r in rows], [result.features[c] for c in cols], out / f"{name}_raw",
        in_tv=in_tv[rows][:, cols], kept=kept[rows][:, cols], vmin=-v, vmax=v, cmap="RdBu_r", cbar="Relative loss decrease",
        title=f"Steering with {what}: raw relative loss decrease (Fig. 24 style; colours clipped at +-{v:.2f})",
    )  # fmt: skip
    if norm.shape[1]:
        ncols = column_order(norm, rows)
        orig = [kept_cols[c] for c in ncols]
        files += plot_feature_heatmap(
            norm[rows][:, ncols], [result.tasks[r] for r in rows], [result.features[c] for c in orig], out / f"{name}_normalized",
            in_tv=in_tv[rows][:, orig], kept=kept[rows][:, orig], vmin=0.0, vmax=1.0,
            title=f"Steering with {what}: harm clipped to 0, per-task min-max, < {floor} -> 0 (Fig. 22 style)",
        )  # fmt: skip
    table = [
        dict(task=t, feature=f, scale=result.scales[j], relative_loss_decrease=round(float(result.raw[i, j]), 5),
             in_task_vector=bool(in_tv[i, j]), kept_by_cleaning=bool(kept[i, j]))
        for i, t in enumerate(result.tasks) for j, f in enumerate(result.features)
    ]  # fmt: skip
    files.append(write_csv(out / f"{name}.csv", table))
    return dict(files=files, row_order=[result.tasks[r] for r in rows], kept_features=[result.features[c] for c in kept_cols])


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


def sae_from_spec(lm: LM, spec: str) -> JumpReLUSAE:
    """A result's recorded `sae_spec` ('resid:12': the starter SAE; else a path in any supported format) -> the SAE on lm's device."""
    from icl_circuits.sae.registry import SAERef

    return SAERef.parse(spec).resolve(lm, train_if_missing=False)


def run_heatmap(
    lm: LM, results_dir: str | Path, out_dir: str | Path, figures_dir: str | Path | None = None, name: str | None = None,
    tasks: Sequence[str] | None = None, top_k: int | None = None, overrides: dict | None = None,
    floor: float = 0.2, min_effect: float = 0.0, negative: NegativeConfig | None = None, all_rows: bool = False,
    negative_features: Sequence[int] | str | None = None, progress: bool = True, positive: HeatmapResult | None = None,
    negative_n_scales: int = 50,
) -> dict[str, Any]:  # fmt: skip
    """The `heatmap` command: positive (and optionally negative) steering heatmaps from a folder of TVC results.

    positive: a finished positive heatmap of the same results (e.g. another run's heatmap.json), used instead of
    computing one: negative steering then runs as a step of its own. negative_features "top": each task's top
    feature with a positive effect on its own task; negative_n_scales: how many of the paper's scales (when
    negative.scales is None)."""
    from icl_circuits.core.storage import write_csv
    from icl_circuits.data.tasks import task_of_result

    sets, meta = load_feature_sets(results_dir, tasks, top_k)
    top = negative_features == "top"
    chosen = set() if top else {int(f) for f in negative_features or ()}
    unknown = chosen - {f for fs in sets.values() for f in fs.features}
    if unknown:  # checked before any slow work
        raise ValueError(f"negative-steering features {sorted(unknown)} are in no task's cleaned vector")
    if all_rows:  # every built-in task is a row, also those without (yet) a cleaning result
        from icl_circuits.data.tasks import list_tasks

        sets = {**sets, **{n: FeatureSet(n, []) for n in list_tasks() if n not in sets}}
    sae = sae_from_spec(lm, meta["sae_spec"])
    cfg = HeatmapConfig(setting=meta["setting"], layer=meta["layer"], **(overrides or {}))
    task_objs = [task_of_result(Path(results_dir) / n, n) for n in sets]  # built-in rows without a result fall back by name
    out = Path(out_dir)
    if positive is not None:
        if sorted(positive.tasks) != sorted(sets) or positive.config.get("setting") != cfg.setting:
            raise ValueError(f"the given positive heatmap covers tasks {sorted(positive.tasks)} ({positive.config.get('setting')}), "
                             f"not the {cfg.setting} results' {sorted(sets)}")  # fmt: skip
        res = positive
    else:
        res = positive_heatmap(lm, task_objs, sets, sae, cfg, out_dir=out, progress=progress)
    write_json(out / "heatmap.json", res.to_dict())
    name = name or f"{cfg.setting}{'_top' if cfg.top_only else ''}"
    figs = Path(figures_dir) if figures_dir else out
    what = "task-detection features (fake pair)" if cfg.setting == "detection" else "task-execution features"
    info = heatmap_figures(res, figs, name, floor=floor, min_effect=min_effect, what=what)
    spec_rows = specificity(res)
    info["files"].append(write_csv(figs / f"{name}_specificity.csv", spec_rows))
    summary: dict[str, Any] = dict(heatmap=res, specificity=spec_rows, files=info["files"], meta=meta)
    if negative is not None:
        if top:  # each task's top executor, if it helps its own task (the features the paper subtracts)
            chosen = {int(r["top_feature"]) for r in spec_rows if r["top_feature"] is not None and r["own_effect"] > 0}
            if not chosen:
                raise ValueError("negative features 'top': no task has a top feature with a positive effect on its own task")
        if chosen:  # the slow part: often run on a chosen subset (e.g. each task's top executor)
            sets = {n: replace(fs, features=[f for f in fs.features if f in chosen]) for n, fs in sets.items()}
        if negative.scales is None:  # the paper's range around the shared scale (per-feature scales: their median)
            shared = res.shared_scale or sorted(res.scales)[len(res.scales) // 2]
            negative = replace(negative, scales=paper_negative_scales(shared, negative_n_scales))
        neg = negative_steering(lm, task_objs, sets, sae, replace(negative, layer=cfg.layer), out_dir=out, progress=progress)
        write_json(out / "negative.json", neg.to_dict())
        summary["files"] += plot_negative(neg, figs / f"{name}_negative")
        summary["files"].append(write_csv(figs / f"{name}_negative.csv", [
            dict(task=t, baseline_accuracy=round(neg.baseline_accuracy[t], 4),
                 **{f"{f}@{s:g}": round(float(neg.drop[i, j]), 4) for j, (f, s) in enumerate(zip(neg.features, neg.scales))})
            for i, t in enumerate(neg.tasks)
        ]))  # fmt: skip
        summary["negative"] = neg
    return summary


def plot_negative(neg: NegativeResult, stem: str | Path) -> list[Path]:
    """Fig. 23: accuracy decrease of each task (rows) when each feature (columns) is subtracted."""
    rows = cluster_order(neg.drop.clamp_min(0))
    cols = column_order(neg.drop, rows)
    kept = torch.tensor([[t in neg.owners.get(f, []) for f in neg.features] for t in neg.tasks]).reshape(neg.drop.shape)
    return plot_feature_heatmap(
        neg.drop[rows][:, cols], [neg.tasks[r] for r in rows], [f"{neg.features[c]} (x{neg.scales[c]:g})" for c in cols], stem,
        kept=kept[rows][:, cols], vmin=None, cbar="Accuracy decrease", cmap="magma",
        title="Negative steering on ICL prompts (every arrow), smallest scale lowering accuracy by >= 0.1 (Fig. 23 style)",
    )  # fmt: skip
