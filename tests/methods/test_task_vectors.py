"""Task vectors and zero-shot steering on a tiny model, against direct transformers computations."""

from __future__ import annotations

import json

import pytest
import torch

from icl_circuits import Task, icl_prompts, zero_shot_prompts
from icl_circuits.methods.task_vectors import TaskVectorConfig, ZeroShotSteering, collect_resid, extract_task_vectors, sweep_task

from tests.helpers import ANTONYMS, UPPER, _setup


def _hf_hidden(lm, ids):
    with torch.no_grad():
        return lm.model(torch.tensor([ids]), output_hidden_states=True)


def test_task_vector_is_mean_of_hf_hidden_states_at_arrows():
    lm = _setup()
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


@pytest.mark.parametrize("family", ["gemma3", "llama", "gpt2"])
def test_steering_matches_direct_full_forward(family):
    lm = _setup(family)
    zero = zero_shot_prompts(lm.tokenizer, Task("ant", tuple(ANTONYMS)), 6, seed=1)
    steering = ZeroShotSteering(lm, zero, layers=[1])
    v = torch.randn(lm.d_model)
    got = steering.evaluate(1, v)

    # reference: full forward per prompt, a plain forward-pre-hook adding v at the arrow, full logits
    block = lm.adapter.blocks(lm.model)[1]
    nlls, hits, base = [], [], []
    for p in zero.prompts:
        arrow, target = p.pairs[-1].arrow, p.ids[p.pairs[-1].arrow + 1]
        for add, sink in ((True, nlls), (False, base)):
            def hook(m, args, kwargs, add=add):
                h = args[0].clone()
                if add:
                    h[0, arrow] += v
                return (h, *args[1:]), kwargs

            handle = block.register_forward_pre_hook(hook, with_kwargs=True)
            with torch.no_grad():
                logp = torch.log_softmax(lm.model(torch.tensor([p.ids])).logits[0, arrow].float(), -1)
            handle.remove()
            sink.append(-logp[target].item())
            if add:
                hits.append(float(logp.argmax().item() == target))
    assert got.nll == pytest.approx(sum(nlls) / len(nlls), rel=1e-5)
    assert got.accuracy == pytest.approx(sum(hits) / len(hits))
    assert steering.baseline.nll == pytest.approx(sum(base) / len(base), rel=1e-5)
    assert steering.relative_loss_decrease(got) == pytest.approx((steering.baseline.nll - got.nll) / steering.baseline.nll)


def test_zero_vector_is_no_change_and_padding_does_not_leak():
    lm = _setup()
    task = Task("ant", tuple(ANTONYMS))
    zero = zero_shot_prompts(lm.tokenizer, task, 8, seed=0)
    steering = ZeroShotSteering(lm, zero, layers=[0, 1])
    for layer in (0, 1):
        s = steering.evaluate(layer, torch.zeros(lm.d_model))
        assert s.nll == pytest.approx(steering.baseline.nll, rel=1e-6)
    # a prompt scored alone equals the same prompt scored inside a padded batch
    one = zero.slice(0, 1)
    alone = ZeroShotSteering(lm, one, layers=[1])
    v = torch.randn(lm.d_model)
    lp_batch = steering.logprobs(1, v)[0]
    lp_alone = alone.logprobs(1, v)[0]
    torch.testing.assert_close(lp_batch, lp_alone, rtol=1e-5, atol=1e-5)


def test_steering_vector_gradient_flows():
    lm = _setup()
    zero = zero_shot_prompts(lm.tokenizer, Task("ant", tuple(ANTONYMS)), 4)
    steering = ZeroShotSteering(lm, zero, layers=[1])
    v = torch.zeros(lm.d_model, requires_grad=True)
    steering.loss(1, v).backward()
    assert v.grad is not None and v.grad.abs().sum() > 0


def test_icl_scores_and_resid_collection():
    lm = _setup()
    batch = icl_prompts(lm.tokenizer, Task("ant", tuple(ANTONYMS)), n_prompts=3, n_shots=2)
    resid, score = collect_resid(lm, batch, [1], batch_size=2, logprobs_for="last")
    assert resid[1].shape == (*batch.input_ids.shape, lm.d_model)
    assert 0.0 <= score.accuracy <= 1.0 and score.nll > 0


def test_bad_inputs():
    lm = _setup()
    zero = zero_shot_prompts(lm.tokenizer, Task("ant", tuple(ANTONYMS)), 4)
    steering = ZeroShotSteering(lm, zero, layers=[1])
    with pytest.raises(ValueError, match="d_model"):
        steering.evaluate(1, torch.zeros(lm.d_model + 1))
    with pytest.raises(ValueError, match="not cached"):
        steering.evaluate(0, torch.zeros(lm.d_model))
    with pytest.raises(ValueError, match="training pairs"):
        sweep_task(lm, Task("ant", tuple(ANTONYMS)), [1], TaskVectorConfig(n_shots=16, n_eval=4))


