"""Issue 18, 'silently wrong': finished work keyed by content, one writer per run, no resume under
another config, torn log lines never glued to the next record, no stale state after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from icl_circuits.methods.task_vectors import TaskVectorConfig
from icl_circuits.data.tasks import Task

from ..helpers import ANTONYMS, UPPER, pair_lm

CFG = TaskVectorConfig(n_prompts=2, n_shots=2, n_eval=4, batch_size=2)
ROOT = Path(__file__).resolve().parents[2]


def _counting(monkeypatch, module, name):
    calls: list[str] = []
    real = getattr(module, name)

    def wrapped(*a, **k):
        calls.append(next(x.name for x in a if isinstance(x, Task)))
        return real(*a, **k)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def test_sweep_resume_is_keyed_by_task_content_not_name(tmp_path, monkeypatch):
    """Issue 18 #1: a user file that shares a finished task's name gets its own results, never the old ones."""
    from icl_circuits.experiments import task_vectors as sweep_mod

    lm = pair_lm()
    first = sweep_mod.run_layer_sweep(lm, [Task("ant", tuple(ANTONYMS))], [0, 1], CFG, tmp_path, progress=False)
    calls = _counting(monkeypatch, sweep_mod, "sweep_task")
    other = Task("ant", tuple(UPPER))  # same name, other pairs
    second = sweep_mod.run_layer_sweep(lm, [other], [0, 1], CFG, tmp_path, progress=False)
    assert calls == ["ant"]
    calls.clear()
    fresh = sweep_mod.run_layer_sweep(lm, [other], [0, 1], CFG, tmp_path / "fresh", progress=False)
    calls.clear()
    assert json.dumps(second.rows) == json.dumps(fresh.rows) != json.dumps(first.rows)
    # and the original content is still recognised as finished
    sweep_mod.run_layer_sweep(lm, [Task("ant", tuple(ANTONYMS))], [0, 1], CFG, tmp_path, progress=False)
    assert calls == []


def test_cleaning_resume_is_keyed_by_task_content_not_name(tmp_path, monkeypatch):
    import icl_circuits.experiments.clean as runs
    from icl_circuits.methods.cleaning import CleaningConfig
    from icl_circuits.experiments.clean import task_of_result

    from ..helpers import MANY, pair_lm, unit_sae

    lm, sae = pair_lm(), None
    sae = unit_sae(lm, scale=3.0)
    cfg = CleaningConfig(n_train=4, n_eval=4, max_steps=4, patience=2)
    tv = TaskVectorConfig(n_prompts=2, n_shots=3)
    runs.run_cleaning(lm, sae, [Task("many", tuple(MANY))], 1, tmp_path, cfg, tv, sae_spec="s", progress=False)
    calls = _counting(monkeypatch, runs, "clean_task")
    flipped = Task("many", tuple((y, x) for x, y in MANY))
    (r,), _ = runs.run_cleaning(lm, sae, [flipped], 1, tmp_path, cfg, tv, sae_spec="s", progress=False)
    assert calls == ["many"]
    assert task_of_result(tmp_path / "many", "many") == flipped  # later steps see the task that was cleaned
    runs.run_cleaning(lm, sae, [flipped], 1, tmp_path, cfg, tv, sae_spec="s", progress=False)
    assert calls == ["many"]


def test_builtin_name_collision_keeps_the_users_pairs(tmp_path, monkeypatch):
    """A user file named like a built-in task (antonyms.json): its folder must say which pairs it holds."""
    import icl_circuits.experiments.clean as runs
    from icl_circuits.methods.cleaning import CleaningConfig
    from icl_circuits.experiments.clean import task_of_result

    from ..helpers import MANY, pair_lm, unit_sae

    lm = pair_lm()
    user = Task("antonyms", tuple(MANY))
    monkeypatch.setattr(runs, "clean_task", lambda *a, **k: _fake_result(a[2]))
    monkeypatch.setattr("icl_circuits.viz.plots.plot_cleaning_curves", lambda *a, **k: [])
    runs.run_cleaning(lm, unit_sae(lm), [user], 1, tmp_path, CleaningConfig(n_train=4, n_eval=4), progress=False)
    assert task_of_result(tmp_path / "antonyms", "antonyms") == user


