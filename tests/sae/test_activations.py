"""Corpus sources, token batching and the shuffled, site-aligned activation store, on a tiny model."""

from __future__ import annotations

import io
import json

import pytest
import torch

from icl_circuits import Site
from icl_circuits.data.corpus import CorpusError, generated, skip_docs, text_files
from icl_circuits.sae.activations import ActivationStore, held_out_batches, token_batches

from tests.helpers import make_tiny, random_docs, word_lm, word_tokenizer

WORDS = [f"w{i}" for i in range(60)]  # 4 specials + 120 pieces < VOCAB
SITES = [Site(0, "resid_mid"), Site(0, "mlp_out"), Site(1, "resid_mid"), Site(1, "mlp_out")]
SEQ, BATCH = 12, 3


@pytest.fixture(scope="module")
def lm():
    return word_lm(WORDS)


@pytest.fixture(scope="module")
def docs() -> list[str]:
    """Random documents of 0..40 words: some shorter than min_tokens, some spanning several chunks."""
    return random_docs(WORDS)


def _store(lm, docs, **kw) -> ActivationStore:
    return ActivationStore(lm, SITES, docs, **{"seq_len": SEQ, "batch_size": BATCH, "buffer_batches": 2, **kw})


@torch.no_grad()
def _direct(lm, docs) -> dict[str, dict[Site, torch.Tensor]]:
    """Every position's activations straight from lm.run, split into eligible / BOS / pad rows."""
    rows = {k: {s: [] for s in SITES} for k in ("ok", "bos", "pad")}
    for ids, mask in token_batches(lm.tokenizer, docs, SEQ, BATCH):
        acts = lm.run(ids, mask, read=SITES).acts
        pos = torch.arange(ids.shape[1]).expand_as(ids)  # [batch, seq]
        kinds = {"ok": (mask == 1) & (pos > 0), "bos": pos == 0, "pad": mask == 0}
        for k, m in kinds.items():
            for s in SITES:
                rows[k][s].append(acts[s][m])
    return {k: {s: torch.cat(v) for s, v in d.items()} for k, d in rows.items()}


def _drain(store: ActivationStore, n: int) -> dict[Site, torch.Tensor]:
    got = list(store.batches(n))
    return {s: torch.cat([g[s] for g in got]) for s in SITES}


def _multiset(rows: torch.Tensor) -> list[tuple[float, ...]]:
    return sorted(map(tuple, rows.tolist()))


