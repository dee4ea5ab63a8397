"""Task Vector Cleaning and its ITO baseline on tiny models, against independent references."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from icl_circuits import Task, zero_shot_prompts
from icl_circuits.core.storage import ConfigMismatch
from icl_circuits.data.prompts import PromptFormat
from icl_circuits.methods.cleaning import CleaningConfig, CleaningDiverged, clean_vector, jumprelu, load_cleaning
from icl_circuits.methods.cleaning_task import cleaning_setup, clean_task
from icl_circuits.experiments.clean import l1_sweep, run_cleaning
from icl_circuits.methods.ito import gradient_pursuit, ito_weights
from icl_circuits.sae.dictionary import JumpReLUSAE, SAEConfig
from icl_circuits.interventions.steer import Steerer
from icl_circuits.methods.task_vectors import TaskVectorConfig

from tests.helpers import ANTONYMS, MANY, pair_lm, unit_sae, antonym_steerer


def _direct_loss(lm, steering: Steerer, layer: int, v: torch.Tensor) -> float:
    """Reference NLL: each prompt alone through plain transformers from layer 0, a forward-pre-hook adding v
    at the query arrow, full-vocabulary logits at every position."""
    block = lm.adapter.blocks(lm.model)[layer]
    nlls = []
    for p in steering.batch.prompts:
        arrow, target = p.pairs[-1].arrow, p.ids[p.pairs[-1].arrow + 1]

        def hook(m, args, kwargs):
            h = args[0].clone()
            h[0, arrow] += v.to(h.dtype)
            return (h, *args[1:]), kwargs

        handle = block.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                logits = lm.model(torch.tensor([p.ids])).logits[0]  # [seq, vocab]
        finally:
            handle.remove()
        nlls.append(-torch.log_softmax(logits[arrow].double(), -1)[target].item())
    return sum(nlls) / len(nlls)


# GPT-2 runs entirely in float64, so central differences are exact to ~1e-9; Gemma-style RMSNorms compute in
# float32 even in a float64 model, so there a larger step keeps float32 rounding out of the difference quotient.
@pytest.mark.parametrize("family, eps, rel", [("gpt2", 1e-6, 1e-6), ("gemma3", 1e-3, 2e-2)])
def test_tvc_gradient_matches_finite_differences_of_a_direct_forward(family, eps, rel):
    lm = pair_lm(family, torch.float64)
    sae = unit_sae(lm).double()
    steering = antonym_steerer(lm)
    l1 = 0.01
    W, b = sae.W_dec.detach(), sae.b_dec.detach()
    theta = sae.pre_acts(torch.randn(lm.d_model, dtype=torch.float64) * 3).detach()
    active = (theta > sae.threshold.detach() + 1e-3).nonzero().flatten()
    assert len(active) >= 3

    # ours: the exact loss clean_vector optimises, differentiated by autograd through Steerer
    t = theta.clone().requires_grad_(True)
    w = jumprelu(sae, t)
    loss = steering.loss(1, w @ W + b) + l1 * w.sum()
    (grad,) = torch.autograd.grad(loss, t)

    # reference: central differences of the direct full-forward loss
    def direct(th: torch.Tensor) -> float:
        wt = torch.relu(th) * (th > sae.threshold.detach())
        return _direct_loss(lm, steering, 1, wt @ W + b) + l1 * wt.sum().item()

    assert direct(theta) == pytest.approx(loss.item(), rel=1e-6)
    for i in active[:4].tolist():
        e = torch.zeros_like(theta)
        e[i] = eps
        fd = (direct(theta + e) - direct(theta - e)) / (2 * eps)
        assert grad[i].item() == pytest.approx(fd, rel=rel, abs=1e-7)
    inactive = (theta <= sae.threshold.detach()).nonzero().flatten()
    assert (grad[inactive] == 0).all()  # below threshold a latent has no gradient: it stays off


class _Quadratic:
    """A stand-in steering setting whose 'NLL' is ||v - target||^2: the optimum is known exactly."""

    def __init__(self, lm, target: torch.Tensor) -> None:
        self.lm = SimpleNamespace(name=lm.name, d_model=lm.d_model, n_layers=lm.n_layers)
        self.target = target

    def loss(self, layer: int, v: torch.Tensor) -> torch.Tensor:
        return ((v - self.target) ** 2).sum()


def test_planted_three_directions_are_recovered():
    lm = pair_lm()
    sae = unit_sae(lm, d_sae=24, seed=3)
    planted = [2, 9, 17]
    w_true = torch.zeros(24)
    w_true[planted] = torch.tensor([2.0, 1.5, 1.0])
    tv = w_true @ sae.W_dec.detach() + sae.b_dec.detach()  # task vector = b_dec + sum of 3 decoder rows
    assert int((sae.encode(tv) > 0).sum()) > 3  # plain SAE encoding is cluttered (as the paper finds)
    cfg = CleaningConfig(l1_coeff=0.02, lr=0.05, patience=50, max_steps=1000)
    r = clean_vector(sae, _Quadratic(lm, tv), 1, tv, cfg)
    assert r.l0 <= 3 and set(r.features) <= set(planted) and len(r.features) == 3
    torch.testing.assert_close(r.weights[planted], w_true[planted], atol=0.05, rtol=0)  # L1 shrinks each by λ/2


def test_planted_directions_on_a_real_tiny_model():
    """The 'task' is whatever the planted vector makes the model say: TVC must keep only its latents."""
    lm = pair_lm()
    sae = unit_sae(lm, d_sae=24, seed=4, scale=4.0)
    zero = zero_shot_prompts(lm.tokenizer, Task("ant", tuple(ANTONYMS)), 8, seed=1)
    planted = [1, 7, 20]
    w_true = torch.zeros(24)
    w_true[planted] = torch.tensor([3.0, 2.5, 2.0])
    tv = w_true @ sae.W_dec.detach() + sae.b_dec.detach()
    # relabel each prompt's target as the steered model's top token at the arrow
    base = Steerer(lm, zero, layers=[1])
    with torch.no_grad():
        top = base.logprobs(1, tv).argmax(-1)
    base.scoring.targets = top
    r = clean_vector(sae, base, 1, tv, CleaningConfig(l1_coeff=0.02, lr=0.3, max_steps=600))
    assert int((sae.encode(tv) > 0).sum()) > 3
    assert r.l0 <= 3 and set(r.features) == set(planted)
    with torch.no_grad():
        steered = base.loss(1, r.weights @ sae.W_dec + sae.b_dec).item()
        planted_loss = base.loss(1, tv).item()
        unsteered = base.loss(1, torch.zeros(lm.d_model)).item()
    assert steered < unsteered and steered == pytest.approx(planted_loss, abs=0.01)  # the planted vector's effect is kept


def test_early_stopping_fires_after_patience_steps_without_an_l0_change():
    lm = pair_lm()
    sae = unit_sae(lm)
    tv = torch.randn(lm.d_model) * 2
    setting = _Quadratic(lm, tv)
    # λ = 0 and a tiny lr: L0 never changes, so it stops after exactly `patience` steps
    r = clean_vector(sae, setting, 1, tv, CleaningConfig(l1_coeff=0.0, lr=1e-6, patience=7, max_steps=100))
    assert (r.stopped, r.steps, len(r.l0_history)) == ("patience", 7, 7)
    # when L0 changes, the count starts again: it stops `patience` steps after the last change
    r = clean_vector(sae, setting, 1, tv, CleaningConfig(l1_coeff=5.0, lr=0.1, patience=10, max_steps=500))
    changes = [i for i in range(1, len(r.l0_history)) if r.l0_history[i] != r.l0_history[i - 1]]
    first_change = 0 if r.l0_history[0] != int((r.start_weights > 0).sum()) else None
    last = max(changes) if changes else first_change
    assert r.stopped == "patience" and last is not None and r.steps == last + 1 + 10
    r = clean_vector(sae, setting, 1, tv, CleaningConfig(l1_coeff=0.0, lr=1e-6, patience=50, max_steps=5))
    assert (r.stopped, r.steps) == ("max_steps", 5)


def test_bad_input_gives_clear_errors():
    lm = pair_lm()
    steering = antonym_steerer(lm)
    other = unit_sae(SimpleNamespace(d_model=lm.d_model + 8, name=lm.name, dtype=torch.float32))
    with pytest.raises(ValueError, match="d_in"):
        clean_vector(other, steering, 1, torch.zeros(lm.d_model))
    with pytest.raises(ValueError, match="resid_pre.1"):
        clean_vector(unit_sae(lm, layer=0), steering, 1, torch.zeros(lm.d_model))
    with pytest.raises(ValueError, match="NaN"):
        clean_vector(unit_sae(lm), steering, 1, torch.full((lm.d_model,), float("nan")))
    with pytest.raises(ValueError, match=r"vector must be"):
        clean_vector(unit_sae(lm), steering, 1, torch.zeros(lm.d_model + 1))
    # no valid prompts: with no space before the output, the tokenizer glues arrow and output together
    glued = PromptFormat(before_output="")
    with pytest.raises(ValueError, match="0 valid held-out prompts"):
        cleaning_setup(lm, Task("many", tuple(MANY)), 1, CleaningConfig(n_train=2, n_eval=2), TaskVectorConfig(n_shots=2, n_prompts=2), glued)
    with pytest.raises(ValueError, match="valid held-out prompts"):  # too few pairs for 24 + 24 prompts
        cleaning_setup(lm, Task("small", tuple(ANTONYMS)), 1, CleaningConfig(), TaskVectorConfig(n_shots=2, n_prompts=2))
    with pytest.raises(ValueError, match="setting"):
        CleaningConfig(setting="bogus")


def test_nan_loss_raises_with_the_partial_result():
    lm = pair_lm()
    sae = unit_sae(lm)

    class Exploding(_Quadratic):
        calls = 0

        def loss(self, layer, v):
            self.calls += 1
            return super().loss(layer, v) * (float("nan") if self.calls > 3 else 1.0)

    with pytest.raises(CleaningDiverged, match="step 3") as err:
        clean_vector(sae, Exploding(lm, torch.randn(lm.d_model)), 1, torch.randn(lm.d_model), CleaningConfig(l1_coeff=0))
    assert err.value.partial.steps == 3 and torch.isfinite(err.value.partial.weights).all()


def test_gradient_pursuit_against_hand_worked_and_brute_force_cases():
    # orthonormal atoms: the signal 3 e0 + 2 e3 is recovered exactly in 2 iterations
    D = torch.eye(6)
    w = gradient_pursuit(torch.tensor([3.0, 0, 0, 2, 0, 0]), D, 2)
    torch.testing.assert_close(w, torch.tensor([3.0, 0, 0, 2, 0, 0]))
    # non-negative: a negative component is never used
    w = gradient_pursuit(torch.tensor([3.0, -5, 0, 0, 0, 0]), D, 3)
    assert (w >= 0).all() and w[1] == 0 and w[0] == pytest.approx(3.0)
    # atom norms do not matter: weights come back in the dictionary's own units
    w = gradient_pursuit(torch.tensor([3.0, 0, 0, 2, 0, 0]), D * torch.arange(1, 7.0)[:, None], 2)
    torch.testing.assert_close(w, torch.tensor([3.0, 0, 0, 0.5, 0, 0]))
    # random overcomplete dictionary: at most k atoms, non-negative, error falls with k and is within
    # a small margin of the best non-negative least-squares fit on the same support (brute force)
    g = torch.Generator().manual_seed(0)
    D = torch.randn(40, 16, generator=g, dtype=torch.float64)
    y = torch.rand(40, generator=g, dtype=torch.float64) @ D
    errs = []
    for k in (1, 3, 6, 10):
        w = gradient_pursuit(y, D, k)
        assert int((w > 0).sum()) <= k and (w >= 0).all()
        errs.append((y - w @ D).norm().item())
    assert errs == sorted(errs, reverse=True)
    with pytest.raises(ValueError):
        gradient_pursuit(y, D, 0)


def test_ito_weights_reconstruct_through_the_sae_decoder():
    lm = pair_lm()
    sae = unit_sae(lm, d_sae=24)
    w_true = torch.zeros(24)
    w_true[[3, 11]] = torch.tensor([2.0, 1.0])
    v = w_true @ sae.W_dec.detach() + sae.b_dec.detach()
    w = ito_weights(sae, v, 5)
    assert int((w > 0).sum()) <= 5
    torch.testing.assert_close(w @ sae.W_dec.detach() + sae.b_dec.detach(), v, atol=0.15, rtol=0)


def test_clean_task_end_to_end_scores_every_method_and_round_trips(tmp_path):
    lm = pair_lm()
    sae = unit_sae(lm, scale=3.0)
    task = Task("many", tuple(MANY))
    tv_cfg = TaskVectorConfig(n_prompts=4, n_shots=4, eval_share=0.5)
    cfg = CleaningConfig(n_train=6, n_eval=6, max_steps=30, patience=5, l1_coeff=0.01)
    r = clean_task(lm, sae, task, 1, cfg, tv_cfg, sae_spec="tiny", ito_l0s=(2, 4))
    assert set(r.scores) == {"zero_shot", "tv", "sae_reconstruction", "ito_2", "ito_4", "tvc"}
    assert r.scores["ito_2"]["l0"] <= 2 and r.scores["sae_reconstruction"]["l0"] == len(r.initial_features)
    # the evaluation batch is scored independently: recompute the TV's relative loss decrease by hand
    setup = cleaning_setup(lm, task, 1, cfg, tv_cfg)
    torch.testing.assert_close(setup.vector, r.vector)
    direct_tv = _direct_loss(lm, setup.evaluation, 1, r.vector)
    direct_zero = _direct_loss(lm, setup.evaluation, 1, torch.zeros(lm.d_model))
    assert r.scores["tv"]["relative_loss_decrease"] == pytest.approx((direct_zero - direct_tv) / direct_zero, rel=1e-4)
    assert [e["index"] for e in r.feature_effects] == r.features
    # train and evaluation prompts are disjoint
    train_q = {p.text for p in setup.train.batch.prompts}
    assert not train_q & {p.text for p in setup.evaluation.batch.prompts}
    # save / load round trip
    r.save(tmp_path / "r")
    back = load_cleaning(tmp_path / "r")
    assert back.features == r.features and back.scores == json.loads(json.dumps(r.scores))
    torch.testing.assert_close(back.weights, r.weights)
    assert back.l0_history == r.l0_history and back.stopped == r.stopped
    # deterministic on CPU
    again = clean_task(lm, sae, task, 1, cfg, tv_cfg, sae_spec="tiny", ito_l0s=(2, 4))
    assert torch.equal(again.weights, r.weights)


def test_detection_setting_steers_the_fake_pair_output():
    lm = pair_lm()
    task = Task("many", tuple(MANY))
    cfg = CleaningConfig(n_train=4, n_eval=4, setting="detection")
    setup = cleaning_setup(lm, task, 1, cfg, TaskVectorConfig(n_prompts=3, n_shots=3))
    for p, row in zip(setup.train.batch.prompts, setup.train.steer_at):
        assert row.nonzero().flatten().tolist() == [p.pairs[0].outputs[-1]]
        assert lm.tokenizer.decode([p.ids[p.pairs[0].outputs[-1]]]).strip() == "Y"
    # the detection vector is the mean of resid_pre over the demonstrations' output tokens
    from icl_circuits.data.prompts import icl_prompts
    from icl_circuits.methods.task_vectors import collect_resid

    train, _ = task.split(0.5, 0)
    icl = icl_prompts(lm.tokenizer, train, 3, 3, seed=0)
    resid, _ = collect_resid(lm, icl, [1])
    rows = [resid[1][b, s.outputs[-1]] for b, p in enumerate(icl.prompts) for s in p.pairs[:-1]]
    torch.testing.assert_close(setup.vector, torch.stack(rows).mean(0))


def test_run_cleaning_resumes_and_sweep_writes_plots(tmp_path, monkeypatch):
    import icl_circuits.experiments.clean as runs

    lm = pair_lm()
    sae = unit_sae(lm, scale=3.0)
    tasks = [Task("many", tuple(MANY)), Task("many2", tuple((y, x) for x, y in MANY))]
    tv_cfg = TaskVectorConfig(n_prompts=3, n_shots=3)
    cfg = CleaningConfig(n_train=4, n_eval=4, max_steps=8, patience=3)
    results, files = run_cleaning(lm, sae, tasks, 1, tmp_path / "c", cfg, tv_cfg, sae_spec="tiny", progress=False)
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert [r["task"] for r in summary] == ["many", "many2", "mean"]
    assert summary[-1]["tvc"] == pytest.approx((summary[0]["tvc"] + summary[1]["tvc"]) / 2)
    assert (tmp_path / "c" / "summary.png").stat().st_size > 1000
    assert (tmp_path / "c" / "many" / "curves.png").is_file()
    calls = []
    monkeypatch.setattr(runs, "clean_task", lambda *a, **k: calls.append(a) or results[0])
    again, _ = run_cleaning(lm, sae, tasks, 1, tmp_path / "c", cfg, tv_cfg, sae_spec="tiny", progress=False)
    assert calls == [] and again[1].features == results[1].features  # both loaded from disk
    monkeypatch.undo()

    rows, files = l1_sweep(lm, sae, tasks[:1], 1, tmp_path / "s", [1e-3, 1e-1], cfg, tv_cfg, progress=False)
    tvc = [r for r in rows if r["method"] == "tvc"]
    assert [r["l1_coeff"] for r in tvc] == [1e-3, 1e-1]
    tv = next(r for r in rows if r["method"] == "tv")
    assert tv["tv_loss_delta"] == 0 and tv["l0_fraction"] is None  # the raw TV is dense
    assert all(math.isfinite(r["relative_loss_decrease"]) for r in rows)
    assert (tmp_path / "s" / "l1_sweep.png").is_file() and (tmp_path / "s" / "tv_loss_delta.svg").is_file()
    # resume: nothing recomputed; a retrained SAE (same spec, other weights) is refused, in the sweep as in the
    # cleaning run; a user task that shares a name but not the pairs is computed afresh
    monkeypatch.setattr(runs, "clean_vector", lambda *a, **k: pytest.fail("recomputed"))
    assert l1_sweep(lm, sae, tasks[:1], 1, tmp_path / "s", [1e-3, 1e-1], cfg, tv_cfg, progress=False)[0] == rows
    other = unit_sae(lm, scale=3.0, seed=7)
    with pytest.raises(ConfigMismatch, match="sae_digest"):
        l1_sweep(lm, other, tasks[:1], 1, tmp_path / "s", [1e-3, 1e-1], cfg, tv_cfg, progress=False)
    with pytest.raises(ConfigMismatch, match="sae_digest"):
        run_cleaning(lm, other, tasks, 1, tmp_path / "c", cfg, tv_cfg, sae_spec="tiny", progress=False)
    monkeypatch.undo()
    renamed = [Task("many", tasks[1].pairs)]
    again = l1_sweep(lm, sae, renamed, 1, tmp_path / "s", [1e-3, 1e-1], cfg, tv_cfg, progress=False)[0]
    fresh = l1_sweep(lm, sae, renamed, 1, tmp_path / "s2", [1e-3, 1e-1], cfg, tv_cfg, progress=False)[0]
    assert again == fresh and again != rows


def test_layer_comparison_scores_every_method_at_every_layer(tmp_path):
    from icl_circuits.methods.cleaning_task import METHODS
    from icl_circuits.experiments.clean import layer_comparison

    lm = pair_lm()
    saes = {0: unit_sae(lm, layer=0, scale=3.0), 1: unit_sae(lm, layer=1, scale=3.0, seed=1)}
    rows, files = layer_comparison(
        lm, saes, [Task("many", tuple(MANY))], tmp_path, CleaningConfig(n_train=4, n_eval=4, max_steps=5, patience=2),
        TaskVectorConfig(n_prompts=2, n_shots=3), progress=False,
    )  # fmt: skip
    assert {(r["layer"], r["method"]) for r in rows} == {(l, m) for l in (0, 1) for m in METHODS}
    # each layer's TV row is that layer's own task vector, scored independently
    for layer in (0, 1):
        setup = cleaning_setup(lm, Task("many", tuple(MANY)), layer, CleaningConfig(n_train=4, n_eval=4), TaskVectorConfig(n_prompts=2, n_shots=3))
        tv = next(r for r in rows if r["layer"] == layer and r["method"] == "tv")
        assert tv["relative_loss_decrease"] == pytest.approx(setup.evaluation.relative_loss_decrease(setup.evaluation.evaluate(layer, setup.vector)))
    assert (tmp_path / "layer_comparison.png").is_file()


def test_mean_encode_init_starts_from_the_mean_of_token_encodings():
    lm = pair_lm()
    sae = unit_sae(lm, scale=3.0)
    setup = cleaning_setup(lm, Task("many", tuple(MANY)), 1, CleaningConfig(n_train=4, n_eval=4), TaskVectorConfig(n_prompts=2, n_shots=3))
    init = setup.initial_latents(sae, CleaningConfig(init="mean_encode"))
    torch.testing.assert_close(init, torch.stack([sae.encode(t) for t in setup.tokens]).mean(0))
    assert setup.initial_latents(sae, CleaningConfig(init="encode_mean")) is None
    assert setup.initial_latents(sae, CleaningConfig()) is None  # 'auto' in the execution setting = Alg. 1's SAE(TV)
    r = clean_vector(sae, setup.train, 1, setup.vector, CleaningConfig(max_steps=1, lr=1e-9), init=init)
    assert set(torch.nonzero(r.start_weights > 0).flatten().tolist()) == set(torch.nonzero(init > 0).flatten().tolist())
    # initial_weights stays SAE(TV) whatever the start (the "in raw task vector" marks and L0 fractions read it)
    torch.testing.assert_close(r.initial_weights, sae.encode(setup.vector).float())
    assert set(r.initial_features) != set(torch.nonzero(init > 0).flatten().tolist())  # the two differ here
    with pytest.raises(ValueError, match="init"):
        clean_vector(sae, setup.train, 1, setup.vector, init=-init - 1)


def test_topk_sae_starts_from_its_own_top_k_encoding():
    """Alg. 1 starts at SAE(TV); for a TopK SAE that is the top k latents, not every positive pre-activation."""
    lm = pair_lm()
    base = unit_sae(lm, d_sae=24)
    tensors = {**base.tensors(), "threshold": torch.zeros(24), "b_enc": torch.full((24,), 5.0)}  # all 24 pre-acts > 0
    sae = JumpReLUSAE(SAEConfig(d_in=lm.d_model, d_sae=24, site="resid_pre.1", layer=1, model=lm.name, k=3), tensors)
    steering = antonym_steerer(lm)
    v = torch.randn(lm.d_model)
    assert int((sae.pre_acts(v) > 0).sum()) == 24
    r = clean_vector(sae, steering, 1, v, CleaningConfig(max_steps=1, l1_coeff=0.0, lr=1e-6))
    top3 = set(sae.pre_acts(v).topk(3).indices.tolist())
    assert set(torch.nonzero(r.initial_weights).flatten().tolist()) == top3
    torch.testing.assert_close(r.initial_weights, sae.encode(v).float())
    assert r.l0_history[0] <= 3  # a latent outside the top k never turns on (its start is below threshold)


def test_detection_tvc_starts_from_the_ito_support(tmp_path):
    """The authors' detection TVC starts from gradient pursuit with k = 7 latents, not from SAE(vector)."""
    from icl_circuits.methods.cleaning import load_cleaning
    from icl_circuits.methods.ito import ito_weights

    lm = pair_lm()
    sae = unit_sae(lm, scale=3.0)
    cfg = CleaningConfig(n_train=4, n_eval=4, setting="detection", max_steps=1, lr=1e-9, l1_coeff=0.0)
    assert cfg.start == "ito" and CleaningConfig(setting="detection", init="encode_mean").start == "encode_mean"
    setup = cleaning_setup(lm, Task("many", tuple(MANY)), 1, cfg, TaskVectorConfig(n_prompts=2, n_shots=3))
    init = setup.initial_latents(sae, cfg)
    ito = ito_weights(sae, setup.vector, 7)
    torch.testing.assert_close(init, ito)
    r = clean_vector(sae, setup.train, 1, setup.vector, cfg, init=init)
    support = set(torch.nonzero(ito > 0).flatten().tolist())
    assert 0 < len(support) <= 7
    assert set(torch.nonzero(r.start_weights > 0).flatten().tolist()) == support
    torch.testing.assert_close(r.initial_weights, sae.encode(setup.vector).float())
    back = load_cleaning(r.save(tmp_path / "r"))
    torch.testing.assert_close(back.start_weights, r.start_weights)


