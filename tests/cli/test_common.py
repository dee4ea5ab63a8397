"""One CLI grammar: --layers, --sae, the shared run options and --config on every command; old command
lines parse to the same namespace as their new spelling (reproduce compares recorded command lines so)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from icl_circuits.cli import build_parser, main

OLD_NEW = [
    (["clean", "--task", "antonyms", "--layer", "12"], ["clean", "--task", "antonyms", "--layers", "12"]),
    (["clean", "--task", "antonyms", "--compare-layers", "6,10"], ["clean", "--task", "antonyms", "--layers", "6,10"]),
    (["detectors", "--sweep-layers", "4-16"], ["detectors", "--layers", "4-16"]),
    (["detectors"], ["detectors", "--layers", "4-16"]),  # the default is the same
    (["sae", "train", "--saes", "resid:1,attn:1"], ["sae", "train", "--sae", "resid:1", "--sae", "attn:1"]),
    (["sae", "harvest", "--saes", "resid:1,transcoder:0"], ["sae", "harvest", "--sae", "resid:1,transcoder:0"]),
    (["examples", "--saes", "mine=a/b,resid:2"], ["examples", "--sae", "mine=a/b", "--sae", "resid:2"]),
    (["dashboards", "--saes", "resid:12"], ["dashboards"]),
    (["clean", "--task", "antonyms", "--sae", "starter"], ["clean", "--task", "antonyms"]),
]


def parsed(argv: list[str]) -> dict:
    return vars(build_parser().parse_args(argv))


@pytest.mark.parametrize("old, new", OLD_NEW, ids=lambda a: " ".join(a))
def test_old_command_lines_parse_to_the_same_namespace(old, new):
    assert parsed(old) == parsed(new)


def test_defaults_are_unchanged():
    assert parsed(["clean", "--task", "t"])["layers"] is None and parsed(["clean", "--task", "t"])["sae"] == "starter"
    assert parsed(["task-vectors"])["layers"] == "all" and parsed(["circuit"])["layers"] == "11-12"
    assert parsed(["circuit"])["sae"] is None and parsed(["sae", "eval"])["sae"] is None
    assert parsed(["sae", "train"])["saes"] == "resid:12" == parsed(["examples"])["saes"]
    assert parsed(["sae", "compare", "--cache", "c"])["sae"] == "resid:12"
    assert parsed(["circuit", "--sae", "resid.0=a", "--saes", "resid.1=b"])["sae"] == ["resid.0=a", "resid.1=b"]


def test_a_one_layer_comparison_stays_a_comparison():
    assert parsed(["clean", "--task", "t", "--compare-layers", "12"])["layers"] == "12-12"


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    out = {}
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, sub in (subs[0].choices.items() if subs else []):
        out.update(_commands(sub, (*prefix, name)))
    return out or {prefix: parser}


NO_MODEL = {("tasks",), ("view",), ("sae", "export")}


def test_every_model_command_has_the_run_options_and_every_command_config():
    for command, p in _commands(build_parser()).items():
        opts = set(p._option_string_actions)
        assert "--config" in opts, command
        if command not in NO_MODEL:
            assert {"--model", "--device", "--dtype", "--threads", "--seed", "--quiet"} <= opts, command


def test_every_sae_choosing_command_takes_sae():
    for command, p in _commands(build_parser()).items():
        if command in {("sae", "train"), ("sae", "harvest"), ("sae", "compare"), ("sae", "eval"), ("examples",), ("dashboards",),
                       ("clean",), ("circuit",)}:  # fmt: skip
            assert "--sae" in p._option_string_actions, command


def test_config_file_gives_defaults_that_the_command_line_overrides(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('n-prompts = 4\nn_shots = 3\nlayers = [6, 10]\nsae = "resid:6"\nquiet = true\ntasks = ["antonyms", "synonyms"]\n')
    ns = parsed(["clean", "--config", str(cfg)])
    assert (ns["n_prompts"], ns["n_shots"], ns["layers"], ns["sae"], ns["quiet"], ns["tasks"]) == (4, 3, "6,10", "resid:6", True, "antonyms,synonyms")
    ns = parsed(["clean", "--config", str(cfg), "--n-prompts", "8", "--layer", "12", "--task", "antonyms"])
    assert (ns["n_prompts"], ns["layers"], ns["task"], ns["tasks"]) == (8, "12", "antonyms", None)  # --task beats tasks = ...
    assert parsed(["clean", f"--config={cfg}", "--quiet"])["quiet"] is True
    (tmp_path / "v.toml").write_text("port = 9000\n")
    assert parsed(["view", "run", "--config", str(tmp_path / "v.toml")])["port"] == 9000
    (tmp_path / "s.toml").write_text('saes = ["resid:1", "attn:1"]\nout = "runs/x"\n')
    assert parsed(["sae", "train", "--config", str(tmp_path / "s.toml")])["saes"] == "resid:1,attn:1"
    assert parsed(["sae", "train", "--config", str(tmp_path / "s.toml"), "--sae", "resid:2"])["saes"] == "resid:2"
    assert str(parsed(["sae", "train", "--config", str(tmp_path / "s.toml")])["out"]) == "runs/x"
    p = build_parser()  # a parser keeps its own defaults after a parse with --config
    p.parse_args(["clean", "--config", str(cfg)])
    assert p.parse_args(["clean", "--task", "t"]).n_prompts == 16


def _one_error_line(capsys) -> str:
    lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    return lines[0]


@pytest.mark.parametrize("text, says", [
    ("n_promts = 4\n", "unknown option 'n_promts'"),
    ("dtype = 'float8'\n", "dtype = 'float8'"),
    ("n_prompts = 'many'\n", "n_prompts"),
    ("[table]\nx = 1\n", "table"),
    ("not toml at all = = \n", "not valid TOML"),
])  # fmt: skip
def test_a_bad_config_is_one_error_line_and_rc_2(tmp_path, capsys, text, says):
    (tmp_path / "c.toml").write_text(text)
    assert main(["clean", "--task", "antonyms", "--config", str(tmp_path / "c.toml")]) == 2
    assert says in _one_error_line(capsys)


def test_missing_config_and_bad_options_are_one_line_rc_2(tmp_path, capsys):
    assert main(["clean", "--task", "antonyms", "--config", str(tmp_path / "none.toml")]) == 2
    assert "none.toml" in _one_error_line(capsys)
    assert main(["clean"]) == 2  # argparse's own errors too
    assert "--task" in _one_error_line(capsys)
    assert main(["circuit", "--dtype", "float64"]) == 2
    assert "invalid choice" in _one_error_line(capsys)
    assert main(["sae", "train", "--sae", "mlp:3", "--model", "/nonexistent"]) == 2
    assert "KIND:LAYER" in _one_error_line(capsys)
    assert main(["clean", "--task", "antonyms", "--layers", "x", "--model", "/nonexistent"]) == 2
    assert "bad --layers" in _one_error_line(capsys)
    assert main(["clean", "--task", "antonyms", "--sae", "attn:12", "--model", "/nonexistent"]) == 2
    assert "resid SAE" in _one_error_line(capsys)


def test_reproduce_still_finds_the_old_option_names():
    from icl_circuits.experiments.recipe import command_options, same_command

    assert {"--sweep-layers", "--layers", "--seed"} <= command_options("detectors")  # type: ignore[operator]
    assert {"--compare-layers", "--layer", "--layers"} <= command_options("clean")  # type: ignore[operator]
    assert same_command(["detectors", "--sweep-layers", "4-16"], ["detectors", "--layers", "4-16", "--seed", "0"])


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "icl_circuits.cli", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("icl-circuits ")
