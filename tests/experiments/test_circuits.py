"""The circuits experiment over tasks: files, figures and resume (RunDir) on a tiny random model."""

from __future__ import annotations

import json

import pytest

from icl_circuits.experiments.circuits import run_circuits
from icl_circuits.methods.circuits import CircuitConfig, CircuitRunConfig

from tests.helpers import PAIRS, setup, tiny_saes, toy_batch, toy_task


@pytest.mark.device_audit  # no stray CPU tensors in the whole command (tests/test_device.py)
def test_run_circuits_end_to_end_with_resume(tmp_path, monkeypatch):
    import icl_circuits.experiments.circuits as ab

    lm, cfg, _, _ = setup()
    lm.tokenizer = toy_batch()[1]
    saes = tiny_saes(lm, (0, 1))
    tasks = [toy_task("a", PAIRS), toy_task("b", list(reversed(PAIRS)))]
    rc = CircuitRunConfig(circuit=CircuitConfig(layers=(0, 1)), n_prompts=2, n_shots=3, sizes=(0, 2, 10), edge_k=1, ie_quality_per_sae=2,
                          other_errors_curve=True)
    res = run_circuits(lm, tasks, rc, tmp_path, saes=saes, progress=False)
    assert len(res["summaries"]) == 2
    for name in ("faithfulness.png", "faithfulness_errors_ablated.png", "ie_quality.png", "cross_task.png", "summary.csv", "a/graph.json",
                 "a/graph.png", "b/summary.json", "b/faithfulness_errors_ablated.json", "cross_task_errors_ablated.png"):
        assert (tmp_path / name).is_file(), name
    main = json.loads((tmp_path / "a" / "faithfulness.json").read_text())
    assert main["keep_errors"] and main["rank_by"] == "signed" and set(main["n_error_nodes"]) == {0}
    monkeypatch.setattr(ab, "run_circuit_task", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed a finished task")))
    again = run_circuits(lm, tasks, rc, tmp_path, saes=saes, progress=False)
    assert [s["task"] for s in again["summaries"]] == ["a", "b"]


def _small_run(**kw):
    """(lm, saes, config) of a cheap run: one IE batch of 2 prompts, no IE quality."""
    lm, _, _, _ = setup()
    lm.tokenizer = toy_batch()[1]
    rc = CircuitRunConfig(circuit=CircuitConfig(layers=(0, 1)), n_prompts=2, n_shots=3, sizes=(0, 2), edge_k=1, ie_quality_per_sae=0, **kw)
    return lm, tiny_saes(lm, (0, 1)), rc


def test_resume_under_another_config_or_other_saes_is_refused_and_touches_nothing(tmp_path):
    from icl_circuits.core.storage import ConfigMismatch

    lm, saes, rc = _small_run()
    tasks = [toy_task("a", PAIRS)]
    run_circuits(lm, tasks, rc, tmp_path, saes=saes, cross_task=False, progress=False)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file() and not p.name.startswith("."))
    before = {p: p.read_bytes() for p in files}
    other = CircuitRunConfig(**{**rc.__dict__, "sizes": (0, 3)})
    with pytest.raises(ConfigMismatch, match=r"other settings .*config\.sizes: \[0, 2\] -> \[0, 3\]"):
        run_circuits(lm, tasks, other, tmp_path, saes=saes, cross_task=False, progress=False)
    with pytest.raises(ConfigMismatch, match=r"other settings .*saes\.resid\.0"):
        run_circuits(lm, tasks, rc, tmp_path, saes=tiny_saes(lm, (0, 1), seed=1), cross_task=False, progress=False)
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file() and not p.name.startswith(".")) == files
    assert all(p.read_bytes() == b for p, b in before.items())  # config.json, summaries, results: untouched


def test_cross_task_of_another_task_list_is_not_reused(tmp_path, monkeypatch):
    """Every task is finished on the second run, but the saved cross-task ablation covers other tasks: redone."""
    import icl_circuits.experiments.circuits as ec

    lm, saes, rc = _small_run()
    a, b = toy_task("a", PAIRS), toy_task("b", list(reversed(PAIRS)))
    run_circuits(lm, [a, b], rc, tmp_path, saes=saes, progress=False)
    assert json.loads((tmp_path / "cross_task.json").read_text())["tasks"] == ["a", "b"]
    monkeypatch.setattr(ec, "run_circuit_task", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed a finished task")))
    run_circuits(lm, [b, a], rc, tmp_path, saes=saes, progress=False)
    assert json.loads((tmp_path / "cross_task.json").read_text())["tasks"] == ["b", "a"]
    calls = []
    monkeypatch.setattr(ec, "cross_task_ablation", lambda *a, **k: calls.append(1))
    run_circuits(lm, [b, a], rc, tmp_path, saes=saes, progress=False)
    assert not calls  # the same task list: the saved result is reused
