"""recipe.py, with recipes/saes.toml (the SAE results of docs/saes.md) as its case: the stages parse with the
real CLI parser, form a valid stage graph and are the Makefile's (and the docs') commands; a tiny stand-in runs
through `reproduce` on a tiny model and writes a report without a claims table."""

from __future__ import annotations

import json
import random
import re
import shlex
from pathlib import Path

import pytest

from icl_circuits.cli import build_parser
from icl_circuits.experiments.recipe import RecipeError, _cosmetic, _deps, _parsed, command_options, load_recipe, stage_argv
from icl_circuits.experiments.reproduce import ReproduceConfig, reproduce

from tests.helpers import assert_recipes_refused, make_tiny, word_tokenizer

ROOT = Path(__file__).resolve().parents[2]
RUN = Path("/RUN")  # a stand-in run folder: nothing is written there

# where the Makefile's commands write, and the recipe stage folder (or file in it) that holds the same thing
MAKEFILE_PATHS = {
    "runs/saes_v2_eval.json": "eval_suite/eval.json",
    "runs/sae_eval_10_17.json": "eval_10_17/eval_10_17.json",
    "runs/sae_eval.json": "eval_starter/eval.json",
    "runs/acts_v2": "harvest",
    "runs/saes_v2_resid": "train_resid",
    "runs/saes_v2_other": "train_other",
    "runs/acts_10_17": "harvest_10_17",
    "runs/saes_10_17_a": "train_10_17_a",
    "runs/saes_10_17_b": "train_10_17_b",
}


def _argvs() -> dict[str, list[str]]:
    recipe = load_recipe("saes")
    cfg = ReproduceConfig(recipe="saes", out=RUN)
    folders = {s.name: RUN / s.name for s in recipe.stages}
    return {s.name: stage_argv(s, cfg, recipe.tasks, folders) for s in recipe.stages}


def test_every_stage_parses_with_the_cli_parser_and_the_graph_is_valid() -> None:
    recipe = load_recipe("saes")
    parser = build_parser()
    argvs = _argvs()
    seen: list[str] = []
    for st in recipe.stages:
        assert st.command.startswith("sae "), st.name
        assert command_options(st.command) is not None
        ns = parser.parse_args(argvs[st.name])  # exits (SystemExit) on anything the CLI would refuse
        assert ns.func.__name__ == "cmd_sae_" + st.command.split()[1]
        assert _deps(st) <= set(seen), f"{st.name} reads a stage that is not earlier: {_deps(st) - set(seen)}"
        if not st.optional:  # the default run never needs a stage it does not run
            assert not any(recipe.stage(d).optional for d in _deps(st)), st.name
        assert st.optional or "CPU time" in st.note  # the long stages say how long they take
        seen.append(st.name)
    assert recipe.stage("harvest_10_17").optional  # layers 10-17 (hours, ~56 GB) only when included
    assert {"export_10_17_a", "export_10_17_b"} <= _deps(recipe.stage("eval_10_17"))  # reads the exported SAEs
    assert "--dtype" in argvs["harvest"] and argvs["harvest"][argvs["harvest"].index("--dtype") + 1] == "bfloat16"
    assert argvs["eval_suite"][argvs["eval_suite"].index("--out") + 1] == str(RUN / "eval_suite" / "eval.json")
    assert argvs["export_resid"][:4] == ["sae", "export", str(RUN / "train_resid"), "src/icl_circuits/data/saes/gemma-3-270m"]


def _makefile_commands() -> list[list[str]]:
    """Every `icl-circuits` command of the Makefile's SAE targets, its variables expanded."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    variables = dict(re.findall(r"^([A-Z_]+) :?= *(.*)$", text, flags=re.M))

    def expand(s: str) -> str:
        while "$(" in s:
            s = re.sub(r"\$\(([A-Z_]+)\)", lambda m: variables.get(m.group(1), ""), s)
        return s

    commands = []
    for line in text.splitlines():
        if "icl-circuits sae " not in line:
            continue
        for part in re.split(r"[&;]", expand(line)):
            words = shlex.split(part)
            if words and words[0].endswith("bin/icl-circuits"):
                commands.append(words[1:])
    return commands


def _to_run(argv: list[str]) -> list[str]:
    """A Makefile command line with its paths under runs/ moved to the recipe's stage folders."""
    out = []
    for a in argv:
        for old, new in MAKEFILE_PATHS.items():
            if a == old or a.startswith(old + "/"):
                a = str(RUN / new) + a[len(old):]
                break
        out.append(a)
    return out


