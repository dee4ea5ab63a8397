"""Starter suite: shipped / cached / trained-on-demand SAEs, and export with bf16 weights + model cards."""

from __future__ import annotations

import json
import random

import pytest
import torch

from icl_circuits.sae import suite
from icl_circuits.sae.formats import load_sae, save_sae
from icl_circuits.sae.training import TrainConfig, train_saes

from tests.helpers import make_tiny, word_tokenizer

WORDS = [f"w{i}" for i in range(40)]


def _lm():
    lm, _ = make_tiny("gemma2")
    lm.tokenizer = word_tokenizer(WORDS)
    return lm


@pytest.fixture
def small_recipe(tmp_path, monkeypatch):
    rng = random.Random(0)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(30))}) + "\n" for _ in range(20)))
    monkeypatch.setenv("ICL_CIRCUITS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(suite, "STARTER_CORPUS", str(corpus))
    monkeypatch.setattr(suite, "STARTER_RECIPE", dict(d_sae=16, n_tokens=200, batch_tokens=64, seq_len=16,
                                                      skip_docs=2, param_dtype="float32"))  # fmt: skip
    return corpus


def test_missing_sae_is_trained_once_then_cached(small_recipe, monkeypatch, capsys):
    lm = _lm()
    sae = suite.starter_sae(lm, "resid:1", progress=False)
    assert "training the missing starter SAE resid_1" in capsys.readouterr().out
    assert sae.dtype == torch.float32 and sae.cfg.site == "resid_pre.1"
    from icl_circuits.sae import training

    monkeypatch.setattr(training, "train_saes", lambda *a, **k: pytest.fail("should load from the cache"))
    again = suite.starter_sae(lm, "resid:1", progress=False)
    x = torch.randn(3, lm.d_model)
    torch.testing.assert_close(again.encode(x), sae.encode(x))
    with pytest.raises(FileNotFoundError, match="no starter SAE"):
        suite.starter_sae(lm, "attn:0", train_if_missing=False)


def test_export_writes_bf16_weights_and_model_cards(small_recipe, tmp_path):
    lm = _lm()
    run = tmp_path / "run"
    cfg = TrainConfig(specs=["resid:1", "transcoder:0"], d_sae=16, n_tokens=200, batch_tokens=64, seq_len=16, skip_docs=2)
    saes = train_saes(lm, [json.loads(l)["text"] for l in small_recipe.read_text().splitlines()], cfg, run, progress=False)
    (run / "eval.json").write_text(json.dumps([{"site": "resid_pre.1", "n_tokens": 10, "l0": 3.0, "fve": 0.5,
        "dead_fraction": 0.1, "ce_clean": 1.0, "ce_spliced": 1.2, "ce_zero": 3.0, "ce_loss_recovered": 0.9}]))  # fmt: skip
    paths = suite.export_suite(run, tmp_path / "ship")
    assert sorted(p.name for p in paths) == ["resid_1", "transcoder_0"]
    from safetensors.torch import load_file

    raw = load_file(str(tmp_path / "ship" / "resid_1" / "sae.safetensors"))
    assert raw["W_enc"].dtype == raw["W_dec"].dtype == torch.bfloat16 and raw["b_enc"].dtype == torch.float32
    shipped = load_sae(tmp_path / "ship" / "resid_1")
    assert shipped.dtype == torch.float32  # mixed file computes in float32
    torch.testing.assert_close(shipped.W_enc, saes["resid_1"].W_enc.bfloat16().float())
    card = (tmp_path / "ship" / "resid_1" / "README.md").read_text()
    assert "resid_pre.1" in card and "| 10 | 3.0 | 0.500 |" in card and "200 tokens" in card
    assert "mlp_out.0" in (tmp_path / "ship" / "transcoder_0" / "README.md").read_text()
    # exporting again (e.g. once the evaluation exists) replaces the folders, model cards included
    (run / "eval.json").write_text(json.dumps([]))
    suite.export_suite(run, tmp_path / "ship")
    assert "| 10 | 3.0 |" not in (tmp_path / "ship" / "resid_1" / "README.md").read_text()


def test_weight_dtype_round_trip(tmp_path):
    lm = _lm()
    from icl_circuits.sae.dictionary import JumpReLUSAE, SAEConfig

    cfg = SAEConfig(d_in=lm.d_model, d_sae=8, site="resid_pre.0", layer=0)
    sae = JumpReLUSAE(cfg, {"W_enc": torch.randn(lm.d_model, 8), "b_enc": torch.randn(8), "threshold": torch.rand(8)})
    save_sae(sae, tmp_path / "s", weight_dtype=torch.bfloat16)
    back = load_sae(tmp_path / "s")
    torch.testing.assert_close(back.b_enc, sae.b_enc, rtol=0, atol=0)  # biases and thresholds stay exact
    torch.testing.assert_close(back.threshold, sae.threshold, rtol=0, atol=0)


def test_a_starter_sae_of_another_suite_version_is_refused(small_recipe, monkeypatch, tmp_path):
    lm = _lm()
    from icl_circuits.sae.dictionary import JumpReLUSAE, SAEConfig

    folder = suite.suite_cache_dir(lm.name) / "resid_1" / "saes" / "resid_1"
    old = JumpReLUSAE(SAEConfig(d_in=lm.d_model, d_sae=8, site="resid_pre.1", layer=1, model=lm.name,
                                extra={"suite_version": 1}))  # fmt: skip
    save_sae(old, folder)
    with pytest.raises(ValueError, match="suite v1, not v2"):
        suite.starter_sae(lm, "resid:1", train_if_missing=False)
    assert f"v{suite.SUITE_VERSION}" in str(folder)  # the cache path holds the version: v1 caches never collide


def test_export_to_the_cache_serves_sites_the_suite_does_not_ship(small_recipe, monkeypatch, capsys):
    """`sae export RUN` without a destination: the run's SAEs become starter SAEs of the user cache (bf16
    weights, suite version stamped), found by `starter_sae` with no training."""
    lm = _lm()
    from icl_circuits.cli import main

    run = small_recipe.parent / "run"
    cfg = TrainConfig(specs=["attn:1"], d_sae=16, n_tokens=200, batch_tokens=64, seq_len=16, skip_docs=2)
    trained = train_saes(lm, [json.loads(l)["text"] for l in small_recipe.read_text().splitlines()], cfg, run, progress=False)
    assert main(["sae", "export", str(run)]) == 0
    assert str(suite.cached_starter_dir(lm.name, "attn_1")) in capsys.readouterr().out
    from icl_circuits.sae import training

    monkeypatch.setattr(training, "train_saes", lambda *a, **k: pytest.fail("should load the exported SAE"))
    got = suite.starter_sae(lm, "attn:1", train_if_missing=False)
    assert got.cfg.extra["suite_version"] == suite.SUITE_VERSION and got.cfg.site == "attn_out.1"
    torch.testing.assert_close(got.W_dec, trained["attn_1"].W_dec.bfloat16().float())
