"""The test suite's layout: no test file imports another test file or a conftest; tests mirror the package
tree, each test file named for the module or package it tests (tests/<dir>/test_<module>.py for
src/icl_circuits/<dir>/<module>.py or the package <dir>/<module>/), cross-cutting tests listed in CROSS_CUTTING;
and the package's imports follow the layers of docs/architecture.md.

Code that more than one test file uses lives in tests/helpers.py (its docstring has the layout rules);
conftest.py files hold fixtures only. Checked statically with `ast`, so a bad import is named with its
file and line even when the module it names would import fine. Python source held in a string (a script
a test runs in a subprocess) is parsed and checked too.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def _is_test_module(dotted: str) -> bool:
    """test_x, tests.test_x, tests.reliability.test_x, conftest, tests.conftest, .. (one name or a dotted path)."""
    return any(part.startswith("test_") or part == "conftest" for part in dotted.split(".") if part)


def _imported_test_modules(node: ast.AST) -> list[str]:
    """The test modules / conftests an import statement names, written as in the source ('' if none)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if _is_test_module(a.name)]
    if not isinstance(node, ast.ImportFrom):
        return []
    dots, mod = "." * node.level, node.module or ""
    if node.level == 0 and mod.split(".")[0] not in ("tests", "conftest") and not mod.startswith("test_"):
        return []  # another package's module (icl_circuits, torch, ...): its names are not test modules
    if _is_test_module(mod):
        return [dots + mod]
    # `from . import test_x`, `from tests.reliability import conftest`: the imported names are modules
    return [f"{dots}{mod}.{a.name}" if mod else dots + a.name for a in node.names if _is_test_module(a.name)]


def _bad_imports(tree: ast.AST, line_offset: int = 0, strings: bool = True) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        out += [(node.lineno + line_offset, name) for name in _imported_test_modules(node)]
        if strings and isinstance(node, ast.Constant) and isinstance(node.value, str) and "import" in node.value:
            try:  # Python source in a string: a script run in a subprocess
                inner = ast.parse(node.value)
            except SyntaxError:
                continue
            out += _bad_imports(inner, node.lineno - 1 + line_offset)
    return out


