"""The CLI end to end on a tiny model saved to a local folder (exercises load_model on a folder too)."""

from __future__ import annotations

import json

import pytest

from icl_circuits.cli import main, parse_layers

from .conftest import make_tiny, word_tokenizer
from .test_task_vectors import ANTONYMS


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


def test_task_vectors_command_on_local_folder(tmp_path, capsys):
    lm, _ = make_tiny("llama")
    words = ["Follow", "the", "pattern:", "->"] + [w for p in ANTONYMS for w in p]
    model_dir = tmp_path / "tiny"
    lm.model.save_pretrained(model_dir)
    word_tokenizer(words).save_pretrained(model_dir)
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
