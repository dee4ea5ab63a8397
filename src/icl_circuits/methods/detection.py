"""Task-detection features and their link to task-execution features (Sec. 3.1, 4.2, App. G, Tables 1-2, Fig. 11).

- Token-type activation masses (Tables 1, 2): the share of a feature's summed activation that
  falls on prompt / input / arrow / output / newline / extra tokens of ICL prompts. Executors
  (layer-12 cleaning) should sit on arrows, detectors (fake-pair cleaning) on outputs.
- Detection-layer sweep (App. G): steer the fake pair's output token with the mean residual over
  demo outputs, layer by layer.
- Detector -> executor link (Fig. 11), the authors' method: on ICL prompts, subtract 50 x each task's
  top detector's mean activation x its unit direction at every position, with attention patterns
  frozen at their clean values, and measure the drop of every task's top executor (clipped to [0, 1]
  per position) at every position where it was active on the clean run, pooled over all tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from icl_circuits.core.distributed import is_main, main_first, merge_across_ranks, my_share, open_shared, shared_run
from icl_circuits.core.frozen_attention import FrozenAttention
from icl_circuits.core.model import LM
from icl_circuits.data.prompts import TYPE_ID, PromptBatch
from icl_circuits.sae.dictionary import JumpReLUSAE
from icl_circuits.core.sites import Intervention, Site
from icl_circuits.interventions.splice import splice
from icl_circuits.core.storage import canonical, diff_keys, fingerprint, read_json, write_json

# BOS is left out: its residual is an attention sink with a huge norm, dropped from SAE training too.
MASS_TYPES: tuple[str, ...] = ("prompt", "input", "arrow", "output", "newline", "extra")

# Paper, Gemma 1 2B (Tables 1, 2), in %; the paper has no 'extra' row.
PAPER_EXECUTOR_MASS = {"arrow": 89.80, "output": 6.46, "input": 3.2, "newline": 0.54, "prompt": 0.0}
PAPER_DETECTOR_MASS = {"output": 96.76, "input": 3.22, "newline": 0.01, "arrow": 0.0, "prompt": 0.0}


# -- token-type activation masses ----------------------------------------------------------------


def token_type_masses(latents: torch.Tensor, token_types: torch.Tensor, types: Sequence[str] = MASS_TYPES) -> torch.Tensor:
    """Summed activation of each feature on each token type: latents [batch, seq, F], token_types [batch, seq] -> [F, n_types]."""
    if latents.dim() != 3 or latents.shape[:2] != token_types.shape:
        raise ValueError(f"latents must be [batch, seq, F] matching token_types {tuple(token_types.shape)}, got {tuple(latents.shape)}")
    unknown = [t for t in types if t not in TYPE_ID]
    if unknown or not types:
        raise ValueError(f"unknown token types {unknown}; choose from {sorted(TYPE_ID)}")
    if (latents < 0).any():
        raise ValueError("activation masses need non-negative latents (SAE feature activations)")
    token_types = token_types.to(latents.device)  # prompt tensors are built on the CPU, latents are on the model's device
    return torch.stack([latents[token_types == TYPE_ID[t]].sum(0) for t in types], dim=1).float()  # [F, n_types]


def mass_shares(masses: torch.Tensor) -> torch.Tensor:
    """[F, n_types] masses -> shares summing to 1 per feature (NaN for a feature that never fires)."""
    total = masses.sum(-1, keepdim=True)
    return torch.where(total > 0, masses / total.clamp_min(1e-30), torch.full_like(masses, float("nan")))


@dataclass(frozen=True)
class MassConfig:
    n_prompts: int = 16
    n_shots: int = 16
    seed: int = 0
    batch_size: int = 8

    def to_dict(self) -> dict:
        return asdict(self)


def activation_masses(
    lm: LM, tasks: Sequence[Any], roles: dict[str, tuple[JumpReLUSAE, dict[str, list[int]]]], cfg: MassConfig = MassConfig(),
    progress: bool = True,
) -> list[dict]:  # fmt: skip
    """Rows (task, role, n_features, share per type) for each role {name: (SAE, {task: features})}.

    Per task, the masses of the role's features on that task's ICL prompts are pooled, then
    turned into shares; `mean_masses` averages the shares over tasks (Tables 1-2).
    One pass per task reads every SAE's site.
    """
    from tqdm.auto import tqdm

    from icl_circuits.methods.task_vectors import TaskVectorConfig, collect_resid, icl_batch

    for role, (sae, _) in roles.items():
        if Site.parse(sae.cfg.site).canonical().kind != "resid_pre":
            raise ValueError(f"role {role}: activation masses read resid_pre SAEs, got {sae.cfg.site}")
    layers = sorted({Site.parse(sae.cfg.site).canonical().layer for sae, _ in roles.values()})
    rows = []
    for task in tqdm(tasks, desc="activation masses", disable=not progress):
        icl = icl_batch(lm, task, TaskVectorConfig(n_prompts=cfg.n_prompts, n_shots=cfg.n_shots, seed=cfg.seed))
        resid, _ = collect_resid(lm, icl, layers, cfg.batch_size)
        for role, (sae, sets) in roles.items():
            feats = sets.get(task.name, [])
            if not feats:
                continue
            with torch.no_grad():
                lat = sae.encode(resid[Site.parse(sae.cfg.site).canonical().layer])[..., feats]  # [batch, seq, F]
            masses = token_type_masses(lat, icl.token_types).sum(0, keepdim=True)  # pooled over the task's features
            shares = mass_shares(masses)[0]
            rows.append(dict(task=task.name, role=role, n_features=len(feats), total_mass=float(masses.sum()),
                             **{t: float(shares[i]) for i, t in enumerate(MASS_TYPES)}))  # fmt: skip
    return rows


def mean_masses(rows: list[dict], role: str) -> dict[str, float]:
    """Shares averaged over the tasks where the role's features fired at all."""
    rs = [r for r in rows if r["role"] == role and r["total_mass"] > 0]
    if not rs:
        raise ValueError(f"no rows with mass for role {role!r}")
    return {t: sum(r[t] for r in rs) / len(rs) for t in MASS_TYPES}


