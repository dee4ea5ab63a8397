"""TVC on one real task: prompts and vectors, the baselines, per-feature effects (the runs over many tasks: experiments/clean.py).

For one task and layer (`cleaning_setup`): the raw vector from n-shot prompts of the training
split (task vector: mean resid_pre over arrows; detection vector: over demo outputs), and two
disjoint batches of held-out prompts, `n_train` to optimise on and `n_eval` to score on. Every
method is scored on the same evaluation prompts (Sec. 3.1, App. D.1):
    tv                  the raw vector
    sae_reconstruction  decode(encode(tv))
    ito_k               gradient pursuit with at most k latents (paper: 5 and 20)
    tvc                 Task Vector Cleaning
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from icl_circuits.methods.cleaning import CleaningConfig, CleaningResult, clean_vector, frozen_decoder, method_score
from icl_circuits.methods.ito import ito_weights
from icl_circuits.core.model import LM
from icl_circuits.core.prefix_cache import PASS_COST
from icl_circuits.data.prompts import PromptFormat, eval_prompts
from icl_circuits.sae.dictionary import JumpReLUSAE
from icl_circuits.interventions.steer import Steerer
from icl_circuits.methods.task_vectors import TaskVectorConfig, collect_resid, icl_batch, mean_at
from icl_circuits.data.tasks import Task


ITO_L0S: tuple[int, ...] = (5, 20)


L1_GRID: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 2.5e-2, 5e-2, 1e-1)  # the paper's sweep (App. D.1)


@dataclass
class CleaningSetup:
    task: str
    layer: int
    setting: str
    vector: torch.Tensor  # [d_model] raw task / detection vector
    train: Steerer  # the n_train prompts optimised on
    evaluation: Steerer  # the n_eval held-out prompts every method is scored on
    tokens: torch.Tensor  # [n_tokens, d_model] the residuals averaged into `vector`

    def initial_latents(self, sae: JumpReLUSAE, cfg: CleaningConfig) -> torch.Tensor | None:
        """TVC's starting point (App. D): None = encode the vector (Alg. 1); 'mean_encode' = the mean of the
        per-token encodings; 'ito' = gradient pursuit with cfg.ito_k latents (the authors' detection TVC)."""
        start = cfg.start
        if start == "encode_mean":
            return None
        if start == "ito":
            return ito_weights(sae, self.vector, cfg.ito_k)
        with torch.no_grad():
            return sae.encode(self.tokens).float().mean(0)  # [d_sae]


def cleaning_setup(
    lm: LM, task: Task, layer: int, cfg: CleaningConfig = CleaningConfig(),
    tv_cfg: TaskVectorConfig = TaskVectorConfig(), fmt: PromptFormat = PromptFormat(), *, pass_cost: float = PASS_COST,
) -> CleaningSetup:  # fmt: skip
    """Raw vector and the train/evaluation steering batches; pass_cost: how the prefix caches group prompts into
    suffix passes (`prefix_cache._partition`; it changes speed only, 0 = one pass per distinct prompt shape)."""
    if not 0 <= layer < lm.n_layers:
        raise ValueError(f"layer {layer} outside 0..{lm.n_layers - 1}")
    train_pairs = task.split(tv_cfg.eval_share, tv_cfg.seed)[0]
    if len(train_pairs) < tv_cfg.n_shots + 1:
        raise ValueError(f"task {task.name}: {len(train_pairs)} training pairs, need n_shots + 1 = {tv_cfg.n_shots + 1}")
    # optimisation and evaluation prompts: the first n_train + n_eval valid ones of a shuffle of the held-out pairs
    need = cfg.n_train + cfg.n_eval
    prompts = eval_prompts(lm.tokenizer, task, cfg.setting, "eval", need, tv_cfg.seed, tv_cfg.eval_share, fmt,
                           prompt_seed=cfg.seed + 1, valid_only=True)  # fmt: skip
    if len(prompts.batch) < need:
        n_pairs = len(task.split(tv_cfg.eval_share, tv_cfg.seed)[1])
        raise ValueError(
            f"task {task.name}: {len(prompts.batch)} valid held-out prompts (of {n_pairs} pairs), "
            f"need n_train + n_eval = {need}; use a bigger task or smaller n_train/n_eval"
        )
    icl = icl_batch(lm, task, tv_cfg, fmt)
    resid, _ = collect_resid(lm, icl, [layer], tv_cfg.batch_size)
    # task vector: arrows (Sec. 2.3); detection vector: the demonstrations' output tokens (App. G)
    mask = icl.arrow_mask(tv_cfg.arrows) if cfg.setting == "execution" else icl.output_mask("demos")
    tokens = resid[layer][mask.to(resid[layer].device)]  # [n_tokens, d_model]
    vector = mean_at(resid[layer], mask)

    steer = [
        Steerer(lm, e.batch, [layer], cfg.n_score_tokens, e.steer_at, unembed_dtype=dtype, pass_cost=pass_cost)
        for e, dtype in zip((prompts.take(0, cfg.n_train), prompts.take(cfg.n_train, need)), (getattr(torch, cfg.train_unembed), None))
    ]  # fmt: skip
    return CleaningSetup(task.name, layer, cfg.setting, vector, steer[0], steer[1], tokens)


@torch.no_grad()
def baseline_scores(setup: CleaningSetup, sae: JumpReLUSAE, ito_l0s: Sequence[int] = ITO_L0S) -> dict[str, dict[str, float]]:
    """Scores of the zero-shot model, the raw vector, its SAE reconstruction and ITO-k, on the evaluation prompts."""
    ev, layer = setup.evaluation, setup.layer
    decode = frozen_decoder(sae)
    f = sae.encode(setup.vector).float()  # [d_sae]
    ito = [ito_weights(sae, setup.vector, k) for k in ito_l0s]  # [d_sae] each
    # every method's vector scored in one batched evaluation (`Steerer.score`) instead of one pass each
    vectors = torch.stack([setup.vector.float(), decode(f), *(decode(w) for w in ito)])  # [2 + len(ito_l0s), d_model]
    tv, rec, *ito_scores = ev.score(layer, vectors, need_accuracy=True).as_scores()
    scores = {
        "zero_shot": method_score(ev, ev.baseline, 0),
        "tv": method_score(ev, tv, None),
        "sae_reconstruction": method_score(ev, rec, int((f > 0).sum())),
    }
    for k, w, sc in zip(ito_l0s, ito, ito_scores):
        scores[f"ito_{k}"] = method_score(ev, sc, int((w > 0).sum()))
    return scores


@torch.no_grad()
def feature_effects(setup: CleaningSetup, sae: JumpReLUSAE, result: CleaningResult) -> list[dict[str, float]]:
    """Per active cleaned feature: its weight, the effect of steering with it alone (with b_dec, as
    every decoded vector has), and how much the cleaned vector's effect drops without it.

    All 2 * L0 + 1 vectors (bias only, each feature alone, each feature left out) are scored in one
    batched evaluation (`Steerer.score`); `feature_effects_one_by_one` is the direct loop."""
    ev, layer = setup.evaluation, setup.layer
    decode = frozen_decoder(sae)
    w = result.weights.to(sae.device).float()  # [d_sae]
    feats = result.features
    idx = torch.tensor(feats, dtype=torch.long, device=w.device)  # [n]
    rows = torch.arange(len(feats), device=w.device)
    alone = torch.zeros(len(feats), w.shape[0], device=w.device)  # [n, d_sae]: feature i only
    alone[rows, idx] = w[idx]
    without = w.repeat(len(feats), 1)  # [n, d_sae]: every feature but i
    without[rows, idx] = 0
    codes = torch.cat([torch.zeros(1, w.shape[0], device=w.device), alone, without])  # [1 + 2n, d_sae]
    scored = result.scores.get("tvc")  # clean_vector already scored the cleaned vector on these prompts
    if not scored:
        codes = torch.cat([codes, w[None]])  # [2 + 2n, d_sae]
    rel = [ev.relative_loss_decrease(sc) for sc in ev.score(layer, decode(codes), need_accuracy=True).as_scores()]
    full = scored["relative_loss_decrease"] if scored else rel[-1]
    bias_only, n = rel[0], len(feats)
    return [
        dict(
            index=i, weight=float(result.weights[i]), alone=rel[1 + j], drop_without=full - rel[1 + n + j], bias_only=bias_only
        )
        for j, i in enumerate(feats)
    ]


@torch.no_grad()
def feature_effects_one_by_one(setup: CleaningSetup, sae: JumpReLUSAE, result: CleaningResult) -> list[dict[str, float]]:
    """`feature_effects` by one evaluation per vector (the reference the batched version is tested and timed against)."""
    ev, layer = setup.evaluation, setup.layer
    decode = frozen_decoder(sae)
    scored = result.scores.get("tvc")
    full = scored["relative_loss_decrease"] if scored else ev.relative_loss_decrease(ev.evaluate(layer, decode(result.weights)))
    bias_only = ev.relative_loss_decrease(ev.evaluate(layer, decode(torch.zeros_like(result.weights))))
    rows = []
    for i in result.features:
        alone = torch.zeros_like(result.weights)
        alone[i] = result.weights[i]
        without = result.weights.clone()
        without[i] = 0
        rows.append(
            dict(
                index=i,
                weight=float(result.weights[i]),
                alone=ev.relative_loss_decrease(ev.evaluate(layer, decode(alone))),
                drop_without=full - ev.relative_loss_decrease(ev.evaluate(layer, decode(without))),
                bias_only=bias_only,
            )
        )
    return rows


def clean_task(
    lm: LM, sae: JumpReLUSAE, task: Task, layer: int, cfg: CleaningConfig = CleaningConfig(),
    tv_cfg: TaskVectorConfig = TaskVectorConfig(), *, sae_spec: str = "", ito_l0s: Sequence[int] = ITO_L0S,
    effects: bool = True, progress: bool = False,
) -> CleaningResult:  # fmt: skip
    """TVC for one task, with every baseline scored on the same evaluation prompts."""
    sae.check_compatible(lm)
    setup = cleaning_setup(lm, task, layer, cfg, tv_cfg)
    result = clean_vector(
        sae, setup.train, layer, setup.vector, cfg, setup.evaluation, task=task.name, sae_spec=sae_spec, progress=progress,
        init=setup.initial_latents(sae, cfg),
    )  # fmt: skip
    result.scores = {**baseline_scores(setup, sae, ito_l0s), **result.scores}
    if effects:
        result.feature_effects = feature_effects(setup, sae, result)
    return result


METHODS: tuple[str, ...] = ("tv", "sae_reconstruction", "ito_5", "ito_20", "tvc")


def summary_rows(results: Sequence[CleaningResult]) -> list[dict]:
    """One row per task: L0 before/after and the relative loss decrease of every method, plus a mean row."""
    rows = []
    for r in results:
        row: dict = dict(task=r.task, layer=r.layer, setting=r.setting, l0_tv=len(r.initial_features), l0_tvc=r.l0, steps=r.steps)
        for m, s in r.scores.items():
            if m != "zero_shot":
                row[f"{m}"] = s["relative_loss_decrease"]
        row["zero_shot_nll"] = r.scores["zero_shot"]["nll"] if "zero_shot" in r.scores else float("nan")
        row["tvc_accuracy"] = r.scores.get("tvc", {}).get("accuracy", float("nan"))
        row["tv_accuracy"] = r.scores.get("tv", {}).get("accuracy", float("nan"))
        row["l0_fraction"] = r.l0 / max(len(r.initial_features), 1)
        row["seconds"] = r.seconds
        rows.append(row)
    if rows:
        mean: dict = dict(task="mean", layer=rows[0]["layer"], setting=rows[0]["setting"])
        for k in rows[0]:
            if k not in mean and isinstance(rows[0][k], (int, float)):
                vals = [r[k] for r in rows if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
                mean[k] = sum(vals) / len(vals) if vals else float("nan")
        rows.append(mean)
    return rows
