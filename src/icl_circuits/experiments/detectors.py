"""The `detectors` command: detection-layer sweep (App. G), token-type masses (Tables 1-2), detector->executor link (Fig. 11).

Each step resumes: the sweep and the masses through a RunDir each, keyed by task content, the link through its own
progress file in the same folder (`methods.link.detector_executor_link`); another config in the same --out is refused.
Result files: detection_sweep.json (methods.task_vectors.DetectionSweep), masses.json (methods.masses.MassesResult),
link.json (methods.link.LinkResult).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from icl_circuits.core.distributed import main_first, merge_across_ranks, my_share, shared_run
from icl_circuits.core.model import LM
from icl_circuits.core.storage import write_csv, write_json
from icl_circuits.data.tasks import list_tasks, load_task
from icl_circuits.experiments.clean import task_of_result
from icl_circuits.methods.heatmaps import cluster_order, load_feature_sets
from icl_circuits.methods.link import LinkConfig, detector_executor_link, top_features
from icl_circuits.methods.masses import MassConfig, MassesResult, activation_masses, mass_table
from icl_circuits.methods.task_vectors import DetectionSweep, TaskVectorConfig, detection_sweep_task
from icl_circuits.sae.dictionary import JumpReLUSAE, sae_digest
from icl_circuits.sae.registry import SAERef
from icl_circuits.viz.detection_plots import plot_detection_sweep, plot_link


def run_detectors(
    lm: LM, steps: Sequence[str], out_dir: str | Path, figures_dir: str | Path | None, executor_dir: str | Path | None = None,
    detector_dir: str | Path | None = None, exec_heatmap: str | Path | None = None, det_heatmap: str | Path | None = None,
    tasks: Sequence[str] | None = None, sweep_layers: Sequence[int] = (), mass_cfg: MassConfig = MassConfig(),
    link_cfg: LinkConfig = LinkConfig(), progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """The `detectors` command: detection-layer sweep, token-type masses (Tables 1-2), detector->executor link (Fig. 11)."""
    from tqdm.auto import tqdm

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
            sweep = DetectionSweep(rows, list(sweep_layers), lm.name, cfg.to_dict())
            write_json(out / "detection_sweep.json", sweep.to_dict())
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
        rows = run_masses(lm, task_objs, roles, mass_cfg, out, progress).rows
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


def run_masses(
    lm: LM, tasks: Sequence[Any], roles: dict[str, tuple[JumpReLUSAE, dict[str, list[int]]]], cfg: MassConfig,
    out_dir: str | Path, progress: bool = True,
) -> MassesResult:  # fmt: skip
    """`activation_masses` per task under a RunDir in out_dir; writes out_dir/masses.json.

    The run is the model, the MassConfig and each role's SAE (by content): another of them in the same folder is
    refused (ConfigMismatch), so a second run never overwrites masses.json with other settings. A line of
    masses.jsonl per finished task, keyed by the task's content and its features per role, so a rerun skips them.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    saes = {role: sae_digest(sae) for role, (sae, _) in roles.items()}  # by content: a retrained SAE is another run
    header = dict(step="masses", model=lm.name, config=cfg.to_dict(), saes=saes)
    with shared_run(out, header, kind="token-type masses", name="masses_run") as run:  # torchrun: every rank
        log = main_first(lambda: run.log("masses.jsonl"))  # rank 0 creates or repairs it first
        feats = {t.name: {role: list(sets.get(t.name, [])) for role, (_, sets) in roles.items()} for t in tasks}
        keys = {t.name: run.key(t.digest, feats[t.name]) for t in tasks}
        todo = [t for t in my_share(tasks) if keys[t.name] not in log.done]
        for t in tqdm(todo, desc="activation masses", disable=not progress):
            log.add(keys[t.name], activation_masses(lm, [t], roles, cfg, progress=False))
        merge_across_ranks(log.done)  # (every rank appended whole lines to the same log)
        result = MassesResult([r for t in tasks for r in log.done[keys[t.name]]], lm.name, cfg.to_dict())
        write_json(out / "masses.json", result.to_dict())
    return result
