"""Max-activating examples (paper App. I): where in a corpus each SAE latent fires, and how strongly.

    store = build_example_store(lm, {"resid_12": sae}, docs, "runs/examples/examples.sqlite", ExampleConfig())
    store.examples("resid_12", 123, limit=20)   # -> [Example(act, tokens, acts, ...)], milliseconds

One pass over the corpus reads every SAE's site in a single forward (stopping after the last layer
needed) and keeps, for every latent:
  * the top-k examples: the k chunks where the latent's maximum is highest, each centred on that
    maximum (at most one example per chunk, so the top-k are not k neighbouring tokens of one text);
  * a sample of firings in disjoint activation bins of width 0.5 (bin b holds acts in [b/2, (b+1)/2)),
    as in the paper, so the page shows weak as well as strong activations.
Each example keeps a token window (context_before tokens before the firing token, context_after
after) with the latent's activation on every token of the window.

Sampling within a bin is seeded bottom-k ("priority") sampling, the order-free form of reservoir
sampling: every firing gets a pseudo-random key hash(seed, token uid, latent), and a bin keeps the
per_bin firings with the smallest keys. That is a uniform sample without replacement, it is the same
whatever order or chunking the corpus is read in, and a resumed run gives exactly the same store.

Storage is SQLite (stdlib sqlite3). Why: one file that can be copied next to a run; a B-tree index on
(sae, latent, bin, rank) answers "examples for latent i of SAE s" with one index range scan in
about a millisecond without loading the rest (see benchmarks/bench_examples.py); transactions give
resumability for free (each chunk of the corpus is one commit that also records the corpus cursor);
concurrent readers (the viewer's threads) are safe; and it adds no dependency. DuckDB/Parquet are
columnar and shine at scans, not at the point look-ups a feature page needs.

The store is built in `<path>.partial` and renamed to `<path>` when complete (atomic finalisation);
a run that finds a `.partial` made with the same settings continues from its last commit.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .corpus import bos_id
from .model import LM
from .sae.activations import _chunks
from .sae.dictionary import JumpReLUSAE
from .sites import Site
from .storage import ReadOnlySQLite

SCHEMA_VERSION = 1
TOP = -1  # the `bin` of a top-k example; sampled examples have bin >= 0
_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class ExampleConfig:
    """What determines the store's content (a resumed run must use the same one)."""

    seq_len: int = 128  # tokens per chunk, BOS included
    batch_size: int = 16  # chunks per forward
    top_k: int = 16  # top examples per latent (one per chunk)
    bin_width: float = 0.5  # activation bins [b*w, (b+1)*w), as in the paper
    per_bin: int = 4  # sampled examples per (latent, bin)
    max_bins: int = 200  # activations above max_bins*bin_width fall into the last bin
    context_before: int = 24  # window tokens before the firing token
    context_after: int = 8  # window tokens after it
    seed: int = 0
    min_tokens: int = 8  # shorter chunks are skipped (as in SAE training)
    commit_every: int = 8  # forwards per SQLite commit (the resume granularity)
    corpus: str = ""  # a label for the corpus (e.g. its spec), stored with the results

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "top_k", "per_bin", "max_bins", "commit_every", "min_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ExampleConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.seq_len < 2:
            raise ValueError(f"ExampleConfig.seq_len must be >= 2, got {self.seq_len}")
        if not self.bin_width > 0:
            raise ValueError(f"ExampleConfig.bin_width must be > 0, got {self.bin_width}")
        if self.context_before < 0 or self.context_after < 0:
            raise ValueError("ExampleConfig.context_before / context_after must be >= 0")

    @property
    def window(self) -> int:
        return self.context_before + 1 + self.context_after


