"""Task vectors (Sec. 2.3): extract from n-shot prompts, steer zero-shot prompts with them.

TV at layer L = mean of resid_pre[L] over the arrow tokens of a batch of n-shot prompts.
Steering adds a vector at the arrow of zero-shot prompts; the metric is the NLL of the
output's first n tokens, compared with the unsteered NLL.

`ZeroShotSteering` caches resid_pre of the zero-shot batch at every layer it may steer, so
each steered evaluation runs only blocks L..end and scores only the output positions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace

import torch

from icl_circuits.core.model import LM
from icl_circuits.core.prefix_cache import PASS_COST, PrefixCache
from icl_circuits.data.prompts import FAKE_PAIR, N_SCORE_TOKENS, PromptBatch, PromptFormat, fake_pair_prompts, icl_prompts, zero_shot_prompts
from icl_circuits.core.sites import Intervention, Site
from icl_circuits.data.tasks import Task


@dataclass(frozen=True)
class TaskVectorConfig:
    n_prompts: int = 16  # n-shot prompts averaged into the TV (paper: 16)
    n_shots: int = 16  # demonstrations per prompt (paper: 16)
    arrows: str = "all"  # arrows averaged: 'all', 'demos', or 'last' (the query's, as in Hendel et al.)
    n_eval: int = 32  # zero-shot prompts the steering is scored on
    n_score_tokens: int = N_SCORE_TOKENS  # first n tokens of each scored output (the authors': 2)
    eval_share: float = 0.5  # share of a task's pairs held out for evaluation
    batch_size: int = 16
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Score:
    nll: float
    accuracy: float


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


class ZeroShotSteering:
    """Scores a vector added at fixed positions of a fixed batch of prompts, by the query output's NLL.

    By default the positions are the query arrow of zero-shot prompts (task execution, Sec. 3);
    `steer_at` may name others, e.g. the fake pair's output token for task detection (App. G).
    """

    def __init__(
        self, lm: LM, batch: PromptBatch, layers: Iterable[int], n_score_tokens: int = N_SCORE_TOKENS,
        steer_at: torch.Tensor | None = None, prefix_cache: bool = True, unembed_dtype: torch.dtype | None = None,
        pass_cost: float = PASS_COST,  # how the prefix cache groups prompts into passes (`prefix_cache._partition`)
    ) -> None:
        self.lm, self.batch = lm, batch
        self.unembed_dtype = unembed_dtype  # e.g. torch.bfloat16 for fast optimisation steps (LM.logprobs_of)
        scoring = batch.scoring("last", n_score_tokens)
        steer_at = batch.arrow_mask("last") if steer_at is None else steer_at  # [batch, seq] bool
        if steer_at.shape != batch.input_ids.shape or steer_at.dtype != torch.bool:
            raise ValueError(f"steer_at must be a bool mask {tuple(batch.input_ids.shape)}, got {steer_at.dtype} {tuple(steer_at.shape)}")
        if not steer_at.any(1).all():
            raise ValueError("steer_at selects no position in some prompts")
        # the model is causal: tokens after the last scored position cannot change any score, so drop them
        end = int(scoring.positions.nonzero()[:, 1].max()) + 1
        self.input_ids, self.attention_mask = batch.input_ids[:, :end], batch.attention_mask[:, :end]  # [batch, end]
        self.scoring = replace(scoring, positions=scoring.positions[:, :end])
        self.steer_at = steer_at[:, :end]
        layers = sorted(set(layers))
        with torch.no_grad():
            out = lm.run(
                self.input_ids,
                self.attention_mask,
                read=[Site(l, "resid_pre") for l in layers],
                logprob_positions=self.scoring.positions,
            )
        self.cache = {l: out.acts[Site(l, "resid_pre")] for l in layers}  # [batch, seq, d_model]
        self.baseline = Score(self.scoring.nll(out.logprobs).item(), self.scoring.accuracy(out.logprobs).item())
        # keys/values of the tokens before the first steered one: each evaluation re-runs only the rest
        self.prefix = (
            PrefixCache(lm, self.input_ids, self.steer_at, self.scoring.positions, pass_cost) if prefix_cache else None
        )

    def logprobs(self, layer: int, vector: torch.Tensor) -> torch.Tensor:
        """Differentiable: [n_scored, vocab] log-probs with `vector` [d_model] added at `steer_at` of resid_pre[layer]."""
        if layer not in self.cache:
            raise ValueError(f"layer {layer} was not cached; cached layers: {sorted(self.cache)}")
        if vector.shape != (self.lm.d_model,):
            raise ValueError(f"steering vector must be [d_model={self.lm.d_model}], got {tuple(vector.shape)}")
        steer = [Intervention(Site(layer, "resid_pre"), self.steer_at, vector)]
        if self.prefix is not None:
            return self.prefix.logprobs(layer, self.cache[layer], steer, self.unembed_dtype)
        out = self.lm.run(
            self.input_ids,
            self.attention_mask,
            start_layer=layer,
            start_resid=self.cache[layer],
            interventions=steer,
            logprob_positions=self.scoring.positions,
            unembed=False,
        )
        return self.lm.logprobs_of(out.hidden, self.unembed_dtype)  # type: ignore[arg-type]

    def loss(self, layer: int, vector: torch.Tensor) -> torch.Tensor:
        """Differentiable NLL of the scored output tokens under steering."""
        return self.scoring.nll(self.logprobs(layer, vector))

    @torch.no_grad()
    def evaluate(self, layer: int, vector: torch.Tensor) -> Score:
        lp = self.logprobs(layer, vector)
        return Score(self.scoring.nll(lp).item(), self.scoring.accuracy(lp).item())

    @torch.no_grad()
    def evaluate_many(self, layer: int, vectors: torch.Tensor, max_rows: int = 256) -> list[Score]:
        """`evaluate` for each of vectors [k, d_model], batched: the blocks run once for up to max_rows scored
        rows (vectors x scored positions) and the [vocab, d_model] unembedding is read once per such chunk,
        instead of once per vector. Equal to k calls of `evaluate` up to float summation order."""
        if vectors.dim() != 2 or vectors.shape[1] != self.lm.d_model:
            raise ValueError(f"vectors must be [k, d_model={self.lm.d_model}], got {tuple(vectors.shape)}")
        if layer not in self.cache:
            raise ValueError(f"layer {layer} was not cached; cached layers: {sorted(self.cache)}")
        if self.prefix is None:  # no prefix cache: nothing to share but the loop
            return [self.evaluate(layer, v) for v in vectors]
        n = len(self.scoring.targets)  # scored rows per vector
        per = max(1, max_rows // max(n, 1))  # vectors per chunk
        scores = []
        for i in range(0, len(vectors), per):
            chunk = vectors[i : i + per]  # [c, d_model]
            hidden = self.prefix.hidden_many(layer, self.cache[layer], self.steer_at, chunk)  # [c, n, d_model]
            lp = self.lm.logprobs_of(hidden.flatten(0, 1), self.unembed_dtype).view(len(chunk), n, -1)  # [c, n, vocab]
            scores += [Score(self.scoring.nll(x).item(), self.scoring.accuracy(x).item()) for x in lp]
        return scores

    def relative_loss_decrease(self, score: Score) -> float:
        """(L_zero - L_steered) / L_zero: 1 = perfect, 0 = no effect, < 0 = worse."""
        return (self.baseline.nll - score.nll) / self.baseline.nll


def task_batches(lm: LM, task: Task, cfg: TaskVectorConfig, fmt: PromptFormat = PromptFormat()) -> tuple[PromptBatch, PromptBatch]:
    """(n-shot prompts from the training split, zero-shot prompts from the held-out split)."""
    train, held_out = task.split(cfg.eval_share, cfg.seed)
    if len(train) < cfg.n_shots + 1:
        raise ValueError(f"task {task.name}: {len(train)} training pairs, need n_shots + 1 = {cfg.n_shots + 1}")
    icl = icl_prompts(lm.tokenizer, train, cfg.n_prompts, cfg.n_shots, seed=cfg.seed, fmt=fmt)
    zero = zero_shot_prompts(lm.tokenizer, held_out, cfg.n_eval, seed=cfg.seed + 1, fmt=fmt)
    return icl, zero


def detection_batches(
    lm: LM, task: Task, cfg: TaskVectorConfig, fmt: PromptFormat = PromptFormat(), fake: tuple[str, str] = FAKE_PAIR
) -> tuple[PromptBatch, PromptBatch]:
    """(n-shot prompts from the training split, fake-pair prompts `X -> Y` + query from the held-out split).

    Steer the second with `ZeroShotSteering(..., steer_at=batch.output_mask('first'))`.
    """
    icl, _ = task_batches(lm, task, cfg, fmt)
    _, held_out = task.split(cfg.eval_share, cfg.seed)
    return icl, fake_pair_prompts(lm.tokenizer, held_out, cfg.n_eval, seed=cfg.seed + 1, fmt=fmt, fake=fake)


def sweep_task(lm: LM, task: Task, layers: list[int], cfg: TaskVectorConfig) -> list[dict]:
    """One row per layer: ICL and zero-shot scores, and the TV's steering effect at that layer."""
    icl, zero = task_batches(lm, task, cfg)
    resid, icl_score = collect_resid(lm, icl, layers, cfg.batch_size, logprobs_for="last")
    arrows = icl.arrow_mask(cfg.arrows)
    steering = ZeroShotSteering(lm, zero, layers, cfg.n_score_tokens)
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
