"""Reproduce the paper in one command: a recipe's stages run in order, resumably, then the claims report.

Recipes and their command lines: recipe.py; running the stages (in order or side by side): stage_runner.py.

Resume: <out> is a `RunDir` (one writer; another model, seed, device or dtype is refused). Finished
stages are logged in <out>/stages.jsonl with their command line, its options as parsed then (defaults
filled in) and wall time; a finished stage is skipped, and one whose options have changed (in the recipe,
or a default changed by a newer version) is refused until it is named in `rerun` (each command then
resumes its own finished units: tasks, cells, layers).
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from icl_circuits.experiments.recipe import (
    Recipe, RecipeError, Stage, _cosmetic, _deps, _parsed, _portable, changed_options, load_recipe, stage_argv,
)
from icl_circuits.experiments.stage_runner import StageFailed, _Runner, _say, _sigterm_as_interrupt
from icl_circuits.core.storage import AppendLog, ConfigMismatch, RunDir, write_json


@dataclass
class ReproduceConfig:
    recipe: str = "paper"  # a built-in recipe name or a .toml path
    out: Path = Path("runs/paper")
    docs: Path | None = None  # where figures, tables and the report go (default: <out>/results)
    model: str = "gemma-3-270m"
    tasks: str | None = None  # default: the recipe's
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 0
    seed: int = 0
    include: tuple[str, ...] = ()  # optional stages to run too
    rerun: tuple[str, ...] = ()  # finished stages to run again ('all': every one)
    only: tuple[str, ...] = ()  # run just these stages (and report on what exists)
    progress: bool = True
    jobs: int = 1  # stages run side by side (each in its own process)


@dataclass
class StageRecord:
    name: str
    argv: list[str]
    seconds: float  # summed over every attempt, interrupted ones included
    status: str  # "done" | "skipped" (optional, not included) | "unfinished" (interrupted) | "not run"


@dataclass
class ReproduceResult:
    out: Path
    docs: Path
    stages: list[StageRecord] = field(default_factory=list)
    report: Path | None = None
    claims: list[dict] = field(default_factory=list)


# -- recipes -----------------------------------------------------------------------------------------


def reproduce(cfg: ReproduceConfig, run_command: Callable[[list[str]], int] | None = None) -> ReproduceResult:
    """Run the recipe's stages (skipping finished ones), publish their files, write the claims report.

    With cfg.jobs > 1 independent stages (no {stage:X} reference between them) run side by side, each in
    its own process with its output in <out>/<stage>.log; run_command (tests) replaces the in-process CLI."""
    recipe = load_recipe(cfg.recipe)
    tasks = cfg.tasks or recipe.tasks
    _check_tasks(tasks)
    names = [s.name for s in recipe.stages]
    for opt, chosen in (("include", cfg.include), ("rerun", cfg.rerun), ("only", cfg.only)):
        bad = [n for n in chosen if n not in names and not (opt == "rerun" and n == "all")]
        if bad:
            raise RecipeError(f"--{opt}: no stage {bad} in recipe {recipe.name} (stages: {', '.join(names)})")
    if cfg.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {cfg.jobs}")
    if cfg.jobs > 1 and not cfg.threads:  # side-by-side stages share the cores instead of each taking all of them
        cfg = replace(cfg, threads=max(1, (os.cpu_count() or 1) // cfg.jobs))
    out = Path(cfg.out).absolute()  # stage records hold paths relative to it ({run}), however --out was spelled
    docs = Path(cfg.docs) if cfg.docs else out / "results"
    folders = {s.name: out / s.name for s in recipe.stages}
    header = dict(model=cfg.model, seed=cfg.seed, device=cfg.device, dtype=cfg.dtype)
    result = ReproduceResult(out, docs)
    with RunDir(out, header, kind="reproduce", name="reproduce"):
        done = AppendLog(out / "stages.jsonl", dict(kind="reproduce-stages"), on_other_header="refuse")
        attempts = AppendLog(out / "attempts.jsonl", dict(kind="reproduce-attempts"), on_other_header="refuse")
        argvs = {st.name: stage_argv(st, cfg, tasks, folders) for st in recipe.stages}
        todo = _plan(recipe, cfg, argvs, done, out)  # refuses a changed finished stage before anything runs

        def spent(name: str) -> float:
            return sum(v["seconds"] for k, v in attempts.done.items() if k.split("#")[0] == name)

        def finish(st: Stage, seconds: float, rc: int | None) -> None:
            """Log the attempt (interrupted ones count too: rc None); mark the stage finished or raise StageFailed."""
            attempts.add(f"{st.name}#{len(attempts.done)}", dict(seconds=seconds))
            if rc is None:
                return
            if rc != 0:
                log = f"; its output: {out / (st.name + '.log')}" if cfg.jobs > 1 else ""
                raise StageFailed(f"stage {st.name} failed (exit code {rc}): icl-circuits {' '.join(argvs[st.name])}{log}; "
                                  "fix the cause and run the same reproduce command again: finished work is kept")  # fmt: skip
            logged = _portable(_cosmetic(argvs[st.name]), out)
            done.add(st.name, dict(argv=logged, options=_parsed(logged), seconds=spent(st.name)))
            _say(cfg, f"[{st.name}] done in {seconds / 60:.1f} min")

        runner = _Runner(cfg, out, run_command)
        with _sigterm_as_interrupt():  # `kill` logs the attempt like Ctrl-C does, and stops the stage's children
            runner.run([st for st in recipe.stages if st.name in todo], argvs, finish)
        for st in recipe.stages:
            rec = done.done.get(st.name)
            if rec is not None and not _stage_changes(rec, argvs[st.name], out):
                publish(st, folders[st.name], docs / st.name)
                status = "done"
            else:
                status = ("skipped" if st.optional and st.name not in cfg.include
                          else "unfinished" if folders[st.name].is_dir() else "not run")
            result.stages.append(StageRecord(st.name, argvs[st.name], spent(st.name), status))
        from icl_circuits.experiments.claims import write_claims_report

        result.claims, result.report = write_claims_report(recipe, result, tasks, cfg)
    return result


def _plan(recipe: Recipe, cfg: ReproduceConfig, argvs: dict[str, list[str]], done: AppendLog, out: Path) -> list[str]:
    """The stages to run now; a finished stage whose options changed (its command line or a default) is
    refused unless rerun."""
    todo = []
    for st in recipe.stages:
        wanted = (not st.optional or st.name in cfg.include) and (not cfg.only or st.name in cfg.only)
        if wanted:  # an optional stage it reads must be included (or finished): it would not run otherwise
            lacking = sorted(d for d in _deps(st) if recipe.stage(d).optional and d not in cfg.include and d not in done.done)
            if lacking:
                raise RecipeError(f"stage {st.name} of recipe {recipe.name} needs the optional stage(s) {', '.join(lacking)}: "
                                  f"add --include {','.join(lacking)}")  # fmt: skip
        rec = done.done.get(st.name)
        again = st.name in cfg.rerun or "all" in cfg.rerun
        changes = _stage_changes(rec, argvs[st.name], out) if rec is not None else []
        if changes and not again and wanted:
            raise ConfigMismatch(
                f"stage {st.name} in {out} was run as `icl-circuits {' '.join(rec['argv'])}`, but the recipe now asks for "
                f"`icl-circuits {' '.join(_cosmetic(argvs[st.name]))}` ({'; '.join(changes)}); pass --rerun {st.name} "
                "(its command resumes what it can) or use another --out"
            )  # fmt: skip
        if wanted and (rec is None or again):
            folder = out / st.name
            if changes and folder.exists():
                # made under the old options: its command would refuse to mix settings, so move it aside (kept)
                aside = out / f"{st.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
                folder.rename(aside)
                _say(cfg, f"[{st.name}] its options changed: the old results are kept in {aside}")
            todo.append(st.name)
        elif wanted:
            _say(cfg, f"[{st.name}] finished earlier; skipped")
    return todo


def _stage_changes(rec: dict, argv: list[str], out: Path) -> list[str]:
    """How a finished stage's logged run differs from what the recipe asks now: changed options (a default
    changed since counts, where the record holds the options as parsed then), else [] for the same run."""
    now = _parsed(_portable(argv, out))
    changes = [f"{k if '.' in k else '--' + k.replace('_', '-')} was {rec['options'][k]}, now {now[k]}"
               for k in changed_options(rec.get("options", {}), now)]  # fmt: skip
    # the command lines too, parsed with today's parser: the only check for records from before options were
    # logged, and it sees an option the recipe now sets that the old version did not have
    if not changes and _parsed(_portable(rec["argv"], out)) != now:
        changes = ["its command line changed"]
    return changes


def _check_tasks(tasks: str) -> None:
    """A bad task name or file fails now, not in the fifth stage."""
    from icl_circuits.data.tasks import load_tasks

    load_tasks(tasks)




def publish(stage: Stage, folder: Path, dest: Path) -> list[Path]:
    """Copy the stage's published files (glob patterns, relative to its folder) into dest."""
    copied = []
    if not stage.publish or not folder.is_dir():
        return copied
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    for pattern in stage.publish:
        for p in files:
            rel = p.relative_to(folder).as_posix()
            if fnmatch.fnmatch(rel, pattern):
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(target.name + ".tmp")
                shutil.copyfile(p, tmp)
                tmp.replace(target)  # atomic: a reader never sees half a figure
                copied.append(target)
    return copied


def stage_summary(result: ReproduceResult) -> list[dict]:
    return [dict(stage=s.name, status=s.status, seconds=round(s.seconds, 1)) for s in result.stages]


def save_manifest(result: ReproduceResult, recipe: Recipe, tasks: str, cfg: ReproduceConfig) -> Path:
    """<docs>/manifest.json: which recipe, options and command lines made the published files."""
    return write_json(result.docs / "manifest.json", dict(
        recipe=str(recipe.path.name), recipe_digest=recipe.digest, tasks=tasks, config={k: str(v) for k, v in asdict(cfg).items()},
        stages=[dict(name=s.name, status=s.status, seconds=round(s.seconds, 1), command="icl-circuits " + " ".join(s.argv))
                for s in result.stages],
    ))  # fmt: skip
