"""Steering (`interventions.steer`): a vector added at chosen positions of a prompt batch, scored on the outputs,
against direct transformers computations; SAE features as steering directions."""

from __future__ import annotations

import pytest
import torch

from icl_circuits import Task, icl_prompts, zero_shot_prompts
from icl_circuits.core.sites import Site
from icl_circuits.interventions.steer import Steerer, feature_directions, feature_intervention

from tests.helpers import ANTONYMS, pair_lm, random_sae


@pytest.mark.parametrize("family", ["gemma3", "llama", "gpt2"])
def test_steering_matches_direct_full_forward(family):
    lm = pair_lm(family)
    zero = zero_shot_prompts(lm.tokenizer, Task("ant", tuple(ANTONYMS)), 6, seed=1)
    steering = Steerer(lm, zero, layers=[1])
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
    lm = pair_lm()
    task = Task("ant", tuple(ANTONYMS))
    zero = zero_shot_prompts(lm.tokenizer, task, 8, seed=0)
    steering = Steerer(lm, zero, layers=[0, 1])
    for layer in (0, 1):
        s = steering.evaluate(layer, torch.zeros(lm.d_model))
        assert s.nll == pytest.approx(steering.baseline.nll, rel=1e-6)
    # a prompt scored alone equals the same prompt scored inside a padded batch
    one = zero.slice(0, 1)
    alone = Steerer(lm, one, layers=[1])
    v = torch.randn(lm.d_model)
    lp_batch = steering.logprobs(1, v)[0]
    lp_alone = alone.logprobs(1, v)[0]
    torch.testing.assert_close(lp_batch, lp_alone, rtol=1e-5, atol=1e-5)


def test_steering_vector_gradient_flows():
    lm = pair_lm()
    zero = zero_shot_prompts(lm.tokenizer, Task("ant", tuple(ANTONYMS)), 4)
    steering = Steerer(lm, zero, layers=[1])
    v = torch.zeros(lm.d_model, requires_grad=True)
    steering.loss(1, v).backward()
    assert v.grad is not None and v.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["gemma3", "gpt2"])
def test_feature_steering_adds_exactly_scale_times_decoder_row_at_chosen_positions(family):
    lm = pair_lm(family)
    sae = random_sae(lm, layer=1)
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
@pytest.mark.parametrize("prefix_cache", [True, False])
def test_batched_scores_match_direct_full_forward(family, prefix_cache):
    """Steering at every arrow of ICL prompts, every pair scored: `score` and the baseline against a plain forward."""
    lm = pair_lm(family)
    batch = icl_prompts(lm.tokenizer, Task("ant", tuple(ANTONYMS)), n_prompts=5, n_shots=3, seed=1)
    st = Steerer(lm, batch, [1], steer_at=batch.arrow_mask("all"), prefix_cache=prefix_cache, scoring="all")
    vecs = torch.randn(4, lm.d_model)
    got = st.score(1, vecs, need_accuracy=True, vectors_per_pass=3)  # 2 passes of <= 3 vectors
    no_acc = st.score(1, vecs)
    for i in range(4):
        nll, acc = _reference_scores(lm, batch, batch.arrow_mask("all"), vecs[i], "all")
        assert float(got.nll[i]) == pytest.approx(nll, rel=1e-5)
        assert float(no_acc.nll[i]) == pytest.approx(nll, rel=1e-5)
        assert float(got.accuracy[i]) == pytest.approx(acc)
    base_nll, base_acc = _reference_scores(lm, batch, batch.arrow_mask("all"), torch.zeros(lm.d_model), "all")
    assert st.baseline.nll == pytest.approx(base_nll, rel=1e-5)
    assert st.baseline.accuracy == pytest.approx(base_acc)


def test_score_agrees_with_one_evaluation_per_vector_with_and_without_prefix_cache():
    """`score` (batch copies, several vectors a pass) gives the relative loss decrease of `evaluate`, one vector at a
    time through the prefix-cached suffixes; with prefix_cache=False too."""
    lm = pair_lm()
    zero = zero_shot_prompts(lm.tokenizer, Task("ant", tuple(ANTONYMS)), 6, seed=1)
    ref = Steerer(lm, zero, [1])
    vecs = torch.randn(3, lm.d_model)
    for st in (ref, Steerer(lm, zero, [1], prefix_cache=False)):
        rel = st.relative_loss_decrease(st.score(1, vecs, vectors_per_pass=2).nll)
        for i in range(3):
            assert float(rel[i]) == pytest.approx(ref.relative_loss_decrease(ref.evaluate(1, vecs[i])), rel=1e-4, abs=1e-6)


