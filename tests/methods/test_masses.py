"""Token-type activation masses (Tables 1-2) on tiny models: hand-worked, and against a per-token loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from icl_circuits import Task
from icl_circuits.core.sites import Site
from icl_circuits.core.storage import BadFile, read_json
from icl_circuits.methods.masses import (
    MASS_TYPES, MassConfig, MassesResult, activation_masses, mass_shares, mass_table, token_type_masses,
)  # fmt: skip
from icl_circuits.data.prompts import TYPE_ID

from tests.helpers import ANTONYMS, UPPER, pair_lm, detection_sae

PUBLISHED = Path(__file__).resolve().parents[2] / "docs" / "results" / "gemma-3-270m"


def test_token_type_masses_hand_worked_and_sum_to_one():
    types = torch.tensor([[TYPE_ID[t] for t in ("bos", "prompt", "input", "arrow", "output", "newline")]])
    lat = torch.tensor([[[100.0, 0], [1, 0], [2, 0], [3, 4], [0, 0], [4, 0]]])  # [1, 6, 2]; BOS is never counted
    m = token_type_masses(lat, types)
    assert m.tolist() == [[1.0, 2.0, 3.0, 0.0, 4.0, 0.0], [0.0, 0.0, 4.0, 0.0, 0.0, 0.0]]
    s = mass_shares(m)
    torch.testing.assert_close(s.sum(1), torch.ones(2))
    torch.testing.assert_close(s[0], torch.tensor([0.1, 0.2, 0.3, 0.0, 0.4, 0.0]))
    assert torch.isnan(mass_shares(torch.zeros(1, 6))).all()  # a feature that never fires has no shares


def test_activation_masses_match_a_per_token_loop_and_sum_to_one():
    lm = pair_lm()
    sae_a, sae_b = detection_sae(lm, 0, seed=1), detection_sae(lm, 1, seed=2)
    tasks = [Task("ant", tuple(ANTONYMS)), Task("upper", tuple(UPPER))]
    roles = {"executor": (sae_b, {"ant": [0, 3], "upper": [5]}), "detector": (sae_a, {"ant": [2], "upper": [1, 4]})}
    cfg = MassConfig(n_prompts=3, n_shots=2, batch_size=2)
    rows = activation_masses(lm, tasks, roles, cfg, progress=False)
    assert len(rows) == 4
    for r in rows:
        assert sum(r[t] for t in MASS_TYPES) == pytest.approx(1.0)
    # reference for one row: every prompt alone, unpadded, a plain loop over tokens
    from icl_circuits.methods.task_vectors import TaskVectorConfig, icl_batch

    icl = icl_batch(lm, tasks[1], TaskVectorConfig(n_prompts=3, n_shots=2))
    mass = {t: 0.0 for t in MASS_TYPES}
    for p in icl.prompts:
        x = lm.run(torch.tensor([p.ids]), read=["resid_pre.0"]).acts[Site(0, "resid_pre")][0]
        f = sae_a.encode(x)[:, [1, 4]].sum(1).detach()
        for q, ty in enumerate(p.types):
            name = {v: k for k, v in TYPE_ID.items()}[ty]
            if name in mass:
                mass[name] += float(f[q])
    total = sum(mass.values())
    row = next(r for r in rows if r["task"] == "upper" and r["role"] == "detector")
    for t in MASS_TYPES:
        assert row[t] == pytest.approx(mass[t] / total, rel=1e-4, abs=1e-6)
    table = mass_table(rows)
    assert [r["token_type"] for r in table] == list(MASS_TYPES)
    assert sum(r["executor_ours_%"] for r in table) == pytest.approx(100, abs=0.05)


def test_masses_result_round_trips_and_reads_the_published_and_the_bare_row_list():
    row = dict(task="a", role="executor", n_features=2, total_mass=3.0, **{t: 1 / len(MASS_TYPES) for t in MASS_TYPES})
    r = MassesResult([row], "tiny", MassConfig().to_dict())
    d = r.to_dict()
    assert d["schema"] == "masses/1" and MassesResult.from_dict(d) == r
    assert MassesResult.from_dict({k: v for k, v in d.items() if k != "schema"}) == r
    published = PUBLISHED / "detectors" / "masses.json"
    now = MassesResult.from_dict(read_json(published), str(published))
    assert now.model == "gemma-3-270m" and set(now.roles()) >= {"executor", "detector"}
    assert mass_table(now.rows)  # what the claims and the tables compute from it
    # masses.json was a bare row list before the stamps (the first published run): it must keep loading
    old = MassesResult.from_dict(now.rows, "old/masses.json")
    assert old.model is None and old.rows == now.rows
    with pytest.raises(BadFile, match=r"m.json: holds a link result, not a masses result"):
        MassesResult.from_dict({"schema": "link/1", "rows": []}, "m.json")
    with pytest.raises(BadFile, match=r"m.json: no 'rows' list"):
        MassesResult.from_dict({"model": "x"}, "m.json")
