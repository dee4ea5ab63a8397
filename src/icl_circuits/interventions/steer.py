"""Steering: vectors added to resid_pre at chosen positions of a fixed prompt batch, scored on the outputs.

One mechanism for every use: task-vector evaluation and TVC (differentiable, `logprobs` / `loss`),
baselines and cleaned-feature effects (`score`, many vectors at once), heatmaps of single SAE features
(`feature_directions` turns features into steering directions), and the fake-pair prompts of task
detection (`steer_at` = the fake pair's output token instead of the query arrow).

`Steerer` caches resid_pre of the batch at every layer it may steer. One vector at a time (`logprobs`,
`loss`, `evaluate`: what TVC differentiates) it also keeps the keys/values of each prompt's unchanging
prefix (`PrefixCache`) and re-runs only the tokens from the first steered one to the last scored one,
through blocks L..end. Many vectors at once (`score`) run blocks L..end on copies of the whole (cut) batch,
one copy per vector (`add_vectors` builds the intervention for the copies): measured faster than repeating
the prefix-cached suffixes per vector (benchmarks/bench_steering.py; the deep copies and re-ordering of the
prefix keys/values per group cost more than the few prefix tokens re-run), so it is the one batched path.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import torch

from icl_circuits.core.model import LM
from icl_circuits.core.prefix_cache import PASS_COST, PrefixCache
from icl_circuits.core.sites import Intervention, Site
from icl_circuits.data.prompts import N_SCORE_TOKENS, PromptBatch
from icl_circuits.sae.dictionary import JumpReLUSAE

MAX_ROWS = 256  # scored rows (vectors x scored positions) unembedded at once by `Steerer.score`


@dataclass(frozen=True)
class Score:
    nll: float
    accuracy: float


@dataclass(frozen=True)
class SteeringScores:
    nll: torch.Tensor  # [n_vectors]
    accuracy: torch.Tensor | None  # [n_vectors], when asked for

    def as_scores(self) -> list[Score]:
        """One `Score` per vector (needs accuracy)."""
        if self.accuracy is None:
            raise ValueError("scored without accuracy")
        return [Score(float(n), float(a)) for n, a in zip(self.nll, self.accuracy)]


def add_vectors(layer: int, positions: torch.Tensor, vectors: torch.Tensor) -> Intervention:
    """The intervention for k copies of a batch, copy j steered with vectors[j]: positions [b, seq] of the
    batch -> [k*b, seq] (copy j = rows j*b..(j+1)*b-1), each row adding its copy's vector at resid_pre[layer]."""
    k, b = len(vectors), len(positions)
    value = vectors.float().repeat_interleave(b, 0)[:, None, :]  # [k*b, 1, d_model]
    return Intervention(Site(layer, "resid_pre"), positions.repeat(k, 1), value)