def bad_imports(path: Path, strings: bool = True) -> list[str]:
    """'file:line: imports name' for every import of a test module or conftest in `path` (and, with `strings`,
    in the Python source its string constants hold)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return [f"{shown}:{line}: imports {name}" for line, name in sorted(set(_bad_imports(tree, strings=strings)))]


def _checked_files() -> list[Path]:
    """Every test file, plus the conftests and the helpers module (they must not import test files either)."""
    files = [*TESTS.rglob("test_*.py"), *TESTS.rglob("conftest.py"), TESTS / "helpers.py"]
    return sorted(set(files))


def test_no_test_file_imports_another_test_file_or_a_conftest():
    files = _checked_files()
    assert len([f for f in files if f.name.startswith("test_")]) > 10  # the glob found the suite
    this = Path(__file__).resolve()
    bad = [line for f in files for line in bad_imports(f, strings=f != this)]  # this file's strings are examples
    assert not bad, (
        "test files must not import other test files or conftest.py; move the shared helper to tests/helpers.py "
        "and import it from there:\n  " + "\n  ".join(bad)
    )


def test_the_check_finds_every_kind_of_test_import(tmp_path):
    src = '''
import os
from icl_circuits.data.tasks import Task
from tests.helpers import ANTONYMS
from .test_cleaning import MANY
from ..test_circuits import setup
from .conftest import make_tiny
from . import test_examples as te
import tests.test_dashboards
from tests.reliability.conftest import saved_model
from tests import conftest


def f():
    from .test_steering import _sae


SCRIPT = """
import sys
from tests.test_task_vectors import _setup
"""
'''
    path = tmp_path / "test_example.py"
    path.write_text(src)
    assert [line.split(": imports ")[1] for line in bad_imports(path)] == [
        ".test_cleaning", "..test_circuits", ".conftest", ".test_examples", "tests.test_dashboards",
        "tests.reliability.conftest", "tests.conftest", ".test_steering", "tests.test_task_vectors",
    ]  # fmt: skip
    lines = [int(line.split(":")[1]) for line in bad_imports(path)]
    assert lines == [5, 6, 7, 8, 9, 10, 11, 15, 20]  # the line of each import in the file


PKG = ROOT / "src" / "icl_circuits"

# Test files that test no single module, named for what they check (paths relative to tests/), each with why.
CROSS_CUTTING = {
    "test_layout.py": "the layout of the test suite and the import layers of the whole package",
    "test_device.py": "--device / --dtype through every entry point (CLI, library, training)",
    "test_bundled.py": "the real bundled Gemma 3 270M across core, data and methods",
    "reliability/test_bad_inputs.py": "fault injection: bad inputs to every command are one-line errors",
    "reliability/test_disk_full.py": "fault injection: a full disk in every writer",
    "reliability/test_run_dirs.py": "fault injection: run directories, locks and resumes across commands",
    "viz/test_browser.py": "the viewer end to end in headless Chromium on a run made by the commands",
    "viz/test_viewer_contract.py": "the viewer reads what the CLI commands write (cli -> viz)",
}
FOLDERS_WITHOUT_PACKAGE = {"reliability"}  # fault injection across packages; its files are all in CROSS_CUTTING


def _tested_module(rel: Path) -> Path | None:
    """tests/<dir>/test_<name>.py -> src/icl_circuits/<dir>/<name>.py or the package <dir>/<name>/ (None if neither)."""
    name = rel.stem.removeprefix("test_")
    for target in (PKG / rel.parent / f"{name}.py", PKG / rel.parent / name / "__init__.py"):
        if target.is_file():
            return target
    return None


def test_tests_mirror_the_package_tree():
    """Each test folder is a subpackage of icl_circuits (tests/reliability/ aside) and a package itself."""
    packages = sorted(p.relative_to(PKG).as_posix() for p in PKG.rglob("__init__.py"))
    for d in TESTS.rglob("*"):
        if not d.is_dir() or d.name == "__pycache__" or "fixtures" in d.relative_to(TESTS).parts:
            continue
        rel = d.relative_to(TESTS)
        if rel.parts[0] not in FOLDERS_WITHOUT_PACKAGE:
            assert (PKG / rel / "__init__.py").is_file(), (
                f"tests/{rel}/ mirrors no package src/icl_circuits/{rel}/ (packages: {packages})")
        assert (d / "__init__.py").is_file(), (
            f"tests/{rel}/ needs an __init__.py (test folders are packages: same file names may repeat)")


def test_every_test_file_names_the_module_it_tests():
    """tests/<dir>/test_<name>.py tests src/icl_circuits/<dir>/<name>.py (or the package <dir>/<name>/), or is
    a cross-cutting test listed in CROSS_CUTTING with its reason."""
    files = [f.relative_to(TESTS) for f in TESTS.rglob("test_*.py") if "fixtures" not in f.relative_to(TESTS).parts]
    assert len(files) > 10  # the glob found the suite
    listed = {Path(k) for k in CROSS_CUTTING}
    bad = [f"tests/{f}" for f in sorted(files) if f not in listed and _tested_module(f) is None]
    assert not bad, (
        "each test file is tests/<dir>/test_<module>.py for src/icl_circuits/<dir>/<module>.py (or the package "
        "<dir>/<module>/); rename or move these, or add them to CROSS_CUTTING with a reason:\n  " + "\n  ".join(bad)
    )
    stale = sorted(f"tests/{k}" for k in CROSS_CUTTING if not (TESTS / k).is_file())
    assert not stale, f"CROSS_CUTTING lists test files that do not exist: {stale}"
    named = sorted(f"tests/{k}" for k in CROSS_CUTTING if _tested_module(Path(k)) is not None)
    assert not named, f"these test a module of the same name; drop them from CROSS_CUTTING: {named}"
    assert all(reason.strip() for reason in CROSS_CUTTING.values())


def test_the_name_check_maps_files_to_modules_and_packages():
    assert _tested_module(Path("core/test_model.py")) == PKG / "core" / "model.py"
    assert _tested_module(Path("sae/test_formats.py")) == PKG / "sae" / "formats" / "__init__.py"  # a package
    assert _tested_module(Path("test_cli.py")) == PKG / "cli" / "__init__.py"  # tests/test_<package>.py
    assert _tested_module(Path("sae/formats/test_saex.py")) == PKG / "sae" / "formats" / "saex.py"
    assert _tested_module(Path("sae/test_sae_format.py")) is None


# The layers of docs/architecture.md, lowest first: a module may import its own layer and the ones before it.
# Paths relative to src/icl_circuits; a folder covers everything below it; the first match wins.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("core/",)),
    ("data", ("data/",)),
    ("sae format", ("sae/dictionary.py", "sae/sparse.py")),
    ("interventions", ("interventions/",)),
    ("sae", ("sae/",)),
    ("methods", ("methods/",)),
    ("viz", ("viz/",)),
    ("runs", ("experiments/task_vectors.py", "experiments/clean.py", "experiments/heatmap.py",
              "experiments/detectors.py", "experiments/circuits.py", "experiments/sae_compare.py")),
    ("cli and reproduce", ("cli/", "experiments/")),  # reproduce's stages are CLI command lines; the CLI runs reproduce
]


def _layer(rel: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in prefixes):
            return i
    raise AssertionError(f"{rel} is in no layer of LAYERS (docs/architecture.md): add it")


def _module_file(dotted: str) -> str | None:
    """icl_circuits.a.b -> 'a/b.py' or 'a/b/__init__.py' (None for the top package or a name inside a module)."""
    parts = dotted.split(".")[1:]
    while parts:
        p = "/".join(parts)
        if (PKG / f"{p}.py").is_file():
            return f"{p}.py"
        if (PKG / p / "__init__.py").is_file():
            return f"{p}/__init__.py"
        parts = parts[:-1]
    return None


def test_every_import_follows_the_layers_of_architecture_md():
    bad = []
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(PKG).as_posix()
        if rel == "__init__.py":
            continue  # the top package re-exports core and data names
        mine = _layer(rel)
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                bad.append(f"{rel}:{node.lineno}: a relative import (the package imports absolutely: icl_circuits.<layer>...)")
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [])  # fmt: skip
            for name in names:
                if not name.startswith("icl_circuits."):
                    continue
                target = _module_file(name)
                if target is not None and target != "__init__.py" and _layer(target) > mine:
                    bad.append(f"{rel}:{node.lineno} ({LAYERS[mine][0]}) imports {name} ({LAYERS[_layer(target)][0]})")
    assert not bad, "imports against the layers (docs/architecture.md):\n  " + "\n  ".join(bad)
