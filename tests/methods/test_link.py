"""The detector->executor link (Fig. 11) on tiny models, against a manual frozen-attention ablation."""

from __future__ import annotations

import pytest
import torch

from icl_circuits import Task, icl_prompts
from icl_circuits.methods.link import LinkConfig, detector_executor_link, latent_ablation
from icl_circuits.methods.masses import token_type_masses
from icl_circuits.core.frozen_attention import FrozenAttention
from icl_circuits.core.sites import Intervention, Site

from tests.helpers import ANTONYMS, UPPER, pair_lm, detection_sae


def test_latent_ablation_removes_the_latent_times_its_decoder_row():
    lm = pair_lm()
    sae = detection_sae(lm, 1)
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
    lm = pair_lm()
    det, ex = detection_sae(lm, 0, seed=3), detection_sae(lm, 1, seed=4)
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
    monkeypatch.setattr("icl_circuits.methods.link.link_on_batch", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    again = detector_executor_link(lm, tasks, {"ant": 2, "upper": 6}, {"ant": 1, "upper": 8}, det, ex, cfg, out_dir=tmp_path, progress=False)
    assert torch.equal(again.drop, res.drop)
    assert len((tmp_path / "link_progress.jsonl").read_text().splitlines()) == 1 + len(tasks)  # header + a line per task
    for other in (dict(detectors={"ant": 3, "upper": 6}), dict(det_sae=detection_sae(lm, 0, seed=5)), dict(cfg=LinkConfig(multiple=10.0))):
        kw = dict(detectors={"ant": 2, "upper": 6}, executors={"ant": 1, "upper": 8}, det_sae=det, exec_sae=ex, cfg=cfg) | other
        with pytest.raises(ValueError, match="other settings"):  # never served the saved result
            detector_executor_link(lm, tasks, out_dir=tmp_path, progress=False, **kw)


def test_link_zero_ablation_option_matches_manual_frozen_ablation():
    lm = pair_lm()
    det, ex = detection_sae(lm, 0, seed=3), detection_sae(lm, 1, seed=4)
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
    lm = pair_lm()
    det, ex = detection_sae(lm, 0), detection_sae(lm, 1)
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
