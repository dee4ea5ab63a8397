"""The `clean` command: TVC over many tasks (resumable), λ sweeps, layer comparisons, the SAE downstream check.

Every run folder is a `RunDir` (one writer, a rerun under other settings refused); finished tasks are keyed by
their content and the settings. One task's cleaning with its baselines is `methods.cleaning_task.clean_task`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from icl_circuits.methods.cleaning import CleaningConfig, CleaningResult, clean_vector, load_cleaning
from icl_circuits.core.distributed import gather_in_order, is_main, my_share, shared_run
from icl_circuits.core.model import LM
from icl_circuits.sae.dictionary import JumpReLUSAE, sae_digest
from icl_circuits.core.storage import RunDir, read_json, write_csv, write_json
from icl_circuits.methods.task_vectors import TaskVectorConfig
from icl_circuits.data.tasks import Task, check_unique_names, is_builtin, load_task, parse_task, save_task
from icl_circuits.methods.cleaning_task import L1_GRID, baseline_scores, clean_task, cleaning_setup, summary_rows


UNIT_FILE = "unit.json"
TASK_FILE = "task.json"  # a user task's pairs, kept in its result folder (a built-in task's folder has none)


def task_of_result(folder: str | Path, name: str) -> Task:
    """The task a result folder was made from: its own task.json (a user task), else the built-in `name`."""
    own = Path(folder) / TASK_FILE
    return parse_task(own.read_text(encoding="utf-8"), name, "json") if own.is_file() else load_task(name)


def run_cleaning(
    lm: LM, sae: JumpReLUSAE, tasks: Sequence[Task], layer: int, out_dir: str | Path,
    cfg: CleaningConfig = CleaningConfig(), tv_cfg: TaskVectorConfig = TaskVectorConfig(), *,
    sae_spec: str = "", progress: bool = True,
) -> tuple[list[CleaningResult], list[Path]]:  # fmt: skip
    """Clean every task into out_dir/<task>/; a task already done with the same settings is loaded, not redone.

    out_dir is a `RunDir`: one writer at a time, a rerun under other settings is refused, and a finished
    task is recognised by a key over its content (name and pairs), the settings and the model, written
    last into its folder (unit.json), so a user file that shares a built-in task's name is never served
    the built-in task's result.
    """
    from icl_circuits.viz.plots import plot_cleaning_curves

    out = Path(out_dir)
    check_unique_names(list(tasks))
    header = dict(model=lm.name, layer=layer, sae=sae_spec, sae_digest=sae_digest(sae), config=cfg.to_dict(), tv_config=tv_cfg.to_dict())
    with shared_run(out, header, kind="cleaning") as run:  # under torchrun: tasks split over ranks (distributed.py)
        write_json(out / "cleaning_config.json", header)
        results = []
        bar = tqdm(my_share(tasks), desc=f"cleaning ({cfg.setting}, layer {layer})", disable=not progress)
        for task in bar:
            bar.set_postfix(task=task.name)
            folder = out / task.name
            key = run.key(task.digest)
            done = _load_if_same(folder, cfg, layer, sae_spec, key)
            if done is None:
                (folder / UNIT_FILE).unlink(missing_ok=True)  # the folder no longer holds a finished result
                done = clean_task(lm, sae, task, layer, cfg, tv_cfg, sae_spec=sae_spec, progress=progress)
                done.save(folder)
                if is_builtin(task):
                    (folder / TASK_FILE).unlink(missing_ok=True)
                else:  # a user task: keep its pairs, so later steps need only this folder
                    save_task(task, folder / TASK_FILE)
                plot_cleaning_curves(done, folder / "curves")
                write_json(folder / UNIT_FILE, dict(key=key, task=task.name, task_digest=task.digest))  # last: marks it done
            results.append(done)
        results = gather_in_order(tasks, results)  # every rank's tasks, once all are done
        return results, write_summary(results, out) if is_main() else []


def write_summary(results: Sequence[CleaningResult], out_dir: str | Path) -> list[Path]:
    """summary.json / .csv (one row per task + mean) and the summary plot."""
    from icl_circuits.viz.plots import plot_cleaning_summary

    out = Path(out_dir)
    rows = summary_rows(results)
    return [write_json(out / "summary.json", rows), write_csv(out / "summary.csv", rows), *plot_cleaning_summary(rows, out / "summary")]


def load_results(out_dir: str | Path) -> list[CleaningResult]:
    """Every finished task under out_dir (e.g. to summarise a run that is still going)."""
    found = []
    for folder in sorted(Path(out_dir).iterdir()):
        if (folder / "cleaning.json").is_file():
            found.append(load_cleaning(folder))
    return found


def _load_if_same(folder: Path, cfg: CleaningConfig, layer: int, sae_spec: str, key: str | None = None) -> CleaningResult | None:
    """The finished result in `folder` if it was made from the same task content and settings (`key`), else None."""
    if key is not None:
        try:
            if read_json(folder / UNIT_FILE).get("key") != key:
                return None
        except (OSError, ValueError, AttributeError):
            return None
    from safetensors import SafetensorError

    try:
        r = load_cleaning(folder)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError):  # missing or damaged: redo it
        return None
    config = {**CleaningConfig().to_dict(), **r.config}  # fields added since the result was written take their defaults
    same = config == cfg.to_dict() and r.layer == layer and r.sae_spec == sae_spec and "tvc" in r.scores
    return r if same else None


def l1_sweep(
    lm: LM, sae: JumpReLUSAE, tasks: Sequence[Task], layer: int, out_dir: str | Path,
    l1_coeffs: Sequence[float] = L1_GRID, cfg: CleaningConfig = CleaningConfig(),
    tv_cfg: TaskVectorConfig = TaskVectorConfig(), *, sae_spec: str = "", progress: bool = True,
) -> tuple[list[dict], list[Path]]:  # fmt: skip
    """λ sweep (App. D.1, Fig. 3, 14, 17): per task, baselines once and TVC for every λ; resumable per task."""
    from icl_circuits.viz.plots import plot_l1_sweep, plot_tv_loss_delta

    out = Path(out_dir)
    header = dict(model=lm.name, layer=layer, sae=sae_spec, sae_digest=sae_digest(sae), l1=list(l1_coeffs), config=cfg.to_dict(),
                  tv_config=tv_cfg.to_dict())  # fmt: skip

    def one(task: Task) -> list[dict]:
        setup = cleaning_setup(lm, task, layer, cfg, tv_cfg)
        base = baseline_scores(setup, sae)
        l0_tv = base["sae_reconstruction"]["l0"]
        rows = [_sweep_row(task.name, m, None, s, base, l0_tv) for m, s in base.items() if m != "zero_shot"]
        for l1 in l1_coeffs:
            r = clean_vector(
                sae, setup.train, layer, setup.vector, replace(cfg, l1_coeff=l1), setup.evaluation, task=task.name,
                init=setup.initial_latents(sae, cfg),
            )  # fmt: skip
            rows.append(_sweep_row(task.name, "tvc", l1, r.scores["tvc"], base, l0_tv, steps=r.steps))
        return rows

    rows = [row for rs in per_task(out, header, "l1_sweep", tasks, one, progress, "λ sweep") for row in rs]
    files = [write_csv(out / "l1_sweep.csv", rows), write_json(out / "l1_sweep.json", dict(**header, rows=rows))]
    files += plot_l1_sweep(rows, out / "l1_sweep") + plot_tv_loss_delta(rows, out / "tv_loss_delta")
    return rows, files


def per_task(
    out: Path, header: dict, name: str, tasks: Sequence[Task], compute: Callable[[Task], Any], progress: bool, desc: str = "",
) -> list[Any]:  # fmt: skip
    """[compute(task) for task in tasks] in a RunDir at `out` (`name`_run.json, `name`_progress.jsonl): a log line per finished
    task, keyed by the task's content and the run's settings (SAE digests included), so an interrupted run redoes
    no finished task, a rerun under other settings is refused, and a same-named task with other pairs is computed
    afresh."""
    check_unique_names(list(tasks))
    with RunDir(out, header, kind=name.replace("_", " "), name=f"{name}_run") as run:
        log = run.log(f"{name}_progress.jsonl")
        bar = tqdm(tasks, desc=desc or name.replace("_", " "), disable=not progress)
        keys = {t.name: run.key(t.digest) for t in tasks}
        for task in bar:
            if keys[task.name] not in log.done:
                bar.set_postfix(task=task.name)
                log.add(keys[task.name], compute(task))
        return [log.done[keys[t.name]] for t in tasks]


def _sweep_row(task: str, method: str, l1: float | None, s: dict, base: dict, l0_tv: float, steps: int = 0) -> dict:
    zero, tv = base["zero_shot"]["nll"], base["tv"]["nll"]
    return dict(
        task=task, method=method, l1_coeff=l1, l0=s["l0"], l0_fraction=None if s["l0"] is None else s["l0"] / max(l0_tv, 1),
        relative_loss_decrease=s["relative_loss_decrease"], accuracy=s["accuracy"],
        tv_loss_delta=(tv - s["nll"]) / zero,  # App. D.1: improvement over the TV, relative to the zero-shot loss
        steps=steps,
    )  # fmt: skip


def layer_comparison(
    lm: LM, saes: dict[int, JumpReLUSAE], tasks: Sequence[Task], out_dir: str | Path,
    cfg: CleaningConfig = CleaningConfig(), tv_cfg: TaskVectorConfig = TaskVectorConfig(), *, progress: bool = True,
) -> tuple[list[dict], list[Path]]:  # fmt: skip
    """Fig. 2: every method at every layer that has a residual SAE, averaged over tasks; resumable per task."""
    from icl_circuits.viz.plots import plot_layer_comparison

    out = Path(out_dir)
    layers = sorted(saes)
    header = dict(model=lm.name, layers=layers, saes={str(l): sae_digest(saes[l]) for l in layers}, config=cfg.to_dict(),
                  tv_config=tv_cfg.to_dict())  # fmt: skip

    def one(task: Task) -> list[dict]:
        rows = []
        for layer in layers:
            r = clean_task(lm, saes[layer], task, layer, cfg, tv_cfg, effects=False)
            rows += [dict(task=task.name, layer=layer, method=m, **s) for m, s in r.scores.items() if m != "zero_shot"]
        return rows

    rows = [row for rs in per_task(out, header, "layer_comparison", tasks, one, progress) for row in rs]
    files = [write_csv(out / "layer_comparison.csv", rows)] + plot_layer_comparison(rows, out / "layer_comparison")
    return rows, files


def load_summary(out_dir: str | Path) -> list[dict]:
    return read_json(Path(out_dir) / "summary.json")


def sae_downstream(
    lm: LM, saes: dict[str, JumpReLUSAE], tasks: Sequence[Task], layer: int, out_dir: str | Path,
    cfg: CleaningConfig = CleaningConfig(), tv_cfg: TaskVectorConfig = TaskVectorConfig(), *,
    ito_l0s: Sequence[int] = (20,), progress: bool = True,
) -> tuple[list[dict], list[Path]]:  # fmt: skip
    """Several SAEs of one layer side by side: per task, the relative loss decrease of the TV, its SAE
    reconstruction and ITO-k, all on the same evaluation prompts (resumable per task)."""
    out = Path(out_dir)
    header = dict(model=lm.name, layer=layer, saes={n: sae_digest(saes[n]) for n in sorted(saes)}, ito=list(ito_l0s),
                  config=cfg.to_dict(), tv_config=tv_cfg.to_dict())  # fmt: skip

    def one(task: Task) -> dict:
        setup = cleaning_setup(lm, task, layer, cfg, tv_cfg)
        row: dict = dict(task=task.name)
        for name, sae in saes.items():
            s = baseline_scores(setup, sae, ito_l0s)
            row["tv"] = s["tv"]["relative_loss_decrease"]
            row[f"{name}_sae_reconstruction"] = s["sae_reconstruction"]["relative_loss_decrease"]
            row[f"{name}_sae_l0"] = s["sae_reconstruction"]["l0"]
            for k in ito_l0s:
                row[f"{name}_ito_{k}"] = s[f"ito_{k}"]["relative_loss_decrease"]
        return row

    rows = per_task(out, header, "downstream", tasks, one, progress, f"SAEs downstream (layer {layer})")
    mean = {"task": "mean", **{k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "task"}}
    rows.append(mean)
    return rows, [write_csv(out / "downstream.csv", rows), write_json(out / "downstream.json", dict(**header, rows=rows))]
