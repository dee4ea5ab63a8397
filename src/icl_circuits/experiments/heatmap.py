"""The `heatmap` command: positive (and optionally negative) steering heatmaps from a folder of TVC results,
with files, resume (through the methods' progress files) and figures."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from icl_circuits.core.model import LM
from icl_circuits.core.storage import write_json
from icl_circuits.methods.heatmaps import FeatureSet, HeatmapConfig, HeatmapResult, load_feature_sets, positive_heatmap, specificity
from icl_circuits.methods.negative import NegativeConfig, negative_steering, paper_negative_scales
from icl_circuits.sae.registry import SAERef
from icl_circuits.viz.steering_plots import heatmap_figures, plot_negative

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
    from icl_circuits.experiments.clean import task_of_result

    sets, meta = load_feature_sets(results_dir, tasks, top_k)
    top = negative_features == "top"
    chosen = set() if top else {int(f) for f in negative_features or ()}
    unknown = chosen - {f for fs in sets.values() for f in fs.features}
    if unknown:  # checked before any slow work
        raise ValueError(f"negative-steering features {sorted(unknown)} are in no task's cleaned vector")
    if all_rows:  # every built-in task is a row, also those without (yet) a cleaning result
        from icl_circuits.data.tasks import list_tasks

        sets = {**sets, **{n: FeatureSet(n, []) for n in list_tasks() if n not in sets}}
    sae = SAERef.parse(meta["sae_spec"]).resolve(lm, train_if_missing=False)
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
