"""Issue 18: a full disk is a clear one-line error naming the file, and leaves no partial file behind."""

from __future__ import annotations

import errno
import json

import pytest

from icl_circuits.cli import main

from ..helpers import MANY, one_line_error, saved_model, write_task


def test_atomic_write_on_a_full_disk_names_the_file_and_leaves_nothing(tmp_path, disk_full):
    from icl_circuits.core.storage import write_json

    target = tmp_path / "sweep.json"
    target.write_text('{"old": true}\n')
    disk_full(allow=10)
    with pytest.raises(OSError, match=rf"cannot write {target}: disk full") as err:
        write_json(target, {"rows": list(range(1000))})
    assert err.value.errno == errno.ENOSPC
    assert target.read_text() == '{"old": true}\n'  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.json"]  # no *.tmp left


def test_append_on_a_full_disk_rolls_back_the_partial_record(tmp_path, disk_full):
    from icl_circuits.core.storage import AppendLog  # the log every resumable command appends to

    path = tmp_path / "partial.jsonl"
    log = AppendLog(path, {"run": 1})
    log.add("a", [1])
    before = path.read_bytes()
    budget = disk_full(allow=7)  # the next record gets 7 bytes in, then the disk is full
    with pytest.raises(OSError, match=rf"cannot write {path}: disk full"):
        log.add("b", [2] * 100)
    assert path.read_bytes() == before
    budget["left"] = 10**12
    log.add("c", [3])
    assert AppendLog(path, {"run": 1}).done == {"a": [1], "c": [3]}


def test_disk_full_during_a_run_is_rc2_one_line_and_the_rerun_completes(tmp_path, disk_full, capsys):
    _, model = saved_model(tmp_path)
    task = write_task(tmp_path / "many.json", MANY)
    out = tmp_path / "R"
    args = ["task-vectors", "--model", str(model), "--tasks", task, "--layers", "0-1", "--n-prompts", "2", "--n-shots", "2",
            "--n-eval", "4", "--out", str(out), "--quiet"]  # fmt: skip
    budget = disk_full(allow=1500)
    assert main(args) == 2
    err = one_line_error(capsys)
    assert "disk full" in err and str(out) in err
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    budget["left"] = 10**12
    assert main(args) == 0
    assert main([*args[:-3], "--out", str(tmp_path / "fresh"), "--quiet"]) == 0
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert rows == json.loads((tmp_path / "fresh" / "sweep.json").read_text())["rows"]
