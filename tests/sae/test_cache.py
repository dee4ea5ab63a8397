"""The on-disk activation cache: harvest, bitwise resume after a kill, refusals, the shuffled reader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from icl_circuits import Site
from icl_circuits.core.storage import FolderLock, RunBusy
from icl_circuits.sae import cache as C
from icl_circuits.sae.activations import token_batches
from icl_circuits.sae.cache import ActivationCache, harvest

from tests.helpers import make_tiny, random_docs, word_lm

torch.set_num_threads(1)

WORDS = [f"w{i}" for i in range(60)]
SITES = [Site(0, "resid_pre"), Site(0, "attn_out"), Site(1, "mlp_out")]
SEQ, BATCH, SHARD = 12, 3, 40
KW = {"seq_len": SEQ, "batch_size": BATCH, "shard_rows": SHARD, "progress": False}


@pytest.fixture(scope="module")
def lm():
    return word_lm(WORDS)


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return random_docs(WORDS)


@pytest.fixture(scope="module")
def full(lm, docs, tmp_path_factory) -> Path:
    """An uninterrupted harvest of the whole corpus (n_tokens larger than the corpus)."""
    out = tmp_path_factory.mktemp("full")
    harvest(lm, SITES, docs, out, n_tokens=10_000, **KW)
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _all_rows(cache: ActivationCache) -> dict[str, torch.Tensor]:
    shards = [cache.load_shard(i) for i in range(cache.n_shards)]
    return {k: torch.cat([s[k] for s in shards]) for k in shards[0]}


@torch.no_grad()
def test_rows_are_the_direct_activations_in_corpus_order(lm, docs, full):
    direct: dict[str, list[torch.Tensor]] = {str(s): [] for s in SITES} | {"token_ids": [], "positions": []}
    for ids, mask in token_batches(lm.tokenizer, docs, SEQ, BATCH):
        acts = lm.run(ids, mask, read=SITES).acts
        keep = mask.bool() & (torch.arange(ids.shape[1]) > 0)  # real tokens, BOS dropped
        for s in SITES:
            direct[str(s)].append(acts[s][keep].to(torch.bfloat16))
        direct["token_ids"].append(ids[keep].int())
        direct["positions"].append(torch.arange(ids.shape[1]).expand_as(ids)[keep])
    want = {k: torch.cat(v) for k, v in direct.items()}
    cache = ActivationCache(full)
    got = _all_rows(cache)
    n = want["token_ids"].shape[0]
    assert cache.n_rows == n and cache.complete and cache.sites == SITES
    assert cache.shard_rows == [SHARD] * (n // SHARD) + ([n % SHARD] if n % SHARD else [])
    for s in SITES:
        assert got[str(s)].dtype == torch.bfloat16 and got[str(s)].shape == (n, lm.d_model)
        assert torch.equal(got[str(s)], want[str(s)])
    assert torch.equal(got["token_ids"], want["token_ids"]) and got["token_ids"].dtype == torch.int32
    assert torch.equal(got["positions"].long(), want["positions"]) and got["positions"].dtype == torch.int16
    m = cache.manifest
    assert (m["model"], m["d_model"], m["n_layers"], m["seq_len"]) == ("tiny-llama", lm.d_model, 2, SEQ)
    assert (m["forward_dtype"], m["storage_dtype"], m["total_rows"]) == ("float32", "bfloat16", n)


def test_n_tokens_caps_the_harvest(lm, docs, full, tmp_path):
    cache = harvest(lm, SITES, docs, tmp_path, n_tokens=95, **KW)
    assert cache.shard_rows == [40, 40, 15] and cache.complete
    ref = _all_rows(ActivationCache(full))
    got = _all_rows(cache)
    assert all(torch.equal(got[k], ref[k][:95]) for k in got)


@pytest.mark.parametrize("where", ["shard", "manifest"])
def test_resume_after_a_kill_is_bitwise_identical(lm, docs, full, tmp_path, monkeypatch, where):
    """Killed while writing shard 2 (or right after writing it, before the manifest): rerun, same bytes."""
    real_shard, real_json = C._write_shard, C.write_json
    calls = {"n": 0}

    def dying_shard(path, tensors, metadata):
        if path.name == C.shard_name(2):
            raise KeyboardInterrupt("killed")
        real_shard(path, tensors, metadata)

    def dying_json(path, obj):
        if len(obj["shards"]) == 3:  # shard-00002 is on disk, the manifest does not list it yet
            calls["n"] += 1
            raise KeyboardInterrupt("killed")
        real_json(path, obj)

    if where == "shard":
        monkeypatch.setattr(C, "_write_shard", dying_shard)
    else:
        monkeypatch.setattr(C, "write_json", dying_json)
    with pytest.raises(KeyboardInterrupt):
        harvest(lm, SITES, docs, tmp_path, n_tokens=10_000, **KW)
    partial = ActivationCache(tmp_path)
    assert partial.n_shards == 2 and not partial.complete and partial.n_rows == 2 * SHARD
    assert partial.manifest["cursor"]["skip_rows"] > 0  # the resume starts inside a token batch
    monkeypatch.undo()
    (tmp_path / "shard-00002.safetensors.abc123.tmp").write_bytes(b"torn")  # as a SIGKILL mid-write leaves
    harvest(lm, SITES, docs, tmp_path, n_tokens=10_000, **KW)
    assert _files(tmp_path) == _files(full)
    assert not list(tmp_path.glob("*.tmp"))


def test_resuming_a_complete_cache_changes_nothing(lm, docs, full):
    before = _files(full)
    cache = harvest(lm, SITES, docs, full, n_tokens=10_000, **KW)
    assert _files(full) == before and cache.complete


@pytest.mark.parametrize(
    "change, key",
    [
        ({"sites": [Site(0, "resid_pre")]}, "sites"),
        ({"seq_len": SEQ + 4}, "seq_len"),
        ({"corpus": True}, "corpus_fingerprint"),
        ({"model": True}, "model"),
        ({"n_tokens": 500}, "n_tokens"),
    ],
)
def test_resume_refuses_another_setup(lm, docs, full, change, key):
    kw = {**KW, "seq_len": change.get("seq_len", SEQ)}
    sites = change.get("sites", SITES)
    use_docs = docs[:-1] if "corpus" in change else docs
    use_lm = lm
    if "model" in change:
        use_lm, _ = make_tiny("llama", seed=1)
        use_lm.tokenizer, use_lm.name = lm.tokenizer, "tiny-other"
    before = _files(full)
    with pytest.raises(ValueError, match=rf"manifest\.json: the cache was made with {key}=") as e:
        harvest(use_lm, sites, use_docs, full, n_tokens=change.get("n_tokens", 10_000), **kw)
    assert "\n" not in str(e.value) and "not" in str(e.value)
    assert _files(full) == before


def test_a_second_harvest_into_a_busy_folder_is_refused(lm, docs, full):
    """Two harvests into one folder would interleave shards: the second gets RunBusy and touches nothing."""
    before = _files(full)
    with FolderLock(full, "harvest"):  # as another process harvesting there holds it
        with pytest.raises(RunBusy, match="in use by another run"):
            harvest(lm, SITES, docs, full, n_tokens=10_000, **KW)
    assert _files(full) == before


def test_reader_refuses_another_model_or_site(full):
    cache = ActivationCache(full)
    cache.check("tiny-llama", 32, SITES[:2], seq_len=SEQ)
    with pytest.raises(ValueError, match=r"manifest\.json: the cache was made with model='tiny-llama', not 'gemma'"):
        cache.check("gemma", 32, SITES)
    with pytest.raises(ValueError, match=r"d_model=32, not 640"):
        cache.check("tiny-llama", 640, SITES)
    with pytest.raises(ValueError, match=r"holds sites .*not \['resid_post.1'\]"):
        cache.check("tiny-llama", 32, ["resid_post.1"])
    with pytest.raises(ValueError, match=r"seq_len=12, not 128"):
        cache.check("tiny-llama", 32, SITES, seq_len=128)
    with pytest.raises(ValueError, match="holds sites"):
        next(cache.batches(["resid_post.1"], 8))


def test_nan_activations_are_refused_at_harvest(lm, docs, tmp_path, monkeypatch):
    real = lm.activations
    calls = {"n": 0}

    def nan_in_fourth_batch(ids, sites, **kw):
        acts = real(ids, sites, **kw)
        calls["n"] += 1
        if calls["n"] == 4:  # rows of shard-00002
            acts[Site(0, "attn_out")][0, 3, 5] = float("nan")
        return acts

    monkeypatch.setattr(lm, "activations", nan_in_fourth_batch)
    with pytest.raises(ValueError, match=r"NaN/inf activations at site attn_out\.0 in shard shard-00002") as e:
        harvest(lm, SITES, docs, tmp_path, n_tokens=10_000, **KW)
    assert "manifest.json" in str(e.value) and "\n" not in str(e.value)


def test_wrong_width_is_refused(lm, docs, full, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(full, bad)
    shard = load_file(bad / C.shard_name(1))
    shard["mlp_out.1"] = torch.zeros(SHARD, 33, dtype=torch.bfloat16)
    save_file(shard, bad / C.shard_name(1))
    cache = ActivationCache(bad)
    msg = r"shard-00001\.safetensors: mlp_out\.1 has shape \(40, 33\), expected \(40, 32\)"
    with pytest.raises(ValueError, match=msg):
        list(cache.batches(SITES, 16, eval_shards=0, split="all"))
    next(cache.batches(SITES[:2], 16))  # other sites of the shard are fine

    real = lm.activations
    def wider(ids, sites, **kw):
        return {s: torch.cat([a, a[..., :1]], -1) for s, a in real(ids, sites, **kw).items()}  # [.., d_model + 1]

    monkeypatch.setattr(lm, "activations", wider)
    with pytest.raises(ValueError, match=r"rows of width 33, not d_model=32"):
        harvest(lm, SITES, docs, tmp_path / "w", n_tokens=100, **KW)


def test_epochs_are_aligned_permutations_deterministic_and_resumable(full):
    cache = ActivationCache(full)
    ref = _all_rows(cache)
    n = cache.n_rows

    def epoch(seed, ep, **kw):
        return list(cache.batches(SITES, 16, seed=seed, epoch=ep, buffer_shards=2, extras=True, **kw))

    e0 = epoch(0, 0)
    assert [b["token_ids"].shape[0] for b in e0] == [16] * (n // 16) + ([n % 16] if n % 16 else [])
    order = cache.epoch_order(0, 0, buffer_shards=2)
    assert torch.equal(order.sort().values, torch.arange(n))  # a permutation of every row
    assert not torch.equal(order, torch.arange(n))
    got = {k: torch.cat([b[k] for b in e0]) for k in e0[0]}
    for s in SITES:  # every site's row i is the row of the same token: aligned
        assert got[s].dtype == torch.float32 and torch.equal(got[s], ref[str(s)][order].float())
    assert torch.equal(got["token_ids"], ref["token_ids"][order])
    assert torch.equal(got["positions"], ref["positions"][order].int())
    assert sorted(got["token_ids"].tolist()) == sorted(ref["token_ids"].tolist())

    again = epoch(0, 0)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(e0, again) for k in a)  # deterministic
    assert not torch.equal(cache.epoch_order(0, 1, buffer_shards=2), order)  # another epoch, another order
    assert not torch.equal(cache.epoch_order(1, 0, buffer_shards=2), order)
    rest = epoch(0, 0, start_batch=5)  # resume mid-epoch
    assert len(rest) == len(e0) - 5
    assert all(torch.equal(a[k], b[k]) for a, b in zip(e0[5:], rest) for k in a)


def test_held_out_shards(full):
    cache = ActivationCache(full)
    train = list(cache.batches(SITES, 16, eval_shards=2, extras=True))
    ev = list(cache.batches(SITES, 16, split="eval", eval_shards=2, extras=True))
    n_eval = sum(cache.shard_rows[-2:])
    assert cache.split_rows("eval", 2) == n_eval and cache.split_rows("train", 2) == cache.n_rows - n_eval
    ref = _all_rows(cache)
    ev_ids = torch.cat([b["token_ids"] for b in ev])
    assert torch.equal(ev_ids, ref["token_ids"][-n_eval:])  # the last rows, in cache order
    assert sum(b[SITES[0]].shape[0] for b in train) == cache.n_rows - n_eval
    assert set(cache.epoch_order(3, 0, eval_shards=2).tolist()).isdisjoint(range(cache.n_rows - n_eval, cache.n_rows))


def test_a_bfloat16_model_harvests_and_compares(lm, docs, tmp_path):
    import copy

    from icl_circuits import LM

    low = LM(copy.deepcopy(lm.model).to(torch.bfloat16), lm.tokenizer, name=lm.name)
    cache = harvest(low, SITES, docs[:6], tmp_path, n_tokens=60, **KW)
    assert cache.manifest["forward_dtype"] == "bfloat16" and cache.n_rows == 60
    batch = next(cache.batches(SITES, 8))
    assert batch[SITES[0]].dtype == torch.float32 and batch[SITES[0]].shape == (8, lm.d_model)
    errs = C.compare_forward_dtypes(lm, low, SITES, list(token_batches(lm.tokenizer, docs[:6], SEQ, BATCH)))
    for e in errs.values():
        assert 0 < e["storage_rel_err"] < 0.01 and 0 < e["rel_err"] < 0.2 and e["cos_min"] > 0.9
