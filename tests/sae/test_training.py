"""Training orchestration: outputs, kill-and-resume, and 2-process (gloo) training vs. single-process."""

from __future__ import annotations

import random

import pytest
import torch

from icl_circuits.core.storage import ConfigMismatch, FolderLock, RunBusy
from icl_circuits.sae.formats import load_saelens, load_sae
from icl_circuits.sae.training import SAESpec, TrainConfig, train_saes

from tests.helpers import make_tiny, run_ranks, word_tokenizer

WORDS = [f"w{i}" for i in range(60)]
SPECS = ["resid:1", "attn:0", "transcoder:1"]


def _lm():
    lm, _ = make_tiny("gemma3")
    lm.tokenizer = word_tokenizer(WORDS)
    return lm


def _docs(n=40, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 40))) for _ in range(n)]


def _cfg(**kw):
    base = dict(specs=SPECS, arch="gated", d_sae=24, n_tokens=600, batch_tokens=64, seq_len=16,
                prompts_per_forward=4, buffer_batches=2, checkpoint_every=3, log_every=2, param_dtype="float32")  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _weights(saes):
    return {name: sae.tensors() for name, sae in saes.items()}


def test_spec_parsing():
    assert SAESpec.parse("transcoder:12").in_site.kind == "resid_mid"
    assert str(SAESpec.parse("transcoder:12").out_site) == "mlp_out.12"
    assert str(SAESpec.parse("attn:3").in_site) == "attn_out.3"
    with pytest.raises(ValueError, match="bad SAE spec"):
        SAESpec.parse("mlp:3")


def test_train_writes_saes_and_epochs_over_a_short_corpus(tmp_path):
    lm = _lm()
    saes = train_saes(lm, _docs(12), _cfg(), tmp_path, progress=False)  # 12 short docs < 600 tokens: several epochs
    assert set(saes) == {"resid_1", "attn_0", "transcoder_1"}
    for name, sae in saes.items():
        sae.check_compatible(lm)
        mine = load_sae(tmp_path / "saes" / name)
        theirs = load_saelens(tmp_path / "saelens" / name)
        x = torch.randn(5, lm.d_model)
        torch.testing.assert_close(mine.encode(x), sae.encode(x))
        torch.testing.assert_close(theirs.decode(theirs.encode(x)), sae(x), rtol=1e-5, atol=1e-5)
    assert saes["transcoder_1"].cfg.out_site == "mlp_out.1"
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") >= 3
    with pytest.raises(ConfigMismatch, match=r"config.d_sae: 24 -> 32"):
        train_saes(lm, _docs(12), _cfg(d_sae=32), tmp_path, progress=False)
    with FolderLock(tmp_path, "train"):  # another process training into the folder: refused, nothing touched
        before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != ".train.lock"}
        with pytest.raises(RunBusy, match="in use by another run"):
            train_saes(lm, _docs(12), _cfg(n_tokens=800), tmp_path, progress=False)
        assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != ".train.lock"} == before
    # training longer resumes from the checkpoint: only the extra tokens are trained
    longer = train_saes(lm, _docs(12), _cfg(n_tokens=800), tmp_path, progress=False)
    assert not torch.equal(longer["resid_1"].W_enc, saes["resid_1"].W_enc)
    assert sum(1 for _ in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"tokens": 800' in _) == 3


def test_corpus_without_tokens_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no training tokens"):
        train_saes(_lm(), _docs(5), _cfg(skip_docs=5), tmp_path, progress=False)  # every document held out


def test_kill_and_resume_equals_uninterrupted(tmp_path, monkeypatch):
    lm = _lm()
    docs = _docs()
    straight = _weights(train_saes(lm, docs, _cfg(), tmp_path / "a", progress=False))

    from icl_circuits.sae import trainers

    real_step = trainers.SAETrainer.step
    calls = {"n": 0}

    def dying_step(self, x, y=None):
        calls["n"] += 1
        if calls["n"] == 3 * 5 + 1:  # 3 SAEs per step: die inside step 6, after the step-3 checkpoint... and 6
            raise KeyboardInterrupt
        return real_step(self, x, y)

    monkeypatch.setattr(trainers.SAETrainer, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_saes(lm, docs, _cfg(), tmp_path / "b", progress=False)
    monkeypatch.setattr(trainers.SAETrainer, "step", real_step)
    assert (tmp_path / "b" / "checkpoint-rank0.pt").is_file() and not (tmp_path / "b" / "saes").exists()
    resumed = _weights(train_saes(lm, docs, _cfg(), tmp_path / "b", progress=False))
    for name in straight:
        for key in straight[name]:
            torch.testing.assert_close(resumed[name][key], straight[name][key], rtol=0, atol=0)


def _worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        train_saes(_lm(), _docs(), _cfg(), out, progress=False)  # each rank saves its own SAEs
        dist.barrier()  # every rank done with the group before teardown: gloo can abort otherwise
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equals_single_process(tmp_path):
    single = _weights(train_saes(_lm(), _docs(), _cfg(), tmp_path / "single", progress=False))
    run_ranks(_worker, 2, tmp_path, tmp_path / "dist")
    # SAE i trains on rank i % 2: rank 0 has resid_1 and transcoder_1, rank 1 has attn_0
    assert (tmp_path / "dist" / "checkpoint-rank1.pt").is_file()
    for name in single:
        got = load_sae(tmp_path / "dist" / "saes" / name).tensors()
        for key in single[name]:
            torch.testing.assert_close(got[key], single[name][key], rtol=1e-6, atol=1e-6)


def test_sparsity_per_kind():
    cfg = _cfg(l1_coeff=30.0, l1_by_kind={"transcoder": 4.0})
    assert cfg.trainer_config(32, "transcoder").l1_coeff == 4.0
    assert cfg.trainer_config(32, "resid").l1_coeff == 30.0 == cfg.trainer_config(32, "attn").l1_coeff
    from icl_circuits.cli.common import kv_floats as _kv_floats

    assert _kv_floats(["transcoder=4", "attn=2.5"]) == {"transcoder": 4.0, "attn": 2.5}
    with pytest.raises(SystemExit, match="KIND=NUMBER"):
        _kv_floats(["transcoder"])