def test_lambda_defaults_by_setting_and_an_explicit_one_is_kept():
    """λ left out is 0.01 for execution and 1e-3 for detection, and the number lands in the run's config."""
    assert CleaningConfig().l1_coeff == 0.01 and CleaningConfig().to_dict()["l1_coeff"] == 0.01
    assert CleaningConfig(setting="detection").l1_coeff == 1e-3
    assert CleaningConfig(setting="detection").to_dict()["l1_coeff"] == 1e-3
    assert CleaningConfig(setting="detection", l1_coeff=0.01).l1_coeff == 0.01
    assert CleaningConfig(setting="execution", l1_coeff=0.0).l1_coeff == 0.0  # 0 is a value, not "unset"
    assert replace(CleaningConfig(setting="detection"), lr=0.1).l1_coeff == 1e-3


def test_a_resid_post_sae_of_the_layer_before_cleans_resid_pre():
    """Gemma Scope 2 names the residual after block L-1 resid_post.L-1: the same tensor as resid_pre.L."""
    from icl_circuits.methods.cleaning import check_steering_sae

    lm = pair_lm()
    base = unit_sae(lm)
    post = JumpReLUSAE(SAEConfig(d_in=lm.d_model, d_sae=24, site="resid_post.0", layer=0, model=lm.name), base.tensors())
    steering = antonym_steerer(lm)
    check_steering_sae(post, steering, 1)  # accepted
    r = clean_vector(post, steering, 1, torch.randn(lm.d_model), CleaningConfig(max_steps=2))
    assert r.steps == 2
    wrong = JumpReLUSAE(SAEConfig(d_in=lm.d_model, d_sae=24, site="resid_post.1", layer=1, model=lm.name), base.tensors())
    with pytest.raises(ValueError, match="resid_pre.1"):
        check_steering_sae(wrong, steering, 1)