def _fake_result(task):
    import torch

    from icl_circuits.methods.cleaning import CleaningConfig, CleaningResult

    return CleaningResult(task=task.name, layer=1, setting="execution", sae_spec="", config=CleaningConfig(n_train=4, n_eval=4).to_dict(),
                          weights=torch.zeros(4), initial_weights=torch.zeros(4), vector=torch.zeros(4), l0_history=[], train_loss=[], eval_loss=[], steps=0,
                          stopped="max_steps", seconds=0.0, scores={"tvc": {"relative_loss_decrease": 0.0}})  # fmt: skip


def test_circuits_resume_is_keyed_by_task_content_not_name(tmp_path, monkeypatch):
    import icl_circuits.experiments.circuits as ab
    from icl_circuits.experiments.circuits import run_circuits
    from icl_circuits.methods.circuits import CircuitConfig, CircuitRunConfig

    from ..helpers import PAIRS, setup, tiny_saes, toy_batch, toy_task

    lm, _, _, _ = setup()
    lm.tokenizer = toy_batch()[1]
    saes = tiny_saes(lm, (0, 1))
    rc = CircuitRunConfig(circuit=CircuitConfig(layers=(0, 1)), n_prompts=2, n_shots=3, sizes=(0, 2), edge_k=1, ie_quality_per_sae=0)
    run_circuits(lm, [toy_task("a", PAIRS)], rc, tmp_path, saes=saes, cross_task=False, progress=False)
    calls = _counting(monkeypatch, ab, "run_circuit_task")
    res = run_circuits(lm, [toy_task("a", list(reversed(PAIRS)))], rc, tmp_path, saes=saes, cross_task=False, progress=False)
    assert calls == ["a"] and len(res["summaries"]) == 1


def test_resume_under_another_config_is_refused_naming_the_keys(tmp_path):
    """Issue 18 #2: run A (--layers 0) then B (--layers 1) into one folder must not mix; B is refused."""
    from icl_circuits.experiments.task_vectors import run_layer_sweep

    lm = pair_lm()
    tasks = [Task("ant", tuple(ANTONYMS))]
    run_layer_sweep(lm, tasks, [0], CFG, tmp_path, progress=False)
    before = (tmp_path / "sweep.json").read_bytes()
    with pytest.raises(ValueError, match=r"other settings .*layers: \[0\] -> \[1\]"):
        run_layer_sweep(lm, tasks, [1], CFG, tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"config.n_shots: 2 -> 3"):
        run_layer_sweep(lm, tasks, [0], TaskVectorConfig(n_prompts=2, n_shots=3, n_eval=4, batch_size=2), tmp_path, progress=False)
    assert (tmp_path / "sweep.json").read_bytes() == before  # nothing was touched


def test_resume_under_another_config_is_refused_on_the_cli(tmp_path, capsys):
    from icl_circuits.cli import main

    from ..helpers import MANY, one_line_error, saved_model, write_task

    _, model = saved_model(tmp_path)
    task = write_task(tmp_path / "many.json", MANY)
    args = ["task-vectors", "--model", str(model), "--tasks", task, "--n-prompts", "2", "--n-shots", "2", "--n-eval", "4",
            "--out", str(tmp_path / "R"), "--quiet"]  # fmt: skip
    assert main([*args, "--layers", "0"]) == 0
    capsys.readouterr()
    assert main([*args, "--layers", "1"]) == 2
    err = one_line_error(capsys)
    assert str(tmp_path / "R") in err and "layers: [0] -> [1]" in err


def test_detection_sweep_resume_refuses_other_layers(tmp_path, monkeypatch):
    import icl_circuits.experiments.detectors as det

    calls = []
    monkeypatch.setattr(det, "detection_sweep_task", lambda lm, t, layers, cfg: calls.append(t.name) or
                        [dict(task=t.name, layer=l, relative_loss_decrease=0.1 * l) for l in layers])  # fmt: skip
    monkeypatch.setattr(det, "plot_detection_sweep", lambda *a, **k: [])

    class LM:
        name = "fake"

    det.run_detectors(LM(), ["sweep"], tmp_path, tmp_path / "f", tasks=["antonyms"], sweep_layers=[0], progress=False)
    with pytest.raises(ValueError, match=r"layers: \[0\] -> \[1\]"):
        det.run_detectors(LM(), ["sweep"], tmp_path, tmp_path / "f", tasks=["antonyms"], sweep_layers=[1], progress=False)
    assert calls == ["antonyms"]


