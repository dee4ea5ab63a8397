"""The CLI end to end on a tiny model saved to a local folder (exercises load_model on a folder too)."""

from __future__ import annotations

import json

import pytest

from icl_circuits.cli import main, parse_layers

from tests.helpers import ANTONYMS, make_tiny, word_tokenizer


def _saved(model, tokenizer, folder):
    """Save a tiny model and its tokenizer where load_model reads a local folder; returns the folder."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_parse_layers():
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("1,3-5", 8) == [1, 3, 4, 5]
    with pytest.raises(SystemExit, match="outside"):
        parse_layers("2-9", 4)
    with pytest.raises(SystemExit, match="bad --layers"):
        parse_layers("x", 4)


def test_tasks_command_lists_all_23(capsys):
    assert main(["tasks"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 23 and lines[6].startswith("country_capital")


def test_unknown_task_fails_fast(capsys):
    assert main(["task-vectors", "--tasks", "no_such_task", "--model", "/nonexistent"]) == 2
    assert "neither a built-in task" in capsys.readouterr().err


@pytest.mark.device_audit  # no stray CPU tensors in the whole command (tests/test_device.py)
def test_task_vectors_command_on_local_folder(tmp_path, capsys):
    lm, _ = make_tiny("llama")
    words = ["Follow", "the", "pattern:", "->"] + [w for p in ANTONYMS for w in p]
    model_dir = _saved(lm.model, word_tokenizer(words), tmp_path / "tiny")
    task_file = tmp_path / "ant.json"
    task_file.write_text(json.dumps(dict(ANTONYMS)))
    out = tmp_path / "run"
    args = ["task-vectors", "--model", str(model_dir), "--tasks", str(task_file), "--layers", "0-1",
            "--n-prompts", "2", "--n-shots", "2", "--n-eval", "4", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "ant" in printed and "mean" in printed
    result = json.loads((out / "sweep.json").read_text())
    assert [r["layer"] for r in result["rows"]] == [0, 1]
    assert (out / "layer_sweep.png").stat().st_size > 1000


@pytest.mark.device_audit  # no stray CPU tensors in the whole command (tests/test_device.py)
def test_sae_train_and_eval_commands(tmp_path, capsys):
    import random

    lm, _ = make_tiny("llama")
    words = [f"w{i}" for i in range(50)]
    model_dir = _saved(lm.model, word_tokenizer(words), tmp_path / "tiny")
    rng = random.Random(0)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(30))}) + "\n" for _ in range(30)))
    out = tmp_path / "saes"
    args = ["sae", "train", "--model", str(model_dir), "--saes", "resid:1,transcoder:0", "--corpus", str(corpus),
            "--out", str(out), "--d-sae", "16", "--tokens", "400", "--batch-tokens", "64", "--seq-len", "16",
            "--eval-docs", "4", "--param-dtype", "float32", "--quiet"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "resid_pre.1" in printed and "resid_mid.0" in printed and "CE rec." in printed
    evals = json.loads((out / "eval.json").read_text())
    assert {e["site"] for e in evals} == {"resid_pre.1", "resid_mid.0"} and all(e["n_tokens"] > 0 for e in evals)
    assert (out / "training_curves.png").stat().st_size > 1000
    assert main(["sae", "eval", "--model", str(model_dir), "--sae", str(out / "saelens" / "resid_1"), "--corpus", str(corpus),
                 "--eval-docs", "4", "--seq-len", "16", "--out", str(tmp_path / "e.json"), "--quiet"]) == 0  # fmt: skip
    again = json.loads((tmp_path / "e.json").read_text())[0]
    first = next(e for e in evals if e["site"] == "resid_pre.1")
    assert again["ce_spliced"] == first["ce_spliced"] and again["l0"] == first["l0"]  # SAELens export = our SAE
    assert main(["sae", "train", "--saes", "mlp:3", "--model", "/nonexistent"]) == 2


@pytest.mark.device_audit  # no stray CPU tensors in the whole command (tests/test_device.py)
def test_clean_command_on_local_folder(tmp_path, capsys):
    from icl_circuits.sae.formats import save_sae

    from tests.helpers import MANY, pair_lm, unit_sae

    lm = pair_lm("llama")
    model_dir = _saved(lm.model, lm.tokenizer, tmp_path / "tiny")
    sae = unit_sae(lm, layer=1, scale=3.0)
    sae.cfg.model = str(model_dir)  # the name load_model gives a folder
    save_sae(sae, tmp_path / "sae")
    task_file = tmp_path / "many.json"
    task_file.write_text(json.dumps(dict(MANY)))
    out = tmp_path / "run"
    args = ["clean", "--model", str(model_dir), "--task", str(task_file), "--layer", "1", "--sae", str(tmp_path / "sae"),
            "--n-prompts", "2", "--n-shots", "3", "--n-train", "4", "--n-eval", "4", "--max-steps", "6", "--patience", "3",
            "--out", str(out), "--quiet"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "many (execution, layer 1): L0" in printed and "relative loss decrease: tv" in printed and "feature" in printed
    summary = json.loads((out / "many" / "cleaning.json").read_text())
    assert summary["config"]["max_steps"] == 6 and set(summary["scores"]) >= {"tv", "sae_reconstruction", "ito_5", "ito_20", "tvc"}
    assert (out / "summary.png").is_file() and (out / "summary.csv").is_file() and (out / "report.html").is_file()
    # a λ sweep on the same task, and an SAE that reads another layer is refused with a clear message
    assert main([*args[:-3], "--sweep-l1", "0.001,0.1", "--out", str(tmp_path / "sweep"), "--quiet"]) == 0
    assert (tmp_path / "sweep" / "l1_sweep.png").is_file()
    assert main([*args[:6], "0", *args[7:]]) == 2
    assert "resid_pre.0" in capsys.readouterr().err


@pytest.mark.device_audit  # no stray CPU tensors in the whole command (tests/test_device.py)
def test_heatmap_and_detectors_commands_on_local_folder(tmp_path, capsys):
    """clean (execution at layer 1, detection at layer 0) -> heatmap (+ negative on one feature) -> detectors."""
    from icl_circuits.methods.masses import MASS_TYPES, MassesResult
    from icl_circuits.sae.formats import save_sae

    from tests.helpers import MANY, pair_lm, unit_sae

    lm = pair_lm("llama")
    model_dir = _saved(lm.model, lm.tokenizer, tmp_path / "tiny")
    for layer in (0, 1):
        sae = unit_sae(lm, layer=layer, scale=3.0, seed=layer)
        sae.cfg.model = str(model_dir)
        save_sae(sae, tmp_path / f"sae{layer}")
    tasks = []
    for name, pairs in (("many", MANY), ("flipped", [(y, x) for x, y in MANY])):
        (tmp_path / f"{name}.json").write_text(json.dumps(dict(pairs)))
        tasks.append(str(tmp_path / f"{name}.json"))
    common = ["--model", str(model_dir), "--tasks", ",".join(tasks), "--n-prompts", "2", "--n-shots", "3", "--n-train", "4",
              "--n-eval", "4", "--max-steps", "4", "--patience", "2", "--l1", "1e-4", "--quiet"]  # fmt: skip
    for setting, layer in (("execution", 1), ("detection", 0)):
        assert main(["clean", *common, "--setting", setting, "--layer", str(layer), "--sae", str(tmp_path / f"sae{layer}"),
                     "--out", str(tmp_path / setting)]) == 0  # fmt: skip
    capsys.readouterr()
    figs = tmp_path / "figs"
    hm = ["heatmap", "--model", str(model_dir), "--n-eval", "4", "--scale-grid", "1,4", "--figures", str(figs), "--quiet"]
    exec_feats = [f["index"] for f in json.loads((tmp_path / "execution" / "many" / "cleaning.json").read_text())["features"]]
    assert exec_feats, "the planted SAE keeps features at this λ"
    assert main([*hm, "--results", str(tmp_path / "execution"), "--out", str(tmp_path / "hm_exec"), "--negative",
                 "--negative-prompts", "2", "--negative-shots", "3", "--negative-scales", "1,8",
                 "--negative-features", str(exec_feats[0])]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "top feature" in printed and "report:" in printed
    heat = json.loads((tmp_path / "hm_exec" / "heatmap.json").read_text())
    assert heat["tasks"] == ["flipped", "many"] and len(heat["raw"]) == 2
    neg = json.loads((tmp_path / "hm_exec" / "negative.json").read_text())
    assert neg["features"] == [exec_feats[0]] and neg["scales"][0] in (1.0, 8.0)  # only the chosen feature was subtracted
    assert (figs / "execution_negative.png").stat().st_size > 1000 and (figs / "execution_raw.png").is_file()
    assert main([*hm, "--results", str(tmp_path / "detection"), "--top-only", "--out", str(tmp_path / "hm_det")]) == 0
    assert main(["detectors", "--model", str(model_dir), "--steps", "masses,link", "--executors", str(tmp_path / "execution"),
                 "--detectors", str(tmp_path / "detection"), "--exec-heatmap", str(tmp_path / "hm_exec" / "heatmap.json"),
                 "--det-heatmap", str(tmp_path / "hm_det" / "heatmap.json"), "--n-prompts", "2", "--n-shots", "3",
                 "--out", str(tmp_path / "det"), "--figures", str(figs), "--quiet"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "token-type activation masses" in printed and "detector task" in printed
    rows = [r for r in MassesResult.from_dict(json.loads((tmp_path / "det" / "masses.json").read_text())).rows if r["total_mass"] > 0]
    assert rows and all(abs(sum(r[t] for t in MASS_TYPES) - 1) < 1e-6 for r in rows)
    link = json.loads((tmp_path / "det" / "link.json").read_text())
    assert (figs / "detector_executor_link.png").is_file() and len(link["drop"]) == len(link["detector_tasks"])
    # a feature outside every cleaned vector is refused before any slow work
    assert main([*hm, "--results", str(tmp_path / "execution"), "--out", str(tmp_path / "hm_bad"), "--negative",
                 "--negative-features", "100000"]) == 2  # fmt: skip
    assert "in no task's cleaned vector" in capsys.readouterr().err


def test_default_layers_are_the_bundled_models_sweep_results():
    from icl_circuits.cli import default_layer

    assert default_layer("gemma-3-270m", "execution") == 12 and default_layer("gemma-3-270m", "detection") == 6
    with pytest.raises(SystemExit, match="--layer is needed"):
        default_layer("gpt2", "detection")


def test_readme_commands_parse():
    """Every `icl-circuits ...` line of the README's command-line quickstart names a real command and options."""
    import re
    import shlex
    from pathlib import Path

    from icl_circuits.cli import build_parser

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("## Quickstart: command line", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [re.sub(r"\s+#.*$", "", line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    assert len(lines) >= 5 and all(line.startswith("icl-circuits ") for line in lines), lines
    parser = build_parser()
    for line in lines:
        args = parser.parse_args(shlex.split(line)[1:])  # SystemExit (the test fails) on an unknown option
        assert args.func is not None, line
