"""Recipe files: stages of `icl-circuits` command lines, checked before anything runs.

A recipe (`icl_circuits/experiments/recipes/*.toml`, or a file of your own) lists stages; each is one command line:

    [[stage]]
    name = "tvc_execution"            # its folder: <out>/tvc_execution
    section = "Sec. 3.1"
    title = "Task Vector Cleaning, executors"
    command = "clean"
    args = { tasks = "{tasks}", layers = "12" }
    publish = ["summary.csv", "summary.png"]   # copied into <docs>/<name>/

Placeholders in `args`: `{tasks}` (the run's tasks), `{tasks:N}` (the first N of them), `{out}` (this
stage's folder) and `{stage:NAME}` (another, earlier stage's folder); a list value repeats the option.
`--model --device --dtype --threads --seed --quiet` are added to every command that takes them, and
`--out <its folder>` to every command with an --out.

A few commands need more (recipes/saes.toml uses each):
- `positional = ["{stage:train}", "DEST"]`: positional arguments, after the command words (`sae export RUN DEST`);
- `after = ["export"]`: stages that must finish first although no value names their folder (`--jobs`);
- `args.dtype`: a stage's own forward dtype, in place of the run's (`sae harvest`'s bfloat16 forward);
- `args.out = "{out}/eval.json"`: for a command whose --out is a file, a file inside the stage's folder.

`optional = true` stages run only when included. Two command lines are the same when they parse to the
same options (`same_command`), with paths inside the run folder written `{run}/...`.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from icl_circuits.experiments.reproduce import ReproduceConfig

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
    positional: tuple[str, ...] = ()  # positional arguments, after the command words
    after: tuple[str, ...] = ()  # earlier stages that must finish first (besides those its values name)


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


# -- recipes ------------------------------------------------------------------------------------------


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def load_recipe(spec: str | Path) -> Recipe:
    """A built-in recipe by name ('paper', 'demo', 'saes') or a .toml file; checked before anything runs."""
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
    unknown = set(s) - {"name", "command", "args", "section", "title", "publish", "optional", "note", "positional", "after"}
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
        key = k.replace("-", "_")
        if key == "out" and isinstance(v, str) and v.startswith("{out}/") and ".." not in v:
            continue  # a command whose --out is a file: a file inside the stage's own folder
        if key == "dtype" and isinstance(v, str):
            continue  # the stage's own forward dtype (e.g. `sae harvest`'s bfloat16), in place of the run's
        if key in COMMON + ("out", "quiet"):
            raise RecipeError(f"{where} ({s['name']}): {k!r} is set by `reproduce` itself; remove it from args"
                              + (" (or name a file inside the stage's folder: out = \"{out}/FILE\")" if key == "out" else ""))
    lists = {}
    for key, what in (("publish", "file patterns"), ("positional", "arguments"), ("after", "stage names")):
        value = s.get(key, [])
        if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
            raise RecipeError(f"{where} ({s['name']}): {key} must be a list of {what}")
        lists[key] = tuple(value)
    return Stage(s["name"], s["command"], dict(args), str(s.get("section", "")), str(s.get("title", "")), lists["publish"],
                 bool(s.get("optional", False)), str(s.get("note", "")), lists["positional"], lists["after"])  # fmt: skip


def _check_references(recipe: Recipe) -> None:
    """Unique names, known commands and options, and {stage:X} / after only to an earlier stage."""
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
        for ref in sorted({r for v in (*st.args.values(), *st.positional) for r in _refs(v)}):
            if ref not in seen:
                raise RecipeError(f"recipe {recipe.path}, stage {st.name}: {{stage:{ref}}} is not an earlier stage")
        for ref in st.after:
            if ref not in seen:
                raise RecipeError(f"recipe {recipe.path}, stage {st.name}: after = [{ref!r}] is not an earlier stage")
        if st.positional and command_positionals(st.command) < len(st.positional):
            raise RecipeError(f"recipe {recipe.path}, stage {st.name}: `{st.command}` takes at most "
                              f"{command_positionals(st.command)} positional arguments, the stage gives {len(st.positional)}")
        seen.append(st.name)


@functools.lru_cache(maxsize=1)
def _parser() -> Any:
    """The CLI's parser, built once: every stage's options and every resume comparison read it."""
    from icl_circuits.cli import build_parser

    return build_parser()


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def command_options(command: str) -> set[str] | None:
    """The option strings of an `icl-circuits` (sub)command, or None if there is no such command."""
    import argparse

    parser: argparse.ArgumentParser = _parser()
    for word in command.split():
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None or word not in sub.choices:
            return None
        parser = sub.choices[word]
    if any(isinstance(a, argparse._SubParsersAction) for a in parser._actions):
        return None  # a group ('sae'), not a command
    return set(parser._option_string_actions)


def command_positionals(command: str) -> int:
    """How many positional arguments an `icl-circuits` command takes at most (0 for an unknown command)."""
    import argparse

    parser: argparse.ArgumentParser = _parser()
    for word in command.split():
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None or word not in sub.choices:
            return 0
        parser = sub.choices[word]
    return sum(1 for a in parser._actions if not a.option_strings and not isinstance(a, argparse._SubParsersAction))


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

    argv = stage.command.split() + [fill(p) for p in stage.positional]
    for k, v in stage.args.items():
        if v is False:
            continue
        for one in v if isinstance(v, list) else [v]:
            argv += [_flag(k)] if one is True else [_flag(k), fill(one)]
    options = command_options(stage.command) or set()
    own = {k.replace("-", "_") for k in stage.args}
    for key in COMMON:
        if _flag(key) in options and key not in own:  # a stage's own dtype wins over the run's
            argv += [_flag(key), str(getattr(cfg, key))]
    argv += ["--out", str(here)] if "--out" in options and "out" not in own else []
    argv += ["--quiet"] if not cfg.progress and "--quiet" in options else []
    return argv


def _first_builtin(n: int) -> str:
    from icl_circuits.data.tasks import list_tasks

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


def changed_options(logged: dict[str, str], now: dict[str, str]) -> list[str]:
    """The options whose value differs between a finished stage's logged `options` (its command parsed *then*,
    defaults of that version filled in, and the config values its command reports as `effective`) and its
    command parsed now (`_parsed`): a default changed in between shows here, which comparing two command lines
    with today's parser cannot see. Options only one side knows (added or removed since) are left out: a new
    option's default is meant to keep old behaviour."""
    return sorted(k for k in logged.keys() & now.keys() if logged[k] != now[k])


