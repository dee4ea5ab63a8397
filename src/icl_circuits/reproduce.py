"""Reproduce the paper in one command: a recipe's stages run in order, resumably, then the claims report.

A recipe (`icl_circuits/recipes/*.toml`, or a file of your own) lists stages. Each stage is one
`icl-circuits` command line, so every number in the report names the command that made it, and a
researcher can re-run any stage alone:

    [[stage]]
    name = "tvc_execution"            # its folder: <out>/tvc_execution
    section = "Sec. 3.1"
    title = "Task Vector Cleaning, executors"
    command = "clean"
    args = { tasks = "{tasks}", layer = 12 }
    publish = ["summary.csv", "summary.png"]   # copied into <docs>/<name>/

Placeholders in `args`: `{tasks}` (the run's tasks), `{tasks:N}` (the first N of them), `{out}` (this
stage's folder) and `{stage:NAME}` (another stage's folder). `--model --device --dtype --threads --seed
--quiet` are added to every command that takes them. `optional = true` stages run only when named in
`include`.

Resume: <out> is a `RunDir` (one writer; another model, seed, device or dtype is refused). Finished
stages are logged in <out>/stages.jsonl with their command line and wall time; a finished stage is
skipped, and a finished stage whose command line has changed is refused until it is named in `rerun`
(each command then resumes its own finished units: tasks, cells, layers).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .storage import AppendLog, ConfigMismatch, RunDir, write_json

RECIPES_DIR = Path(__file__).parent / "recipes"
COMMON = ("model", "device", "dtype", "threads", "seed")  # shared run options handed to every stage that takes them
_PLACEHOLDER = re.compile(r"\{(tasks(?::\d+)?|out|stage:[A-Za-z0-9_]+)\}")


class RecipeError(ValueError):
    """A recipe file that cannot be run as written."""


@dataclass(frozen=True)
class Stage:
    name: str
    command: str  # e.g. "clean", "sae train"
    args: dict[str, Any]
    section: str = ""
    title: str = ""
    publish: tuple[str, ...] = ()
    optional: bool = False
    note: str = ""


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    title: str
    tasks: str  # default task list of the run
    stages: tuple[Stage, ...]
    digest: str  # of the file's bytes

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)


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


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def load_recipe(spec: str | Path) -> Recipe:
    """A built-in recipe by name ('paper', 'demo') or a .toml file; checked before anything runs."""
    path = Path(spec)
    if not path.suffix:
        path = RECIPES_DIR / f"{spec}.toml"
        if not path.is_file():
            raise RecipeError(f"no recipe {spec!r}; built-in: {', '.join(list_recipes())}, or give a .toml file")
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path}: no such file")
    data = path.read_bytes()
    try:
        doc = _toml_loads(data.decode("utf-8"))
    except Exception as e:  # tomllib.TOMLDecodeError: say which file
        raise RecipeError(f"recipe {path}: not valid TOML ({e})") from None
    raw = doc.get("stage")
    if not isinstance(raw, list) or not raw:
        raise RecipeError(f"recipe {path}: no [[stage]] tables")
    stages = [_stage(path, i, s) for i, s in enumerate(raw)]
    recipe = Recipe(path.stem, path, str(doc.get("title", path.stem)), str(doc.get("tasks", "all")), tuple(stages),
                    hashlib.sha256(data).hexdigest()[:16])  # fmt: skip
    _check_references(recipe)
    return recipe


def _toml_loads(text: str) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    return tomllib.loads(text)


def _stage(path: Path, i: int, s: Any) -> Stage:
    where = f"recipe {path}, stage {i + 1}"
    if not isinstance(s, dict):
        raise RecipeError(f"{where}: not a table")
    unknown = set(s) - {"name", "command", "args", "section", "title", "publish", "optional", "note"}
    if unknown:
        raise RecipeError(f"{where}: unknown keys {sorted(unknown)}")
    for key in ("name", "command"):
        if not isinstance(s.get(key), str) or not s[key]:
            raise RecipeError(f"{where}: needs a string {key!r}")
    if not re.fullmatch(r"[A-Za-z0-9_]+", s["name"]):
        raise RecipeError(f"{where}: name {s['name']!r} must be letters, digits and underscores (it is a folder name)")
    args = s.get("args", {})
    if not isinstance(args, dict):
        raise RecipeError(f"{where} ({s['name']}): args must be a table of option = value")
    for k, v in args.items():
        ok = isinstance(v, (str, int, float, bool)) or (isinstance(v, list) and all(isinstance(x, str) for x in v))
        if not ok:  # a list repeats the option (e.g. circuit's --sae KIND.LAYER=PATH)
            raise RecipeError(f"{where} ({s['name']}): option {k!r} must be a string, number, boolean or list of strings, got {v!r}")
        if k.replace("-", "_") in COMMON + ("out", "quiet"):
            raise RecipeError(f"{where} ({s['name']}): {k!r} is set by `reproduce` itself; remove it from args")
    publish = s.get("publish", [])
    if not isinstance(publish, list) or not all(isinstance(p, str) for p in publish):
        raise RecipeError(f"{where} ({s['name']}): publish must be a list of file patterns")
    return Stage(s["name"], s["command"], dict(args), str(s.get("section", "")), str(s.get("title", "")), tuple(publish),
                 bool(s.get("optional", False)), str(s.get("note", "")))  # fmt: skip


def _check_references(recipe: Recipe) -> None:
    """Unique names, known commands and options, and {stage:X} only to an earlier stage."""
    seen: list[str] = []
    for st in recipe.stages:
        if st.name in seen:
            raise RecipeError(f"recipe {recipe.path}: two stages named {st.name!r}")
        options = command_options(st.command)
        if options is None:
            raise RecipeError(f"recipe {recipe.path}, stage {st.name}: unknown command {st.command!r}")
        for k, v in st.args.items():
            if _flag(k) not in options:
                raise RecipeError(f"recipe {recipe.path}, stage {st.name}: `{st.command}` has no option {_flag(k)}")
            for ref in _refs(v):
                if ref not in seen:
                    raise RecipeError(f"recipe {recipe.path}, stage {st.name}: {{stage:{ref}}} is not an earlier stage")
        seen.append(st.name)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def command_options(command: str) -> set[str] | None:
    """The option strings of an `icl-circuits` (sub)command, or None if there is no such command."""
    import argparse

    from .cli import build_parser

    parser: argparse.ArgumentParser = build_parser()
    for word in command.split():
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None or word not in sub.choices:
            return None
        parser = sub.choices[word]
    if any(isinstance(a, argparse._SubParsersAction) for a in parser._actions):
        return None  # a group ('sae'), not a command
    return set(parser._option_string_actions)


# -- one stage's command line ------------------------------------------------------------------------------


def stage_argv(stage: Stage, cfg: ReproduceConfig, tasks: str, folders: dict[str, Path]) -> list[str]:
    """The command line of a stage: its args with placeholders filled in, then the shared run options."""
    here = folders[stage.name]

    def fill(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:g}"
        text = str(value)

        def sub(m: re.Match) -> str:
            key = m.group(1)
            if key == "out":
                return str(here)
            if key.startswith("stage:"):
                return str(folders[key[6:]])
            if key.startswith("tasks:"):
                return ",".join(tasks.split(",")[: int(key[6:])]) if tasks != "all" else _first_builtin(int(key[6:]))
            return tasks

        return _PLACEHOLDER.sub(sub, text)

    argv = stage.command.split()
    for k, v in stage.args.items():
        if v is False:
            continue
        for one in v if isinstance(v, list) else [v]:
            argv += [_flag(k)] if one is True else [_flag(k), fill(one)]
    options = command_options(stage.command) or set()
    for key in COMMON:
        if _flag(key) in options:
            argv += [_flag(key), str(getattr(cfg, key))]
    argv += ["--out", str(here)] if "--out" in options else []
    argv += ["--quiet"] if not cfg.progress and "--quiet" in options else []
    return argv


def _first_builtin(n: int) -> str:
    from .tasks import list_tasks

    return ",".join(list_tasks()[:n])


def _cosmetic(argv: Sequence[str]) -> list[str]:
    """The command line without options that cannot change a result (--threads, --quiet): what is logged."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--threads":
            skip = True
            continue
        if a != "--quiet":
            out.append(a)
    return out


