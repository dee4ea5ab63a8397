"""Tasks split over ranks (icl_circuits/core/distributed.py): 2 gloo processes run TVC over 2 tiny tasks into
one run directory, which then holds what a single process writes (and resumes in one process); the same
for the positive steering heatmap, whose cells the ranks merge into one state file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from icl_circuits import Task
from icl_circuits.methods.cleaning import CleaningConfig
from icl_circuits.core.distributed import gather_in_order, my_share, shared_run
from icl_circuits.core.storage import RunBusy
from icl_circuits.methods.task_vectors import TaskVectorConfig

from tests.helpers import MANY, pair_lm, unit_sae, run_ranks

TASKS = [Task("many", tuple(MANY)), Task("many2", tuple((y, x) for x, y in MANY))]
TV_CFG = TaskVectorConfig(n_prompts=3, n_shots=3)
CFG = CleaningConfig(n_train=4, n_eval=4, max_steps=8, patience=3)


def _clean(out: Path):  # noqa: ANN202
    from icl_circuits.experiments.clean import run_cleaning

    lm = pair_lm()
    return run_cleaning(lm, unit_sae(lm, scale=3.0), TASKS, 1, out, CFG, TV_CFG, sae_spec="tiny", progress=False)


def _heatmap(out: Path):  # noqa: ANN202
    from icl_circuits.methods.heatmaps import FeatureSet, HeatmapConfig, positive_heatmap

    from tests.helpers import ANTONYMS, UPPER, random_sae

    lm = pair_lm()
    tasks = [Task("ant", tuple(ANTONYMS)), Task("upper", tuple(UPPER))]
    sets = {"ant": FeatureSet("ant", [3, 5], [3, 8]), "upper": FeatureSet("upper", [5, 9], [1])}
    cfg = HeatmapConfig(layer=1, scale_grid=(0.5, 2.0), n_eval=4, vectors_per_pass=3, scale_mode="per_feature")
    return positive_heatmap(lm, tasks, sets, random_sae(lm), cfg, out_dir=out, progress=False)


def _worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        assert my_share(["a", "b", "c"]) == [["a", "c"], ["b"]][rank]
        assert gather_in_order("abc", [x.upper() for x in my_share("abc")]) == ["A", "B", "C"]
        results, files = _clean(Path(out))
        assert [r.task for r in results] == ["many", "many2"]  # merged on every rank
        assert bool(files) == (rank == 0)  # only rank 0 writes the summary
        json.dump({"ran": sorted(p.name for p in Path(out).iterdir() if (p / "cleaning.json").is_file())},
                  open(Path(out).parent / f"rank{rank}.json", "w"))  # fmt: skip
        res = _heatmap(Path(out).parent / "heat")
        torch.save(res.to_dict(), Path(out).parent / f"heat-rank{rank}.pt")
        dist.barrier()  # every rank done with the group before teardown: gloo can abort otherwise
    finally:
        dist.destroy_process_group()


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count: the same float sums
    yield
    torch.set_num_threads(old)


def test_two_ranks_split_tasks_into_one_run_dir(tmp_path, monkeypatch, one_thread):
    _clean(tmp_path / "single")
    run_ranks(_worker, 2, tmp_path, tmp_path / "dist")
    ran = [json.loads((tmp_path / f"rank{r}.json").read_text())["ran"] for r in range(2)]
    assert ran == [["many", "many2"]] * 2  # every task's folder is there (each rank wrote its own)
    want = json.loads((tmp_path / "single" / "summary.json").read_text())
    got = json.loads((tmp_path / "dist" / "summary.json").read_text())
    assert [r["task"] for r in got] == ["many", "many2", "mean"]
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in set(w) - {"seconds"}:  # (wall time) measured: identical numbers; asserted to 1e-6 relative
            if isinstance(w[k], float):
                assert g[k] == pytest.approx(w[k], rel=1e-6, abs=1e-9), k
            else:
                assert g[k] == w[k], k
    names = lambda d: sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if not p.name.startswith("."))  # noqa: E731
    assert names(tmp_path / "dist") == names(tmp_path / "single")
    for t in TASKS:  # the resume keys are those of one process ...
        unit = lambda d: json.loads((d / t.name / "unit.json").read_text())  # noqa: E731
        assert unit(tmp_path / "dist") == unit(tmp_path / "single")
    # ... so one process resumes the distributed run without recomputing a task
    monkeypatch.setattr("icl_circuits.experiments.clean.clean_task", lambda *a, **k: pytest.fail("recomputed"))
    assert [r.task for r in _clean(tmp_path / "dist")[0]] == ["many", "many2"]


    # the heatmap: every rank ends with all cells; rank 0's state file holds them all
    heat = _heatmap(tmp_path / "heat1")
    for r in range(2):
        got = torch.load(tmp_path / f"heat-rank{r}.pt", weights_only=True)
        assert got["features"] == heat.features and got["scales"] == heat.scales
        torch.testing.assert_close(torch.tensor(got["raw"]), heat.raw, rtol=1e-6, atol=1e-9)
    def cells(d: Path) -> dict:  # the heatmap's resume log: {(split, task): {"feature@scale": effect}} + baselines
        lines = (d / "heatmap_cells.jsonl").read_text().splitlines()[1:]
        return {r["key"]: r["value"] for r in map(json.loads, lines)}  # the last record of a key wins

    want, got = cells(tmp_path / "heat1"), cells(tmp_path / "heat")
    assert got.keys() == want.keys() and len(want) == 4  # 2 tasks x (calibration, eval): keyed by content, not by rank
    for k in want:
        assert got[k]["task"] == want[k]["task"] and got[k]["cells"] == pytest.approx(want[k]["cells"])
        if want[k]["baseline"] is None:  # a calibration record written before its task's evaluation
            assert got[k]["baseline"] is None
        else:
            assert got[k]["baseline"] == pytest.approx(want[k]["baseline"])


def test_single_process_helpers_are_the_identity(tmp_path):
    assert my_share([1, 2, 3]) == [1, 2, 3]
    assert gather_in_order([1, 2, 3], ["a", "b", "c"]) == ["a", "b", "c"]
    with shared_run(tmp_path, {"a": 1}, kind="test") as run:
        with pytest.raises(RunBusy):  # the lock still keeps out another run
            shared_run(tmp_path, {"a": 1}, kind="test").__enter__()
        assert run.key("x")
