"""Result files carry a schema stamp: readers refuse another kind or a newer version, and read unstamped (older) files."""

from __future__ import annotations

import pytest
import torch

from icl_circuits.core.storage import RESULT_VERSIONS, BadFile, check_schema, stamp
from icl_circuits.methods.circuits import CrossTask, FaithfulnessCurve
from icl_circuits.methods.heatmaps import HeatmapResult
from icl_circuits.methods.link import LinkResult
from icl_circuits.methods.negative import NegativeResult


def _results() -> dict[str, object]:
    return {
        "heatmap": HeatmapResult(["a", "b"], [3, 5], torch.tensor([[0.5, -0.1], [0.0, 0.25]]), [2.0, 4.0], {3: ["a"]},
                                 {5: ["b"]}, {"a": 1.5, "b": 2.5}, {"a": {3: [0.1, 0.2]}}, {"layer": 1}, 2.0),
        "negative": NegativeResult(["a"], [3, 5], torch.tensor([[0.2, 0.0]]), [1.0, 2.0], {"a": 0.75}, {3: ["a"]}, {"layer": 1}),
        "link": LinkResult(["a", "b"], ["a"], {"a": 1, "b": 2}, {"a": 7}, torch.tensor([[0.5], [0.0]]), torch.tensor([[3.0], [0.0]]), {"multiple": 50}),
        "cross_task": CrossTask(tasks=["a", "b"], n_ablated={"a": 4, "b": None}, change=[[0.0, -0.5], [-0.25, 0.0]], target=0.3,
                                reached={"a": True, "b": False}),
        "faithfulness": FaithfulnessCurve(task="a", sizes=[1, 2], m_C=[1.0, 2.0], m_M=[2.0, 1.0], m_full=2.0, m_empty=0.0,
                                          n_error_nodes=[0, 0], n_nonzero=2),
    }  # fmt: skip


@pytest.mark.parametrize("kind", ["heatmap", "negative", "link", "cross_task", "faithfulness"])
def test_round_trip_keeps_every_field_and_the_stamp(kind):
    r = _results()[kind]
    d = r.to_dict()
    assert d["schema"] == f"{kind}/{RESULT_VERSIONS[kind]}"
    back = type(r).from_dict(d)
    for k, v in vars(r).items():
        w = getattr(back, k)
        assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, (kind, k)
    legacy = {k: v for k, v in d.items() if k != "schema"}  # written before the stamps
    assert type(r).from_dict(legacy).to_dict() == d


def test_another_kind_or_a_newer_version_is_refused_with_the_file_named():
    d = _results()["link"].to_dict()
    with pytest.raises(BadFile, match=r"runs/x/heatmap.json: holds a link result, not a heatmap result"):
        HeatmapResult.from_dict(d, "runs/x/heatmap.json")
    with pytest.raises(BadFile, match=r"link result version '99'"):
        LinkResult.from_dict({**d, "schema": "link/99"}, "link.json")
    with pytest.raises(BadFile, match="expected a JSON object"):
        check_schema("link", [1, 2], "link.json")
    assert stamp("cleaning", {"a": 1}) == {"schema": "cleaning/1", "a": 1}
