"""The `detectors` run's files and run directories, with the model work replaced by stand-ins (no model runs)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

import icl_circuits.experiments.detectors as det
from icl_circuits.core.storage import ConfigMismatch
from icl_circuits.data.tasks import Task
from icl_circuits.methods.masses import MASS_TYPES, MassConfig, MassesResult
from icl_circuits.methods.task_vectors import DetectionSweep

from tests.helpers import ANTONYMS, UPPER, detection_sae

LM = SimpleNamespace(name="fake", d_model=8)


def _roles(seed: int = 0) -> dict:
    sae = detection_sae(LM, 0, seed=seed)
    return {"executor": (sae, {"ant": [1, 2], "upper": [3]}), "detector": (sae, {"ant": [4]})}


@pytest.fixture
def calls(monkeypatch) -> list[str]:
    """activation_masses replaced by one row per (task, role with features); the tasks it was asked for."""
    seen: list[str] = []

    def fake(lm, tasks, roles, cfg, progress=True):
        seen.extend(t.name for t in tasks)
        return [dict(task=t.name, role=role, n_features=len(sets[t.name]), total_mass=1.0, **{m: 1 / len(MASS_TYPES) for m in MASS_TYPES})
                for t in tasks for role, (_, sets) in roles.items() if sets.get(t.name)]  # fmt: skip

    monkeypatch.setattr(det, "activation_masses", fake)
    return seen


TASKS = [Task("ant", tuple(ANTONYMS)), Task("upper", tuple(UPPER))]


def test_masses_resume_and_write_a_stamped_masses_json(tmp_path, calls):
    first = det.run_masses(LM, TASKS, _roles(), MassConfig(n_prompts=2), tmp_path, progress=False)
    assert [(r["task"], r["role"]) for r in first.rows] == [("ant", "executor"), ("ant", "detector"), ("upper", "executor")]
    saved = json.loads((tmp_path / "masses.json").read_text())
    assert saved["schema"] == "masses/1" and MassesResult.from_dict(saved) == first
    assert first.model == "fake" and first.config == MassConfig(n_prompts=2).to_dict()
    again = det.run_masses(LM, TASKS, _roles(), MassConfig(n_prompts=2), tmp_path, progress=False)
    assert again == first and calls == ["ant", "upper"]  # the second run computed nothing
    roles = _roles()
    roles["detector"][1]["upper"] = [5]  # another feature set for one task: only that task again
    det.run_masses(LM, TASKS, roles, MassConfig(n_prompts=2), tmp_path, progress=False)
    assert calls == ["ant", "upper", "upper"]


@pytest.mark.parametrize("change", ["config", "sae", "model"])
def test_a_second_masses_run_with_other_settings_is_refused(tmp_path, calls, change):
    det.run_masses(LM, TASKS, _roles(), MassConfig(n_prompts=2), tmp_path, progress=False)
    before = (tmp_path / "masses.json").read_bytes()
    lm, roles, cfg = LM, _roles(), MassConfig(n_prompts=2)
    if change == "config":
        cfg, diff = MassConfig(n_prompts=4), r"config.n_prompts: 2 -> 4"
    elif change == "sae":
        roles, diff = _roles(seed=1), r"saes.detector: "
    else:
        lm, diff = SimpleNamespace(name="other", d_model=8), r'model: "fake" -> "other"'
    with pytest.raises(ConfigMismatch, match=rf"{tmp_path} holds a run made with other settings \(.*{diff}.*use another --out"):
        det.run_masses(lm, TASKS, roles, cfg, tmp_path, progress=False)
    assert (tmp_path / "masses.json").read_bytes() == before and calls == ["ant", "upper"]  # nothing was touched


def test_detection_sweep_writes_a_stamped_detection_sweep(tmp_path, monkeypatch):
    monkeypatch.setattr(det, "detection_sweep_task", lambda lm, t, layers, cfg: [dict(task=t.name, layer=l, relative_loss_decrease=0.1 * l)
                                                                               for l in layers])  # fmt: skip
    monkeypatch.setattr(det, "plot_detection_sweep", lambda *a, **k: [])
    summary = det.run_detectors(LM, ["sweep"], tmp_path, tmp_path / "f", tasks=["antonyms"], sweep_layers=[0, 2], progress=False)
    d = json.loads((tmp_path / "detection_sweep.json").read_text())
    sweep = DetectionSweep.from_dict(d, "detection_sweep.json")
    assert d["schema"] == "detection_sweep/1" and sweep.rows == summary["sweep"] and (sweep.layers, sweep.model) == ([0, 2], "fake")
