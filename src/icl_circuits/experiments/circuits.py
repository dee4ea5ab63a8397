"""The circuits experiment over tasks (paper Sec. 4): per task node effects, edges and the graph, faithfulness
curves and IE quality; then, over tasks, the figures and the cross-task ablation. Files and resume live here;
the algorithms are icl_circuits.methods.circuits, the figures icl_circuits.viz.circuit_plots.

Files under `out` (a RunDir of kind 'circuits': a resume under another config, model or SAEs is refused):
    <task>/node_effects.safetensors, nodes.csv, graph.json/png/svg, faithfulness.json, ie_quality.csv,
    summary.json and unit.json (written last: the content key of the finished task)
    config.json, summary.csv, faithfulness.png/svg, ie_quality.png/svg, ie_correlations.json,
    cross_task.json/png/svg (and the *_errors_kept / *_errors_ablated variants with other_errors_curve)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from icl_circuits.core.distributed import gather_in_order, is_main, my_share, shared_run
from icl_circuits.core.model import LM
from icl_circuits.core.storage import RunDir, read_json, write_csv, write_json
from icl_circuits.data.tasks import Task, check_unique_names
from icl_circuits.methods.circuits import (
    ERROR,
    CircuitRunConfig,
    CircuitSAEs,
    CircuitGraph,
    CrossTask,
    FaithfulnessCurve,
    NodeEffects,
    SplicedModel,
    circuit_batches,
    circuit_saes,
    cross_task_ablation,
    edge_effects,
    faithfulness_curve,
    ie_correlations,
    ie_quality,
    load_effects,
    node_effects,
    nodes_needed,
    save_effects,
    save_graph,
)
from icl_circuits.sae.dictionary import sae_digest
from icl_circuits.viz.circuit_plots import draw_graph, plot_cross_task, plot_faithfulness, plot_ie_quality


def run_circuit_task(lm: LM, task: Task, saes: CircuitSAEs, cfg: CircuitRunConfig, out: str | Path, progress: bool = True) -> dict:
    """Nodes, edges, faithfulness curves and IE quality for one task; files under out/<task>/."""
    import time

    out = Path(out) / task.name
    t0 = time.perf_counter()
    est_batch, eval_batch = circuit_batches(lm, task, cfg)
    effects = node_effects(lm, est_batch, saes, cfg.circuit, keep_grads=True)
    t_nodes = time.perf_counter() - t0
    save_effects(effects, out / "node_effects.safetensors")
    write_csv(out / "nodes.csv", effects.table(200, cfg.rank_by, cfg.rank_over))

    edges = edge_effects(lm, est_batch, saes, effects, k=cfg.edge_k, edges_per_target=cfg.edges_per_target)
    graph = CircuitGraph.of(effects, edges, task=task.name)
    save_graph(graph, out / "graph.json")
    draw_graph(graph, out / "graph", title=f"{task.name}: top-{cfg.edge_k} nodes per (layer, token type) and their edges")

    spliced = SplicedModel(lm, eval_batch, saes, cfg.circuit)
    curve = faithfulness_curve(spliced, effects, cfg.sizes, cfg.rank_by, task.name, cfg.chunk, not cfg.ablate_errors, cfg.rank_over)
    need = nodes_needed(spliced, effects, cfg.faith_target, curve=curve)
    write_json(out / "faithfulness.json", curve.to_dict())

    rows: list[dict] = []
    if cfg.ie_quality_per_sae != 0:
        spliced_est = SplicedModel(lm, est_batch, saes, cfg.circuit)
        rows = ie_quality(spliced_est, effects, max_per_sae=cfg.ie_quality_per_sae, seed=cfg.seed, chunk=cfg.chunk * 2)
        write_csv(out / "ie_quality.csv", rows)
    summary = dict(
        task=task.name, metric_est=effects.metric, metric_eval=spliced.full, metric_empty=curve.m_empty,
        errors=("ablated" if cfg.ablate_errors else "kept"), rank_by=cfg.rank_by, rank_over=cfg.rank_over,
        n_nonzero_nodes=effects.n_nonzero(), nodes_for_target=need, faith_target=cfg.faith_target,
        n_edges=len(edges), n_ie_quality=len(rows), node_effects_s=t_nodes, seconds=time.perf_counter() - t0,
        top_nodes=effects.table(10, cfg.rank_by, cfg.rank_over),
        error_share_top50=sum(r["feature"] == ERROR for r in effects.table(50, cfg.rank_by, cfg.rank_over)) / 50,
    )  # fmt: skip
    write_json(out / "summary.json", summary)  # written last: marks the task done (resume)
    return summary


def run_circuits(
    lm: LM, tasks: Sequence[Task], cfg: CircuitRunConfig, out: str | Path, saes: Mapping | None = None,
    cross_task: bool = True, progress: bool = True, train_missing: bool = False,
) -> dict:  # fmt: skip
    """Every task (resuming those finished with the same content and settings), then the figures over
    tasks and the cross-task ablation. Returns {'summaries', 'files'}. `out` is a RunDir.
    train_missing: train and cache the starter SAEs the shipped suite lacks (e.g. layers 10-17)."""
    out = Path(out)
    check_unique_names(list(tasks))
    circ = circuit_saes(lm, cfg.circuit, saes, train_if_missing=train_missing)
    header = dict(model=lm.name, config=cfg.to_dict(), saes={k: sae_digest(circ.saes[k]) for k in circ.keys})
    # one writer (under torchrun: the ranks of one run, tasks split over them, see distributed.py); a resume
    # under another config / other SAEs is refused
    with shared_run(out, header, kind="circuits") as run:
        return _run_circuits(lm, tasks, cfg, out, circ, run, cross_task, progress)


UNIT_FILE = "unit.json"  # written last into a task's folder: the content key of the finished task


def _run_circuits(
    lm: LM, tasks: Sequence[Task], cfg: CircuitRunConfig, out: Path, circ: CircuitSAEs, run: RunDir, cross_task: bool, progress: bool
) -> dict:  # fmt: skip
    from tqdm.auto import tqdm

    write_json(out / "config.json", cfg.to_dict())  # for readers; RunDir has refused any other config, so it is the same
    keys = {t.name: run.key(t.digest) for t in tasks}
    todo = [t for t in tasks if not _finished(out / t.name, keys[t.name])]
    if todo:  # figures over tasks made from the old results are stale
        for stem in ("cross_task", f"cross_task_{_other(cfg)}"):
            (out / f"{stem}.json").unlink(missing_ok=True)
    summaries = []
    bar = tqdm(my_share(tasks), desc="circuits", disable=not progress)
    for task in bar:
        bar.set_postfix_str(task.name)
        folder = out / task.name
        if task in todo:
            for stale in (UNIT_FILE, "summary.json", f"faithfulness_{_other(cfg)}.json"):
                (folder / stale).unlink(missing_ok=True)
            summaries.append(run_circuit_task(lm, task, circ, cfg, out, progress))
            write_json(folder / UNIT_FILE, dict(key=keys[task.name], task=task.name, task_digest=task.digest))
        else:
            summaries.append(read_json(folder / "summary.json"))
    summaries = gather_in_order(tasks, summaries)  # every rank's tasks, once all are done
    if not is_main():  # the figures over tasks and the cross-task ablation: rank 0 alone
        return dict(summaries=summaries, files=[])
    curves = [_read_curve(out / t.name / "faithfulness.json") for t in tasks]
    files = plot_faithfulness(curves, out / "faithfulness")
    other: list[FaithfulnessCurve] = []
    if cfg.other_errors_curve:  # the diagnostic with the other error-node choice
        for t in tqdm(tasks, desc=f"curves with {_other(cfg).replace('_', ' ')}", disable=not progress):
            path = out / t.name / f"faithfulness_{_other(cfg)}.json"
            if not path.is_file():
                _, eval_batch = circuit_batches(lm, t, cfg)
                sp, eff = SplicedModel(lm, eval_batch, circ, cfg.circuit), load_effects(out / t.name / "node_effects.safetensors")
                c = faithfulness_curve(sp, eff, cfg.sizes, cfg.rank_by, t.name, cfg.chunk, cfg.ablate_errors, cfg.rank_over)
                write_json(path, {**c.to_dict(), "nodes_for_target": nodes_needed(sp, eff, cfg.faith_target, curve=c)})
            other.append(_read_curve(path))
        files += plot_faithfulness(other, out / f"faithfulness_{_other(cfg)}")
    rows = [r for t in tasks if (out / t.name / "ie_quality.csv").is_file() for r in _read_csv(out / t.name / "ie_quality.csv")]
    if rows:
        files += plot_ie_quality(rows, out / "ie_quality")
        write_json(out / "ie_correlations.json", {"by_layer": ie_correlations(rows), "by_kind_layer": ie_correlations(rows, ("kind", "layer")),
                                                   "all": ie_correlations(rows, ())})  # fmt: skip
    table = [
        dict(task=s["task"], m_full=round(s["metric_eval"], 4), m_empty=round(s["metric_empty"], 4),
             nonzero_nodes=s["n_nonzero_nodes"], nodes_for_faith=s["nodes_for_target"], error_share_top50=s["error_share_top50"],
             edges=s["n_edges"], node_effects_s=round(s["node_effects_s"], 2))
        for s in summaries
    ]  # fmt: skip
    write_csv(out / "summary.csv", table)
    if cross_task and len(tasks) > 1:
        spl: dict[str, SplicedModel] = {}
        eff: dict[str, NodeEffects] = {}

        def setup() -> None:  # the held-out batches, built once and only when something is missing
            for t in tqdm([t for t in tasks if t.name not in spl], desc="cross-task setup", disable=not progress):
                _, eval_batch = circuit_batches(lm, t, cfg)
                spl[t.name] = SplicedModel(lm, eval_batch, circ, cfg.circuit)
                eff[t.name] = load_effects(out / t.name / "node_effects.safetensors")

        keep = not cfg.ablate_errors
        variants = [("cross_task", keep, curves)] + ([(f"cross_task_{_other(cfg)}", not keep, other)] if cfg.other_errors_curve else [])
        for stem, keep, cs in variants:
            ct_path = out / f"{stem}.json"
            ct = _read_cross_task(ct_path, [t.name for t in tasks])
            if ct is None:
                setup()
                ct = cross_task_ablation(spl, eff, cfg.cross_target, cfg.rank_by, {c.task: c for c in cs}, progress, keep, cfg.rank_over)
                write_json(ct_path, ct.to_dict())
            files += plot_cross_task(ct, out / stem, "feature nodes only, error nodes kept" if keep else "error nodes ranked and ablated too")
    return dict(summaries=summaries, files=files)


def _other(cfg: CircuitRunConfig) -> str:
    """File-name tag of the diagnostic variant: the error-node choice the run did not make."""
    return "errors_kept" if cfg.ablate_errors else "errors_ablated"


def _finished(folder: Path, key: str) -> bool:
    """The task's folder holds a complete result made from the same task content, config, model and SAEs."""
    try:
        return (folder / "summary.json").is_file() and read_json(folder / UNIT_FILE).get("key") == key
    except (OSError, ValueError, AttributeError):
        return False


def _read_cross_task(path: Path, tasks: list[str]) -> CrossTask | None:
    """The saved cross-task ablation, or None when there is none or it was made over another task list
    (a resume with fewer or reordered tasks finds every task finished yet must not reuse it)."""
    if not path.is_file():
        return None
    ct = CrossTask.from_dict(read_json(path), str(path))
    return ct if ct.tasks == tasks else None


def _read_curve(path: Path) -> FaithfulnessCurve:
    return FaithfulnessCurve.from_dict(read_json(path), str(path))


def _read_csv(path: Path) -> list[dict]:
    import csv

    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            r["layer"] = int(r["layer"])
            r["estimate"], r["actual"] = float(r["estimate"]), float(r["actual"])
            rows.append(r)
    return rows
