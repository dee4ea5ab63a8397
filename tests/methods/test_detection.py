"""Token-type masses, frozen attention and the detector->executor link on tiny models."""

from __future__ import annotations

import pytest
import torch

from icl_circuits import Task, icl_prompts
from icl_circuits.methods.detection import (
    MASS_TYPES,
    LinkConfig,
    MassConfig,
    activation_masses,
    detector_executor_link,
    latent_ablation,
    mass_shares,
    mass_table,
    token_type_masses,
)
from icl_circuits.core.frozen_attention import FrozenAttention
from icl_circuits.data.prompts import TYPE_ID
from icl_circuits.sae.dictionary import JumpReLUSAE, SAEConfig
from icl_circuits.core.sites import Intervention, Site

from tests.helpers import ANTONYMS, FAMILIES, UPPER, make_tiny, word_tokenizer


def _setup(family: str = "gemma3"):
    lm, _ = make_tiny(family)
    words = ["Follow", "the", "pattern:", "->", "X", "Y"] + [w for x, y in ANTONYMS + UPPER for w in (x, y)]
    lm.tokenizer = word_tokenizer(words)
    return lm


def _sae(lm, layer: int, d_sae: int = 10, seed: int = 0) -> JumpReLUSAE:
    g = torch.Generator().manual_seed(seed)
    cfg = SAEConfig(d_in=lm.d_model, d_sae=d_sae, site=f"resid_pre.{layer}", layer=layer, input_scale=0.7, output_scale=0.7)
    return JumpReLUSAE(cfg, {"W_enc": torch.randn(lm.d_model, d_sae, generator=g), "W_dec": torch.randn(d_sae, lm.d_model, generator=g)})


def test_token_type_masses_hand_worked_and_sum_to_one():
    types = torch.tensor([[TYPE_ID[t] for t in ("bos", "prompt", "input", "arrow", "output", "newline")]])
    lat = torch.tensor([[[100.0, 0], [1, 0], [2, 0], [3, 4], [0, 0], [4, 0]]])  # [1, 6, 2]; BOS is never counted
    m = token_type_masses(lat, types)
    assert m.tolist() == [[1.0, 2.0, 3.0, 0.0, 4.0, 0.0], [0.0, 0.0, 4.0, 0.0, 0.0, 0.0]]
    s = mass_shares(m)
    torch.testing.assert_close(s.sum(1), torch.ones(2))
    torch.testing.assert_close(s[0], torch.tensor([0.1, 0.2, 0.3, 0.0, 0.4, 0.0]))
    assert torch.isnan(mass_shares(torch.zeros(1, 6))).all()  # a feature that never fires has no shares