def test_bad_inputs_are_clear_errors():
    lm = pair_lm()
    sae = random_sae(lm)
    zero = zero_shot_prompts(lm.tokenizer, Task("ant", tuple(ANTONYMS)), 3, seed=1)
    with pytest.raises(ValueError, match="outside"):
        feature_directions(sae, [12])
    with pytest.raises(ValueError, match="no features"):
        feature_directions(sae, [])
    with pytest.raises(ValueError, match="bool mask"):
        Steerer(lm, zero, [1], steer_at=zero.arrow_mask("last")[:, :2])
    st = Steerer(lm, zero, [1])
    with pytest.raises(ValueError, match="d_model"):
        st.score(1, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="not cached"):
        st.score(0, torch.zeros(2, lm.d_model))


@pytest.mark.parametrize("family", ["gemma2", "llama", "gpt2"])
def test_prefix_cache_gives_the_full_pass_values_and_gradients_for_mixed_lengths(family):
    """Prompts of different lengths fall in different (first steered, last scored) groups; each group
    re-runs only its suffix on cached keys/values. Values and gradients must equal the plain pass."""
    from icl_circuits.data.prompts import fake_pair_prompts

    lm = pair_lm(family)
    words = [x for x, _ in ANTONYMS]
    pairs = [(" ".join(words[i : i + 1 + i % 3]), y) for i, (_, y) in enumerate(ANTONYMS)]  # inputs of 1-3 tokens
    task = Task("mixed", tuple(pairs))
    for batch, steer_at, n_tokens in (
        (zero_shot_prompts(lm.tokenizer, task, 10, seed=3), None, 1),
        (fake_pair_prompts(lm.tokenizer, Task("mixed", tuple((x, "X " + y) for x, y in pairs)), 10, seed=3), "fake", 2),
    ):
        mask = None if steer_at is None else batch.output_mask("first")
        plain = Steerer(lm, batch, [0, 1], n_tokens, steer_at=mask, prefix_cache=False)
        v = torch.randn(lm.d_model)
        # pass_cost 0: one group per (first steered, last scored); 1e9: one group re-running from the earliest
        # steered token; the default: groups merged where a pass costs more than the tokens re-run
        for pass_cost in (0.0, 8.0, 1e9):
            fast = Steerer(lm, batch, [0, 1], n_tokens, steer_at=mask, pass_cost=pass_cost)
            if pass_cost == 0:
                assert len(fast.prefix.groups) >= 3
            if pass_cost == 1e9:
                assert len(fast.prefix.groups) == 1
            _check_same(fast, plain, v)


def _check_same(fast: Steerer, plain: Steerer, v: torch.Tensor) -> None:
    """Log-probs and their gradient w.r.t. the vector: prefix-cached pass == plain pass, at layers 0 and 1."""
    for layer in (0, 1):
        a, b = v.clone().requires_grad_(True), v.clone().requires_grad_(True)
        la, lb = fast.logprobs(layer, a), plain.logprobs(layer, b)
        torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
        (ga,), (gb,) = torch.autograd.grad(fast.scoring.nll(la), a), torch.autograd.grad(plain.scoring.nll(lb), b)
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["gemma3", "gemma2", "gpt2"])
def test_score_equals_one_evaluation_per_vector(family):
    """The batched path (suffixes and prefix keys/values repeated per vector, one unembedding per chunk)
    against `evaluate` one vector at a time, for mixed-length prompt groups and both steering positions."""
    from icl_circuits.data.prompts import fake_pair_prompts

    lm = pair_lm(family)
    words = [x for x, _ in ANTONYMS]
    pairs = [(" ".join(words[i : i + 1 + i % 3]), y) for i, (_, y) in enumerate(ANTONYMS)]  # inputs of 1-3 tokens
    task = Task("mixed", tuple(pairs))
    torch.manual_seed(0)
    for batch, steer, n_tokens in (
        (zero_shot_prompts(lm.tokenizer, task, 10, seed=3), False, 1),
        (fake_pair_prompts(lm.tokenizer, Task("mixed", tuple((x, "X " + y) for x, y in pairs)), 10, seed=3), True, 2),
    ):
        for pass_cost in (0.0, 8.0, 1e9):  # many groups, the default, one group
            st = Steerer(lm, batch, [0, 1], n_tokens, steer_at=batch.output_mask("first") if steer else None,
                                  pass_cost=pass_cost)  # fmt: skip
            _check_many(st, torch.randn(5, lm.d_model) * 3)
    with pytest.raises(ValueError):
        st.score(1, torch.zeros(lm.d_model))


def _check_many(st: Steerer, vecs: torch.Tensor) -> None:
    """score([k, d_model]) == k calls of evaluate, in one chunk and in several."""
    for layer in (0, 1):
        one = [st.evaluate(layer, v) for v in vecs]
        # 2 vectors per pass: several chunks of vectors
        for many in (st.score(layer, vecs, need_accuracy=True).as_scores(), st.score(layer, vecs, True, vectors_per_pass=2).as_scores()):
            assert [s.accuracy for s in many] == [s.accuracy for s in one]
            for a, b in zip(many, one):
                assert a.nll == pytest.approx(b.nll, rel=1e-5, abs=1e-6)