def mass_table(rows: list[dict]) -> list[dict]:
    """Side-by-side table (%): ours for executors / detectors next to the paper's Tables 1-2."""
    roles = sorted({r["role"] for r in rows})
    means = {role: mean_masses(rows, role) for role in roles}
    out = []
    for t in MASS_TYPES:
        row: dict[str, Any] = {"token_type": t}
        for role in roles:
            row[f"{role}_ours_%"] = round(100 * means[role][t], 2)
        row["executor_paper_%"] = PAPER_EXECUTOR_MASS.get(t, "")
        row["detector_paper_%"] = PAPER_DETECTOR_MASS.get(t, "")
        out.append(row)
    return out


# -- detection-layer sweep (App. G) ----------------------------------------------------------------


def detection_sweep_task(lm: LM, task: Any, layers: Sequence[int], cfg: Any) -> list[dict]:
    """Per layer: relative loss decrease from adding the detection vector at the fake pair's output."""
    from icl_circuits.interventions.steer import Steerer
    from icl_circuits.methods.task_vectors import extract_detection_vectors, held_out_prompts, icl_batch

    icl, fake = icl_batch(lm, task, cfg), held_out_prompts(lm, task, cfg, "detection")
    vecs = extract_detection_vectors(lm, icl, layers, batch_size=cfg.batch_size)
    st = Steerer(lm, fake.batch, layers, cfg.n_score_tokens, fake.steer_at)
    rows = []
    for layer in layers:
        s = st.evaluate(layer, vecs[layer])
        rows.append(dict(task=task.name, layer=layer, fake_pair_nll=st.baseline.nll, fake_pair_accuracy=st.baseline.accuracy,
                         steered_nll=s.nll, steered_accuracy=s.accuracy, relative_loss_decrease=st.relative_loss_decrease(s)))  # fmt: skip
    return rows


def plot_detection_sweep(rows: list[dict], stem: str | Path) -> list[Path]:
    """Relative loss decrease of fake-pair steering with detection vectors, per layer; task mean in black."""
    from icl_circuits.viz.plots import plot_layer_sweep

    return plot_layer_sweep(
        rows, stem, xlabel="layer (detection vector added to resid_pre at the fake pair's output)",
        ylabel="relative loss decrease vs. fake-pair prompt", title="Task detection: steering the fake pair 'X -> Y' (App. G)",
    )  # fmt: skip


