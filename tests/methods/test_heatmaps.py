"""Positive steering heatmaps (`methods.heatmaps`) on tiny models, against direct evaluations and hand-worked cases."""

from __future__ import annotations

import pytest
import torch

from icl_circuits import Task
from icl_circuits.core.storage import ConfigMismatch
from icl_circuits.interventions.steer import feature_directions
from icl_circuits.methods.heatmaps import (
    FeatureSet,
    HeatmapConfig,
    HeatmapResult,
    choose_scales,
    cluster_order,
    heatmap_steerer,
    load_feature_sets,
    log_grid,
    normalize_effects,
    positive_heatmap,
)
from icl_circuits.viz.steering_plots import heatmap_figures

from tests.helpers import ANTONYMS, UPPER, random_sae, pair_lm


def test_normalisation_matches_hand_worked_example():
    raw = torch.tensor([[0.5, 0.1, -0.2, 1.4], [0.0, 0.3, 0.3, 0.05], [0.2, 0.2, 0.2, 0.2]])
    # loss ratio clipped at 1 = harm counts as 0: row 0 -> [0.5, 0.1, 0, 1.4]; min-max: x / 1.4 -> [5/14, 1/14, 0, 1]
    # -> floor 0.2 -> [5/14, 0, 0, 1]; row 1: x / 0.3 -> [0, 1, 1, 1/6] -> [0, 1, 1, 0]; row 2: max == min -> 0
    norm, kept = normalize_effects(raw, clip=1.0, floor=0.2, min_effect=0.0)
    assert kept == [0, 1, 2, 3]
    expected = torch.tensor([[5 / 14, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(norm, expected)
    # features whose raw maximum is below 0.35 (columns 1, 2: 0.3) are dropped
    norm, kept = normalize_effects(raw, clip=1.0, floor=0.2, min_effect=0.35)
    assert kept == [0, 3]
    torch.testing.assert_close(norm, expected[:, [0, 3]])
    # a column that is zero after flooring everywhere is dropped too
    _, kept = normalize_effects(torch.tensor([[1.0, 0.0, 0.1], [0.0, 1.0, 0.1]]), floor=0.2)
    assert kept == [0, 1]


def test_cluster_order_puts_similar_rows_together():
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 1.0])
    m = torch.stack([a, b, a * 2 + 0.01, b + torch.tensor([0.0, 0.1, 0.0]), a + torch.tensor([0, 0.05, 0])])
    order = cluster_order(m)
    assert sorted(order) == list(range(5))
    groups = ["a" if i in (0, 2, 4) else "b" for i in order]
    assert groups in (["a"] * 3 + ["b"] * 2, ["b"] * 2 + ["a"] * 3)


def test_choose_scales_hand_worked():
    grid = {"t1": {3: [0.1, 0.5, 0.2], 7: [0.3, 0.1, 0.0]}, "t2": {7: [0.0, 0.2, 0.6], 9: [0.2, 0.1, 0.0]}}
    scales, shared = choose_scales(grid, [3, 7, 9], (1.0, 2.0, 4.0), "per_feature")
    assert scales == [2.0, 4.0, 1.0] and shared is None  # feature 7: best anywhere is 0.6 on t2 at scale 4
    scales, shared = choose_scales(grid, [3, 7, 9], (1.0, 2.0, 4.0), "shared")
    # mean over tasks of the best own feature: scale 1: (0.3+0.2)/2, scale 2: (0.5+0.2)/2, scale 4: (0.2+0.6)/2
    assert shared == 4.0 and scales == [4.0] * 3
    assert log_grid(1, 100, 3) == (1.0, 10.0, 100.0)


def test_positive_heatmap_end_to_end_and_resume(tmp_path, monkeypatch):
    lm = pair_lm()
    sae = random_sae(lm)
    tasks = [Task("ant", tuple(ANTONYMS)), Task("upper", tuple(UPPER))]
    sets = {"ant": FeatureSet("ant", [3, 5], [3, 8]), "upper": FeatureSet("upper", [5, 9], [1])}
    cfg = HeatmapConfig(layer=1, scale_grid=(0.5, 2.0), n_eval=4, vectors_per_pass=3, scale_mode="per_feature")
    res = positive_heatmap(lm, tasks, sets, sae, cfg, out_dir=tmp_path, progress=False)
    assert res.features == [3, 5, 9] and res.raw.shape == (2, 3)
    assert res.owners == {3: ["ant"], 5: ["ant", "upper"], 9: ["upper"]}
    dirs = feature_directions(sae, res.features)
    for t, task in enumerate(tasks):  # each cell: a direct evaluation at the feature's chosen scale
        st = heatmap_steerer(lm, task, cfg)
        for j in range(3):
            assert float(res.raw[t, j]) == pytest.approx(float(st.relative_loss_decrease(st.score(1, (res.scales[j] * dirs[j])[None]).nll)[0]), rel=1e-4, abs=1e-6)
    for j, f in enumerate(res.features):  # per-feature scale = best grid value on its owner tasks (calibration split)
        best = max(range(2), key=lambda g: max(res.grid[t][f][g] for t in res.owners[f]))
        assert res.scales[j] == cfg.scale_grid[best]
        t = res.owners[f][0]
        cal = heatmap_steerer(lm, tasks[res.tasks.index(t)], cfg, "calibration")
        assert res.grid[t][f][1] == pytest.approx(float(cal.relative_loss_decrease(cal.score(1, (2.0 * dirs[j])[None]).nll)[0]), rel=1e-4, abs=1e-6)
    in_tv, kept = res.marks()
    assert in_tv.tolist() == [[True, False, False], [False, False, False]]
    assert kept.tolist() == [[True, True, False], [False, True, True]]
    # resume: nothing is recomputed
    monkeypatch.setattr("icl_circuits.methods.heatmaps.heatmap_steerer", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    again = positive_heatmap(lm, tasks, sets, sae, cfg, out_dir=tmp_path, progress=False)
    assert torch.equal(again.raw, res.raw)
    assert torch.equal(HeatmapResult.from_dict(res.to_dict()).raw, res.raw)
    # a rerun with one more feature evaluates only that feature's cells
    calls = []
    monkeypatch.setattr("icl_circuits.methods.heatmaps.heatmap_steerer",
                        lambda lm, task, cfg, split="eval": calls.append((task.name, split)) or heatmap_steerer(lm, task, cfg, split))
    more = {**sets, "upper": FeatureSet("upper", [5, 9, 11], [1])}
    grown = positive_heatmap(lm, tasks, more, sae, cfg, out_dir=tmp_path, progress=False)
    # the new feature's grid on its owner's calibration prompts, then its cell on every task's evaluation prompts
    assert grown.features == [3, 5, 9, 11] and calls == [("upper", "calibration"), ("ant", "eval"), ("upper", "eval")]
    torch.testing.assert_close(grown.raw[:, :3], res.raw)
    with pytest.raises(ConfigMismatch, match="n_eval: 4 -> 5"):  # other prompts: refused, the folder untouched
        positive_heatmap(lm, tasks, sets, sae, HeatmapConfig(layer=1, scale_grid=(1.0,), n_eval=5), out_dir=tmp_path, progress=False)
    info = heatmap_figures(res, tmp_path / "fig", floor=0.0)
    assert (tmp_path / "fig" / "heatmap_raw.png").is_file() and (tmp_path / "fig" / "heatmap_raw.svg").is_file()
    assert sorted(info["row_order"]) == ["ant", "upper"]


def test_heatmap_resume_never_serves_stale_cells(tmp_path, monkeypatch):
    """A retrained SAE (same site and width, other weights) is refused in the old folder; a user task that
    shares a built-in's name but not its pairs is computed afresh; the other task's cells are reused."""
    lm = pair_lm()
    sae = random_sae(lm)
    cfg = HeatmapConfig(layer=1, scale_grid=(1.0,), n_eval=4, scale_mode="fixed", scale=1.0)
    tasks = [Task("ant", tuple(ANTONYMS)), Task("upper", tuple(UPPER))]
    sets = {"ant": FeatureSet("ant", [3]), "upper": FeatureSet("upper", [5])}
    first = positive_heatmap(lm, tasks, sets, sae, cfg, out_dir=tmp_path, progress=False)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ConfigMismatch, match="sae"):
        positive_heatmap(lm, tasks, sets, random_sae(lm, seed=1), cfg, out_dir=tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    # 'ant' now holds the reversed pairs: its cells are new ones, checked against a direct evaluation
    calls = []
    monkeypatch.setattr("icl_circuits.methods.heatmaps.heatmap_steerer",
                        lambda lm, task, cfg, split="eval": calls.append(task.name) or heatmap_steerer(lm, task, cfg, split))
    mine = [Task("ant", tuple((y, x) for x, y in ANTONYMS)), tasks[1]]
    res = positive_heatmap(lm, mine, sets, sae, cfg, out_dir=tmp_path, progress=False)
    assert calls == ["ant"]
    torch.testing.assert_close(res.raw[1], first.raw[1])
    st = heatmap_steerer(lm, mine[0], cfg)
    dirs = feature_directions(sae, res.features)
    want = st.relative_loss_decrease(st.score(1, dirs).nll)  # scale 1: the unit directions themselves
    torch.testing.assert_close(res.raw[0], want, rtol=1e-4, atol=1e-6)
    assert res.baselines["ant"] == pytest.approx(st.baseline.nll)
    assert not torch.allclose(res.raw[0], first.raw[0])  # the reversed task's effects differ (could fail)


def test_top_only_heatmap_keeps_each_tasks_strongest_feature():
    lm = pair_lm()
    sae = random_sae(lm)
    tasks = [Task("ant", tuple(ANTONYMS)), Task("upper", tuple(UPPER))]
    sets = {"ant": FeatureSet("ant", [3, 5]), "upper": FeatureSet("upper", [9, 2])}
    cfg = HeatmapConfig(layer=1, scale_grid=(1.0,), n_eval=4, top_only=True, setting="detection")
    res = positive_heatmap(lm, tasks, sets, sae, cfg, progress=False)
    for name in ("ant", "upper"):
        own = sets[name].features
        t = res.tasks.index(name)
        best = max((f for f in own if f in res.features), key=lambda f: float(res.raw[t, res.features.index(f)]), default=None)
        if best is not None and float(res.raw[t, res.features.index(best)]) > 0:
            assert res.top_feature(name) == best
        else:  # only a feature with a positive effect on its own task can be its top feature
            with pytest.raises(ValueError, match="positive effect|contributes no feature"):
                res.top_feature(name)


def test_bad_inputs_are_clear_errors():
    lm = pair_lm()
    sae = random_sae(lm)
    with pytest.raises(ValueError, match="setting"):
        HeatmapConfig(setting="bogus")
    with pytest.raises(ValueError, match="NaN"):
        normalize_effects(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="SAE reads"):
        positive_heatmap(lm, [Task("ant", tuple(ANTONYMS))], {"ant": FeatureSet("ant", [1])}, sae, HeatmapConfig(layer=0), progress=False)
    with pytest.raises(ValueError, match="no features for tasks"):
        positive_heatmap(lm, [Task("ant", tuple(ANTONYMS))], {}, sae, HeatmapConfig(layer=1), progress=False)


def _cleaning(task: str, weights: dict[int, float], initial: dict[int, float], layer: int = 1, setting: str = "execution"):
    from icl_circuits.methods.cleaning import CleaningResult

    w, w0 = torch.zeros(12), torch.zeros(12)
    for i, v in weights.items():
        w[i] = v
    for i, v in initial.items():
        w0[i] = v
    return CleaningResult(task=task, layer=layer, setting=setting, sae_spec="resid:1", config={}, weights=w, initial_weights=w0,
                          vector=torch.zeros(4), l0_history=[], train_loss=[], eval_loss=[], steps=0, stopped="patience", seconds=0.0)  # fmt: skip


def test_feature_sets_from_saved_cleaning_results(tmp_path):
    _cleaning("ant", {3: 0.5, 7: 2.0}, {3: 1.0, 7: 1.0, 9: 0.2}).save(tmp_path / "ant")
    _cleaning("upper", {1: 1.0}, {}).save(tmp_path / "upper")
    sets, meta = load_feature_sets(tmp_path)
    assert meta == dict(layer=1, setting="execution", sae_spec="resid:1")
    assert sets["ant"].features == [7, 3] and sets["ant"].in_task_vector == [3, 7, 9]  # strongest weight first
    assert sets["ant"].weights == [2.0, 0.5]
    assert load_feature_sets(tmp_path, ["ant"], top_k=1)[0]["ant"].features == [7]
    _cleaning("other", {1: 1.0}, {}, layer=2).save(tmp_path / "other")
    with pytest.raises(ValueError, match="cleaned with"):
        load_feature_sets(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_feature_sets(tmp_path / "missing")


def test_shared_scale_is_calibrated_on_the_training_pairs_and_used_for_every_feature(tmp_path):
    lm = pair_lm()
    sae = random_sae(lm)
    tasks = [Task("ant", tuple(ANTONYMS)), Task("upper", tuple(UPPER))]
    sets = {"ant": FeatureSet("ant", [3, 5]), "upper": FeatureSet("upper", [5, 9])}
    cfg = HeatmapConfig(layer=1, scale_grid=(0.5, 2.0, 8.0), n_eval=4)
    assert cfg.scale_mode == "shared" and cfg.n_score_tokens == 2
    res = positive_heatmap(lm, tasks, sets, sae, cfg, progress=False)
    # by hand: the grid value maximising the mean over tasks of the best own-feature effect on calibration prompts
    dirs = dict(zip([3, 5, 9], feature_directions(sae, [3, 5, 9])))
    means = []
    for g in cfg.scale_grid:
        best = []
        for task in tasks:
            cal = heatmap_steerer(lm, task, cfg, "calibration")
            best.append(max(float(cal.relative_loss_decrease(cal.score(1, (g * dirs[f])[None]).nll)[0]) for f in sets[task.name].features))
        means.append(sum(best) / len(best))
    want = cfg.scale_grid[max(range(3), key=lambda j: means[j])]
    assert res.shared_scale == want and res.scales == [want] * 3
    # calibration prompts come from the training pairs, disjoint from the evaluated (held-out) queries
    for task in tasks:
        cal, ev = heatmap_steerer(lm, task, cfg, "calibration"), heatmap_steerer(lm, task, cfg, "eval")
        train, held = task.split(cfg.eval_share, cfg.seed)
        q = lambda st: {lm.tokenizer.decode(p.ids[p.pairs[-1].input]).strip() for p in st.batch.prompts}  # noqa: E731
        assert q(cal) <= {x for x, _ in train.pairs} and q(ev) <= {x for x, _ in held.pairs}