def test_batched_feature_effects_and_baselines_equal_one_evaluation_per_vector():
    from icl_circuits.methods.cleaning import frozen_decoder
    from icl_circuits.methods.cleaning_task import baseline_scores, feature_effects, feature_effects_one_by_one

    lm = pair_lm()
    sae = unit_sae(lm, scale=3.0)
    task = Task("many", tuple(MANY))
    cfg = CleaningConfig(n_train=6, n_eval=6, max_steps=30, patience=5, l1_coeff=0.001)
    setup = cleaning_setup(lm, task, 1, cfg, TaskVectorConfig(n_prompts=4, n_shots=4, eval_share=0.5))
    r = clean_vector(sae, setup.train, 1, setup.vector, cfg, setup.evaluation)
    assert r.l0 >= 3
    for scored in (r.scores, {}):  # with the tvc score from clean_vector, and without (scored here)
        r.scores = scored
        fast, slow = feature_effects(setup, sae, r), feature_effects_one_by_one(setup, sae, r)
        assert [e["index"] for e in fast] == [e["index"] for e in slow] == r.features
        for a, b in zip(fast, slow):
            assert a["weight"] == b["weight"]
            for k in ("alone", "drop_without", "bias_only"):
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6)
    # the baselines, batched, against one `evaluate` per method
    ev, decode = setup.evaluation, frozen_decoder(sae)
    base = baseline_scores(setup, sae, ito_l0s=(2, 4))
    from icl_circuits.methods.ito import ito_weights

    f = sae.encode(setup.vector).float()
    for name, v in (("tv", setup.vector), ("sae_reconstruction", decode(f)), ("ito_2", decode(ito_weights(sae, setup.vector, 2))),
                    ("ito_4", decode(ito_weights(sae, setup.vector, 4)))):  # fmt: skip
        s = ev.evaluate(1, v)
        assert base[name]["nll"] == pytest.approx(s.nll, rel=1e-5) and base[name]["accuracy"] == s.accuracy