def _same(make: list[str], recipe: list[str]) -> bool:
    a, b = _parsed(_to_run(make)), _parsed(recipe)
    if a.get("model") == "None":  # `sae compare` without --model: the cache's model, which the run's is
        b = {**b, "model": "None"}
    if "--out" not in make:  # the docs' `sae compare` writes to its default folder; the stage to its own
        a, b = {**a, "out": ""}, {**b, "out": ""}
    return a == b


def test_the_stages_are_the_makefiles_and_the_docs_commands() -> None:
    """The same options as the Makefile targets (and the docs' `sae compare`), so the same numbers."""
    argvs = _argvs()
    make = _makefile_commands()
    assert len(make) >= 12  # saes (6), saes-10-17 (5), sae-eval-10-17, sae-eval
    doc = (ROOT / "docs" / "saes.md").read_text().replace("\\\n", " ")
    compare = [shlex.split(line)[1:] for line in doc.splitlines() if line.strip().startswith("icl-circuits sae compare")]
    assert len(compare) == 1
    unmatched_stages = set(argvs)
    for cmd in make + compare:
        matches = [name for name, argv in argvs.items() if _same(cmd, argv)]
        assert matches, f"no stage of saes.toml runs `icl-circuits {' '.join(cmd)}`"
        unmatched_stages -= set(matches)
    assert not unmatched_stages, f"stages that are no Makefile or docs command: {sorted(unmatched_stages)}"


def test_the_new_recipe_keys_are_checked(tmp_path: Path) -> None:
    bad = {
        "takes at most 2 positional": '[[stage]]\nname = "x"\ncommand = "sae export"\npositional = ["a", "b", "c"]\n',
        "after = ['y'] is not an earlier stage": '[[stage]]\nname = "x"\ncommand = "tasks"\nafter = ["y"]\n',
        "is not an earlier stage": '[[stage]]\nname = "x"\ncommand = "sae export"\npositional = ["{stage:y}"]\n',
        "set by `reproduce` itself": '[[stage]]\nname = "x"\ncommand = "sae eval"\nargs = { out = "elsewhere.json" }\n',
        "after must be a list": '[[stage]]\nname = "x"\ncommand = "tasks"\nafter = "y"\n',
    }
    assert_recipes_refused(tmp_path, bad)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("saes_recipe")
    lm, _ = make_tiny("llama")
    model_dir = root / "tiny"
    lm.model.save_pretrained(model_dir)
    word_tokenizer([f"w{i}" for i in range(40)]).save_pretrained(model_dir)
    r = random.Random(0)
    corpus = root / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(f"w{r.randrange(40)}" for _ in range(60))}) + "\n" for _ in range(30)))
    return dict(root=root, model=str(model_dir), corpus=str(corpus))