# -- detector -> executor link (Fig. 11) ---------------------------------------------------------


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
        return dict(detector_tasks=self.detector_tasks, executor_tasks=self.executor_tasks, detectors=self.detectors,
                    executors=self.executors, drop=self.drop.tolist(), n_active=self.n_active.tolist(), config=self.config)  # fmt: skip


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
    (mean activation < 1e-6) is skipped there, as the authors did. Resumes from out_dir/link_progress.json.
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
    path = Path(out_dir) / "link_progress.json" if out_dir else None
    key = canonical(dict(config=cfg.to_dict(), detectors=detectors, executors=executors))
    state: dict[str, Any] = {**key, "done": {}}
    run = None
    if path:  # one writer; the SAEs and model are part of the run's identity too
        from icl_circuits.sae.dictionary import sae_digest

        ident = dict(**key, model=lm.name, saes=[sae_digest(det_sae), sae_digest(exec_sae)])
        run = open_shared(path.parent, ident, kind="detector-executor link", name="link_run")  # (torchrun: all ranks)
    if path and path.is_file():
        saved = read_json(path)
        diffs = diff_keys({k: saved.get(k) for k in key}, key)
        if diffs:
            raise ValueError(f"{path} was written with another config / feature choice ({'; '.join(diffs)}); use a new --out or delete it")
        state = saved
    unit = {t.name: fingerprint(key, lm.name, t.digest) for t in tasks}  # content key of each prompt task
    tv_cfg = TaskVectorConfig(n_prompts=cfg.n_prompts, n_shots=cfg.n_shots, seed=cfg.seed)
    try:
        _link_tasks(lm, tasks, d_tasks, detectors, e_feats, det_sae, exec_sae, cfg, tv_cfg, state, unit, path, progress)
    finally:
        if run is not None:
            run.close()
    done = [state["done"][unit[t.name]] for t in tasks]
    sums = sum(torch.tensor(v["sums"]) for v in done)
    counts = sum(torch.tensor(v["counts"]) for v in done)
    drop = sums / counts.clamp_min(1)  # [D, E]
    return LinkResult(d_tasks, e_tasks, {t: int(v) for t, v in detectors.items()}, {t: int(v) for t, v in executors.items()},
                      drop, counts, cfg.to_dict())  # fmt: skip


def _link_tasks(
    lm: LM, tasks: Sequence[Any], d_tasks: list[str], detectors: dict[str, int], e_feats: list[int], det_sae: JumpReLUSAE,
    exec_sae: JumpReLUSAE, cfg: LinkConfig, tv_cfg: Any, state: dict[str, Any], unit: dict[str, str], path: Path | None, progress: bool,
) -> None:  # fmt: skip
    from tqdm.auto import tqdm

    from icl_circuits.methods.task_vectors import icl_batch

    # under torchrun: this rank's share of *all* tasks (the same on every rank, whatever each read from disk)
    for task in tqdm([t for t in my_share(tasks) if unit[t.name] not in state["done"]], desc="detector->executor", disable=not progress):
        icl = icl_batch(lm, task, tv_cfg)
        d_feats = [int(detectors[t]) for t in d_tasks]
        unique = list(dict.fromkeys(d_feats))  # tasks often share a detector: ablate each feature once
        sums, counts = link_on_batch(lm, icl, unique, e_feats, det_sae, exec_sae, cfg)
        rows = [unique.index(f) for f in d_feats]
        state["done"][unit[task.name]] = {"task": task.name, "sums": sums[rows].tolist(), "counts": counts[rows].tolist()}
        if path and is_main():  # under torchrun rank 0 saves its progress; the rest after the merge
            write_json(path, state)
    if merge_across_ranks(state["done"]) and path and is_main():  # every rank's tasks
        write_json(path, state)


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


def _link_title(cfg: dict) -> str:
    how = (f"subtracting {cfg.get('multiple', 50):g} x mean activation x unit direction" if cfg.get("ablation", "direction") == "direction"
           else "zeroing the latent")
    return (f"Ablating each task's top detector ({how}, at {cfg.get('ablate_at', 'all')} tokens, attention frozen):\n"
            f"drop of top executors at {cfg.get('measure_at', 'all')} tokens where active")


def plot_link(result: LinkResult, stem: str | Path, order: Sequence[str] | None = None) -> list[Path]:
    """Fig. 11: detector task (rows) x executor task (columns), effect = relative executor drop."""
    from icl_circuits.viz.steering_plots import plot_feature_heatmap

    order = list(order) if order else result.detector_tasks
    rows = [result.detector_tasks.index(t) for t in order if t in result.detector_tasks]
    cols = [result.executor_tasks.index(t) for t in order if t in result.executor_tasks]
    m = result.drop[rows][:, cols]
    return plot_feature_heatmap(
        m, [f"{result.detector_tasks[r]} ({result.detectors[result.detector_tasks[r]]})" for r in rows],
        [f"{result.executor_tasks[c]} ({result.executors[result.executor_tasks[c]]})" for c in cols], stem,
        vmin=min(0.0, float(m.min())), vmax=max(1e-3, float(m.max())), cbar="Relative drop of executor activation",
        xlabel="Executor (task, feature)", ylabel="Detector (task, feature)",
        title=_link_title(result.config),
    )  # fmt: skip


# -- the `detectors` command ----------------------------------------------------------------------


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
        hm = HeatmapResult.from_dict(read_json(heatmap_json))
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