def test_activation_masses_match_a_per_token_loop_and_sum_to_one():
    lm = _setup()
    sae_a, sae_b = _sae(lm, 0, seed=1), _sae(lm, 1, seed=2)
    tasks = [Task("ant", tuple(ANTONYMS)), Task("upper", tuple(UPPER))]
    roles = {"executor": (sae_b, {"ant": [0, 3], "upper": [5]}), "detector": (sae_a, {"ant": [2], "upper": [1, 4]})}
    cfg = MassConfig(n_prompts=3, n_shots=2, batch_size=2)
    rows = activation_masses(lm, tasks, roles, cfg, progress=False)
    assert len(rows) == 4
    for r in rows:
        assert sum(r[t] for t in MASS_TYPES) == pytest.approx(1.0)
    # reference for one row: every prompt alone, unpadded, a plain loop over tokens
    from icl_circuits.methods.task_vectors import TaskVectorConfig, icl_batch

    icl = icl_batch(lm, tasks[1], TaskVectorConfig(n_prompts=3, n_shots=2))
    mass = {t: 0.0 for t in MASS_TYPES}
    for p in icl.prompts:
        x = lm.run(torch.tensor([p.ids]), read=["resid_pre.0"]).acts[Site(0, "resid_pre")][0]
        f = sae_a.encode(x)[:, [1, 4]].sum(1).detach()
        for q, ty in enumerate(p.types):
            name = {v: k for k, v in TYPE_ID.items()}[ty]
            if name in mass:
                mass[name] += float(f[q])
    total = sum(mass.values())
    row = next(r for r in rows if r["task"] == "upper" and r["role"] == "detector")
    for t in MASS_TYPES:
        assert row[t] == pytest.approx(mass[t] / total, rel=1e-4, abs=1e-6)
    table = mass_table(rows)
    assert [r["token_type"] for r in table] == list(MASS_TYPES)
    assert sum(r["executor_ours_%"] for r in table) == pytest.approx(100, abs=0.05)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_frozen_attention_keeps_patterns_bit_identical(family):
    lm, _ = make_tiny(family)
    ids = torch.randint(4, 150, (2, 9))
    where = torch.zeros(2, 9, dtype=torch.bool)
    where[:, 3] = True
    iv = Intervention(Site(0, "resid_pre"), where, 3 * torch.randn(lm.d_model))
    with FrozenAttention(lm, [0, 1]) as fa:
        fa.record()
        clean = lm.run(ids, read=["resid_post.1"]).acts[Site(1, "resid_post")]
        recorded = {l: p.clone() for l, p in fa.patterns().items()}
        fa.freeze()
        same = lm.run(ids, read=["resid_post.1"]).acts[Site(1, "resid_post")]
        lm.run(ids, read=["resid_post.1"], interventions=[iv])
        frozen = fa.used_patterns()
        fa.release()
        lm.run(ids, read=["resid_post.1"], interventions=[iv])
        free = fa.used_patterns()
    assert torch.equal(same, clean)  # freezing alone changes nothing, bit for bit
    for l in (0, 1):
        assert torch.equal(frozen[l], recorded[l])  # the ablated pass used exactly the clean patterns
    assert not torch.equal(free[1], recorded[1])  # without freezing the perturbation moves attention
    assert lm.model.config._attn_implementation == "eager"  # restored on exit
    plain = lm.run(ids, read=["resid_post.1"]).acts[Site(1, "resid_post")]
    torch.testing.assert_close(plain, clean)


