"""Task vectors (Sec. 2.3): extract from n-shot prompts, steer zero-shot prompts with them.

TV at layer L = mean of resid_pre[L] over the arrow tokens of a batch of n-shot prompts.
Steering (`interventions.steer.Steerer`) adds a vector at the arrow of zero-shot prompts; the
metric is the NLL of the output's first n tokens, compared with the unsteered NLL.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch

from icl_circuits.core.model import LM
from icl_circuits.core.sites import Site
from icl_circuits.core.storage import BadFile, check_schema, stamp
from icl_circuits.data.prompts import N_SCORE_TOKENS, EvalSet, PromptBatch, PromptFormat, eval_prompts, icl_prompts
from icl_circuits.data.tasks import DEFAULT_EVAL_SHARE, Task
from icl_circuits.interventions.steer import Score, Steerer


@dataclass(frozen=True)
class TaskVectorConfig:
    n_prompts: int = 16  # n-shot prompts averaged into the TV (paper: 16)
    n_shots: int = 16  # demonstrations per prompt (paper: 16)
    arrows: str = "all"  # arrows averaged: 'all', 'demos', or 'last' (the query's, as in Hendel et al.)
    n_eval: int = 32  # zero-shot prompts the steering is scored on
    n_score_tokens: int = N_SCORE_TOKENS  # first n tokens of each scored output (the authors': 2)
    eval_share: float = DEFAULT_EVAL_SHARE  # share of a task's pairs held out for evaluation
    batch_size: int = 16
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LayerSweep:
    """sweep.json: the task-vector layer sweep (Fig. 2) over many tasks."""

    model: str
    layers: list[int]
    config: dict  # TaskVectorConfig.to_dict()
    rows: list[dict]  # one per (task, layer): sweep_task's rows
    best: list[dict]  # one per task + a 'mean' row (experiments.task_vectors.best_layers)

    def to_dict(self) -> dict:
        d = dict(model=self.model, layers=self.layers, config=self.config, rows=self.rows, best=self.best)
        return stamp("sweep", d)

    @classmethod
    def from_dict(cls, d: dict, where: str = "") -> "LayerSweep":
        d = check_schema("sweep", d, where)  # unstamped sweep.json files have these keys too (version 1)
        try:
            return cls(str(d["model"]), [int(l) for l in d["layers"]], dict(d["config"]),
                       list(d["rows"]), list(d["best"]))  # fmt: skip
        except KeyError as e:
            raise BadFile(f"{where or 'a sweep result'}: no {e.args[0]!r} (not a sweep.json of the task-vectors run)") from None


@dataclass
class DetectionSweep:
    """detection_sweep.json: the detection-vector layer sweep (App. G), rows of `detection_sweep_task`."""

    rows: list[dict]  # one per (task, layer)
    layers: list[int]
    model: str | None = None  # None: a file written before the stamps (a bare row list) names neither
    config: dict | None = None  # TaskVectorConfig.to_dict()

    def to_dict(self) -> dict:
        return stamp("detection_sweep", dict(model=self.model, layers=self.layers, config=self.config, rows=self.rows))

    @classmethod
    def from_dict(cls, d: dict | list, where: str = "") -> "DetectionSweep":
        try:
            if isinstance(d, list):  # written before the stamps as the bare row list: accepted as version 1
                d = {"rows": d, "layers": sorted({int(r["layer"]) for r in d})}
            d = check_schema("detection_sweep", d, where)
            return cls(list(d["rows"]), [int(l) for l in d["layers"]], d.get("model"), d.get("config"))
        except KeyError as e:
            raise BadFile(f"{where or 'a detection sweep result'}: no {e.args[0]!r}") from None


@torch.no_grad()
def collect_resid(
    lm: LM, batch: PromptBatch, layers: Iterable[int], batch_size: int = 16, logprobs_for: str | None = None
) -> tuple[dict[int, torch.Tensor], Score | None]:
    """resid_pre at `layers` for every prompt ([batch, seq, d_model] each), in mini-batches.

    With logprobs_for='last' the same passes also score the query outputs (ICL accuracy).
    """
    layers = sorted(set(layers))
    chunks: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    nll_sum, acc_sum, n = 0.0, 0.0, 0
    for start in range(0, len(batch), batch_size):
        sub = batch.slice(start, start + batch_size)
        scoring = sub.scoring(logprobs_for) if logprobs_for else None
        out = lm.run(
            sub.input_ids,
            sub.attention_mask,
            read=[Site(l, "resid_pre") for l in layers],
            logprob_positions=None if scoring is None else scoring.positions,
        )
        for l in layers:
            a = out.acts[Site(l, "resid_pre")]
            chunks[l].append(torch.nn.functional.pad(a, (0, 0, 0, batch.input_ids.shape[1] - a.shape[1])))
        if scoring is not None:
            k = len(sub)
            nll_sum += scoring.nll(out.logprobs).item() * k
            acc_sum += scoring.accuracy(out.logprobs).item() * k
            n += k
    resid = {l: torch.cat(c) for l, c in chunks.items()}
    return resid, (Score(nll_sum / n, acc_sum / n) if n else None)


def mean_at(resid: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of resid [batch, seq, d] over positions where mask [batch, seq] is True -> [d]."""
    if not mask.any():
        raise ValueError("no positions selected to average")
    return resid[mask.to(resid.device)].mean(0)


