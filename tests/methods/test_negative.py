"""Negative steering (`methods.negative`): the fast arrow-accuracy path against a plain full forward."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from icl_circuits import Task, icl_prompts
from icl_circuits.interventions.steer import Steerer, feature_directions
from icl_circuits.methods.heatmaps import FeatureSet
from icl_circuits.methods.negative import PAPER_NEGATIVE_SCALES, ArrowAccuracy, NegativeConfig, negative_steering, paper_negative_scales

from tests.helpers import ANTONYMS, UPPER, random_sae, pair_lm


def test_negative_steering_picks_smallest_scale_reaching_the_drop():
    lm = pair_lm()
    sae = random_sae(lm)
    tasks = [Task("ant", tuple(ANTONYMS))]
    sets = {"ant": FeatureSet("ant", [3, 5])}
    res = negative_steering(lm, tasks, sets, sae, NegativeConfig(layer=1, n_prompts=2, n_shots=3, scales=(1.0, 50.0), min_drop=-1.0), progress=False)
    assert res.scales == [1.0, 1.0]  # min_drop -1: the first scale always qualifies
    batch = icl_prompts(lm.tokenizer, Task("ant", tuple(ANTONYMS)).split(0.5, 0)[0], 2, 3, seed=0)
    st = Steerer(lm, batch, [1], steer_at=batch.arrow_mask("all"), scoring="all")
    acc = st.score(1, -1.0 * feature_directions(sae, [3, 5]), need_accuracy=True).accuracy
    torch.testing.assert_close(res.drop[0], st.baseline.accuracy - acc)


def test_bad_negative_config():
    with pytest.raises(ValueError, match="scales"):
        NegativeConfig(scales=(4.0, 1.0))


def test_paper_negative_scales_carry_the_papers_range_to_our_scale():
    assert len(PAPER_NEGATIVE_SCALES) == 50 and PAPER_NEGATIVE_SCALES[0] == 1.0 and PAPER_NEGATIVE_SCALES[-1] == pytest.approx(31.6, abs=0.05)
    assert paper_negative_scales(15.0) == PAPER_NEGATIVE_SCALES  # at the paper's own scale: exactly the paper's range
    sc = paper_negative_scales(300.0)
    assert sc[0] == pytest.approx(20.0) and sc[-1] == pytest.approx(632.0, rel=2e-3)


# -- negative steering: the fast path against a plain full forward ------------------------------------


def _taught(family: str, steps: int = 10):
    """A tiny model whose (untied) unembedding is fitted a little to the UPPER task's outputs at the arrows of
    the prompts the test uses, so accuracies are neither all 0 nor all 1 and steering changes them."""
    lm = pair_lm(family)
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
    sae = random_sae(lm, layer=1)
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
    with pytest.raises(ValueError, match="other settings.*min_drop"):
        negative_steering(lm, tasks, sets, sae, replace(cfg, min_drop=0.2), out_dir=tmp_path, progress=False)
    other_sae = random_sae(lm, layer=1, seed=1)  # same feature numbers, another SAE: never served the saved result
    with pytest.raises(ValueError, match="other settings.*sae"):
        negative_steering(lm, tasks, sets, other_sae, cfg, out_dir=tmp_path, progress=False)


def test_negative_steering_resume_redoes_no_finished_feature(tmp_path, monkeypatch):
    lm = _taught("gemma3")
    sae = random_sae(lm, layer=1)
    tasks = [Task("up", tuple(UPPER)), Task("ant", tuple(ANTONYMS))]
    sets = {"up": FeatureSet("up", [3, 5]), "ant": FeatureSet("ant", [7])}
    cfg = NegativeConfig(layer=1, n_prompts=3, n_shots=3, scales=(0.5, 8.0), min_drop=0.1)
    first = negative_steering(lm, tasks, sets, sae, cfg, out_dir=tmp_path, progress=False)
    lines = (tmp_path / "negative_progress.jsonl").read_text().splitlines()
    assert len(lines) == 1 + 3  # the header, then one line per feature
    # an interrupted run: the last feature's line is lost; the resume computes that feature only
    (tmp_path / "negative_progress.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    seen = []
    real = ArrowAccuracy.accuracy
    monkeypatch.setattr(ArrowAccuracy, "accuracy", lambda self, v: seen.append(len(v)) or real(self, v))
    again = negative_steering(lm, tasks, sets, sae, cfg, out_dir=tmp_path, progress=False)
    assert seen and max(seen) == 1  # one feature's vector per call: the two finished ones were read back
    assert again.scales == first.scales and torch.equal(again.drop, first.drop)


def test_argmax_check_agrees_with_full_argmax_on_large_vocab_and_ties():
    import transformers as tf

    from icl_circuits import LM
    from icl_circuits.methods.negative import ArgmaxCheck

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