def test_frozen_attention_output_matches_manual_value_path():
    """Llama layer 0 by hand: attention = o_proj(P_clean @ V(ablated input)), P from transformers' own output_attentions."""
    lm, _ = make_tiny("llama")
    m = lm.model.model
    ids = torch.randint(4, 150, (1, 8))
    delta = torch.zeros(1, 8, lm.d_model)
    delta[0, 2] = 2 * torch.randn(lm.d_model)
    with torch.no_grad():
        P = lm.model(ids, output_attentions=True).attentions[0]  # [1, heads, 8, 8] clean pattern of layer 0
        x = m.embed_tokens(ids) + delta  # ablated resid_pre.0
        blk = m.layers[0]
        at = blk.self_attn
        v = at.v_proj(blk.input_layernorm(x)).view(1, 8, -1, at.head_dim).transpose(1, 2)  # [1, kv, 8, hd]
        v = v.repeat_interleave(P.shape[1] // v.shape[1], dim=1)
        a = at.o_proj((P @ v).transpose(1, 2).reshape(1, 8, -1))
        mid = x + a
        expected = mid + blk.mlp(blk.post_attention_layernorm(mid))  # resid_pre.1
    iv = Intervention(Site(0, "resid_pre"), torch.ones(1, 8, dtype=torch.bool), delta[0])
    with FrozenAttention(lm, [0]) as fa:
        fa.record()
        lm.run(ids, read=["resid_pre.1"])
        fa.freeze()
        got = lm.run(ids, read=["resid_pre.1"], interventions=[iv]).acts[Site(1, "resid_pre")]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_latent_ablation_removes_the_latent_times_its_decoder_row():
    lm = _setup()
    sae = _sae(lm, 1)
    batch = icl_prompts(lm.tokenizer, Task("ant", tuple(ANTONYMS)), 2, 3, seed=0)
    outs = batch.type_mask("output")
    x = lm.run(batch.input_ids, batch.attention_mask, read=["resid_pre.1"]).acts[Site(1, "resid_pre")]
    got = lm.run(batch.input_ids, batch.attention_mask, read=["resid_pre.1"], interventions=[latent_ablation(sae, [4, 7], outs)]).acts[Site(1, "resid_pre")]
    f = sae.encode(x)
    expected = x - (f[..., 4:5] * sae.W_dec[4] + f[..., 7:8] * sae.W_dec[7]).detach() / 0.7
    torch.testing.assert_close(got[outs], expected[outs], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[~outs], x[~outs])


def _manual_link(lm, tasks, det, ex, dets, execs, ablate):
    """Reference: per task batch a clean and a frozen-attention ablated pass, drops summed by hand."""
    from icl_circuits.methods.task_vectors import TaskVectorConfig, icl_batch

    tot, cnt = torch.zeros(len(dets), len(execs)), torch.zeros(len(dets), len(execs))
    for task in tasks:
        icl = icl_batch(lm, task, TaskVectorConfig(n_prompts=3, n_shots=3))
        for i, d in enumerate(dets):
            with FrozenAttention(lm, [0]) as fa:
                fa.record()
                r0 = lm.run(icl.input_ids, icl.attention_mask, read=["resid_pre.0", "resid_pre.1"]).acts
                iv, where = ablate(icl, d, r0[Site(0, "resid_pre")])
                c = ex.encode(r0[Site(1, "resid_pre")])[..., execs][where]
                fa.freeze()
                if iv is None:
                    continue
                a = ex.encode(lm.run(icl.input_ids, icl.attention_mask, read=["resid_pre.1"], interventions=[iv]).acts[Site(1, "resid_pre")])
                a = a[..., execs][where]
            for e in range(len(execs)):
                on = c[:, e] > 0
                yield_ = ablate.rel(c[on, e], a[on, e])
                tot[i, e] += yield_.sum()
                cnt[i, e] += on.sum()
    return tot / cnt.clamp_min(1), cnt


def test_link_default_is_the_authors_clipped_direction_ablation(tmp_path, monkeypatch):
    """50 x mean activation x unit direction subtracted everywhere; drop clip(1 - a/c, 0, 1) where the executor was on."""
    lm = _setup()
    det, ex = _sae(lm, 0, seed=3), _sae(lm, 1, seed=4)
    tasks = [Task("ant", tuple(ANTONYMS)), Task("upper", tuple(UPPER))]
    cfg = LinkConfig(n_prompts=3, n_shots=3)
    assert (cfg.ablation, cfg.multiple, cfg.ablate_at, cfg.measure_at, cfg.clip) == ("direction", 50.0, "all", "all", True)
    res = detector_executor_link(lm, tasks, {"ant": 2, "upper": 6}, {"ant": 1, "upper": 8}, det, ex, cfg, out_dir=tmp_path, progress=False)
    assert res.drop.shape == (2, 2)

    def ablate(icl, d, resid0):
        real = icl.token_types >= 1
        mean = float(det.encode(resid0)[..., d][real].mean().detach())
        if mean < 1e-6:
            return None, real
        row = det.W_dec[d].detach().float() / det.cfg.output_scale
        return Intervention(Site(0, "resid_pre"), real, -50.0 * mean * row / row.norm()), real

    ablate.rel = lambda c, a: (1 - a / c).clamp(0, 1)
    want, cnt = _manual_link(lm, tasks, det, ex, [2, 6], [1, 8], ablate)
    torch.testing.assert_close(res.drop, want, rtol=1e-4, atol=1e-5)
    assert res.n_active.tolist() == cnt.tolist()
    assert ((res.drop >= 0) & (res.drop <= 1)).all() and res.drop.max() > 0
    shared = detector_executor_link(lm, tasks, {"ant": 6, "upper": 6}, {"ant": 1, "upper": 8}, det, ex, cfg, progress=False)
    torch.testing.assert_close(shared.drop, res.drop[[1, 1]])  # a detector shared by two tasks: same row twice
    monkeypatch.setattr("icl_circuits.methods.detection.link_on_batch", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    again = detector_executor_link(lm, tasks, {"ant": 2, "upper": 6}, {"ant": 1, "upper": 8}, det, ex, cfg, out_dir=tmp_path, progress=False)
    assert torch.equal(again.drop, res.drop)


def test_link_zero_ablation_option_matches_manual_frozen_ablation():
    lm = _setup()
    det, ex = _sae(lm, 0, seed=3), _sae(lm, 1, seed=4)
    tasks = [Task("ant", tuple(ANTONYMS)), Task("upper", tuple(UPPER))]
    cfg = LinkConfig(n_prompts=3, n_shots=3, ablation="zero", ablate_at="output", measure_at="arrow", clip=False)
    res = detector_executor_link(lm, tasks, {"ant": 2, "upper": 6}, {"ant": 1, "upper": 8}, det, ex, cfg, progress=False)

    def ablate(icl, d, resid0):
        return latent_ablation(det, [d], icl.type_mask("output")), icl.type_mask("arrow")

    ablate.rel = lambda c, a: (c - a) / c
    want, cnt = _manual_link(lm, tasks, det, ex, [2, 6], [1, 8], ablate)
    torch.testing.assert_close(res.drop, want, rtol=1e-4, atol=1e-5)
    assert res.n_active.tolist() == cnt.tolist()


def test_bad_inputs_are_clear_errors():
    lm = _setup()
    det, ex = _sae(lm, 0), _sae(lm, 1)
    with pytest.raises(ValueError, match="latents must be"):
        token_type_masses(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown token types"):
        token_type_masses(torch.zeros(1, 2, 1), torch.zeros(1, 2, dtype=torch.long), types=("arrows",))
    with pytest.raises(ValueError, match="non-negative"):
        token_type_masses(-torch.ones(1, 2, 1), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="must come before"):
        detector_executor_link(lm, [], {"a": 1}, {"a": 1}, ex, det)
    with pytest.raises(ValueError, match="outside"):
        detector_executor_link(lm, [], {"a": 99}, {"a": 1}, det, ex)
    with pytest.raises(ValueError, match="layers"):
        FrozenAttention(lm, [5])
    with FrozenAttention(lm, [0]) as fa, pytest.raises(RuntimeError, match="nothing recorded"):
        fa.freeze()
    with FrozenAttention(lm, [0]) as fa:
        fa.record()
        lm.run(torch.randint(4, 150, (1, 6)), read=["resid_pre.1"])
        fa.freeze()
        with pytest.raises(ValueError, match="same batch"):
            lm.run(torch.randint(4, 150, (1, 7)), read=["resid_pre.1"])


@pytest.mark.bundled
def test_frozen_attention_on_the_bundled_model(bundled):
    torch.set_num_threads(1)
    lm = bundled
    from icl_circuits.data.tasks import load_task

    batch = icl_prompts(lm.tokenizer, load_task("antonyms"), 2, 4, seed=0)
    plain = lm.run(batch.input_ids, batch.attention_mask, read=["resid_pre.12"]).acts[Site(12, "resid_pre")]
    with FrozenAttention(lm, [11]) as fa:
        fa.record()
        clean = lm.run(batch.input_ids, batch.attention_mask, read=["resid_pre.12"]).acts[Site(12, "resid_pre")]
        fa.freeze()
        same = lm.run(batch.input_ids, batch.attention_mask, read=["resid_pre.12"]).acts[Site(12, "resid_pre")]
    assert torch.equal(same, clean)
    m = batch.attention_mask.bool()
    # eager (ours) vs. the model's default sdpa: equal up to float rounding
    torch.testing.assert_close(clean[m], plain[m], rtol=1e-3, atol=1e-2)
    assert lm.model.config._attn_implementation == "sdpa"