def _portable(argv: Sequence[str], out: Path) -> list[str]:
    """Paths inside the run folder written relative to it ({run}/...), so a moved run folder still resumes."""
    return [a.replace(str(out), "{run}") for a in argv]


def same_command(a: Sequence[str], b: Sequence[str]) -> bool:
    """Do two command lines ask for the same thing? Compared as parsed options (defaults filled in, order and
    spelling ignored), without --threads / --quiet."""
    return _parsed(a) == _parsed(b)


def _parsed(argv: Sequence[str]) -> dict[str, str]:
    from .cli import build_parser

    try:
        ns = build_parser().parse_args(list(argv))
    except SystemExit:  # a logged command line that no longer parses: compare it as text
        return {"argv": " ".join(_cosmetic(argv))}
    return {k: str(v) for k, v in vars(ns).items() if k not in ("threads", "quiet", "func")}


# -- the run ------------------------------------------------------------------------------------------


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
            done.add(st.name, dict(argv=_portable(_cosmetic(argvs[st.name]), out), seconds=spent(st.name)))
            _say(cfg, f"[{st.name}] done in {seconds / 60:.1f} min")

        runner = _Runner(cfg, out, run_command)
        with _sigterm_as_interrupt():  # `kill` logs the attempt like Ctrl-C does, and stops the stage's children
            runner.run([st for st in recipe.stages if st.name in todo], argvs, finish)
        for st in recipe.stages:
            rec = done.done.get(st.name)
            if rec is not None and same_command(_portable(rec["argv"], out), _portable(argvs[st.name], out)):
                publish(st, folders[st.name], docs / st.name)
                status = "done"
            else:
                status = ("skipped" if st.optional and st.name not in cfg.include
                          else "unfinished" if folders[st.name].is_dir() else "not run")
            result.stages.append(StageRecord(st.name, argvs[st.name], spent(st.name), status))
        from .claims import write_claims_report

        result.claims, result.report = write_claims_report(recipe, result, tasks, cfg)
    return result