def test_a_tiny_stand_in_of_the_recipe_runs_and_reports_without_claims(tiny: dict, tmp_path: Path) -> None:
    """harvest -> train -> eval -> export as in saes.toml (bf16 harvest, --out file, positional export), on a tiny model."""
    text = (ROOT / "src/icl_circuits/experiments/recipes/saes.toml").read_text()
    assert 'dtype = "bfloat16"' in text and 'out = "{out}/eval.json"' in text and "positional = [" in text
    ship = tmp_path / "ship"
    recipe = tmp_path / "tiny_saes.toml"
    recipe.write_text(f"""
title = "tiny SAEs"
[[stage]]
name = "harvest"
command = "sae harvest"
args = {{ saes = "resid:1", corpus = "{tiny['corpus']}", tokens = 300, eval_docs = 4, eval_tokens = 100, seq_len = 16, dtype = "bfloat16" }}
publish = ["harvest.json"]
[[stage]]
name = "train"
command = "sae train"
args = {{ cache = "{{stage:harvest}}", saes = "resid:1", arch = "topk", k = 4, d_sae = 16, tokens = 256, batch_tokens = 64, seq_len = 16, no_eval = true }}
publish = ["train_config.json"]
[[stage]]
name = "eval"
command = "sae eval"
args = {{ cache = "{{stage:harvest}}", sae = ["{{stage:train}}/saes/resid_1"], eval_ce_docs = 2, dead_rows = 300, seq_len = 16, out = "{{out}}/eval.json" }}
publish = ["eval.json"]
[[stage]]
name = "export"
command = "sae export"
positional = ["{{stage:train}}", "{ship}"]
args = {{ eval = "{{stage:eval}}/eval.json", cache = "{{stage:harvest}}" }}
after = ["eval"]
[[stage]]
name = "later"
command = "sae eval"
args = {{ cache = "{{stage:harvest}}", sae = ["{{stage:train}}/saes/resid_1"], out = "{{out}}/eval.json" }}
optional = true
""")
    out, docs = tmp_path / "run", tmp_path / "docs"
    res = reproduce(ReproduceConfig(recipe=str(recipe), out=out, docs=docs, model=tiny["model"], threads=1, progress=False))
    assert [(s.name, s.status) for s in res.stages] == [("harvest", "done"), ("train", "done"), ("eval", "done"),
                                                         ("export", "done"), ("later", "skipped")]  # fmt: skip
    harvest = json.loads((docs / "harvest" / "harvest.json").read_text())
    assert harvest["dtype"] == "bfloat16"  # the stage's own dtype, not the run's float32
    assert json.loads((docs / "eval" / "eval.json").read_text())[0]["site"] == "resid_pre.1"
    assert (ship / "resid_1").is_dir()
    assert res.claims == [] and json.loads((docs / "claims.json").read_text()) == []
    report = (docs / "report.md").read_text()
    assert "| claim |" not in report and "None: recipe `tiny_saes.toml` runs none of the stages" in report
    assert (docs / "report.html").is_file() and (docs / "manifest.json").is_file()

    # an optional stage read by a wanted one must be included
    recipe.write_text(recipe.read_text() + '[[stage]]\nname = "needs_later"\ncommand = "sae export"\npositional = ["{stage:later}"]\n')
    with pytest.raises(RecipeError, match="add --include later"):
        reproduce(ReproduceConfig(recipe=str(recipe), out=out, docs=docs, model=tiny["model"], threads=1, progress=False))


def test_reproduce_runs_the_saes_recipe_in_dependency_order(tmp_path: Path) -> None:
    """`reproduce --recipe saes --jobs 2` with the commands stubbed out (no SAE job runs): the default stages in
    an order their folders allow, the optional ones only when included, and a report without claims."""
    import threading
    import time

    recipe = load_recipe("saes")
    log: list[tuple[str, str]] = []
    lock = threading.Lock()

    folders = {s.name: tmp_path / "run" / s.name for s in recipe.stages}
    by_argv = {tuple(_cosmetic(stage_argv(s, ReproduceConfig(recipe="saes", out=tmp_path / "run"), "all", folders))): s.name
               for s in recipe.stages}  # fmt: skip

    def fake(argv: list[str]) -> int:
        name = by_argv[tuple(_cosmetic(argv))]
        with lock:
            log.append(("start", name))
        time.sleep(0.05)
        with lock:
            log.append(("end", name))
        return 0

    layers = ("harvest_10_17", "train_10_17_a", "train_10_17_b", "export_10_17_a", "export_10_17_b", "eval_10_17")
    cfg = ReproduceConfig(recipe="saes", out=tmp_path / "run", docs=tmp_path / "docs", jobs=2, include=layers, progress=False)
    res = reproduce(cfg, run_command=fake)
    done = {s.name for s in res.stages if s.status == "done"}
    assert done == {s.name for s in recipe.stages if not s.optional} | set(layers)
    assert {s.name for s in res.stages if s.status == "skipped"} == {"export_resid", "export_other", "eval_starter"}
    for st in recipe.stages:
        if st.name in done:
            start = log.index(("start", st.name))
            assert all(log.index(("end", d)) < start for d in _deps(st)), st.name
    assert res.claims == [] and "| claim |" not in (tmp_path / "docs" / "report.md").read_text()