class Steerer:
    """A fixed prompt batch; vectors added at `steer_at` of resid_pre[layer] (layer one of `layers`), scored by
    the NLL (and accuracy) of the first n_score_tokens of the outputs.

    scoring: which outputs count ('last': the query's, for zero-shot and fake-pair prompts; 'all': every pair's).
    steer_at: [batch, seq] bool, by default the query arrow (task execution, Sec. 3); e.g. the fake pair's output
    token (`output_mask('first')`) for task detection (App. G).
    """

    def __init__(
        self, lm: LM, batch: PromptBatch, layers: Iterable[int], n_score_tokens: int = N_SCORE_TOKENS,
        steer_at: torch.Tensor | None = None, prefix_cache: bool = True, unembed_dtype: torch.dtype | None = None,
        pass_cost: float = PASS_COST, *, scoring: str = "last",
    ) -> None:  # fmt: skip
        """prefix_cache: keep prefix keys/values for the one-vector path (False: build nothing more, e.g. when only
        `score` is used); unembed_dtype: e.g. torch.bfloat16 for fast optimisation steps (`LM.logprobs_of`);
        pass_cost: how the prefix cache groups prompts into passes (`prefix_cache._partition`, speed only)."""
        self.lm, self.batch = lm, batch
        self.unembed_dtype = unembed_dtype
        sc = batch.scoring(scoring, n_score_tokens)
        steer_at = batch.arrow_mask("last") if steer_at is None else steer_at  # [batch, seq] bool
        if steer_at.shape != batch.input_ids.shape or steer_at.dtype != torch.bool:
            raise ValueError(f"steer_at must be a bool mask {tuple(batch.input_ids.shape)}, got {steer_at.dtype} {tuple(steer_at.shape)}")
        if not steer_at.any(1).all():
            raise ValueError("steer_at selects no position in some prompts")
        layers = sorted(set(layers))
        bad = [l for l in layers if not 0 <= l < lm.n_layers]
        if bad:
            raise ValueError(f"layers {bad} outside 0..{lm.n_layers - 1}")
        # the model is causal: tokens after the last scored position cannot change any score, so drop them
        end = int(sc.positions.nonzero()[:, 1].max()) + 1
        self.input_ids, self.attention_mask = batch.input_ids[:, :end], batch.attention_mask[:, :end]  # [batch, end]
        self.scoring = replace(sc, positions=sc.positions[:, :end])
        self.steer_at = steer_at[:, :end]  # [batch, end] bool
        with torch.no_grad():
            out = lm.run(
                self.input_ids,
                self.attention_mask,
                read=[Site(l, "resid_pre") for l in layers],
                logprob_positions=self.scoring.positions,
            )
        self.cache = {l: out.acts[Site(l, "resid_pre")] for l in layers}  # [batch, end, d_model] each
        self.baseline = Score(self.scoring.nll(out.logprobs).item(), self.scoring.accuracy(out.logprobs).item())
        # keys/values of the tokens before the first steered one: each evaluation re-runs only the rest
        self.prefix = (
            PrefixCache(lm, self.input_ids, self.steer_at, self.scoring.positions, pass_cost) if prefix_cache else None
        )

    def _check(self, layer: int) -> None:
        if layer not in self.cache:
            raise ValueError(f"layer {layer} was not cached; cached layers: {sorted(self.cache)}")

    def logprobs(self, layer: int, vector: torch.Tensor) -> torch.Tensor:
        """Differentiable: [n_scored, vocab] log-probs with `vector` [d_model] added at `steer_at` of resid_pre[layer]."""
        self._check(layer)
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
    def score(
        self, layer: int, vectors: torch.Tensor, need_accuracy: bool = False, vectors_per_pass: int | None = None
    ) -> SteeringScores:
        """vectors [k, d_model] -> NLL (and accuracy) of the scored tokens with each one added, batched: the blocks
        run once for `vectors_per_pass` vectors (default: MAX_ROWS scored rows) and the [vocab, d_model]
        unembedding is read once per such chunk. Equal to k calls of `evaluate` up to float summation order.
        The batch runs from `layer` on copies of itself (no prefix cache: see the module docstring)."""
        self._check(layer)
        if vectors.dim() != 2 or vectors.shape[1] != self.lm.d_model:
            raise ValueError(f"vectors must be [k, d_model={self.lm.d_model}], got {tuple(vectors.shape)}")
        n = len(self.scoring.targets)  # scored rows per vector
        per = vectors_per_pass or max(1, MAX_ROWS // max(n, 1))
        nll, acc = [], []
        for i in range(0, len(vectors), per):
            chunk = vectors[i : i + per]  # [c, d_model]
            lp = self.lm.logprobs_of(self._hidden_many(layer, chunk).flatten(0, 1), self.unembed_dtype)  # [c*n, vocab]
            for x in lp.view(len(chunk), n, -1):  # [n, vocab] per vector
                nll.append(self.scoring.nll(x).cpu())
                if need_accuracy:
                    acc.append(self.scoring.accuracy(x).cpu())
        empty = torch.zeros(0)
        return SteeringScores(torch.stack(nll) if nll else empty, (torch.stack(acc) if acc else empty) if need_accuracy else None)

    def _hidden_many(self, layer: int, vectors: torch.Tensor) -> torch.Tensor:
        """[k, n_scored, d_model] final hidden states, vectors [k, d_model] each added at steer_at of its copy."""
        k = len(vectors)  # the whole batch from `layer`, repeated k times
        out = self.lm.run(
            self.input_ids.repeat(k, 1), self.attention_mask.repeat(k, 1), start_layer=layer,
            start_resid=self.cache[layer].repeat(k, 1, 1), interventions=[add_vectors(layer, self.steer_at, vectors)],
            logprob_positions=self.scoring.positions.repeat(k, 1), unembed=False,
        )  # fmt: skip
        return out.hidden.view(k, -1, out.hidden.shape[-1])  # type: ignore[union-attr]

    def relative_loss_decrease(self, score: Score | torch.Tensor) -> float | torch.Tensor:
        """(L_zero - L_steered) / L_zero: 1 = perfect, 0 = no effect, < 0 = worse. A Score gives a float,
        NLLs [k] (`score(...).nll`) give [k]."""
        nll = score.nll if isinstance(score, Score) else score
        return (self.baseline.nll - nll) / self.baseline.nll


# -- one SAE feature as a steering vector ------------------------------------------------------


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
