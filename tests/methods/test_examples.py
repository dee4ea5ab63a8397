"""Max-activating example store: binning, top-k and windows against a brute-force pass; resume; queries."""

from __future__ import annotations

import sqlite3

import pytest
import torch

from icl_circuits import Site
from icl_circuits.methods.examples import ExampleConfig, ExampleStore, build_example_store, sample_keys
from icl_circuits.sae.activations import token_batches

from tests.helpers import EXAMPLE_WORDS as WORDS, random_docs, word_lm, cli_examples_end_to_end, example_sae as tiny_sae

CFG = ExampleConfig(seq_len=12, batch_size=3, top_k=3, per_bin=2, max_bins=6, context_before=3, context_after=2,
                    commit_every=2, seed=7)  # fmt: skip


@pytest.fixture(scope="module")
def lm():
    return word_lm(WORDS)


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return random_docs(WORDS)


def fmix_key(uid: int, latent: int, seed: int) -> int:
    """murmur3 fmix32 of the mixed input, in plain Python integers (independent of the torch version)."""
    m = 0xFFFFFFFF
    h = (uid * 0x9E3779B1 + latent * 0x7FEB352D + seed * 0x846CA68B + 0x165667B1) & m
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & m
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & m
    return h ^ (h >> 16)


@torch.no_grad()
def brute_force(lm, saes, docs, cfg):
    """Every firing of every latent from a plain pass over token_batches, then selection by sorting."""
    # which document each chunk comes from, by cutting documents the same documented way
    row_doc = []
    for d, doc in enumerate(docs):
        ids = lm.tokenizer(doc, add_special_tokens=False)["input_ids"]
        row_doc += [d for i in range(0, len(ids), cfg.seq_len - 1) if len(ids[i : i + cfg.seq_len - 1]) >= cfg.min_tokens]
    out = {}
    for name, sae in saes.items():
        firings = []  # (latent, uid, act, row, pos)
        windows = {}
        row0 = 0
        for ids, mask in token_batches(lm.tokenizer, docs, cfg.seq_len, cfg.batch_size, cfg.min_tokens):
            f = sae.encode(lm.run(ids, mask, read=[sae.cfg.site]).acts[Site.parse(sae.cfg.site)])  # [b, s, d_sae]
            lengths = mask.sum(1).tolist()
            for r, p, lat in (f > 0).nonzero().tolist():  # every positive activation, then filter by hand
                n = lengths[r]
                if not 1 <= p < n:  # BOS and padding are never examples
                    continue
                uid = (row0 + r) * cfg.seq_len + p
                firings.append((lat, uid, float(f[r, p, lat]), row0 + r, p))
                lo, hi = max(1, p - cfg.context_before), min(n, p + cfg.context_after + 1)
                windows[(lat, uid)] = (ids[r, lo:hi].tolist(), f[r, lo:hi, lat].tolist(), p - lo)
            row0 += ids.shape[0]
        expect = {}
        for lat in range(sae.d_sae):
            mine = [x for x in firings if x[0] == lat]
            best_per_row = {}
            for x in mine:  # the chunk's maximum; on a tie the first position
                if x[3] not in best_per_row or x[2] > best_per_row[x[3]][2]:
                    best_per_row[x[3]] = x
            top = sorted(best_per_row.values(), key=lambda x: (-x[2], x[1]))[: cfg.top_k]
            rows = [(-1, x) for x in top]
            for b in range(cfg.max_bins):
                in_bin = [x for x in mine if min(int(x[2] // cfg.bin_width), cfg.max_bins - 1) == b]
                rows += [(b, x) for x in sorted(in_bin, key=lambda x: (fmix_key(x[1], lat, cfg.seed), x[1]))[: cfg.per_bin]]
            expect[lat] = [(b, x[1], x[2], row_doc[x[3]], x[4], windows[(lat, x[1])]) for b, x in rows]
        out[name] = (expect, firings)
    return out


def test_sample_keys_match_plain_python_and_look_uniform():
    uid = torch.arange(0, 20_000) * 977 + 12345
    lat = torch.arange(20_000) % 37
    keys = sample_keys(uid, lat, seed=3)
    assert [int(k) for k in keys[:50]] == [fmix_key(int(u), int(l), 3) for u, l in zip(uid[:50], lat[:50])]
    counts = torch.bincount((keys >> 28).long(), minlength=16).float()  # 16 equal buckets of the key range
    assert ((counts - 1250).abs() < 200).all(), counts


def test_store_matches_brute_force(lm, docs, tmp_path):
    saes = {"a": tiny_sae(lm, "resid_post.0", seed=1), "b": tiny_sae(lm, "resid_mid.1", d_sae=8, seed=2)}
    store = build_example_store(lm, saes, docs, tmp_path / "ex.sqlite", CFG, progress=False)
    assert store.complete and not (tmp_path / "ex.sqlite.partial").exists()
    ref = brute_force(lm, saes, docs, CFG)
    n_checked_bins = 0
    for name, sae in saes.items():
        expect, firings = ref[name]
        assert sum(store.latent_stats(name, l)["n_fired"] for l in range(sae.d_sae)) == len(firings)
        for lat in range(sae.d_sae):
            got = store.examples(name, lat)
            want = expect[lat]
            # the store orders top first, then bins from the highest down
            want_sorted = [w for w in want if w[0] == -1] + sorted((w for w in want if w[0] >= 0), key=lambda w: -w[0])
            assert [(e.bin, e.uid) for e in got] == [(w[0], w[1]) for w in want_sorted], (name, lat)
            for e, (b, uid, act, doc, pos, (ids, acts, target)) in zip(got, want_sorted):
                assert e.act == pytest.approx(act, rel=1e-6)
                assert (e.doc, e.pos, e.target, e.token_ids) == (doc, pos, target, ids)
                assert e.acts == pytest.approx(acts, rel=2e-3, abs=2e-3)  # stored as float16
                assert e.acts[e.target] == pytest.approx(act, rel=2e-3)
                assert e.tokens == [lm.tokenizer.convert_ids_to_tokens(t) for t in ids]
            n_checked_bins += len({e.bin for e in got if e.bin >= 0})
            stats = store.latent_stats(name, lat)
            mine = [x[2] for x in firings if x[0] == lat]
            assert stats["n_fired"] == len(mine)
            assert stats["max_act"] == pytest.approx(max(mine, default=0.0), rel=1e-6)
    assert n_checked_bins > 20  # the test really exercised several bins per latent
    assert any(e.bin == CFG.max_bins - 1 for lat in range(12) for e in store.examples("a", lat))  # clipped top bin


def test_resume_gives_the_same_store(lm, docs, tmp_path):
    saes = {"a": tiny_sae(lm, "resid_post.0", seed=1)}
    whole = build_example_store(lm, saes, docs, tmp_path / "whole.sqlite", CFG, progress=False)
    path = tmp_path / "parts.sqlite"
    for _ in range(3):  # three interrupted sessions, then one that finishes
        part = build_example_store(lm, saes, docs, path, CFG, progress=False, max_batches=3)
        assert not part.complete and not path.exists()
    done = build_example_store(lm, saes, docs, path, CFG, progress=False)
    assert done.complete and done.progress()["rows"] == whole.progress()["rows"]

    def dump(p):
        con = sqlite3.connect(p)
        return {t: sorted(con.execute(f"SELECT * FROM {t}").fetchall()) for t in ("examples", "latents", "tokens")}

    assert dump(path) == dump(tmp_path / "whole.sqlite")
    with sqlite3.connect(path) as con:  # one progress record per commit, across the sessions
        assert con.execute("SELECT COUNT(*) FROM progress").fetchone()[0] > 3


def test_partial_with_other_settings_is_refused(lm, docs, tmp_path):
    saes = {"a": tiny_sae(lm, "resid_post.0", seed=1)}
    build_example_store(lm, saes, docs, tmp_path / "ex.sqlite", CFG, progress=False, max_batches=1)
    with pytest.raises(ValueError, match="other settings"):
        build_example_store(lm, saes, docs, tmp_path / "ex.sqlite", ExampleConfig(seq_len=12, top_k=5), progress=False)
    with pytest.raises(ValueError, match="unfinished"):
        ExampleStore(tmp_path / "ex.sqlite.partial")


def test_queries(lm, docs, tmp_path):
    saes = {"a": tiny_sae(lm, "resid_post.0", seed=1)}
    store = build_example_store(lm, saes, docs, tmp_path / "ex.sqlite", CFG, progress=False)
    again = ExampleStore(tmp_path / "ex.sqlite")  # opening an existing store reads the same
    lat = max(range(12), key=lambda l: store.latent_stats("a", l)["n_fired"])
    everything = again.examples("a", lat)
    assert again.examples("a", lat, limit=4) == everything[:4]
    top = again.examples("a", lat, kind="top")
    assert len(top) == CFG.top_k and [e.act for e in top] == sorted((e.act for e in top), reverse=True)
    assert all(e.bin >= 0 for e in again.examples("a", lat, kind="bins"))
    assert len(everything) == len(top) + len(again.examples("a", lat, kind="bins"))
    assert [t["latent"] for t in again.top_latents("a", limit=3)] == sorted(
        range(12), key=lambda l: -again.latent_stats("a", l)["max_act"])[:3]  # fmt: skip
    assert again.saes()[0]["name"] == "a" and again.saes()[0]["site"] == "resid_post.0"
    with pytest.raises(KeyError, match="no SAE"):
        again.examples("nope", 0)
    with pytest.raises(ValueError, match="kind"):
        again.examples("a", 0, kind="middle")


def test_bad_inputs(lm, docs, tmp_path):
    with pytest.raises(ValueError, match="at least one SAE"):
        build_example_store(lm, {}, docs, tmp_path / "x.sqlite", CFG)
    with pytest.raises(ValueError, match="bin_width"):
        ExampleConfig(bin_width=0)
    other = tiny_sae(lm, "resid_post.0")
    other.cfg.model = "some-other-model"
    with pytest.raises(ValueError, match="trained for model"):
        build_example_store(lm, {"a": other}, docs, tmp_path / "x.sqlite", CFG)


def test_cli_examples_end_to_end(lm, docs, tmp_path):
    """`icl-circuits examples` on a saved tiny model and SAE: a store, a summary, a plot and a report."""
    cli_examples_end_to_end(lm, docs, tmp_path)  # in tests/helpers.py: test_device.py runs it too
