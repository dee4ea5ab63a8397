"""The claims' rules on hand-made result files, each with its verdict worked out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from icl_circuits.experiments import claims
from icl_circuits.methods.circuits import CrossTask
from icl_circuits.methods.link import LinkResult
from icl_circuits.methods.masses import MASS_TYPES, MassesResult
from icl_circuits.methods.negative import NegativeResult
from icl_circuits.methods.task_vectors import DetectionSweep, LayerSweep


def _write(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def test_most_is_a_strict_majority():
    assert [claims.most(k, 4) for k in (0, 1, 2, 3)] == ["no", "partly", "partly", "yes"]
    assert claims.most(0, 0) == "not measured"


def test_tv_layer_takes_the_best_mean_over_tasks(tmp_path: Path):
    rows = [dict(task=t, layer=l, relative_loss_decrease=v) for t, vals in (("a", [0.1, 0.5, 0.2, 0.0]), ("b", [0.0, 0.1, 0.6, 0.1]))
            for l, v in enumerate(vals)]  # fmt: skip
    _write(tmp_path / "task_vectors" / "sweep.json", LayerSweep("tiny", [0, 1, 2, 3], {}, rows, []).to_dict())
    ours, verdict = claims.tv_layer({"task_vectors": tmp_path / "task_vectors"})
    # means: 0.05, 0.30, 0.40, 0.05 -> layer 2 of 0-3, 2/3 of the depth: in the middle half
    assert ours.startswith("layer 2 of 0-3 (mean relative loss decrease 0.400") and verdict == "yes"


def test_detection_layer_reads_stamped_and_unstamped_sweeps(tmp_path: Path):
    tv = [dict(task="a", layer=l, relative_loss_decrease=v) for l, v in enumerate([0.0, 0.1, 0.5])]
    det = [dict(task="a", layer=l, relative_loss_decrease=v) for l, v in enumerate([0.2, 0.6, 0.1])]
    f = {"task_vectors": tmp_path / "tv", "detection_sweep": tmp_path / "det"}
    _write(f["task_vectors"] / "sweep.json", LayerSweep("tiny", [0, 1, 2], {}, tv, []).to_dict())
    _write(f["detection_sweep"] / "detection_sweep.json", DetectionSweep(det, [0, 1, 2], "tiny").to_dict())
    assert claims.detection_layer(f) == ("detection peaks at layer 1, execution at layer 2", "yes")
    _write(f["detection_sweep"] / "detection_sweep.json", det)  # a bare row list, as written before the stamps
    assert claims.detection_layer(f) == ("detection peaks at layer 1, execution at layer 2", "yes")
    _write(f["detection_sweep"] / "detection_sweep.json", LayerSweep("tiny", [0], {}, tv, []).to_dict())
    with pytest.raises(ValueError, match=r"detection_sweep.json: holds a sweep result, not a detection_sweep result"):
        claims.detection_layer(f)


def test_masses_read_stamped_and_unstamped_files(tmp_path: Path):
    def row(role: str, arrow: float) -> dict:
        shares = {t: 0.0 for t in MASS_TYPES} | {"arrow": arrow, "output": 1 - arrow}
        return dict(task="a", role=role, n_features=1, total_mass=2.0, **shares)

    rows = [row("executor", 0.7), row("detector", 0.2), dict(row("executor", 0.0), task="b", total_mass=0.0)]  # b never fired
    f = {"detectors": tmp_path / "d"}
    _write(f["detectors"] / "masses.json", MassesResult(rows, "tiny", {}).to_dict())
    assert claims.executor_mass(f) == ("70.0%", "yes") and claims.detector_mass(f) == ("80.0%", "yes")
    _write(f["detectors"] / "masses.json", rows)  # a bare row list, as written before the stamps (docs/results)
    assert claims.executor_mass(f) == ("70.0%", "yes")


def test_tvc_needs_all_three_conditions_per_task(tmp_path: Path):
    good = dict(task="a", tv=0.5, tvc=0.6, sae_reconstruction=0.4, ito_5=0.3, ito_20=0.55, l0_tv=20, l0_tvc=5)
    too_many = {**good, "task": "b", "l0_tvc": 11}  # 11 > 20 / 2
    beaten = {**good, "task": "c", "ito_20": 0.61}
    _write(tmp_path / "t" / "summary.json", [good, too_many, beaten])
    ours, verdict = claims.tvc({"tvc_execution": tmp_path / "t"})
    assert ours.startswith("1 of 3 tasks meet all three") and ours.endswith("on 2") and verdict == "partly"


def test_negative_counts_features_whose_worst_task_is_their_own(tmp_path: Path):
    neg = NegativeResult(["a", "b", "c"], [7, 8], torch.tensor([[0.5, 0.1], [0.2, 0.3], [0.0, 0.0]]), [1.0, 2.0],
                         {"a": 0.9, "b": 0.8, "c": 0.7}, {7: ["a"], 8: ["a"]}, {})  # 7 hurts a most (own); 8 hurts b most (not own)
    _write(tmp_path / "h" / "negative.json", neg.to_dict())
    assert claims.negative({"negative_steering": tmp_path / "h"}) == ("1 of 2 executors hurt their own task most", "partly")


def test_link_needs_a_large_own_drop_for_yes(tmp_path: Path):
    drop = torch.tensor([[0.3, 0.1, 0.0], [0.0, 0.2, 0.1]])
    link = LinkResult(["a", "b"], ["a", "b", "c"], {"a": 1, "b": 2}, {"a": 3, "b": 4, "c": 5}, drop, torch.ones(2, 3), {})
    _write(tmp_path / "d" / "link.json", link.to_dict())
    ours, verdict = claims.link({"detectors": tmp_path / "d"})
    assert ours == "own executor drops most for 2 of 2 detectors; largest own drop 0.30" and verdict == "partly"
    link.drop[0, 0] = 0.9
    _write(tmp_path / "d" / "link.json", link.to_dict())
    assert claims.link({"detectors": tmp_path / "d"})[1] == "yes"


def test_nodes_needed_against_the_papers_limit(tmp_path: Path):
    for task, n in (("a", 40), ("b", 3000), ("c", None)):
        _write(tmp_path / "c" / task / "summary.json", dict(task=task, nodes_for_target=n))
    ours, verdict = claims.sfc_11_12({"circuits": tmp_path / "c"})
    assert ours == "reached by 2 of 3 tasks (40-3,000 feature nodes, median 1,520)" and verdict == "partly"
    _write(tmp_path / "c" / "c" / "summary.json", dict(task="c", nodes_for_target=2000))
    assert claims.sfc_11_12({"circuits": tmp_path / "c"})[1] == "partly"  # 1 of 3 within 60
    _write(tmp_path / "c" / "a" / "summary.json", dict(task="a", nodes_for_target=100))
    assert claims.sfc_11_12({"circuits": tmp_path / "c"})[1] == "no (reached, but with more nodes)"


def test_cross_task_reads_rows_as_the_ablated_task(tmp_path: Path):
    ct = CrossTask(tasks=["a", "b"], n_ablated={"a": 3, "b": 5}, change=[[-0.7, -0.2], [-0.9, -0.7]], target=0.3, reached={"a": True, "b": True})
    _write(tmp_path / "c" / "cross_task.json", ct.to_dict())
    # ablating a's circuit hurts a most; ablating b's hurts a (-0.9) more than b itself
    assert claims.cross_task({"circuits": tmp_path / "c"}) == (
        "1 of 2 tasks whose circuit reached the target hurt themselves most (2 tasks)", "partly")
    assert claims.cross_task_10_17({"circuits_10_17": tmp_path / "c"}) == claims.cross_task({"circuits": tmp_path / "c"})
    # no task reached the target: the row says what ablating every candidate did, and measures nothing
    ct = CrossTask(tasks=["a", "b"], n_ablated={"a": 9, "b": 7}, change=[[-0.1, -0.2], [-0.05, -0.12]], target=0.3,
                   reached={"a": False, "b": False})  # fmt: skip
    _write(tmp_path / "d" / "cross_task.json", ct.to_dict())
    assert claims.cross_task_10_17({"circuits_10_17": tmp_path / "d"}) == (
        "no task's circuit brings its faithfulness down to 0.3: ablating all of a task's positive-effect feature nodes "
        "changes its own by -0.12 to -0.10; its own task is hurt most for 1 of 2", "not measured")
    with pytest.raises(claims.Missing):  # the 10-17 row reads its own stage, never the 11-12 one
        claims.cross_task_10_17({"circuits_10_17": tmp_path / "other"})


def test_a_claim_whose_stage_did_not_run_says_so(tmp_path: Path):
    rows = {r["key"]: r for r in claims.judge_all({"circuits": tmp_path / "circuits"}, {"circuits": "done"})}
    assert rows["sfc_11_12"]["holds"] == "not run" and "missing file" in rows["sfc_11_12"]["ours"]
    assert rows["tvc"]["holds"] == "not run" and "not in the recipe" in rows["tvc"]["ours"]


def test_an_unfinished_stage_is_judged_on_what_it_wrote_and_says_so(tmp_path: Path):
    for task, n in (("a", 40), ("b", 50)):
        _write(tmp_path / "circuits" / task / "summary.json", dict(task=task, nodes_for_target=n))
    rows = {r["key"]: r for r in claims.judge_all({"circuits": tmp_path / "circuits"}, {"circuits": "not run"})}
    assert rows["sfc_11_12"]["holds"] == "yes" and rows["sfc_11_12"]["ours"].endswith("[stage circuits unfinished: from the units it has written so far]")
    assert rows["cross_task"]["holds"] == "not run" and "unfinished" in rows["cross_task"]["ours"]