def test_torn_log_line_is_never_glued_to_the_next_record(tmp_path):
    """Issue 18 'loose ends': a crash mid-append leaves a torn last line; the next append must not join it."""
    from icl_circuits.core.storage import AppendLog

    path = tmp_path / "partial.jsonl"
    log = AppendLog(path, {"v": 1})
    log.add("a", [1])
    with path.open("a") as f:
        f.write('{"key": "b", "val')  # killed mid-write
    log = AppendLog(path, {"v": 1})
    assert set(log.done) == {"a"}
    log.add("b", [2])
    log.add("c", [3])
    assert AppendLog(path, {"v": 1}).done == {"a": [1], "b": [2], "c": [3]}
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_torn_line_task_is_redone_once_not_on_every_rerun(tmp_path, monkeypatch):
    from icl_circuits.experiments import task_vectors as sweep_mod

    lm = pair_lm()
    tasks = [Task("ant", tuple(ANTONYMS)), Task("upper", tuple(UPPER))]
    first = sweep_mod.run_layer_sweep(lm, tasks, [0], CFG, tmp_path, progress=False)
    path = tmp_path / "partial.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:25])  # the last task's record torn
    calls = _counting(monkeypatch, sweep_mod, "sweep_task")
    sweep_mod.run_layer_sweep(lm, tasks, [0], CFG, tmp_path, progress=False)
    again = sweep_mod.run_layer_sweep(lm, tasks, [0], CFG, tmp_path, progress=False)
    assert calls == ["upper"]
    assert json.dumps(again.rows) == json.dumps(first.rows)


_WRITER = """
import sys, time
import torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
from tests.helpers import pair_lm, ANTONYMS
from icl_circuits.experiments import task_vectors as sweep
from icl_circuits.methods.task_vectors import TaskVectorConfig
from icl_circuits.data.tasks import Task
real = sweep.sweep_task
def slow(*a):
    print("started", flush=True)  # the test waits for this line
    time.sleep(120)
    return real(*a)
sweep.sweep_task = slow
sweep.run_layer_sweep(pair_lm(), [Task("ant", tuple(ANTONYMS))], [0], TaskVectorConfig(n_prompts=2, n_shots=2, n_eval=4, batch_size=2),
                      {out!r}, progress=False)
"""


def test_second_writer_is_refused_and_a_killed_writer_leaves_no_stale_lock(tmp_path):
    """Issue 18 #2: one writer per run directory; kill -9 of that writer frees the folder at once."""
    from icl_circuits.experiments.task_vectors import run_layer_sweep

    out = tmp_path / "R"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _WRITER.format(root=str(ROOT), out=str(out))], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        # blocks until the writer holds the folder; an empty line means it died first
        assert proc.stdout.readline().strip() == b"started", proc.stderr.read().decode()[-2000:]
        lm = pair_lm()
        tasks = [Task("ant", tuple(ANTONYMS))]
        with pytest.raises(ValueError, match=r"in use by another run \(pid \d+"):
            run_layer_sweep(lm, tasks, [0], CFG, out, progress=False)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    res = run_layer_sweep(lm, tasks, [0], CFG, out, progress=False)  # the kill freed the lock
    fresh = run_layer_sweep(lm, tasks, [0], CFG, tmp_path / "fresh", progress=False)
    assert json.dumps(res.rows) == json.dumps(fresh.rows)


def test_a_killed_atomic_write_leaves_no_temp_file_once_the_folder_is_reopened(tmp_path):
    """kill -9 between mkstemp and the rename leaves NAME.XXXXXXXX.tmp; the next RunDir on the folder removes it."""
    from icl_circuits.core.storage import RunDir

    with RunDir(tmp_path, {"a": 1}, kind="probe"):
        pass
    (tmp_path / "run.json.k1ll3d.tmp").write_bytes(b"half a file")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "cleaning.json.x9.tmp").write_bytes(b"")
    (tmp_path / "notes.tmp").write_text("a user's own file, not one of ours")
    with RunDir(tmp_path, {"a": 1}, kind="probe"):
        pass
    assert sorted(p.name for p in tmp_path.rglob("*.tmp")) == ["notes.tmp"]
