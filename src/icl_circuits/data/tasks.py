"""ICL tasks: named lists of (input, output) pairs.

The paper's 23 tasks (App. A) ship with the package: 20 as data files written for this
project, and the three algorithmic ones (first / second / last element of a 4-element
array) generated from a word list with a fixed seed. User tasks load from JSON (a list of
{"input", "output"} objects, or an {input: output} dict) or CSV (columns input,output).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import warnings
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

PAPER_TASKS: tuple[str, ...] = (
    "location_continent", "football_player_position", "location_religion", "location_language",
    "person_profession", "location_country", "country_capital", "person_language",
    "singular_plural", "present_simple_past_simple", "antonyms", "plural_singular",
    "present_simple_past_perfect", "present_simple_gerund", "en_it", "it_en", "en_fr", "en_es",
    "fr_en", "es_en", "algo_last", "algo_first", "algo_second",
)  # fmt: skip
ALGO_TASKS = {"algo_first": 0, "algo_second": 1, "algo_last": 3}
ALGO_SEED = 1234
ALGO_SIZE = 200
DEFAULT_EVAL_SHARE = 0.5  # share of a task's pairs held out for evaluation (the rest: demonstrations, calibration)
FORBIDDEN = ("\n", "->")  # would break the prompt format and token typing


class TaskFormatError(ValueError):
    """A task file or pair list that cannot be used."""


class SkippedPairsWarning(UserWarning):
    """A user task file had pairs that cannot form a prompt; they were left out."""


@dataclass(frozen=True)
class Task:
    name: str
    pairs: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        validate_pairs(self.pairs, self.name)

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def digest(self) -> str:
        """Content hash of the task (name and pairs): what a finished result of this task is keyed by."""
        blob = json.dumps([self.name, self.pairs], ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]

    def split(self, n_eval: int | float = DEFAULT_EVAL_SHARE, seed: int = 0) -> tuple["Task", "Task"]:
        """Disjoint (train, eval) tasks after a seeded shuffle; n_eval is a count or a fraction."""
        k = int(round(len(self) * n_eval)) if isinstance(n_eval, float) else int(n_eval)
        if not 0 < k < len(self):
            raise ValueError(f"task {self.name}: cannot hold out {k} of {len(self)} pairs")
        pairs = list(self.pairs)
        random.Random(seed).shuffle(pairs)
        return Task(f"{self.name}", tuple(pairs[k:])), Task(f"{self.name}", tuple(pairs[:k]))

    def sample(self, n: int, rng: random.Random) -> list[tuple[str, str]]:
        """n distinct pairs (with replacement across calls)."""
        if n > len(self):
            raise ValueError(f"task {self.name}: asked for {n} distinct pairs, it has {len(self)}")
        return rng.sample(self.pairs, n)


def validate_pairs(pairs: tuple[tuple[str, str], ...], name: str) -> None:
    if not pairs:
        raise TaskFormatError(f"task {name!r} has no pairs")
    for i, pair in enumerate(pairs):
        problem = pair_problem(pair)
        if problem:
            raise TaskFormatError(f"task {name!r}, pair {i}: {problem}")


def pair_problem(pair: object) -> str | None:
    """Why `pair` cannot form a prompt, or None if it can."""
    if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
        return f"expected (input, output) strings, got {pair!r}"
    for label, s in zip(("input", "output"), pair):
        if not s.strip():
            return f"empty {label}"
        if s != s.strip():
            return f"{label} {s!r} has leading/trailing whitespace"
        bad = [f for f in FORBIDDEN if f in s]
        if bad:
            return f"{label} {s!r} contains {bad[0]!r}"
    return None


def is_builtin(task: Task) -> bool:
    """True for a built-in task with its shipped pairs (a user file that merely shares the name is not)."""
    return task.name in PAPER_TASKS and load_task(task.name).pairs == task.pairs


def list_tasks() -> list[str]:
    return list(PAPER_TASKS)


def load_task(name_or_path: str | Path, *, strict: bool = False) -> Task:
    """A built-in task by name, or a user task file (.json or .csv); see the module doc for `strict`."""
    key = str(name_or_path)
    if key in ALGO_TASKS:
        return _algo_task(key)
    if key in PAPER_TASKS:
        text = files("icl_circuits").joinpath("data", "task_files", f"{key}.json").read_text(encoding="utf-8")
        return parse_task(text, key, "json", strict=True)
    path = Path(key)
    if not path.is_file():
        raise FileNotFoundError(f"{key!r} is neither a built-in task ({', '.join(PAPER_TASKS)}) nor a file")
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in ("json", "csv"):
        raise TaskFormatError(f"{path}: task files must be .json or .csv, got .{suffix}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise TaskFormatError(f"{path}: not UTF-8 text (byte {e.start}); save the task file as UTF-8") from None
    try:
        return parse_task(text, path.stem, suffix, strict=strict)
    except TaskFormatError as e:
        raise TaskFormatError(f"{path}: {e}") from None


def save_task(task: Task, path: str | Path) -> Path:
    """Write a task file (JSON list of {input, output}) that load_task reads back as the same task."""
    from icl_circuits.core.storage import write_json

    return write_json(path, [{"input": x, "output": y} for x, y in task.pairs])


def load_tasks(names: str | list[str], *, strict: bool = False) -> list[Task]:
    """'all', a comma-separated string, or a list of names/paths."""
    if isinstance(names, str):
        names = list(PAPER_TASKS) if names == "all" else [n for n in names.split(",") if n]
    return [load_task(n, strict=strict) for n in names]


def check_unique_names(tasks: list[Task]) -> None:
    """Results are stored per task name: two different tasks of one name in a run would overwrite each other."""
    seen: dict[str, Task] = {}
    for t in tasks:
        if t.name in seen and seen[t.name].pairs != t.pairs:
            raise TaskFormatError(f"two different tasks are named {t.name!r} in one run; rename one of the files")
        seen[t.name] = t


def parse_task(text: str, name: str, fmt: str, *, strict: bool = False) -> Task:
    """Pairs from JSON or CSV text; whitespace is stripped and unusable pairs are skipped (or refused if strict)."""
    items: list[tuple[str, object]] = []  # (where, raw pair)
    if fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise TaskFormatError(f"task {name!r}: invalid JSON ({e})") from e
        if isinstance(data, dict):
            items = [(f"pair {i}", p) for i, p in enumerate(data.items())]
        elif isinstance(data, list):
            for i, item in enumerate(data):
                if isinstance(item, dict) and {"input", "output"} <= set(item):
                    items.append((f"item {i}", (item["input"], item["output"])))
                else:
                    items.append((f"item {i}", f'expected {{"input": ..., "output": ...}}, got {item!r}'))
        else:
            raise TaskFormatError(f"task {name!r}: JSON must be a list of pairs or a dict, got {type(data).__name__}")
    elif fmt == "csv":
        rows = list(csv.reader(io.StringIO(text)))
        if not rows:
            raise TaskFormatError(f"task {name!r}: empty CSV")
        header = [h.strip().lower() for h in rows[0]]
        if header != ["input", "output"]:
            raise TaskFormatError(
                f"task {name!r}: a CSV task file must start with the header row 'input,output', "
                f"got {','.join(rows[0])!r}"
            )
        for i, row in enumerate(rows[1:], start=2):
            if not row:
                continue  # blank line
            if len(row) != 2:
                items.append((f"CSV row {i}", f"expected 2 columns, got {len(row)}"))
            else:
                items.append((f"CSV row {i}", (row[0], row[1])))
    else:
        raise TaskFormatError(f"unknown task format {fmt!r}")
    pairs: list[tuple[str, str]] = []
    skipped: list[str] = []
    for where, raw in items:
        if isinstance(raw, str):  # a structural problem found above
            skipped.append(f"{where}: {raw}")
            continue
        pair = tuple(s.strip() if isinstance(s, str) else s for s in raw)  # type: ignore[union-attr]
        problem = pair_problem(pair)
        if problem:
            skipped.append(f"{where}: {problem}")
        else:
            pairs.append(pair)  # type: ignore[arg-type]
    if skipped and (strict or not pairs):
        what = "no usable pairs" if not pairs else f"{len(skipped)} unusable pair(s) (strict mode)"
        raise TaskFormatError(f"task {name!r}: {what}; " + "; ".join(skipped[:3]) + (" ..." if len(skipped) > 3 else ""))
    if skipped:
        warnings.warn(
            f"task {name!r}: skipped {len(skipped)} of {len(items)} pairs that cannot form a prompt: "
            + "; ".join(skipped[:3]) + (" ..." if len(skipped) > 3 else "") + " (use --strict to refuse the file instead)",
            SkippedPairsWarning, stacklevel=2,
        )  # fmt: skip
    return Task(name, tuple(pairs))


def _algo_task(name: str) -> Task:
    """Arrays of 4 distinct common nouns; the output is the element at ALGO_TASKS[name]."""
    words = sorted({inp for inp, _ in load_task("singular_plural").pairs if inp.isalpha() and len(inp) <= 7})
    rng = random.Random(ALGO_SEED)
    pairs: dict[str, str] = {}
    while len(pairs) < ALGO_SIZE:
        items = rng.sample(words, 4)
        pairs["[" + ", ".join(items) + "]"] = items[ALGO_TASKS[name]]
    return Task(name, tuple(pairs.items()))