def _parsed(argv: Sequence[str]) -> dict[str, str]:
    try:
        ns = _parser().parse_args(list(argv))
    except SystemExit:  # a logged command line that no longer parses: compare it as text
        return {"argv": " ".join(_cosmetic(argv))}
    options = {k: str(v) for k, v in vars(ns).items() if k not in ("threads", "quiet", "func", "effective")}
    # defaults the library fills in beneath the options (clean's λ by --setting): 'cleaning.l1_coeff', ...
    effective = getattr(ns, "effective", None)
    if effective is not None:
        try:
            options |= {f"{part}.{k}": str(v) for part, values in effective(ns).items() for k, v in values.items()}
        except (ValueError, SystemExit):  # options the command itself refuses: it will say so when it runs
            pass
    return options


# -- references between stages ------------------------------------------------------------------------



def _refs(value: Any) -> list[str]:
    """The stage names a recipe value refers to with {stage:NAME}."""
    return [r for one in (value if isinstance(value, list) else [value]) for r in re.findall(r"\{stage:([A-Za-z0-9_]+)\}", str(one))]


def _deps(st: Stage) -> set[str]:
    """The stages that must finish before this one: those its values name, and its `after`."""
    return {ref for v in (*st.args.values(), *st.positional) for ref in _refs(v)} | set(st.after)


