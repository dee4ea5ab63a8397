"""Negative steering (App. F.1, Fig. 23): subtract a feature's direction at every arrow of ICL prompts.

Subtract scale x the feature's unit decoder direction at every arrow of full ICL prompts (16 prompts x 32
shots); accuracy over all pairs; per feature the smallest scale that lowers accuracy by >= 0.1 on some
task. The paper tries 50 log-spaced scales from 1 to 31.6 around its shared scale 15; by default we try the
same range relative to our calibrated scale (x 1/15 .. x 2.1).

Only accuracy at the arrows is needed: `ArrowAccuracy` resumes from the cached resid_pre, steers with the
same batched intervention as `Steerer` (`add_vectors`), unembeds the arrows only, and `ArgmaxCheck` decides
"is the target the argmax?" with a bf16 screen and exact fp32 logits for the few tokens that may beat it,
instead of fp32 log-softmax over the vocabulary at every scored token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from icl_circuits.core.adapters import logit_softcap
from icl_circuits.core.model import LM
from icl_circuits.core.sites import Site
from icl_circuits.core.storage import AppendLog, RunDir, check_schema, stamp
from icl_circuits.data.prompts import PromptBatch
from icl_circuits.data.tasks import DEFAULT_EVAL_SHARE
from icl_circuits.interventions.steer import add_vectors, feature_directions
from icl_circuits.methods.heatmaps import FeatureSet, log_grid
from icl_circuits.sae.dictionary import JumpReLUSAE, sae_digest

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
        return stamp("negative", dict(tasks=self.tasks, features=self.features, drop=self.drop.tolist(), scales=self.scales,
                     baseline_accuracy=self.baseline_accuracy, owners={str(k): v for k, v in self.owners.items()}, config=self.config))

    @classmethod
    def from_dict(cls, d: dict, where: str = "") -> "NegativeResult":
        d = check_schema("negative", d, where)
        return cls(d["tasks"], [int(f) for f in d["features"]], torch.tensor(d["drop"]).reshape(len(d["tasks"]), len(d["features"])),
                   [float(s) for s in d["scales"]], d["baseline_accuracy"], {int(k): v for k, v in d["owners"].items()}, d["config"])


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
        """vectors [k, d_model], added at every arrow -> [k] accuracy (float32)."""
        if vectors.dim() != 2 or vectors.shape[1] != self.lm.d_model:
            raise ValueError(f"vectors must be [k, d_model={self.lm.d_model}], got {tuple(vectors.shape)}")
        hits = torch.zeros(len(vectors), device=vectors.device)  # [k]
        for s in range(0, len(vectors), self.vectors_per_pass):
            vec = vectors[s : s + self.vectors_per_pass].float()  # [k', d_model]
            k = len(vec)
            for ids, mask, at, targets, cache in self.chunks:
                n = len(targets)
                out = self.lm.run(
                    ids.repeat(k, 1), mask.repeat(k, 1), start_layer=self.layer, start_resid=cache.repeat(k, 1, 1),
                    interventions=[add_vectors(self.layer, at, vec)],  # copy j of the prompts steered with vec[j]
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
    With out_dir, resumes through a RunDir there (name 'negative_run': its config holds the settings but the speed-only
    pass sizes, the features, the tasks' content, the model and the SAE's digest): each finished feature is a line of
    negative_progress.jsonl, so a rerun under other settings is refused and an interrupted one redoes no finished feature.
    """
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
    run, log = None, None
    if out_dir is not None:
        header = dict(config={k: v for k, v in cfg.to_dict().items() if k not in _SPEED_ONLY}, features=features,
                      tasks={t.name: t.digest for t in tasks}, model=lm.name, sae=sae_digest(sae))  # fmt: skip
        run = RunDir(out_dir, header, kind="negative steering", name="negative_run")
        log = run.log("negative_progress.jsonl")
    done: dict[str, Any] = dict(log.done) if log is not None else {}  # feature -> {scale, drop}
    try:
        return _negative_rounds(lm, tasks, names, features, owners, directions, cfg, done, log, progress)
    finally:
        if run is not None:
            run.close()


def _negative_rounds(
    lm: LM, tasks: Sequence[Any], names: list[str], features: list[int], owners: dict[int, list[str]], directions: torch.Tensor,
    cfg: NegativeConfig, done: dict[str, Any], log: AppendLog | None, progress: bool,
) -> NegativeResult:  # fmt: skip
    """negative_steering's rounds: every unfinished feature one scale further per round, until each has its scale."""
    from tqdm.auto import tqdm

    from icl_circuits.data.prompts import icl_prompts

    check = ArgmaxCheck(lm)
    evals: dict[str, ArrowAccuracy] = {}
    for task in tqdm(tasks, desc="ICL prompts", disable=not progress):
        train, _ = task.split(DEFAULT_EVAL_SHARE, cfg.seed)
        batch = icl_prompts(lm.tokenizer, train, cfg.n_prompts, cfg.n_shots, seed=cfg.seed)
        evals[task.name] = ArrowAccuracy(lm, batch, cfg.layer, check, cfg.prompts_per_pass, cfg.vectors_per_pass)
    base = {n: e.baseline for n, e in evals.items()}
    step = {i: 0 for i, f in enumerate(features) if str(f) not in done}  # feature index -> index of its next scale
    bar = tqdm(total=len(features), initial=len(features) - len(step), desc="negative steering", disable=not progress)
    while step:
        todo = list(step)
        vectors = torch.stack([-cfg.scales[step[i]] * directions[i] for i in todo])  # [n_todo, d_model]
        acc = {n: e.accuracy(vectors) for n, e in evals.items()}  # task -> [n_todo]
        for j, i in enumerate(todo):
            scale = cfg.scales[step[i]]
            drops = [base[n] - float(acc[n][j]) for n in names]
            if max(drops) >= cfg.min_drop or step[i] == len(cfg.scales) - 1:
                done[str(features[i])] = {"scale": scale, "drop": drops}
                if log is not None:
                    log.add(str(features[i]), done[str(features[i])])
                del step[i]
                bar.update()
            else:
                step[i] += 1
    bar.close()
    drop = torch.tensor([[done[str(f)]["drop"][t] for f in features] for t in range(len(names))])
    return NegativeResult(names, features, drop, [done[str(f)]["scale"] for f in features], base, owners, cfg.to_dict())