def test_eval_loss_snapshots_scored_after_the_loop_equal_scoring_each_at_its_step():
    """clean_vector scores its every-eval_every-steps snapshots in one batch at the end: each entry must be the
    evaluation NLL of the weights at that step, and the last one (and the tvc score) that of the result."""
    from icl_circuits.methods.cleaning import frozen_decoder

    lm = pair_lm()
    sae = unit_sae(lm, scale=3.0)
    cfg = CleaningConfig(n_train=6, n_eval=6, max_steps=23, patience=50, l1_coeff=0.001, eval_every=5)
    setup = cleaning_setup(lm, Task("many", tuple(MANY)), 1, cfg, TaskVectorConfig(n_prompts=4, n_shots=4, eval_share=0.5))
    seen: list[torch.Tensor] = []
    many = setup.evaluation.score

    def record(layer, vectors, *a, **k):
        seen.extend(vectors)
        return many(layer, vectors, *a, **k)

    setup.evaluation.score = record
    r = clean_vector(sae, setup.train, 1, setup.vector, cfg, setup.evaluation)
    assert [s for s, _ in r.eval_loss] == [1, 6, 11, 16, 21, 23]
    assert len(seen) == len(r.eval_loss)
    for v, (_, nll) in zip(seen, r.eval_loss):
        assert nll == pytest.approx(setup.evaluation.evaluate(1, v).nll, rel=1e-5)
    # the snapshot at step s is the weights after s steps, i.e. the result of the same run stopped at max_steps=s
    for i, s in ((1, 6), (3, 16)):
        short = clean_vector(sae, setup.train, 1, setup.vector, replace(cfg, max_steps=s))
        torch.testing.assert_close(seen[i], frozen_decoder(sae)(short.weights))
        assert r.eval_loss[i][1] == pytest.approx(setup.evaluation.evaluate(1, frozen_decoder(sae)(short.weights)).nll, rel=1e-5)
    final = setup.evaluation.evaluate(1, frozen_decoder(sae)(r.weights))
    assert r.eval_loss[-1][1] == pytest.approx(final.nll, rel=1e-5)
    assert r.scores["tvc"]["nll"] == pytest.approx(final.nll, rel=1e-5) and r.scores["tvc"]["accuracy"] == final.accuracy
