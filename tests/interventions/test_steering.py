"""Feature steering and heatmaps on tiny models, against direct transformers computations and hand-worked cases."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from icl_circuits import Task, icl_prompts, zero_shot_prompts
from icl_circuits.core.sites import Site
from icl_circuits.methods.steering import (
    FeatureSet,
    HeatmapConfig,
    HeatmapResult,
    NegativeConfig,
    PromptSteering,
    choose_scales,
    cluster_order,
    feature_directions,
    feature_intervention,
    heatmap_figures,
    log_grid,
    negative_steering,
    normalize_effects,
    positive_heatmap,
    steering_batch,
)
from icl_circuits.methods.task_vectors import ZeroShotSteering

from tests.helpers import ANTONYMS, UPPER
from tests.helpers import _steering_sae as _sae
from tests.helpers import _steering_setup as _setup


@pytest.mark.parametrize("family", ["gemma3", "gpt2"])
def test_feature_steering_adds_exactly_scale_times_decoder_row_at_chosen_positions(family):
    lm = _setup(family)
    sae = _sae(lm, layer=1)
    batch = icl_prompts(lm.tokenizer, Task("ant", tuple(ANTONYMS)), n_prompts=3, n_shots=2, seed=0)
    where = batch.arrow_mask("all")
    clean = lm.run(batch.input_ids, batch.attention_mask, read=["resid_pre.1"]).acts[Site(1, "resid_pre")]
    iv = feature_intervention(sae, feature=5, scale=7.0, positions=where)
    steered = lm.run(batch.input_ids, batch.attention_mask, read=["resid_pre.1"], interventions=[iv]).acts[Site(1, "resid_pre")]
    row = sae.W_dec.detach()[5].double()
    expected = (7.0 * row / row.norm()).float()  # exactly scale x the unit-norm decoder direction (the paper's steering)
    assert float(feature_directions(sae, [5])[0].norm()) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(feature_directions(sae, [5], unit=False)[0], sae.W_dec.detach()[5] / 0.5)  # the option: model units
    diff = steered - clean  # [batch, seq, d_model]
    torch.testing.assert_close(diff[where], expected.expand(int(where.sum()), -1), rtol=0, atol=1e-5)
    assert torch.equal(steered[~where], clean[~where])  # nowhere else, bit for bit
    assert iv.site == Site(1, "resid_pre")


def _reference_scores(lm, batch, steer_at, vector, pairs: str):
    """Full forward per prompt through plain transformers, a pre-hook adding `vector` at steer_at of block 1."""
    block = lm.adapter.blocks(lm.model)[1]
    nll, hits, n, n_first = 0.0, 0.0, 0, 0
    for b, p in enumerate(batch.prompts):
        pos = steer_at[b].nonzero().flatten().tolist()

        def hook(m, args, kwargs):
            h = args[0].clone()
            for q in pos:
                h[0, q] += vector
            return (h, *args[1:]), kwargs

        handle = block.register_forward_pre_hook(hook, with_kwargs=True)
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(torch.tensor([p.ids])).logits[0].float(), -1)
        handle.remove()
        spans = p.pairs if pairs == "all" else p.pairs[-1:]
        for s in spans:
            target = p.ids[s.outputs[0]]
            nll += -logp[s.arrow, target].item()
            hits += float(logp[s.arrow].argmax().item() == target)
            n += 1
            n_first += 1
    return nll / n, hits / n_first


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_prompt_steering_matches_direct_full_forward(family):
    lm = _setup(family)
    batch = icl_prompts(lm.tokenizer, Task("ant", tuple(ANTONYMS)), n_prompts=5, n_shots=3, seed=1)
    st = PromptSteering(lm, batch, 1, batch.arrow_mask("all"), scoring="all", vectors_per_pass=3, prompts_per_pass=2)
    vecs = torch.randn(4, lm.d_model)  # 2 passes of <= 3 vectors, 3 prompt chunks each
    got = st.score(vecs, need_accuracy=True)
    no_acc = st.score(vecs)
    for i in range(4):
        nll, acc = _reference_scores(lm, batch, batch.arrow_mask("all"), vecs[i], "all")
        assert float(got.nll[i]) == pytest.approx(nll, rel=1e-5)
        assert float(no_acc.nll[i]) == pytest.approx(nll, rel=1e-5)
        assert float(got.accuracy[i]) == pytest.approx(acc)
    base_nll, base_acc = _reference_scores(lm, batch, batch.arrow_mask("all"), torch.zeros(lm.d_model), "all")
    assert st.baseline_nll == pytest.approx(base_nll, rel=1e-5)
    assert st.baseline_accuracy == pytest.approx(base_acc)


def test_prompt_steering_zero_shot_agrees_with_zero_shot_steering():
    lm = _setup()
    zero = zero_shot_prompts(lm.tokenizer, Task("ant", tuple(ANTONYMS)), 6, seed=1)
    st = PromptSteering(lm, zero, 1, zero.arrow_mask("last"), vectors_per_pass=2)
    ref = ZeroShotSteering(lm, zero, [1])
    vecs = torch.randn(3, lm.d_model)
    rel = st.relative_loss_decrease(vecs)
    for i in range(3):
        assert float(rel[i]) == pytest.approx(ref.relative_loss_decrease(ref.evaluate(1, vecs[i])), rel=1e-4, abs=1e-6)


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
    lm = _setup()
    sae = _sae(lm)
    tasks = [Task("ant", tuple(ANTONYMS)), Task("upper", tuple(UPPER))]
    sets = {"ant": FeatureSet("ant", [3, 5], [3, 8]), "upper": FeatureSet("upper", [5, 9], [1])}
    cfg = HeatmapConfig(layer=1, scale_grid=(0.5, 2.0), n_eval=4, vectors_per_pass=3, scale_mode="per_feature")
    res = positive_heatmap(lm, tasks, sets, sae, cfg, out_dir=tmp_path, progress=False)
    assert res.features == [3, 5, 9] and res.raw.shape == (2, 3)
    assert res.owners == {3: ["ant"], 5: ["ant", "upper"], 9: ["upper"]}
    dirs = feature_directions(sae, res.features)
    for t, task in enumerate(tasks):  # each cell: a direct evaluation at the feature's chosen scale
        st = steering_batch(lm, task, cfg)
        for j in range(3):
            assert float(res.raw[t, j]) == pytest.approx(float(st.relative_loss_decrease((res.scales[j] * dirs[j])[None])[0]), rel=1e-4, abs=1e-6)
    for j, f in enumerate(res.features):  # per-feature scale = best grid value on its owner tasks (calibration split)
        best = max(range(2), key=lambda g: max(res.grid[t][f][g] for t in res.owners[f]))
        assert res.scales[j] == cfg.scale_grid[best]
        t = res.owners[f][0]
        cal = steering_batch(lm, tasks[res.tasks.index(t)], cfg, "calibration")
        assert res.grid[t][f][1] == pytest.approx(float(cal.relative_loss_decrease((2.0 * dirs[j])[None])[0]), rel=1e-4, abs=1e-6)
    in_tv, kept = res.marks()
    assert in_tv.tolist() == [[True, False, False], [False, False, False]]
    assert kept.tolist() == [[True, True, False], [False, True, True]]
    # resume: nothing is recomputed
    monkeypatch.setattr("icl_circuits.methods.steering.steering_batch", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    again = positive_heatmap(lm, tasks, sets, sae, cfg, out_dir=tmp_path, progress=False)
    assert torch.equal(again.raw, res.raw)
    assert torch.equal(HeatmapResult.from_dict(res.to_dict()).raw, res.raw)
    # a rerun with one more feature evaluates only that feature's cells
    calls = []
    monkeypatch.setattr("icl_circuits.methods.steering.steering_batch",
                        lambda lm, task, cfg, split="eval": calls.append((task.name, split)) or steering_batch(lm, task, cfg, split))
    more = {**sets, "upper": FeatureSet("upper", [5, 9, 11], [1])}
    grown = positive_heatmap(lm, tasks, more, sae, cfg, out_dir=tmp_path, progress=False)
    # the new feature's grid on its owner's calibration prompts, then its cell on every task's evaluation prompts
    assert grown.features == [3, 5, 9, 11] and calls == [("upper", "calibration"), ("ant", "eval"), ("upper", "eval")]
    torch.testing.assert_close(grown.raw[:, :3], res.raw)
    with pytest.raises(ValueError, match="other prompts"):
        positive_heatmap(lm, tasks, sets, sae, HeatmapConfig(layer=1, scale_grid=(1.0,), n_eval=5), out_dir=tmp_path, progress=False)
    info = heatmap_figures(res, tmp_path / "fig", floor=0.0)
    assert (tmp_path / "fig" / "heatmap_raw.png").is_file() and (tmp_path / "fig" / "heatmap_raw.svg").is_file()
    assert sorted(info["row_order"]) == ["ant", "upper"]


def test_top_only_heatmap_keeps_each_tasks_strongest_feature():
    lm = _setup()
    sae = _sae(lm)
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


def test_negative_steering_picks_smallest_scale_reaching_the_drop():
    lm = _setup()
    sae = _sae(lm)
    tasks = [Task("ant", tuple(ANTONYMS))]
    sets = {"ant": FeatureSet("ant", [3, 5])}
    res = negative_steering(lm, tasks, sets, sae, NegativeConfig(layer=1, n_prompts=2, n_shots=3, scales=(1.0, 50.0), min_drop=-1.0), progress=False)
    assert res.scales == [1.0, 1.0]  # min_drop -1: the first scale always qualifies
    batch = icl_prompts(lm.tokenizer, Task("ant", tuple(ANTONYMS)).split(0.5, 0)[0], 2, 3, seed=0)
    st = PromptSteering(lm, batch, 1, batch.arrow_mask("all"), scoring="all")
    acc = st.score(-1.0 * feature_directions(sae, [3, 5]), need_accuracy=True).accuracy
    torch.testing.assert_close(res.drop[0], st.baseline_accuracy - acc)


def test_bad_inputs_are_clear_errors():
    lm = _setup()
    sae = _sae(lm)
    zero = zero_shot_prompts(lm.tokenizer, Task("ant", tuple(ANTONYMS)), 3, seed=1)
    with pytest.raises(ValueError, match="outside"):
        feature_directions(sae, [12])
    with pytest.raises(ValueError, match="no features"):
        feature_directions(sae, [])
    with pytest.raises(ValueError, match="bool mask"):
        PromptSteering(lm, zero, 1, zero.arrow_mask("last")[:, :2])
    st = PromptSteering(lm, zero, 1, zero.arrow_mask("last"))
    with pytest.raises(ValueError, match="d_model"):
        st.score(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="setting"):
        HeatmapConfig(setting="bogus")
    with pytest.raises(ValueError, match="NaN"):
        normalize_effects(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="scales"):
        NegativeConfig(scales=(4.0, 1.0))
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
    from icl_circuits.methods.steering import load_feature_sets

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
    lm = _setup()
    sae = _sae(lm)
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
            cal = steering_batch(lm, task, cfg, "calibration")
            best.append(max(float(cal.relative_loss_decrease((g * dirs[f])[None])[0]) for f in sets[task.name].features))
        means.append(sum(best) / len(best))
    want = cfg.scale_grid[max(range(3), key=lambda j: means[j])]
    assert res.shared_scale == want and res.scales == [want] * 3
    # calibration prompts come from the training pairs, disjoint from the evaluated (held-out) queries
    for task in tasks:
        cal, ev = steering_batch(lm, task, cfg, "calibration"), steering_batch(lm, task, cfg, "eval")
        train, held = task.split(cfg.eval_share, cfg.seed)
        q = lambda st: {lm.tokenizer.decode(p.ids[p.pairs[-1].input]).strip() for p in st.batch.prompts}  # noqa: E731
        assert q(cal) <= {x for x, _ in train.pairs} and q(ev) <= {x for x, _ in held.pairs}
    from icl_circuits.methods.steering import PAPER_NEGATIVE_SCALES, paper_negative_scales

    assert len(PAPER_NEGATIVE_SCALES) == 50 and PAPER_NEGATIVE_SCALES[0] == 1.0 and PAPER_NEGATIVE_SCALES[-1] == pytest.approx(31.6, abs=0.05)
    assert paper_negative_scales(15.0) == PAPER_NEGATIVE_SCALES  # at the paper's own scale: exactly the paper's range
    sc = paper_negative_scales(300.0)
    assert sc[0] == pytest.approx(20.0) and sc[-1] == pytest.approx(632.0, rel=2e-3)



# -- negative steering: the fast path against a plain full forward ------------------------------------


def _taught(family: str, steps: int = 10):
    """A tiny model whose (untied) unembedding is fitted a little to the UPPER task's outputs at the arrows of
    the prompts the test uses, so accuracies are neither all 0 nor all 1 and steering changes them."""
    lm = _setup(family)
    head = lm.model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)  # untied: inputs stay random
    batch = icl_prompts(lm.tokenizer, Task("up", tuple(UPPER)).split(0.5, 0)[0], 5, 4, seed=0)
    at = batch.arrow_mask("all")
    with torch.no_grad():
        h = lm.model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state[at]  # [n, d]
    targets = batch.input_ids[:, 1:][at[:, :-1]]  # [n]
    w = head.weight.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(h @ w.T, targets).backward()
        opt.step()
    head.weight.data.copy_(w.detach())
    return lm


def _slow_accuracy(lm, batch, layer: int, vector: torch.Tensor) -> float:
    """Plain transformers forward per prompt, a pre-hook adding `vector` at every arrow of block `layer`,
    full-vocabulary log-softmax; share of pairs whose output's first token is the argmax at its arrow."""
    block = lm.adapter.blocks(lm.model)[layer]
    hits = n = 0
    for p in batch.prompts:
        arrows = [s.arrow for s in p.pairs]

        def hook(m, args, kwargs):
            h = args[0].clone()
            h[0, arrows] += vector
            return (h, *args[1:]), kwargs

        handle = block.register_forward_pre_hook(hook, with_kwargs=True)
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(torch.tensor([p.ids])).logits[0].float(), -1)  # [seq, vocab]
        handle.remove()
        for s in p.pairs:
            hits += int(logp[s.arrow].argmax()) == p.ids[s.outputs[0]]
            n += 1
    return hits / n


