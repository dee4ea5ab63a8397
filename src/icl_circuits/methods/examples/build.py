"""Building a store: one pass over the corpus through the model and every SAE, committed in chunks,
resumable from `<path>.partial`, renamed into place when complete (build_example_store)."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from icl_circuits.data.batching import Cursor, chunk_rows, padded_batches
from icl_circuits.core.model import LM
from icl_circuits.sae.dictionary import JumpReLUSAE
from icl_circuits.core.sites import Site
from icl_circuits.methods.examples.config import ExampleConfig
from icl_circuits.methods.examples.sampling import _candidates, _Pool
from icl_circuits.methods.examples.schema import _commit, _header, _open_build, _Stats
from icl_circuits.methods.examples.store import ExampleStore


# -- token batches with per-row documents and a resumable cursor -----------------------------------
def _row_batches(
    tokenizer: Any, docs: Iterable[str], cfg: ExampleConfig, start: Cursor
) -> Iterator[tuple[Tensor, Tensor, Tensor, Cursor]]:
    """(ids [batch, seq], attention mask [batch, seq], doc index [batch], cursor after the batch)."""
    rows = ((row, (doc, after)) for row, doc, after in chunk_rows(tokenizer, docs, cfg.seq_len, cfg.min_tokens, start))
    for ids, mask, tags in padded_batches(rows, cfg.batch_size, pad_id=0):  # padding is masked out and never stored
        yield ids, mask, torch.tensor([doc for doc, _ in tags]), tags[-1][1]


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
    for ids, mask, row_doc, cursor in batches:
        lengths = mask.sum(1)  # [batch]: rows are right-padded
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