def run_detectors(
    lm: LM, steps: Sequence[str], out_dir: str | Path, figures_dir: str | Path | None, executor_dir: str | Path | None = None,
    detector_dir: str | Path | None = None, exec_heatmap: str | Path | None = None, det_heatmap: str | Path | None = None,
    tasks: Sequence[str] | None = None, sweep_layers: Sequence[int] = (), mass_cfg: MassConfig = MassConfig(),
    link_cfg: LinkConfig = LinkConfig(), progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """The `detectors` command: detection-layer sweep, token-type masses (Tables 1-2), detector->executor link (Fig. 11)."""
    from tqdm.auto import tqdm

    from icl_circuits.methods.heatmaps import cluster_order, load_feature_sets
    from icl_circuits.sae.registry import SAERef
    from icl_circuits.core.storage import write_csv
    from icl_circuits.methods.task_vectors import TaskVectorConfig
    from icl_circuits.data.tasks import list_tasks, load_task, task_of_result

    bad = sorted(set(steps) - {"sweep", "masses", "link"})
    if bad:
        raise ValueError(f"unknown steps {bad}; choose from sweep, masses, link")
    out = Path(out_dir)
    figs = Path(figures_dir) if figures_dir is not None else out
    summary: dict[str, Any] = {"files": []}
    if "sweep" in steps:
        if not sweep_layers:
            raise ValueError("the sweep step needs layers")
        names = list(tasks) if tasks else list_tasks()
        cfg = TaskVectorConfig()
        sweep_tasks = [load_task(n) for n in names]
        header = dict(step="detection_sweep", model=lm.name, layers=list(sweep_layers), config=cfg.to_dict())
        # resume keyed by task content + settings; another config in the same --out is refused
        with shared_run(out, header, kind="detection sweep", name="detection_sweep_run") as run:  # torchrun: every rank
            log = main_first(lambda: run.log("detection_sweep.jsonl"))  # rank 0 creates or repairs it first
            keys = {t.name: run.key(t.digest) for t in sweep_tasks}
            for t in tqdm([t for t in my_share(sweep_tasks) if keys[t.name] not in log.done], desc="detection sweep", disable=not progress):
                log.add(keys[t.name], detection_sweep_task(lm, t, list(sweep_layers), cfg))
            merge_across_ranks(log.done)  # (every rank appended whole lines to the same log)
            rows = [r for t in sweep_tasks for r in log.done[keys[t.name]]]
            write_json(out / "detection_sweep.json", rows)
        summary["files"] += plot_detection_sweep(rows, figs / "detection_layer_sweep")
        summary["files"].append(write_csv(figs / "detection_layer_sweep.csv", rows))
        summary["sweep"] = rows
    if "masses" in steps or "link" in steps:
        if executor_dir is None or detector_dir is None:
            raise ValueError("masses and link need --executors and --detectors (folders of TVC results)")
        ex_sets, ex_meta = load_feature_sets(executor_dir, tasks)
        de_sets, de_meta = load_feature_sets(detector_dir, tasks)
        ex_sae, de_sae = (SAERef.parse(m["sae_spec"]).resolve(lm, train_if_missing=False) for m in (ex_meta, de_meta))
        names = [n for n in ex_sets if n in de_sets]
        task_objs = [task_of_result(Path(executor_dir) / n, n) for n in names]
        ex_top, ex_src = top_features(executor_dir, exec_heatmap, names)
        de_top, de_src = top_features(detector_dir, det_heatmap, names)
        summary["top"] = dict(executors=ex_top, detectors=de_top, executor_source=ex_src, detector_source=de_src)
    if "masses" in steps:
        roles = {
            "executor": (ex_sae, {n: ex_sets[n].features for n in names}),
            "detector": (de_sae, {n: de_sets[n].features for n in names}),
            "top_executor": (ex_sae, {n: [ex_top[n]] for n in names if n in ex_top}),
            "top_detector": (de_sae, {n: [de_top[n]] for n in names if n in de_top}),
        }
        rows = activation_masses(lm, task_objs, roles, mass_cfg, progress)
        write_json(out / "masses.json", rows)
        summary["files"].append(write_csv(figs / "token_type_masses_per_task.csv", rows))
        table = mass_table(rows)
        summary["files"].append(write_csv(figs / "token_type_masses.csv", table))
        summary["masses"], summary["mass_table"] = rows, table
    if "link" in steps:
        res = detector_executor_link(lm, task_objs, {n: de_top[n] for n in names if n in de_top},
                                     {n: ex_top[n] for n in names if n in ex_top}, de_sae, ex_sae, link_cfg, out, progress)  # fmt: skip
        write_json(out / "link.json", res.to_dict())
        order = [res.detector_tasks[i] for i in cluster_order(res.drop + res.drop.T if res.drop.shape[0] == res.drop.shape[1] else res.drop)]
        summary["files"] += plot_link(res, figs / "detector_executor_link", order)
        summary["files"].append(write_csv(figs / "detector_executor_link.csv", [
            dict(detector_task=d, detector=res.detectors[d], **{e: round(float(res.drop[i, j]), 4) for j, e in enumerate(res.executor_tasks)})
            for i, d in enumerate(res.detector_tasks)
        ]))  # fmt: skip
        summary["link"] = res
    return summary
