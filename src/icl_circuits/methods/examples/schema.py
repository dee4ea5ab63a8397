"""The SQLite file of a store being built: its schema, header, and the one-transaction commit of a
chunk of the corpus (new candidates in, losers out, latent stats, token texts, the cursor)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from icl_circuits.core.model import LM
from icl_circuits.sae.dictionary import JumpReLUSAE
from icl_circuits.methods.examples.config import SCHEMA_VERSION, ExampleConfig
from icl_circuits.methods.examples.sampling import _Pool


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


def token_text(tokenizer: Any, token_id: int) -> str:
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
        con.executemany("INSERT INTO tokens VALUES (?, ?)", ((t, token_text(tokenizer, t)) for t in sorted(token_ids - known)))
        con.execute("UPDATE meta SET value = ? WHERE key = 'cursor'", (json.dumps(cursor),))
        con.execute("INSERT INTO progress VALUES (?, ?, ?, ?, ?, ?)",
                    (step, cursor["doc"], cursor["chunk"], cursor["rows"], cursor["tokens"], seconds))  # fmt: skip