@pytest.mark.parametrize("family", ["gemma3", "gpt2", "gemma2"])  # gemma2: final-logit softcap
def test_negative_steering_matches_slow_direct_computation(family, tmp_path):
    lm = _taught(family)
    sae = _sae(lm, layer=1)
    tasks = [Task("up", tuple(UPPER)), Task("ant", tuple(ANTONYMS))]
    sets = {"up": FeatureSet("up", [3, 5, 0]), "ant": FeatureSet("ant", [5, 7])}
    scales = (0.5, 2.0, 8.0, 30.0)
    cfg = NegativeConfig(layer=1, n_prompts=5, n_shots=4, scales=scales, min_drop=0.1, prompts_per_pass=2, vectors_per_pass=3)
    res = negative_steering(lm, tasks, sets, sae, cfg, out_dir=tmp_path, progress=False)

    # the reference: same prompts (training half, seed), each feature's scales in ascending order
    batches = {t.name: icl_prompts(lm.tokenizer, t.split(0.5, 0)[0], 5, 4, seed=0) for t in tasks}
    base = {n: _slow_accuracy(lm, b, 1, torch.zeros(lm.d_model)) for n, b in batches.items()}
    want_scales, want_drop = [], []
    for f in [0, 3, 5, 7]:
        row = sae.W_dec.detach()[f].double()
        unit = (row / row.norm()).float()
        for s in scales:
            drops = [base[n] - _slow_accuracy(lm, batches[n], 1, -s * unit) for n in ("up", "ant")]
            if max(drops) >= 0.1 or s == scales[-1]:
                break
        want_scales.append(s)
        want_drop.append(drops)
    assert res.features == [0, 3, 5, 7]
    assert res.scales == want_scales
    torch.testing.assert_close(res.drop, torch.tensor(want_drop).T.float(), rtol=0, atol=1e-6)
    assert res.baseline_accuracy == pytest.approx(base, abs=1e-6)
    assert base["up"] > 0.25 and len(set(want_scales)) > 1  # the check has teeth: accuracies and scales vary

    # batching is speed only: other pass sizes give the same result, and a saved run resumes under them
    other = negative_steering(lm, tasks, sets, sae, replace(cfg, prompts_per_pass=3, vectors_per_pass=1), progress=False)
    assert other.scales == res.scales and torch.equal(other.drop, res.drop)
    again = negative_steering(lm, tasks, sets, sae, replace(cfg, vectors_per_pass=2), out_dir=tmp_path, progress=False)
    assert again.scales == res.scales and torch.equal(again.drop, res.drop)
    with pytest.raises(ValueError, match="another config"):
        negative_steering(lm, tasks, sets, sae, replace(cfg, min_drop=0.2), out_dir=tmp_path, progress=False)


