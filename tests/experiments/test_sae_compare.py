"""Training from an activation cache (resume), `sae compare` end to end, and its L0 interpolation."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from icl_circuits.core.storage import ConfigMismatch
from icl_circuits.experiments import sae_compare as C
from icl_circuits.sae.activations import token_batches
from icl_circuits.sae.cache import ActivationCache, harvest
from icl_circuits.sae.training import SAESpec, TrainConfig, train_from_cache

from tests.helpers import make_tiny, word_tokenizer

torch.set_num_threads(1)
WORDS = [f"w{i}" for i in range(60)]
SPEC = SAESpec.parse("resid:1")


@pytest.fixture(scope="module")
def lm():
    lm, _ = make_tiny("gemma3")
    lm.tokenizer = word_tokenizer(WORDS)
    return lm


def _docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def caches(lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("acts")
    kw = dict(seq_len=16, batch_size=4, shard_rows=64, progress=False)
    harvest(lm, [SPEC.in_site], _docs(40, 0), root / "train", n_tokens=600, **kw)
    harvest(lm, [SPEC.in_site], _docs(10, 1), root / "eval", n_tokens=200, **kw)
    return ActivationCache(root / "train"), ActivationCache(root / "eval")


def _cfg(**kw) -> TrainConfig:
    base = dict(specs=["resid:1"], arch="topk", k=4, d_sae=24, n_tokens=900, batch_tokens=64, checkpoint_every=2,
                log_every=1, param_dtype="float32", dead_window=5, dead_steps=5)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_train_from_cache_runs_epochs_and_resumes_exactly(caches, tmp_path, monkeypatch):
    train, _ = caches
    assert train.n_rows < 900  # so the run needs a second epoch
    straight = train_from_cache(train, _cfg(), tmp_path / "a", progress=False)["resid_1"]

    from icl_circuits.sae import trainers

    calls = {"n": 0}
    real_step = trainers.SAETrainer.step

    def dying_step(self, x, y=None):  # a kill after step 7 (the checkpoint holds step 6)
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real_step(self, x, y)

    monkeypatch.setattr(trainers.SAETrainer, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_from_cache(train, _cfg(), tmp_path / "b", progress=False)
    monkeypatch.setattr(trainers.SAETrainer, "step", real_step)
    resumed = train_from_cache(train, _cfg(), tmp_path / "b", progress=False)["resid_1"]
    for name, t in straight.tensors().items():
        assert torch.equal(t, resumed.tensors()[name]), name
    steps = [l for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == len(set(steps)) == math.ceil(900 / 64)  # no step logged twice after the resume
    timing = (tmp_path / "b" / "timing-rank0.json").read_text()
    assert '"tokens": 900' in timing


def test_train_from_cache_refuses_another_site_or_config(caches, tmp_path):
    train, _ = caches
    with pytest.raises(ValueError, match="not \\['resid_pre.0'\\]"):
        train_from_cache(train, _cfg(specs=["resid:0"]), tmp_path, progress=False)
    train_from_cache(train, _cfg(n_tokens=64), tmp_path, progress=False)
    with pytest.raises(ConfigMismatch, match=r"config.d_sae: \d+ -> 32"):
        train_from_cache(train, _cfg(n_tokens=64, d_sae=32), tmp_path, progress=False)


def test_interpolation_in_log_l0_is_hand_worked():
    pts = [(10.0, 0.5), (40.0, 0.7), (160.0, 0.9)]
    assert C._interp(pts, 20.0) == pytest.approx(0.6)  # halfway between 10 and 40 in log(L0)
    assert C._interp(pts, 80.0) == pytest.approx(0.8)
    assert C._interp(pts, 40.0) == pytest.approx(0.7)
    assert math.isnan(C._interp(pts, 5.0)) and math.isnan(C._interp(pts, 200.0))  # never extrapolated


def test_compare_end_to_end_on_a_tiny_model(lm, caches, tmp_path, monkeypatch):
    train, ev = caches
    # two tasks' ICL prompts stand for the 23 (the tiny word tokenizer cannot spell the real tasks)
    rows = {"x": torch.randn(30, lm.d_model), "y": None, "types": torch.tensor([3, 2, 4] * 10)}
    rows["y"] = rows["x"]
    monkeypatch.setattr(C, "icl_rows", lambda *a, **k: rows)
    cfg = C.CompareConfig(spec="resid:1", archs=("topk", "relu"), l0_targets=(2, 4), penalties={"relu": (0.5, 5.0)},
                          d_sae=24, n_tokens=256, batch_tokens=64)  # fmt: skip
    batches = list(token_batches(lm.tokenizer, _docs(4, 2), 16, 4))
    table = C.run_compare(lm, cfg, train, ev, batches, tmp_path, progress=False)
    runs = (tmp_path / "runs.csv").read_text()
    assert "topk_k2" in runs and "topk_k4" in runs and "relu_l1_coeff0.5" in runs and "relu_l1_coeff5" in runs
    topk = [r for r in table if r["arch"] == "topk"]
    assert [r["target_l0"] for r in topk] == [2, 4] and all(r["l0"] <= r["target_l0"] for r in topk)
    for r in topk:  # the held-out numbers are the run's own, recomputed here from its saved SAE
        from icl_circuits.sae.formats import load_sae

        sae = load_sae(tmp_path / "runs" / f"topk_k{r['target_l0']}" / "saes" / "resid_1")
        assert r["fve"] == pytest.approx(C.held_out_stats(sae, ev)["fve"])
    assert (tmp_path / "compare.png").is_file() and C.winner(table) in ("topk", "relu")
    # a rerun finds every run done; more coefficients extend the same comparison, other settings are refused
    again = C.run_compare(lm, cfg, train, ev, batches, tmp_path, progress=False)
    assert json.dumps(again) == json.dumps(table)  # (NaN where a penalty recipe's L0s do not bracket a target)
    with pytest.raises(ValueError, match="d_sae"):
        C.run_compare(lm, C.CompareConfig(spec="resid:1", archs=("topk",), l0_targets=(2,), d_sae=32, n_tokens=256,
                                          batch_tokens=64), train, ev, batches, tmp_path, progress=False)  # fmt: skip


def test_penalty_recipes_need_coefficients():
    with pytest.raises(ValueError, match="needs coefficients"):
        C.CompareConfig(archs=("gated",)).runs()
