"""The detector -> executor link (Sec. 4.2, Fig. 11), the authors' method.

On ICL prompts, subtract 50 x each task's top detector's mean activation x its unit direction at every
position, with attention patterns frozen at their clean values, and measure the drop of every task's top
executor (clipped to [0, 1] per position) at every position where it was active on the clean run, pooled
over all tasks. `top_features` picks each task's top detector / executor: only a feature with a positive
steering effect on its own task qualifies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from icl_circuits.core.distributed import main_first, merge_across_ranks, my_share, open_shared
from icl_circuits.core.frozen_attention import FrozenAttention
from icl_circuits.core.model import LM
from icl_circuits.core.sites import Intervention, Site
from icl_circuits.core.storage import AppendLog, canonical, check_schema, fingerprint, read_json, stamp
from icl_circuits.data.prompts import TYPE_ID, PromptBatch
from icl_circuits.interventions.splice import splice
from icl_circuits.sae.dictionary import JumpReLUSAE, sae_digest


def latent_ablation(sae: JumpReLUSAE, features: Sequence[int], positions: torch.Tensor) -> Intervention:
    """Zero the SAE latents `features` at `positions`: x - sum_f f(x) * decoder_f (the SAE error stays)."""
    return splice(sae, positions, keep_error=True, ablate=[int(f) for f in features])


def direction_ablation(sae: JumpReLUSAE, feature: int, amount: float, positions: torch.Tensor) -> Intervention:
    """Subtract `amount` x the feature's unit-norm decoder direction at `positions` (the authors' link ablation)."""
    from icl_circuits.interventions.steer import feature_directions

    return Intervention(Site.parse(sae.cfg.site), positions, -amount * feature_directions(sae, [feature])[0])


LINK_ABLATIONS: tuple[str, ...] = ("direction", "zero")


@dataclass(frozen=True)
class LinkConfig:
    n_prompts: int = 16
    n_shots: int = 16
    seed: int = 0
    # 'direction' (the authors'): subtract multiple x the detector's mean activation x its unit direction at
    # `ablate_at` tokens; 'zero': zero the detector latent there (x - f(x) * decoder row)
    ablation: str = "direction"
    multiple: float = 50.0
    ablate_at: str = "all"  # a token type, or 'all' (every token but BOS and padding)
    measure_at: str = "all"  # token type where executor activations are read, or 'all'
    clip: bool = True  # drop = clip(1 - ablated / clean, 0, 1) per position (the authors'); False: unclipped

    def __post_init__(self) -> None:
        if self.ablation not in LINK_ABLATIONS:
            raise ValueError(f"ablation must be one of {LINK_ABLATIONS}, got {self.ablation!r}")
        for what in (self.ablate_at, self.measure_at):
            if what != "all" and (what not in TYPE_ID or what == "bos"):
                raise ValueError(f"token type {what!r}: use 'all' or one of {[t for t in TYPE_ID if t != 'bos']}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LinkResult:
    detector_tasks: list[str]
    executor_tasks: list[str]
    detectors: dict[str, int]  # task -> its top detector feature
    executors: dict[str, int]  # task -> its top executor feature
    drop: torch.Tensor  # [n_detector_tasks, n_executor_tasks] mean relative drop (1 = executor silenced)
    n_active: torch.Tensor  # [n_detector_tasks, n_executor_tasks] clean active positions each mean is over
    config: dict

    def to_dict(self) -> dict:
        return stamp("link", dict(detector_tasks=self.detector_tasks, executor_tasks=self.executor_tasks, detectors=self.detectors,
                     executors=self.executors, drop=self.drop.tolist(), n_active=self.n_active.tolist(), config=self.config))  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict, where: str = "") -> "LinkResult":
        d = check_schema("link", d, where)
        shape = (len(d["detector_tasks"]), len(d["executor_tasks"]))
        return cls(d["detector_tasks"], d["executor_tasks"], {t: int(f) for t, f in d["detectors"].items()},
                   {t: int(f) for t, f in d["executors"].items()}, torch.tensor(d["drop"]).reshape(shape),
                   torch.tensor(d["n_active"]).reshape(shape), d["config"])  # fmt: skip


def _executor_acts(sae: JumpReLUSAE, x: torch.Tensor, feats: list[int]) -> torch.Tensor:
    return sae.encode(x)[..., feats].float()  # [batch, seq, E]


def detector_executor_link(
    lm: LM, tasks: Sequence[Any], detectors: dict[str, int], executors: dict[str, int],
    det_sae: JumpReLUSAE, exec_sae: JumpReLUSAE, cfg: LinkConfig = LinkConfig(),
    out_dir: str | Path | None = None, progress: bool = True,
) -> LinkResult:  # fmt: skip
    """Fig. 11: ablate each task's top detector (frozen attention), measure each task's top executor.

    The paper links a detector SAE at layer L to an executor SAE at layer L + 1; the user picks L (any
    detector layer before the executor's is accepted). For every task's ICL prompts: one clean pass
    records the attention patterns of the layers between the two SAEs; then, per detector, a pass from
    the detector layer with the detector ablated (see LinkConfig) and those patterns frozen. Drop =
    clip(1 - ablated / clean, 0, 1) at `measure_at` positions where the executor was active on the clean
    run, averaged over all such positions of all prompt tasks. A detector that never fires on a batch
    (mean activation < 1e-6) is skipped there, as the authors did. With out_dir, resumes through a RunDir there
    (a line of link_progress.jsonl per prompt task; a rerun under other settings, features, SAEs or model is refused).
    """
    from icl_circuits.methods.task_vectors import TaskVectorConfig

    s_det, s_exec = Site.parse(det_sae.cfg.site).canonical(), Site.parse(exec_sae.cfg.site).canonical()  # resid_post.L = resid_pre.L+1
    if s_det.kind != "resid_pre" or s_exec.kind != "resid_pre":
        raise ValueError(f"the link needs resid_pre SAEs, got {s_det} and {s_exec}")
    if s_det.layer >= s_exec.layer:
        raise ValueError(f"the detector SAE ({s_det}) must come before the executor SAE ({s_exec})")
    d_tasks = [t for t in detectors]
    e_tasks = [t for t in executors]
    if not d_tasks or not e_tasks:
        raise ValueError("need at least one detector and one executor")
    bad = {t: f for t, f in detectors.items() if not 0 <= int(f) < det_sae.d_sae}
    if bad:
        raise ValueError(f"detector features {bad} outside 0..{det_sae.d_sae - 1}")
    e_feats = [int(executors[t]) for t in e_tasks]
    if any(not 0 <= f < exec_sae.d_sae for f in e_feats):
        raise ValueError(f"executor features {e_feats} outside 0..{exec_sae.d_sae - 1}")
    key = canonical(dict(config=cfg.to_dict(), detectors=detectors, executors=executors))
    unit = {t.name: fingerprint(key, lm.name, t.digest) for t in tasks}  # content key of each prompt task
    run, log = None, None
    if out_dir is not None:  # one writer; the SAEs and the model are part of the run's identity too
        ident = dict(**key, model=lm.name, saes=[sae_digest(det_sae), sae_digest(exec_sae)])
        run = open_shared(Path(out_dir), ident, kind="detector-executor link", name="link_run")  # (torchrun: all ranks)
        log = main_first(lambda: run.log("link_progress.jsonl"))  # rank 0 creates or repairs it first
    state: dict[str, Any] = dict(log.done) if log is not None else {}  # unit -> {task, sums, counts}
    tv_cfg = TaskVectorConfig(n_prompts=cfg.n_prompts, n_shots=cfg.n_shots, seed=cfg.seed)
    try:
        _link_tasks(lm, tasks, d_tasks, detectors, e_feats, det_sae, exec_sae, cfg, tv_cfg, state, unit, log, progress)
    finally:
        if run is not None:
            run.close()
    done = [state[unit[t.name]] for t in tasks]
    sums = sum(torch.tensor(v["sums"]) for v in done)
    counts = sum(torch.tensor(v["counts"]) for v in done)
    drop = sums / counts.clamp_min(1)  # [D, E]
    return LinkResult(d_tasks, e_tasks, {t: int(v) for t, v in detectors.items()}, {t: int(v) for t, v in executors.items()},
                      drop, counts, cfg.to_dict())  # fmt: skip


def _link_tasks(
    lm: LM, tasks: Sequence[Any], d_tasks: list[str], detectors: dict[str, int], e_feats: list[int], det_sae: JumpReLUSAE,
    exec_sae: JumpReLUSAE, cfg: LinkConfig, tv_cfg: Any, state: dict[str, Any], unit: dict[str, str], log: AppendLog | None, progress: bool,
) -> None:  # fmt: skip
    from tqdm.auto import tqdm

    from icl_circuits.methods.task_vectors import icl_batch

    # under torchrun: this rank's share of *all* tasks (the same on every rank, whatever each read from disk)
    for task in tqdm([t for t in my_share(tasks) if unit[t.name] not in state], desc="detector->executor", disable=not progress):
        icl = icl_batch(lm, task, tv_cfg)
        d_feats = [int(detectors[t]) for t in d_tasks]
        unique = list(dict.fromkeys(d_feats))  # tasks often share a detector: ablate each feature once
        sums, counts = link_on_batch(lm, icl, unique, e_feats, det_sae, exec_sae, cfg)
        rows = [unique.index(f) for f in d_feats]
        state[unit[task.name]] = {"task": task.name, "sums": sums[rows].tolist(), "counts": counts[rows].tolist()}
        if log is not None:  # under torchrun every rank appends whole lines to the same log
            log.add(unit[task.name], state[unit[task.name]])
    merge_across_ranks(state)  # every rank's tasks


def _positions(batch: PromptBatch, where: str) -> torch.Tensor:
    """[batch, seq] bool: one token type, or 'all' real tokens (BOS and padding left out)."""
    return batch.token_types >= 1 if where == "all" else batch.type_mask(where)


@torch.no_grad()
def link_on_batch(
    lm: LM, batch: PromptBatch, det_feats: list[int], exec_feats: list[int], det_sae: JumpReLUSAE, exec_sae: JumpReLUSAE,
    cfg: LinkConfig = LinkConfig(),
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(sum of per-position drops [D, E], active clean positions counted [D, E]) on one batch; see detector_executor_link."""
    s_det, s_exec = Site.parse(det_sae.cfg.site).canonical(), Site.parse(exec_sae.cfg.site).canonical()  # resid_post.L = resid_pre.L+1
    ablate = _positions(batch, cfg.ablate_at)
    measure = _positions(batch, cfg.measure_at).to(lm.device)  # [batch, seq], indexes activations on the model's device
    start = lm.run(batch.input_ids, batch.attention_mask, read=[s_det]).acts[s_det]  # [batch, seq, d_model]
    real = _positions(batch, "all").to(start.device)  # [batch, seq]
    det_acts = det_sae.encode(start)[..., det_feats].float()[real]  # [n_real, D]
    mean_act = det_acts.mean(0)  # [D] each detector's mean activation over the batch's tokens
    run = dict(start_layer=s_det.layer, start_resid=start, read=[s_exec])
    with FrozenAttention(lm, range(s_det.layer, s_exec.layer)) as fa:
        fa.record()
        clean = _executor_acts(exec_sae, lm.run(batch.input_ids, batch.attention_mask, **run).acts[s_exec], exec_feats)[measure]  # [n, E]
        fa.freeze()
        active = clean > 0  # [n, E]
        sums = torch.zeros(len(det_feats), len(exec_feats))
        counts = torch.zeros(len(det_feats), len(exec_feats))
        for i, d in enumerate(det_feats):
            if cfg.ablation == "direction":
                if float(mean_act[i]) < 1e-6:
                    continue  # the detector is silent on this batch: nothing to ablate (the authors skip it)
                iv = direction_ablation(det_sae, d, cfg.multiple * float(mean_act[i]), ablate)
            else:
                iv = latent_ablation(det_sae, [d], ablate)
            out = lm.run(batch.input_ids, batch.attention_mask, interventions=[iv], **run).acts[s_exec]
            abl = _executor_acts(exec_sae, out, exec_feats)[measure]  # [n, E]
            rel = 1 - abl / clean.clamp_min(1e-12)  # [n, E]
            if cfg.clip:
                rel = rel.clamp(0.0, 1.0)
            sums[i] = torch.where(active, rel, torch.zeros_like(rel)).sum(0).cpu()
            counts[i] = active.sum(0).float().cpu()
    return sums, counts


def top_features(results_dir: str | Path, heatmap_json: str | Path | None, tasks: Sequence[str] | None = None) -> tuple[dict[str, int], str]:
    """Each task's strongest feature by its steering effect on its own task: from a `heatmap` run's
    heatmap.json, or, without one, from the TVC run's own single-feature effects. Only a feature with
    a positive effect on its own task qualifies (the authors'); a task with none has no top feature.
    Returns ({task: feature}, source)."""
    from icl_circuits.methods.cleaning import load_cleaning
    from icl_circuits.methods.heatmaps import HeatmapResult, load_feature_sets

    sets, _ = load_feature_sets(results_dir, tasks)
    out = {}
    if heatmap_json and Path(heatmap_json).is_file():
        hm = HeatmapResult.from_dict(read_json(heatmap_json), str(heatmap_json))
        for t, fs in sets.items():
            if fs.features and t in hm.tasks:
                try:
                    out[t] = hm.top_feature(t)
                except ValueError:
                    continue  # no own feature helps its task
        return out, f"steering effect ({heatmap_json})"
    for t in sets:
        effects = load_cleaning(Path(results_dir) / t).feature_effects
        best = max(effects, key=lambda r: r["alone"], default=None)
        if best is not None and best["alone"] > 0:
            out[t] = int(best["index"])
    return out, "single-feature steering effect of the TVC run (feature_effects 'alone')"