def _match(rows: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row, (index of the nearest table row, its distance)."""
    d = torch.cdist(rows, table, compute_mode="donot_use_mm_for_euclid_dist")  # [n_rows, n_table]
    return d.min(1).indices, d.min(1).values


# -- the activation store ----------------------------------------------------------------------
def test_rows_are_direct_activations_aligned_across_sites(lm, docs):
    direct = _direct(lm, docs)
    got = _drain(_store(lm, docs), 7)
    n_ok = direct["ok"][SITES[0]].shape[0]
    assert got[SITES[0]].shape == (n_ok, lm.d_model) and got[SITES[0]].dtype == torch.float32
    src, dist = _match(got[SITES[0]], direct["ok"][SITES[0]])
    assert dist.max() == 0  # every returned row is exactly some eligible token's activation
    for s in SITES:  # ...and the same token's row at every other site: aligned
        assert torch.equal(got[s], direct["ok"][s][src])
        for bad in ("bos", "pad"):  # BOS and padding positions never appear
            assert _match(got[s], direct[bad][s])[1].min() > 1e-3


def test_one_forward_per_token_batch(lm, docs):
    calls = []
    h = lm.adapter.blocks(lm.model)[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        store = _store(lm, docs)
        _drain(store, 5)
    finally:
        h.remove()
    n_batches = len(list(token_batches(lm.tokenizer, docs, SEQ, BATCH)))
    assert len(calls) == store.forwards == n_batches
    assert store.docs_consumed == len(docs)
    assert store.tokens_seen == sum(int(m[:, 1:].sum()) for _, m in token_batches(lm.tokenizer, docs, SEQ, BATCH))


def test_full_pass_is_a_shuffled_permutation(lm, docs):
    table = _direct(lm, docs)["ok"][SITES[2]]
    got = _drain(_store(lm, docs), 4)[SITES[2]]
    assert _multiset(got) == _multiset(table)  # each eligible row exactly once (chunks opening alike repeat rows)
    assert not torch.equal(got, table)  # but not in reading order
    other = _drain(_store(lm, docs, seed=1), 4)[SITES[2]]
    assert not torch.equal(other, got)  # the seed sets the order


def test_short_final_batch_then_stop(lm, docs):
    store = _store(lm, docs)
    total = _direct(lm, docs)["ok"][SITES[0]].shape[0]
    sizes = [b[SITES[0]].shape[0] for b in store.batches(50)]
    assert sum(sizes) == total and all(n == 50 for n in sizes[:-1]) and 0 < sizes[-1] <= 50
    with pytest.raises(StopIteration):
        store.next(50)


@pytest.mark.parametrize("k", [1, 5, 9])
def test_resume_equals_uninterrupted(lm, docs, k):
    m, n = 6, 13
    full = _store(lm, docs)
    expected = [full.next(n) for _ in range(k + m)][k:]

    first = _store(lm, docs)
    for _ in range(k):
        first.next(n)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)  # survives a round trip through a checkpoint file
    buf.seek(0)
    resumed = _store(lm, docs)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert 0 < first._cursor[0] and resumed.tokens_seen == k * n
    for want in expected:
        got = resumed.next(n)
        for s in SITES:
            assert torch.equal(got[s], want[s])
    assert resumed.forwards == full.forwards and resumed.docs_consumed == full.docs_consumed


def test_resume_checks_config_and_can_drop_buffer(lm, docs):
    a = _store(lm, docs)
    a.next(20)
    with pytest.raises(ValueError, match="config"):
        _store(lm, docs, seq_len=SEQ + 1).load_state_dict(a.state_dict())
    b = _store(lm, docs)
    b.load_state_dict(a.state_dict(include_buffer=False))
    assert b.rows_left == 0 and b.docs_consumed == a.docs_consumed


def test_skip_docs_and_held_out_are_disjoint(lm, docs):
    held = held_out_batches(lm.tokenizer, docs, 10, SEQ, BATCH)
    assert [t.tolist() for t, _ in held] == [t.tolist() for t, _ in token_batches(lm.tokenizer, docs[:10], SEQ, BATCH)]
    train = _drain(_store(lm, docs, skip_docs=10), 8)[SITES[0]]
    assert _multiset(train) == _multiset(_direct(lm, docs[10:])["ok"][SITES[0]])
    assert list(skip_docs(iter(docs), 10)) == docs[10:]


# -- token batches -----------------------------------------------------------------------------
def test_token_batches_by_hand():
    tok = word_tokenizer(["a", "b", "c", "d", "e", "f", "g"])
    # ids: <pad>=0 <bos>=1; "a"=4, " a"=5, "b"=6, " b"=7, ... so " x" = "x" + 1
    a, b, c, d, e, f, g = 4, 6, 8, 10, 12, 14, 16
    docs = ["a b c d e f g", "b", "a b c"]  # chunks of 4: [a b c d] [e f g] | [b] | [a b c]
    (ids1, m1), (ids2, m2) = token_batches(tok, docs, seq_len=5, batch_size=2, min_tokens=2)
    assert ids1.tolist() == [[1, a, b + 1, c + 1, d + 1], [1, e + 1, f + 1, g + 1, 0]]
    assert m1.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert ids2.tolist() == [[1, a, b + 1, c + 1]]  # "b" alone was too short; last batch is smaller
    assert m2.tolist() == [[1, 1, 1, 1]]
    # default min_tokens=8 drops everything here
    assert list(token_batches(tok, docs, seq_len=5, batch_size=2)) == []


# -- text files --------------------------------------------------------------------------------
def test_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("first para\nstill first\n\nsecond para\n\n\n")
    (tmp_path / "b.jsonl").write_text('{"text": "json one"}\n\n{"text": "json two", "id": 2}\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("deep")
    assert text_files(tmp_path / "a.txt") == ["first para\nstill first\n\nsecond para"]
    assert text_files(tmp_path / "a.txt", split_paragraphs=True) == ["first para\nstill first", "second para"]
    assert text_files(str(tmp_path / "b.jsonl")) == ["json one", "json two"]
    assert text_files(str(tmp_path / "*.txt")) == text_files(tmp_path / "a.txt")
    assert text_files(tmp_path) == ["first para\nstill first\n\nsecond para", "json one", "json two", "deep"]


def test_text_files_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        text_files(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="pattern"):
        text_files(str(tmp_path / "*.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: malformed"):
        text_files(bad)
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(CorpusError, match=r"bad\.jsonl:1: no 'text' field"):
        text_files(bad)
    assert text_files(bad, text_field="body") == ["x"]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(CorpusError, match="no non-empty documents"):
        text_files(tmp_path / "empty.txt")


# -- generated text ----------------------------------------------------------------------------
@pytest.fixture
def gen_lm():
    lm, _ = make_tiny("llama")
    lm.tokenizer = word_tokenizer([f"v{i}" for i in range(78)])  # ids 0..159 cover the model's vocab
    return lm


def test_generated_is_seeded_and_leaves_global_rng(gen_lm):
    rng = torch.get_rng_state()
    one = generated(gen_lm, 5, max_new_tokens=10, batch_size=2, seed=0, progress=False)
    assert torch.equal(torch.get_rng_state(), rng)
    assert len(one) == 5 and all(isinstance(d, str) for d in one) and len(set(one)) == 5
    assert generated(gen_lm, 5, max_new_tokens=10, batch_size=2, seed=0, progress=False) == one
    assert generated(gen_lm, 5, max_new_tokens=10, batch_size=2, seed=1, progress=False) != one
    greedy = generated(gen_lm, 2, max_new_tokens=10, batch_size=2, temperature=0, progress=False)
    assert greedy[0] == greedy[1]  # greedy from BOS: no randomness at all


def test_generated_stops_at_eos(gen_lm):
    eos = gen_lm.model.generation_config.eos_token_id  # 2 = "<unk>" in the word tokenizer
    gen_lm.model.lm_head.bias = torch.nn.Parameter(torch.zeros(160))
    with torch.no_grad():
        gen_lm.model.lm_head.bias[eos] = 1e4  # EOS first, always
    assert generated(gen_lm, 2, max_new_tokens=10, batch_size=2, progress=False) == ["", ""]


def test_generated_cache_reused_and_extended(gen_lm, tmp_path):
    calls = []
    h = gen_lm.model.register_forward_hook(lambda *a: calls.append(1))
    kw = dict(max_new_tokens=8, batch_size=4, seed=3, progress=False)
    path = tmp_path / "gen.jsonl"
    try:
        first = generated(gen_lm, 6, cache_path=path, **kw)
        n_first = len(calls)
        assert n_first > 0 and len(path.read_text().splitlines()) == 1 + 8  # header + two whole batches
        assert generated(gen_lm, 6, cache_path=path, **kw) == first
        assert generated(gen_lm, 8, cache_path=path, **kw)[:6] == first
        assert len(calls) == n_first  # served from the cache: no forward at all
        more = generated(gen_lm, 10, cache_path=path, **kw)
        assert len(calls) > n_first and more[:6] == first
    finally:
        h.remove()
    assert more == generated(gen_lm, 10, **kw)  # extending == generating from scratch
    with path.open("a") as f:
        f.write('{"text": "torn wri')  # an interrupted append is dropped, with its partial batch
    assert generated(gen_lm, 12, cache_path=path, **kw) == more + generated(gen_lm, 12, **kw)[10:]
    with pytest.raises(CorpusError, match="other settings"):
        generated(gen_lm, 2, cache_path=path, **{**kw, "seed": 4})
