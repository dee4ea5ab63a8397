"""Task vectors and zero-shot steering on a tiny model, against direct transformers computations."""

from __future__ import annotations

import json

import pytest
import torch

from icl_circuits import Task, icl_prompts, zero_shot_prompts
from icl_circuits.interventions.steer import Steerer
from icl_circuits.core.storage import BadFile
from icl_circuits.methods.task_vectors import (
    DetectionSweep, LayerSweep, TaskVectorConfig, collect_resid, extract_task_vectors, sweep_task,
)  # fmt: skip

from tests.helpers import ANTONYMS, UPPER, pair_lm


def _hf_hidden(lm, ids):
    with torch.no_grad():
        return lm.model(torch.tensor([ids]), output_hidden_states=True)


def test_task_vector_is_mean_of_hf_hidden_states_at_arrows():
    lm = pair_lm()
    batch = icl_prompts(lm.tokenizer, Task("ant", tuple(ANTONYMS)), n_prompts=5, n_shots=3, seed=2)
    tvs = extract_task_vectors(lm, batch, [0, 1], arrows="all", batch_size=2)  # several mini-batches
    last = extract_task_vectors(lm, batch, [1], arrows="last")
    for layer in (0, 1):
        rows, rows_last = [], []
        for p in batch.prompts:  # each prompt alone, unpadded, through plain transformers
            h = _hf_hidden(lm, list(p.ids)).hidden_states[layer][0]
            rows += [h[s.arrow] for s in p.pairs]
            rows_last.append(h[p.pairs[-1].arrow])
        torch.testing.assert_close(tvs[layer], torch.stack(rows).mean(0), rtol=1e-5, atol=1e-5)
        if layer == 1:
            torch.testing.assert_close(last[1], torch.stack(rows_last).mean(0), rtol=1e-5, atol=1e-5)


def test_icl_scores_and_resid_collection():
    lm = pair_lm()
    batch = icl_prompts(lm.tokenizer, Task("ant", tuple(ANTONYMS)), n_prompts=3, n_shots=2)
    resid, score = collect_resid(lm, batch, [1], batch_size=2, logprobs_for="last")
    assert resid[1].shape == (*batch.input_ids.shape, lm.d_model)
    assert 0.0 <= score.accuracy <= 1.0 and score.nll > 0


def test_bad_inputs():
    lm = pair_lm()
    zero = zero_shot_prompts(lm.tokenizer, Task("ant", tuple(ANTONYMS)), 4)
    steering = Steerer(lm, zero, layers=[1])
    with pytest.raises(ValueError, match="d_model"):
        steering.evaluate(1, torch.zeros(lm.d_model + 1))
    with pytest.raises(ValueError, match="not cached"):
        steering.evaluate(0, torch.zeros(lm.d_model))
    with pytest.raises(ValueError, match="training pairs"):
        sweep_task(lm, Task("ant", tuple(ANTONYMS)), [1], TaskVectorConfig(n_shots=16, n_eval=4))


def test_layer_sweep_writes_outputs_and_resumes(tmp_path, monkeypatch):
    from icl_circuits.experiments import task_vectors as sweep_mod

    lm = pair_lm()
    tasks = [Task("ant", tuple(ANTONYMS)), Task("upper", tuple(UPPER))]
    cfg = TaskVectorConfig(n_prompts=3, n_shots=2, n_eval=4, batch_size=2)
    first = sweep_mod.run_layer_sweep(lm, tasks, [0, 1], cfg, tmp_path, progress=False)
    assert len(first.rows) == 4 and [b["task"] for b in first.best] == ["ant", "upper", "mean"]
    for f in ("sweep.json", "sweep.csv", "best_layers.csv", "layer_sweep.png", "layer_sweep.svg"):
        assert (tmp_path / f).stat().st_size > 0
    saved = LayerSweep.from_dict(json.loads((tmp_path / "sweep.json").read_text()), "sweep.json")
    assert (saved.model, saved.layers, saved.rows, saved.best) == (lm.name, [0, 1], first.rows, first.best)
    # a crash after the first task, mid-way through writing the second line
    lines = (tmp_path / "partial.jsonl").read_text().splitlines()
    (tmp_path / "partial.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])
    calls = []
    real = sweep_mod.sweep_task
    monkeypatch.setattr(sweep_mod, "sweep_task", lambda lm, t, *a: calls.append(t.name) or real(lm, t, *a))
    second = sweep_mod.run_layer_sweep(lm, tasks, [0, 1], cfg, tmp_path, progress=False)
    assert calls == ["upper"]
    assert json.dumps(second.rows) == json.dumps(first.rows)  # seeded: the redone task is identical
    # another configuration in the same folder is refused, naming what differs (issue 18: no silent mixing)
    with pytest.raises(ValueError, match="n_prompts: 3 -> 2"):
        sweep_mod.run_layer_sweep(lm, tasks, [0, 1], TaskVectorConfig(n_prompts=2, n_shots=2, n_eval=4), tmp_path, progress=False)
    assert calls == ["upper"]


def test_sweep_results_round_trip_with_their_stamps_and_read_files_written_before_them():
    rows = [dict(task="a", layer=l, relative_loss_decrease=0.1 * l) for l in (2, 3)]
    sweep = LayerSweep("tiny", [2, 3], TaskVectorConfig().to_dict(), rows, [dict(task="a", best_layer=3)])
    d = sweep.to_dict()
    assert d["schema"] == "sweep/1" and LayerSweep.from_dict(d) == sweep
    assert LayerSweep.from_dict({k: v for k, v in d.items() if k != "schema"}) == sweep  # same keys before the stamps
    with pytest.raises(BadFile, match=r"s.json: no 'model'"):
        LayerSweep.from_dict(dict(rows=rows), "s.json")
    det = DetectionSweep(rows, [2, 3], "tiny", TaskVectorConfig().to_dict())
    d = det.to_dict()
    assert d["schema"] == "detection_sweep/1" and DetectionSweep.from_dict(d) == det
    old = DetectionSweep.from_dict(rows, "detection_sweep.json")  # a bare row list before the stamps
    assert (old.rows, old.layers, old.model, old.config) == (rows, [2, 3], None, None)
    with pytest.raises(BadFile, match=r"d.json: holds a sweep result, not a detection_sweep result"):
        DetectionSweep.from_dict(sweep.to_dict(), "d.json")