# -- the sampling key -----------------------------------------------------------------------------
def sample_keys(uid: Tensor, latent: Tensor, seed: int) -> Tensor:
    """Pseudo-random 32-bit keys (int64 tensor) of firings: murmur3's finaliser of (uid, latent, seed).

    Integer overflow in int64 wraps (two's complement), which leaves the low 32 bits we keep exact.
    """
    h = (uid.long() * 0x9E3779B1 + latent.long() * 0x7FEB352D + (seed * 0x846CA68B + 0x165667B1)) & _M32
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def _group_rank(group: Tensor, rank: Tensor, uid: Tensor) -> tuple[Tensor, Tensor]:
    """(order, rank within group) sorting rows by (group, rank, uid); ties in rank go to the smaller uid."""
    order = torch.argsort(uid, stable=True)
    order = order[torch.argsort(rank[order], stable=True)]
    order = order[torch.argsort(group[order], stable=True)]
    _, counts = torch.unique_consecutive(group[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    within = torch.arange(len(order)) - torch.repeat_interleave(starts, counts)
    return order, within


# -- candidates: a columnar pool of examples, pruned to the top-k / bottom-k keys per group --------
@dataclass
class _Pool:
    latent: Tensor  # [n] int64
    bin: Tensor  # [n] int64 (TOP for top-k examples)
    rank: Tensor  # [n] float64: -act for top-k, the sampling key for bins (smaller = kept)
    act: Tensor  # [n] float32
    uid: Tensor  # [n] int64 global token id of the firing token
    doc: Tensor  # [n] int64 document index
    pos: Tensor  # [n] int64 position of the firing token in its chunk
    start: Tensor  # [n] int64 chunk position of the window's first token
    length: Tensor  # [n] int64 window length
    ids: Tensor  # [n, window] int64 token ids (padded)
    acts: Tensor  # [n, window] float32 latent activation on each window token (padded)

    @staticmethod
    def cat(pools: list["_Pool"]) -> "_Pool":
        return _Pool(*[torch.cat([getattr(p, f) for p in pools]) for f in _Pool.__dataclass_fields__])

    def take(self, idx: Tensor) -> "_Pool":
        return _Pool(*[getattr(self, f)[idx] for f in _Pool.__dataclass_fields__])

    def __len__(self) -> int:
        return len(self.latent)

    def kept(self, cfg: ExampleConfig) -> Tensor:
        """Indices of the rows to keep: the top_k per latent (bin TOP), the per_bin smallest keys per (latent, bin)."""
        group = self.latent * (cfg.max_bins + 1) + (self.bin + 1)
        order, within = _group_rank(group, self.rank, self.uid)
        limit = torch.where(self.bin[order] == TOP, cfg.top_k, cfg.per_bin)
        return order[within < limit]

    def prune(self, cfg: ExampleConfig) -> "_Pool":
        return self.take(self.kept(cfg)) if len(self) else self


def _candidates(
    f: Tensor,  # [batch, seq, d_sae] latent activations
    keep: Tensor,  # [batch, seq] bool: real tokens (not BOS, not padding)
    ids: Tensor,  # [batch, seq]
    lengths: Tensor,  # [batch] real length of each row (BOS included)
    row_uid: Tensor,  # [batch] global index of each chunk
    row_doc: Tensor,  # [batch] document of each chunk
    cfg: ExampleConfig,
) -> _Pool:
    """The batch's top-k and binned candidates with their windows, already pruned within the batch."""
    f = f * keep[..., None]  # [batch, seq, d_sae]
    seq = f.shape[1]
    # top-k: each chunk's maximum per latent
    row_max, row_arg = f.max(dim=1)  # [batch, d_sae]
    r_top, l_top = torch.nonzero(row_max > 0, as_tuple=True)
    p_top = row_arg[r_top, l_top]
    # bins: every firing
    r_bin, p_bin, l_bin = torch.nonzero(f > 0, as_tuple=True)
    act_bin = f[r_bin, p_bin, l_bin]
    # uid: a token's global index (chunk number * seq_len + position), unique across batches
    uid_bin = row_uid[r_bin] * cfg.seq_len + p_bin
    act_top = row_max[r_top, l_top]
    uid_top = row_uid[r_top] * cfg.seq_len + p_top
    bins = torch.clamp((act_bin / cfg.bin_width).floor().long(), 0, cfg.max_bins - 1)
    keys = sample_keys(uid_bin, l_bin, cfg.seed).double()

    row = torch.cat([r_top, r_bin])
    pos = torch.cat([p_top, p_bin])
    latent = torch.cat([l_top, l_bin])
    no_window = torch.empty(len(row), 0)
    pool = _Pool(
        latent=latent, bin=torch.cat([torch.full_like(l_top, TOP), bins]),
        rank=torch.cat([-act_top.double(), keys]), act=torch.cat([act_top, act_bin]).float(),
        uid=torch.cat([uid_top, uid_bin]), doc=row_doc[row], pos=pos, start=pos, length=pos,  # start/length: set below
        ids=no_window.long(), acts=no_window,
    )  # fmt: skip
    # prune before building windows: only the survivors need them
    kept = pool.kept(cfg)
    pool, row = pool.take(kept), row[kept]
    pos, latent = pool.pos, pool.latent
    # window: [start, end) around the firing token, clipped to the chunk's real tokens (never BOS or padding)
    start = torch.clamp(pos - cfg.context_before, min=1)  # [n]
    end = torch.minimum(pos + cfg.context_after + 1, lengths[row])  # [n]
    idx = start[:, None] + torch.arange(cfg.window)  # [n, window]
    valid = idx < end[:, None]
    idx = idx.clamp(max=seq - 1)
    pool.ids = torch.where(valid, ids[row[:, None], idx], 0)  # [n, window], padded with 0
    pool.acts = torch.where(valid, f[row[:, None], idx, latent[:, None]], 0.0)  # [n, window]
    pool.start, pool.length = start, end - start
    return pool


# -- token batches with per-row documents and a resumable cursor -----------------------------------
def _row_batches(
    tokenizer: Any, docs: Iterable[str], cfg: ExampleConfig, start: tuple[int, int]
) -> Iterator[tuple[Tensor, Tensor, Tensor, tuple[int, int]]]:
    """(ids [batch, seq], lengths [batch], doc index [batch], cursor after the batch)."""
    bos = bos_id(tokenizer)
    rows: list[list[int]] = []
    row_docs: list[int] = []
    for chunk, cursor in _chunks(tokenizer, docs, cfg.seq_len, cfg.min_tokens, start):
        rows.append([bos, *chunk])
        # the cursor after a chunk is (d, next chunk > 0) inside doc d, or (d + 1, 0) after its last chunk
        row_docs.append(cursor[0] if cursor[1] > 0 else cursor[0] - 1)
        if len(rows) == cfg.batch_size:
            yield (*_pad(rows), torch.tensor(row_docs), cursor)
            rows, row_docs = [], []
    if rows:
        yield (*_pad(rows), torch.tensor(row_docs), cursor)


def _pad(rows: list[list[int]]) -> tuple[Tensor, Tensor]:
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)  # [batch, seq]
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return ids, torch.tensor([len(r) for r in rows])


# -- the SQLite schema ------------------------------------------------------------------------------
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS saes (id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, site TEXT NOT NULL,
    d_sae INTEGER NOT NULL, info TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS latents (sae INTEGER NOT NULL, latent INTEGER NOT NULL, n_fired INTEGER NOT NULL,
    sum_act REAL NOT NULL, max_act REAL NOT NULL, PRIMARY KEY (sae, latent)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS examples (sae INTEGER NOT NULL, latent INTEGER NOT NULL, bin INTEGER NOT NULL,
    rank REAL NOT NULL, uid INTEGER NOT NULL, act REAL NOT NULL, doc INTEGER NOT NULL, pos INTEGER NOT NULL,
    start INTEGER NOT NULL, ids BLOB NOT NULL, acts BLOB NOT NULL, PRIMARY KEY (sae, latent, bin, rank, uid)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tokens (id INTEGER PRIMARY KEY, text TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS progress (step INTEGER PRIMARY KEY, doc INTEGER NOT NULL, chunk INTEGER NOT NULL,
    rows INTEGER NOT NULL, tokens INTEGER NOT NULL, seconds REAL NOT NULL);
"""
# The examples table is clustered on its primary key (WITHOUT ROWID), so all examples of one latent
# sit together on disk, already in display order: a feature page is one contiguous range read.

_PRUNE = """
DELETE FROM examples WHERE (sae, latent, bin, rank, uid) IN (
  SELECT sae, latent, bin, rank, uid FROM (
    SELECT sae, latent, bin, rank, uid,
           ROW_NUMBER() OVER (PARTITION BY sae, latent, bin ORDER BY rank, uid) AS n
    FROM examples WHERE (sae, latent) IN (SELECT sae, latent FROM touched))
  WHERE n > CASE WHEN bin = -1 THEN ? ELSE ? END)
"""


def _docs_fingerprint(docs: Iterable[str]) -> str | None:
    """sha256 of a finite corpus (a list); None for a stream that cannot be read twice cheaply."""
    if not isinstance(docs, Sequence):
        return None
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


def _token_text(tokenizer: Any, token_id: int) -> str:
    """How a token reads inside running text (SentencePiece's '▁' as a space, byte tokens as bytes)."""
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    if isinstance(piece, str) and piece.startswith("▁"):
        return " " + piece[1:].replace("▁", " ")
    text = tokenizer.decode([int(token_id)], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return text if text != "" else (piece if isinstance(piece, str) else "")


def _header(lm: LM, saes: dict[str, JumpReLUSAE], docs: Iterable[str], cfg: ExampleConfig) -> dict[str, Any]:
    return {
        "schema": SCHEMA_VERSION,
        "model": lm.name,
        "config": asdict(cfg),
        "saes": {name: {"site": sae.cfg.site, "d_sae": sae.d_sae, "kind": sae.cfg.kind} for name, sae in saes.items()},
        "docs_sha256": _docs_fingerprint(docs),
    }


def _open_build(path: Path, header: dict[str, Any], saes: dict[str, JumpReLUSAE]) -> sqlite3.Connection:
    """Open (or create) the partial store; a partial made with other settings is an error."""
    con = sqlite3.connect(path)
    con.executescript(SCHEMA)
    row = con.execute("SELECT value FROM meta WHERE key = 'header'").fetchone()
    if row is None:
        with con:
            con.execute("INSERT INTO meta VALUES ('header', ?)", (json.dumps(header),))
            con.execute("INSERT INTO meta VALUES ('cursor', ?)", (json.dumps({"doc": 0, "chunk": 0, "rows": 0, "tokens": 0}),))
            for i, (name, sae) in enumerate(saes.items()):
                info = {"kind": sae.cfg.kind, "layer": sae.cfg.layer, "out_site": sae.cfg.out_site, "source": sae.cfg.source}
                con.execute("INSERT INTO saes VALUES (?, ?, ?, ?, ?)", (i, name, sae.cfg.site, sae.d_sae, json.dumps(info)))
    elif json.loads(row[0]) != header:
        con.close()
        raise ValueError(
            f"{path} holds a partial example store made with other settings: {row[0]} "
            f"(now {json.dumps(header)}); delete it to start over"
        )
    return con


def _write_pool(con: sqlite3.Connection, sae_id: int, pool: _Pool, cfg: ExampleConfig) -> set[int]:
    """Insert the pool's examples; returns the token ids their windows use."""
    ids_np = pool.ids.numpy().astype("<i4")
    acts_np = pool.acts.numpy().astype("<f2")  # half precision is plenty for shading a token
    lens = pool.length.tolist()
    rows = [
        (sae_id, lat, b, r, u, a, d, p, s, ids_np[i, :n].tobytes(), acts_np[i, :n].tobytes())
        for i, (lat, b, r, u, a, d, p, s, n) in enumerate(zip(
            pool.latent.tolist(), pool.bin.tolist(), pool.rank.tolist(), pool.uid.tolist(), pool.act.tolist(),
            pool.doc.tolist(), pool.pos.tolist(), pool.start.tolist(), lens))
    ]  # fmt: skip
    con.executemany("INSERT OR IGNORE INTO examples VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
    mask = torch.arange(cfg.window)[None, :] < pool.length[:, None]
    return set(pool.ids[mask].unique().tolist())


@dataclass
class _Stats:
    n_fired: Tensor  # [d_sae] int64
    sum_act: Tensor  # [d_sae] float64
    max_act: Tensor  # [d_sae] float32


def _commit(
    con: sqlite3.Connection,
    pools: dict[int, _Pool],
    stats: dict[int, _Stats],
    tokenizer: Any,
    cfg: ExampleConfig,
    cursor: dict[str, int],
    step: int,
    seconds: float,
) -> None:
    """One transaction: new candidates in, losers out, latent stats, token texts, and the cursor."""
    with con:
        con.execute("CREATE TEMP TABLE IF NOT EXISTS touched (sae INTEGER, latent INTEGER, PRIMARY KEY (sae, latent))")
        con.execute("DELETE FROM touched")
        token_ids: set[int] = set()
        for sae_id, pool in pools.items():
            token_ids |= _write_pool(con, sae_id, pool, cfg)
            con.executemany("INSERT OR IGNORE INTO touched VALUES (?, ?)", ((sae_id, l) for l in pool.latent.unique().tolist()))
        con.execute(_PRUNE, (cfg.top_k, cfg.per_bin))
        for sae_id, st in stats.items():
            fired = torch.nonzero(st.n_fired).flatten().tolist()
            con.executemany(
                "INSERT INTO latents VALUES (?, ?, ?, ?, ?) ON CONFLICT (sae, latent) DO UPDATE SET "
                "n_fired = n_fired + excluded.n_fired, sum_act = sum_act + excluded.sum_act, "
                "max_act = MAX(max_act, excluded.max_act)",
                ((sae_id, l, int(st.n_fired[l]), float(st.sum_act[l]), float(st.max_act[l])) for l in fired),
            )
        known = {r[0] for r in con.execute("SELECT id FROM tokens")} if token_ids else set()
        con.executemany("INSERT INTO tokens VALUES (?, ?)", ((t, _token_text(tokenizer, t)) for t in sorted(token_ids - known)))
        con.execute("UPDATE meta SET value = ? WHERE key = 'cursor'", (json.dumps(cursor),))
        con.execute("INSERT INTO progress VALUES (?, ?, ?, ?, ?, ?)",
                    (step, cursor["doc"], cursor["chunk"], cursor["rows"], cursor["tokens"], seconds))  # fmt: skip


def build_example_store(
    lm: LM,
    saes: dict[str, JumpReLUSAE],
    docs: Iterable[str],
    path: str | os.PathLike,
    config: ExampleConfig | None = None,
    progress: bool = True,
    max_batches: int | None = None,
) -> "ExampleStore":
    """Stream `docs` through `lm` once and store every latent's examples in SQLite at `path`.

    saes: name -> SAE; all must read `lm` (checked). Resumes from `<path>.partial` when one made
    with the same settings exists; returns at once if `path` is already a complete store with them.
    max_batches: stop after this many forwards in this call (the store stays partial; for tests
    and for splitting a long job into sessions).
    """
    cfg = config or ExampleConfig()
    if not saes:
        raise ValueError("build_example_store needs at least one SAE")
    if lm.tokenizer is None:
        raise ValueError("build_example_store needs lm.tokenizer (to cut the corpus and to store token texts)")
    for name, sae in saes.items():
        sae.check_compatible(lm)
        if not name or "/" in name:
            raise ValueError(f"bad SAE name {name!r}: must be non-empty and contain no '/'")
    path = Path(path)
    header = _header(lm, saes, docs, cfg)
    if path.exists():
        store = ExampleStore(path)
        if store.header != header:
            raise ValueError(f"{path} is a complete example store made with other settings; choose another path")
        return store
    partial = path.with_name(path.name + ".partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    con = _open_build(partial, header, saes)
    try:
        cur = json.loads(con.execute("SELECT value FROM meta WHERE key = 'cursor'").fetchone()[0])
        if not cur.get("done"):
            _stream(lm, saes, docs, cfg, con, cur, progress, max_batches)
            cur = json.loads(con.execute("SELECT value FROM meta WHERE key = 'cursor'").fetchone()[0])
        if not cur.get("done"):
            return ExampleStore(partial, allow_partial=True)
        with con:
            con.execute("INSERT OR REPLACE INTO meta VALUES ('complete', ?)", (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),))
        con.execute("ANALYZE")
        con.execute("PRAGMA journal_mode = DELETE")
    finally:
        con.close()
    os.replace(partial, path)  # the finished store appears at once, or not at all
    return ExampleStore(path)


@torch.no_grad()
def _stream(
    lm: LM,
    saes: dict[str, JumpReLUSAE],
    docs: Iterable[str],
    cfg: ExampleConfig,
    con: sqlite3.Connection,
    cur: dict[str, Any],
    progress: bool,
    max_batches: int | None,
) -> None:
    sae_ids = {name: i for i, name in enumerate(saes)}
    sites = sorted({Site.parse(s.cfg.site) for s in saes.values()}, key=lambda s: s.order)
    step = con.execute("SELECT COUNT(*) FROM progress").fetchone()[0]
    total = len(docs) if isinstance(docs, Sequence) else None
    bar = tqdm(total=total, initial=cur["doc"], desc="max-activating examples", unit="doc", disable=not progress)

    def fresh() -> tuple[dict[int, _Pool], dict[int, _Stats]]:
        pools: dict[int, _Pool] = {}  # sae id -> this commit's candidates, pruned after every batch
        stats = {
            sae_ids[n]: _Stats(torch.zeros(s.d_sae, dtype=torch.long), torch.zeros(s.d_sae, dtype=torch.float64), torch.zeros(s.d_sae))
            for n, s in saes.items()
        }  # fmt: skip
        return pools, stats

    pools, stats = fresh()
    n_in_commit, n_batches, t0 = 0, 0, time.perf_counter()
    batches = _row_batches(lm.tokenizer, docs, cfg, (cur["doc"], cur["chunk"]))
    for ids, lengths, row_doc, cursor in batches:
        mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()  # [batch, seq]
        acts = lm.activations(ids, sites, attention_mask=mask)  # one pass, stops after the last site
        keep = mask.bool().clone()
        keep[:, 0] = False  # BOS is an outlier position, never an example
        row_uid = cur["rows"] + torch.arange(len(ids))
        for name, sae in saes.items():
            x = acts[Site.parse(sae.cfg.site)].to(sae.device)
            f = sae.encode(x).float().cpu()  # [batch, seq, d_sae]
            f = f * keep[..., None]
            i = sae_ids[name]
            st = stats[i]
            st.n_fired += (f > 0).sum((0, 1))
            st.sum_act += f.sum((0, 1), dtype=torch.float64)
            st.max_act = torch.maximum(st.max_act, f.amax((0, 1)))
            new = _candidates(f, keep, ids, lengths, row_uid, row_doc, cfg)
            pools[i] = _Pool.cat([pools[i], new]).prune(cfg) if i in pools else new
        cur = {"doc": cursor[0], "chunk": cursor[1], "rows": cur["rows"] + len(ids), "tokens": cur["tokens"] + int(keep.sum())}
        n_in_commit += 1
        n_batches += 1
        bar.update(cursor[0] - bar.n)
        bar.set_postfix(tokens=cur["tokens"])
        if n_in_commit == cfg.commit_every or (max_batches is not None and n_batches >= max_batches):
            _commit(con, pools, stats, lm.tokenizer, cfg, cur, step, time.perf_counter() - t0)
            step += 1
            pools, stats = fresh()
            n_in_commit = 0
            if max_batches is not None and n_batches >= max_batches:
                bar.close()
                return
    cur["done"] = True
    _commit(con, pools, stats, lm.tokenizer, cfg, cur, step, time.perf_counter() - t0)
    bar.close()


# -- reading ----------------------------------------------------------------------------------------
@dataclass
class Example:
    """One example: the latent fired with `act` on token `target` of the window `tokens`."""

    sae: str
    latent: int
    act: float
    bin: int  # -1: a top-k example; b >= 0: sampled from activations in [b*w, (b+1)*w)
    doc: int  # document index in the corpus
    pos: int  # position of the firing token in its chunk
    target: int  # index of the firing token within `tokens`
    tokens: list[str]  # the window's token texts
    token_ids: list[int]
    acts: list[float]  # the latent's activation on each window token
    uid: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ExampleStore(ReadOnlySQLite):
    """Read-only access to an example store; safe to share between threads (one connection each)."""

    def __init__(self, path: str | os.PathLike, allow_partial: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no example store at {self.path}")
        self._local = threading.local()
        try:
            meta = dict(self._con().execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{self.path} is not an example store ({e})") from e
        if "header" not in meta:
            raise ValueError(f"{self.path} is not an example store (no header)")
        self.header: dict[str, Any] = json.loads(meta["header"])
        self.complete = "complete" in meta
        if not (self.complete or allow_partial):
            raise ValueError(f"{self.path} is an unfinished example store; run the build again to finish it")
        self.config = ExampleConfig(**self.header["config"])
        rows = self._con().execute("SELECT id, name, site, d_sae, info FROM saes ORDER BY id").fetchall()
        self._sae_ids = {name: i for i, name, *_ in rows}
        self._saes = [{"name": n, "site": s, "d_sae": d, **json.loads(info)} for _, n, s, d, info in rows]


    def _sae_id(self, sae: str) -> int:
        if sae not in self._sae_ids:
            raise KeyError(f"no SAE {sae!r} in {self.path}; it has {sorted(self._sae_ids)}")
        return self._sae_ids[sae]

    def saes(self) -> list[dict[str, Any]]:
        """name, site, d_sae, kind, layer, ... of each SAE in the store."""
        return [dict(s) for s in self._saes]

    def progress(self) -> dict[str, Any]:
        """Tokens and documents read so far."""
        return json.loads(self._con().execute("SELECT value FROM meta WHERE key = 'cursor'").fetchone()[0])

    def latent_stats(self, sae: str, latent: int) -> dict[str, Any]:
        """n_fired, density (share of tokens where it fires), mean act when firing, max act."""
        row = self._con().execute(
            "SELECT n_fired, sum_act, max_act FROM latents WHERE sae = ? AND latent = ?", (self._sae_id(sae), int(latent))
        ).fetchone()
        n, s, m = row if row else (0, 0.0, 0.0)
        tokens = max(self.progress()["tokens"], 1)
        return {"n_fired": n, "density": n / tokens, "mean_act": s / n if n else 0.0, "max_act": m}

    def top_latents(self, sae: str, by: str = "max_act", limit: int = 100) -> list[dict[str, Any]]:
        """Latents sorted by max_act or n_fired (descending)."""
        if by not in ("max_act", "n_fired"):
            raise ValueError(f"by must be 'max_act' or 'n_fired', got {by!r}")
        rows = self._con().execute(
            f"SELECT latent, n_fired, max_act FROM latents WHERE sae = ? ORDER BY {by} DESC LIMIT ?",
            (self._sae_id(sae), int(limit)),
        ).fetchall()
        return [{"latent": l, "n_fired": n, "max_act": m} for l, n, m in rows]

    def examples(self, sae: str, latent: int, limit: int | None = None, kind: str = "all") -> list[Example]:
        """Examples of one latent: the top-k by activation, then the binned samples from the highest
        bin down (within a bin, in sampling order). kind: 'all', 'top' or 'bins'."""
        if kind not in ("all", "top", "bins"):
            raise ValueError(f"kind must be 'all', 'top' or 'bins', got {kind!r}")
        where = {"all": "", "top": " AND bin = -1", "bins": " AND bin >= 0"}[kind]
        order = "CASE WHEN bin = -1 THEN 0 ELSE 1 END, bin DESC, rank, uid"
        con = self._con()
        rows = con.execute(
            f"SELECT latent, act, bin, doc, pos, start, ids, acts, uid FROM examples "
            f"WHERE sae = ? AND latent = ?{where} ORDER BY {order} LIMIT ?",
            (self._sae_id(sae), int(latent), -1 if limit is None else int(limit)),
        ).fetchall()
        windows = [(np.frombuffer(r[6], "<i4").tolist(), np.frombuffer(r[7], "<f2").astype(float).tolist()) for r in rows]
        texts = self.token_texts({t for ids, _ in windows for t in ids})
        return [
            Example(sae, lat, act, b, doc, pos, pos - start, [texts.get(t, "") for t in ids], ids, acts, uid)
            for (lat, act, b, doc, pos, start, _, _, uid), (ids, acts) in zip(rows, windows)
        ]

    def token_texts(self, token_ids: Iterable[int]) -> dict[int, str]:
        ids = sorted(set(token_ids))
        out: dict[int, str] = {}
        for i in range(0, len(ids), 900):  # SQLite's bound-parameter limit
            part = ids[i : i + 900]
            q = f"SELECT id, text FROM tokens WHERE id IN ({','.join('?' * len(part))})"
            out.update(self._con().execute(q, part).fetchall())
        return out

    def count(self, sae: str | None = None) -> int:
        """Stored examples (of one SAE, or all)."""
        if sae is None:
            return self._con().execute("SELECT COUNT(*) FROM examples").fetchone()[0]
        return self._con().execute("SELECT COUNT(*) FROM examples WHERE sae = ?", (self._sae_id(sae),)).fetchone()[0]

    def latent_table(self, sae: str) -> list[dict[str, Any]]:
        """n_fired, mean and max activation of every latent that fired at least once."""
        rows = self._con().execute(
            "SELECT latent, n_fired, sum_act, max_act FROM latents WHERE sae = ? ORDER BY latent", (self._sae_id(sae),)
        ).fetchall()
        return [{"latent": l, "n_fired": n, "mean_act": s / n if n else 0.0, "max_act": m} for l, n, s, m in rows]


def summarize_store(store: ExampleStore, out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Per-SAE summary rows, written as summary.csv, plus a plot of latent densities and max activations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .storage import save_figure, write_csv

    tokens = max(store.progress()["tokens"], 1)
    rows = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for s in store.saes():
        table = store.latent_table(s["name"])
        dens = np.array([r["n_fired"] / tokens for r in table])
        rows.append({
            "sae": s["name"], "site": s["site"], "d_sae": s["d_sae"], "tokens": tokens, "latents_fired": len(table),
            "examples": store.count(s["name"]), "median_density": float(np.median(dens)) if len(dens) else 0.0,
            "max_act": max((r["max_act"] for r in table), default=0.0),
        })  # fmt: skip
        if len(dens):
            axes[0].hist(np.log10(dens), bins=50, histtype="step", label=s["name"])
            axes[1].hist([r["max_act"] for r in table], bins=50, histtype="step", label=s["name"])
    axes[0].set_xlabel("log10 firing density (share of tokens)")
    axes[1].set_xlabel("max activation")
    for ax in axes:
        ax.set_ylabel("latents")
        ax.legend()
    fig.suptitle(f"Latents on {tokens:,} corpus tokens")
    save_figure(fig, Path(out_dir) / "latent_density")
    plt.close(fig)
    write_csv(Path(out_dir) / "summary.csv", rows)
    return rows
