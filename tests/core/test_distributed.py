"""Tasks split over ranks (icl_circuits/core/distributed.py): 2 gloo processes run TVC over 2 tiny tasks into
one run directory, which then holds what a single process writes (and resumes in one process); the same
for the positive steering heatmap, whose cells the ranks merge into one state file, and for circuits over 3
tiny tasks (rank 0: tasks 1 and 3, rank 1: task 2; rank 0 alone writes the outputs over tasks)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from icl_circuits import Task
from icl_circuits.methods.cleaning import CleaningConfig
from icl_circuits.core.distributed import gather_in_order, my_share, shared_run
from icl_circuits.core.storage import RunBusy
from icl_circuits.methods.task_vectors import TaskVectorConfig

from tests.helpers import MANY, PAIRS, make_tiny, pair_lm, run_ranks, tiny_saes, toy_batch, toy_task, unit_sae

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


CIRCUIT_TASKS = [toy_task("a", PAIRS), toy_task("b", list(reversed(PAIRS))), toy_task("c", [(y, x) for x, y in PAIRS])]
TIMINGS = {"seconds", "node_effects_s"}  # wall times in the circuit summaries: measured, never compared


def _circuits(out: Path) -> dict:
    from icl_circuits.experiments.circuits import run_circuits
    from icl_circuits.methods.circuits import CircuitConfig, CircuitRunConfig

    lm, _ = make_tiny("gemma3")
    lm.tokenizer = toy_batch()[1]
    # IE quality and the other error-node curves too: rank 0 reads both from the other rank's task folders
    rc = CircuitRunConfig(circuit=CircuitConfig(layers=(0, 1)), n_prompts=2, n_shots=3, sizes=(0, 2, 10), edge_k=1,
                          ie_quality_per_sae=2, other_errors_curve=True)  # fmt: skip
    return run_circuits(lm, CIRCUIT_TASKS, rc, out, saes=tiny_saes(lm, (0, 1)), progress=False)


def _recording(write: Callable[..., Any], root: Path, wrote: list[str]) -> Callable[..., Any]:
    """`write` (write_json / write_csv) that also notes each path it writes under root, relative to it."""

    def rec(path: Path, *a: Any, **k: Any) -> Any:
        wrote.append(Path(path).relative_to(root).as_posix())
        return write(path, *a, **k)

    return rec


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
        import icl_circuits.experiments.circuits as ec
        from icl_circuits.core.storage import write_json

        circ, wrote = Path(out).parent / "circ", []
        ec.write_json, ec.write_csv = (_recording(w, circ, wrote) for w in (ec.write_json, ec.write_csv))  # who writes what
        got = _circuits(circ)
        write_json(Path(out).parent / f"circ-rank{rank}.json", dict(summaries=got["summaries"], n_files=len(got["files"]), wrote=wrote))
        dist.barrier()  # every rank done with the group before teardown: gloo can abort otherwise
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> Path:
    """The folder of one 2-rank run of _worker (clean, heatmap, circuits); its outputs are checked by the tests below."""
    root = tmp_path_factory.mktemp("ranks")
    run_ranks(_worker, 2, root, root / "dist")
    return root


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count: the same float sums
    yield
    torch.set_num_threads(old)


def test_two_ranks_split_tasks_into_one_run_dir(ranks, tmp_path, monkeypatch, one_thread):
    _clean(tmp_path / "single")
    ran = [json.loads((ranks / f"rank{r}.json").read_text())["ran"] for r in range(2)]
    assert ran == [["many", "many2"]] * 2  # every task's folder is there (each rank wrote its own)
    want = json.loads((tmp_path / "single" / "summary.json").read_text())
    got = json.loads((ranks / "dist" / "summary.json").read_text())
    assert [r["task"] for r in got] == ["many", "many2", "mean"]
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in set(w) - {"seconds"}:  # (wall time) measured: identical numbers; asserted to 1e-6 relative
            if isinstance(w[k], float):
                assert g[k] == pytest.approx(w[k], rel=1e-6, abs=1e-9), k
            else:
                assert g[k] == w[k], k
    names = lambda d: sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if not p.name.startswith("."))  # noqa: E731
    assert names(ranks / "dist") == names(tmp_path / "single")
    for t in TASKS:  # the resume keys are those of one process ...
        unit = lambda d: json.loads((d / t.name / "unit.json").read_text())  # noqa: E731
        assert unit(ranks / "dist") == unit(tmp_path / "single")
    # ... so one process resumes the distributed run without recomputing a task
    monkeypatch.setattr("icl_circuits.experiments.clean.clean_task", lambda *a, **k: pytest.fail("recomputed"))
    assert [r.task for r in _clean(ranks / "dist")[0]] == ["many", "many2"]


    # the heatmap: every rank ends with all cells; rank 0's state file holds them all
    heat = _heatmap(tmp_path / "heat1")
    for r in range(2):
        got = torch.load(ranks / f"heat-rank{r}.pt", weights_only=True)
        assert got["features"] == heat.features and got["scales"] == heat.scales
        torch.testing.assert_close(torch.tensor(got["raw"]), heat.raw, rtol=1e-6, atol=1e-9)
    def cells(d: Path) -> dict:  # the heatmap's resume log: {(split, task): {"feature@scale": effect}} + baselines
        lines = (d / "heatmap_cells.jsonl").read_text().splitlines()[1:]
        return {r["key"]: r["value"] for r in map(json.loads, lines)}  # the last record of a key wins

    want, got = cells(tmp_path / "heat1"), cells(ranks / "heat")
    assert got.keys() == want.keys() and len(want) == 4  # 2 tasks x (calibration, eval): keyed by content, not by rank
    for k in want:
        assert got[k]["task"] == want[k]["task"] and got[k]["cells"] == pytest.approx(want[k]["cells"])
        if want[k]["baseline"] is None:  # a calibration record written before its task's evaluation
            assert got[k]["baseline"] is None
        else:
            assert got[k]["baseline"] == pytest.approx(want[k]["baseline"])


def _names(d: Path) -> list[str]:
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if not p.name.startswith("."))


def _close(got: Any, want: Any, where: str = "") -> None:
    """got == want, floats to 1e-5 relative (NaN equal to NaN), wall times skipped."""
    if isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for k in want.keys() - TIMINGS:
            if k == "n_edges":  # a count after a 5% pruning cut: float summation order can move one edge across it
                assert abs(got[k] - want[k]) <= 1, f"{where}.{k}"
                continue
            _close(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _close(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7, nan_ok=True), where
    else:
        assert got == want, where


def test_two_ranks_split_circuit_tasks_into_one_run_dir(ranks, tmp_path, one_thread):
    single = _circuits(tmp_path / "circ")
    dist = ranks / "circ"
    names = [t.name for t in CIRCUIT_TASKS]
    recs = [json.loads((ranks / f"circ-rank{r}.json").read_text()) for r in range(2)]
    want = json.loads(json.dumps(single["summaries"]))  # (as the ranks' summaries came back: through JSON)
    for rec in recs:  # every rank returns every task's summary, in task order, as one process computes it
        assert [s["task"] for s in rec["summaries"]] == names
        _close(rec["summaries"], want, "summaries")
    assert [s["nodes_for_target"] for s in recs[0]["summaries"]] == [s["nodes_for_target"] for s in single["summaries"]]
    # one merged run folder: the same files as one process writes, with the same contents
    assert _names(dist) == _names(tmp_path / "circ")
    for t in names:
        for f in ("summary.json", "faithfulness.json", "faithfulness_errors_ablated.json", "unit.json"):
            _close(json.loads((dist / t / f).read_text()), json.loads((tmp_path / "circ" / t / f).read_text()), f"{t}/{f}")
    for f in ("cross_task.json", "cross_task_errors_ablated.json", "ie_correlations.json"):
        _close(json.loads((dist / f).read_text()), json.loads((tmp_path / "circ" / f).read_text()), f)

    def csv(d: Path) -> list[list[str]]:  # summary.csv without its last two columns (edges, see _close; node_effects_s: a wall time)
        return [line.split(",")[:-2] for line in (d / "summary.csv").read_text().splitlines()]

    def edges(d: Path) -> list[int]:
        return [int(line.split(",")[-2]) for line in (d / "summary.csv").read_text().splitlines()[1:]]

    assert csv(dist)[0][-1] == "error_share_top50" and csv(dist) == csv(tmp_path / "circ")
    assert all(abs(a - b) <= 1 for a, b in zip(edges(dist), edges(tmp_path / "circ"), strict=True))
    # who wrote what: each task's folder by the rank that ran it (round-robin), the outputs over tasks by rank 0, once
    diag = "faithfulness_errors_ablated.json"  # the other error-node curves: rank 0 computes them for every task
    folders = [{p.split("/")[0] for p in rec["wrote"] if "/" in p and not p.endswith(diag)} for rec in recs]
    assert folders == [{"a", "c"}, {"b"}]
    assert [p for p in recs[0]["wrote"] if p.endswith(diag)] == [f"{t}/{diag}" for t in names]
    over_tasks = ["summary.csv", "ie_correlations.json", "cross_task.json", "cross_task_errors_ablated.json"]
    assert [recs[0]["wrote"].count(f) for f in over_tasks] == [1] * 4
    assert not set(over_tasks) & set(recs[1]["wrote"]) and recs[1]["n_files"] == 0 < recs[0]["n_files"]


def test_single_process_helpers_are_the_identity(tmp_path):
    assert my_share([1, 2, 3]) == [1, 2, 3]
    assert gather_in_order([1, 2, 3], ["a", "b", "c"]) == ["a", "b", "c"]
    with shared_run(tmp_path, {"a": 1}, kind="test") as run:
        with pytest.raises(RunBusy):  # the lock still keeps out another run
            shared_run(tmp_path, {"a": 1}, kind="test").__enter__()
        assert run.key("x")
