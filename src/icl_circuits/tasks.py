"""ICL tasks: named lists of (input, output) pairs.

The paper's 23 tasks (App. A) ship with the package: 20 as data files written for this
project, and the three algorithmic ones (first / second / last element of a 4-element
array) generated from a word list with a fixed seed. User tasks load from JSON (a list of
{"input", "output"} objects, or an {input: output} dict) or CSV (columns input,output).
"""

from __future__ import annotations

import csv
import io
import json
import random
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
FORBIDDEN = ("\n", "->")  # would break the prompt format and token typing


class TaskFormatError(ValueError):
    """A task file or pair list that cannot be used."""


@dataclass(frozen=True)
class Task:
    name: str
    pairs: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        validate_pairs(self.pairs, self.name)

    def __len__(self) -> int:
        return len(self.pairs)

    def split(self, n_eval: int | float = 0.5, seed: int = 0) -> tuple["Task", "Task"]:
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
        if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise TaskFormatError(f"task {name!r}, pair {i}: expected (input, output) strings, got {pair!r}")
        for label, s in zip(("input", "output"), pair):
            if not s.strip():
                raise TaskFormatError(f"task {name!r}, pair {i}: empty {label}")
            if s != s.strip():
                raise TaskFormatError(f"task {name!r}, pair {i}: {label} {s!r} has leading/trailing whitespace")
            bad = [f for f in FORBIDDEN if f in s]
            if bad:
                raise TaskFormatError(f"task {name!r}, pair {i}: {label} {s!r} contains {bad[0]!r}")


def list_tasks() -> list[str]:
    return list(PAPER_TASKS)


def load_task(name_or_path: str | Path) -> Task:
    """A built-in task by name, or a user task file (.json or .csv)."""
    key = str(name_or_path)
    if key in ALGO_TASKS:
        return _algo_task(key)
    if key in PAPER_TASKS:
        text = files("icl_circuits").joinpath("data", "tasks", f"{key}.json").read_text(encoding="utf-8")
        return parse_task(text, key, "json")
    path = Path(key)
    if not path.is_file():
        raise FileNotFoundError(f"{key!r} is neither a built-in task ({', '.join(PAPER_TASKS)}) nor a file")
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in ("json", "csv"):
        raise TaskFormatError(f"{path}: task files must be .json or .csv, got .{suffix}")
    return parse_task(path.read_text(encoding="utf-8"), path.stem, suffix)


def save_task(task: Task, path: str | Path) -> Path:
    """Write a task file (JSON list of {input, output}) that load_task reads back as the same task."""
    from .storage import write_json

    return write_json(path, [{"input": x, "output": y} for x, y in task.pairs])


def task_of_result(folder: str | Path, name: str) -> Task:
    """The task a result folder was made from: its own task.json (a user task), else the built-in `name`."""
    own = Path(folder) / "task.json"
    return parse_task(own.read_text(encoding="utf-8"), name, "json") if own.is_file() else load_task(name)


def load_tasks(names: str | list[str]) -> list[Task]:
    """'all', a comma-separated string, or a list of names/paths."""
    if isinstance(names, str):
        names = list(PAPER_TASKS) if names == "all" else [n for n in names.split(",") if n]
    return [load_task(n) for n in names]


def parse_task(text: str, name: str, fmt: str) -> Task:
    if fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise TaskFormatError(f"task {name!r}: invalid JSON ({e})") from e
        if isinstance(data, dict):
            pairs = list(data.items())
        elif isinstance(data, list):
            pairs = []
            for i, item in enumerate(data):
                if not isinstance(item, dict) or set(item) != {"input", "output"}:
                    raise TaskFormatError(
                        f"task {name!r}, item {i}: expected {{\"input\": ..., \"output\": ...}}, got {item!r}"
                    )
                pairs.append((item["input"], item["output"]))
        else:
            raise TaskFormatError(f"task {name!r}: JSON must be a list of pairs or a dict, got {type(data).__name__}")
    elif fmt == "csv":
        rows = list(csv.reader(io.StringIO(text)))
        if not rows:
            raise TaskFormatError(f"task {name!r}: empty CSV")
        header = [h.strip().lower() for h in rows[0]]
        if header[:2] == ["input", "output"]:
            rows = rows[1:]
        pairs = []
        for i, row in enumerate(rows):
            if len(row) != 2:
                raise TaskFormatError(f"task {name!r}, CSV row {i + 1}: expected 2 columns, got {len(row)}")
            pairs.append((row[0].strip(), row[1].strip()))
    else:
        raise TaskFormatError(f"unknown task format {fmt!r}")
    return Task(name, tuple(tuple(p) for p in pairs))  # type: ignore[misc]


def _algo_task(name: str) -> Task:
    """Arrays of 4 distinct common nouns; the output is the element at ALGO_TASKS[name]."""
    words = sorted({inp for inp, _ in load_task("singular_plural").pairs if inp.isalpha() and len(inp) <= 7})
    rng = random.Random(ALGO_SEED)
    pairs: dict[str, str] = {}
    while len(pairs) < ALGO_SIZE:
        items = rng.sample(words, 4)
        pairs["[" + ", ".join(items) + "]"] = items[ALGO_TASKS[name]]
    return Task(name, tuple(pairs.items()))