def test_layer_sweep_writes_outputs_and_resumes(tmp_path, monkeypatch):
    from icl_circuits.methods import sweep as sweep_mod

    lm = _setup()
    tasks = [Task("ant", tuple(ANTONYMS)), Task("upper", tuple(UPPER))]
    cfg = TaskVectorConfig(n_prompts=3, n_shots=2, n_eval=4, batch_size=2)
    first = sweep_mod.run_layer_sweep(lm, tasks, [0, 1], cfg, tmp_path, progress=False)
    assert len(first.rows) == 4 and [b["task"] for b in first.best] == ["ant", "upper", "mean"]
    for f in ("sweep.json", "sweep.csv", "best_layers.csv", "layer_sweep.png", "layer_sweep.svg"):
        assert (tmp_path / f).stat().st_size > 0
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


@pytest.mark.parametrize("family", ["gemma2", "llama", "gpt2"])
def test_prefix_cache_gives_the_full_pass_values_and_gradients_for_mixed_lengths(family):
    """Prompts of different lengths fall in different (first steered, last scored) groups; each group
    re-runs only its suffix on cached keys/values. Values and gradients must equal the plain pass."""
    from icl_circuits.data.prompts import fake_pair_prompts

    lm = _setup(family)
    words = [x for x, _ in ANTONYMS]
    pairs = [(" ".join(words[i : i + 1 + i % 3]), y) for i, (_, y) in enumerate(ANTONYMS)]  # inputs of 1-3 tokens
    task = Task("mixed", tuple(pairs))
    for batch, steer_at, n_tokens in (
        (zero_shot_prompts(lm.tokenizer, task, 10, seed=3), None, 1),
        (fake_pair_prompts(lm.tokenizer, Task("mixed", tuple((x, "X " + y) for x, y in pairs)), 10, seed=3), "fake", 2),
    ):
        mask = None if steer_at is None else batch.output_mask("first")
        plain = ZeroShotSteering(lm, batch, [0, 1], n_tokens, steer_at=mask, prefix_cache=False)
        v = torch.randn(lm.d_model)
        # pass_cost 0: one group per (first steered, last scored); 1e9: one group re-running from the earliest
        # steered token; the default: groups merged where a pass costs more than the tokens re-run
        for pass_cost in (0.0, 8.0, 1e9):
            fast = ZeroShotSteering(lm, batch, [0, 1], n_tokens, steer_at=mask, pass_cost=pass_cost)
            if pass_cost == 0:
                assert len(fast.prefix.groups) >= 3
            if pass_cost == 1e9:
                assert len(fast.prefix.groups) == 1
            _check_same(fast, plain, v)


def _check_same(fast: ZeroShotSteering, plain: ZeroShotSteering, v: torch.Tensor) -> None:
    """Log-probs and their gradient w.r.t. the vector: prefix-cached pass == plain pass, at layers 0 and 1."""
    for layer in (0, 1):
        a, b = v.clone().requires_grad_(True), v.clone().requires_grad_(True)
        la, lb = fast.logprobs(layer, a), plain.logprobs(layer, b)
        torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
        (ga,), (gb,) = torch.autograd.grad(fast.scoring.nll(la), a), torch.autograd.grad(plain.scoring.nll(lb), b)
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["gemma3", "gemma2", "gpt2"])
def test_evaluate_many_equals_one_evaluation_per_vector(family):
    """The batched path (suffixes and prefix keys/values repeated per vector, one unembedding per chunk)
    against `evaluate` one vector at a time, for mixed-length prompt groups and both steering positions."""
    from icl_circuits.data.prompts import fake_pair_prompts

    lm = _setup(family)
    words = [x for x, _ in ANTONYMS]
    pairs = [(" ".join(words[i : i + 1 + i % 3]), y) for i, (_, y) in enumerate(ANTONYMS)]  # inputs of 1-3 tokens
    task = Task("mixed", tuple(pairs))
    torch.manual_seed(0)
    for batch, steer, n_tokens in (
        (zero_shot_prompts(lm.tokenizer, task, 10, seed=3), False, 1),
        (fake_pair_prompts(lm.tokenizer, Task("mixed", tuple((x, "X " + y) for x, y in pairs)), 10, seed=3), True, 2),
    ):
        for pass_cost in (0.0, 8.0, 1e9):  # many groups, the default, one group
            st = ZeroShotSteering(lm, batch, [0, 1], n_tokens, steer_at=batch.output_mask("first") if steer else None,
                                  pass_cost=pass_cost)  # fmt: skip
            _check_many(st, torch.randn(5, lm.d_model) * 3)
    with pytest.raises(ValueError):
        st.evaluate_many(1, torch.zeros(lm.d_model))


def _check_many(st: ZeroShotSteering, vecs: torch.Tensor) -> None:
    """evaluate_many([k, d_model]) == k calls of evaluate, in one chunk and in several."""
    for layer in (0, 1):
        one = [st.evaluate(layer, v) for v in vecs]
        # max_rows small enough to force several chunks of vectors
        for many in (st.evaluate_many(layer, vecs), st.evaluate_many(layer, vecs, max_rows=2 * len(st.scoring.targets))):
            assert [s.accuracy for s in many] == [s.accuracy for s in one]
            for a, b in zip(many, one):
                assert a.nll == pytest.approx(b.nll, rel=1e-5, abs=1e-6)
