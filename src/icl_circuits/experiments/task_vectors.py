"""Task-vector layer sweep over many tasks (Fig. 2's 'original task vector' curve), resumable.

The run directory is a `storage.RunDir`: one writer at a time, and a rerun under other settings
(model, layers, config) is refused. Each finished task is appended to `partial.jsonl`, keyed by the
task's content (name and pairs) and the run's configuration, so a rerun skips exactly the tasks
whose results it would reproduce. Final outputs: sweep.json (a methods.task_vectors.LayerSweep), sweep.csv,
best_layers.csv and the plot layer_sweep.png/.svg.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from icl_circuits.core.model import LM
from icl_circuits.viz.plots import plot_layer_sweep
from icl_circuits.core.storage import RunDir, write_csv, write_json
from icl_circuits.methods.task_vectors import LayerSweep, TaskVectorConfig, sweep_task
from icl_circuits.data.tasks import Task, check_unique_names


@dataclass
class SweepResult:
    rows: list[dict]  # one per (task, layer)
    best: list[dict]  # one per task + a 'mean' row
    files: list[Path]


def run_layer_sweep(
    lm: LM, tasks: list[Task], layers: list[int], cfg: TaskVectorConfig, out_dir: str | Path, progress: bool = True
) -> SweepResult:
    out = Path(out_dir)
    check_unique_names(tasks)
    header = dict(model=lm.name, layers=list(layers), config=cfg.to_dict())
    with RunDir(out, header, kind="task-vectors sweep") as run:
        log = run.log("partial.jsonl")
        done = log.done
        write_json(out / "sweep_config.json", header)
        keys = {t.name: run.key(t.digest) for t in tasks}
        todo = [t for t in tasks if keys[t.name] not in done]
        bar = tqdm(todo, desc="task-vector sweep", disable=not progress, initial=len(tasks) - len(todo), total=len(tasks))
        for task in bar:
            bar.set_postfix(task=task.name)
            log.add(keys[task.name], sweep_task(lm, task, layers, cfg))

        rows = [r for t in tasks for r in done[keys[t.name]]]
        best = best_layers(rows, layers)
        files = [
            write_json(out / "sweep.json", LayerSweep(lm.name, list(layers), cfg.to_dict(), rows, best).to_dict()),
            write_csv(out / "sweep.csv", rows),
            write_csv(out / "best_layers.csv", best),
            *plot_layer_sweep(rows, out / "layer_sweep"),
        ]
    return SweepResult(rows, best, files)


def best_layers(rows: list[dict], layers: list[int]) -> list[dict]:
    """Per task: the layer whose TV lowers the zero-shot loss most; plus the best layer of the task mean."""
    by_task: dict[str, list[dict]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    best = []
    for task, rs in by_task.items():
        b = max(rs, key=lambda r: r["relative_loss_decrease"])
        best.append(
            dict(
                task=task,
                best_layer=b["layer"],
                relative_loss_decrease=b["relative_loss_decrease"],
                icl_accuracy=b["icl_accuracy"],
                zero_shot_accuracy=b["zero_shot_accuracy"],
                steered_accuracy=b["steered_accuracy"],
            )
        )
    means = {l: _mean([r["relative_loss_decrease"] for r in rows if r["layer"] == l]) for l in layers}
    lm = max(means, key=means.get)  # type: ignore[arg-type]
    best.append(
        dict(
            task="mean",
            best_layer=lm,
            relative_loss_decrease=means[lm],
            icl_accuracy=_mean([b["icl_accuracy"] for b in best]),
            zero_shot_accuracy=_mean([b["zero_shot_accuracy"] for b in best]),
            steered_accuracy=_mean([r["steered_accuracy"] for r in rows if r["layer"] == lm]),
        )
    )
    return best


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")