def extract_task_vectors(
    lm: LM, batch: PromptBatch, layers: Iterable[int], arrows: str = "all", batch_size: int = 16
) -> dict[int, torch.Tensor]:
    """{layer: TV [d_model]}: mean resid_pre[layer] over the chosen arrows of the batch."""
    resid, _ = collect_resid(lm, batch, layers, batch_size)
    mask = batch.arrow_mask(arrows)
    return {l: mean_at(r, mask) for l, r in resid.items()}


def extract_detection_vectors(
    lm: LM, batch: PromptBatch, layers: Iterable[int], outputs: str = "demos", batch_size: int = 16
) -> dict[int, torch.Tensor]:
    """{layer: [d_model]}: mean resid_pre[layer] over output tokens of n-shot prompts (App. G).

    The task-detection analogue of a task vector: where executors live on arrows, detectors
    fire on the token that completes a demonstration. Steer with it at a fake pair's output.
    """
    resid, _ = collect_resid(lm, batch, layers, batch_size)
    mask = batch.output_mask(outputs)
    return {l: mean_at(r, mask) for l, r in resid.items()}


def icl_batch(lm: LM, task: Task, cfg: TaskVectorConfig, fmt: PromptFormat = PromptFormat()) -> PromptBatch:
    """n-shot prompts from the task's training split (what task vectors are averaged over)."""
    train, _ = task.split(cfg.eval_share, cfg.seed)
    if len(train) < cfg.n_shots + 1:
        raise ValueError(f"task {task.name}: {len(train)} training pairs, need n_shots + 1 = {cfg.n_shots + 1}")
    return icl_prompts(lm.tokenizer, train, cfg.n_prompts, cfg.n_shots, seed=cfg.seed, fmt=fmt)


def held_out_prompts(lm: LM, task: Task, cfg: TaskVectorConfig, setting: str = "execution", fmt: PromptFormat = PromptFormat()) -> EvalSet:
    """cfg.n_eval zero-shot (execution) or fake-pair (detection) prompts of the held-out split, to steer."""
    return eval_prompts(lm.tokenizer, task, setting, "eval", cfg.n_eval, cfg.seed, cfg.eval_share, fmt)


def sweep_task(lm: LM, task: Task, layers: list[int], cfg: TaskVectorConfig) -> list[dict]:
    """One row per layer: ICL and zero-shot scores, and the TV's steering effect at that layer."""
    icl = icl_batch(lm, task, cfg)
    resid, icl_score = collect_resid(lm, icl, layers, cfg.batch_size, logprobs_for="last")
    arrows = icl.arrow_mask(cfg.arrows)
    zero = held_out_prompts(lm, task, cfg)
    steering = Steerer(lm, zero.batch, layers, cfg.n_score_tokens, zero.steer_at)
    rows = []
    for layer in layers:
        tv = mean_at(resid[layer], arrows)
        s = steering.evaluate(layer, tv)
        rows.append(
            dict(
                task=task.name,
                layer=layer,
                icl_nll=icl_score.nll,  # type: ignore[union-attr]
                icl_accuracy=icl_score.accuracy,  # type: ignore[union-attr]
                zero_shot_nll=steering.baseline.nll,
                zero_shot_accuracy=steering.baseline.accuracy,
                steered_nll=s.nll,
                steered_accuracy=s.accuracy,
                relative_loss_decrease=steering.relative_loss_decrease(s),
                tv_norm=tv.norm().item(),
            )
        )
    return rows


def detection_sweep_task(lm: LM, task: Task, layers: Sequence[int], cfg: TaskVectorConfig) -> list[dict]:
    """Per layer: relative loss decrease from adding the detection vector at the fake pair's output."""
    icl, fake = icl_batch(lm, task, cfg), held_out_prompts(lm, task, cfg, "detection")
    vecs = extract_detection_vectors(lm, icl, layers, batch_size=cfg.batch_size)
    st = Steerer(lm, fake.batch, layers, cfg.n_score_tokens, fake.steer_at)
    rows = []
    for layer in layers:
        s = st.evaluate(layer, vecs[layer])
        rows.append(dict(task=task.name, layer=layer, fake_pair_nll=st.baseline.nll, fake_pair_accuracy=st.baseline.accuracy,
                         steered_nll=s.nll, steered_accuracy=s.accuracy, relative_loss_decrease=st.relative_loss_decrease(s)))  # fmt: skip
    return rows