def _plan(recipe: Recipe, cfg: ReproduceConfig, argvs: dict[str, list[str]], done: AppendLog, out: Path) -> list[str]:
    """The stages to run now; a finished stage whose command line changed is refused unless rerun."""
    todo = []
    for st in recipe.stages:
        wanted = (not st.optional or st.name in cfg.include) and (not cfg.only or st.name in cfg.only)
        rec = done.done.get(st.name)
        again = st.name in cfg.rerun or "all" in cfg.rerun
        changed = rec is not None and not same_command(_portable(rec["argv"], out), _portable(argvs[st.name], out))
        if changed and not again and wanted:
            raise ConfigMismatch(
                f"stage {st.name} in {out} was run as `icl-circuits {' '.join(rec['argv'])}`, but the recipe now asks for "
                f"`icl-circuits {' '.join(_cosmetic(argvs[st.name]))}`; pass --rerun {st.name} (its command resumes what it "
                "can) or use another --out"
            )  # fmt: skip
        if wanted and (rec is None or again):
            folder = out / st.name
            if changed and folder.exists():
                # made under the old command line: its command would refuse to mix settings, so move it aside (kept)
                aside = out / f"{st.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
                folder.rename(aside)
                _say(cfg, f"[{st.name}] its command line changed: the old results are kept in {aside}")
            todo.append(st.name)
        elif wanted:
            _say(cfg, f"[{st.name}] finished earlier; skipped")
    return todo


def _refs(value: Any) -> list[str]:
    """The stage names a recipe value refers to with {stage:NAME}."""
    return [r for one in (value if isinstance(value, list) else [value]) for r in re.findall(r"\{stage:([A-Za-z0-9_]+)\}", str(one))]


def _deps(st: Stage) -> set[str]:
    return {ref for v in st.args.values() for ref in _refs(v)}