def test_argmax_check_agrees_with_full_argmax_on_large_vocab_and_ties():
    import transformers as tf

    from icl_circuits import LM
    from icl_circuits.methods.steering import ArgmaxCheck

    torch.manual_seed(0)
    for softcap in (None, 3.0):
        config = tf.Gemma2Config(vocab_size=5000, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, head_dim=8, final_logit_softcapping=softcap)  # fmt: skip
        lm = LM(tf.AutoModelForCausalLM.from_config(config).eval())
        w = lm.model.get_output_embeddings().weight
        with torch.no_grad():
            w[11] = w[40]  # exact ties: token 11 beats 40 (first index), 40 loses to 11
        h = torch.randn(300, 16) * torch.logspace(-1, 2, 300)[:, None]  # [n, d]: flat to peaked rows
        h[:20] = w[40] * 50  # rows where 11 and 40 tie at the top
        full = lm.logprobs_of(h)  # [n, vocab]
        order = full.argsort(-1, descending=True)
        targets = torch.cat([order[:100, 0], order[100:200, 1], order[200:, 7]])  # [n]: the winner, runners-up, far below
        targets[:10], targets[10:20] = 11, 40
        check = ArgmaxCheck(lm, chunk=64)
        assert check.screen
        got = check.hits(h, targets)
        want = full.argmax(-1) == targets
        assert torch.equal(got, want) and want[:10].all() and not want[10:20].any() and want[100:].sum() < 5