class _Runner:
    """Runs stages in recipe order (jobs=1, in this process) or side by side in subprocesses (jobs>1)."""

    def __init__(self, cfg: ReproduceConfig, out: Path, run_command: Callable[[list[str]], int] | None) -> None:
        self.cfg, self.out = cfg, out
        self.run_command = run_command

    def run(self, stages: list[Stage], argvs: dict[str, list[str]], finish: Callable[[Stage, float, int | None], None]) -> None:
        if self.cfg.jobs == 1:
            for st in stages:
                _say(self.cfg, f"[{st.name}] {st.section} {st.title}\n  icl-circuits {' '.join(argvs[st.name])}")
                t0 = time.perf_counter()
                try:
                    rc = (self.run_command or _run_cli)(argvs[st.name])
                except BaseException:  # Ctrl-C or a crash: the attempt's time still counts, the stage stays unfinished
                    finish(st, time.perf_counter() - t0, None)
                    raise
                finish(st, time.perf_counter() - t0, rc)
            return
        pending = list(stages)
        names = {st.name for st in stages}
        running: dict[str, tuple[Stage, float, Any]] = {}  # name -> (stage, start time, process)
        failed: StageFailed | None = None
        try:
            while pending or running:
                started_or_done = names - {s.name for s in pending} - set(running)
                while failed is None and len(running) < self.cfg.jobs:
                    ready = next((s for s in pending if _deps(s) & names <= started_or_done), None)
                    if ready is None:
                        break
                    pending.remove(ready)
                    _say(self.cfg, f"[{ready.name}] started: icl-circuits {' '.join(argvs[ready.name])} (log: {self.out / (ready.name + '.log')})")
                    running[ready.name] = (ready, time.perf_counter(), self._start(ready, argvs[ready.name]))
                if not running:
                    break  # a failure stopped new launches
                time.sleep(0.1)
                for name, (st, t0, proc) in list(running.items()):
                    rc = proc.poll()
                    if rc is None:
                        continue
                    del running[name]
                    try:
                        finish(st, time.perf_counter() - t0, rc)
                    except StageFailed as e:  # let the running stages finish; start nothing new
                        failed = failed or e
        except BaseException:  # Ctrl-C / SIGTERM: stop the children (their commands resume what they finished)
            for st, t0, proc in running.values():
                proc.stop()
                finish(st, time.perf_counter() - t0, None)
            raise
        if failed is not None:
            raise failed

    def _start(self, st: Stage, argv: list[str]) -> "_Process | _Thread":
        if self.run_command is not None:
            return _Thread(self.run_command, argv)
        return _Process(argv, self.out / f"{st.name}.log")


class _Process:
    """A stage's command in its own process, its output in a log file."""

    def __init__(self, argv: list[str], log: Path) -> None:
        import subprocess

        self.log = log.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "icl_circuits.cli", *argv], stdout=self.log, stderr=subprocess.STDOUT)

    def poll(self) -> int | None:
        rc = self.proc.poll()
        if rc is not None:
            self.log.close()
        return rc

    def stop(self) -> None:
        import subprocess

        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class _Thread:
    """A stage run by a Python callable in a thread (tests); poll() like a process."""

    def __init__(self, fn: Callable[[list[str]], int], argv: list[str]) -> None:
        import threading

        self.rc: int | None = None
        self.thread = threading.Thread(target=self._run, args=(fn, argv), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[list[str]], int], argv: list[str]) -> None:
        try:
            self.rc = fn(argv)
        except Exception:  # noqa: BLE001 - reported as a failed stage
            self.rc = 1

    def poll(self) -> int | None:
        return None if self.thread.is_alive() else self.rc

    def stop(self) -> None:
        pass  # a thread cannot be stopped; it is a daemon


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt while the stages run (main thread only; restored afterwards)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


class StageFailed(RuntimeError):
    """A stage's command returned a non-zero exit code."""


def _check_tasks(tasks: str) -> None:
    """A bad task name or file fails now, not in the fifth stage."""
    from .tasks import load_tasks

    load_tasks(tasks)


def _run_cli(argv: list[str]) -> int:
    from .cli import main

    return main(argv)


def _say(cfg: ReproduceConfig, text: str) -> None:
    if cfg.progress:
        print(text, file=sys.stderr, flush=True)


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
